"""LightMotion on the DiT video models (issue 13 item 5): CogVideoX (latents "b f c h w", joint text-video
attention in attn1) and Wan 2.x (latents "b c f h w", text cross-attention in attn2, the negative prompt as
a separate call), both with a 4x temporally compressing VAE. Tiny real-class pipelines with random weights
(tests/tiny_models.py): patch/unpatch bit-exact, the edit on the right layout, the camera read at the latent
frames' video times, the subject mask from the text attention, full patched calls (T2V and I2V)."""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.integrations.diffusers import lightmotion as lmi
from lightmotion_fast.ops.latent_resample import build_fill_map
from lightmotion_fast.reference.latent_resample import latent_resample_reference
from tiny_models import (cogvideox_pipeline_inputs, tiny_cogvideox_pipeline, tiny_wan_pipeline,
                         wan_pipeline_inputs)

CAM = lm.CameraMotion(pan=(0.3, -0.2), zoom=0.1)
FAMILIES = {
    "cogvideox": (tiny_cogvideox_pipeline, cogvideox_pipeline_inputs, "b f c h w"),
    "wan": (tiny_wan_pipeline, wan_pipeline_inputs, "b c f h w"),
}


@pytest.fixture(scope="module")
def pipes():
    return {name: build() for name, (build, _, _) in FAMILIES.items()}


def run(pipe, family, **overrides):
    with torch.no_grad():
        return pipe(**FAMILIES[family][1](**overrides)).frames


def processors(pipe):
    return dict(pipe.transformer.attn_processors)


def sampler(pipe):
    return lm.patch_state(pipe).data["lightmotion"]


def to_bcfhw(z, layout):
    return z.permute(0, 2, 1, 3, 4) if layout == "b f c h w" else z


# -- patch / unpatch ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_patch_unpatch_bit_exact_and_capture_changes_nothing(pipes, family):
    pipe = pipes[family]
    before, forward = processors(pipe), pipe.transformer.forward
    plain = run(pipe, family, steps=3)
    lm.patch(pipe, camera=lm.CameraMotion(), correction=None, edit_step=1)   # identity camera: only the capture acts
    captures = [p for p in processors(pipe).values() if isinstance(p, lmi._CrossAttentionCapture)]
    assert len(captures) == 2                                                     # one text-attention site per block
    assert torch.equal(run(pipe, family, steps=3), plain)
    assert lmi.sampler_state(pipe).record["background_source"] == "cross-attention"
    lm.unpatch(pipe)
    after = processors(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert "forward" not in vars(pipe.transformer) or pipe.transformer.forward == forward
    assert "encode_prompt" not in vars(pipe)
    assert torch.equal(run(pipe, family, steps=3), plain)


def test_capture_keeps_cogvideox_rope(pipes):
    """CogVideoX-5B style (RoPE through the attention's keyword image_rotary_emb): the capturing
    processor must receive and pass it on, or the output changes."""
    pipe = tiny_cogvideox_pipeline(image_to_video=True)
    call = dict(image_to_video=True, steps=2)
    plain = run(pipe, "cogvideox", **call)
    with lm.patched(pipe, camera=lm.CameraMotion(), correction=None, edit_step=1):
        assert torch.equal(run(pipe, "cogvideox", **call), plain)


# -- the edit on the latent layout, at the latent frames' video times -------------------------------------------

def test_latent_frame_spans_and_times():
    spans = lmi.latent_frame_spans(3, 4)
    assert [list(s) for s in spans] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    cam = lmi.LatentFrameCamera.of(lm.CameraMotion(pan=(0.5, 0.25), zoom=0.2, rotate=10), 4)
    frac = cam.fractions(3)
    want = torch.tensor([0.0, 2.5 / 8, 6.5 / 8], dtype=torch.float64)                  # mean video time / 8
    torch.testing.assert_close(frac, want[:, None].expand(3, 4), rtol=0, atol=1e-15)
    # pan, zoom scale and angle are linear in the fraction: each latent frame moves by its video frames' mean
    video = lm.CameraMotion(pan=(0.5, 0.25), zoom=0.2).affines(9, 8, 8)
    mean = torch.stack([video[s.start:s.stop].mean(0) for s in spans])
    torch.testing.assert_close(lmi.LatentFrameCamera.of(lm.CameraMotion(pan=(0.5, 0.25), zoom=0.2), 4).affines(3, 8, 8),
                               mean, rtol=0, atol=1e-12)


def test_latent_frame_camera_user_schedules():
    per_video = torch.rand(9, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cam = lmi.LatentFrameCamera.of(lm.CameraMotion(pan=(0.2, 0), schedule=per_video), 4)
    torch.testing.assert_close(cam.fractions(3), torch.stack([per_video[:1].mean(0), per_video[1:5].mean(0),
                                                              per_video[5:].mean(0)]))
    per_latent = per_video[:3]
    assert torch.equal(lmi.LatentFrameCamera.of(lm.CameraMotion(pan=(0.2, 0), schedule=per_latent), 4).fractions(3),
                       per_latent)
    with pytest.raises(ValueError, match="schedule has 5 rows.*3 frames is 9 video frames"):
        lmi.LatentFrameCamera.of(lm.CameraMotion(pan=(0.2, 0), schedule=per_video[:5]), 4).fractions(3)
    with pytest.raises(ValueError, match="frames_per_latent"):
        lmi.LatentFrameCamera(pan=(0.1, 0), frames_per_latent=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_on_the_family_layout_with_the_latent_frame_camera(pipes, family):
    pipe, layout = pipes[family], FAMILIES[family][2]
    with lm.patched(pipe, camera=CAM, correction=None, edit_step=1, motion_seed=5):
        camera = sampler(pipe).lm_config.camera
        assert isinstance(camera, lmi.LatentFrameCamera) and camera.frames_per_latent == pipe.vae_scale_factor_temporal
        run(pipe, family, steps=3)
        record = lmi.sampler_state(pipe).record
    pre, post = record["pre_edit"], record["post_edit"]
    frames, height, width = record["background"].shape
    assert (frames, height, width) == (3, 8, 8) and pre.shape == post.shape
    assert pre.shape[1 if layout == "b f c h w" else 2] == frames
    # the fill map is the latent-time camera's, not the camera read as if each latent frame were a video frame
    fill = build_fill_map(lmi.LatentFrameCamera.of(CAM, 4), frames, height, width, record["background"], seed=5)
    naive = build_fill_map(CAM, frames, height, width, record["background"], seed=5)
    assert torch.equal(record["fill_map"], fill) and not torch.equal(fill, naive)
    # the edit is the reference gather on the latent taken in "b c f h w"
    want = latent_resample_reference(to_bcfhw(pre, layout), fill)
    assert torch.equal(to_bcfhw(post, layout), want)
    assert torch.equal(to_bcfhw(post, layout)[:, :, 0], to_bcfhw(pre, layout)[:, :, 0])   # frame 0: identity


# -- the subject mask from the text attention -------------------------------------------------------------------

def _probe_attention(monkeypatch, family, n_text):
    """Record the video→text attention probabilities the model itself computes, from the query and key
    its own processor hands to the attention function: CogVideoX's joint attention (text first, rows of
    video queries against the text keys, renormalised), Wan's cross-attention (keys of length n_text)."""
    seen = []
    if family == "cogvideox":
        import torch.nn.functional as F

        real = F.scaled_dot_product_attention

        def sdpa(q, k, v, *args, **kwargs):
            if k.shape[-2] > n_text:
                seen.append(((q[:, :, n_text:] @ k[:, :, :n_text].transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1))
            return real(q, k, v, *args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    else:
        import diffusers.models.transformers.transformer_wan as wan

        real = wan.dispatch_attention_fn

        def dispatch(q, k, v, *args, **kwargs):                    # [B, S, heads, d]
            if k.shape[1] == n_text:
                qh, kh = q.transpose(1, 2), k.transpose(1, 2)
                seen.append(((qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1))
            return real(q, k, v, *args, **kwargs)

        monkeypatch.setattr(wan, "dispatch_attention_fn", dispatch)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_subject_mask_from_text_attention(pipes, family, monkeypatch):
    pipe = pipes[family]
    maps_at_edit = []
    to_mask = lmi.capture_to_mask
    monkeypatch.setattr(lmi, "capture_to_mask", lambda maps, *a, **k: (
        maps_at_edit.append({key: (acc.clone(), n) for key, (acc, n) in maps.items()}), to_mask(maps, *a, **k))[1])
    seen = _probe_attention(monkeypatch, family, n_text=16)
    with lm.patched(pipe, camera=CAM, correction=None, edit_step=1, subject="corgi"):
        run(pipe, family, steps=2)
        state = lmi.sampler_state(pipe)
    assert state.subject_positions == (1,)                     # "▁a ▁corgi ▁runs ...": T5 has no start token
    assert state.prompt_positions == tuple(range(6))
    assert state.record["background_source"] == "cross-attention"
    (maps,) = maps_at_edit
    (key,) = maps
    assert isinstance(key, lmi.TokenGrid) and key.patch == (1, 2, 2) and key.size(3, 8, 8) == (3, 4, 4)
    acc, count = maps[key]
    # step 0 only (the edit follows it); CogVideoX: one call with [uncond, cond] rows; Wan: the cond call only
    assert count == 2 and len(seen) >= 2
    layers = seen[:2]                       # step 0's first call, both layers (Wan: the cond call, run first)
    want = torch.stack([p[..., [1]].mean(-1).mean(1) for p in layers]).sum(0)        # (rows, tokens)
    torch.testing.assert_close(acc, want.float(), rtol=1e-5, atol=1e-6)
    assert acc.shape[0] == (2 if family == "cogvideox" else 1)
    expected = to_mask({key: [want.float(), 2]}, 1, 3, 8, 8, 0.5)
    assert torch.equal(state.record["background"], expected)
    assert expected.any() and not expected.all()


def test_wan_separate_negative_call_is_not_captured(pipes):
    """Without the conditional-call check both of Wan's calls would be summed: 4 maps a step, not 2."""
    pipe = pipes["wan"]
    counts = []
    to_mask = lmi.capture_to_mask
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lmi, "capture_to_mask", lambda maps, *a, **k: (
            counts.append([n for _, n in maps.values()]), to_mask(maps, *a, **k))[1])
        with lm.patched(pipe, camera=CAM, correction=None, edit_step=2):
            run(pipe, "wan", steps=3)
            assert lmi.sampler_state(pipe).conditional          # reset after each call
    assert counts == [[4]]                                      # 2 steps x 2 layers, cond calls only


# -- full calls -------------------------------------------------------------------------------------------------

def test_full_cogvideox_call_decodes_patched(pipes):
    pipe = pipes["cogvideox"]
    with lm.patched(pipe, camera=CAM):                          # the paper's default timeline (renoise)
        with torch.no_grad():
            video = pipe(**cogvideox_pipeline_inputs(steps=5, output_type="pt")).frames
        record = lmi.sampler_state(pipe).record
    assert video.shape == (1, 9, 3, 32, 32) and torch.isfinite(video).all()
    assert "post_edit" in record and "renoised" in record


@pytest.mark.parametrize("family", FAMILIES)
def test_image_to_video_runs_patched(family):
    build, inputs, layout = FAMILIES[family]
    pipe = build(image_to_video=True)
    with lm.patched(pipe, camera=CAM):
        with torch.no_grad():
            latents = pipe(**inputs(image_to_video=True, steps=5)).frames
        record = lmi.sampler_state(pipe).record
    assert torch.isfinite(latents).all() and "renoised" in record
    pre, post = to_bcfhw(record["pre_edit"], layout), to_bcfhw(record["post_edit"], layout)
    assert torch.equal(post[:, :, 0], pre[:, :, 0]) and not torch.equal(post, pre)
    assert record["background_source"] == "cross-attention"


def test_subject_needs_a_text_family():
    from test_lightmotion_sampler import tiny_svd_pipeline

    with pytest.raises(ValueError, match="subject=.*animatediff, cogvideox, wan"):
        lm.patch(tiny_svd_pipeline(), camera=CAM, subject="corgi")


def test_cogvideox_dpm_scheduler_is_a_clear_error_at_patch(pipes):
    """CogVideoXPipeline calls CogVideoXDPMScheduler.step with (output, old x̂0, t, t_back, sample):
    refused at patch time while the sampler's step does not take them (issue 13 item 4)."""
    from diffusers import CogVideoXDPMScheduler

    pipe = tiny_cogvideox_pipeline()
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="CogVideoXDPMScheduler.*old_pred_original_sample"):
        lm.patch(pipe, camera=CAM, correction=None)
    assert not lm.is_patched(pipe)


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_a_batch_of_different_prompts_needs_a_mask(pipes, family):
    """One subject mask per call is captured, located by prompt[0]'s tokens and averaged over the
    batch: with different prompts every video got a blend of the subjects (item 0 moved by 2.9-3.9 from
    its single-prompt run). A clear error instead; the same prompt twice runs."""
    pipe = pipes[family]
    prompts = ["a corgi runs on the beach", "a red car drives at night"]
    with lm.backend("reference"), lm.patched(pipe, camera=CAM, correction=None, edit_step=1):
        with pytest.raises(ValueError, match="one subject mask per call, but the 2 prompts differ"):
            run(pipe, family, prompt=prompts, negative_prompt=["", ""])
        run(pipe, family, prompt=prompts[:1] * 2, negative_prompt=["", ""])
