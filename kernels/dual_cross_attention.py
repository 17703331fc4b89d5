"""Triton kernels for dual-condition cross-attention and reference attention (specs/motionflow.md).

Forward, dual-condition: a program owns BLOCK_M queries of one (batch, head). It reads its Q tile
once, then for each condition j runs a flash-attention loop over that condition's keys with its
own online-softmax state (running max m, sum l, accumulator), folds λⱼ · acc / l into one fp32
output tile, and writes O once, plus each condition's log-sum-exp for the backward. Up to
MAX_CONDITIONS key/value sets go through one launch; more are chained with ACCUMULATE (the next
launch adds to O). The optional mask (additive float or keep-bool, broadcast through strides)
applies to the first condition.

Forward, reference attention: the same loop with ONE softmax state running over two key/value
sources in turn (the feature map m, then the reference bank p), which is attention over the
concatenation [m; p] without building it.

Head dims that are not powers of two (40, 80, 160) are padded to D_PAD with masked loads. fp32
inputs use IEEE fp32 dots (no TF32), so results match the reference to fp32 rounding.
"""
import os

import torch
import triton
import triton.language as tl

MAX_CONDITIONS = 4
LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_pass(q, acc, m_i, l_i, k_base, v_base, kv_len, sk_n, sk_d, sv_n, sv_d,
                         mask_base, sm_n, sm_m, offs_m, n_q, offs_d, d_len, qk_scale,
                         HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                         BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold the keys/values at k_base/v_base (kv_len of them) into one online-softmax state.
    Scores are kept in log2 units (scaled by qk_scale = s·log2 e) so exp2 can be used."""
    d_ok = offs_d < d_len
    for start in range(0, kv_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_len
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * sk_n + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_MASK:
            tile_ok = (offs_m < n_q)[:, None] & n_ok[None, :]
            mptr = mask_base + offs_m[:, None].to(tl.int64) * sm_n + offs_n[None, :].to(tl.int64) * sm_m
            if MASK_BOOL:
                keep = tl.load(mptr, mask=tile_ok, other=0)
                s = tl.where(keep != 0, s, float("-inf"))
            else:
                bias = tl.load(mptr, mask=tile_ok, other=0.0).to(tl.float32)
                s = s + bias * 1.4426950408889634
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with every key masked so far keep m = -inf; shift by 0 there so no inf - inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * sv_n + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _condition(q, offs_m, n_q, offs_d, d_len, qk_scale, b, h,
               k_ptr, v_ptr, kv_len, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
               mask_ptr, sm_b, sm_h, sm_n, sm_m, lse_ptr,
               HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    """softmax(q kᵀ s + mask) v for one condition, as an fp32 tile; stores the row log-sum-exp."""
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _online_softmax_pass(
        q, acc, m_i, l_i, k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h, kv_len, sk_n, sk_d, sv_n, sv_d,
        mask_ptr + b * sm_b + h * sm_h, sm_n, sm_m, offs_m, n_q, offs_d, d_len, qk_scale,
        HAS_MASK, MASK_BOOL, BLOCK_N, PRECISION, UPCAST)
    # Natural-log LSE of the scaled (and masked) scores; -inf marks a fully masked row.
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + offs_m, lse, mask=offs_m < n_q)
    return acc / tl.where(l_i > 0, l_i, 1.0)[:, None]


@triton.jit
def _dual_cross_attention_fwd_kernel(
    q_ptr, o_ptr, lse_ptr, mask_ptr,
    k0, v0, k1, v1, k2, v2, k3, v3,
    n_q, heads, d_len, qk_scale,
    sq_b, sq_h, sq_n, sq_d,
    so_b, so_h, so_n, so_d,
    sm_b, sm_h, sm_n, sm_m,
    len0, len1, len2, len3,
    lam0, lam1, lam2, lam3,
    sk0_b, sk0_h, sk0_n, sk0_d, sv0_b, sv0_h, sv0_n, sv0_d,
    sk1_b, sk1_h, sk1_n, sk1_d, sv1_b, sv1_h, sv1_n, sv1_d,
    sk2_b, sk2_h, sk2_n, sk2_d, sv2_b, sv2_h, sv2_n, sv2_d,
    sk3_b, sk3_h, sk3_n, sk3_d, sv3_b, sv3_h, sv3_n, sv3_d,
    NUM_COND: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N0: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
    BLOCK_N3: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n_q
    tile_ok = row_ok[:, None] & (offs_d < d_len)[None, :]

    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_n + offs_d[None, :] * sq_d,
                mask=tile_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lse_stride = tl.num_programs(1).to(tl.int64) * n_q      # lse: [conditions, b·h, n]
    lse_row = lse_ptr + pid_bh.to(tl.int64) * n_q

    out = lam0 * _condition(q, offs_m, n_q, offs_d, d_len, qk_scale, b, h,
                            k0, v0, len0, sk0_b, sk0_h, sk0_n, sk0_d, sv0_b, sv0_h, sv0_n, sv0_d,
                            mask_ptr, sm_b, sm_h, sm_n, sm_m, lse_row,
                            HAS_MASK, MASK_BOOL, BLOCK_M, BLOCK_N0, D_PAD, PRECISION, UPCAST)
    if NUM_COND >= 2:
        out += lam1 * _condition(q, offs_m, n_q, offs_d, d_len, qk_scale, b, h,
                                 k1, v1, len1, sk1_b, sk1_h, sk1_n, sk1_d, sv1_b, sv1_h, sv1_n, sv1_d,
                                 mask_ptr, 0, 0, 0, 0, lse_row + lse_stride,
                                 False, False, BLOCK_M, BLOCK_N1, D_PAD, PRECISION, UPCAST)
    if NUM_COND >= 3:
        out += lam2 * _condition(q, offs_m, n_q, offs_d, d_len, qk_scale, b, h,
                                 k2, v2, len2, sk2_b, sk2_h, sk2_n, sk2_d, sv2_b, sv2_h, sv2_n, sv2_d,
                                 mask_ptr, 0, 0, 0, 0, lse_row + 2 * lse_stride,
                                 False, False, BLOCK_M, BLOCK_N2, D_PAD, PRECISION, UPCAST)
    if NUM_COND >= 4:
        out += lam3 * _condition(q, offs_m, n_q, offs_d, d_len, qk_scale, b, h,
                                 k3, v3, len3, sk3_b, sk3_h, sk3_n, sk3_d, sv3_b, sv3_h, sv3_n, sv3_d,
                                 mask_ptr, 0, 0, 0, 0, lse_row + 3 * lse_stride,
                                 False, False, BLOCK_M, BLOCK_N3, D_PAD, PRECISION, UPCAST)

    o_tile = o_ptr + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_n + offs_d[None, :] * so_d
    if ACCUMULATE:
        out += tl.load(o_tile, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(o_tile, out.to(o_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _reference_attention_fwd_kernel(
    q_ptr, o_ptr, lse_ptr, k0, v0, k1, v1,
    n_q, heads, d_len, qk_scale, len0, len1,
    sq_b, sq_h, sq_n, sq_d,
    so_b, so_h, so_n, so_d,
    sk0_b, sk0_h, sk0_n, sk0_d, sv0_b, sv0_h, sv0_n, sv0_d,
    sk1_b, sk1_h, sk1_n, sk1_d, sv1_b, sv1_h, sv1_n, sv1_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n_q
    tile_ok = row_ok[:, None] & (offs_d < d_len)[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_n + offs_d[None, :] * sq_d,
                mask=tile_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # One softmax state over both sources: the keys of m, then those of the reference bank p.
    acc, m_i, l_i = _online_softmax_pass(
        q, acc, m_i, l_i, k0 + b * sk0_b + h * sk0_h, v0 + b * sv0_b + h * sv0_h, len0, sk0_n, sk0_d, sv0_n, sv0_d,
        q_ptr, 0, 0, offs_m, n_q, offs_d, d_len, qk_scale, False, False, BLOCK_N, PRECISION, UPCAST)
    acc, m_i, l_i = _online_softmax_pass(
        q, acc, m_i, l_i, k1 + b * sk1_b + h * sk1_h, v1 + b * sv1_b + h * sv1_h, len1, sk1_n, sk1_d, sv1_n, sv1_d,
        q_ptr, 0, 0, offs_m, n_q, offs_d, d_len, qk_scale, False, False, BLOCK_N, PRECISION, UPCAST)
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634
    tl.store(lse_ptr + pid_bh.to(tl.int64) * n_q + offs_m, lse, mask=row_ok)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_n + offs_d[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=tile_ok)


def _block_n(kv_len: int) -> int:
    """Key tile for a short key list: the least padded work, counting each loop iteration's softmax
    rescale as about 16 columns (77 text tokens -> 32: 96 columns in 3 steps, not 128 in 2)."""
    return min((16, 32, 64), key=lambda bn: (triton.cdiv(max(kv_len, 1), bn) * (bn + 16), -bn))


def _tiles(n_q: int, d_pad: int):
    """(BLOCK_M, num_warps). A program holds two fp32 [BLOCK_M, D_PAD] tiles (the running output and
    the current condition's accumulator) plus Q: 128 queries for heads up to 64 wide, 64 up to 128,
    32 above (a 64×256 tile spilled ~1 KB in fp16 under ptxas for sm_90), with 8 warps once a tile
    passes 64×64, keeps that within Hopper's register file."""
    block_m = 128 if d_pad <= 64 else 64 if d_pad <= 128 else 32
    block_m = max(16, min(block_m, triton.next_power_of_2(n_q)))
    return block_m, (4 if block_m * d_pad <= 64 * 64 else 8)


def _upcast(dtype: torch.dtype) -> bool:
    # 2026-11: Triton 3.9's interpreter multiplies bf16 tiles in tl.dot as raw bits (garbage); on the
    # interpreter only, bf16 tiles are widened to fp32 before each dot. Compiled kernels never upcast.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def dual_cross_attention_launch(q: torch.Tensor, keys, values, scales, mask, softmax_scale: float,
                                out: torch.Tensor, lse: torch.Tensor) -> None:
    """q, out: [b h n d] views (any strides); keys[j], values[j]: [b h mⱼ d]; scales: λ per condition;
    mask: None or a [b h n m₀] (expanded, any strides) float or bool tensor; lse: [conditions, b·h, n]
    float32 contiguous. Writes out and lse."""
    batch, heads, n_q, d_len = q.shape
    d_pad = max(16, triton.next_power_of_2(d_len))
    block_m, num_warps = _tiles(n_q, d_pad)
    grid = (triton.cdiv(n_q, block_m), batch * heads)
    has_mask = mask is not None
    mask_arg = mask if has_mask else q
    sm = mask.stride() if has_mask else (0, 0, 0, 0)
    for first in range(0, len(keys), MAX_CONDITIONS):
        chunk = list(range(first, min(first + MAX_CONDITIONS, len(keys))))
        pad = MAX_CONDITIONS - len(chunk)
        # Unused condition slots repeat the first one's pointers; NUM_COND keeps them out of the code.
        ks = [keys[j] for j in chunk] + [keys[first]] * pad
        vs = [values[j] for j in chunk] + [values[first]] * pad
        lens = [k.shape[2] for k in ks]
        lams = [float(scales[j]) for j in chunk] + [0.0] * pad
        strides = []
        for k, v in zip(ks, vs):
            strides += [*k.stride(), *v.stride()]
        masked = has_mask and first == 0
        _dual_cross_attention_fwd_kernel[grid](
            q, out, lse[first:], mask_arg if masked else q,
            ks[0], vs[0], ks[1], vs[1], ks[2], vs[2], ks[3], vs[3],
            n_q, heads, d_len, softmax_scale * LOG2E,
            *q.stride(), *out.stride(), *(sm if masked else (0, 0, 0, 0)),
            *lens, *lams, *strides,
            NUM_COND=len(chunk), HAS_MASK=masked, MASK_BOOL=masked and mask.dtype == torch.bool,
            ACCUMULATE=first > 0,
            BLOCK_M=block_m, BLOCK_N0=_block_n(lens[0]), BLOCK_N1=_block_n(lens[1]), BLOCK_N2=_block_n(lens[2]),
            BLOCK_N3=_block_n(lens[3]), D_PAD=d_pad, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
            num_warps=num_warps, num_stages=2,
        )


def reference_attention_launch(q: torch.Tensor, k_m: torch.Tensor, v_m: torch.Tensor, k_p: torch.Tensor,
                               v_p: torch.Tensor, softmax_scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """q, out: [b h n d]; k_m, v_m: [b h n_m d]; k_p, v_p: [b h n_p d] (any strides); lse: [b·h, n] float32.
    Writes out = softmax(q [k_m; k_p]ᵀ s) [v_m; v_p] and lse."""
    batch, heads, n_q, d_len = q.shape
    d_pad = max(16, triton.next_power_of_2(d_len))
    # Self-attention lengths: flash-attention tiles (128 queries x 64 keys up to 64-wide heads).
    block_m = max(16, min(128 if d_pad <= 64 else 64, triton.next_power_of_2(n_q)))
    block_n = 64 if d_pad <= 128 else 32
    num_warps = 4 if block_m * d_pad <= 64 * 64 else 8
    grid = (triton.cdiv(n_q, block_m), batch * heads)
    _reference_attention_fwd_kernel[grid](
        q, out, lse, k_m, v_m, k_p, v_p,
        n_q, heads, d_len, softmax_scale * LOG2E, k_m.shape[2], k_p.shape[2],
        *q.stride(), *out.stride(), *k_m.stride(), *v_m.stride(), *k_p.stride(), *v_p.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        num_warps=num_warps, num_stages=3,
    )


# ---------------------------------------------------------------------------------------------
# Backward, one condition j per pair of launches (conditions are independent given dO):
#   P = exp(s·QKᵀ + mask − lse_j),  dO_j = λ_j dO,  dP = dO_j Vᵀ,  Δ = rowsum(P ∘ dP),
#   dS = P ∘ (dP − Δ),  dQ += s·dS K,  dK = s·dSᵀ Q,  dV = Pᵀ dO_j.
# The dq kernel walks the (short) key list twice per query tile: first for Δ (the per-condition
# output O_j is not stored, so Δ = rowsum(dO_j ∘ O_j) is formed as rowsum(P ∘ dP)), then for dQ; it
# writes Δ for the dk/dv kernel, which walks all query tiles for one key tile.

@triton.jit
def _scores_tile(q, k, offs_m, offs_n, n_q, kv_len, mask_base, sm_n, sm_m, qk_scale,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled, masked scores of a [BLOCK_M, BLOCK_N] tile in log2 units."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    n_ok = offs_n < kv_len
    if HAS_MASK:
        tile_ok = (offs_m < n_q)[:, None] & n_ok[None, :]
        mptr = mask_base + offs_m[:, None].to(tl.int64) * sm_n + offs_n[None, :].to(tl.int64) * sm_m
        if MASK_BOOL:
            keep = tl.load(mptr, mask=tile_ok, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            s = s + tl.load(mptr, mask=tile_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(n_ok[None, :], s, float("-inf"))


@triton.jit
def _dual_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, glse_ptr, delta_ptr, dq_ptr, mask_ptr,
    n_q, heads, d_len, kv_len, qk_scale, softmax_scale, lam,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d, sdq_b, sdq_h, sdq_n, sdq_d, sm_b, sm_h, sm_n, sm_m,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n_q
    d_ok = offs_d < d_len
    tile_ok = row_ok[:, None] & d_ok[None, :]
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows * sq_n + offs_d[None, :] * sq_d, mask=tile_ok, other=0.0)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + rows * sdo_n + offs_d[None, :] * sdo_d, mask=tile_ok, other=0.0)
    do = (do.to(tl.float32) * lam).to(q.dtype)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * n_q + offs_m, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    dead = lse == float("-inf")
    lse = tl.where(dead, 0.0, lse)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    mask_base = mask_ptr + b * sm_b + h * sm_h

    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, kv_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < kv_len)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * sk_n + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * sv_n + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _scores_tile(q, k, offs_m, offs_n, n_q, kv_len, mask_base, sm_n, sm_m, qk_scale,
                         HAS_MASK, MASK_BOOL, PRECISION)
        p = tl.where(dead[:, None], 0.0, tl.exp2(s - lse[:, None]))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        delta += tl.sum(p * dp, 1)
    # A gradient flowing into the LSE output adds P ∘ g to dS: the same as lowering Δ by g.
    delta -= tl.load(glse_ptr + pid_bh.to(tl.int64) * n_q + offs_m, mask=row_ok, other=0.0)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * n_q + offs_m, delta, mask=row_ok)

    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start in range(0, kv_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < kv_len)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * sk_n + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * sv_n + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _scores_tile(q, k, offs_m, offs_n, n_q, kv_len, mask_base, sm_n, sm_m, qk_scale,
                         HAS_MASK, MASK_BOOL, PRECISION)
        p = tl.where(dead[:, None], 0.0, tl.exp2(s - lse[:, None]))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * softmax_scale
    dq_tile = dq_ptr + b * sdq_b + h * sdq_h + rows * sdq_n + offs_d[None, :] * sdq_d
    if ACCUMULATE:
        dq += tl.load(dq_tile, mask=tile_ok, other=0.0)
    tl.store(dq_tile, dq, mask=tile_ok)


@triton.jit
def _dual_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, mask_ptr,
    n_q, heads, d_len, kv_len, qk_scale, softmax_scale, lam,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d, sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d, sm_b, sm_h, sm_n, sm_m,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < d_len
    kv_mask = (offs_n < kv_len)[:, None] & d_ok[None, :]
    cols = offs_n[:, None].to(tl.int64)
    k = tl.load(k_ptr + b * sk_b + h * sk_h + cols * sk_n + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + cols * sv_n + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = q_ptr + b * sq_b + h * sq_h
    do_base = do_ptr + b * sdo_b + h * sdo_h
    mask_base = mask_ptr + b * sm_b + h * sm_h
    row_base = pid_bh.to(tl.int64) * n_q

    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for start in range(0, n_q, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_q
        tile_ok = row_ok[:, None] & d_ok[None, :]
        rows = offs_m[:, None].to(tl.int64)
        q = tl.load(q_base + rows * sq_n + offs_d[None, :] * sq_d, mask=tile_ok, other=0.0)
        do = tl.load(do_base + rows * sdo_n + offs_d[None, :] * sdo_d, mask=tile_ok, other=0.0)
        do = (do.to(tl.float32) * lam).to(k.dtype)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + offs_m, mask=row_ok, other=0.0)
        dead = lse == float("-inf")
        s = _scores_tile(q, k, offs_m, offs_n, n_q, kv_len, mask_base, sm_n, sm_m, qk_scale,
                         HAS_MASK, MASK_BOOL, PRECISION)
        p = tl.where(dead[:, None], 0.0, tl.exp2(s - tl.where(dead, 0.0, lse)[:, None]))
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * softmax_scale
    tl.store(dk_ptr + b * sdk_b + h * sdk_h + cols * sdk_n + offs_d[None, :] * sdk_d,
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b * sdv_b + h * sdv_h + cols * sdv_n + offs_d[None, :] * sdv_d,
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


def dual_cross_attention_backward_launch(grad_out: torch.Tensor, q: torch.Tensor, keys, values, scales, mask,
                                         softmax_scale: float, lse: torch.Tensor, grad_lse: torch.Tensor,
                                         dq: torch.Tensor, dks, dvs) -> None:
    """grad_out, q: [b h n d]; keys/values[j]: [b h mⱼ d]; mask: None or expanded [b h n m₀];
    lse, grad_lse: [conditions, b·h, n] float32 (the forward's LSE and its incoming gradient);
    dq: [b h n d] float32 (written);
    dks/dvs[j]: like keys/values[j] (written)."""
    batch, heads, n_q, d_len = q.shape
    d_pad = max(16, triton.next_power_of_2(d_len))
    block_m = 64 if d_pad <= 128 else 32
    num_warps = 4 if d_pad <= 64 else 8
    delta = torch.empty((batch * heads, n_q), dtype=torch.float32, device=q.device)
    sm = mask.stride() if mask is not None else (0, 0, 0, 0)
    common = dict(PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), D_PAD=d_pad, num_warps=num_warps)
    for j, (k, v, lam) in enumerate(zip(keys, values, scales)):
        masked = mask is not None and j == 0
        mask_arg = mask if masked else q
        mask_strides = sm if masked else (0, 0, 0, 0)
        block_n = _block_n(k.shape[2])
        flags = dict(HAS_MASK=masked, MASK_BOOL=masked and mask.dtype == torch.bool)
        _dual_bwd_dq_kernel[(triton.cdiv(n_q, block_m), batch * heads)](
            q, k, v, grad_out, lse[j], grad_lse[j], delta, dq, mask_arg,
            n_q, heads, d_len, k.shape[2], softmax_scale * LOG2E, softmax_scale, float(lam),
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *mask_strides,
            ACCUMULATE=j > 0, BLOCK_M=block_m, BLOCK_N=block_n, **flags, **common,
        )
        _dual_bwd_dkdv_kernel[(triton.cdiv(k.shape[2], block_n), batch * heads)](
            q, k, v, grad_out, lse[j], delta, dks[j], dvs[j], mask_arg,
            n_q, heads, d_len, k.shape[2], softmax_scale * LOG2E, softmax_scale, float(lam),
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dks[j].stride(), *dvs[j].stride(),
            *mask_strides,
            BLOCK_M=block_m, BLOCK_N=block_n, **flags, **common,
        )
