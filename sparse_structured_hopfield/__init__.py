"""Sparse and structured modern Hopfield networks: the library of this repository as one package.

The modules stay flat at the repository root (``layers.py``, ``sparsemax.py``, ``sparsemax_kernels.py``,
``deq.py``), where the scripts and tests import them by those names; this directory links to them, so
that ``pip install`` puts them under this one unique name and installs no top-level ``sparsemax``,
``layers`` or ``deq`` (PyPI's unrelated ``sparsemax`` stays importable beside it):

    from sparse_structured_hopfield import Hopfield, HopfieldPooling, HopfieldLayer, causal_mask
    from sparse_structured_hopfield.sparsemax import entmax15
"""
import importlib
import sys


def _load_maps():
    """Import ``sparsemax``, which imports its numba kernels by their flat name: while it loads, that
    name means this package's ``sparsemax_kernels`` (None, i.e. the torch solvers, if numba is missing)."""
    try:
        kernels = importlib.import_module(f"{__name__}.sparsemax_kernels")
    except ImportError:  # pragma: no cover - numba is a dependency
        kernels = None
    flat = sys.modules.get("sparsemax_kernels", ...)
    sys.modules["sparsemax_kernels"] = kernels
    try:
        return importlib.import_module(f"{__name__}.sparsemax")
    finally:
        if flat is ...:
            del sys.modules["sparsemax_kernels"]
        else:
            sys.modules["sparsemax_kernels"] = flat


sparsemax = _load_maps()
from . import deq, layers  # noqa: E402  (layers finds sparsemax and deq inside this package)
from .layers import (MODES, Hopfield, HopfieldLayer, HopfieldPooling, causal_mask, energy,  # noqa: E402
                     retrieve, separation)

__all__ = ["MODES", "Hopfield", "HopfieldLayer", "HopfieldPooling", "causal_mask", "deq", "energy",
           "layers", "retrieve", "separation", "sparsemax"]
