"""Triton kernels for dual-condition cross-attention and reference attention (specs/motionflow.md).

Forward, dual-condition: for each condition j, softmax(Q Kⱼᵀ s [+ mask]) Vⱼ, folded as λⱼ · acc / l
into one fp32 output tile; O is written once, plus each condition's log-sum-exp for the backward.
Up to MAX_CONDITIONS key/value sets go through one launch; more are chained with ACCUMULATE (the
next launch adds to O). The optional mask (additive float or keep-bool, broadcast through strides)
applies to the first condition. Two kernels:
* Short key lists (16-bit, heads up to 128 wide, at most RESIDENT_MAX_KEYS keys in every condition:
  text prompts of 77 tokens, 4-16 image tokens), `_dual_cross_attention_fwd_resident_kernel`: a
  program loads every condition's keys and values of its (batch, head) once and keeps them on chip
  (shared memory, as wgmma's B operand), then walks up to 8 consecutive 64-query tiles
  (`_tiles_per_program`). Each condition's keys are two power-of-two blocks (77 → 64 + 16) scored in
  one softmax pass, with no running rescale; the query-tile loop is software-pipelined, so the next
  tile's Q is in flight while this one's products and softmax run. Key/value reads from L2 drop
  (SD1.5 64×64, 8×40, 77 + 4 keys, batch 32: from ~106 MB, the 81 keys read again for every 128
  queries, to ~27 MB, once per 512).
* Otherwise (long key lists, 160- and 256-wide heads, fp32), `_dual_cross_attention_fwd_kernel`: a
  program owns BLOCK_M queries of one (batch, head), reads its Q tile once, then for each condition
  runs a flash-attention loop over that condition's key tiles with its own online-softmax state
  (running max m, sum l, accumulator).
The dual backward's dq follows the same split: `_dual_bwd_dq_resident_kernel` for short key lists
(keys resident, query tiles walked; each set's P and dP formed once per tile, Δ = rowsum(P ∘ dP)
from them), `_dual_bwd_dq_kernel` otherwise (a Δ walk over the key tiles, then the dq walk).

Forward, reference attention: the same loop with ONE softmax state running over two key/value
sources in turn (the feature map m, then the reference bank p), which is attention over the
concatenation [m; p] without building it. On Hopper (the caller passes tma=True) its 16-bit key/value
tiles come through TMA descriptors (`_reference_attention_fwd_tma_kernel`: bulk copies by the copy
engine, bounds zero-filled, no per-thread address math); otherwise cp.async. Its backward reuses the
dual kernels (Δ = rowsum(dO ∘ O) from `_row_dot_kernel`, both sources in one dq launch up to 64-wide
heads (`_dq_sets_per_launch`), a dk/dv launch per source).

Memory layout contract (what makes the tiles 128-bit and the K/V loads asynchronous on sm_90):
* HEAD_DIM is a compile-time constant, so the head-dim mask `offs_d < HEAD_DIM` is known to be
  constant over runs of 8 elements (all real head dims, 40/64/80/96/128/160/256, are multiples of 8).
  The 16-bit kernels, forward and backward, hold heads up to 128 wide as at most two power-of-two
  column chunks D_HI + D_LO, each ≥ 16 (the MMA's K minimum), so no product sees more than the next
  multiple of 16 (`_d_split`):
      40 → 32 + 16,  80 → 64 + 16,  96 → 64 + 32;  16, 32, 64, 128 → one chunk;
  a product over the head dim (Q·Kᵀ, dO·Vᵀ) is two dots into one tile, a product into it (P·V, dS·K,
  Pᵀ·dO, dSᵀ·Q) two accumulators. Wider heads (160 → 256), fp32, and the dk/dv kernel above 64-wide
  heads (`_dkdv_chunks`) use one register tile of the next power of two, except fp32 dk/dv from
  128-wide heads, which takes halves, and from 160-wide heads also reads Q, K, dO, V for S and dP
  32 columns at a time (`_dkdv_s_chunk`).
* Every [b h n d] operand has a unit head-dim stride, its other strides are multiples of 8 elements
  and its base is 16-byte aligned. The launcher checks this (`_aligned`) and passes strides divided
  by 8; the kernels multiply them back by 8 (`_rows`), so the compiler can prove that each 8-element
  row segment is 16-byte aligned. Operands that do not satisfy it get an aligned copy first.
* All offsets are int64 (`_rows`), so tensors past 2³¹ elements address correctly.
* Grids are 1-D: (b·h) × tiles folded on axis 0, whose limit is 2³¹ − 1 (axes 1 and 2 stop at 65,535).

fp32 inputs use IEEE fp32 dots (results match the reference to fp32 rounding) unless the caller
allows TF32 through `torch.backends.cuda.matmul.allow_tf32`. IEEE fp32 dots compile to FMA loops,
not tensor-core instructions, so fp32 takes 16–32-query tiles that ptxas fits without spilling
(sm_90, every launch of tests/gpu_compile_check.py, head dims 16 to 256).
"""
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

MAX_CONDITIONS = 4
LOG2E = 1.4426950408889634
ALIGN = 8   # elements: strides are passed divided by this (16 bytes at fp16/bf16)


@triton.jit
def _rows(idx, stride8):
    """int64 element offsets idx · stride for a stride passed as stride / 8 (see the module doc)."""
    return idx.to(tl.int64) * stride8 * 8


@triton.jit
def _tile_ptrs(base, rows, s_n8, offs_d):
    """Pointers of a [rows, D_PAD] tile of a row-major-in-d operand with row stride 8·s_n8."""
    return base + _rows(rows, s_n8)[:, None] + offs_d[None, :]


@triton.jit
def _program_ids(n_tiles):
    """(tile, (b·h) index) of this program on a 1-D grid of (b·h) × n_tiles programs; the tiles of one
    (b, h) are neighbours, so they share its keys/values in L2."""
    pid = tl.program_id(0)
    return pid % n_tiles, pid // n_tiles


@triton.jit
def _query_tile(n_q, heads, BLOCK_M: tl.constexpr):
    """This program's (b·h index, b, h as int64, its BLOCK_M query rows, which of them exist) on the
    1-D grid of (b·h) × query tiles."""
    pid_m, pid_bh = _program_ids(tl.cdiv(n_q, BLOCK_M))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_bh, (pid_bh // heads).to(tl.int64), (pid_bh % heads).to(tl.int64), offs_m, offs_m < n_q


@triton.jit
def _head_base(ptr, b, h, s_b8, s_h8):
    return ptr + _rows(b, s_b8) + _rows(h, s_h8)


@triton.jit
def _chunk_ptrs(base, rows, row_ok, s_n8, D0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Pointers and mask of head-dim columns D0 ≤ c < D0 + WIDTH of `rows` (zero past HEAD_DIM)."""
    offs_d = D0 + tl.arange(0, WIDTH)
    return _tile_ptrs(base, rows, s_n8, offs_d), row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]


@triton.jit
def _load_chunk(base, rows, row_ok, s_n8, D0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                UPCAST: tl.constexpr):
    """The [rows, WIDTH] chunk of columns from D0, widened to fp32 under UPCAST."""
    ptrs, mask = _chunk_ptrs(base, rows, row_ok, s_n8, D0, WIDTH, HEAD_DIM)
    t = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _load_q(base, rows, row_ok, s_n8, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_HI: tl.constexpr,
            D_LO: tl.constexpr, UPCAST: tl.constexpr):
    """(q_hi, q_lo): the Q tile as its two head-dim chunks; without a second chunk (D_LO = 0) q_lo is a
    placeholder that no instruction reads (the compiler drops it)."""
    q_hi = _load_chunk(base, rows, row_ok, s_n8, 0, D_HI, HEAD_DIM, UPCAST)
    if D_LO > 0:
        q_lo = _load_chunk(base, rows, row_ok, s_n8, D_HI, D_LO, HEAD_DIM, UPCAST)
    else:
        q_lo = tl.zeros([BLOCK_M, 16], dtype=q_hi.dtype)
    return q_hi, q_lo


@triton.jit
def _add_chunks(base, rows, row_ok, s_n8, o_hi, o_lo, HEAD_DIM: tl.constexpr, D_HI: tl.constexpr,
                D_LO: tl.constexpr):
    """(o_hi, o_lo) plus the tile stored at `base` (read as fp32)."""
    ptrs, mask = _chunk_ptrs(base, rows, row_ok, s_n8, 0, D_HI, HEAD_DIM)
    o_hi += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if D_LO > 0:
        ptrs, mask = _chunk_ptrs(base, rows, row_ok, s_n8, D_HI, D_LO, HEAD_DIM)
        o_lo += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return o_hi, o_lo


@triton.jit
def _store_chunks(base, rows, row_ok, s_n8, o_hi, o_lo, HEAD_DIM: tl.constexpr, D_HI: tl.constexpr,
                  D_LO: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Write (or with ACCUMULATE add to what is there) the output tile given as its two chunks."""
    if ACCUMULATE:
        o_hi, o_lo = _add_chunks(base, rows, row_ok, s_n8, o_hi, o_lo, HEAD_DIM, D_HI, D_LO)
    ptrs, mask = _chunk_ptrs(base, rows, row_ok, s_n8, 0, D_HI, HEAD_DIM)
    tl.store(ptrs, o_hi.to(base.dtype.element_ty), mask=mask)
    if D_LO > 0:
        ptrs, mask = _chunk_ptrs(base, rows, row_ok, s_n8, D_HI, D_LO, HEAD_DIM)
        tl.store(ptrs, o_lo.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _online_softmax_pass(q_hi, q_lo, acc_hi, acc_lo, m_i, l_i, k_base, v_base, kv_len, sk_n8, sv_n8,
                         mask_base, sm_n, sm_m, offs_m, n_q, qk_scale,
                         HEAD_DIM: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr,
                         HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                         BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold the keys/values at k_base/v_base (kv_len of them) into one online-softmax state, the head
    dim in chunks D_HI (+ D_LO). Scores are kept in log2 units (scaled by qk_scale = s·log2 e) so exp2
    can be used."""
    for start in range(0, kv_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_len
        k_hi = _load_chunk(k_base, offs_n, n_ok, sk_n8, 0, D_HI, HEAD_DIM, UPCAST)
        v_hi = _load_chunk(v_base, offs_n, n_ok, sv_n8, 0, D_HI, HEAD_DIM, UPCAST)
        s = tl.dot(q_hi, tl.trans(k_hi), input_precision=PRECISION)
        if D_LO > 0:
            k_lo = _load_chunk(k_base, offs_n, n_ok, sk_n8, D_HI, D_LO, HEAD_DIM, UPCAST)
            v_lo = _load_chunk(v_base, offs_n, n_ok, sv_n8, D_HI, D_LO, HEAD_DIM, UPCAST)
            s = tl.dot(q_lo, tl.trans(k_lo), s, input_precision=PRECISION)
        else:
            v_lo = v_hi  # (no second chunk: never read)
        s = _mask_scores(s * qk_scale, offs_m, offs_n, n_q, kv_len, mask_base, sm_n, sm_m, HAS_MASK, MASK_BOOL)
        acc_hi, acc_lo, m_i, l_i = _softmax_update(s, acc_hi, acc_lo, m_i, l_i, v_hi, v_lo, D_LO, PRECISION)
    return acc_hi, acc_lo, m_i, l_i


@triton.jit
def _softmax_probs(s, m_i, l_i):
    """The softmax half of an online-softmax step: scores s (log2 units, masked) against the running
    max m_i and sum l_i. Returns (p, alpha, m_new, l_new): the tile's unnormalised probabilities and
    the factor that rescales what was accumulated before it."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with every key masked so far keep m = -inf; shift by 0 there so no inf - inf appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _accumulate_pv(acc_hi, acc_lo, alpha, p, v_hi, v_lo, D_LO: tl.constexpr, PRECISION: tl.constexpr):
    """acc ← acc·alpha + P V, in head-dim chunks."""
    acc_hi = acc_hi * alpha[:, None] + tl.dot(p.to(v_hi.dtype), v_hi, input_precision=PRECISION)
    if D_LO > 0:
        acc_lo = acc_lo * alpha[:, None] + tl.dot(p.to(v_lo.dtype), v_lo, input_precision=PRECISION)
    return acc_hi, acc_lo


@triton.jit
def _softmax_update(s, acc_hi, acc_lo, m_i, l_i, v_hi, v_lo, D_LO: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile's step of the online softmax: scores s (log2 units, masked), values in chunks."""
    p, alpha, m_new, l_i = _softmax_probs(s, m_i, l_i)
    acc_hi, acc_lo = _accumulate_pv(acc_hi, acc_lo, alpha, p, v_hi, v_lo, D_LO, PRECISION)
    return acc_hi, acc_lo, m_new, l_i


@triton.jit
def _desc_tile(desc, b, start, h, d0, ROWS: tl.constexpr, WIDTH: tl.constexpr, UPCAST: tl.constexpr):
    """[ROWS, WIDTH] rows start.. of head h, columns d0.. of a [b, n, h, d] tensor through its TMA
    descriptor (box [1, ROWS, 1, WIDTH]); rows past n and columns past d arrive as zeros."""
    t = tl.reshape(desc.load([b, start, h, d0]), (ROWS, WIDTH))
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _online_softmax_pass_tma(q_hi, q_lo, acc_hi, acc_lo, m_i, l_i, k_hi_desc, k_lo_desc, v_hi_desc, v_lo_desc,
                             b, h, kv_len, offs_m, n_q, qk_scale, D_HI: tl.constexpr, D_LO: tl.constexpr,
                             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                             LAG_PV: tl.constexpr):
    """_online_softmax_pass with K/V tiles brought in by TMA (bulk asynchronous copies into shared
    memory, bounds handled by the copy engine) instead of per-thread cp.async; with LAG_PV, the P V
    product one tile behind the scores (_online_softmax_pass_tma_lagged)."""
    if LAG_PV:
        acc_hi, acc_lo, m_i, l_i = _online_softmax_pass_tma_lagged(
            q_hi, q_lo, acc_hi, acc_lo, m_i, l_i, k_hi_desc, k_lo_desc, v_hi_desc, v_lo_desc, b, h, kv_len,
            offs_m, n_q, qk_scale, D_HI, D_LO, BLOCK_N, PRECISION, UPCAST)
    else:
        for start in range(0, kv_len, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k_hi = _desc_tile(k_hi_desc, b, start, h, 0, BLOCK_N, D_HI, UPCAST)
            v_hi = _desc_tile(v_hi_desc, b, start, h, 0, BLOCK_N, D_HI, UPCAST)
            s = tl.dot(q_hi, tl.trans(k_hi), input_precision=PRECISION)
            if D_LO > 0:
                k_lo = _desc_tile(k_lo_desc, b, start, h, D_HI, BLOCK_N, D_LO, UPCAST)
                v_lo = _desc_tile(v_lo_desc, b, start, h, D_HI, BLOCK_N, D_LO, UPCAST)
                s = tl.dot(q_lo, tl.trans(k_lo), s, input_precision=PRECISION)
            else:
                v_lo = v_hi  # (no second chunk: never read)
            s = _mask_scores(s * qk_scale, offs_m, offs_n, n_q, kv_len, offs_m, 0, 0, False, False)  # (no mask)
            acc_hi, acc_lo, m_i, l_i = _softmax_update(s, acc_hi, acc_lo, m_i, l_i, v_hi, v_lo, D_LO, PRECISION)
    return acc_hi, acc_lo, m_i, l_i


@triton.jit
def _tma_scores(q_hi, q_lo, k_hi_desc, k_lo_desc, b, h, start, kv_len, offs_m, n_q, qk_scale,
                D_HI: tl.constexpr, D_LO: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    """Scores of the key tile at `start` (log2 units; keys past kv_len masked), K through TMA."""
    k_hi = _desc_tile(k_hi_desc, b, start, h, 0, BLOCK_N, D_HI, UPCAST)
    s = tl.dot(q_hi, tl.trans(k_hi), input_precision=PRECISION)
    if D_LO > 0:
        k_lo = _desc_tile(k_lo_desc, b, start, h, D_HI, BLOCK_N, D_LO, UPCAST)
        s = tl.dot(q_lo, tl.trans(k_lo), s, input_precision=PRECISION)
    offs_n = start + tl.arange(0, BLOCK_N)
    return _mask_scores(s * qk_scale, offs_m, offs_n, n_q, kv_len, offs_m, 0, 0, False, False)  # (no mask)


@triton.jit
def _tma_accumulate(acc_hi, acc_lo, alpha, p, v_hi_desc, v_lo_desc, b, h, start, D_HI: tl.constexpr,
                    D_LO: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc ← acc·alpha + P V for the value tile at `start`, V through TMA."""
    v_hi = _desc_tile(v_hi_desc, b, start, h, 0, BLOCK_N, D_HI, UPCAST)
    v_lo = _desc_tile(v_lo_desc, b, start, h, D_HI, BLOCK_N, D_LO, UPCAST) if D_LO > 0 else v_hi
    return _accumulate_pv(acc_hi, acc_lo, alpha, p, v_hi, v_lo, D_LO, PRECISION)


@triton.jit
def _online_softmax_pass_tma_lagged(q_hi, q_lo, acc_hi, acc_lo, m_i, l_i, k_hi_desc, k_lo_desc, v_hi_desc,
                                    v_lo_desc, b, h, kv_len, offs_m, n_q, qk_scale, D_HI: tl.constexpr,
                                    D_LO: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                                    UPCAST: tl.constexpr):
    """_online_softmax_pass_tma with the P V product one tile behind (FlashAttention-3's
    intra-warpgroup overlap): step j issues S_j = Q K_jᵀ, then acc ← acc·α_{j-1} + P_{j-1} V_{j-1},
    then runs the softmax of S_j (exp2, row max and sum) while that P V product is still on the
    tensor cores. The state between steps is (acc without tile j-1, P_{j-1}, α_{j-1}, m, l); the last
    tile's P V is added after the loop. Each K and V tile is still loaded once."""
    if kv_len > 0:
        s = _tma_scores(q_hi, q_lo, k_hi_desc, k_lo_desc, b, h, 0, kv_len, offs_m, n_q, qk_scale,
                        D_HI, D_LO, BLOCK_N, PRECISION, UPCAST)
        p, alpha, m_i, l_i = _softmax_probs(s, m_i, l_i)
        p = p.to(k_hi_desc.dtype)
        for start in range(BLOCK_N, kv_len, BLOCK_N):
            s = _tma_scores(q_hi, q_lo, k_hi_desc, k_lo_desc, b, h, start, kv_len, offs_m, n_q, qk_scale,
                            D_HI, D_LO, BLOCK_N, PRECISION, UPCAST)
            acc_hi, acc_lo = _tma_accumulate(acc_hi, acc_lo, alpha, p, v_hi_desc, v_lo_desc, b, h,
                                             start - BLOCK_N, D_HI, D_LO, BLOCK_N, PRECISION, UPCAST)
            p, alpha, m_i, l_i = _softmax_probs(s, m_i, l_i)
            p = p.to(k_hi_desc.dtype)
        last = (kv_len - 1) // BLOCK_N * BLOCK_N
        acc_hi, acc_lo = _tma_accumulate(acc_hi, acc_lo, alpha, p, v_hi_desc, v_lo_desc, b, h, last,
                                         D_HI, D_LO, BLOCK_N, PRECISION, UPCAST)
    return acc_hi, acc_lo, m_i, l_i


@triton.jit
def _condition(q_hi, q_lo, offs_m, n_q, qk_scale, b, h,
               k_ptr, v_ptr, kv_len, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8,
               mask_ptr, sm_b, sm_h, sm_n, sm_m, lse_ptr,
               HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """softmax(q kᵀ s + mask) v for one condition, as fp32 chunks (hi, lo); stores the row log-sum-exp."""
    acc_hi = tl.zeros([BLOCK_M, D_HI], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M, D_LO if D_LO > 0 else 16], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_hi, acc_lo, m_i, l_i = _online_softmax_pass(
        q_hi, q_lo, acc_hi, acc_lo, m_i, l_i,
        _head_base(k_ptr, b, h, sk_b8, sk_h8), _head_base(v_ptr, b, h, sv_b8, sv_h8),
        kv_len, sk_n8, sv_n8, mask_ptr + b * sm_b + h * sm_h, sm_n, sm_m, offs_m, n_q, qk_scale,
        HEAD_DIM, D_HI, D_LO, HAS_MASK, MASK_BOOL, BLOCK_N, PRECISION, UPCAST)
    # Natural-log LSE of the scaled (and masked) scores; -inf marks a fully masked row.
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + offs_m, lse, mask=offs_m < n_q)
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    return acc_hi * inv_l[:, None], acc_lo * inv_l[:, None]


@triton.jit
def _dual_cross_attention_fwd_kernel(
    q_ptr, o_ptr, lse_ptr, mask_ptr,
    k0, v0, k1, v1, k2, v2, k3, v3,
    n_q, heads, qk_scale,
    sq_b8, sq_h8, sq_n8,
    so_b8, so_h8, so_n8,
    sm_b, sm_h, sm_n, sm_m,
    len0, len1, len2, len3,
    lam0, lam1, lam2, lam3,
    sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8,
    sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8,
    sk2_b8, sk2_h8, sk2_n8, sv2_b8, sv2_h8, sv2_n8,
    sk3_b8, sk3_h8, sk3_n8, sv3_b8, sv3_h8, sv3_n8,
    HEAD_DIM: tl.constexpr,
    NUM_COND: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N0: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
    BLOCK_N3: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_bh, b, h, offs_m, row_ok = _query_tile(n_q, heads, BLOCK_M)
    q_hi, q_lo = _load_q(_head_base(q_ptr, b, h, sq_b8, sq_h8), offs_m, row_ok, sq_n8, BLOCK_M, HEAD_DIM, D_HI,
                         D_LO, UPCAST)
    lse_stride = (tl.num_programs(0) // tl.cdiv(n_q, BLOCK_M)).to(tl.int64) * n_q    # lse: [conditions, b·h, n]
    lse_row = lse_ptr + pid_bh.to(tl.int64) * n_q

    o_hi, o_lo = _condition(q_hi, q_lo, offs_m, n_q, qk_scale, b, h,
                            k0, v0, len0, sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8,
                            mask_ptr, sm_b, sm_h, sm_n, sm_m, lse_row,
                            HEAD_DIM, HAS_MASK, MASK_BOOL, BLOCK_M, BLOCK_N0, D_HI, D_LO, PRECISION, UPCAST)
    o_hi, o_lo = lam0 * o_hi, lam0 * o_lo
    if NUM_COND >= 2:
        c_hi, c_lo = _condition(q_hi, q_lo, offs_m, n_q, qk_scale, b, h,
                                 k1, v1, len1, sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8,
                                 mask_ptr, 0, 0, 0, 0, lse_row + lse_stride,
                                HEAD_DIM, False, False, BLOCK_M, BLOCK_N1, D_HI, D_LO, PRECISION, UPCAST)
        o_hi, o_lo = o_hi + lam1 * c_hi, o_lo + lam1 * c_lo
    if NUM_COND >= 3:
        c_hi, c_lo = _condition(q_hi, q_lo, offs_m, n_q, qk_scale, b, h,
                                 k2, v2, len2, sk2_b8, sk2_h8, sk2_n8, sv2_b8, sv2_h8, sv2_n8,
                                 mask_ptr, 0, 0, 0, 0, lse_row + 2 * lse_stride,
                                HEAD_DIM, False, False, BLOCK_M, BLOCK_N2, D_HI, D_LO, PRECISION, UPCAST)
        o_hi, o_lo = o_hi + lam2 * c_hi, o_lo + lam2 * c_lo
    if NUM_COND >= 4:
        c_hi, c_lo = _condition(q_hi, q_lo, offs_m, n_q, qk_scale, b, h,
                                 k3, v3, len3, sk3_b8, sk3_h8, sk3_n8, sv3_b8, sv3_h8, sv3_n8,
                                 mask_ptr, 0, 0, 0, 0, lse_row + 3 * lse_stride,
                                HEAD_DIM, False, False, BLOCK_M, BLOCK_N3, D_HI, D_LO, PRECISION, UPCAST)
        o_hi, o_lo = o_hi + lam3 * c_hi, o_lo + lam3 * c_lo

    _store_chunks(_head_base(o_ptr, b, h, so_b8, so_h8), offs_m, row_ok, so_n8, o_hi, o_lo, HEAD_DIM, D_HI, D_LO,
                  ACCUMULATE)


@triton.jit
def _resident_kv(k_ptr, v_ptr, b, h, kv_len, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8, HEAD_DIM: tl.constexpr,
                 KEYS_A: tl.constexpr, KEYS_B: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr,
                 UPCAST: tl.constexpr):
    """All kv_len ≤ KEYS_A + KEYS_B keys and values of one condition of head (b, h), as two key blocks
    (keys [0, KEYS_A) and [KEYS_A, KEYS_A + KEYS_B); KEYS_B = 0: one block) of head-dim chunks:
    (ka_hi, ka_lo, va_hi, va_lo, kb_hi, kb_lo, vb_hi, vb_lo). Rows past kv_len are zero; without a
    second chunk or block the placeholders are never read."""
    k_base, v_base = _head_base(k_ptr, b, h, sk_b8, sk_h8), _head_base(v_ptr, b, h, sv_b8, sv_h8)
    ka_hi, ka_lo, va_hi, va_lo = _key_block(k_base, v_base, 0, kv_len, sk_n8, sv_n8, HEAD_DIM, KEYS_A, D_HI, D_LO,
                                            UPCAST)
    if KEYS_B > 0:
        kb_hi, kb_lo, vb_hi, vb_lo = _key_block(k_base, v_base, KEYS_A, kv_len, sk_n8, sv_n8, HEAD_DIM, KEYS_B, D_HI,
                                                D_LO, UPCAST)
    else:
        kb_hi, kb_lo, vb_hi, vb_lo = ka_hi, ka_lo, va_hi, va_lo
    return ka_hi, ka_lo, va_hi, va_lo, kb_hi, kb_lo, vb_hi, vb_lo


@triton.jit
def _resident_program(n_q, heads, tiles_per_program, BLOCK_M: tl.constexpr):
    """(b·h index, b, h as int64, first and end query tile, programs per head) of a resident-keys
    program: a 1-D grid of (b·h) × ⌈tiles / tiles_per_program⌉ programs, each walking up to
    tiles_per_program consecutive query tiles of its head."""
    n_tiles = tl.cdiv(n_q, BLOCK_M)
    splits = tl.cdiv(n_tiles, tiles_per_program)
    pid = tl.program_id(0)
    pid_bh = pid // splits
    first = (pid % splits) * tiles_per_program
    last = tl.minimum(first + tiles_per_program, n_tiles)
    return pid_bh, (pid_bh // heads).to(tl.int64), (pid_bh % heads).to(tl.int64), first, last, splits


@triton.jit
def _resident_sets(b, h, k0, v0, k1, v1, k2, v2, k3, v3, len0, len1, len2, len3,
                   sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8, sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8,
                   sk2_b8, sk2_h8, sk2_n8, sv2_b8, sv2_h8, sv2_n8, sk3_b8, sk3_h8, sk3_n8, sv3_b8, sv3_h8, sv3_n8,
                   HEAD_DIM: tl.constexpr, NUM_COND: tl.constexpr, KEYS0_A: tl.constexpr, KEYS0_B: tl.constexpr,
                   KEYS1_A: tl.constexpr, KEYS1_B: tl.constexpr, KEYS2_A: tl.constexpr, KEYS2_B: tl.constexpr,
                   KEYS3_A: tl.constexpr, KEYS3_B: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr,
                   UPCAST: tl.constexpr):
    """The resident keys/values (_resident_kv) of the launch's NUM_COND sets; unused slots repeat set
    0's (never read: NUM_COND keeps them out of the code)."""
    kv0 = _resident_kv(k0, v0, b, h, len0, sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8, HEAD_DIM, KEYS0_A, KEYS0_B,
                       D_HI, D_LO, UPCAST)
    kv1, kv2, kv3 = kv0, kv0, kv0
    if NUM_COND >= 2:
        kv1 = _resident_kv(k1, v1, b, h, len1, sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8, HEAD_DIM, KEYS1_A,
                           KEYS1_B, D_HI, D_LO, UPCAST)
    if NUM_COND >= 3:
        kv2 = _resident_kv(k2, v2, b, h, len2, sk2_b8, sk2_h8, sk2_n8, sv2_b8, sv2_h8, sv2_n8, HEAD_DIM, KEYS2_A,
                           KEYS2_B, D_HI, D_LO, UPCAST)
    if NUM_COND >= 4:
        kv3 = _resident_kv(k3, v3, b, h, len3, sk3_b8, sk3_h8, sk3_n8, sv3_b8, sv3_h8, sv3_n8, HEAD_DIM, KEYS3_A,
                           KEYS3_B, D_HI, D_LO, UPCAST)
    return kv0, kv1, kv2, kv3


@triton.jit
def _key_block(k_base, v_base, start, kv_len, sk_n8, sv_n8, HEAD_DIM: tl.constexpr, KEYS: tl.constexpr,
               D_HI: tl.constexpr, D_LO: tl.constexpr, UPCAST: tl.constexpr):
    """Keys/values start .. start + KEYS (zero past kv_len) as head-dim chunks (k_hi, k_lo, v_hi, v_lo)."""
    offs_n = start + tl.arange(0, KEYS)
    n_ok = offs_n < kv_len
    k_hi = _load_chunk(k_base, offs_n, n_ok, sk_n8, 0, D_HI, HEAD_DIM, UPCAST)
    v_hi = _load_chunk(v_base, offs_n, n_ok, sv_n8, 0, D_HI, HEAD_DIM, UPCAST)
    if D_LO > 0:
        k_lo = _load_chunk(k_base, offs_n, n_ok, sk_n8, D_HI, D_LO, HEAD_DIM, UPCAST)
        v_lo = _load_chunk(v_base, offs_n, n_ok, sv_n8, D_HI, D_LO, HEAD_DIM, UPCAST)
    else:
        k_lo, v_lo = k_hi, v_hi
    return k_hi, k_lo, v_hi, v_lo


@triton.jit
def _block_scores(q_hi, q_lo, k_hi, k_lo, start, kv_len, offs_m, n_q, qk_scale, mask_base, sm_n, sm_m,
                  HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, KEYS: tl.constexpr, D_LO: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Scaled, masked scores (log2 units) of a query tile against the key block at `start`."""
    s = tl.dot(q_hi, tl.trans(k_hi), input_precision=PRECISION)
    if D_LO > 0:
        s = tl.dot(q_lo, tl.trans(k_lo), s, input_precision=PRECISION)
    return _mask_scores(s * qk_scale, offs_m, start + tl.arange(0, KEYS), n_q, kv_len, mask_base, sm_n, sm_m,
                        HAS_MASK, MASK_BOOL)


@triton.jit
def _resident_condition(q_hi, q_lo, kv, kv_len, offs_m, n_q, qk_scale, mask_base, sm_n, sm_m, lse_ptr,
                        HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, KEYS_A: tl.constexpr, KEYS_B: tl.constexpr,
                        D_LO: tl.constexpr, PRECISION: tl.constexpr):
    """softmax(q kᵀ s + mask) v of one query tile against one condition's resident keys `kv` (from
    _resident_kv): one softmax pass over both key blocks (a shared row max, no running rescale), as
    fp32 chunks (o_hi, o_lo); stores the row log-sum-exp (natural log, -inf for a fully masked row)
    as _condition does."""
    ka_hi, ka_lo, va_hi, va_lo, kb_hi, kb_lo, vb_hi, vb_lo = kv
    sa = _block_scores(q_hi, q_lo, ka_hi, ka_lo, 0, kv_len, offs_m, n_q, qk_scale, mask_base, sm_n, sm_m,
                       HAS_MASK, MASK_BOOL, KEYS_A, D_LO, PRECISION)
    m = tl.max(sa, 1)
    if KEYS_B > 0:
        sb = _block_scores(q_hi, q_lo, kb_hi, kb_lo, KEYS_A, kv_len, offs_m, n_q, qk_scale, mask_base, sm_n, sm_m,
                           HAS_MASK, MASK_BOOL, KEYS_B, D_LO, PRECISION)
        m = tl.maximum(m, tl.max(sb, 1))
    m = tl.where(m == float("-inf"), 0.0, m)   # a fully masked row: no inf - inf
    pa = tl.exp2(sa - m[:, None])
    l = tl.sum(pa, 1)
    o_hi = tl.dot(pa.to(va_hi.dtype), va_hi, input_precision=PRECISION)
    if D_LO > 0:
        o_lo = tl.dot(pa.to(va_lo.dtype), va_lo, input_precision=PRECISION)
    else:
        o_lo = tl.zeros([o_hi.shape[0], 16], dtype=tl.float32)
    if KEYS_B > 0:
        pb = tl.exp2(sb - m[:, None])
        l += tl.sum(pb, 1)
        o_hi = tl.dot(pb.to(vb_hi.dtype), vb_hi, o_hi, input_precision=PRECISION)
        if D_LO > 0:
            o_lo = tl.dot(pb.to(vb_lo.dtype), vb_lo, o_lo, input_precision=PRECISION)
    lse = tl.where(l > 0, (m + tl.log2(tl.where(l > 0, l, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + offs_m, lse, mask=offs_m < n_q)
    inv_l = 1.0 / tl.where(l > 0, l, 1.0)
    return o_hi * inv_l[:, None], o_lo * inv_l[:, None]


@triton.jit
def _dual_cross_attention_fwd_resident_kernel(
    q_ptr, o_ptr, lse_ptr, mask_ptr,
    k0, v0, k1, v1, k2, v2, k3, v3,
    n_q, heads, qk_scale, tiles_per_program,
    sq_b8, sq_h8, sq_n8,
    so_b8, so_h8, so_n8,
    sm_b, sm_h, sm_n, sm_m,
    len0, len1, len2, len3,
    lam0, lam1, lam2, lam3,
    sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8,
    sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8,
    sk2_b8, sk2_h8, sk2_n8, sv2_b8, sv2_h8, sv2_n8,
    sk3_b8, sk3_h8, sk3_n8, sv3_b8, sv3_h8, sv3_n8,
    HEAD_DIM: tl.constexpr,
    NUM_COND: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, KEYS0_A: tl.constexpr, KEYS0_B: tl.constexpr, KEYS1_A: tl.constexpr,
    KEYS1_B: tl.constexpr, KEYS2_A: tl.constexpr, KEYS2_B: tl.constexpr, KEYS3_A: tl.constexpr,
    KEYS3_B: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """_dual_cross_attention_fwd_kernel for short key lists (each condition's keys fit on chip, at most
    RESIDENT_MAX_KEYS: text prompts, image tokens): the program loads every condition's keys and values
    of its head once, keeps them on chip, and walks `tiles_per_program` consecutive query tiles of
    that head. Condition j's keys are two blocks, KEYSj_A (a power of two) + KEYSj_B (a power of two
    or 0), so few padded columns are scored (77 text keys: 64 + 16). A query tile is one softmax pass
    per condition over both blocks (no running max or rescale), and the loop over query tiles is what the compiler software-pipelines: the next tile's
    Q (and mask) loads are in flight while this tile's products and softmax run. Same arguments,
    outputs and lse as _dual_cross_attention_fwd_kernel."""
    pid_bh, b, h, first, last, splits = _resident_program(n_q, heads, tiles_per_program, BLOCK_M)
    lse_stride = (tl.num_programs(0) // splits).to(tl.int64) * n_q    # lse: [conditions, b·h, n]
    lse_row = lse_ptr + pid_bh.to(tl.int64) * n_q
    q_base = _head_base(q_ptr, b, h, sq_b8, sq_h8)
    o_base = _head_base(o_ptr, b, h, so_b8, so_h8)
    mask_base = mask_ptr + b * sm_b + h * sm_h

    kv0, kv1, kv2, kv3 = _resident_sets(
        b, h, k0, v0, k1, v1, k2, v2, k3, v3, len0, len1, len2, len3,
        sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8, sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8,
        sk2_b8, sk2_h8, sk2_n8, sv2_b8, sv2_h8, sv2_n8, sk3_b8, sk3_h8, sk3_n8, sv3_b8, sv3_h8, sv3_n8,
        HEAD_DIM, NUM_COND, KEYS0_A, KEYS0_B, KEYS1_A, KEYS1_B, KEYS2_A, KEYS2_B, KEYS3_A, KEYS3_B, D_HI, D_LO, UPCAST)
    for tile in range(first, last):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_q
        q_hi, q_lo = _load_q(q_base, offs_m, row_ok, sq_n8, BLOCK_M, HEAD_DIM, D_HI, D_LO, UPCAST)
        c_hi, c_lo = _resident_condition(q_hi, q_lo, kv0, len0, offs_m, n_q, qk_scale, mask_base, sm_n, sm_m,
                                         lse_row, HAS_MASK, MASK_BOOL, KEYS0_A, KEYS0_B, D_LO, PRECISION)
        o_hi, o_lo = lam0 * c_hi, lam0 * c_lo
        if NUM_COND >= 2:
            c_hi, c_lo = _resident_condition(q_hi, q_lo, kv1, len1, offs_m, n_q, qk_scale, mask_base, 0, 0,
                                             lse_row + lse_stride, False, False, KEYS1_A, KEYS1_B, D_LO, PRECISION)
            o_hi, o_lo = o_hi + lam1 * c_hi, o_lo + lam1 * c_lo
        if NUM_COND >= 3:
            c_hi, c_lo = _resident_condition(q_hi, q_lo, kv2, len2, offs_m, n_q, qk_scale, mask_base, 0, 0,
                                             lse_row + 2 * lse_stride, False, False, KEYS2_A, KEYS2_B, D_LO, PRECISION)
            o_hi, o_lo = o_hi + lam2 * c_hi, o_lo + lam2 * c_lo
        if NUM_COND >= 4:
            c_hi, c_lo = _resident_condition(q_hi, q_lo, kv3, len3, offs_m, n_q, qk_scale, mask_base, 0, 0,
                                             lse_row + 3 * lse_stride, False, False, KEYS3_A, KEYS3_B, D_LO, PRECISION)
            o_hi, o_lo = o_hi + lam3 * c_hi, o_lo + lam3 * c_lo
        _store_chunks(o_base, offs_m, row_ok, so_n8, o_hi, o_lo, HEAD_DIM, D_HI, D_LO, ACCUMULATE)


@triton.jit
def _reference_attention_fwd_kernel(
    q_ptr, o_ptr, lse_ptr, k0, v0, k1, v1,
    n_q, heads, qk_scale, len0, len1,
    sq_b8, sq_h8, sq_n8,
    so_b8, so_h8, so_n8,
    sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8,
    sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_HI: tl.constexpr,
    D_LO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh, b, h, offs_m, row_ok = _query_tile(n_q, heads, BLOCK_M)
    q_hi, q_lo = _load_q(_head_base(q_ptr, b, h, sq_b8, sq_h8), offs_m, row_ok, sq_n8, BLOCK_M, HEAD_DIM, D_HI,
                         D_LO, UPCAST)
    acc_hi = tl.zeros([BLOCK_M, D_HI], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M, D_LO if D_LO > 0 else 16], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # One softmax state over both sources: the keys of m, then those of the reference bank p.
    acc_hi, acc_lo, m_i, l_i = _online_softmax_pass(
        q_hi, q_lo, acc_hi, acc_lo, m_i, l_i, _head_base(k0, b, h, sk0_b8, sk0_h8),
        _head_base(v0, b, h, sv0_b8, sv0_h8), len0, sk0_n8, sv0_n8, q_ptr, 0, 0, offs_m, n_q, qk_scale,
        HEAD_DIM, D_HI, D_LO, False, False, BLOCK_N, PRECISION, UPCAST)
    acc_hi, acc_lo, m_i, l_i = _online_softmax_pass(
        q_hi, q_lo, acc_hi, acc_lo, m_i, l_i, _head_base(k1, b, h, sk1_b8, sk1_h8),
        _head_base(v1, b, h, sv1_b8, sv1_h8), len1, sk1_n8, sv1_n8, q_ptr, 0, 0, offs_m, n_q, qk_scale,
        HEAD_DIM, D_HI, D_LO, False, False, BLOCK_N, PRECISION, UPCAST)
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634
    tl.store(lse_ptr + pid_bh.to(tl.int64) * n_q + offs_m, lse, mask=row_ok)
    inv_l = 1.0 / l_i
    _store_chunks(_head_base(o_ptr, b, h, so_b8, so_h8), offs_m, row_ok, so_n8, acc_hi * inv_l[:, None],
                  acc_lo * inv_l[:, None], HEAD_DIM, D_HI, D_LO, False)


@triton.jit
def _reference_attention_fwd_tma_kernel(
    q_ptr, o_ptr, lse_ptr, k0_hi, k0_lo, v0_hi, v0_lo, k1_hi, k1_lo, v1_hi, v1_lo,
    n_q, heads, qk_scale, len0, len1,
    sq_b8, sq_h8, sq_n8,
    so_b8, so_h8, so_n8,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_HI: tl.constexpr,
    D_LO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, LAG_PV: tl.constexpr,
):
    """_reference_attention_fwd_kernel with the K/V tiles of both sources through TMA descriptors
    (Hopper, 16-bit): k0_hi.. are [b, n, h, d] descriptors with boxes [1, BLOCK_N, 1, D_HI | D_LO].
    LAG_PV: the P V product one key tile behind the scores, so that each tile's softmax runs while the
    previous tile's P V is on the tensor cores (_online_softmax_pass_tma_lagged)."""
    pid_m, pid_bh = _program_ids(tl.cdiv(n_q, BLOCK_M))
    b = pid_bh // heads
    h = pid_bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_q
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    q_hi, q_lo = _load_q(_head_base(q_ptr, b64, h64, sq_b8, sq_h8), offs_m, row_ok, sq_n8, BLOCK_M, HEAD_DIM, D_HI,
                         D_LO, UPCAST)
    acc_hi = tl.zeros([BLOCK_M, D_HI], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M, D_LO if D_LO > 0 else 16], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_hi, acc_lo, m_i, l_i = _online_softmax_pass_tma(
        q_hi, q_lo, acc_hi, acc_lo, m_i, l_i, k0_hi, k0_lo, v0_hi, v0_lo, b, h, len0, offs_m, n_q, qk_scale,
        D_HI, D_LO, BLOCK_N, PRECISION, UPCAST, LAG_PV)
    acc_hi, acc_lo, m_i, l_i = _online_softmax_pass_tma(
        q_hi, q_lo, acc_hi, acc_lo, m_i, l_i, k1_hi, k1_lo, v1_hi, v1_lo, b, h, len1, offs_m, n_q, qk_scale,
        D_HI, D_LO, BLOCK_N, PRECISION, UPCAST, LAG_PV)
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634
    tl.store(lse_ptr + pid_bh.to(tl.int64) * n_q + offs_m, lse, mask=row_ok)
    inv_l = 1.0 / l_i
    _store_chunks(_head_base(o_ptr, b64, h64, so_b8, so_h8), offs_m, row_ok, so_n8, acc_hi * inv_l[:, None],
                  acc_lo * inv_l[:, None], HEAD_DIM, D_HI, D_LO, False)


# ---------------------------------------------------------------------------------------------
# Host side: alignment, tiles, launches.

def _is_aligned(t: torch.Tensor) -> bool:
    """The kernels' layout contract for a [.., d] operand: unit head-dim stride, every other stride
    (of a dimension longer than 1) a multiple of ALIGN elements, base address 16-byte aligned."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    if t.data_ptr() % 16:
        return False
    return all(s % ALIGN == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def _aligned_empty(shape, dtype, device) -> torch.Tensor:
    """An uninitialised tensor of `shape` that satisfies the contract: rows padded to a multiple of
    ALIGN elements, viewed back to the head dim."""
    d = shape[-1]
    return torch.empty((*shape[:-1], triton.cdiv(d, ALIGN) * ALIGN), dtype=dtype, device=device)[..., :d]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when it satisfies the layout contract, else an aligned copy.

    No copy (the common cases): contiguous [b h n d] and diffusers' [b n (h d)] projections viewed as
    [b h n d] (the heads_last_empty outputs too), for any head dim that is a multiple of 8 (every real
    model: 40, 64, 80, 96, 128, 160, 256), broadcast (stride-0) batch/head dims included.
    Copy: a head dim that is not innermost (e.g. a [b h d n] tensor transposed), a head dim not a
    multiple of 8 (its rows are then padded to one), a row/head/batch stride not a multiple of 8, or a
    storage offset that breaks 16-byte alignment."""
    if _is_aligned(t):
        return t
    out = _aligned_empty(t.shape, t.dtype, t.device)
    out.copy_(t)
    return out


def _writable(t: torch.Tensor) -> torch.Tensor:
    """Where a kernel should write a result meant for t: t itself, or an aligned scratch tensor that
    the caller copies into t afterwards (`_copy_back`)."""
    return t if _is_aligned(t) else _aligned_empty(t.shape, t.dtype, t.device)


def _copy_back(scratch: torch.Tensor, dst: torch.Tensor) -> None:
    if scratch is not dst:
        dst.copy_(scratch)


def _strides8(t: torch.Tensor, dims=3):
    """The first `dims` strides divided by ALIGN (the kernels multiply them back); strides of
    length-1 dimensions are never used, so they are passed as 0."""
    return [s // ALIGN if n > 1 else 0 for s, n in zip(t.stride()[:dims], t.shape[:dims])]


def _d_pad(d_len: int) -> int:
    """Register-tile width of the head dim: tl.arange needs a power of two and tl.dot at least 16."""
    return max(16, triton.next_power_of_2(d_len))


def _d_split(d_len: int, dtype: torch.dtype) -> tuple[int, int]:
    """(D_HI, D_LO): the forwards' head-dim register chunks, powers of two ≥ 16 (tl.arange needs a
    power of two, the MMA a K of 16); D_LO = 0 is one chunk.
        40 → (32, 16)   80 → (64, 16)   96 → (64, 32)        the next multiple of 16
        16, 32, 64, 128, 256 → one chunk;  112 → (128, 0) (64 + 64 saves nothing)
        above 128 → one power-of-two chunk (160 → 256): at SD1.5's 16×16 level the 128 + 32 split
        compiled (sm_90, ptxas) to 236-240 registers in the dual forward (1 block/SM) and 238 in the
        reference forward, against 128 and 166 unsplit, so it stays padded there.
    fp32 (IEEE dots: FMA loops with the operands in registers, the accuracy path) keeps one chunk: the
    32 + 16 split left a 4-byte spill in the fp32 reference forward."""
    whole = _d_pad(d_len)
    if whole > 128 or dtype == torch.float32:
        return whole, 0
    hi = max(16, whole // 2 if whole > d_len else whole)
    rest = d_len - hi
    lo = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return (hi, lo) if lo and hi + lo < whole else (whole, 0)


def _block_n(kv_len: int, split: bool = False, masked: bool = False) -> int:
    """Key tile for a short key list: the least padded work, counting each loop iteration's softmax
    rescale as about 16 columns (77 text tokens -> 32: 96 columns in 3 steps, not 128 in 2). With a
    16-wide second head-dim chunk (`split`) at least 32 keys: a 16 × 16 chunk is one element per
    thread of 8 warps, a 2-byte scalar load (sm_90 SASS), 32 × 16 at least 4 bytes. A masked
    condition's tiles hold the mask tile too: at most 32 keys there (64-key masked tiles at 40-wide
    heads spilled 240-624 B in the 16-bit forward, 96 B in fp32 and 100-144 B in dq; sm_90, Triton
    3.6 and 3.9)."""
    sizes = (32, 64) if split else (16, 32, 64)
    if masked:
        sizes = tuple(bn for bn in sizes if bn <= 32)
    return min(sizes, key=lambda bn: (triton.cdiv(max(kv_len, 1), bn) * (bn + 16), -bn))


def _tiles(n_q: int, d_pad: int, dtype: torch.dtype):
    """(BLOCK_M, num_warps) of the dual forward. A program holds two fp32 [BLOCK_M, D_PAD] tiles (the
    running output and the current condition's accumulator) plus Q: 128 queries for heads up to 64
    wide, 64 up to 128, 32 above (a 64×256 tile spilled ~1 KB in fp16 under ptxas for sm_90), with 8
    warps once a tile passes 64×64. fp32 dots (IEEE: FMA loops, not tensor cores) need far more
    registers per element: 32 queries up to 64-wide heads, 16 above (at 8 warps: 16×256 at 4 warps
    spilled 0.5 KB under ptxas)."""
    if dtype == torch.float32:
        block_m = 32 if d_pad <= 64 else 16
    else:
        block_m = 128 if d_pad <= 64 else 64 if d_pad <= 128 else 32
    block_m = max(16, min(block_m, triton.next_power_of_2(n_q)))
    wide = block_m * d_pad > 64 * 64 or (dtype == torch.float32 and d_pad >= 128)
    return block_m, (8 if wide else 4)


# The installed Triton's (major, minor): ptxas and code generation come with it.
_TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])


def _dual_fwd_four_warps(d_len: int, dtype: torch.dtype, conditions: int) -> bool:
    """Whether the 16-bit dual forward at 32 × 256 tiles runs 4 warps instead of 8 (heads 129-192 wide,
    at most two conditions per launch, Triton before 3.9). sm_90, SD1.5's 16×16 level (8×160, 77 + 4
    keys, 2 stages), 2026-12-07:
    - 8 warps: 139-140 registers under Triton 3.6 (the GPU machines'): one block (8 warps) per SM;
      128 under 3.9: two blocks (16 warps). maxnreg=128 spills 16 B under both; 3-5 stages do not help.
    - 4 warps: 226-241 registers, no spill, two blocks (8 warps) per SM under both. With three or four
      conditions in the launch 4 warps spill 72-872 B, so those keep 8 warps (174-231 registers, one
      block under both). 16-row tiles would fit 8 warps in 106-120 registers but read every K/V tile
      from L2 twice as often, which is most of this shape's traffic (81 keys, 160 wide, per 32 queries).
    Heads wider than 192 (4 stages) fit 8 warps in 128 registers under both, so they keep 8."""
    return (dtype != torch.float32 and 128 < d_len <= 192 and conditions <= 2 and _TRITON_VERSION < (3, 9))


def _dual_fwd_stages(d_len: int, dtype: torch.dtype) -> int:
    """Pipeline stages of the dual forward: 2, except where ptxas caps the registers of an 8-warp
    program and spills (sm_90, Triton 3.6, the GPU machines', and 3.9; 2026-12-07):
    - 16-bit heads wider than 192 (32 × 256 tiles, two conditions, a mask): held to 128 registers,
      8 B spilled with 2 stages under both, with 3 under 3.6; 4 stages: 128 and no spill under both.
    - fp32 at D_PAD 128 (16 × 128 tiles, 80- to 128-wide heads): held to 64 registers, 8 B spilled with
      a mask at 2 stages under both; 3 stages: 64 and no spill. fp32 at D_PAD 256 keeps 2 (80-89
      registers, no spill; 3 spilled 8 B under 3.6)."""
    if dtype == torch.float32:
        return 3 if _d_pad(d_len) == 128 else 2
    return 4 if d_len > 192 else 2


def _upcast(dtype: torch.dtype) -> bool:
    # 2026-11: Triton 3.9's interpreter multiplies bf16 tiles in tl.dot as raw bits (garbage); on the
    # interpreter only, bf16 tiles are widened to fp32 before each dot. Compiled kernels never upcast.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots are IEEE unless the caller opted into TF32 for matmuls
    (torch.backends.cuda.matmul.allow_tf32 = True); fp16/bf16 dots ignore the setting."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


RESIDENT_MAX_KEYS = 128


def _resident_keys(d_pad: int, dtype: torch.dtype, lens) -> bool:
    """Whether a forward launch keeps its conditions' keys on chip (_dual_cross_attention_fwd_resident_kernel):
    16-bit inputs, heads up to 128 wide, at most RESIDENT_MAX_KEYS keys in every condition of the launch
    (text prompts: 77; image tokens: 4-16)."""
    return dtype != torch.float32 and d_pad <= 128 and max(lens) <= RESIDENT_MAX_KEYS


def _resident_key_blocks(kv_len: int) -> tuple[int, int]:
    """(KEYS_A, KEYS_B): a resident condition's keys as a power-of-two block and a power-of-two rest (or
    0), each ≥ 16 (the MMA's minimum): 77 → 64 + 16, 4 → 16 + 0, 100 → 64 + 64, 128 → 128 + 0."""
    a = max(16, triton.next_power_of_2(max(kv_len, 1)))
    if a > 16 and kv_len < a:
        a //= 2
        return a, max(16, triton.next_power_of_2(kv_len - a))
    return a, 0


# Resident forward: 64-query tiles (one warpgroup's wgmma), 4 warps, 3 stages (two query tiles' loads in
# flight). sm_90 at the benchmark shapes (77 + 4 keys: blocks 64 + 16 and 16), Triton 3.6 / 3.9, no spills:
#   8×40  137 / 152 registers, 41 / 32 KB shared: 3 blocks (12 warps) per SM
#   8×80  202 / 204 registers, 70 / 54 KB: 2 blocks (8 warps)
#   10×64 100 / 101 registers, 57 / 45 KB: 4 blocks (16 warps)
# 128-query tiles at 8 warps took 132-137 registers at 8×40 (1 block); 64-query tiles at 8 warps split
# the head dim between warpgroups and took 163-244 (1 block). A whole 128-key tile per condition (77
# keys padded to 128, not 64 + 16) took 171-219.
RESIDENT_TILE = dict(BLOCK_M=64, num_warps=4, num_stages=3)


def _resident_plan(n_q: int, heads_total: int, lens, sm_count: int) -> tuple[tuple, int, dict]:
    """(grid, tiles_per_program, launch keywords) of a resident-keys launch (forward or dq): 64-query
    tiles (fewer rows for short sequences), up to `_tiles_per_program` of them a program, each set's
    key blocks, and RESIDENT_TILE's warps and stages."""
    block_m = max(16, min(RESIDENT_TILE["BLOCK_M"], triton.next_power_of_2(n_q)))
    n_tiles = triton.cdiv(n_q, block_m)
    per_program = _tiles_per_program(n_tiles, heads_total, sm_count)
    kw = dict(RESIDENT_TILE, BLOCK_M=block_m)
    for j, n in enumerate(lens):
        kw[f"KEYS{j}_A"], kw[f"KEYS{j}_B"] = _resident_key_blocks(n)
    return (triton.cdiv(n_tiles, per_program) * heads_total,), per_program, kw


def _tiles_per_program(n_tiles: int, heads_total: int, sm_count: int) -> int:
    """Query tiles a resident program walks: up to 8 (each extra one reuses the keys already on chip and
    pipelines its loads behind the previous tile's work), but never so many that fewer than about
    four programs per SM remain."""
    return max(1, min(8, n_tiles, n_tiles * heads_total // (4 * sm_count)))


def dual_cross_attention_launch(q: torch.Tensor, keys, values, scales, mask, softmax_scale: float,
                                out: torch.Tensor, lse: torch.Tensor, sm_count: int = 132) -> None:
    """q, out: [b h n d] views (any strides); keys[j], values[j]: [b h mⱼ d]; scales: λ per condition;
    mask: None or a [b h n m₀] (expanded, any strides) float or bool tensor; lse: [conditions, b·h, n]
    float32 contiguous; sm_count: the device's SMs (sizes the resident kernel's grid). Writes out and lse."""
    batch, heads, n_q, d_len = q.shape
    q = _aligned(q)
    keys, values = [_aligned(k) for k in keys], [_aligned(v) for v in values]
    o = _writable(out)
    d_hi, d_lo = _d_split(d_len, q.dtype)
    has_mask = mask is not None
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
            strides += [*_strides8(k), *_strides8(v)]
        masked = has_mask and first == 0
        args = [q, o, lse[first:], mask if masked else q, ks[0], vs[0], ks[1], vs[1], ks[2], vs[2], ks[3], vs[3],
                n_q, heads, softmax_scale * LOG2E]
        rest = [*_strides8(q), *_strides8(o), *(sm if masked else (0, 0, 0, 0)), *lens, *lams, *strides]
        consts = dict(HEAD_DIM=d_len, NUM_COND=len(chunk), HAS_MASK=masked,
                      MASK_BOOL=masked and mask.dtype == torch.bool, ACCUMULATE=first > 0, D_HI=d_hi, D_LO=d_lo,
                      PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype))
        if _resident_keys(d_hi + d_lo, q.dtype, lens[:len(chunk)]):
            grid, per_program, plan = _resident_plan(n_q, batch * heads, lens, sm_count)
            _dual_cross_attention_fwd_resident_kernel[grid](*args, per_program, *rest, **plan, **consts)
            continue
        block_m, num_warps = _tiles(n_q, d_hi + d_lo, q.dtype)
        grid = (triton.cdiv(n_q, block_m) * batch * heads,)
        blocks = {f"BLOCK_N{j}": _block_n(n, d_lo > 0, masked and j == 0) for j, n in enumerate(lens)}
        _dual_cross_attention_fwd_kernel[grid](
            *args, *rest, BLOCK_M=block_m, **blocks, **consts,
            num_warps=4 if _dual_fwd_four_warps(d_len, q.dtype, len(chunk)) else num_warps,
            num_stages=_dual_fwd_stages(d_len, q.dtype))
    _copy_back(o, out)


# Reference forward tiles per head-dim width (fp16/bf16), from sm_90 ptxas/SASS at the SD1.5 shapes:
# every one vectorised (LDG.128), K/V cp.async-pipelined, no spills, ≥ 2 resident blocks per SM:
#   D_PAD 64:  128×64, 8 warps, 3 stages: 126 regs, 64 KB smem -> 2 blocks (16 warps)
#   D_PAD 128:  64×32, 4 warps, 3 stages: 128 regs, 64 KB -> 3 blocks (64×64 at 8 warps: 139 regs, 1 block)
#   D_PAD 256:  32×32, 4 warps, 3 stages: 166 regs, 82 KB -> 2 blocks (64×32 at 8 warps: 172 regs, 1 block)
# D_PAD 256 (heads 129-256 wide) at 8 warps: 4 warps took 163-168 registers and spilled 8-16 B where
# the query count is not a multiple of 16 (n = 40: 160-, 144- and 192-wide heads, Triton 3.9); 8 warps:
# 125-128 registers, no spill under 3.6 and 3.9, 2 blocks/SM (sm_90, 2026-12-08).
_REFERENCE_TILES = {64: (128, 64, 8, 3), 128: (64, 32, 4, 3), 256: (32, 32, 8, 3)}
# fp32 (IEEE dots are FMA loops): 64×64 spilled 2.9 KB, 64×32 0.8 KB, 32×32 24 B–1.1 KB, 16×32 at
# D_PAD 128 0.5 KB (4 warps); the tiles below: 140 / 48 / 62-64 regs, 0 spills. D_PAD 256 takes 16 warps:
# at 4 warps ptxas kept 32 registers and spilled 19.5 KB where the head dim is not a power of two or the
# query count not a multiple of 16 (160 wide, n = 40), at 8 warps 12-16 B (sm_90, Triton 3.6 and 3.9).
_REFERENCE_TILES_FP32 = {64: (16, 32, 4, 2), 128: (16, 16, 8, 2), 256: (16, 32, 16, 2)}


def _reference_lag_pv(d_pad: int) -> bool:
    """Whether the TMA forward runs P V one key tile behind the scores (FlashAttention-3's softmax /
    matrix-product overlap). sm_90 SASS at SD1.5 (2026-12-07): at 8×40 and 8×80 every MUFU.EX2 of a
    tile's softmax is issued between the previous tile's P V HGMMAs and their wait (before: all after
    the scores' wait, with no product in flight); 8×40 106 → 119 registers, 2 blocks/SM either way,
    49.6 → 66 KB shared; 8×80 94 → 93 registers, 42 → 46 KB, 5 → 4 blocks/SM. At D_PAD 256 (8×160)
    the carried tile spilled 436 B at 255 registers (163 without), so there it stays off. Not yet timed
    on a GPU."""
    return d_pad <= 128


def _reference_tiles(n_q: int, d_pad: int, dtype: torch.dtype) -> dict:
    """Launch tiles of the reference forward (self-attention lengths), see the tables above."""
    table = _REFERENCE_TILES_FP32 if dtype == torch.float32 else _REFERENCE_TILES
    block_m, block_n, num_warps, num_stages = table[max(64, triton.next_power_of_2(d_pad))]
    block_m = max(16, min(block_m, triton.next_power_of_2(n_q)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def reference_attention_launch(q: torch.Tensor, k_m: torch.Tensor, v_m: torch.Tensor, k_p: torch.Tensor,
                               v_p: torch.Tensor, softmax_scale: float, out: torch.Tensor, lse: torch.Tensor,
                               tma: bool = False) -> None:
    """q, out: [b h n d]; k_m, v_m: [b h n_m d]; k_p, v_p: [b h n_p d] (any strides); lse: [b·h, n] float32.
    Writes out = softmax(q [k_m; k_p]ᵀ s) [v_m; v_p] and lse. tma: K/V through TMA descriptors (sm_90+,
    16-bit inputs; the caller decides from the device)."""
    batch, heads, n_q, d_len = q.shape
    q, k_m, v_m, k_p, v_p = (_aligned(t) for t in (q, k_m, v_m, k_p, v_p))
    o = _writable(out)
    d_hi, d_lo = _d_split(d_len, q.dtype)
    tiles = _reference_tiles(n_q, d_hi + d_lo, q.dtype)
    grid = (triton.cdiv(n_q, tiles["BLOCK_M"]) * batch * heads,)
    consts = dict(HEAD_DIM=d_len, D_HI=d_hi, D_LO=d_lo, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), **tiles)
    layouts = [_tma_layout(t) for t in (k_m, v_m, k_p, v_p)] if tma and q.dtype != torch.float32 else [None]
    if all(layouts):
        descs = []
        for layout in layouts:
            descs += _chunk_descriptors(layout, tiles["BLOCK_N"], d_hi, d_lo)
        _reference_attention_fwd_tma_kernel[grid](
            q, o, lse, *descs, n_q, heads, softmax_scale * LOG2E, k_m.shape[2], k_p.shape[2],
            *_strides8(q), *_strides8(o), LAG_PV=_reference_lag_pv(_d_pad(d_len)), **consts)
        _copy_back(o, out)
        return
    _reference_attention_fwd_kernel[grid](
        q, o, lse, k_m, v_m, k_p, v_p,
        n_q, heads, softmax_scale * LOG2E, k_m.shape[2], k_p.shape[2],
        *_strides8(q), *_strides8(o), *_strides8(k_m), *_strides8(v_m), *_strides8(k_p), *_strides8(v_p),
        **consts,
    )
    _copy_back(o, out)


def _tma_layout(t: torch.Tensor):
    """A [b h n d] operand as the [b, n, h, d] (view, shape, strides) a TMA descriptor walks (the copy
    engine then stays within one batch and head: key tiles past n arrive as zeros), or None where it
    cannot address it: an empty tensor or a broadcast (stride-0) dimension. The layout contract
    (_aligned) gives the rest of what TMA needs: unit stride in d, the other strides multiples of 16
    bytes, a 16-byte aligned base. A length-1 dimension is never stepped, so any 16-byte stride does."""
    view = t.permute(0, 2, 1, 3)
    if view.numel() == 0 or any(s == 0 and n > 1 for s, n in zip(view.stride(), view.shape)):
        return None
    strides = [s if n > 1 else ALIGN for s, n in zip(view.stride()[:3], view.shape[:3])] + [1]
    return view, list(view.shape), strides


def _chunk_descriptors(layout, block_n: int, d_hi: int, d_lo: int) -> list:
    """The TMA descriptors of one operand (a _tma_layout), one per head-dim chunk: boxes
    [1, block_n, 1, d_hi] and [1, block_n, 1, d_lo] (the second repeats the first when there is none)."""
    view, shape, strides = layout
    hi = TensorDescriptor(view, shape, strides, [1, block_n, 1, d_hi])
    return [hi, TensorDescriptor(view, shape, strides, [1, block_n, 1, d_lo]) if d_lo else hi]


# ---------------------------------------------------------------------------------------------
# Backward, one key/value set per pair of launches (dual conditions are independent given dO;
# reference attention's two sources share one softmax, so they share lse and Δ):
#   P = exp(s·QKᵀ + mask − lse),  dO_j = λ_j dO,  dP = dO_j Vᵀ,  Δ = rowsum(P ∘ dP) over all keys,
#   dS = P ∘ (dP − Δ),  dQ += s·dS K,  dK = s·dSᵀ Q,  dV = Pᵀ dO_j.
# The dual dq kernel takes up to four key/value sets per launch and walks each (short) key list
# twice per query tile: first for Δ (the per-condition output O_j is not stored, so
# Δ = rowsum(dO_j ∘ O_j) is formed as rowsum(P ∘ dP)), then for dQ; it writes each set's Δ for its
# dk/dv launch. Reference attention passes Δ = rowsum(dO ∘ O) (DELTA_GIVEN) and skips the first walk. The dk/dv kernel owns one key tile and one n_split-th of
# the query tiles, so short key lists (77 text tokens: 3 tiles) still fill the GPU; with n_split > 1
# it writes fp32 partial sums that the launcher adds up.

@triton.jit
def _dot_t(a_hi, a_lo, b_hi, b_lo, D_LO: tl.constexpr, PRECISION: tl.constexpr):
    """a bᵀ over the head dim given as chunks (hi, lo): one dot, or two into one tile."""
    s = tl.dot(a_hi, tl.trans(b_hi), input_precision=PRECISION)
    if D_LO > 0:
        s = tl.dot(a_lo, tl.trans(b_lo), s, input_precision=PRECISION)
    return s


@triton.jit
def _dot_t_streamed(a_base, a_rows, a_ok, sa_n8, a_scale, b_base, b_rows, b_ok, sb_n8,
                    ROWS_A: tl.constexpr, ROWS_B: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
                    PRECISION: tl.constexpr):
    """a bᵀ over the head dim with both operands read from memory CHUNK columns at a time (a scaled
    by a_scale and rounded back to its dtype, as `_load_do` does). For fp32 IEEE dots (FMA loops,
    which hold each operand row along the whole contraction in registers) at wide heads."""
    acc = tl.zeros([ROWS_A, ROWS_B], dtype=tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, CHUNK):
        a = _load_chunk(a_base, a_rows, a_ok, sa_n8, d0, CHUNK, HEAD_DIM, False)
        a = (a.to(tl.float32) * a_scale).to(a.dtype)
        b = _load_chunk(b_base, b_rows, b_ok, sb_n8, d0, CHUNK, HEAD_DIM, False)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _mask_scores(s, offs_m, offs_n, n_q, kv_len, mask_base, sm_n, sm_m,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr):
    """The user's mask (additive, in log2 units, or keep-bool) and the key-length cut on a scaled
    score tile."""
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
def _load_do(base, rows, row_ok, s_n8, lam, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_HI: tl.constexpr,
             D_LO: tl.constexpr, UPCAST: tl.constexpr):
    """(dO_hi, dO_lo) · λ of `rows`, rounded back to the storage dtype (the dots' operand type), then
    widened under UPCAST."""
    do_hi, do_lo = _load_q(base, rows, row_ok, s_n8, BLOCK_M, HEAD_DIM, D_HI, D_LO, False)
    do_hi = (do_hi.to(tl.float32) * lam).to(do_hi.dtype)
    do_lo = (do_lo.to(tl.float32) * lam).to(do_lo.dtype)
    if UPCAST:
        do_hi = do_hi.to(tl.float32)
        do_lo = do_lo.to(tl.float32)
    return do_hi, do_lo


@triton.jit
def _probs_and_dp(q_hi, q_lo, do_hi, do_lo, lse, dead, k_base, v_base, start, offs_m, n_q, kv_len,
                  sk_n8, sv_n8, mask_base, sm_n, sm_m, qk_scale,
                  HEAD_DIM: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr,
                  HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of the dq pass: its K chunks, the probabilities P = exp2(S - lse) (0 on dead rows)
    and dP = dO Vᵀ. Shared by the Δ pass and the dq pass, so both see the same P."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < kv_len
    k_hi, k_lo = _load_q(k_base, offs_n, n_ok, sk_n8, BLOCK_N, HEAD_DIM, D_HI, D_LO, UPCAST)
    v_hi, v_lo = _load_q(v_base, offs_n, n_ok, sv_n8, BLOCK_N, HEAD_DIM, D_HI, D_LO, UPCAST)
    s = _dot_t(q_hi, q_lo, k_hi, k_lo, D_LO, PRECISION) * qk_scale
    s = _mask_scores(s, offs_m, offs_n, n_q, kv_len, mask_base, sm_n, sm_m, HAS_MASK, MASK_BOOL)
    p = tl.where(dead[:, None], 0.0, tl.exp2(s - lse[:, None]))
    dp = _dot_t(do_hi, do_lo, v_hi, v_lo, D_LO, PRECISION)
    return k_hi, k_lo, p, dp


@triton.jit
def _dq_condition(dq_hi, dq_lo, q_hi, q_lo, offs_m, row_ok, n_q, b, h, qk_scale, do_base, sdo_n8, lam,
                  lse_row, glse_row, delta_row, k_ptr, v_ptr, kv_len, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8,
                  mask_base, sm_n, sm_m,
                  HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                  DELTA_GIVEN: tl.constexpr, HAS_GLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  D_HI: tl.constexpr, D_LO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(dq_hi, dq_lo) plus one key/value set's dS K (unscaled); without DELTA_GIVEN its Δ is formed
    first (a walk over its keys) and stored for the dk/dv kernel, less the LSE's incoming gradient
    under HAS_GLSE (without it, none flows: the public ops never return the LSE)."""
    do_hi, do_lo = _load_do(do_base, offs_m, row_ok, sdo_n8, lam, BLOCK_M, HEAD_DIM, D_HI, D_LO, UPCAST)
    lse = tl.load(lse_row + offs_m, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    dead = lse == float("-inf")
    lse = tl.where(dead, 0.0, lse)
    k_base = _head_base(k_ptr, b, h, sk_b8, sk_h8)
    v_base = _head_base(v_ptr, b, h, sv_b8, sv_h8)
    if DELTA_GIVEN:
        delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)
    else:
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, kv_len, BLOCK_N):
            _, _, p, dp = _probs_and_dp(q_hi, q_lo, do_hi, do_lo, lse, dead, k_base, v_base, start, offs_m, n_q,
                                        kv_len, sk_n8, sv_n8, mask_base, sm_n, sm_m, qk_scale, HEAD_DIM, D_HI,
                                        D_LO, HAS_MASK, MASK_BOOL, BLOCK_N, PRECISION, UPCAST)
            delta += tl.sum(p * dp, 1)
        # A gradient flowing into the LSE output adds P ∘ g to dS: the same as lowering Δ by g.
        if HAS_GLSE:
            delta -= tl.load(glse_row + offs_m, mask=row_ok, other=0.0)
        tl.store(delta_row + offs_m, delta, mask=row_ok)
    for start in range(0, kv_len, BLOCK_N):
        k_hi, k_lo, p, dp = _probs_and_dp(q_hi, q_lo, do_hi, do_lo, lse, dead, k_base, v_base, start, offs_m, n_q,
                                          kv_len, sk_n8, sv_n8, mask_base, sm_n, sm_m, qk_scale, HEAD_DIM, D_HI,
                                          D_LO, HAS_MASK, MASK_BOOL, BLOCK_N, PRECISION, UPCAST)
        ds = (p * (dp - delta[:, None])).to(k_hi.dtype)
        dq_hi += tl.dot(ds, k_hi, input_precision=PRECISION)
        if D_LO > 0:
            dq_lo += tl.dot(ds, k_lo, input_precision=PRECISION)
    return dq_hi, dq_lo


@triton.jit
def _dual_bwd_dq_kernel(
    q_ptr, do_ptr, lse_ptr, glse_ptr, delta_ptr, dq_ptr, dqacc_ptr, mask_ptr,
    k0, v0, k1, v1, k2, v2, k3, v3,
    n_q, heads, qk_scale, softmax_scale, cond_stride,
    len0, len1, len2, len3,
    lam0, lam1, lam2, lam3,
    sq_b8, sq_h8, sq_n8, sdo_b8, sdo_h8, sdo_n8, sdq_b8, sdq_h8, sdq_n8, sm_b, sm_h, sm_n, sm_m,
    sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8,
    sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8,
    sk2_b8, sk2_h8, sk2_n8, sv2_b8, sv2_h8, sv2_n8,
    sk3_b8, sk3_h8, sk3_n8, sv3_b8, sv3_h8, sv3_n8,
    HEAD_DIM: tl.constexpr, NUM_COND: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    ACCUMULATE: tl.constexpr, DELTA_GIVEN: tl.constexpr, HAS_GLSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N0: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
    BLOCK_N3: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # dQ over up to four key/value sets in one program, summed in registers and written once in dq's
    # dtype. Set j's LSE, its incoming gradient and its Δ are rows of [.., b·h, n] tensors cond_stride
    # elements apart (0: the sets share one softmax, as reference attention's two sources do).
    pid_bh, b, h, offs_m, row_ok = _query_tile(n_q, heads, BLOCK_M)
    q_hi, q_lo = _load_q(_head_base(q_ptr, b, h, sq_b8, sq_h8), offs_m, row_ok, sq_n8, BLOCK_M, HEAD_DIM, D_HI,
                         D_LO, UPCAST)
    do_base = _head_base(do_ptr, b, h, sdo_b8, sdo_h8)
    row = pid_bh.to(tl.int64) * n_q
    stride = tl.cast(cond_stride, tl.int64)
    dq_hi = tl.zeros([BLOCK_M, D_HI], dtype=tl.float32)
    dq_lo = tl.zeros([BLOCK_M, D_LO if D_LO > 0 else 16], dtype=tl.float32)
    dq_hi, dq_lo = _dq_condition(dq_hi, dq_lo, q_hi, q_lo, offs_m, row_ok, n_q, b, h, qk_scale, do_base, sdo_n8,
                                 lam0, lse_ptr + row, glse_ptr + row, delta_ptr + row,
                                 k0, v0, len0, sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8,
                                 mask_ptr + b * sm_b + h * sm_h, sm_n, sm_m, HEAD_DIM, HAS_MASK, MASK_BOOL,
                                 DELTA_GIVEN, HAS_GLSE, BLOCK_M, BLOCK_N0, D_HI, D_LO, PRECISION, UPCAST)
    if NUM_COND >= 2:
        row += stride
        dq_hi, dq_lo = _dq_condition(dq_hi, dq_lo, q_hi, q_lo, offs_m, row_ok, n_q, b, h, qk_scale, do_base,
                                     sdo_n8, lam1, lse_ptr + row, glse_ptr + row, delta_ptr + row,
                                     k1, v1, len1, sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8,
                                     mask_ptr, 0, 0, HEAD_DIM, False, False,
                                     DELTA_GIVEN, HAS_GLSE, BLOCK_M, BLOCK_N1, D_HI, D_LO, PRECISION, UPCAST)
    if NUM_COND >= 3:
        row += stride
        dq_hi, dq_lo = _dq_condition(dq_hi, dq_lo, q_hi, q_lo, offs_m, row_ok, n_q, b, h, qk_scale, do_base,
                                     sdo_n8, lam2, lse_ptr + row, glse_ptr + row, delta_ptr + row,
                                     k2, v2, len2, sk2_b8, sk2_h8, sk2_n8, sv2_b8, sv2_h8, sv2_n8,
                                     mask_ptr, 0, 0, HEAD_DIM, False, False,
                                     DELTA_GIVEN, HAS_GLSE, BLOCK_M, BLOCK_N2, D_HI, D_LO, PRECISION, UPCAST)
    if NUM_COND >= 4:
        row += stride
        dq_hi, dq_lo = _dq_condition(dq_hi, dq_lo, q_hi, q_lo, offs_m, row_ok, n_q, b, h, qk_scale, do_base,
                                     sdo_n8, lam3, lse_ptr + row, glse_ptr + row, delta_ptr + row,
                                     k3, v3, len3, sk3_b8, sk3_h8, sk3_n8, sv3_b8, sv3_h8, sv3_n8,
                                     mask_ptr, 0, 0, HEAD_DIM, False, False,
                                     DELTA_GIVEN, HAS_GLSE, BLOCK_M, BLOCK_N3, D_HI, D_LO, PRECISION, UPCAST)
    dq_hi, dq_lo = dq_hi * softmax_scale, dq_lo * softmax_scale
    if ACCUMULATE:  # more than four sets: the earlier launches' fp32 partial sum (dqacc may be dq itself)
        dq_hi, dq_lo = _add_chunks(_head_base(dqacc_ptr, b, h, sdq_b8, sdq_h8), offs_m, row_ok, sdq_n8, dq_hi, dq_lo,
                                   HEAD_DIM, D_HI, D_LO)
    _store_chunks(_head_base(dq_ptr, b, h, sdq_b8, sdq_h8), offs_m, row_ok, sdq_n8, dq_hi, dq_lo, HEAD_DIM, D_HI,
                  D_LO, False)


@triton.jit
def _scaled(t, lam, UPCAST: tl.constexpr):
    """t · λ rounded back to t's dtype (the dots' operand type, as `_load_do` does), widened under UPCAST."""
    t = (t.to(tl.float32) * lam).to(t.dtype)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _dq_resident_block(q_hi, q_lo, do_hi, do_lo, k_hi, k_lo, v_hi, v_lo, start, kv_len, lse, dead, offs_m, n_q,
                       qk_scale, mask_base, sm_n, sm_m, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                       KEYS: tl.constexpr, D_LO: tl.constexpr, PRECISION: tl.constexpr):
    """P = exp2(S - lse) (0 on dead rows) and dP = dO Vᵀ of a query tile against one resident key block."""
    s = _block_scores(q_hi, q_lo, k_hi, k_lo, start, kv_len, offs_m, n_q, qk_scale, mask_base, sm_n, sm_m,
                      HAS_MASK, MASK_BOOL, KEYS, D_LO, PRECISION)
    p = tl.where(dead[:, None], 0.0, tl.exp2(s - lse[:, None]))
    return p, _dot_t(do_hi, do_lo, v_hi, v_lo, D_LO, PRECISION)


@triton.jit
def _dq_resident_set(dq_hi, dq_lo, q_hi, q_lo, do_hi, do_lo, kv, kv_len, offs_m, row_ok, n_q, qk_scale, lse_row,
                     glse_row, delta_row, mask_base, sm_n, sm_m, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                     KEYS_A: tl.constexpr, KEYS_B: tl.constexpr, D_LO: tl.constexpr, PRECISION: tl.constexpr,
                     HAS_GLSE: tl.constexpr):
    """(dq_hi, dq_lo) plus one key/value set's dS K (unscaled), its keys resident (`kv` from _resident_kv,
    dO already scaled by the set's λ): P and dP of both key blocks in one pass, Δ = rowsum(P ∘ dP) − g_lse
    from them (stored for the dk/dv kernel), then dS = P ∘ (dP − Δ)."""
    ka_hi, ka_lo, va_hi, va_lo, kb_hi, kb_lo, vb_hi, vb_lo = kv
    lse = tl.load(lse_row + offs_m, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    dead = lse == float("-inf")
    lse = tl.where(dead, 0.0, lse)
    pa, dpa = _dq_resident_block(q_hi, q_lo, do_hi, do_lo, ka_hi, ka_lo, va_hi, va_lo, 0, kv_len, lse, dead, offs_m,
                                 n_q, qk_scale, mask_base, sm_n, sm_m, HAS_MASK, MASK_BOOL, KEYS_A, D_LO, PRECISION)
    delta = tl.sum(pa * dpa, 1)
    if KEYS_B > 0:
        pb, dpb = _dq_resident_block(q_hi, q_lo, do_hi, do_lo, kb_hi, kb_lo, vb_hi, vb_lo, KEYS_A, kv_len, lse, dead,
                                     offs_m, n_q, qk_scale, mask_base, sm_n, sm_m, HAS_MASK, MASK_BOOL, KEYS_B, D_LO,
                                     PRECISION)
        delta += tl.sum(pb * dpb, 1)
    # A gradient flowing into the LSE output adds P ∘ g to dS: the same as lowering Δ by g.
    if HAS_GLSE:
        delta -= tl.load(glse_row + offs_m, mask=row_ok, other=0.0)
    tl.store(delta_row + offs_m, delta, mask=row_ok)
    ds = (pa * (dpa - delta[:, None])).to(ka_hi.dtype)
    dq_hi += tl.dot(ds, ka_hi, input_precision=PRECISION)
    if D_LO > 0:
        dq_lo += tl.dot(ds, ka_lo, input_precision=PRECISION)
    if KEYS_B > 0:
        ds = (pb * (dpb - delta[:, None])).to(kb_hi.dtype)
        dq_hi += tl.dot(ds, kb_hi, input_precision=PRECISION)
        if D_LO > 0:
            dq_lo += tl.dot(ds, kb_lo, input_precision=PRECISION)
    return dq_hi, dq_lo


@triton.jit
def _dual_bwd_dq_resident_kernel(
    q_ptr, do_ptr, lse_ptr, glse_ptr, delta_ptr, dq_ptr, dqacc_ptr, mask_ptr,
    k0, v0, k1, v1, k2, v2, k3, v3,
    n_q, heads, qk_scale, softmax_scale, cond_stride, tiles_per_program,
    len0, len1, len2, len3,
    lam0, lam1, lam2, lam3,
    sq_b8, sq_h8, sq_n8, sdo_b8, sdo_h8, sdo_n8, sdq_b8, sdq_h8, sdq_n8, sm_b, sm_h, sm_n, sm_m,
    sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8,
    sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8,
    sk2_b8, sk2_h8, sk2_n8, sv2_b8, sv2_h8, sv2_n8,
    sk3_b8, sk3_h8, sk3_n8, sv3_b8, sv3_h8, sv3_n8,
    HEAD_DIM: tl.constexpr, NUM_COND: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    ACCUMULATE: tl.constexpr, HAS_GLSE: tl.constexpr,
    BLOCK_M: tl.constexpr, KEYS0_A: tl.constexpr, KEYS0_B: tl.constexpr, KEYS1_A: tl.constexpr,
    KEYS1_B: tl.constexpr, KEYS2_A: tl.constexpr, KEYS2_B: tl.constexpr, KEYS3_A: tl.constexpr,
    KEYS3_B: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """_dual_bwd_dq_kernel for short key lists, as _dual_cross_attention_fwd_resident_kernel is for the
    forward: every set's keys and values of the head loaded once, up to `tiles_per_program` query tiles
    walked (their Q and dO loads pipelined), and each set's P and dP formed once per tile (Δ from them,
    no second walk over the keys). Same arguments and outputs as _dual_bwd_dq_kernel with Δ computed
    (DELTA_GIVEN off), one softmax per set."""
    pid_bh, b, h, first, last, _ = _resident_program(n_q, heads, tiles_per_program, BLOCK_M)
    q_base = _head_base(q_ptr, b, h, sq_b8, sq_h8)
    do_base = _head_base(do_ptr, b, h, sdo_b8, sdo_h8)
    mask_base = mask_ptr + b * sm_b + h * sm_h
    row0 = pid_bh.to(tl.int64) * n_q
    stride = tl.cast(cond_stride, tl.int64)

    kv0, kv1, kv2, kv3 = _resident_sets(
        b, h, k0, v0, k1, v1, k2, v2, k3, v3, len0, len1, len2, len3,
        sk0_b8, sk0_h8, sk0_n8, sv0_b8, sv0_h8, sv0_n8, sk1_b8, sk1_h8, sk1_n8, sv1_b8, sv1_h8, sv1_n8,
        sk2_b8, sk2_h8, sk2_n8, sv2_b8, sv2_h8, sv2_n8, sk3_b8, sk3_h8, sk3_n8, sv3_b8, sv3_h8, sv3_n8,
        HEAD_DIM, NUM_COND, KEYS0_A, KEYS0_B, KEYS1_A, KEYS1_B, KEYS2_A, KEYS2_B, KEYS3_A, KEYS3_B, D_HI, D_LO, UPCAST)
    for tile in range(first, last):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_q
        q_hi, q_lo = _load_q(q_base, offs_m, row_ok, sq_n8, BLOCK_M, HEAD_DIM, D_HI, D_LO, UPCAST)
        do_hi, do_lo = _load_q(do_base, offs_m, row_ok, sdo_n8, BLOCK_M, HEAD_DIM, D_HI, D_LO, False)
        dq_hi = tl.zeros([BLOCK_M, D_HI], dtype=tl.float32)
        dq_lo = tl.zeros([BLOCK_M, D_LO if D_LO > 0 else 16], dtype=tl.float32)
        row = row0
        dq_hi, dq_lo = _dq_resident_set(dq_hi, dq_lo, q_hi, q_lo, _scaled(do_hi, lam0, UPCAST),
                                        _scaled(do_lo, lam0, UPCAST), kv0, len0, offs_m, row_ok, n_q, qk_scale,
                                        lse_ptr + row, glse_ptr + row, delta_ptr + row, mask_base, sm_n, sm_m,
                                        HAS_MASK, MASK_BOOL, KEYS0_A, KEYS0_B, D_LO, PRECISION, HAS_GLSE)
        if NUM_COND >= 2:
            row += stride
            dq_hi, dq_lo = _dq_resident_set(dq_hi, dq_lo, q_hi, q_lo, _scaled(do_hi, lam1, UPCAST),
                                            _scaled(do_lo, lam1, UPCAST), kv1, len1, offs_m, row_ok, n_q, qk_scale,
                                            lse_ptr + row, glse_ptr + row, delta_ptr + row, mask_base, 0, 0,
                                            False, False, KEYS1_A, KEYS1_B, D_LO, PRECISION, HAS_GLSE)
        if NUM_COND >= 3:
            row += stride
            dq_hi, dq_lo = _dq_resident_set(dq_hi, dq_lo, q_hi, q_lo, _scaled(do_hi, lam2, UPCAST),
                                            _scaled(do_lo, lam2, UPCAST), kv2, len2, offs_m, row_ok, n_q, qk_scale,
                                            lse_ptr + row, glse_ptr + row, delta_ptr + row, mask_base, 0, 0,
                                            False, False, KEYS2_A, KEYS2_B, D_LO, PRECISION, HAS_GLSE)
        if NUM_COND >= 4:
            row += stride
            dq_hi, dq_lo = _dq_resident_set(dq_hi, dq_lo, q_hi, q_lo, _scaled(do_hi, lam3, UPCAST),
                                            _scaled(do_lo, lam3, UPCAST), kv3, len3, offs_m, row_ok, n_q, qk_scale,
                                            lse_ptr + row, glse_ptr + row, delta_ptr + row, mask_base, 0, 0,
                                            False, False, KEYS3_A, KEYS3_B, D_LO, PRECISION, HAS_GLSE)
        dq_hi, dq_lo = dq_hi * softmax_scale, dq_lo * softmax_scale
        if ACCUMULATE:  # more than four sets: the earlier launches' fp32 partial sum (dqacc may be dq itself)
            dq_hi, dq_lo = _add_chunks(_head_base(dqacc_ptr, b, h, sdq_b8, sdq_h8), offs_m, row_ok, sdq_n8, dq_hi,
                                       dq_lo, HEAD_DIM, D_HI, D_LO)
        _store_chunks(_head_base(dq_ptr, b, h, sdq_b8, sdq_h8), offs_m, row_ok, sdq_n8, dq_hi, dq_lo, HEAD_DIM, D_HI,
                      D_LO, False)


@triton.jit
def _row_dot_kernel(a_ptr, b_ptr, sub_ptr, out_ptr, n_q, heads,
                    sa_b8, sa_h8, sa_n8, sb_b8, sb_h8, sb_n8,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr,
                    HAS_SUB: tl.constexpr):
    """out[b·h, n] = Σ_d a[b, h, n, d] · b[b, h, n, d] − sub[b·h, n], products and sum in fp32: Δ of the
    reference backward (a = dO, b = O, sub = the LSE's incoming gradient)."""
    pid_bh, b, h, offs_m, row_ok = _query_tile(n_q, heads, BLOCK_M)
    a_hi, a_lo = _load_q(_head_base(a_ptr, b, h, sa_b8, sa_h8), offs_m, row_ok, sa_n8, BLOCK_M, HEAD_DIM, D_HI,
                         D_LO, False)
    b_hi, b_lo = _load_q(_head_base(b_ptr, b, h, sb_b8, sb_h8), offs_m, row_ok, sb_n8, BLOCK_M, HEAD_DIM, D_HI,
                         D_LO, False)
    dot = tl.sum(a_hi.to(tl.float32) * b_hi.to(tl.float32), 1)
    if D_LO > 0:
        dot += tl.sum(a_lo.to(tl.float32) * b_lo.to(tl.float32), 1)
    rows = pid_bh.to(tl.int64) * n_q + offs_m
    if HAS_SUB:   # (without it sub_ptr is not read)
        dot -= tl.load(sub_ptr + rows, mask=row_ok, other=0.0)
    tl.store(out_ptr + rows, dot, mask=row_ok)


@triton.jit
def _dual_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, mask_ptr, count_ptr, dkf_ptr, dvf_ptr,
    n_q, heads, kv_len, qk_scale, softmax_scale, lam, n_split, rows_per_split,
    sq_b8, sq_h8, sq_n8, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8,
    sdo_b8, sdo_h8, sdo_n8, sdk_s8, sdk_b8, sdk_h8, sdk_n8, sdv_s8, sdv_b8, sdv_h8, sdv_n8,
    sdkf_b8, sdkf_h8, sdkf_n8, sdvf_b8, sdvf_h8, sdvf_n8, sm_b, sm_h, sm_n, sm_m,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr,
    S_CHUNK: tl.constexpr, REDUCE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Program = (b·h, key tile, query split), the splits of one key tile neighbours. S_CHUNK > 0: S and
    # dP are formed from memory S_CHUNK head-dim columns at a time (`_dot_t_streamed`) and K, V are not
    # held; 0: K, V stay in registers as their chunks for the whole query walk.
    # Without REDUCE (one split) dk_ptr/dv_ptr are the results. With REDUCE every split stores its fp32
    # partial sums at dk_ptr/dv_ptr[split] and counts itself in count_ptr[tile] (zeroed by the launcher);
    # the last split of a key tile to finish adds the others' partials to its own and writes the results
    # at dkf_ptr/dvf_ptr in their dtype: no second launch, no fp32 result tensor.
    pid_ns, pid_bh = _program_ids(tl.cdiv(kv_len, BLOCK_N) * n_split)
    pid_n = pid_ns // n_split
    pid_s = pid_ns % n_split
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < kv_len
    k_base = _head_base(k_ptr, b, h, sk_b8, sk_h8)
    v_base = _head_base(v_ptr, b, h, sv_b8, sv_h8)
    if S_CHUNK == 0:
        k_hi, k_lo = _load_q(k_base, offs_n, n_ok, sk_n8, BLOCK_N, HEAD_DIM, D_HI, D_LO, UPCAST)
        v_hi, v_lo = _load_q(v_base, offs_n, n_ok, sv_n8, BLOCK_N, HEAD_DIM, D_HI, D_LO, UPCAST)
    q_base = _head_base(q_ptr, b, h, sq_b8, sq_h8)
    do_base = _head_base(do_ptr, b, h, sdo_b8, sdo_h8)
    mask_base = mask_ptr + b * sm_b + h * sm_h
    row_base = pid_bh.to(tl.int64) * n_q

    dk_hi = tl.zeros([BLOCK_N, D_HI], dtype=tl.float32)
    dk_lo = tl.zeros([BLOCK_N, D_LO if D_LO > 0 else 16], dtype=tl.float32)
    dv_hi = tl.zeros([BLOCK_N, D_HI], dtype=tl.float32)
    dv_lo = tl.zeros([BLOCK_N, D_LO if D_LO > 0 else 16], dtype=tl.float32)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_q)
    for start in range(row_start, row_end, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < row_end
        q_hi, q_lo = _load_q(q_base, offs_m, row_ok, sq_n8, BLOCK_M, HEAD_DIM, D_HI, D_LO, UPCAST)
        do_hi, do_lo = _load_do(do_base, offs_m, row_ok, sdo_n8, lam, BLOCK_M, HEAD_DIM, D_HI, D_LO, UPCAST)
        lse = tl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + offs_m, mask=row_ok, other=0.0)
        dead = lse == float("-inf")
        if S_CHUNK == 0:
            s = _dot_t(q_hi, q_lo, k_hi, k_lo, D_LO, PRECISION)
        else:
            s = _dot_t_streamed(q_base, offs_m, row_ok, sq_n8, 1.0, k_base, offs_n, n_ok, sk_n8, BLOCK_M, BLOCK_N,
                                HEAD_DIM, S_CHUNK, PRECISION)
        s = _mask_scores(s * qk_scale, offs_m, offs_n, n_q, kv_len, mask_base, sm_n, sm_m, HAS_MASK, MASK_BOOL)
        p = tl.where(dead[:, None], 0.0, tl.exp2(s - tl.where(dead, 0.0, lse)[:, None]))
        pt = tl.trans(p.to(do_hi.dtype))
        dv_hi += tl.dot(pt, do_hi, input_precision=PRECISION)
        if S_CHUNK == 0:
            dp = _dot_t(do_hi, do_lo, v_hi, v_lo, D_LO, PRECISION)
        else:
            dp = _dot_t_streamed(do_base, offs_m, row_ok, sdo_n8, lam, v_base, offs_n, n_ok, sv_n8, BLOCK_M, BLOCK_N,
                                 HEAD_DIM, S_CHUNK, PRECISION)
        dst = tl.trans((p * (dp - delta[:, None])).to(q_hi.dtype))
        dk_hi += tl.dot(dst, q_hi, input_precision=PRECISION)
        if D_LO > 0:
            dv_lo += tl.dot(pt, do_lo, input_precision=PRECISION)
            dk_lo += tl.dot(dst, q_lo, input_precision=PRECISION)
    dk_hi *= softmax_scale
    dk_lo *= softmax_scale
    split = pid_s.to(tl.int64) * 8
    _store_chunks(_head_base(dk_ptr + split * sdk_s8, b, h, sdk_b8, sdk_h8), offs_n, n_ok, sdk_n8,
                  dk_hi, dk_lo, HEAD_DIM, D_HI, D_LO, False)
    _store_chunks(_head_base(dv_ptr + split * sdv_s8, b, h, sdv_b8, sdv_h8), offs_n, n_ok, sdv_n8, dv_hi, dv_lo,
                  HEAD_DIM, D_HI, D_LO, False)
    if REDUCE:
        # Every thread's partial stores come before the count (the barrier), the count is a release and
        # an acquire (acq_rel, gpu scope): the last split reads every other split's finished partials.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_bh.to(tl.int64) * tl.cdiv(kv_len, BLOCK_N) + pid_n, 1,
                                sem="acq_rel", scope="gpu")
        if arrived == n_split - 1:
            zero64 = pid_s.to(tl.int64) * 0   # the split offsets below in 64 bits
            for other in range(0, n_split):
                if other != pid_s:
                    at = (zero64 + other) * 8
                    dk_hi, dk_lo = _add_chunks(_head_base(dk_ptr + at * sdk_s8, b, h, sdk_b8, sdk_h8), offs_n, n_ok,
                                               sdk_n8, dk_hi, dk_lo, HEAD_DIM, D_HI, D_LO)
                    dv_hi, dv_lo = _add_chunks(_head_base(dv_ptr + at * sdv_s8, b, h, sdv_b8, sdv_h8), offs_n, n_ok,
                                               sdv_n8, dv_hi, dv_lo, HEAD_DIM, D_HI, D_LO)
            _store_chunks(_head_base(dkf_ptr, b, h, sdkf_b8, sdkf_h8), offs_n, n_ok, sdkf_n8, dk_hi, dk_lo,
                          HEAD_DIM, D_HI, D_LO, False)
            _store_chunks(_head_base(dvf_ptr, b, h, sdvf_b8, sdvf_h8), offs_n, n_ok, sdvf_n8, dv_hi, dv_lo,
                          HEAD_DIM, D_HI, D_LO, False)


def _bwd_tiles(d_pad: int, dtype: torch.dtype):
    """(BLOCK_M, num_warps, num_stages) of the backward kernels; fp32 (FMA-loop dots) takes 16-query
    tiles, 2 stages and 8 warps (4 warps spilled 0.2 KB in dk/dv at D_PAD 64; at D_PAD 256 they held the
    dq kernel to 128 registers and spilled 24 B at 160-wide heads under Triton 3.6, where 8 warps take
    64-80 registers and no spill under 3.6 and 3.9; sm_90, 2026-12-07), dk/dv its own warps at D_PAD
    256 (`_dkdv_warps`)."""
    if dtype == torch.float32:
        return 16, 8, 2
    return (64 if d_pad <= 128 else 32), (4 if d_pad <= 64 else 8), 3


def _bwd_common(d_len: int, dtype: torch.dtype) -> tuple[dict, int]:
    """(the constexprs and launch options both backward kernels share, BLOCK_M); the tiles are chosen
    by the power-of-two width of the head dim, its chunks per kernel (`_dkdv_chunks`)."""
    block_m, num_warps, num_stages = _bwd_tiles(_d_pad(d_len), dtype)
    return dict(HEAD_DIM=d_len, PRECISION=_precision(dtype), UPCAST=_upcast(dtype), num_warps=num_warps,
                num_stages=num_stages), block_m


def _dkdv_chunks(d_len: int, dtype: torch.dtype) -> tuple[int, int]:
    """(D_HI, D_LO) of the dk/dv kernel: the forwards' chunks (`_d_split`) for heads up to 64 wide
    (40 → 32 + 16); one power-of-two tile above, except 16-bit 80-wide heads, which
    `_dkdv_wgmma_80` takes as 64 + 16 with 64-key tiles. Its 32-key tiles at 80-wide heads keep K, V,
    dK and dV for the whole query walk, and split 64 + 16 they compiled (sm_90, ptxas) to 255
    registers and a 20 B spill, against 231 and none as one 128-wide tile. The dq kernel takes `_d_split` at every width
    (80 → 64 + 16: 116 registers and 2 blocks/SM, against 130 and 1). fp32 from 128-wide heads: two
    halves (128 → 64 + 64, 160 → 128 + 32, 256 → 128 + 128; sm_90: 168-208 registers at 128-wide heads
    where one tile took 255); there, from 160-wide heads, they are the dK, dV accumulators' and the Q,
    dO tiles' chunks, S and dP being formed from memory (`_dkdv_s_chunk`)."""
    whole = _d_pad(d_len)
    if dtype == torch.float32 and whole >= 128:
        # fp32 dots are FMA loops whose operands are held along the whole contraction (the head dim
        # in S = Q Kᵀ and dP = dO Vᵀ): halving it per dot halves that footprint.
        hi = whole // 2
        return hi, max(16, triton.next_power_of_2(d_len - hi))
    return _d_split(d_len, dtype) if whole <= 64 else (whole, 0)


def _dkdv_wgmma_80(d_len: int, dtype: torch.dtype) -> bool:
    """16-bit heads 65-80 wide (SD1.5's 32×32 level: 8×80) take 64-key tiles and the head dim as 64 + 16
    in the dk/dv kernel, so that every product is wgmma; 4 warps, 8 with a mask.
    sm_90, ptxas, 8×80 (2026-12-07): without a mask, Triton 3.9 252-255 registers, no spill, 81 KB
    shared, 2 blocks/SM, 26 HGMMA and no HMMA; Triton 3.6 (the GPU machines') 214-228, no spill, 101 KB.
    With a mask at 4 warps 3.9 spilled 24-48 B; at 8 warps 244-252 registers, no spill under 3.6 and
    3.9, 1 block/SM, 36 HGMMA and no HMMA. The 32-key form they replace (one 128-wide chunk, 8 warps):
    231-244 registers, 1 block/SM, 32 HGMMA + 32 HMMA (mma.sync), and 80-96 B of spills under 3.6
    with a mask."""
    return dtype != torch.float32 and _d_pad(d_len) == 128 and _d_split(d_len, dtype)[1] == 16


def _dkdv_s_chunk(d_len: int, dtype: torch.dtype) -> int:
    """S_CHUNK of the dk/dv kernel: fp32 from 160-wide heads (D_PAD 256) forms S and dP from memory 32
    head-dim columns at a time and holds no K, V; 0 (K, V held) everywhere else. sm_90, ptxas: at
    160-wide heads 249-253 registers and no spill, where K, V held as two 128-wide chunks spilled
    0.35-0.38 KB and as one 256-wide tile ~3 KB; 64-column steps took 255 registers."""
    return 32 if dtype == torch.float32 and _d_pad(d_len) > 128 else 0


def _dkdv_warps(d_len: int, dtype: torch.dtype, warps: int) -> int:
    """fp32 dk/dv at D_PAD 256: 8 warps for 160-wide heads (128 + 32 chunks: 16 warps spilled 136-144 B
    at their 128-register cap), 16 for wider ones (128 + 128: 128 registers and no spill at 16 warps,
    8 B at 8 warps, 0.3 KB at 4; sm_90, ptxas)."""
    if dtype == torch.float32 and _d_pad(d_len) > 128:
        return 16 if d_len > 192 else 8
    return warps


def _dkdv_block_n(block_n: int, d_pad: int, dtype: torch.dtype, masked: bool = False) -> int:
    """Key tile of the dk/dv kernel: it keeps K, V and the fp32 dK, dV accumulators of its tile in
    registers for the whole query walk, so wide heads take fewer keys; fp32 takes 16 (32 keys at
    D_PAD 64 spilled 396 B under ptxas, 64 × 256 6.6 KB). With a mask, 16 above 64-wide heads too
    (96-wide heads, 32 keys, 8 warps: 84 B spilled under Triton 3.6; 16 keys: 226 registers, none)."""
    if dtype == torch.float32:
        return min(block_n, 16)
    if d_pad <= 64:
        # The tile's rows are keys in all four products (Sᵀ, dPᵀ, dV, dK), and wgmma needs 64 of them:
        # a short key list (77 text tokens, 4 image tokens) still takes 64-key tiles, mostly masked.
        return 64
    return min(block_n, 32 if d_pad <= 128 and not masked else 16)


def _dq_block_n(block_n: int, dtype: torch.dtype) -> int:
    """Key tile of the dq kernel: fp32 (FMA-loop dots) takes 16 keys (32 spilled 12 B at D_PAD 64)."""
    return 16 if dtype == torch.float32 else block_n


def _dkdv_split(programs: int, q_tiles: int, sm_count: int) -> int:
    """Query splits of the dk/dv walk: enough programs for about 16 per SM (a short key list gives
    only a few key tiles per (b, h)), each split still walking at least 4 query tiles."""
    want = triton.cdiv(16 * sm_count, max(programs, 1))
    return max(1, min(want, q_tiles // 4))


def _launch_dkdv(q, k, v, grad_out, lse, delta, dk, dv, mask_args, lam, softmax_scale, block_m, block_n,
                 sm_count, flags, common):
    """dk, dv (like k, v; written) of one key/value set; splits the query walk when the grid is small."""
    batch, heads, n_q, d_len = q.shape
    kv_len = k.shape[2]
    if _dkdv_wgmma_80(d_len, q.dtype):
        block_n, (d_hi, d_lo) = 64, _d_split(d_len, q.dtype)
        common = dict(common, num_warps=8 if flags["HAS_MASK"] else 4)
    else:
        block_n = _dkdv_block_n(block_n, _d_pad(d_len), q.dtype, flags["HAS_MASK"])
        d_hi, d_lo = _dkdv_chunks(d_len, q.dtype)
        common = dict(common, num_warps=_dkdv_warps(d_len, q.dtype, common["num_warps"]))
    kv_tiles = triton.cdiv(kv_len, block_n)
    q_tiles = triton.cdiv(n_q, block_m)
    split = _dkdv_split(batch * heads * kv_tiles, q_tiles, sm_count)
    dk_out, dv_out = _writable(dk), _writable(dv)
    if split == 1:
        dk_dst, dv_dst, count = dk_out, dv_out, dk_out   # (count unused)
        dk_s8 = dv_s8 = 0
    else:
        # fp32 partial sums per split, added up by the last split of each key tile (see the kernel)
        dk_dst = _aligned_empty((split, *k.shape), torch.float32, k.device)
        dv_dst = _aligned_empty((split, *v.shape), torch.float32, v.device)
        dk_s8, dv_s8 = dk_dst.stride(0) // ALIGN, dv_dst.stride(0) // ALIGN
        count = torch.zeros(batch * heads * kv_tiles, dtype=torch.int32, device=k.device)
    rows_per_split = triton.cdiv(q_tiles, split) * block_m
    dk_view, dv_view = (dk_dst, dv_dst) if split == 1 else (dk_dst[0], dv_dst[0])
    _dual_bwd_dkdv_kernel[(batch * heads * kv_tiles * split,)](
        q, k, v, grad_out, lse, delta, dk_dst, dv_dst, mask_args[0], count, dk_out, dv_out,
        n_q, heads, kv_len, softmax_scale * LOG2E, softmax_scale, float(lam), split, rows_per_split,
        *_strides8(q), *_strides8(k), *_strides8(v), *_strides8(grad_out),
        dk_s8, *_strides8(dk_view), dv_s8, *_strides8(dv_view), *_strides8(dk_out), *_strides8(dv_out),
        *mask_args[1],
        BLOCK_M=block_m, BLOCK_N=block_n, D_HI=d_hi, D_LO=d_lo, S_CHUNK=_dkdv_s_chunk(d_len, q.dtype),
        REDUCE=split > 1, **flags, **common,
    )
    _copy_back(dk_out, dk)
    _copy_back(dv_out, dv)


def _dq_sets_per_launch(d_len: int) -> int:
    """Key/value sets one dq launch takes: all (up to MAX_CONDITIONS) for heads up to 64 wide, one above.
    sm_90, ptxas, SD1.5 fp16: two sets in one launch cost registers (8×40: 139-153 against 100-128, 3
    blocks/SM against 4; 8×80: 162 against 112-116 and 1 block/SM against 2; 8×160: 155, 1 block),
    and save the fp32 partial sum between launches and the second read of Q and dO: 18 → 6 bytes
    of dq traffic per element. Below 80-wide heads that is taken; above, per-set launches keep 2
    blocks/SM."""
    return MAX_CONDITIONS if _d_pad(d_len) <= 64 else 1


def _launch_dq(q, grad_out, sets, lse, grad_lse, delta, cond_stride, dq, mask_args, flags, softmax_scale,
               block_m, delta_given, common, sm_count=132):
    """dq (written; any float dtype) = Σ of the dQ of the key/value sets (k, v, λ, key tile): one launch
    for up to `_dq_sets_per_launch` sets, summed in registers; more sets chain launches through an fp32
    partial sum, and the last writes dq in its dtype. lse, grad_lse, delta: fp32 [.., b·h, n] buffers in which set
    j's rows start j·cond_stride elements in (0: the sets share one softmax). The mask applies to set 0."""
    batch, heads, n_q, d_len = q.shape
    d_hi, d_lo = _d_split(d_len, q.dtype)
    resident = not delta_given and _resident_keys(d_hi + d_lo, q.dtype, [k.shape[2] for k, _, _, _ in sets])
    per_launch = _dq_sets_per_launch(d_len)
    chunks = [sets[i:i + per_launch] for i in range(0, len(sets), per_launch)]
    if q.dtype == torch.float32 and _d_pad(d_len) > 128:
        if not delta_given and grad_lse is None:
            # fp32 keeps reading a zero LSE gradient here: without that load ptxas (Triton 3.9) held the
            # masked 160-wide dq to 64 registers and spilled 16 B (sm_90, 2026-12-08)
            grad_lse = torch.zeros_like(lse)
        if delta_given:
            # 2 stages held the 160-wide dq with Δ given (reference attention) to 64 registers and spilled
            # 4 B under Triton 3.6 and 3.9; 3 stages: 64-76 registers, no spill at 160 and 256 wide
            common = dict(common, num_stages=3)
    has_glse = grad_lse is not None
    flat = [t.reshape(-1) for t in (lse, grad_lse if has_glse else lse, delta)]   # (lse: a pointer not read)
    for c, (chunk, (dst, acc)) in enumerate(zip(chunks, _dq_targets(dq, len(chunks)))):
        off = c * per_launch * cond_stride
        used = len(chunk)
        chunk = chunk + [chunk[0]] * (MAX_CONDITIONS - used)  # unused slots: NUM_COND keeps them out of the code
        strides = []
        for k, v, _, _ in chunk:
            strides += [*_strides8(k), *_strides8(v)]
        masked = flags["HAS_MASK"] and c == 0
        lens = [k.shape[2] for k, _, _, _ in chunk]
        lams = [float(lam) if i < used else 0.0 for i, (_, _, lam, _) in enumerate(chunk)]
        head = [q, grad_out, *(t[off:] for t in flat), dst, acc, mask_args[0] if masked else q,
                *(t for k, v, _, _ in chunk for t in (k, v)), n_q, heads, softmax_scale * LOG2E, softmax_scale,
                cond_stride]
        tail = [*lens, *lams, *_strides8(q), *_strides8(grad_out), *_strides8(dst),
                *(mask_args[1] if masked else (0, 0, 0, 0)), *strides]
        consts = dict(NUM_COND=used, HAS_MASK=masked, MASK_BOOL=masked and flags["MASK_BOOL"], ACCUMULATE=c > 0,
                      HAS_GLSE=has_glse, D_HI=d_hi, D_LO=d_lo, **common)
        if resident:
            grid, per_program, plan = _resident_plan(n_q, batch * heads, lens, sm_count)
            _dual_bwd_dq_resident_kernel[grid](*head, per_program, *tail, **dict(consts, **plan))
            continue
        _dual_bwd_dq_kernel[(triton.cdiv(n_q, block_m) * batch * heads,)](
            *head, *tail, DELTA_GIVEN=delta_given, BLOCK_M=block_m,
            **{f"BLOCK_N{i}": _dq_block_n(bn, q.dtype) for i, (_, _, _, bn) in enumerate(chunk)}, **consts)


def _dq_targets(dq: torch.Tensor, launches: int) -> list:
    """(destination, partial-sum buffer) of each of `launches` dq launches (one per MAX_CONDITIONS key/value
    sets): all but the last write an fp32 partial sum that the next adds to, and the last writes dq in
    its own dtype, so a 16-bit dq is never formed in fp32 and converted afterwards. fp32 dq is its own
    buffer."""
    if launches == 1 or dq.dtype == torch.float32:
        return [(dq, dq)] * launches
    acc = torch.empty_strided(dq.shape, dq.stride(), dtype=torch.float32, device=dq.device)
    return [(acc, acc)] * (launches - 1) + [(dq, acc)]


def dual_cross_attention_backward_launch(grad_out: torch.Tensor, q: torch.Tensor, keys, values, scales, mask,
                                         softmax_scale: float, lse: torch.Tensor, grad_lse: torch.Tensor,
                                         dq: torch.Tensor, dks, dvs, sm_count: int = 132) -> None:
    """grad_out, q: [b h n d]; keys/values[j]: [b h mⱼ d]; mask: None or expanded [b h n m₀];
    lse, grad_lse: [conditions, b·h, n] float32 (the forward's LSE and its incoming gradient, or None);
    dq: [b h n d], fp32 or q's dtype (written); dks/dvs[j]: like keys/values[j] (written), or both None
    to skip condition j's dk/dv pass (its keys and values are frozen); sm_count: the device's SMs (sizes
    the dk/dv query split)."""
    batch, heads, n_q, d_len = q.shape
    q, grad_out = _aligned(q), _aligned(grad_out)
    keys, values = [_aligned(k) for k in keys], [_aligned(v) for v in values]
    dq_dst = _writable(dq)
    common, block_m = _bwd_common(d_len, q.dtype)
    delta = torch.empty((len(keys), batch * heads, n_q), dtype=torch.float32, device=q.device)
    split = _d_split(d_len, q.dtype)[1] > 0
    masked = mask is not None
    sets = [(k, v, lam, _block_n(k.shape[2], split=split, masked=masked and j == 0))
            for j, (k, v, lam) in enumerate(zip(keys, values, scales))]
    mask_args = (mask, mask.stride()) if masked else (q, (0, 0, 0, 0))
    flags = dict(HAS_MASK=masked, MASK_BOOL=masked and mask.dtype == torch.bool)
    # dq of every set first (it also writes each set's Δ), then each set's dk/dv.
    _launch_dq(q, grad_out, sets, lse, grad_lse, delta, batch * heads * n_q, dq_dst, mask_args, flags, softmax_scale,
               block_m, False, common, sm_count)
    _copy_back(dq_dst, dq)
    no_mask = dict(HAS_MASK=False, MASK_BOOL=False)
    for j, (k, v, lam, block_n) in enumerate(sets):
        if dks[j] is None:
            continue
        _launch_dkdv(q, k, v, grad_out, lse[j], delta[j], dks[j], dvs[j], mask_args if j == 0 else (q, (0, 0, 0, 0)),
                     lam, softmax_scale, block_m, block_n, sm_count, flags if j == 0 else no_mask, common)


def reference_attention_backward_launch(grad_out: torch.Tensor, q: torch.Tensor, out: torch.Tensor, sources,
                                        softmax_scale: float, lse: torch.Tensor, grad_lse: torch.Tensor,
                                        dq: torch.Tensor, grads, sm_count: int = 132) -> None:
    """grad_out, q, out: [b h n d]; sources: ((k_m, v_m), (k_p, v_p)), each [b h mᵢ d]; lse, grad_lse:
    [b·h, n] float32 (grad_lse None: no gradient into the LSE); dq: [b h n d], fp32 or q's dtype (written),
    or None to skip the dq pass; grads: ((dk_m, dv_m), (dk_p, dv_p)) like the sources (written), a pair
    (None, None) to skip that source's dk/dv pass. One softmax spans both sources, so
    Δ = rowsum(dO ∘ O) − g_lse is shared (computed here, so every pass can run without the others)."""
    batch, heads, n_q, d_len = q.shape
    q, grad_out, out = _aligned(q), _aligned(grad_out), _aligned(out)
    # Δ = rowsum(dO ∘ O) − g_lse in one pass over dO and O (as torch: fp32 copies of both, their
    # product and its sum, ~7× the traffic).
    delta = torch.empty((batch * heads, n_q), dtype=torch.float32, device=q.device)
    d_hi, d_lo = _d_split(d_len, q.dtype)
    rows = max(16, 4096 // _d_pad(d_len)) // (2 if q.dtype == torch.float32 else 1)  # ≤ 16 values a thread
    _row_dot_kernel[(triton.cdiv(n_q, rows) * batch * heads,)](
        grad_out, out, delta if grad_lse is None else grad_lse.contiguous(), delta, n_q, heads,
        *_strides8(grad_out), *_strides8(out),
        HEAD_DIM=d_len, BLOCK_M=rows, D_HI=d_hi, D_LO=d_lo, HAS_SUB=grad_lse is not None, num_warps=4)
    common, block_m = _bwd_common(d_len, q.dtype)
    block_n = 64 if _d_pad(d_len) <= 64 else 32     # dq at 80-128-wide heads: 64 keys took 161-174 regs, 1 block/SM
    flags = dict(HAS_MASK=False, MASK_BOOL=False)
    no_mask = (q, (0, 0, 0, 0))
    sets = []
    for k, v in sources:
        k, v = _aligned(k), _aligned(v)
        sets.append((k, v, 1.0, min(block_n, max(32 if _d_split(d_len, q.dtype)[1] else 16,
                                                 triton.next_power_of_2(k.shape[2])))))
    # One softmax over both sources: they share the LSE rows and Δ (cond_stride 0).
    if dq is not None:
        dq_dst = _writable(dq)
        _launch_dq(q, grad_out, sets, lse, grad_lse, delta, 0, dq_dst, no_mask, flags, softmax_scale, block_m, True,
                   common)
        _copy_back(dq_dst, dq)
    for (k, v, _, bn), (dk, dv) in zip(sets, grads):
        if dk is None:
            continue
        _launch_dkdv(q, k, v, grad_out, lse, delta, dk, dv, no_mask, 1.0, softmax_scale,
                     block_m, bn, sm_count, flags, common)
