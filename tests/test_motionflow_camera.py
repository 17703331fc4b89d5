"""MotionFlow camera conditioning on a tiny AnimateDiff UNetMotionModel: processors on spatial layers
only, per-level camera tokens routed to their level, and the Plücker camera encoder training."""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.integrations.diffusers.camera_encoder import CameraEncoder
from lightmotion_fast.integrations.diffusers.ip_adapter import (
    CameraTokenAttnProcessor,
    ReferenceAttnProcessor,
    install_camera_token_processors,
    install_reference_processors,
)
from tiny_models import tiny_unet_motion, unet_motion_inputs

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention  # noqa: E402

FRAMES = 4


def _kinds(unet):
    """{attention module name: "temporal" | "spatial"} of a UNetMotionModel."""
    return {n: "temporal" if "motion_modules" in n else "spatial"
            for n, m in unet.named_modules() if isinstance(m, Attention)}


def test_installers_put_processors_on_spatial_attention_only():
    unet = tiny_unet_motion()
    kinds = _kinds(unet)
    cams = install_camera_token_processors(unet, camera_dim=6)
    refs = install_reference_processors(unet)
    # The tiny model: 4 spatial transformers (down 0, mid, up 1 ×2) and 7 motion modules with two
    # self-attentions each; before the fix 7 of 11 camera processors landed on motion-module attn2.
    assert sum(n.endswith("attn2") for n in kinds) == 11
    count = lambda procs, kind: sum(kinds[n] == kind for n in procs)  # noqa: E731
    assert (count(cams, "spatial"), count(cams, "temporal")) == (4, 0)
    assert (count(refs, "spatial"), count(refs, "temporal")) == (4, 0)
    assert all(n.endswith("attn2") for n in cams) and all(n.endswith("attn1") for n in refs)
    by_name = dict(unet.named_modules())
    for name in kinds:
        proc = by_name[name].processor
        want = CameraTokenAttnProcessor if name in cams else ReferenceAttnProcessor if name in refs else None
        assert (want is None and not isinstance(proc, (CameraTokenAttnProcessor, ReferenceAttnProcessor))) or \
            isinstance(proc, want)
    levels = {n: p.level for n, p in cams.items()}
    assert levels == {"down_blocks.0.attentions.0.transformer_blocks.0.attn2": 0,
                      "mid_block.attentions.0.transformer_blocks.0.attn2": 1,
                      "up_blocks.1.attentions.0.transformer_blocks.0.attn2": 0,
                      "up_blocks.1.attentions.1.transformer_blocks.0.attn2": 0}
    with pytest.raises(ValueError, match="camera_dim has 3 entries"):
        install_camera_token_processors(tiny_unet_motion(), camera_dim=(6, 10, 12))


def _record_token_inputs(procs):
    """Forward hooks on each processor's to_k_cam: {layer name: [the camera tokens it projected]}."""
    seen = {name: [] for name in procs}
    for name, proc in procs.items():
        proc.to_k_cam.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(args[0]))
    return seen


def _record_outputs(unet, names):
    outs = {}
    by_name = dict(unet.named_modules())
    for name in names:
        by_name[name].register_forward_hook(lambda mod, args, out, name=name: outs.__setitem__(name, out))
    return outs


def test_per_level_camera_tokens_reach_their_levels_only():
    unet = tiny_unet_motion()
    procs = install_camera_token_processors(unet, camera_dim=(6, 10), scale=0.8, zero_init=False)
    assert {p.camera_dim for p in procs.values() if p.level == 1} == {10}
    inputs = unet_motion_inputs(FRAMES)
    g = torch.Generator().manual_seed(5)
    tok0 = torch.randn(FRAMES, 3, 6, generator=g)    # per frame (batch·frames = 4)
    tok1 = torch.randn(1, 5, 10, generator=g)        # one set broadcast over frames
    seen = _record_token_inputs(procs)
    outs = _record_outputs(unet, procs)
    with torch.no_grad(), lm.backend("reference"):
        plain = unet(**inputs).sample
        plain_outs = dict(outs)
        unet(**inputs, cross_attention_kwargs={"camera_tokens": [tok0, tok1]})
        for name, proc in procs.items():
            assert len(seen[name]) == 1
            want = tok0 if proc.level == 0 else tok1.expand(FRAMES, -1, -1)
            torch.testing.assert_close(seen[name][0], want, rtol=0, atol=0)
        # Level-1 tokens only (dict by level): level-0 layers get none. The first spatial layer
        # (down_blocks.0, before any level-1 layer) is unchanged; the mid block's output changes.
        for s in seen.values():
            s.clear()
        out = unet(**inputs, cross_attention_kwargs={"camera_tokens": {1: tok1}}).sample
        assert {n for n, s in seen.items() if s} == {n for n, p in procs.items() if p.level == 1}
        first = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
        mid = "mid_block.attentions.0.transformer_blocks.0.attn2"
        torch.testing.assert_close(outs[first], plain_outs[first], rtol=0, atol=0)
        assert (outs[mid] - plain_outs[mid]).abs().max() > 1e-4
        assert (out - plain).abs().max() > 1e-5
        # A layer-name entry wins over its level's entry.
        for s in seen.values():
            s.clear()
        by_name = torch.randn(FRAMES, 2, 6, generator=g)
        unet(**inputs, cross_attention_kwargs={"camera_tokens": {0: tok0, 1: tok1, first: by_name}})
        assert seen[first][0] is by_name or torch.equal(seen[first][0], by_name)
        with pytest.raises(ValueError, match="level 1"):  # a level-0 width given to level 1
            unet(**inputs, cross_attention_kwargs={"camera_tokens": [tok0, tok0]})
        with pytest.raises(ValueError, match="has 1 levels"):
            unet(**inputs, cross_attention_kwargs={"camera_tokens": [tok0]})


def _plucker(frames=FRAMES, size=16):
    """Plücker maps [1 f 6 size size] of a camera sliding right and forward."""
    c2w = torch.eye(4).repeat(1, frames, 1, 1)
    c2w[0, :, 0, 3] = torch.linspace(0, 0.3, frames)
    c2w[0, :, 2, 3] = torch.linspace(0, 0.2, frames)
    k = torch.tensor([20.0, 20.0, size / 2, size / 2]).expand(1, frames, 4)
    return lm.plucker_embedding(k, c2w, size, size, relative=True)


@pytest.mark.parametrize("attention", ["temporal", "spatial", None])
def test_camera_encoder_shapes_and_zero_tokens(attention):
    enc = CameraEncoder(channels=(8, 16), token_dims=(6, 10), downscale=2, groups=4, heads=2, attention=attention)
    rays = _plucker()
    tokens = enc(rays)
    assert [tuple(t.shape) for t in tokens] == [(FRAMES, 64, 6), (FRAMES, 16, 10)]  # 8×8 and 4×4 maps
    assert all(torch.equal(t, torch.zeros_like(t)) for t in tokens)  # zero-initialised output projections
    pooled = CameraEncoder(channels=(8, 16), downscale=2, groups=4, heads=2, token_grid=2)(rays)
    assert [tuple(t.shape) for t in pooled] == [(FRAMES, 4, 8), (FRAMES, 4, 16)]
    with pytest.raises(ValueError, match="plucker must have shape"):
        enc(rays[:, :, :3])
    with pytest.raises(ValueError, match="multiples of downscale"):
        enc(rays[..., :15, :15])


def test_camera_encoder_training_step_on_tiny_animatediff():
    unet = tiny_unet_motion()
    inputs = unet_motion_inputs(FRAMES)
    with torch.no_grad(), lm.backend("reference"):
        unpatched = unet(**inputs).sample
    unet.requires_grad_(False)  # the base model is frozen; the encoder and camera projections train
    procs = install_camera_token_processors(unet, camera_dim=(6, 10), zero_init=False)
    enc = CameraEncoder(channels=(8, 16), token_dims=(6, 10), downscale=2, groups=4, heads=2)
    trainable = list(enc.parameters()) + [p for proc in procs.values() for p in proc.parameters()]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    rays = _plucker()
    target = torch.randn(unpatched.shape, generator=torch.Generator().manual_seed(8))
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    losses = []
    with lm.backend("reference"):
        for step in range(2):
            out = unet(**inputs, cross_attention_kwargs={"camera_tokens": enc(rays)}).sample
            if step == 0:  # zero-init join: the patched model equals the unpatched one
                torch.testing.assert_close(out, unpatched, rtol=0, atol=1e-6)
            loss = torch.nn.functional.mse_loss(out, target)
            opt.zero_grad()
            loss.backward()
            if step == 0:  # only the output projections get a gradient while they are zero
                assert all(enc.to_tokens[i].weight.grad.abs().max() > 0 for i in range(2))
            opt.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    assert {"to_tokens.0.weight", "to_tokens.1.weight", "stem.1.weight", "blocks.1.0.body.2.weight"} <= changed
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)


def test_installer_rejects_a_model_without_unet_levels():
    with pytest.raises(TypeError, match="down_blocks"):
        install_camera_token_processors(torch.nn.Linear(2, 2), camera_dim=4)


def test_per_level_tokens_through_the_kernel_equal_the_reference():
    unet = tiny_unet_motion()
    install_camera_token_processors(unet, camera_dim=(6, 10), scale=0.7, zero_init=False)
    g = torch.Generator().manual_seed(6)
    tokens = [torch.randn(FRAMES, 3, 6, generator=g), torch.randn(FRAMES, 5, 10, generator=g)]
    inputs = unet_motion_inputs(FRAMES)
    with torch.no_grad():
        with lm.backend("reference"):
            want = unet(**inputs, cross_attention_kwargs={"camera_tokens": tokens}).sample
        with lm.backend("triton"):
            got = unet(**inputs, cross_attention_kwargs={"camera_tokens": tokens}).sample
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
