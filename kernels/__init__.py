"""Triton kernels, one file per op family; installed as lightmotion_fast.kernels.

Modules here import only torch and triton. They are imported lazily by lightmotion_fast.ops, so that
TRITON_INTERPRET=1 can still be set after `import lightmotion_fast` and before the first kernel runs.

Imported as plain `kernels` (the repository root on sys.path: `python -m ...` or pytest run from the
root), this directory would shadow Hugging Face's `kernels` package, which transformers ≥ 5 depends on
and imports at start-up (`from kernels import CUDAProperties, ...`): the name is handed to that package
when it is installed.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _hand_over() -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            return  # no other `kernels` installed: nothing to shadow
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # `import kernels` returns what sys.modules holds after this runs
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _hand_over()
    del _hand_over
