"""Microbenchmarks of latent_permute at small sizes: `pytest benchmarks/ --benchmark-enable`."""
import pytest
import torch

import lightmotion_fast as lm

CAMERA = lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["triton", "reference"] + (["cpp"] if DEVICE.type == "cpu" and lm.extension_available() else [])


@pytest.mark.parametrize("impl", IMPLS)
def test_latent_permute_small(benchmark, impl):
    z = torch.randn(2, 4, 8, 16, 16, device=DEVICE)
    with lm.backend(impl):
        out, exposed = benchmark(lm.latent_permute, z, CAMERA)
    ref, ref_exposed = lm.latent_permute(z, CAMERA) if impl == "reference" else (None, None)
    if ref is None:
        with lm.backend("reference"):
            ref, ref_exposed = lm.latent_permute(z, CAMERA)
    assert torch.equal(out, ref) and torch.equal(exposed, ref_exposed)
