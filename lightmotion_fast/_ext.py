"""Loads the compiled extension lightmotion_fast._C, if there is one.

A missing or broken extension is a warning, never an import error: every op has a PyTorch reference
and, on CUDA, a Triton kernel, so only the CPU fast paths are lost.
"""
from __future__ import annotations

import os
import warnings

import torch

_REBUILD = "pip install --no-build-isolation -e .  (from the repository root, with the torch you run)"


def _load():
    if os.environ.get("LIGHTMOTION_NO_EXT", "0") == "1":
        return None, "LIGHTMOTION_NO_EXT=1"
    try:
        from lightmotion_fast import _C  # noqa: F401  (registers torch.ops.lightmotion_cpp.*)
    except ImportError as exc:  # not built, or built against another torch (undefined symbols)
        warnings.warn(
            f"lightmotion_fast: the C++ extension lightmotion_fast._C could not be loaded ({exc}). "
            f"CPU ops fall back to the PyTorch reference. To build it: {_REBUILD}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, str(exc)
    built_with = _C.torch_version()
    if built_with.split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(
            f"lightmotion_fast: the C++ extension was built against torch {built_with} but torch "
            f"{torch.__version__} is installed; it is not used. Rebuild it: {_REBUILD}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, f"built against torch {built_with}"
    return _C, None


_C, load_error = _load()


def available() -> bool:
    """True when the compiled extension is loaded and its ops are registered."""
    return _C is not None


def has_op(name: str) -> bool:
    """True when the extension provides torch.ops.lightmotion_cpp.<name>."""
    return _C is not None and hasattr(torch.ops.lightmotion_cpp, name)
