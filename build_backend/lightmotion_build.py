"""In-tree PEP 517 build backend: setuptools' own, plus torch as a build requirement of the wheel.

The C++ extension lightmotion_fast._C is compiled against torch, and a wheel built against one torch
only loads with that torch. pip's default isolated build environment sees none of the packages of
the environment that runs pip, so a plain `build-system.requires = ["torch"]` would fetch the newest
torch from the index (several GB of CUDA wheels) and build against the wrong version. Instead, when
torch is not importable here, `get_requires_for_build_wheel` asks the interpreter that runs pip
which torch it has and requires exactly that version (the same local label too, e.g. `+cpu`), so pip
installs the same build into the build environment — from its cache or local wheels, where it has
them. When no torch can be found the build stops with an error that says what to do; it never
produces a wheel without the extension unless LIGHTMOTION_NO_EXT=1 asks for one.

Environment:
  LIGHTMOTION_NO_EXT=1          build without the extension (pure-Python wheel; CPU ops use the reference)
  LIGHTMOTION_BUILD_TORCH=SPEC  the torch requirement for an isolated build, e.g. "torch==2.13.0+cpu"
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401  (the hooks this backend leaves to setuptools)
    build_editable,
    build_sdist,
    build_wheel,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

_ADVICE = (
    "Either install torch first and build without isolation: `pip install torch==<version>` then "
    "`pip install --no-build-isolation .`; or name the torch to build against: "
    "LIGHTMOTION_BUILD_TORCH='torch==<version>' pip install .; or build a wheel without the C++ extension "
    "(CPU ops then run the PyTorch reference): LIGHTMOTION_NO_EXT=1 pip install ."
)


def _invoking_torch_version() -> str | None:
    """torch's version in the environment of the interpreter running this hook, looked up with the
    build environment's path settings removed. pip runs the hooks with its own interpreter and hides
    that interpreter's site-packages through PYTHONPATH/PYTHONNOUSERSITE; without them the
    interpreter sees its own packages again. Under other frontends (python -m build, uv) the
    interpreter is the isolated environment's own and the answer is None."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = "from importlib.metadata import version; print(version('torch'))"
    try:
        result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    version = result.stdout.strip()
    return version if result.returncode == 0 and version else None


def torch_requirements() -> list[str]:
    """What the wheel's build needs on top of setuptools to compile the extension."""
    if os.environ.get("LIGHTMOTION_NO_EXT", "0") == "1":
        return []
    if importlib.util.find_spec("torch") is not None:  # not isolated, or torch already provided
        return []
    spec = os.environ.get("LIGHTMOTION_BUILD_TORCH", "").strip()
    if not spec:
        version = _invoking_torch_version()
        if version is None:
            raise RuntimeError(
                "lightmotion_fast: torch is needed to build the C++ extension lightmotion_fast._C, and it is "
                "neither importable in this isolated build environment nor installed in the interpreter "
                f"running the build. {_ADVICE}")
        spec = f"torch=={version}"
    print(f"lightmotion_fast: building the C++ extension against {spec} (the torch of the invoking "
          "environment; set LIGHTMOTION_BUILD_TORCH to choose another)", file=sys.stderr)
    return [spec, "ninja"]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + torch_requirements()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + torch_requirements()
