"""latent_resample: LightMotion's background-aware resampling with cross-frame alignment
(specs/lightmotion.md, "Latent space resampling").

Two parts: `build_fill_map` builds the fill map once per (camera, shape, mask, seed) on the CPU (the
C++ extension, or the reference builder), and `latent_resample` applies it to a latent in one gather
pass (custom op `lightmotion::latent_resample`). The map format is documented in
reference/latent_resample.py: int32 [f, h, w], entry (src_frame * h + src_y) * w + src_x.
"""
from __future__ import annotations

import collections
import threading
import weakref

import torch

from lightmotion_fast.camera.motion import CameraMotion, as_int
from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend
from lightmotion_fast.ops.latent_permute import LATENT_DTYPES, check_latent
from lightmotion_fast.ops.snr_reinject import StepCoefficients, _check_seed, _noise_reference
from lightmotion_fast.reference.latent_resample import (
    FILL_AXES,
    alignment_affines,
    build_fill_map_reference,
    latent_resample_reference,
)
from lightmotion_fast.reference.snr_reinject import snr_reinject_reference

def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


# --- the fill map decoded into source offsets, once per (map, z strides) ----------------------------

def check_fill_entries(fill_map: torch.Tensor, frames: int, height: int, width: int) -> None:
    """ValueError unless every entry is a flat (frame, y, x) index of the latent. Reads the values:
    on a GPU this synchronises the host (the ops call it for CPU maps, or with validate=True)."""
    if fill_map.numel() == 0:
        return
    lo, hi = int(fill_map.min()), int(fill_map.max())
    if lo < 0 or hi >= frames * height * width:
        raise ValueError(f"fill_map entries must lie in [0, {frames * height * width}) (flat (frame, y, x) "
                         f"indices), got range [{lo}, {hi}]")


def decode_source_offsets(fill_map: torch.Tensor, frames: int, height: int, width: int,
                          strides: tuple[int, int, int]) -> torch.Tensor:
    """[f, h, w] element offsets of each output pixel's source inside one (b, c) plane of z, for z's
    (frame, row, column) strides: src_frame·s_f + src_y·s_h + src_x·s_w. int32 when every offset
    the latent can have fits (all real latents), else int64. Runs on the map's device, no host sync.

    CPU maps are checked (ValueError); GPU maps are clamped into range, so that whatever a map holds
    the kernel never reads outside z (check_fill_entries / validate=True to get the error instead).
    """
    flat = fill_map.to(torch.int64)
    hw = height * width
    if fill_map.device.type == "cpu":
        check_fill_entries(fill_map, frames, height, width)
    else:
        flat = flat.clamp(0, max(frames * hw - 1, 0))
    s_f, s_h, s_w = strides
    src_f = torch.div(flat, hw, rounding_mode="floor")
    rest = flat - src_f * hw
    src_y = torch.div(rest, width, rounding_mode="floor")
    offsets = src_f * s_f + src_y * s_h + (rest - src_y * width) * s_w
    largest = (frames - 1) * abs(s_f) + (height - 1) * abs(s_h) + (width - 1) * abs(s_w)
    return offsets.to(torch.int32 if largest < 2**31 else torch.int64).contiguous()


class _OffsetCache:
    """Decoded offsets kept with their fill map: keyed on the map object, its version counter (an
    in-place change of the map re-decodes) and z's strides; the map is held weakly (a decoding goes
    when its map is gone), and at most `capacity` decodings are kept (least recently used dropped):
    at most 64 × 4 bytes per map pixel. `SOURCE_OFFSETS.clear()` empties it. Writes that bypass
    PyTorch's version counter (through `.data`, a NumPy view or DLPack) are not seen: clear the cache
    after them. Maps made under `torch.inference_mode()` have no version counter and are decoded on
    every call instead."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, fill_map: torch.Tensor, frames: int, height: int, width: int, strides) -> torch.Tensor:
        version = _common.tensor_version(fill_map)
        if version is None:   # an inference tensor: no version counter to tell a change by, so no caching
            return decode_source_offsets(fill_map, frames, height, width, strides)
        key = (id(fill_map), version, fill_map.data_ptr(), fill_map.device, frames, height, width,
               tuple(strides))
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0]() is fill_map:
                self._entries.move_to_end(key)
                return hit[1]
        offsets = decode_source_offsets(fill_map, frames, height, width, strides)
        with self._lock:
            for dead in [k for k, (ref, _) in self._entries.items() if ref() is None]:
                del self._entries[dead]   # maps that are gone take their decodings with them
            self._entries[key] = (weakref.ref(fill_map), offsets)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return offsets

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


SOURCE_OFFSETS = _OffsetCache()


@torch.library.custom_op("lightmotion::latent_resample", mutates_args=())
def latent_resample_op(z: torch.Tensor, fill_map: torch.Tensor, frames_first: bool, renoise: bool = False,
                       cx: float = 1.0, cn: float = 0.0, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """z: [b c f h w] (frames_first=False) or [b f c h w] (True); fill_map: [f, h, w] int32.
    renoise: out = cx·edited + cn·n with n snr_reinject's noise stream (seed, offset), in one pass."""
    out = torch.empty_like(z)
    zv, ov = (z, out) if not frames_first else (z.transpose(1, 2), out.transpose(1, 2))
    frames, height, width = zv.shape[2:]
    if out.numel() == 0:
        return out
    offsets = SOURCE_OFFSETS.get(fill_map, frames, height, width, zv.stride()[2:])  # CPU maps: checked here
    impl = _common.select_backend(z.device)
    if impl is Backend.TRITON:
        noise = None
        if renoise:
            # the stream runs over the output row-major in its own layout; strides in the view's order
            contiguous = _contiguous_strides(z.shape)
            order = (0, 2, 1) if frames_first else (0, 1, 2)
            noise = (cx, cn, seed, offset, tuple(contiguous[i] for i in order))
        kernel = _common.kernel_module("latent_resample")
        kernel.latent_resample_launch(zv, offsets, ov, noise, sm_count=_common.device_sm_count(z.device))
    else:
        layout = "b f c h w" if frames_first else "b c f h w"
        edited = latent_resample_reference(z, fill_map, layout)
        if renoise:
            edited = snr_reinject_reference(edited, None, _noise_reference(z.shape, seed, offset, z.device),
                                            StepCoefficients(cx, 0.0, cn, 1.0, 0.0), None, layout)
        out.copy_(edited)
    return out


@latent_resample_op.register_fake
def _(z, fill_map, frames_first, renoise=False, cx=1.0, cn=0.0, seed=0, offset=0):
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
    return _check_seed("seed", seed)


def _check_axis(axis) -> None:
    if axis not in FILL_AXES:
        raise ValueError(f"axis must be one of {', '.join(map(repr, FILL_AXES))}, got {axis!r}")


def build_fill_map_affine(inv_affine: torch.Tensor, background: torch.Tensor | None, height: int,
                          width: int, seed: int = 0, axis: str = "strip") -> torch.Tensor:
    """As `build_fill_map`, from [f, 2, 3] float32 inverse transforms (target -> source)."""
    _common.check_tensor("inv_affine", inv_affine, ndim=3, dims="f 2 3", dtypes=(torch.float32,))
    _check_axis(axis)
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
        return build_fill_map_reference(inv, background, seed, axis)
    return torch.ops.lightmotion_cpp.build_fill_map(inv.contiguous(), alignment_affines(inv), background.contiguous(),
                                                    seed, FILL_AXES.index(axis))


def build_fill_map(camera: CameraMotion, frames: int, height: int, width: int,
                   background: torch.Tensor | None = None, seed: int | None = None,
                   generator: torch.Generator | None = None, axis: str = "strip",
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The fill map for a camera, latent size, background mask and seed: int32 [f, h, w] on `device`.

    background: [f, h, w] bool, True where the *original* latent shows background (fills are drawn
    only there); None: everything is background. axis: "strip" (the paper's per-strip fill: an
    exposed column strip is filled along its rows, an exposed row strip along its columns; see
    reference/latent_resample.py), or "row" / "column" for one axis over the whole clip. Randomness: `seed` or `generator` (the same seed gives the same map from
    the C++ builder and the reference).

    >>> fill = build_fill_map(CameraMotion(pan=(0.25, 0)), 16, 64, 64, seed=0)
    >>> edited = latent_resample(z, fill)
    """
    if not isinstance(camera, CameraMotion):
        raise TypeError(f"camera must be a lightmotion_fast.CameraMotion, got {type(camera).__name__}")
    frames, height, width = (as_int(name, value, minimum=1) for name, value in
                             (("frames", frames), ("height", height), ("width", width)))
    _check_axis(axis)
    inv = camera.cached_inverse_affines(frames, height, width)
    fill = build_fill_map_affine(inv, background, height, width, resolve_seed(seed, generator), axis)
    return fill.to(device)


def latent_resample(z: torch.Tensor, fill_map: torch.Tensor, layout: str = "b c f h w", *,
                    renoise: StepCoefficients | None = None, seed: int = 0, offset: int = 0,
                    validate: bool = False) -> torch.Tensor:
    """Permutation and resampling in one gather: out[b, c, f, y, x] = z[b, c, src_frame, src_y, src_x].

    z: [b c f h w] (AnimateDiff) or [b f c h w] with layout="b f c h w" (SVD); any strides.
    fill_map: [f, h, w] int32 from `build_fill_map`, on z's device. z is not modified.
    renoise: the correction's jump back to a noisier level, applied in the same pass:
    out = cx·edited + cn·n, with coefficients from `renoise_coefficients` / `renoise_sigma_coefficients`
    (cm must be 0) and n exactly the noise `snr_reinject(edited, None, renoise, seed, offset)` draws.
    validate: read the map's values back and check them (a host synchronisation on a GPU). Without
    it, CPU maps are still checked (once per map, when first decoded), and GPU maps are clamped into
    range, so no map makes the kernel read outside z. Nothing here reads a tensor's values, so the
    function traces with torch.compile(fullgraph=True) and captures in a CUDA graph.

    >>> fill = build_fill_map(CameraMotion(pan=(0.25, 0)), 16, 64, 64, seed=0, device="cuda")
    >>> x = latent_resample(z, fill, renoise=renoise_coefficients(0.6, 0.4), seed=0, offset=0)
    """
    frames, height, width = check_latent("z", z, layout)
    _common.check_tensor("fill_map", fill_map, ndim=3, dims="f h w", dtypes=(torch.int32,))
    if tuple(fill_map.shape) != (frames, height, width):
        raise ValueError(f"fill_map must have shape [{frames}, {height}, {width}] (frames, height, width "
                         f"of z), got {tuple(fill_map.shape)}")
    _common.check_same_device(z=z, fill_map=fill_map)
    if validate:
        check_fill_entries(fill_map, frames, height, width)
    if renoise is None:
        return latent_resample_op(z, fill_map, layout == "b f c h w")
    if not isinstance(renoise, StepCoefficients):
        raise TypeError(f"renoise must be a StepCoefficients (renoise_coefficients(...)), got {type(renoise).__name__}")
    cx = _common.check_finite_number("renoise.cx", renoise.cx)
    cn = _common.check_finite_number("renoise.cn", renoise.cn)
    if renoise.cm != 0:
        raise ValueError(f"renoise.cm must be 0 (the jump uses no model output), got {renoise.cm}")
    return latent_resample_op(z, fill_map, layout == "b f c h w", True, cx, cn,
                              _check_seed("seed", seed), _check_seed("offset", offset))


def latent_edit(z: torch.Tensor, camera: CameraMotion, background: torch.Tensor | None = None,
                seed: int | None = None, generator: torch.Generator | None = None,
                layout: str = "b c f h w", axis: str = "strip"):
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
