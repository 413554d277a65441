__version__ = "0.1.0"
# Bumped when the saved-result format changes incompatibly.
RESULT_FORMAT_VERSION = 1
