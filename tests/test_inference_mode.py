"""Everything runs under `torch.inference_mode()`, as many diffusers users call their pipelines: tensors
made there have no version counter, which the caches keyed on it (fill-map offsets, trajectory tables,
multi-LoRA weight packs) must not read. Each result equals the same call under `torch.no_grad()`, and a
cache never serves a stale result for a tensor changed in place inside inference mode."""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.ops.latent_resample import SOURCE_OFFSETS
from lightmotion_fast.ops.trajectory_attention import TrajectoryIndex

import tiny_models as tiny

CAM = lm.CameraMotion(pan=(0.25, 0.0))


def test_latent_ops_with_maps_made_in_inference_mode(device):
    z = torch.randn(1, 2, 3, 4, 8, device=device)
    with torch.no_grad():
        want_edit = lm.latent_edit(z, CAM, seed=3)
        want = lm.latent_resample(z, lm.build_fill_map(CAM, 3, 4, 8, seed=0).to(device))
    with torch.inference_mode():
        got_edit = lm.latent_edit(z, CAM, seed=3)
        fill = lm.build_fill_map(CAM, 3, 4, 8, seed=0).to(device)
        assert fill.is_inference()
        got = lm.latent_resample(z, fill)
    torch.testing.assert_close(got_edit, want_edit, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fill_map_changed_in_place_inside_inference_mode_is_not_served_stale(device):
    """An inference tensor cannot report an in-place change, so its decoding is not cached: the second
    call follows the changed map."""
    z = torch.randn(1, 2, 3, 4, 8, device=device)
    with torch.inference_mode():
        fill = lm.build_fill_map(CAM, 3, 4, 8, seed=0).to(device)
        before = lm.latent_resample(z, fill)
        fill.copy_(torch.roll(fill, 1, dims=-1))   # every pixel now names another source
        after = lm.latent_resample(z, fill)
    with torch.no_grad():
        want = lm.latent_resample(z, fill.clone())
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, want, rtol=0, atol=0)
    assert not SOURCE_OFFSETS._entries or all(ref() is not fill for ref, _ in SOURCE_OFFSETS._entries.values())


def test_trajectory_attention_with_tables_made_in_inference_mode(device):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 6, (3, 8), generator=g)
    valid = torch.rand(3, 8, generator=g) > 0.2
    q, k, v = (torch.randn(1, 6, 3, 1, 16, generator=g).to(device) for _ in range(3))
    with torch.no_grad():
        want = lm.trajectory_attention(q, k, v, TrajectoryIndex(idx, valid, 6).to(device))
    with torch.inference_mode():
        raw = lm.trajectory_attention(q, k, v, idx.to(device), valid.to(device))
        index = TrajectoryIndex(idx.to(device), valid.to(device), 6)
        assert index.idx.is_inference()
        built = lm.trajectory_attention(q, k, v, index)
    torch.testing.assert_close(raw, want, rtol=0, atol=0)
    torch.testing.assert_close(built, want, rtol=0, atol=0)


def test_multi_lora_weights_made_in_inference_mode_are_not_cached(device):
    """Weights created (e.g. loaded) under inference mode have no version counter: the op computes from
    them on every call, so an in-place update there is seen."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 16, generator=g).to(device)
    w = torch.randn(24, 16, generator=g).to(device)
    with torch.inference_mode():
        a = [torch.randn(4, 16, generator=g).to(device) for _ in range(2)]
        b = [torch.randn(24, 4, generator=g).to(device) for _ in range(2)]
        first = lm.multi_lora_linear(x, w, None, a, b, [1.0, 0.5], norm="weight")
        b[0].mul_(3.0)
        second = lm.multi_lora_linear(x, w, None, a, b, [1.0, 0.5], norm="weight")
    with torch.no_grad():
        want = lm.multi_lora_linear(x, w, None, [t.clone() for t in a], [t.clone() for t in b], [1.0, 0.5],
                                    norm="weight")
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-5)


def test_patched_animatediff_pipeline_under_inference_mode():
    pipe = tiny.tiny_animatediff_pipeline()
    lm.patch(pipe, camera=CAM, edit_step=1, denoise_until=2, renoise_to=1)
    with torch.no_grad():
        want = pipe(**tiny.animatediff_inputs(frames=3, steps=3)).frames
    with torch.inference_mode():
        got = pipe(**tiny.animatediff_inputs(frames=3, steps=3)).frames
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_trajectory_patched_unet_under_inference_mode():
    """The processors build their trajectory tables on the first call: here inside inference mode (the
    reference backend keeps the test short; the tables are the same on every backend)."""
    coords = torch.rand(4, 200, 2, generator=torch.Generator().manual_seed(0)) * 64
    inputs = tiny.svd_unet_inputs(frames=4)
    with lm.backend("reference"):
        unet = tiny.tiny_svd_unet()
        lm.patch(unet, trajectories=coords)
        with torch.no_grad():
            want = unet(**inputs).sample
        fresh = tiny.tiny_svd_unet()
        lm.patch(fresh, trajectories=coords)
        with torch.inference_mode():
            got = fresh(**inputs).sample
    torch.testing.assert_close(got, want, rtol=0, atol=0)
