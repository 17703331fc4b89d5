"""Triton kernel for LightMotion's SNR noise re-injection (specs/lightmotion.md, "Latent space correction").

One elementwise pass: read x and the model output once, draw the noise in registers with Triton's
counter-based Philox (`tl.randn(seed, offset + i)`, i the row-major element index, so no noise
tensor exists in memory), write out = cx·x + cm·m + cn·n, or the plain cx0·x + cm0·m outside the
correction region when a [f, h, w] region mask is given. Arithmetic in float32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _snr_reinject_kernel(
    x_ptr, m_ptr, region_ptr, out_ptr,
    n_elements, seed, offset,
    cx, cm, cn, cx0, cm0,
    inner, frames, hw,
    HAS_MODEL: tl.constexpr, HAS_REGION: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n_elements
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    acc = cx * x
    if HAS_MODEL:
        m = tl.load(m_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        acc += cm * m
    noise = tl.randn(seed, offset + offs)
    res = acc + cn * noise
    if HAS_REGION:
        # the region mask is [f, h, w]; element i sits at frame (i // inner) % frames, pixel i % hw
        ridx = ((offs // inner) % frames) * hw + offs % hw
        inside = tl.load(region_ptr + ridx, mask=valid, other=0) != 0
        plain = cx0 * x
        if HAS_MODEL:
            plain += cm0 * m
        res = tl.where(inside, res, plain)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _snr_noise_kernel(out_ptr, n_elements, seed, offset, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + offs, tl.randn(seed, offset + offs), mask=offs < n_elements)


def snr_reinject_launch(x: torch.Tensor, model_output, region, out: torch.Tensor, seed: int, offset: int,
                        coeffs: tuple, inner: int, frames: int, hw: int, block: int = 1024) -> None:
    """x, model_output (or None), out: contiguous, same shape; region: uint8/bool [f, h, w] contiguous or None."""
    n = x.numel()
    cx, cm, cn, cx0, cm0 = (float(c) for c in coeffs)
    grid = (triton.cdiv(n, block),)
    _snr_reinject_kernel[grid](
        x, model_output if model_output is not None else x, region if region is not None else x, out,
        n, seed, offset, cx, cm, cn, cx0, cm0, inner, frames, hw,
        HAS_MODEL=model_output is not None, HAS_REGION=region is not None, BLOCK=block,
        num_warps=4,
    )


def snr_noise_launch(out: torch.Tensor, seed: int, offset: int, block: int = 1024) -> None:
    """out: contiguous float32; filled with tl.randn(seed, offset + i)."""
    n = out.numel()
    _snr_noise_kernel[(triton.cdiv(n, block),)](out, n, seed, offset, BLOCK=block)
