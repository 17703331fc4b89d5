"""LightMotion's latent edit: the fill-map build (C++ vs the Python reference builder) and the fused
permute + resample gather against the plain-PyTorch reference, a per-frame gather + torch.where
version, torch.take with precomputed offsets, a MotionBooth-style per-row Python loop with NumPy random
choice (integer pans only), and on a GPU the gather compiled by torch.compile. The "+ renoise" cases
time the whole edit step of the `renoise` correction — gather, then the jump back to a noisier level
with fresh noise — as our one launch against Inductor's fused gather + in-kernel Philox.

Bytes: every output element written once and read once (the fill map covers every pixel), plus the
int32 map (the decoded offsets) read once per plane group."""
import numpy as np
import torch

import lightmotion_fast as lm
from lightmotion_fast.bench.scenario import Case
from lightmotion_fast.ops.latent_resample import build_fill_map_affine
from lightmotion_fast.ops.snr_reinject import renoise_coefficients
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


def take_offsets(z_shape, fill, device):
    """torch.take with every output element's flat source offset precomputed (int64, latent-sized)."""
    b, c, f, h, w = z_shape
    planes = torch.arange(b * c)[:, None] * f * h * w
    index = (planes + fill.cpu().reshape(1, -1).long()).reshape(z_shape).to(device)
    return lambda z: torch.take(z, index)


def compiled_edit(fill, coeffs=None):
    """The gather (and the renoise jump with torch.randn_like) as plain PyTorch, compiled by Inductor
    (which fuses the gather, the affine map and its in-kernel Philox into one kernel)."""
    flat = fill.reshape(-1).long()

    def edit(z):  # z: contiguous [b c f h w]
        out = z.reshape(z.shape[0], z.shape[1], -1)[:, :, flat].reshape(z.shape)
        if coeffs is not None:
            out = coeffs.cx * out + coeffs.cn * torch.randn_like(out)
        return out

    return torch.compile(edit, fullgraph=True, dynamic=False)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _build_case(frames, height, width, quick):
    def setup():
        inv = CAMERA.inverse_affines(frames, height, width)
        bg = background_mask(frames, height, width)
        providers = {"reference": lambda: build_fill_map_reference(inv, bg, 0, "strip")}
        if lm.extension_available():
            def cpp():
                with lm.backend("cpp"):
                    return build_fill_map_affine(inv, bg, height, width, 0, "strip")
            providers["lightmotion"] = cpp
        return providers

    return Case(op="latent_resample", mode="build", shape=f"fill map {frames}x{height}x{width}", setup=setup,
                dtype="int32", quick=quick, cpu=True, note="the fill map is built on the CPU once per video")


def _apply_case(label, shape, layout, device, dtype, quick, cpu=True, loop=True, renoise=False):
    def setup():
        z = torch.randn(shape, device=device, dtype=dtype)
        zc = z if layout == "b c f h w" else z.transpose(1, 2)  # b c f h w view
        b, c, f, h, w = zc.shape
        bg = background_mask(f, h, w)
        fill = lm.build_fill_map(CAMERA, f, h, w, background=bg, seed=0, device=device)
        zcc = zc.contiguous()
        if renoise:
            coeffs = renoise_coefficients(0.6, 0.4)
            providers = {
                "lightmotion": lambda: lm.latent_resample(z, fill, layout=layout, renoise=coeffs, seed=0, offset=0),
                "resample_then_snr": lambda: lm.snr_reinject(lm.latent_resample(z, fill, layout=layout), None,
                                                             coeffs, seed=0, offset=0, layout=layout),
            }
        else:
            coeffs = None
            take = take_offsets(zcc.shape, fill, device)
            providers = {
                "lightmotion": lambda: lm.latent_resample(z, fill, layout=layout),
                "reference": lambda: latent_resample_reference(zc, fill),
                "per_frame_where": lambda: per_frame_where(zc, CAMERA, fill),
                "torch_take_offsets": lambda: take(zcc),
            }
        if device.type == "cuda":
            compiled = compiled_edit(fill, coeffs)
            compiled(zcc)  # compile outside the timing
            providers["torch_compile_edit"] = lambda: compiled(zcc)
        for _ in range(3):  # the first calls of a custom op pay one-time costs (dispatch, the map's decoding)
            providers["lightmotion"]()
        if loop and not renoise:
            providers["motionbooth_loop"] = lambda: motionbooth_shift(zc, bg, PAN.pan[0] * w / max(f - 1, 1))
        return providers

    elem = torch.empty((), dtype=dtype).element_size()
    frames = shape[2] if layout == "b c f h w" else shape[1]
    moved = 2 * _numel(shape) * elem + frames * shape[3] * shape[4] * 4
    notes = ["bytes: the latent read and written once, the int32 map read once"]
    if loop and not renoise:
        notes.append("motionbooth_loop: integer horizontal pans only (a pure pan, not the benchmark camera)")
    if renoise:
        notes.append("+ renoise: gather and x_T2 = cx*x + cn*n with in-kernel noise, one launch")
    return Case(op="latent_resample", shape=f"{label}{' + renoise' if renoise else ''} {'x'.join(map(str, shape))}",
                setup=setup, dtype=str(dtype).replace("torch.", ""), bytes=moved, quick=quick, cpu=cpu,
                note="; ".join(notes))


def cases(device, quick):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    yield _build_case(16, 64, 64, quick=True)
    yield _apply_case("small", (1, 4, 8, 32, 32), "b c f h w", device, dtype, quick=True)
    yield _apply_case("AnimateDiff", (2, 4, 16, 64, 64), "b c f h w", device, dtype, quick=True, cpu=True)
    yield _apply_case("SVD-xt", (2, 25, 4, 72, 128), "b f c h w", device, dtype, quick=True, cpu=False)
    yield _apply_case("bandwidth", (8, 16, 32, 128, 128), "b c f h w", device, torch.float32, quick=False,
                      cpu=False, loop=False)
    yield _apply_case("AnimateDiff", (2, 4, 16, 64, 64), "b c f h w", device, dtype, quick=True, cpu=False,
                      renoise=True)
    yield _apply_case("SVD-xt", (2, 25, 4, 72, 128), "b f c h w", device, dtype, quick=True, cpu=False, renoise=True)
