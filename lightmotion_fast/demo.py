"""`python -m lightmotion_fast demo`: the camera path previewed in pixel space, checked and timed.

latent_permute works on any [b c f h w] tensor, so the same op that moves a video latent also moves
RGB frames: applying it to a still test image shows what a CameraMotion does before any sampling.
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
from lightmotion_fast.reference.latent_permute import latent_permute_reference, source_positions


def camera_from_args(args) -> lm.CameraMotion:
    return lm.CameraMotion(pan=tuple(args.pan), zoom=args.zoom, rotate=args.rotate)


def test_image(height: int = 256, width: int = 256) -> torch.Tensor:
    """A generated RGB test card [3, h, w] in [0, 1]: sky/ground gradient, a grid, discs of three
    colours and an asymmetric 'F', so pan direction, zoom centre and rotation sense are all visible."""
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    img = torch.stack([0.35 + 0.4 * y, 0.55 + 0.2 * y, 0.95 - 0.5 * y])
    ground = y > 0.62
    img[:, ground] = torch.stack([0.35 + 0.3 * x, 0.55 + 0.0 * x, 0.25 + 0.0 * x])[:, ground]
    grid = ((torch.arange(width) % 32) < 2)[None, :] | ((torch.arange(height) % 32) < 2)[:, None]
    img[:, grid] *= 0.55
    for (cy, cx, r, colour) in [(0.3, 0.22, 0.09, (0.9, 0.2, 0.2)), (0.45, 0.75, 0.12, (0.2, 0.8, 0.3)),
                                (0.8, 0.5, 0.08, (0.95, 0.85, 0.1))]:
        disc = (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
        img[:, disc] = torch.tensor(colour)[:, None]
    # An 'F': its bars point right, so a mirrored or wrongly rotated frame is obvious.
    f_shape = ((x > 0.45) & (x < 0.49) & (y > 0.12) & (y < 0.4)) | \
              ((x > 0.45) & (x < 0.6) & (y > 0.12) & (y < 0.16)) | \
              ((x > 0.45) & (x < 0.56) & (y > 0.24) & (y < 0.28))
    img[:, f_shape] = 0.05
    return img.clamp(0, 1)


# Pillow modes holding one channel of integers wider than 8 bits (16-bit PNG/TIFF greyscale).
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _rgb_or_float(img):
    """Any Pillow image -> "RGB" (8 bits per channel) or "F" (one channel of floats in [0, 1]).

    convert("RGB") clips 16-bit greyscale at 255 (a 16-bit image turns white), so those are scaled
    by their own range instead; transparency is composited over white rather than dropped (palette
    images with a transparent colour included), so transparent areas don't read as exposed black."""
    import numpy as np
    from PIL import Image

    if img.mode in _WIDE_INT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        # "I" is also how older Pillow opens 16-bit PNGs: its values say whether it holds 8 or 16 bits.
        full_scale = 255.0 if img.mode == "I" and arr.size and arr.max() <= 255 else 65535.0
        return Image.fromarray((arr / full_scale).clip(0, 1).astype(np.float32), mode="F")
    if img.mode == "F":
        return Image.fromarray(np.asarray(img, dtype=np.float32).clip(0, 1), mode="F")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: Path, max_size: int | None = 256) -> torch.Tensor:
    """An image file as RGB [3, h, w] float32 in [0, 1], its longer side shrunk to at most `max_size`
    pixels (None: full size). Camera orientation from EXIF is applied; 16-bit, palette and
    transparent images are handled (see `_rgb_or_float`). A JPEG is decoded at reduced size directly."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        if max_size is not None:
            opened.draft("RGB", (max_size, max_size))  # JPEG only: DCT scaling, never below the size asked
        img = _rgb_or_float(ImageOps.exif_transpose(opened))
    if max_size is not None and max(img.size) > max_size:
        scale = max_size / max(img.size)
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32)
    if img.mode == "F":
        return torch.from_numpy(arr.clip(0, 1).copy())[None].expand(3, -1, -1).contiguous()
    return torch.from_numpy(arr / 255.0).permute(2, 0, 1).contiguous()


def _to_uint8(frames: torch.Tensor):
    """[c f h w] in [0, 1] -> list of HxWx3 uint8 arrays."""
    arr = (frames.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    return list(arr)


def write_gif(frames: torch.Tensor, path: Path, ms_per_frame: int = 90) -> None:
    from PIL import Image

    images = [Image.fromarray(a) for a in _to_uint8(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)


def write_index_map(camera: lm.CameraMotion, frames: int, height: int, width: int, path: Path) -> None:
    """PNG: for every frame, the source pixel each output pixel reads (red = source x, green = source y),
    black where the pixel is exposed and left for resampling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src_y, src_x, kept = source_positions(camera.inverse_affines(frames, height, width), height, width)
    rgb = torch.stack([src_x.float() / max(width - 1, 1), src_y.float() / max(height - 1, 1),
                       torch.full_like(src_x, 0.35, dtype=torch.float32)], dim=-1)
    rgb[~kept] = 0
    cols = min(8, frames)
    rows = math.ceil(frames / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < frames:
            ax.imshow(rgb[i].clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title(f"f={i}  exposed {100 * (~kept[i]).float().mean():.0f}%", fontsize=7)
    fig.suptitle(f"source index per output pixel (R: source x, G: source y, black: exposed)\n{camera}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def camera_preview(out_dir: Path, camera: lm.CameraMotion, frames: int = 16,
                   image: Path | torch.Tensor | None = None) -> dict[str, Path]:
    """Write the camera-path GIF and the source-index map PNG; returns their paths.
    image: an image file (shrunk by `load_image`'s default), an RGB [3, h, w] tensor in [0, 1], or
    None for the generated test card."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if image is None:
        img = test_image()
    else:
        img = image if isinstance(image, torch.Tensor) else load_image(Path(image))
    video = img[None, :, None].expand(1, img.shape[0], frames, *img.shape[1:]).contiguous()
    moved, _ = lm.latent_permute(video, camera)
    paths = {"gif": out_dir / "camera_path.gif", "index_map": out_dir / "source_index_map.png"}
    write_gif(moved[0], paths["gif"])
    write_index_map(camera, frames, img.shape[1], img.shape[2], paths["index_map"])
    print(f"camera-path preview: {paths['gif']}\nsource-index map:    {paths['index_map']}")
    print_achieved_motion(moved[0], camera)
    return paths


def print_achieved_motion(video: torch.Tensor, camera: lm.CameraMotion, max_side: int = 128) -> None:
    """Print requested vs achieved camera motion, estimated back from the frames themselves.
    video: [c, f, h, w]. Frames are shrunk to `max_side` first (the estimate is in fractions of the frame,
    so the units do not change; it costs seconds instead of tens of seconds at full size)."""
    from lightmotion_fast.camera import camera_motion_errors

    frames = video.transpose(0, 1).float()                      # f c h w
    scale = max_side / max(frames.shape[-2:])
    if scale < 1:
        frames = torch.nn.functional.interpolate(frames, scale_factor=scale, mode="area")
    try:
        table = camera_motion_errors(frames, camera).table()
    except ValueError as exc:  # an image with no texture (a flat colour) gives nothing to estimate from
        print(f"camera motion: not estimated from the preview frames ({exc})")
        return
    print("camera motion, requested vs achieved (estimated from the preview frames):")
    print(table)


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Set (or, with None, leave) an environment variable inside a block; the old value comes back."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _triton_on_this_device(device: torch.device):
    """Run the Triton kernel here: compiled on CUDA, through Triton's interpreter on a CPU. The
    interpreter is switched on only inside the block (kernels imported here stay interpreted)."""
    with env_var("TRITON_INTERPRET", "1" if device.type != "cuda" else None), lm.backend("triton"):
        yield


def _timed(fn, device, repeats=3):
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best * 1e3


def check_and_time(camera: lm.CameraMotion, frames: int, device: torch.device) -> bool:
    """Kernel against reference on an AnimateDiff-shaped latent, with timings of every path."""
    z = torch.randn(2, 4, frames, 64, 64, device=device)
    inv = camera.inverse_affines(frames, 64, 64, device=device)
    ref, ref_exposed = latent_permute_reference(z, inv)
    ok = True
    results = []
    paths = [("reference (PyTorch, per frame)", "reference")]
    if device.type == "cpu" and lm.extension_available():
        paths.append(("C++ extension", "cpp"))
    paths.append(("Triton kernel" + (" (interpreter: not a speed figure)" if device.type != "cuda" else ""), "triton"))
    for label, impl in paths:
        ctx = _triton_on_this_device(device) if impl == "triton" else lm.backend(impl)
        with ctx:
            (out, exposed), ms = _timed(lambda: lm.latent_permute(z, camera), device,
                                        repeats=1 if impl == "triton" and device.type != "cuda" else 3)
        same = torch.equal(out, ref) and torch.equal(exposed, ref_exposed)
        ok &= same
        results.append((label, ms, same))
    print(f"\nlatent_permute on a {tuple(z.shape)} latent ({device}):")
    for label, ms, same in results:
        print(f"  {label:<55} {ms:9.3f} ms   {'matches the reference' if same else 'DIFFERS from the reference'}")
    return ok


def main(args, camera: lm.CameraMotion | None = None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and "triton" not in sys.modules:
        # Without a GPU the demo checks the Triton kernels through Triton's interpreter, which has to
        # be chosen before triton is first imported (kernels calling tl.randn depend on it).
        os.environ["TRITON_INTERPRET"] = "1"
    camera = camera or camera_from_args(args)
    print(f"lightmotion_fast demo on {device}: {camera}")
    if not lm.extension_available():
        print("(C++ extension not loaded: CPU paths use the PyTorch reference)")
    camera_preview(args.out, camera, frames=args.frames)
    ok = check_and_time(camera, args.frames, device)
    from lightmotion_fast.demo_sampler import run_sampler_demo

    ok &= run_sampler_demo(args.out, model_path=getattr(args, "model", None), device=device, camera=camera,
                           frames=args.frames)["agree"]
    print("\nall paths agree with the reference" if ok else "\nMISMATCH: see above")
    return 0 if ok else 1
