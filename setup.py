"""Build script: the Python package, kernels/ mapped to lightmotion_fast.kernels, and the C++ extension.

Environment:
  LIGHTMOTION_NO_EXT=1   skip the C++ extension (the package then uses the PyTorch reference on the CPU)
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    if os.environ.get("LIGHTMOTION_NO_EXT", "0") == "1":
        print("LIGHTMOTION_NO_EXT=1: skipping the C++ extension lightmotion_fast._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("torch is not importable at build time: skipping lightmotion_fast._C "
              "(install torch first, then `pip install --no-build-isolation -e .`)")
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    extra = {"cxx": ["-O3", "-std=c++17"]}
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        extra["nvcc"] = ["-O3"]
        ext = cpp_extension.CUDAExtension(
            "lightmotion_fast._C", sources + cuda_sources, extra_compile_args=extra,
            define_macros=[("LIGHTMOTION_WITH_CUDA", "1")],
        )
    else:
        ext = cpp_extension.CppExtension("lightmotion_fast._C", sources, extra_compile_args=extra)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["lightmotion_fast", "lightmotion_fast.*"]) + ["lightmotion_fast.kernels"],
    # kernels/ is installed inside the package: a top-level `kernels` module would shadow
    # Hugging Face's `kernels` package, which diffusers imports.
    package_dir={"lightmotion_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
