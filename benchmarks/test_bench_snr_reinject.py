"""Microbenchmarks of the fused correction step at small sizes: `pytest benchmarks/ --benchmark-enable`."""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.ops.snr_reinject import ddim_coefficients
from lightmotion_fast.reference.snr_reinject import snr_reinject_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COEFFS = ddim_coefficients(0.35, 0.5, 1.0)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_snr_reinject_small(benchmark, impl):
    x, eps = torch.randn(2, 4, 8, 16, 16, device=DEVICE), torch.randn(2, 4, 8, 16, 16, device=DEVICE)
    with lm.backend(impl):
        out = benchmark(lm.snr_reinject, x, eps, COEFFS, 0, 0)
        noise = lm.snr_noise(x, 0, 0)
    torch.testing.assert_close(out, snr_reinject_reference(x, eps, noise, COEFFS), atol=1e-5, rtol=1e-5)


def test_scheduler_step_randn_add_small(benchmark):
    """The unfused recipe: plain step, then a separate randn and add."""
    x, eps = torch.randn(2, 4, 8, 16, 16, device=DEVICE), torch.randn(2, 4, 8, 16, 16, device=DEVICE)

    def unfused():
        return COEFFS.cx0 * x + COEFFS.cm0 * eps + COEFFS.cn * torch.randn_like(x)

    assert benchmark(unfused).shape == x.shape


def test_snr_noise_small(benchmark):
    """Four normals per Philox call: the noise alone, materialised."""
    x = torch.empty(2, 4, 8, 16, 16, device=DEVICE)
    with lm.backend("triton"):
        noise = benchmark(lm.snr_noise, x, 0, 0)
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
