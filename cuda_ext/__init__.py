"""Compiled hash-grid kernels (C++ for the CPU, CUDA for the GPU) and their loader.

Installed as ``neuralfield_reg._cuda_ext``; nothing here runs at import time.
"""

from .loader import NativeBuildError, load

__all__ = ["NativeBuildError", "load"]
