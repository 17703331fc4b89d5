"""Microbenchmarks of the LightMotion edit at small sizes: `pytest benchmarks/ --benchmark-enable`."""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.ops.latent_resample import build_fill_map_affine
from lightmotion_fast.reference.latent_resample import latent_resample_reference

CAMERA = lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BUILDERS = ["reference"] + (["cpp"] if lm.extension_available() else [])


@pytest.mark.parametrize("impl", BUILDERS)
def test_build_fill_map_small(benchmark, impl):
    inv = CAMERA.inverse_affines(8, 16, 16)
    bg = torch.rand(8, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.3
    with lm.backend(impl):
        fill = benchmark(build_fill_map_affine, inv, bg, 16, 16, 3, "strip")
    with lm.backend("reference"):
        assert torch.equal(fill, build_fill_map_affine(inv, bg, 16, 16, 3, "strip"))


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_latent_resample_small(benchmark, impl):
    z = torch.randn(2, 4, 8, 16, 16, device=DEVICE)
    fill = lm.build_fill_map(CAMERA, 8, 16, 16, seed=1, device=DEVICE)
    with lm.backend(impl):
        out = benchmark(lm.latent_resample, z, fill)
    assert torch.equal(out, latent_resample_reference(z, fill))


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_latent_resample_renoise_small(benchmark, impl):
    """The whole `renoise` edit step in one pass, against resample then snr_reinject."""
    from lightmotion_fast.ops.snr_reinject import renoise_coefficients

    z = torch.randn(2, 4, 8, 16, 16, device=DEVICE)
    fill = lm.build_fill_map(CAMERA, 8, 16, 16, seed=1, device=DEVICE)
    coeffs = renoise_coefficients(0.6, 0.4)
    with lm.backend(impl):
        out = benchmark(lm.latent_resample, z, fill, renoise=coeffs, seed=2, offset=0)
        two_pass = lm.snr_reinject(lm.latent_resample(z, fill), None, coeffs, seed=2, offset=0)
    torch.testing.assert_close(out, two_pass, atol=1e-5, rtol=1e-5)
