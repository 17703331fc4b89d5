"""The LightMotion sampler demo: a camera-controlled video from an AnimateDiff-architecture pipeline,
the reference sampler against the fused one.

Without a model it builds a small AnimateDiffPipeline of the real classes with random weights (no
download; the video is noise-like, the point is the agreement and the timing). With `model_path`
it loads a local diffusers checkpoint folder (AnimateDiffPipeline or StableVideoDiffusionPipeline).
Writes the background mask and the fill map as PNGs and the fused video as a GIF.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch

import lightmotion_fast as lm
from lightmotion_fast.reference.latent_resample import decode_fill_map

DEFAULT_CAMERA = lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)


def small_animatediff_pipeline(frames: int = 8):
    """AnimateDiffPipeline with a small UNetMotionModel, MotionAdapter and AutoencoderKL (random
    weights, seeded); no tokenizer or text encoder: call it with prompt_embeds."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, norm_num_groups=8, attention_head_dim=8,
    ).eval()
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=8,
                            motion_num_attention_heads=2, motion_max_seq_length=max(32, frames))
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=adapter,
                               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _interpreter_usable() -> bool:
    """Kernels that call Triton's own jit functions (tl.randn) run in the interpreter only when
    TRITON_INTERPRET=1 was set before triton was first imported."""
    if "triton" not in sys.modules:
        return True
    import triton.language as tl

    return type(tl.randn).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def _fused(device: torch.device):
    """The fused path: compiled Triton on CUDA; on a CPU the Triton interpreter (not a speed figure),
    or the CPU ops (C++ fill map, PyTorch gather) when triton was imported without the interpreter."""
    from lightmotion_fast.demo import env_var

    cpu_without_interpreter = device.type != "cuda" and not _interpreter_usable()
    interpret = "1" if device.type != "cuda" and not cpu_without_interpreter else None
    with env_var("TRITON_INTERPRET", interpret):
        with contextlib.nullcontext() if cpu_without_interpreter else lm.backend("triton"):
            yield


def _pipeline_call(pipe, device: torch.device, steps: int, frames: int, height: int, width: int):
    """Keyword arguments for one call of the pipeline, whatever its class."""
    name = type(pipe).__name__
    generator = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    if name == "StableVideoDiffusionPipeline":
        from lightmotion_fast.demo import test_image

        image = test_image(height, width)[None]
        return lambda: dict(image=image, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                            decode_chunk_size=min(frames, 8), output_type="pt", generator=generator())
    if getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None:
        return lambda: dict(prompt="a dog running on a beach, photo", num_frames=frames, height=height, width=width,
                            num_inference_steps=steps, output_type="pt", generator=generator())
    dim = pipe.unet.config.cross_attention_dim
    g = torch.Generator("cpu").manual_seed(1)
    embeds = torch.randn(1, 8, dim, generator=g).to(device)
    negative = torch.randn(1, 8, dim, generator=g).to(device)
    return lambda: dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_frames=frames, height=height,
                        width=width, num_inference_steps=steps, guidance_scale=7.5, output_type="pt",
                        generator=generator())


def _save_panels(images: list, titles: list[str], path: Path, suptitle: str, cmap=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(8, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i], cmap=cmap, interpolation="nearest", vmin=0, vmax=1)
            ax.set_title(titles[i], fontsize=7)
    fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_mask_and_fill_map(record: dict, out_dir: Path) -> dict[str, Path]:
    """background_mask.png (white: background) and fill_map.png (R: source x, G: source y,
    B: how many frames back the token comes from, for exposed pixels; kept pixels dimmed)."""
    background, fill, exposed = record["background"], record["fill_map"].cpu(), record["exposed"]
    frames, height, width = fill.shape
    src_f, src_y, src_x = decode_fill_map(fill, height, width)
    paths = {"mask": out_dir / "background_mask.png", "fill_map": out_dir / "fill_map.png"}
    _save_panels([background[f].float().numpy() for f in range(frames)],
                 [f"f={f} bg {100 * background[f].float().mean():.0f}%" for f in range(frames)], paths["mask"],
                 f"background mask at the edit ({record['background_source']}; white = background)", cmap="gray")
    age = (torch.arange(frames)[:, None, None] - src_f).float() / max(frames - 1, 1)
    rgb = torch.stack([src_x.float() / max(width - 1, 1), src_y.float() / max(height - 1, 1), age], dim=-1)
    rgb[~exposed] *= 0.35
    _save_panels([rgb[f].clamp(0, 1).numpy() for f in range(frames)],
                 [f"f={f} exposed {100 * exposed[f].float().mean():.0f}%" for f in range(frames)], paths["fill_map"],
                 "fill map (R: source x, G: source y, B: frames back; dim: kept pixels)")
    return paths


def run_sampler_demo(out_dir, model_path: str | os.PathLike | None = None, steps: int = 4,
                     device: str | torch.device | None = None, camera: lm.CameraMotion | None = None,
                     frames: int | None = None, height: int | None = None, width: int | None = None,
                     **options) -> dict:
    """Sample one camera-controlled video with the reference sampler and with the fused one, print
    both times and their agreement, write the mask / fill-map PNGs and the video GIF.

    model_path: a local diffusers checkpoint folder (AnimateDiffPipeline with its motion adapter
    saved in, or StableVideoDiffusionPipeline); None: the small random-weight AnimateDiff pipeline.
    options: further LightMotion patch options (edit_step, correction, eta, ...).
    Returns a dict with the times (ms), the max abs difference and the written paths.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and "triton" not in sys.modules:
        # The fused path runs through Triton's interpreter on a CPU, which must be on before triton is
        # first imported (diffusers imports it); the reference run forces its backend explicitly.
        os.environ["TRITON_INTERPRET"] = "1"
    camera = camera or DEFAULT_CAMERA
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_path is None:
        frames = frames or 8
        pipe = small_animatediff_pipeline(frames).to(device)
        height, width = height or 64, width or 64
        label = "small AnimateDiff-architecture pipeline (random weights)"
    else:
        from diffusers import DiffusionPipeline

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(str(model_path), torch_dtype=dtype, local_files_only=True).to(device)
        pipe.set_progress_bar_config(disable=True)
        svd = type(pipe).__name__ == "StableVideoDiffusionPipeline"
        frames = frames or (14 if svd else 16)
        height, width = height or (576 if svd else 512), width or (1024 if svd else 512)
        label = f"{type(pipe).__name__} from {model_path}"
    kwargs = _pipeline_call(pipe, device, steps, frames, height, width)
    options.setdefault("correction", "stochastic")
    print(f"\nLightMotion sampler: {label}, {frames} frames {height}x{width}, {steps} steps, on {device}\n  {camera}")

    def run():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        video = pipe(**kwargs()).frames
        if device.type == "cuda":
            torch.cuda.synchronize()
        return video, (time.perf_counter() - t0) * 1e3

    from lightmotion_fast.integrations.diffusers.lightmotion import sampler_state

    _, plain_ms = run()  # also the warm-up, so the two timed runs below start equal
    with lm.patched(pipe, camera=camera, **options):
        with lm.backend("reference"):
            ref, ref_ms = run()
        with _fused(device):
            fused, fused_ms = run()
        record = sampler_state(pipe).record
    diff = (fused.float() - ref.float()).abs().max().item()
    agree = diff <= (1e-3 if fused.dtype == torch.float32 else 2e-2)
    paths = write_mask_and_fill_map(record, out_dir)
    try:
        from lightmotion_fast.demo import write_gif

        paths["video"] = out_dir / "lightmotion_video.gif"
        write_gif(fused[0].permute(1, 0, 2, 3).float().cpu(), paths["video"])
    except ImportError:  # the demo module's GIF writer is optional here
        pass
    fused_note = "" if device.type == "cuda" else (
        " (Triton interpreter: not a speed figure)" if _interpreter_usable() else
        " (CPU ops: triton was imported before TRITON_INTERPRET=1 could be set)")
    print(f"  plain pipeline:    {plain_ms:10.1f} ms (unpatched, first call: includes warm-up)")
    print(f"  reference sampler: {ref_ms:10.1f} ms")
    print(f"  fused sampler:     {fused_ms:10.1f} ms{fused_note}")
    print(f"  max |fused - reference| over the video: {diff:.3g}  "
          f"({'agree' if agree else 'DIFFER'}); mask from {record['background_source']}")
    for name, path in paths.items():
        print(f"  {name:<9} {path}")
    return {"plain_ms": plain_ms, "reference_ms": ref_ms, "fused_ms": fused_ms, "max_abs_diff": diff, "agree": agree, "paths": paths}
