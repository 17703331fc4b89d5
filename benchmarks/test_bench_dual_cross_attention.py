"""Microbenchmarks of dual_cross_attention at small sizes: `pytest benchmarks/ --benchmark-enable`.
On a CPU the "triton" rows run through the interpreter (correctness smoke runs, not speed)."""
import pytest
import torch

import lightmotion_fast as lm
from benchmarks.scenarios.dual_cross_attention import ip_adapter_sdpa
from lightmotion_fast.reference.dual_cross_attention import dual_cross_attention_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(b=2, h=2, n=64, d=40, n_text=77, n_img=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, m, d, generator=g).to(DEVICE) for m in (n, n_text, n_text, n_img, n_img)]


@pytest.mark.parametrize("impl", ["triton", "reference", "ip_adapter_sdpa"])
def test_dual_cross_attention_small(benchmark, impl):
    q, kt, vt, ki, vi = _inputs()
    b, h, n, d = q.shape
    if impl == "ip_adapter_sdpa":
        out = benchmark(ip_adapter_sdpa, q, kt, vt, ki, vi, 0.6).view(b, n, h, d).transpose(1, 2)
    else:
        with lm.backend(impl):
            out = benchmark(lm.dual_cross_attention, q, [kt, ki], [vt, vi], [1.0, 0.6])
    want = dual_cross_attention_reference(q.double(), [kt.double(), ki.double()], [vt.double(), vi.double()], [1.0, 0.6])
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
