"""Applications built on the library: the ``nfreg`` command line (:mod:`.cli`), cohorts and their
``torchrun`` distribution (:mod:`.cohort`, :mod:`.distributed`), figures (:mod:`.viz`), and the
demos and benchmark behind ``nfreg demo`` and ``nfreg benchmark-vs-icon``. Nothing below this
folder imports from it."""
