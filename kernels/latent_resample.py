"""Triton kernel applying a LightMotion fill map: permutation and resampling in one gather pass
(specs/lightmotion.md, "Latent space resampling").

out[b, c, f, y, x] = z[b, c, src_frame, src_y, src_x] with the fill map's flat entry
(src_frame * h + src_y) * w + src_x. A program owns BLOCK output pixels of one frame: it reads their
map entries once, turns them into source offsets with z's strides, then walks PLANES (batch,
channel) planes with them, one read and one write per element. One launch covers all planes, and
strides are arguments, so `b c f h w` and `b f c h w` views run without copies.
"""
import torch
import triton
import triton.language as tl

from ._grid import pixel_block, planes_per_program


@triton.jit
def _latent_resample_kernel(
    z_ptr, out_ptr, map_ptr,
    n_planes, channels, height, width,
    sz_b, sz_c, sz_f, sz_h, sz_w,
    so_b, so_c, so_f, so_h, so_w,
    PLANES: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_hw = tl.program_id(0)
    frame = tl.program_id(1).to(tl.int64)
    pid_planes = tl.program_id(2)

    hw = height * width
    offs = pid_hw * BLOCK + tl.arange(0, BLOCK)
    in_frame = offs < hw
    y = offs // width
    x = offs - y * width

    entry = tl.load(map_ptr + frame * hw + offs, mask=in_frame, other=0).to(tl.int64)
    src_f = entry // hw
    rest = entry - src_f * hw
    src_y = rest // width
    src_x = rest - src_y * width
    src_off = src_f * sz_f + src_y * sz_h + src_x * sz_w
    dst_off = frame * so_f + y.to(tl.int64) * so_h + x.to(tl.int64) * so_w
    for i in range(PLANES):
        plane = pid_planes * PLANES + i
        if plane < n_planes:
            b = (plane // channels).to(tl.int64)
            c = (plane % channels).to(tl.int64)
            vals = tl.load(z_ptr + b * sz_b + c * sz_c + src_off, mask=in_frame, other=0.0)
            tl.store(out_ptr + b * so_b + c * so_c + dst_off, vals, mask=in_frame)


def latent_resample_launch(z: torch.Tensor, fill_map: torch.Tensor, out: torch.Tensor,
                           programs_per_sm: int = 8, sm_count: int = 132) -> None:
    """z, out: [b c f h w] views (any strides, not overlapping); fill_map: [f, h, w] int32 contiguous."""
    batch, channels, frames, height, width = z.shape
    n_planes = batch * channels
    hw = height * width
    block = pixel_block(hw)
    hw_tiles = triton.cdiv(hw, block)
    planes = planes_per_program(hw_tiles, frames, n_planes, sm_count, programs_per_sm)
    grid = (hw_tiles, frames, triton.cdiv(n_planes, planes))
    _latent_resample_kernel[grid](
        z, out, fill_map,
        n_planes, channels, height, width,
        *z.stride(), *out.stride(),
        PLANES=planes, BLOCK=block,
    )
