"""Triton kernel for LightMotion's whole latent edit: permutation and resampling in one gather pass
(specs/lightmotion.md, "Latent space resampling"), optionally with the first correction step, the
jump back to a noisier level (out = cx·edited + cn·n, the `snr_reinject` renoise step), in the same
launch.

out[b, c, f, y, x] = z[b, c, src] with src the fill map's entry for (f, y, x), decoded once on the
host side into element offsets for z's strides (ops/latent_resample.py caches them with the map), so
the kernel does no index arithmetic beyond an add. A program owns BLOCK output pixels of one frame
as a [BLOCK / VEC, VEC] tile (one row = one 128-bit access of the output): it loads their source
offsets once, then walks PLANES (batch, channel) planes with them, unrolled so that every plane's
gather is in flight at once. Strides are arguments, so `b c f h w` and `b f c h w` views run without
copies; the output's pixel offset is the pixel index itself when its rows are dense (DST_FLAT).

The noise is snr_reinject's stream (kernels/snr_reinject.py): element i of the output in its own
layout, row-major, is stream element offset + i. When frame planes start on whole quads of the
stream (h·w and offset multiples of 4: every real latent) each Philox call serves four outputs
(QUADS); otherwise each element draws its own.
"""
import torch
import triton
import triton.language as tl

from ._grid import plane_tiling
from .snr_reinject import fast_math, normal_at, quad_noise, quads_per_row


@triton.jit
def _latent_resample_kernel(
    z_ptr, out_ptr, src_ptr,
    n_planes, channels, hw, width,
    sz_b, sz_c, so_b, so_c, so_f, so_h, so_w,
    seed, first_counter, shift, cx, cn, sn_b, sn_c, sn_f,
    PLANES: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, DST_FLAT: tl.constexpr,
    HAS_NOISE: tl.constexpr, QUADS: tl.constexpr, FAST: tl.constexpr, ACC: tl.constexpr,
):
    pid_hw = tl.program_id(0)
    frame = tl.program_id(1).to(tl.int64)
    pid_planes = tl.program_id(2)

    p = pid_hw * BLOCK + tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    in_frame = p < hw
    src = tl.load(src_ptr + frame * hw + p, mask=in_frame, other=0)  # element offsets in a (b, c) plane
    if DST_FLAT:
        dst = frame * so_f + p
    else:
        y = p // width
        dst = frame * so_f + y.to(tl.int64) * so_h + (p - y * width).to(tl.int64) * so_w
    for i in tl.static_range(PLANES):
        plane = pid_planes * PLANES + i
        b = (plane // channels).to(tl.int64)
        c = (plane % channels).to(tl.int64)
        mask = p < tl.where(plane < n_planes, hw, 0)   # pixels of this frame, in a plane that exists
        vals = tl.load(z_ptr + (b * sz_b + c * sz_c) + src, mask=mask, other=0.0)
        if HAS_NOISE:
            # stream index of pixel 0 of this plane: 4·first_counter + start (offset = 4·first_counter + shift)
            start = shift + b * sn_b + c * sn_c + frame * sn_f
            if QUADS:
                noise = quad_noise(seed, first_counter + (start + pid_hw * BLOCK) // 4, VEC // 4, BLOCK // VEC, FAST)
            else:
                noise = normal_at(seed, first_counter, start + p, FAST)
            vals = cx * vals.to(ACC) + cn * noise.to(ACC)
        tl.store(out_ptr + (b * so_b + c * so_c) + dst, vals.to(out_ptr.dtype.element_ty), mask=mask)


def latent_resample_launch(z: torch.Tensor, src_offsets: torch.Tensor, out: torch.Tensor, noise=None,
                           sm_count: int = 132) -> None:
    """z, out: [b c f h w] views (any strides, not overlapping); src_offsets: [f, h, w] int32 (or int64)
    contiguous, element offsets of each output pixel's source inside one (b, c) plane of z.
    noise: None, or (cx, cn, seed, offset, (sn_b, sn_c, sn_f)) with the stream strides of the output's
    own layout in this view's dim order: out = cx·gathered + cn·n."""
    batch, channels, frames, height, width = z.shape
    n_planes, hw = batch * channels, height * width
    if out.numel() == 0:
        return
    vec = 4 * quads_per_row(out.dtype)
    block, planes, num_warps = plane_tiling(hw, frames, n_planes, sm_count, vec)
    cx, cn, seed, offset, (sn_b, sn_c, sn_f) = noise if noise is not None else (1.0, 0.0, 0, 0, (0, 0, 0))
    quads = noise is not None and offset % 4 == 0 and hw % 4 == 0
    grid = (triton.cdiv(hw, block), frames, triton.cdiv(n_planes, planes))
    so = out.stride()
    _latent_resample_kernel[grid](
        z, out, src_offsets,
        n_planes, channels, hw, width,
        z.stride(0), z.stride(1), so[0], so[1], so[2], so[3], so[4],
        seed, offset // 4, offset % 4, float(cx), float(cn), sn_b, sn_c, sn_f,
        PLANES=planes, BLOCK=block, VEC=vec, DST_FLAT=(so[4] == 1 and so[3] == width),
        HAS_NOISE=noise is not None, QUADS=quads, FAST=fast_math(), num_warps=num_warps,
        ACC=tl.float64 if out.dtype == torch.float64 else tl.float32,
    )
