"""Build script: the Python package, kernels/ and benchmarks/scenarios/ mapped into it, and the C++ extension.

The extension needs torch at build time. Where torch is missing the build fails at the extension
step with a message that says what to do; it never quietly produces a wheel without the extension.
(The in-tree backend, build_backend/lightmotion_build.py, adds the invoking environment's torch to
an isolated build environment; `pip install --no-build-isolation` uses the torch already installed.)

Environment:
  LIGHTMOTION_NO_EXT=1      build without the C++ extension (the package then uses the PyTorch
                            reference on the CPU); the only way to get a wheel without it
  LIGHTMOTION_DEBUG_EXT=1   keep debug info in the extension (default: none, and stripped on Linux)
"""
import glob
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext as _build_ext

NO_TORCH_MESSAGE = (
    "lightmotion_fast: torch is not importable, so the C++ extension lightmotion_fast._C cannot be built. "
    "Install torch first and build without isolation (`pip install --no-build-isolation .`), or set "
    "LIGHTMOTION_NO_EXT=1 to build a wheel without the extension (CPU ops then run the PyTorch reference)."
)


class _TorchMissing(_build_ext):
    """Stands in for torch's BuildExtension when torch is missing: fails the build, loudly, at the
    point where the extension would be compiled (an sdist or the metadata still build fine)."""

    def run(self):
        raise SystemExit(f"error: {NO_TORCH_MESSAGE}")


def _compile_flags():
    """Optimised, and without debug info unless asked: a debug build of the extension is ~25 MB,
    a stripped one ~0.3 MB. Python's own CFLAGS carry -g; a later -g0 overrides it."""
    if os.environ.get("LIGHTMOTION_DEBUG_EXT", "0") == "1":
        return {"cxx": ["-O3", "-std=c++17", "-g"], "nvcc": ["-O3", "-g"]}, []
    link = ["-s"] if sys.platform.startswith("linux") else []
    return {"cxx": ["-O3", "-std=c++17", "-g0"], "nvcc": ["-O3", "-Xcompiler", "-g0"]}, link


def extension_modules():
    if os.environ.get("LIGHTMOTION_NO_EXT", "0") == "1":
        print("LIGHTMOTION_NO_EXT=1: building without the C++ extension lightmotion_fast._C", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [Extension("lightmotion_fast._C", sources)], {"build_ext": _TorchMissing}

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    compile_flags, link_flags = _compile_flags()
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "lightmotion_fast._C", sources + cuda_sources, extra_compile_args=compile_flags,
            extra_link_args=link_flags, define_macros=[("LIGHTMOTION_WITH_CUDA", "1")],
        )
    else:
        ext = cpp_extension.CppExtension("lightmotion_fast._C", sources, extra_compile_args=compile_flags["cxx"],
                                         extra_link_args=link_flags)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extension_modules()

# Directories installed inside the package rather than at the top level: a top-level `kernels` would
# shadow Hugging Face's `kernels` package, which diffusers imports, and the benchmark scenarios must
# ship with the package so that `lightmotion-fast bench` runs from an installed wheel.
MAPPED = {"lightmotion_fast.kernels": "kernels", "lightmotion_fast.scenarios": os.path.join("benchmarks", "scenarios")}

setup(
    packages=find_packages(include=["lightmotion_fast", "lightmotion_fast.*"]) + list(MAPPED),
    package_dir=MAPPED,
    package_data={"lightmotion_fast": ["py.typed"]},  # PEP 561: the package ships its type hints
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
