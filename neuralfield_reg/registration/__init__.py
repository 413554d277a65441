"""The stages a user runs: the affine stage (:mod:`.affine`), the neural-field fit of one pair or
a batch of pairs (:mod:`.fit`: ``fit_pair``, ``fit_pairs``) and its result (:mod:`.result`)."""

from .fit import FitDivergedError, fit_pair, fit_pairs
from .result import RegistrationResult

__all__ = ["FitDivergedError", "RegistrationResult", "fit_pair", "fit_pairs"]
