"""Microbenchmarks of reference_attention at small sizes: `pytest benchmarks/ --benchmark-enable`.
On a CPU the "triton" rows run through the interpreter (correctness smoke runs, not speed)."""
import pytest
import torch
import torch.nn.functional as F

import lightmotion_fast as lm
from lightmotion_fast.reference.reference_attention import reference_attention_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("impl", ["triton", "reference", "sdpa_concat"])
def test_reference_attention_small(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    q, k, v, kr, vr = (torch.randn(2, 2, m, 40, generator=g).to(DEVICE) for m in (48, 48, 48, 32, 32))
    if impl == "sdpa_concat":
        out = benchmark(lambda: F.scaled_dot_product_attention(q, torch.cat([k, kr], 2), torch.cat([v, vr], 2)))
    else:
        with lm.backend(impl):
            out = benchmark(lm.reference_attention, q, k, v, kr, vr)
    want = reference_attention_reference(q.double(), k.double(), v.double(), kr.double(), vr.double())
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
