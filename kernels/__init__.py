"""Triton kernels, one file per op family; installed as lightmotion_fast.kernels.

Modules here import only torch and triton. They are imported lazily by lightmotion_fast.ops, so that
TRITON_INTERPRET=1 can still be set after `import lightmotion_fast` and before the first kernel runs.
"""
