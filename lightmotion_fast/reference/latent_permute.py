"""Reference latent permutation (specs/lightmotion.md, "Latent space permutation").

For every frame f and output pixel p = (x, y):  src = round(A_f⁻¹ p)  (nearest; round half up).
out[b, c, f, p] = z[b, c, f, src] where src lies inside the frame ("kept"); elsewhere p is
"exposed": out holds 0 there and exposed[f, p] is True, for the resample op to fill.

Written for reading, frame by frame. The kernels compute the source position with exactly these
float32 operations, so their index choice matches this bit for bit.
"""
from __future__ import annotations

import torch
from einops import rearrange


def source_positions(inv_affine: torch.Tensor, height: int, width: int):
    """Source pixel of every output pixel, per frame.

    inv_affine: [f, 2, 3] float32 (target -> source).
    Returns src_y, src_x: [f, h, w] int64 and kept: [f, h, w] bool.
    """
    inv = inv_affine.to(torch.float32)
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=inv.device),
        torch.arange(width, dtype=torch.float32, device=inv.device),
        indexing="ij",
    )
    a = [inv[:, i // 3, i % 3].reshape(-1, 1, 1) for i in range(6)]
    sx = a[0] * x + a[1] * y + a[2]
    sy = a[3] * x + a[4] * y + a[5]
    src_x = torch.floor(sx + 0.5).to(torch.int64)
    src_y = torch.floor(sy + 0.5).to(torch.int64)
    kept = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    return src_y, src_x, kept


def latent_permute_reference(z: torch.Tensor, inv_affine: torch.Tensor, layout: str = "b c f h w"):
    """z: [b c f h w] (or [b f c h w] with layout="b f c h w"); inv_affine: [f, 2, 3].

    Returns (out shaped like z, exposed [f, h, w] bool).
    """
    if layout == "b f c h w":
        z = rearrange(z, "b f c h w -> b c f h w")
    frames, height, width = z.shape[2:]
    src_y, src_x, kept = source_positions(inv_affine, height, width)
    out = torch.zeros_like(z)
    for f in range(frames):
        keep = kept[f]
        out[:, :, f][:, :, keep] = z[:, :, f, src_y[f][keep], src_x[f][keep]]
    if layout == "b f c h w":
        out = rearrange(out, "b c f h w -> b f c h w")
    return out, ~kept
