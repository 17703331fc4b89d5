"""LightMotion sampler inside small real-class AnimateDiff and SVD pipelines (random weights, no
downloads): reference == fused, camera=None and zero camera change nothing, the edit is exactly
permute + resample, renoise rewinds, unpatch restores, the attention capture."""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.integrations.diffusers import lightmotion as lmi
from lightmotion_fast.ops import _common
from lightmotion_fast.reference.latent_resample import latent_resample_reference
from lm_testing import DEVICE
from tiny_models import animatediff_inputs, tiny_animatediff_pipeline, tiny_svd_unet

CAM = lm.CameraMotion(pan=(0.25, -0.1), zoom=0.1)
STEPS = 4


def tiny_svd_pipeline():
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(5)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                       latent_channels=4, layers_per_block=1).eval()
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        intermediate_size=16, patch_size=8)).eval()
    scheduler = EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True, sigma_min=0.002,
                                       sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous",
                                       interpolation_type="linear", steps_offset=1, beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=tiny_svd_unet(), scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor(crop_size=16, size={"shortest_edge": 16}))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(DEVICE)


def svd_inputs(seed: int = 0, steps: int = STEPS):
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return dict(image=image, height=16, width=16, num_frames=4, num_inference_steps=steps, decode_chunk_size=4,
                output_type="pt", motion_bucket_id=10, fps=6, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def animatediff():
    pipe = tiny_animatediff_pipeline().to(DEVICE)
    return pipe, pipe(**animatediff_inputs(steps=STEPS)).frames


@pytest.fixture(scope="module")
def svd():
    pipe = tiny_svd_pipeline()
    return pipe, pipe(**svd_inputs()).frames


def _count_launches(monkeypatch):
    calls = {"resample": 0, "reinject": 0}
    for name, fn in (("latent_resample", "latent_resample_launch"), ("snr_reinject", "snr_reinject_launch")):
        module = _common.kernel_module(name)
        real = getattr(module, fn)

        def spy(*args, _real=real, _key=name.split("_")[-1], **kwargs):
            calls[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, fn, spy)
    return calls


def test_camera_none_changes_nothing(animatediff):
    pipe, base = animatediff
    original = pipe.scheduler
    with pytest.warns(UserWarning, match="installed nothing"), lm.patched(pipe, camera=None):
        assert pipe.scheduler is original and not lm.is_patched(pipe)
        assert torch.equal(pipe(**animatediff_inputs(steps=STEPS)).frames, base)


def test_zero_camera_without_correction_is_exact_and_capture_changes_nothing(animatediff):
    pipe, base = animatediff
    with lm.patched(pipe, camera=lm.CameraMotion(), edit_step=2, correction=None):
        out = pipe(**animatediff_inputs(steps=STEPS)).frames
        record = lmi.sampler_state(pipe).record
    # the capturing processors ran during steps 0-1 and produced a mask, yet the video is bit-identical
    assert record["background_source"] == "cross-attention"
    assert 0 < record["background"].float().mean() < 1
    assert torch.equal(out, base)


@pytest.mark.parametrize("correction,region", [("stochastic", "exposed"), ("renoise_immediate", "all")])
def test_reference_and_fused_give_the_same_video_animatediff(animatediff, correction, region, monkeypatch):
    pipe, base = animatediff
    with lm.patched(pipe, camera=CAM, edit_step=2, correction=correction, correction_steps=1, correction_region=region):
        with lm.backend("reference"):
            ref = pipe(**animatediff_inputs(steps=STEPS)).frames
        calls = _count_launches(monkeypatch)
        with lm.backend("triton"):
            fused = pipe(**animatediff_inputs(steps=STEPS)).frames
        state = lmi.sampler_state(pipe)
    # the fused path really ran: one edit launch, plus one snr_reinject launch for the stochastic step
    # (renoise_immediate's jump runs inside the edit's latent_resample launch)
    assert calls["resample"] == 1 and calls["reinject"] == (1 if correction == "stochastic" else 0)
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fused, base, atol=1e-3)
    if correction == "renoise_immediate":
        assert state.record["rewind_to"] == 1


def test_edit_is_permute_plus_resample(animatediff):
    pipe, _ = animatediff
    edit_step = 2
    seen = {}

    def grab(key):
        def callback(p, i, t, kwargs):
            seen.setdefault(key, {})[i] = kwargs["latents"].clone()
            return kwargs
        return callback

    pipe(**animatediff_inputs(steps=STEPS), callback_on_step_end=grab("plain"))
    with lm.patched(pipe, camera=CAM, edit_step=edit_step, correction="stochastic"):
        pipe(**animatediff_inputs(steps=STEPS), callback_on_step_end=grab("patched"))
        record = lmi.sampler_state(pipe).record
    before = seen["plain"][edit_step - 1]          # the unpatched latent after step edit_step-1
    after = seen["patched"][edit_step - 1]         # the patched latent right after the edit
    assert torch.equal(record["pre_edit"], before)
    assert torch.equal(after, latent_resample_reference(before, record["fill_map"]))
    permuted, exposed = lm.latent_permute(before, CAM)
    assert exposed.any() and torch.equal(after[:, :, ~exposed], permuted[:, :, ~exposed])
    for i in range(edit_step - 1):
        assert torch.equal(seen["plain"][i], seen["patched"][i])  # nothing changes before the edit


def test_user_mask_overrides_capture(animatediff):
    pipe, _ = animatediff
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="mask"):
        with lm.patched(pipe, camera=CAM, mask=torch.ones(4, 2, 2, dtype=torch.bool), correction=None):
            pipe(**animatediff_inputs(steps=STEPS))   # the latent is 16x16: the mask must match it
    background = torch.ones(4, 16, 16, dtype=torch.bool)
    background[:, :, :8] = False
    with lm.patched(pipe, camera=CAM, mask=background, correction=None, edit_step=1):
        # no capturing processors when the user gives the mask
        assert all(a is b for a, b in zip(pipe.unet.attn_processors.values(), processors.values()))
        pipe(**animatediff_inputs(steps=STEPS))
        record = lmi.sampler_state(pipe).record
    assert record["background_source"] == "user" and torch.equal(record["background"], background)


def test_unpatch_restores_scheduler_processors_and_config(animatediff):
    pipe, _ = animatediff
    scheduler, processors = pipe.scheduler, dict(pipe.unet.attn_processors)
    config_entry = pipe.config.scheduler
    lm.patch(pipe, camera=CAM)
    assert pipe.scheduler is scheduler and tuple(pipe.config.scheduler) == tuple(config_entry)
    assert isinstance(pipe.scheduler.__dict__["step"].__self__, lmi.LightMotionSampler)
    assert any(isinstance(p, lmi._CrossAttentionCapture) for p in pipe.unet.attn_processors.values())
    lm.unpatch(pipe)
    assert pipe.scheduler is scheduler and tuple(pipe.config.scheduler) == tuple(config_entry)
    assert not {"step", "set_timesteps", "scale_model_input"} & set(vars(scheduler))
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())


def test_svd_reference_fused_and_zero_camera(svd, monkeypatch):
    pipe, base = svd
    with lm.patched(pipe, camera=lm.CameraMotion(), edit_step=2, correction=None):
        assert torch.equal(pipe(**svd_inputs()).frames, base)
        assert lmi.sampler_state(pipe).record["background_source"] == "all background"
    with lm.patched(pipe, camera=CAM, edit_step=1, correction="stochastic", correction_steps=2):
        with lm.backend("reference"):
            ref = pipe(**svd_inputs()).frames
        calls = _count_launches(monkeypatch)
        with lm.backend("triton"):
            fused = pipe(**svd_inputs()).frames
    assert calls["resample"] == 1 and calls["reinject"] == 2
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fused, base, atol=1e-3)


def test_svd_renoise_rewinds_the_sigma_schedule(svd):
    pipe, _ = svd
    sigmas_seen = []
    unet_forward = pipe.unet.forward

    with lm.patched(pipe, camera=CAM, edit_step=2, correction="renoise_immediate", correction_steps=1):
        real_scale = pipe.scheduler.scale_model_input

        def scale(sample, t):
            sigmas_seen.append(float(pipe.scheduler.sigmas[pipe.scheduler.step_index or 0]))
            return real_scale(sample, t)

        pipe.scheduler.scale_model_input = scale
        try:
            out = pipe(**svd_inputs()).frames
        finally:
            del pipe.scheduler.scale_model_input
        timesteps = pipe.scheduler.timesteps
        sigmas = pipe.scheduler.sigmas
    assert pipe.unet.forward == unet_forward
    assert len(timesteps) == STEPS + 1 and torch.isfinite(out).all()
    # steps 0, 1, then back to level 1 again (the rewind), then 2, 3
    assert sigmas_seen == [float(sigmas[i]) for i in (0, 1, 1, 2, 3)]


def test_capture_to_mask_thresholds_per_frame():
    frames, h, w = 2, 4, 4
    probs = torch.zeros(2 * frames, h * w)       # [uncond, cond] rows, batch 1
    probs[frames:, 5] = 1.0                        # the subject at pixel (1, 1) in the cond half
    probs[:frames, 0] = 9.0                        # the uncond half must be ignored
    mask = lmi.capture_to_mask({h * w: [probs, 1]}, batch=1, frames=frames, height=h, width=w)
    assert mask.shape == (frames, h, w) and not mask[:, 1, 1].any() and mask[:, 0, 0].all()


def test_bad_options(animatediff):
    pipe, _ = animatediff
    with pytest.raises(ValueError, match="correction"):
        lm.patch(pipe, camera=CAM, correction="sometimes")
    with pytest.raises(TypeError, match="camera"):
        lm.patch(pipe, camera=(0.25, 0))
    with pytest.raises(ValueError, match="edit_step"):
        lm.patch(pipe, camera=CAM, edit_step=1.5)
    assert not lm.integrations.diffusers.is_patched(pipe)
    from diffusers import DDPMScheduler, PNDMScheduler

    original = pipe.scheduler
    pipe.scheduler = PNDMScheduler()
    try:
        with pytest.raises(ValueError, match="correction"):
            lm.patch(pipe, camera=CAM)
        with pytest.raises(ValueError, match="keeps the latent between steps"):   # would undo the edit
            lm.patch(pipe, camera=CAM, correction=None)
        pipe.scheduler = DDPMScheduler()
        with pytest.warns(UserWarning, match="does not know DDPMScheduler"), \
                lm.patched(pipe, camera=CAM, correction=None):
            assert isinstance(lmi.sampler_state(pipe), lmi.SamplerState)
    finally:
        pipe.scheduler = original
