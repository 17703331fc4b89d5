"""pytest-benchmark microbenchmarks. Without CUDA the Triton kernels run through the interpreter
(set before triton is imported), so the Triton rows there are correctness smoke runs, not speed."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
