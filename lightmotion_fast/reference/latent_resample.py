"""Reference latent resampling (specs/lightmotion.md, "Latent space resampling").

The fill map
------------
`build_fill_map_reference` returns one int32 tensor `fill_map` [f, h, w]. Entry (f, y, x) is a flat
index into the *original* (un-permuted) latent's (frame, row, column) grid:

    fill_map[f, y, x] = (src_frame * h + src_y) * w + src_x

and the edited latent is the plain gather  out[b, c, f, y, x] = z[b, c, src_frame, src_y, src_x].
`decode_fill_map` splits it back into (src_frame, src_y, src_x). The map covers every position:

- kept p (source round(A_f⁻¹ p) inside the frame): (f, round(A_f⁻¹ p)), exactly latent_permute's choice;
- exposed p whose one-frame preimage q = round(A_{f-1} A_f⁻¹ p) was exposed in frame f-1 (cross-frame
  alignment): fill_map[f-1, q], the token that filled that place a frame earlier;
- every other exposed p draws a fresh sample: a background pixel (background[f] True) of the same
  frame's original latent on p's *line*, chosen uniformly by the counter-based hash below; a line with
  no background falls back to any background pixel of the frame (raster order), a frame with no
  background to any pixel of the frame.

The line (`axis`): with "strip" (the default, the paper's per-strip resampling) each exposed pixel is
filled along the axis of the strip it lies in. Its source s = round(A_f⁻¹ p) left the frame by
dx columns and dy rows (dx = max(0, -s_x, s_x - (w-1)), likewise dy): a pixel of an exposed *column*
strip (s_x out of range) takes its row y, a pixel of an exposed *row* strip (s_y out of range) its
column x; where both are out (the corner of a diagonal pan), the larger overshoot relative to the
frame's size decides (column iff dy·w > dx·h, integer arithmetic). "row" and "column" force one axis
for every pixel of the clip.

Randomness is a counter-based hash, `choice_hash(seed, index)` with index = (f * h + y) * w + x of
the output position: splitmix64 finalisers, defined bit for bit the same in csrc/latent_resample.cpp,
so the C++ builder and this reference give the same map for the same seed. The k-th candidate is
taken with k = hash % (number of candidates).

Written for reading: frame by frame, row by row. This file imports nothing of the package.
"""
from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX_A = 0xBF58476D1CE4E5B9
_MIX_B = 0x94D049BB133111EB


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (multiplication wraps mod 2**64, as in C++)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX_A)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX_B)
    return z ^ (z >> np.uint64(31))


def choice_hash(seed: int, index) -> np.ndarray:
    """uint64 hash of (seed, index): mix64(mix64(seed) + (index + 1) * golden)."""
    with np.errstate(over="ignore"):
        key = _mix64(np.asarray([seed & _MASK64], dtype=np.uint64))[0]
        idx = np.asarray(index, dtype=np.uint64)
        return _mix64(key + (idx + np.uint64(1)) * np.uint64(_GOLDEN))


def alignment_affines(inv_affine: torch.Tensor) -> torch.Tensor:
    """[f, 2, 3] float32: for f >= 1, A_{f-1} · A_f⁻¹ (frame f position -> frame f-1 position of the
    same content); row 0 is the identity. Composed in float64 from the float32 inverses and rounded
    once, so every builder reads the same numbers."""
    inv = inv_affine.detach().to("cpu", torch.float64)
    frames = inv.shape[0]
    full = torch.zeros(frames, 3, 3, dtype=torch.float64)
    full[:, :2] = inv
    full[:, 2, 2] = 1.0
    fwd = torch.linalg.inv(full)
    align = torch.eye(3, dtype=torch.float64).repeat(frames, 1, 1)
    if frames > 1:
        align[1:] = fwd[:-1] @ full[1:]
    return align[:, :2].to(torch.float32).contiguous()


def _round_affine(m: torch.Tensor, height: int, width: int):
    """round(m · p) for every pixel p of the grid, with the float32 operations every builder uses."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                          torch.arange(width, dtype=torch.float32), indexing="ij")
    sx = m[0, 0] * x + m[0, 1] * y + m[0, 2]
    sy = m[1, 0] * x + m[1, 1] * y + m[1, 2]
    return torch.floor(sy + 0.5).to(torch.int64), torch.floor(sx + 0.5).to(torch.int64)


FILL_AXES = ("strip", "row", "column")


def _overshoot(s: torch.Tensor, size: int) -> torch.Tensor:
    """How far an integer source coordinate lies outside [0, size - 1] (0 inside)."""
    return torch.clamp(torch.maximum(-s, s - (size - 1)), min=0)


def fill_along_column(src_y: torch.Tensor, src_x: torch.Tensor, height: int, width: int, axis: str) -> torch.Tensor:
    """bool [h, w]: True where an exposed pixel is filled along its column (format above, `axis`)."""
    if axis == "row":
        return torch.zeros_like(src_y, dtype=torch.bool)
    if axis == "column":
        return torch.ones_like(src_y, dtype=torch.bool)
    return _overshoot(src_y, height) * width > _overshoot(src_x, width) * height


def build_fill_map_reference(inv_affine: torch.Tensor, background: torch.Tensor | None,
                             seed: int, axis: str = "strip") -> torch.Tensor:
    """inv_affine: [f, 2, 3] float32 (target -> source); background: [f, h, w] bool (True: background)
    or None (everything is background); axis: one of FILL_AXES. Returns fill_map [f, h, w] int32
    (format above)."""
    if background is None:
        raise ValueError("background must be given to the reference builder ([f, h, w] bool)")
    if axis not in FILL_AXES:
        raise ValueError(f"axis must be one of {FILL_AXES}, got {axis!r}")
    background = background.detach().to("cpu", torch.bool)
    frames, height, width = background.shape
    inv = inv_affine.detach().to("cpu", torch.float32)
    align = alignment_affines(inv)
    fill = torch.empty(frames, height, width, dtype=torch.int64)
    exposed_prev = None
    for f in range(frames):
        src_y, src_x = _round_affine(inv[f], height, width)
        kept = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
        by_column = fill_along_column(src_y, src_x, height, width, axis)
        fill[f] = (f * height + src_y.clamp(0, height - 1)) * width + src_x.clamp(0, width - 1)
        exposed = ~kept
        fresh = exposed.clone()
        if f > 0:
            qy, qx = _round_affine(align[f], height, width)
            inside = (qx >= 0) & (qx < width) & (qy >= 0) & (qy < height)
            qy_c, qx_c = qy.clamp(0, height - 1), qx.clamp(0, width - 1)
            aligned = exposed & inside & exposed_prev[qy_c, qx_c]
            fill[f][aligned] = fill[f - 1][qy_c[aligned], qx_c[aligned]]
            fresh &= ~aligned
        exposed_prev = exposed

        bg = background[f]
        frame_bg = torch.nonzero(bg.flatten()).flatten()  # raster order
        ys, xs = torch.nonzero(fresh, as_tuple=True)
        if len(ys) == 0:
            continue
        draws = choice_hash(seed, ((f * height + ys) * width + xs).numpy())
        for y, x, h in zip(ys.tolist(), xs.tolist(), draws.tolist()):
            column = bool(by_column[y, x])
            line = bg[:, x] if column else bg[y]
            candidates = torch.nonzero(line).flatten()
            if len(candidates) > 0:
                pick = int(candidates[h % len(candidates)])
                sy, sx = (pick, x) if column else (y, pick)
            elif len(frame_bg) > 0:
                sy, sx = divmod(int(frame_bg[h % len(frame_bg)]), width)
            else:
                sy, sx = divmod(h % (height * width), width)
            fill[f, y, x] = (f * height + sy) * width + sx
    return fill.to(torch.int32)


def decode_fill_map(fill_map: torch.Tensor, height: int, width: int):
    """fill_map [f, h, w] -> (src_frame, src_y, src_x), each [f, h, w] int64."""
    flat = fill_map.to(torch.int64)
    src_frame = flat // (height * width)
    rest = flat - src_frame * height * width
    return src_frame, rest // width, rest % width


def latent_resample_reference(z: torch.Tensor, fill_map: torch.Tensor, layout: str = "b c f h w"):
    """Apply a fill map: out[b, c, f, y, x] = z[b, c, src_frame, src_y, src_x] (advanced indexing).

    z: [b c f h w] (or [b f c h w] with layout="b f c h w"); fill_map: [f, h, w] int32."""
    from einops import rearrange

    if layout == "b f c h w":
        z = rearrange(z, "b f c h w -> b c f h w")
    height, width = z.shape[3], z.shape[4]
    src_f, src_y, src_x = decode_fill_map(fill_map.to(z.device), height, width)
    out = z[:, :, src_f, src_y, src_x]
    if layout == "b f c h w":
        out = rearrange(out, "b c f h w -> b f c h w")
    return out
