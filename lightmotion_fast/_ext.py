"""Loads the compiled extension lightmotion_fast._C, if there is one.

A missing or broken extension is a warning, never an import error: every op has a PyTorch reference
and, on CUDA, a Triton kernel, so only the CPU fast paths are lost.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

_REBUILD = ("rebuild it against the torch you run: from a source checkout `pip install --no-build-isolation -e .`; "
            "for an installed package `pip install --no-build-isolation --force-reinstall --no-deps lightmotion_fast` "
            "(or the sdist)")


def _warn(message: str) -> None:
    warnings.warn(f"lightmotion_fast: {message}. CPU ops fall back to the PyTorch reference; {_REBUILD}.",
                  RuntimeWarning, stacklevel=4)


def _load():
    if os.environ.get("LIGHTMOTION_NO_EXT", "0") == "1":
        return None, "LIGHTMOTION_NO_EXT=1"
    if importlib.util.find_spec("lightmotion_fast._C") is None:
        # Checked first: importing a missing submodule while the package initialises reports a
        # "partially initialized module ... circular import", which misleads.
        _warn("the C++ extension lightmotion_fast._C could not be loaded: this installation has no C++ extension "
              "(built without torch, or with LIGHTMOTION_NO_EXT=1)")
        return None, "not built"
    try:
        from lightmotion_fast import _C  # noqa: F401  (registers torch.ops.lightmotion_cpp.*)
    except ImportError as exc:  # built against another torch (undefined symbols), or a broken file
        _warn(f"the C++ extension lightmotion_fast._C could not be loaded ({exc})")
        return None, str(exc)
    built_with = _C.torch_version()
    if built_with.split("+")[0] != torch.__version__.split("+")[0]:
        _warn(f"the C++ extension was built against torch {built_with} but torch {torch.__version__} is "
              "installed, so it is not used")
        return None, f"built against torch {built_with}"
    return _C, None


_C, load_error = _load()


def available() -> bool:
    """True when the compiled extension is loaded and its ops are registered."""
    return _C is not None


def has_op(name: str) -> bool:
    """True when the extension provides torch.ops.lightmotion_cpp.<name>."""
    return _C is not None and hasattr(torch.ops.lightmotion_cpp, name)
