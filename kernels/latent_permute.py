"""Triton kernel for the latent permutation gather (specs/lightmotion.md).

One launch covers every batch and channel plane. A program owns a tile of BLOCK output pixels of
one frame, computes their source positions once from the frame's 2×3 inverse affine (no index
tensor in memory), then walks PLANES (batch, channel) planes with those positions: one read of
each kept source element, one write of each output element. Programs of plane group 0 also write
the exposed mask (the grid has at least one plane group, so an empty batch still gets its mask).
Strides are arguments, so `b c f h w` and `b f c h w` views run without copies.

The index math is compiled without floating-point contraction (enable_fp_fusion=False): each
product is rounded before the sums, exactly as in reference.source_positions and the C++ op, so
every device picks the same source pixel (with contraction ptxas fuses a product into an FMA and a
few pixels per clip round to a different source at real latent sizes).
"""
import torch
import triton
import triton.language as tl

from ._grid import pixel_block, planes_per_program


@triton.jit
def _latent_permute_kernel(
    z_ptr, out_ptr, exposed_ptr, inv_ptr,
    n_planes, channels, height, width,
    sz_b, sz_c, sz_f, sz_h, sz_w,
    so_b, so_c, so_f, so_h, so_w,
    PLANES: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_hw = tl.program_id(0)
    frame = tl.program_id(1).to(tl.int64)
    pid_planes = tl.program_id(2)

    offs = pid_hw * BLOCK + tl.arange(0, BLOCK)
    in_frame = offs < height * width
    y = offs // width
    x = offs - y * width

    inv = inv_ptr + frame * 6
    a0 = tl.load(inv + 0)
    a1 = tl.load(inv + 1)
    a2 = tl.load(inv + 2)
    a3 = tl.load(inv + 3)
    a4 = tl.load(inv + 4)
    a5 = tl.load(inv + 5)
    xf = x.to(tl.float32)
    yf = y.to(tl.float32)
    # Same float32 operations as reference.source_positions, so both pick the same pixel.
    sx = a0 * xf + a1 * yf + a2
    sy = a3 * xf + a4 * yf + a5
    src_x = tl.floor(sx + 0.5).to(tl.int32)
    src_y = tl.floor(sy + 0.5).to(tl.int32)
    kept = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)

    if pid_planes == 0:
        tl.store(exposed_ptr + frame * height * width + offs, kept == 0, mask=in_frame)

    src_off = tl.where(kept, src_y.to(tl.int64) * sz_h + src_x.to(tl.int64) * sz_w, 0)
    dst_off = y.to(tl.int64) * so_h + x.to(tl.int64) * so_w
    load_mask = in_frame & kept
    for i in range(PLANES):
        plane = pid_planes * PLANES + i
        if plane < n_planes:
            b = (plane // channels).to(tl.int64)
            c = (plane % channels).to(tl.int64)
            src = z_ptr + b * sz_b + c * sz_c + frame * sz_f
            dst = out_ptr + b * so_b + c * so_c + frame * so_f
            vals = tl.load(src + src_off, mask=load_mask, other=0.0)
            tl.store(dst + dst_off, vals, mask=in_frame)

def latent_permute_launch(z: torch.Tensor, inv_affine: torch.Tensor, out: torch.Tensor,
                          exposed: torch.Tensor, programs_per_sm: int = 8, sm_count: int = 132) -> None:
    """z, out: [b c f h w] views (any strides); inv_affine: [f, 6] float32 contiguous;
    exposed: [f, h, w] bool contiguous. Writes out and exposed."""
    batch, channels, frames, height, width = z.shape
    n_planes = batch * channels
    hw = height * width
    block = pixel_block(hw)
    hw_tiles = triton.cdiv(hw, block)
    planes = planes_per_program(hw_tiles, frames, max(n_planes, 1), sm_count, programs_per_sm)
    grid = (hw_tiles, frames, max(1, triton.cdiv(n_planes, planes)))
    _latent_permute_kernel[grid](
        z, out, exposed, inv_affine,
        n_planes, channels, height, width,
        *z.stride(), *out.stride(),
        PLANES=planes, BLOCK=block, enable_fp_fusion=False,
    )
