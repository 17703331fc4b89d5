"""LightMotion's latent edit: the fill-map build (C++ vs the Python reference builder) and the fused
permute + resample gather against the plain-PyTorch reference, a per-frame gather + torch.where
version, and a MotionBooth-style per-row Python loop with NumPy random choice (integer pans only)."""
import numpy as np
import torch

import lightmotion_fast as lm
from lightmotion_fast.bench.scenario import Case
from lightmotion_fast.ops.latent_resample import build_fill_map_affine
from lightmotion_fast.reference.latent_permute import latent_permute_reference
from lightmotion_fast.reference.latent_resample import build_fill_map_reference, latent_resample_reference

CAMERA = lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)
PAN = lm.CameraMotion(pan=(0.25, 0.0))  # what a MotionBooth-style shift can do: integer horizontal pans


def background_mask(frames, height, width, seed=0):
    """A subject blob in the middle of every frame; the rest is background."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    blob = (x / 0.45) ** 2 + (y / 0.6) ** 2 < 1
    return (~blob)[None].expand(frames, height, width).contiguous()


def per_frame_where(z, camera, fill):
    """Straightforward PyTorch: permute frame by frame, then fill the exposed pixels by advanced
    indexing and torch.where (z: [b c f h w])."""
    frames, height, width = z.shape[2:]
    permuted, exposed = latent_permute_reference(z, camera.inverse_affines(frames, height, width, device=z.device))
    filled = latent_resample_reference(z, fill)
    return torch.where(exposed.to(z.device), filled, permuted)


def motionbooth_shift(z, background, shift_per_frame, seed=0):
    """MotionBooth-style latent shift (their `shift_latent` idea, written here): for every frame,
    shift the columns by an integer pan, then for every row fill each newly exposed column with a
    random background pixel of that row chosen by NumPy. Python loops over rows and columns."""
    rng = np.random.default_rng(seed)
    out = z.clone()
    frames, height, width = z.shape[2:]
    bg = background.cpu().numpy()
    for f in range(frames):
        dx = int(round(shift_per_frame * f))
        if dx <= 0:
            continue
        out[:, :, f, :, : width - dx] = z[:, :, f, :, dx:]
        for row in range(height):
            candidates = np.nonzero(bg[f, row])[0]
            if len(candidates) == 0:
                candidates = np.arange(width)
            for col in range(width - dx, width):
                out[:, :, f, row, col] = z[:, :, f, row, int(rng.choice(candidates))]
    return out


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _build_case(frames, height, width, quick):
    def setup():
        inv = CAMERA.inverse_affines(frames, height, width)
        bg = background_mask(frames, height, width)
        providers = {"reference": lambda: build_fill_map_reference(inv, bg, 0, False)}
        if lm.extension_available():
            def cpp():
                with lm.backend("cpp"):
                    return build_fill_map_affine(inv, bg, height, width, 0, False)
            providers["lightmotion"] = cpp
        return providers

    return Case(op="latent_resample", mode="build", shape=f"fill map {frames}x{height}x{width}", setup=setup,
                dtype="int32", quick=quick, cpu=True, note="the fill map is built on the CPU once per video")


def _apply_case(label, shape, layout, device, dtype, quick, cpu=True, loop=True):
    def setup():
        z = torch.randn(shape, device=device, dtype=dtype)
        zc = z if layout == "b c f h w" else z.transpose(1, 2)  # b c f h w view
        b, c, f, h, w = zc.shape
        bg = background_mask(f, h, w)
        fill = lm.build_fill_map(CAMERA, f, h, w, background=bg, seed=0, device=device)
        providers = {
            "lightmotion": lambda: lm.latent_resample(z, fill, layout=layout),
            "reference": lambda: latent_resample_reference(zc, fill),
            "per_frame_where": lambda: per_frame_where(zc, CAMERA, fill),
        }
        for _ in range(3):  # the first calls of a custom op pay one-time dispatch costs
            providers["lightmotion"]()
        if loop:
            providers["motionbooth_loop"] = lambda: motionbooth_shift(zc, bg, PAN.pan[0] * w / max(f - 1, 1))
        return providers

    elem = torch.empty((), dtype=dtype).element_size()
    return Case(op="latent_resample", shape=f"{label} {'x'.join(map(str, shape))}", setup=setup,
                dtype=str(dtype).replace("torch.", ""), bytes=2 * _numel(shape) * elem, quick=quick, cpu=cpu,
                note="motionbooth_loop: integer horizontal pans only (a pure pan, not the benchmark camera)"
                if loop else "")


def cases(device, quick):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    yield _build_case(16, 64, 64, quick=True)
    yield _apply_case("small", (1, 4, 8, 32, 32), "b c f h w", device, dtype, quick=True)
    yield _apply_case("AnimateDiff", (2, 4, 16, 64, 64), "b c f h w", device, dtype, quick=True, cpu=True)
    yield _apply_case("SVD-xt", (2, 25, 4, 72, 128), "b f c h w", device, dtype, quick=True, cpu=False)
    yield _apply_case("bandwidth", (8, 16, 32, 128, 128), "b c f h w", device, torch.float32, quick=False,
                      cpu=False, loop=False)
