"""Reference Plücker ray embedding (specs/motionflow.md, "Plücker ray embeddings").

For every frame's camera (intrinsics K, camera-to-world pose [R | t]) and every pixel (u, v) of an
H×W image, with pixel centres at (u + 0.5, v + 0.5) and OpenCV axes (x right, y down, z forward):

    d = normalize(R · K⁻¹ · [u + 0.5, v + 0.5, 1]ᵀ)       ray direction in world space
    o = t                                                 camera centre
    p = (o × d, d)                                        6 channels: moment first, then direction

The cross product is taken over the last axis (xyz) explicitly: `torch.cross` without `dim` picks
the first axis of size 3, which silently goes wrong when the batch or the frame count is 3.

With relative=True every pose is first expressed relative to the first frame: c2w_0⁻¹ · c2w_f.
"""
from __future__ import annotations

import torch
from einops import rearrange


def intrinsics_matrix(intrinsics: torch.Tensor) -> torch.Tensor:
    """[b f 4] (fx, fy, cx, cy) -> [b f 3 3]; a [b f 3 3] input is returned as it is."""
    if intrinsics.shape[-2:] == (3, 3):
        return intrinsics
    fx, fy, cx, cy = intrinsics.unbind(-1)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    rows = [torch.stack([fx, zero, cx], -1), torch.stack([zero, fy, cy], -1), torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, -2)


def plucker_embedding_reference(intrinsics: torch.Tensor, c2w: torch.Tensor, height: int, width: int,
                                relative: bool = False, channels_first: bool = False,
                                dtype: torch.dtype | None = None) -> torch.Tensor:
    """intrinsics: [b f 4] or [b f 3 3] (pixels of the H×W target); c2w: [b f 4 4].

    Returns [b f 6 h w] (or [b 6 f h w] with channels_first=True) in `dtype` (default: c2w's dtype),
    computed in float32, or float64 when c2w is float64.
    """
    compute = torch.float64 if c2w.dtype == torch.float64 else torch.float32
    k = intrinsics_matrix(intrinsics.to(compute))
    pose = c2w.to(compute)
    # inv_ex, not inv: cameras are checked (or deliberately not) by the caller; a singular K or pose
    # that reaches this point gives inf/NaN rays, as in the kernel, instead of an error on one backend.
    if relative:
        pose = torch.linalg.inv_ex(pose[:, :1]).inverse @ pose
    rot, centre = pose[..., :3, :3], pose[..., :3, 3]

    v, u = torch.meshgrid(torch.arange(height, dtype=compute, device=c2w.device) + 0.5,
                          torch.arange(width, dtype=compute, device=c2w.device) + 0.5, indexing="ij")
    pixels = torch.stack([u, v, torch.ones_like(u)], dim=-1)                    # [h w 3]
    cam_dirs = torch.einsum("bfij,hwj->bfhwi", torch.linalg.inv_ex(k).inverse, pixels)     # camera space
    dirs = torch.einsum("bfij,bfhwj->bfhwi", rot, cam_dirs)                     # world space
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = centre[:, :, None, None, :].expand_as(dirs)
    moments = torch.linalg.cross(origins, dirs, dim=-1)
    rays = torch.cat([moments, dirs], dim=-1)                                   # [b f h w 6]
    pattern = "b f h w c -> b c f h w" if channels_first else "b f h w c -> b f c h w"
    return rearrange(rays, pattern).contiguous().to(dtype or c2w.dtype)
