"""latent_resample: LightMotion's background-aware resampling with cross-frame alignment
(specs/lightmotion.md, "Latent space resampling").

Two parts: `build_fill_map` builds the fill map once per (camera, shape, mask, seed) on the CPU (the
C++ extension, or the reference builder), and `latent_resample` applies it to a latent in one gather
pass (custom op `lightmotion::latent_resample`). The map format is documented in
reference/latent_resample.py: int32 [f, h, w], entry (src_frame * h + src_y) * w + src_x.
"""
from __future__ import annotations

import torch

from lightmotion_fast.camera.motion import CameraMotion
from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend
from lightmotion_fast.ops.latent_permute import check_latent
from lightmotion_fast.reference.latent_resample import (
    alignment_affines,
    build_fill_map_reference,
    latent_resample_reference,
)

_MAX_SEED = 2**63


@torch.library.custom_op("lightmotion::latent_resample", mutates_args=())
def latent_resample_op(z: torch.Tensor, fill_map: torch.Tensor, frames_first: bool) -> torch.Tensor:
    """z: [b c f h w] (frames_first=False) or [b f c h w] (True); fill_map: [f, h, w] int32."""
    out = torch.empty_like(z)
    zv, ov = (z, out) if not frames_first else (z.transpose(1, 2), out.transpose(1, 2))
    impl = _common.select_backend(z.device)
    if impl is Backend.TRITON:
        kernel = _common.kernel_module("latent_resample")
        kernel.latent_resample_launch(zv, fill_map.contiguous(), ov, sm_count=_common.device_sm_count(z.device))
    else:
        ov.copy_(latent_resample_reference(zv, fill_map))
    return out


@latent_resample_op.register_fake
def _(z, fill_map, frames_first):
    return torch.empty_like(z)


def resolve_seed(seed: int | None = None, generator: torch.Generator | None = None) -> int:
    """One non-negative int seed: `seed` if given, else drawn from `generator`, else 0."""
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def mainly_vertical(camera: CameraMotion, height: int, width: int) -> bool:
    """True when the camera's pan moves more latent pixels vertically than horizontally."""
    return abs(camera.pan[1] * height) > abs(camera.pan[0] * width)


def build_fill_map_affine(inv_affine: torch.Tensor, background: torch.Tensor | None, height: int,
                          width: int, seed: int = 0, by_column: bool = False) -> torch.Tensor:
    """As `build_fill_map`, from [f, 2, 3] float32 inverse transforms (target -> source)."""
    _common.check_tensor("inv_affine", inv_affine, ndim=3, dims="f 2 3", dtypes=(torch.float32,))
    frames = inv_affine.shape[0]
    if tuple(inv_affine.shape) != (frames, 2, 3):
        raise ValueError(f"inv_affine must have shape [f, 2, 3], got {tuple(inv_affine.shape)}")
    seed = resolve_seed(seed)
    if background is None:
        background = torch.ones(frames, height, width, dtype=torch.bool)
    _common.check_tensor("background", background, ndim=3, dims="f h w", dtypes=(torch.bool,))
    if tuple(background.shape) != (frames, height, width):
        raise ValueError(f"background must have shape [{frames}, {height}, {width}] (frames, height, "
                         f"width of the latent), got {tuple(background.shape)}")
    inv = inv_affine.detach().to("cpu")
    background = background.detach().to("cpu")
    impl = _common.select_backend(torch.device("cpu"), cpp_op="build_fill_map")
    if impl is Backend.REFERENCE or (impl is Backend.TRITON and not _common._ext.has_op("build_fill_map")):
        return build_fill_map_reference(inv, background, seed, by_column)
    return torch.ops.lightmotion_cpp.build_fill_map(inv.contiguous(), alignment_affines(inv), background.contiguous(),
                                                    seed, bool(by_column))


def build_fill_map(camera: CameraMotion, frames: int, height: int, width: int,
                   background: torch.Tensor | None = None, seed: int | None = None,
                   generator: torch.Generator | None = None, axis: str = "auto",
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The fill map for a camera, latent size, background mask and seed: int32 [f, h, w] on `device`.

    background: [f, h, w] bool, True where the *original* latent shows background (fills are drawn
    only there); None: everything is background. axis: "row", "column", or "auto" (column for a
    mainly vertical pan). Randomness: `seed` or `generator` (the same seed gives the same map from
    the C++ builder and the reference).

    >>> fill = build_fill_map(CameraMotion(pan=(0.25, 0)), 16, 64, 64, seed=0)
    >>> edited = latent_resample(z, fill)
    """
    if not isinstance(camera, CameraMotion):
        raise TypeError(f"camera must be a lightmotion_fast.CameraMotion, got {type(camera).__name__}")
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if axis not in ("auto", "row", "column"):
        raise ValueError(f"axis must be 'auto', 'row' or 'column', got {axis!r}")
    by_column = mainly_vertical(camera, height, width) if axis == "auto" else axis == "column"
    inv = camera.inverse_affines(frames, height, width)
    fill = build_fill_map_affine(inv, background, height, width, resolve_seed(seed, generator), by_column)
    return fill.to(device)


def latent_resample(z: torch.Tensor, fill_map: torch.Tensor, layout: str = "b c f h w") -> torch.Tensor:
    """Permutation and resampling in one gather: out[b, c, f, y, x] = z[b, c, src_frame, src_y, src_x].

    z: [b c f h w] (AnimateDiff) or [b f c h w] with layout="b f c h w" (SVD); any strides.
    fill_map: [f, h, w] int32 from `build_fill_map`, on z's device. z is not modified.
    """
    frames, height, width = check_latent("z", z, layout)
    _common.check_tensor("fill_map", fill_map, ndim=3, dims="f h w", dtypes=(torch.int32,))
    if tuple(fill_map.shape) != (frames, height, width):
        raise ValueError(f"fill_map must have shape [{frames}, {height}, {width}] (frames, height, width "
                         f"of z), got {tuple(fill_map.shape)}")
    _common.check_same_device(z=z, fill_map=fill_map)
    if fill_map.device.type == "cpu" and fill_map.numel() > 0:
        # On a GPU the values are not inspected: reading them back would synchronise the host.
        lo, hi = int(fill_map.min()), int(fill_map.max())
        if lo < 0 or hi >= frames * height * width:
            raise ValueError(f"fill_map entries must lie in [0, {frames * height * width}) (flat (frame, y, x) "
                             f"indices), got range [{lo}, {hi}]")
    return latent_resample_op(z, fill_map, layout == "b f c h w")


def latent_edit(z: torch.Tensor, camera: CameraMotion, background: torch.Tensor | None = None,
                seed: int | None = None, generator: torch.Generator | None = None,
                layout: str = "b c f h w", axis: str = "auto"):
    """LightMotion's whole latent edit: build the fill map, then permute + resample in one pass.

    Returns (out, fill_map).

    >>> out, fill = latent_edit(torch.randn(2, 4, 16, 64, 64), CameraMotion(pan=(0.25, 0)), seed=0)
    """
    frames, height, width = check_latent("z", z, layout)
    fill = build_fill_map(camera, frames, height, width, background, seed, generator, axis, device=z.device)
    return latent_resample(z, fill, layout), fill


def sample_inputs(device: torch.device):
    """Arguments for the opcheck and torch.compile tests."""
    cam = CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)
    z = torch.randn(1, 3, 5, 9, 11, device=device)
    fill = build_fill_map(cam, 5, 9, 11, seed=3, device=device)
    zf = torch.randn(2, 4, 3, 6, 7, device=device)
    fill_f = build_fill_map(cam, 4, 6, 7, seed=4, device=device)
    return [(z, fill, False), (zf, fill_f, True)]
