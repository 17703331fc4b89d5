"""LightMotion's added time per video: the patched pipeline (edit + stochastic correction, mask
capture before the edit) against the plain pipeline, sampling only (output_type="latent").
CPU: the small AnimateDiff-architecture pipeline. GPU: an AnimateDiff-sized UNetMotionModel
(SD1.5 widths, random weights) at 16 frames, 512x512 (latent 64x64)."""
import torch

import lightmotion_fast as lm
from lightmotion_fast.bench.scenario import Case

CAMERA = lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)


def animatediff_sized_pipeline(device, dtype):
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # the SD1.5 defaults
    adapter = MotionAdapter()                                                  # the v1-5-2 defaults
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=adapter,
                               scheduler=scheduler).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _case(label, build, frames, size, steps, dim, device, dtype, cpu):
    def setup():
        pipe = build()
        g = torch.Generator("cpu").manual_seed(1)
        embeds = torch.randn(1, 77, dim, generator=g).to(device, dtype)
        negative = torch.randn(1, 77, dim, generator=g).to(device, dtype)

        def call():
            return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_frames=frames, height=size,
                        width=size, num_inference_steps=steps, output_type="latent",
                        generator=torch.Generator("cpu").manual_seed(0)).frames

        def patched():
            with lm.patched(pipe, camera=CAMERA, correction="stochastic"):
                return call()

        return {"plain_pipeline": call, "lightmotion": patched}

    return Case(op="lightmotion_sampler", mode="sample", shape=f"{label} {frames}f {size}px {steps} steps",
                setup=setup, dtype=str(dtype).replace("torch.", ""), quick=False, cpu=cpu,
                note="added time per video = lightmotion - plain_pipeline (the same number of UNet steps)")


def cases(device, quick):
    if device.type == "cuda":
        dtype = torch.float16
        yield _case("AnimateDiff-sized", lambda: animatediff_sized_pipeline(device, dtype), 16, 512, 25, 768,
                    device, dtype, cpu=False)
    else:
        from lightmotion_fast.demo_sampler import small_animatediff_pipeline

        yield _case("small", lambda: small_animatediff_pipeline(8).to(device), 8, 64, 4, 64, device,
                    torch.float32, cpu=True)
