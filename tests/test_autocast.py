"""Under torch.autocast the library's ops compute as called (their floating inputs keep their dtypes, no
product inside is autocast), on every backend: the PyTorch implementations had computed fp32 calls in
bf16 (0.5-1 % off), returned dtypes their fake implementations do not declare, and failed on mixed dtypes
(multi-LoRA backward, Plücker, reference attention), while the Triton kernels ignored autocast. And the
LightMotion subject capture keeps fp32 maps under autocast."""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.ops import OP_SAMPLES

import tiny_models as tiny
from lm_testing import flatten_tensors


_tensors = flatten_tensors


@pytest.mark.parametrize("name", [n for n in OP_SAMPLES if not n.endswith("_backward")])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_ops_compute_as_called_under_autocast(name, impl, device):
    op, samples = OP_SAMPLES[name]
    for args in samples(device)[:2]:
        with lm.backend(impl), torch.no_grad():
            want = _tensors(op(*args))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                got = _tensors(op(*args))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("norm", ["none", "weight", "output"])
def test_multi_lora_training_under_autocast(norm, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g).to(device).requires_grad_()
    w = torch.randn(12, 16, generator=g).to(device)
    a = [torch.randn(4, 16, generator=g).to(device).requires_grad_() for _ in range(2)]
    b = [torch.randn(12, 4, generator=g).to(device).requires_grad_() for _ in range(2)]
    grads = []
    for autocast in (False, True):
        with lm.backend("reference"), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = lm.multi_lora_linear(x, w, None, a, b, [1.0, 0.5], norm=norm)
            grads.append(torch.autograd.grad(y.square().sum(), [x, *a, *b]))
    for g0, g1 in zip(*grads):
        assert g1.dtype == torch.float32
        torch.testing.assert_close(g1, g0, rtol=0, atol=0)


def test_lightmotion_capture_keeps_fp32_maps_under_autocast():
    from lightmotion_fast.integrations.diffusers import lightmotion as lmi

    pipe = tiny.tiny_animatediff_pipeline()
    maps = {}
    real = lmi.capture_to_mask

    def spy(captured, *args, **kwargs):
        maps.update({k: v[0].dtype for k, v in captured.items()})
        return real(captured, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, lm.backend("reference"):
        mp.setattr(lmi, "capture_to_mask", spy)
        lm.patch(pipe, camera=lm.CameraMotion(pan=(0.25, 0)), edit_step=2, correction=None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pipe(**tiny.animatediff_inputs(frames=3, steps=3))
        lm.unpatch(pipe)
    assert maps and set(maps.values()) == {torch.float32}


def test_differentiable_plucker_under_autocast():
    k = torch.tensor([30.0, 30.0, 4.0, 4.0]).expand(1, 2, 4).clone().requires_grad_()
    c2w = torch.eye(4).repeat(1, 2, 1, 1).requires_grad_()
    want = lm.plucker_embedding(k, c2w, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lm.plucker_embedding(k, c2w, 5, 6)
    assert got.requires_grad and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
