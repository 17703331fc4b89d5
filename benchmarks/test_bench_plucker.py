"""Microbenchmarks of plucker_embedding at small sizes: `pytest benchmarks/ --benchmark-enable`.
On a CPU the "triton" rows run through the interpreter (correctness smoke runs, not speed)."""
import pytest
import torch

import lightmotion_fast as lm
from benchmarks.scenarios.plucker import cameractrl_ray_condition, cameras
from lightmotion_fast.reference.plucker import plucker_embedding_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("impl", ["triton", "reference", "cameractrl"])
def test_plucker_small(benchmark, impl):
    k, c2w = cameras(1, 4, 16, 24, DEVICE)
    if impl == "cameractrl":
        out = benchmark(cameractrl_ray_condition, k, c2w, 16, 24, torch.float32)
    else:
        with lm.backend(impl):
            out = benchmark(lm.plucker_embedding, k, c2w, 16, 24, validate=False)
    want = plucker_embedding_reference(k.double(), c2w.double(), 16, 24)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
