"""`python -m lightmotion_fast demo --trajectory`: Trajectory Attention end to end on a small SVD pipeline.

depth (from a disparity map) + an official camera preset -> trajectories (quad z-buffer) -> a patched
StableVideoDiffusionPipeline whose trajectory branch is trained for a few steps on a clip that follows
those trajectories (fused forward and backward) -> frames, plus a picture of the trajectories over the
first frame. The pipeline is small and has random weights (nothing is downloaded): the run shows the
whole path working and the branch learning, not a video worth watching.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

import lightmotion_fast as lm


def small_svd_pipeline(frames: int = 4, size: int = 64):
    """StableVideoDiffusionPipeline with a small UNetSpatioTemporalConditionModel, temporal-decoder VAE
    (8x downsampling, as SVD's) and CLIP vision encoder at `size` pixels; random weights, seeded."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=size,
        patch_size=16, projection_dim=16)).eval()
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4,
                                       down_block_types=("DownEncoderBlock2D",) * 4).eval()
    unet = UNetSpatioTemporalConditionModel(
        sample_size=size // 8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=16, num_attention_heads=(2, 4), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, num_frames=frames).eval()
    scheduler = EulerDiscreteScheduler(  # SVD's scheduler configuration
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
        timestep_spacing="leading", use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0, steps_offset=1,
        interpolation_type="linear")
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor(crop_size=size, size=size))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def synthetic_scene(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A test image [3 h w] in [0, 1] and its disparity [h w]: a far ground plane (disparity rising
    toward the bottom of the frame) and a near disc in front of it, in the official depth model's
    units (depth_from_disparity turns them into depths around the presets' radius of 200)."""
    from lightmotion_fast.demo import test_image

    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    disparity = 25.0 + 20.0 * y
    disc = (x - 0.5) ** 2 + (y - 0.55) ** 2 < 0.2 ** 2
    disparity = torch.where(disc, torch.full_like(disparity, 90.0), disparity)
    return test_image(height, width), disparity


def warp_along_trajectories(image: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Frames [f 3 h w] that follow the trajectories: frame f shows frame 0's pixel n at coords[f, n]
    (nearest pixel) where valid[f, n]; pixels nothing lands on stay black. Occlusion is already in
    `valid` (the z-buffer), so the order of writes does not matter for visible points."""
    channels, height, width = image.shape
    frames = coords.shape[0]
    colours = image.reshape(channels, -1)
    out = torch.zeros(frames, channels, height * width)
    for f in range(frames):
        x = torch.floor(coords[f, :, 0] + 0.5).long()
        y = torch.floor(coords[f, :, 1] + 0.5).long()
        keep = valid[f] & (x >= 0) & (x < width) & (y >= 0) & (y < height)
        out[f][:, (y * width + x)[keep]] = colours[:, keep]
    return out.reshape(frames, channels, height, width)


def plot_trajectories(image: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, path: Path,
                      every: int = 6) -> None:
    """The first frame with every `every`-th trajectory (in both directions of the grid) drawn over it:
    valid steps as lines, the start as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = image.shape[1:]
    fig, ax = plt.subplots(figsize=(5, 5 * height / width))
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    starts = [y * width + x for y in range(every // 2, height, every) for x in range(every // 2, width, every)]
    for n in starts:
        ok = valid[:, n]
        if ok.sum() < 2:
            continue
        xy = coords[ok, n]
        ax.plot(xy[:, 0].numpy(), xy[:, 1].numpy(), lw=1, color="yellow")
        ax.plot(coords[0, n, 0].item(), coords[0, n, 1].item(), "o", ms=2, color="red")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_title(f"{len(starts)} trajectories over {coords.shape[0]} frames")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _svd_conditioning(pipe, image: torch.Tensor, frames: int):
    """What the pipeline feeds its UNet besides the noisy latent (no guidance): image embedding,
    image latent repeated over frames, added time ids; returned as the trainer's predict function."""
    device = pipe.unet.device
    with torch.no_grad():
        embeds = pipe._encode_image(image[None], device, 1, False)
        image_latent = pipe._encode_vae_image(image[None] * 2 - 1, device, 1, False)
    image_latents = image_latent[:, None].repeat(1, frames, 1, 1, 1)
    time_ids = pipe._get_add_time_ids(7, 127, 0.02, embeds.dtype, 1, 1, False).to(device)

    def predict(unet, x, t):
        return unet(torch.cat([x, image_latents], 2), t, embeds, time_ids).sample
    return predict


def _encode_clip(pipe, clip: torch.Tensor) -> torch.Tensor:
    """[f 3 h w] in [0, 1] -> SVD latents [1 f 4 h/8 w/8] (scaled as the pipeline's)."""
    with torch.no_grad():
        latents = pipe.vae.encode(clip.to(pipe.vae.device) * 2 - 1).latent_dist.mode()
    return (latents * pipe.vae.config.scaling_factor)[None]


def run_trajectory_demo(out_dir, frames: int = 4, size: int = 64, preset: str = "orbit_horizontal",
                        degrees_per_frame: float = 4.0, train_steps: int = 3, steps: int = 2,
                        device: str | torch.device | None = None) -> dict:
    """The whole path on the small pipeline; prints each stage and returns the losses, the frames and
    the written paths."""
    from lightmotion_fast.demo import write_gif
    from lightmotion_fast.training.trajectory import TrajectoryBranchTrainer, edm_v_objective

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"   # the fused op through Triton's interpreter on a CPU
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"\nTrajectory Attention: small SVD pipeline (random weights), {frames} frames {size}x{size}, on {device}")

    image, disparity = synthetic_scene(size, size)
    depth = lm.depth_from_disparity(disparity)
    K, poses = lm.camera_preset(preset, frames, degrees_per_frame=degrees_per_frame, frame_size=(size, size))
    coords, valid = lm.trajectories_from_depth(depth, K, poses)
    hidden = 1 - valid[-1].float().mean().item()
    print(f"  trajectories: {preset}, {degrees_per_frame} deg/frame -> {coords.shape[1]} points, "
          f"{100 * hidden:.1f} % occluded or out of frame at the last frame")
    paths = {"trajectories": out_dir / "trajectories.png", "clip": out_dir / "trajectory_clip.gif",
             "video": out_dir / "trajectory_video.gif"}
    plot_trajectories(image, coords, valid, paths["trajectories"])
    clip = warp_along_trajectories(image, coords, valid)
    write_gif(clip, paths["clip"])

    pipe = small_svd_pipeline(frames, size).to(device)
    lm.patch(pipe, trajectories=coords, valid=valid)
    latents = _encode_clip(pipe, clip)
    trainer = TrajectoryBranchTrainer(pipe, edm_v_objective(), _svd_conditioning(pipe, image, frames),
                                      lr=3e-3, max_grad_norm=1.0)
    losses = []
    t0 = time.perf_counter()
    for _ in range(train_steps):   # one clip, the same noise each step: the loss has to fall
        losses.append(trainer.step(latents, coords, valid, generator=torch.Generator().manual_seed(0)))
    train_s = time.perf_counter() - t0
    pipe.unet.eval()
    print(f"  branch training, {train_steps} steps on the clip that follows the trajectories "
          f"(fused forward + backward): loss {' -> '.join(f'{x:.4f}' for x in losses)} ({train_s:.1f} s)")

    def generate():
        with torch.no_grad():
            return pipe(image[None].to(device), height=size, width=size, num_frames=frames,
                        num_inference_steps=steps, decode_chunk_size=frames, output_type="pt",
                        generator=torch.Generator("cpu").manual_seed(0)).frames[0]

    video = generate()
    with lm.backend("reference"):
        reference = generate()
    lm.unpatch(pipe)
    plain = generate()
    write_gif(video.float().cpu(), paths["video"])
    diff_ref = (video - reference).abs().max().item()
    diff_plain = (video - plain).abs().max().item()
    print(f"  patched pipeline, {steps} steps: frames {tuple(video.shape)}; max |fused - reference| {diff_ref:.3g}; "
          f"the trained branch moves the frames by up to {diff_plain:.3g} from the unpatched pipeline")
    for name, path in paths.items():
        print(f"  {name:<12} {path}")
    falls = all(b < a for a, b in zip(losses, losses[1:]))
    agree = diff_ref <= (1e-3 if video.dtype == torch.float32 else 2e-2)
    ok = falls and agree and diff_plain > 0
    print("  the loss falls, fused == reference, the branch acts" if ok else
          f"  PROBLEM: loss falls {falls}, fused == reference {agree}, branch changes the frames {diff_plain > 0}")
    return {"losses": losses, "video": video, "max_abs_diff_reference": diff_ref,
            "max_abs_diff_plain": diff_plain, "paths": paths, "ok": ok}
