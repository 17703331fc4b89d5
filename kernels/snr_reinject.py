"""Triton kernel for LightMotion's SNR noise re-injection (specs/lightmotion.md, "Latent space correction").

One elementwise pass: read x and the model output once, draw the noise in registers, write
out = cx·x + cm·m + cn·n, or the plain cx0·x + cm0·m outside the correction region when a [f, h, w]
region mask is given. Arithmetic in float32 (float64 for float64 data).

The noise stream (reference/snr_reinject.py documents it bit for bit): element i of the tensor is
stream element g = offset + i; one Philox-4x32-10 call on the counter g // 4 gives the four normals
of g = 4c .. 4c + 3 (both Box–Muller outputs of both word pairs). A program therefore works on a
[BLOCK / (4·Q), 4·Q] tile, one row holding Q whole quads (Q = 2 for 16-bit data so that a row is one
128-bit access), and draws the Philox of every quad once. The transcendental functions use the
hardware's approximate instructions on the GPU (FAST=True); the interpreter has no libdevice, so it
takes the exact ones (FAST=False), which the NumPy reference also uses.
"""
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_NEG_LN2 = tl.constexpr(-0.6931471805599453)
_PI_2M31 = tl.constexpr(3.141592653589793 * 2.0 ** -31)


def fast_math() -> bool:
    """Hardware approximations of log2/sin/cos: everywhere but in Triton's interpreter (no libdevice)."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


@triton.jit
def _box_muller(a, b, FAST: tl.constexpr):
    """Two normals from two uint32 words, both Box–Muller outputs (see the reference for the formulas)."""
    kf = (a >> 9).to(tl.float32)
    u = kf * 1.1920928955078125e-07 + 5.960464477539063e-08            # k·2⁻²³ + 2⁻²⁴ ∈ (0, 1)
    v = (8388607.0 - kf) * 1.1920928955078125e-07 + 5.960464477539063e-08  # 1 − u, exact
    series = v * (1.0 + v * (0.5 + v * (0.3333333432674408 + v * 0.25)))  # −ln u for u near 1
    theta = b.to(tl.int32, bitcast=True).to(tl.float32) * _PI_2M31       # [−π, π)
    if FAST:
        logs = _NEG_LN2 * libdevice.fast_log2f(u)
        cos = libdevice.fast_cosf(theta)
        sin = libdevice.fast_sinf(theta)
    else:
        logs = _NEG_LN2 * tl.log2(u)
        cos = tl.cos(theta)
        sin = tl.sin(theta)
    e = tl.where(v < 0.015625, series, logs)
    r = tl.sqrt(2.0 * e)
    return r * cos, r * sin


@triton.jit
def normals4(seed, counter, FAST: tl.constexpr):
    """The four normals of stream elements 4·counter .. 4·counter + 3 (counter: int64 tensor)."""
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    n0, n1 = _box_muller(w0, w1, FAST)
    n2, n3 = _box_muller(w2, w3, FAST)
    return n0, n1, n2, n3


@triton.jit
def quad_noise(seed, first_counter, Q: tl.constexpr, ROWS: tl.constexpr, FAST: tl.constexpr):
    """[ROWS, 4·Q] float32 noise: row r, column j is stream element 4·(first_counter + r·Q) + j."""
    lanes = tl.arange(0, 4 * Q)[None, :]
    rows = tl.arange(0, ROWS).to(tl.int64)
    noise = tl.zeros((ROWS, 4 * Q), dtype=tl.float32)
    for q in tl.static_range(Q):
        n0, n1, n2, n3 = normals4(seed, first_counter + rows * Q + q, FAST)
        # lanes are compile-time constants per register, so these selects fold away
        noise = tl.where(lanes == 4 * q, n0[:, None], noise)
        noise = tl.where(lanes == 4 * q + 1, n1[:, None], noise)
        noise = tl.where(lanes == 4 * q + 2, n2[:, None], noise)
        noise = tl.where(lanes == 4 * q + 3, n3[:, None], noise)
    return noise


@triton.jit
def normal_at(seed, first_counter, g, FAST: tl.constexpr):
    """Stream element 4·first_counter + g (g: int64 tensor ≥ 0, any shape) alone: one Philox per element.
    For index patterns that cannot be grouped by whole quads. (The stream position is split so that an
    offset near 2⁶³ does not overflow: first_counter = offset // 4.)"""
    w0, w1, w2, w3 = tl.randint4x(seed, first_counter + (g >> 2))
    lane = g & 3
    first = lane < 2
    c, s = _box_muller(tl.where(first, w0, w2), tl.where(first, w1, w3), FAST)
    return tl.where((lane & 1) == 0, c, s)


@triton.jit
def _snr_reinject_kernel(
    x_ptr, m_ptr, region_ptr, out_ptr,
    n_elements, seed, first_counter,
    cx, cm, cn, cx0, cm0,
    inner, frames, hw,
    HAS_MODEL: tl.constexpr, HAS_REGION: tl.constexpr, SHIFT: tl.constexpr, Q: tl.constexpr,
    BLOCK: tl.constexpr, FAST: tl.constexpr, ACC: tl.constexpr, INDEX32: tl.constexpr,
):
    # Element i = stream element offset + i; the program's tile starts at a quad boundary of the
    # stream, SHIFT = offset % 4 elements before element 0 (SHIFT = 0 keeps the accesses aligned).
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK // (4 * Q))[:, None]
    lanes = tl.arange(0, 4 * Q)[None, :]
    offs = pid * BLOCK + rows * (4 * Q) + lanes - SHIFT
    valid = (offs >= 0) & (offs < n_elements)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
    acc = cx * x
    if HAS_MODEL:
        m = tl.load(m_ptr + offs, mask=valid, other=0.0).to(ACC)
        acc += cm * m
    noise = quad_noise(seed, first_counter + pid * (BLOCK // 4), Q, BLOCK // (4 * Q), FAST)
    res = acc + cn * noise.to(ACC)
    if HAS_REGION:
        # the region mask is [f, h, w]; element i sits at frame (i // inner) % frames, pixel i % hw
        # (32-bit divisions when every index fits: a 64-bit division is a long subroutine on the GPU)
        idx = offs.to(tl.int32) if INDEX32 else offs
        ridx = ((idx // inner) % frames) * hw + idx % hw
        inside = tl.load(region_ptr + ridx, mask=valid, other=0) != 0
        plain = cx0 * x
        if HAS_MODEL:
            plain += cm0 * m
        res = tl.where(inside, res, plain)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _snr_noise_kernel(out_ptr, n_elements, seed, first_counter, SHIFT: tl.constexpr, BLOCK: tl.constexpr,
                      FAST: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :] - SHIFT
    noise = quad_noise(seed, first_counter + pid * (BLOCK // 4), 1, BLOCK // 4, FAST)
    tl.store(out_ptr + offs, noise, mask=(offs >= 0) & (offs < n_elements))


def quads_per_row(dtype: torch.dtype) -> int:
    """Quads per tile row: a row is one 128-bit access (4 fp32 or 8 fp16/bf16 values)."""
    return max(1, 4 // torch.empty((), dtype=dtype).element_size())


def snr_reinject_launch(x: torch.Tensor, model_output, region, out: torch.Tensor, seed: int, offset: int,
                        coeffs: tuple, inner: int, frames: int, hw: int, block: int = 1024) -> None:
    """x, model_output (or None), out: contiguous, same shape; region: uint8/bool [f, h, w] contiguous or None."""
    n = x.numel()
    cx, cm, cn, cx0, cm0 = (float(c) for c in coeffs)
    shift = offset % 4
    grid = (triton.cdiv(n + shift, block),)
    _snr_reinject_kernel[grid](
        x, model_output if model_output is not None else x, region if region is not None else x, out,
        n, seed, offset // 4, cx, cm, cn, cx0, cm0, inner, frames, hw,
        HAS_MODEL=model_output is not None, HAS_REGION=region is not None, SHIFT=shift,
        Q=quads_per_row(x.dtype), BLOCK=block, FAST=fast_math(), num_warps=4,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, INDEX32=n + block < 2**31,
    )


def snr_noise_launch(out: torch.Tensor, seed: int, offset: int, block: int = 1024) -> None:
    """out: contiguous float32; element i is stream element offset + i."""
    n = out.numel()
    shift = offset % 4
    _snr_noise_kernel[(triton.cdiv(n + shift, block),)](out, n, seed, offset // 4, SHIFT=shift, BLOCK=block,
                                                         FAST=fast_math())
