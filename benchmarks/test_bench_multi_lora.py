"""Microbenchmarks of multi_lora_linear at small sizes: `pytest benchmarks/ --benchmark-enable`.
On a CPU the "triton" rows run through the interpreter (correctness smoke runs, not speed)."""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.reference.multi_lora import multi_lora_linear_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(m=64, d=48, ranks=(8, 16, 8), grad=False):
    g = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_(grad)

    return (t(m, d), t(d, d, scale=d ** -0.5), t(d), [t(r, d, scale=d ** -0.5) for r in ranks],
            [t(d, r, scale=r ** -0.5) for r in ranks], [1.0, 0.5, 0.8])


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("norm", ["none", "output"])
def test_multi_lora_forward_small(benchmark, impl, norm):
    x, w, b, a, bb, s = _inputs()
    with lm.backend(impl):
        y = benchmark(lm.multi_lora_linear, x, w, b, a, bb, s, norm=norm)
    ref = multi_lora_linear_reference(x.double(), w.double(), b.double(), [t.double() for t in a],
                                      [t.double() for t in bb], s, norm=norm)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_multi_lora_forward_backward_small(benchmark, impl):
    x, w, b, a, bb, s = _inputs(grad=True)

    def step():
        y = lm.multi_lora_linear(x, w, b, a, bb, s, norm="output")
        y.square().mean().backward()
        return y

    with lm.backend(impl):
        benchmark(step)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in [x, *a, *bb])
