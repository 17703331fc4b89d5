"""Triton kernels for the normalized multi-LoRA linear layer (specs/multi_lora.md, LiON-LoRA).

The weights come from the op's weight cache (ops/multi_lora.py), laid out once per LoRA set:
A_cat [R, d_in] and B_cat [d_out, R] hold the k LoRAs side by side along the rank, each LoRA's rank
zero-padded to a multiple of the rank tile RT (16, 32 or 64), so every rank chunk starts aligned and
none needs a mask; R = Σ padded ranks. The static per-LoRA factor sᵢ (times cᵢ for `weight`) is
already folded into B_cat. Two launches per call, for any number k of LoRAs:

shrink        z = x A_catᵀ: a plain GEMM over [M, R] in BLOCK_M × BLOCK_R tiles (`none`, `weight`).
shrink_norm   `output` and `output_per_token`. Program m owns BLOCK_M tokens and loops over the k
              LoRAs: it writes zᵢ = x Aᵢᵀ, and the per-token norm nᵢ(t) = sqrt(zᵢ Gᵢ zᵢᵀ) with
              Gᵢ = γᵢ²BᵢᵀBᵢ = FᵢᵀFᵢ (Fᵢ an r×r factor computed once on the host, γᵢ the adapter's own
              lora_alpha/r): nᵢ² = ‖zᵢ Fᵢᵀ‖², one small dot per chunk, no pass over d_out.
              `output_per_token`: its epilogue, once all k norms of its rows are known, writes
              zsᵢ = cᵢ(t) zᵢ with cᵢ(t) = α_t/(nᵢ(t)+ε), α_t = meanᵢ nᵢ(t) (reading back its own z
              rows, which are still in L2). `output` (per sample): it writes the squared norms only,
              and a program takes one LoRA (grid: k × the row tiles), not all k.
sample_norm   `output` only: one program per sample sums its tokens' nᵢ(t)² ([M, k] float32, k floats a
              token) into nᵢ(b), and writes cᵢ(b) = α_b/(nᵢ(b)+ε), α_b = meanᵢ nᵢ(b) ([b, k]).
expand        y = x Wᵀ + b + zs B_catᵀ: ONE accumulator and one GEMM over K = d_in + R, a K loop over
              d_in for the base weight and then over R for the LoRAs, both unmasked along K where the
              shapes allow and software-pipelined (cp.async); the accumulator starts at the bias.
              With SEPARATE, the base tile is kept and the k outputs yᵢ = x Wᵀ + b + zsᵢ Bᵢᵀ are written from the
              same launch ([k, M, d_out]). With SAMPLE_COEF (`output`), zs is the unscaled z and each
              LoRA's z chunks are scaled on load by the row's cᵢ(b) (the LoRA loop then runs per LoRA,
              as with SEPARATE); the other normalisations compile exactly as without it.
output_bwd    the `output` norms' backward on the [M, R] tensors, two elementwise passes (row tiles, every
              LoRA of the rows in one program): pass 1 writes zs = ρ z (ρᵢ = α/(nᵢ+ε) of the row's group)
              and the per-row sums psᵢ(t) = Σ hbᵢ zᵢ (hb = g B_cat); pass 2, once the [groups, k]
              coefficients qᵢ = ∂L/∂nᵢ·γᵢ²/nᵢ are known, writes dz = ρ hb + q (z Gᵢ) and zq = q z,
              with z Gᵢ (Gᵢ = BᵢᵀBᵢ, r × r) formed in the pass on the tensor cores, never stored. Each
              replaces about ten PyTorch passes over fp32 copies.
expand_tma    the 16-bit expand on sm_90+ (every normalisation, SEPARATE and SAMPLE_COEF as above, and
              the backward's dx, which
              reads W's own storage as its [K, N] operand: W_KN): the same two loops with every operand
              tile brought in by TMA descriptors instead of cp.async (`_tma_expand` says where the
              operands allow it).

Everything accumulates in fp32; z, zs and y are stored in the input dtype (with SAMPLE_COEF the
scaled z chunk is rounded to it too, as the shrink's zs is). fp32 inputs use IEEE dots
(no TF32), so fp32 results match an fp32 reference; their tiles are smaller (no register spills on
sm_90). Launch configurations: one small config under the interpreter (TRITON_INTERPRET=1); on a
GPU, 128-row tiles, the expand autotuned per power-of-two bucket of M (never inside a CUDA-graph
capture: a key not tuned yet takes the first config there).
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # 2026-09: Triton's interpreter multiplies the raw bit patterns of bfloat16 dot operands
    # (triton-lang/triton#11584, "not supported yet"). UPCAST is set only under the interpreter for
    # bfloat16 inputs; compiled kernels always take the tensor-core path.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _shrink_tile(x_ptr, a_ptr, rows, mask_m, r0, n_rows, K, sxm, sxk, sar, sak,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, BLOCK_R] fp32: x[rows] @ A_cat[r0 : r0 + BLOCK_R]ᵀ; A rows from n_rows on read as 0.
    n_rows is a multiple of the rank tile, so the rank mask is constant over aligned groups."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < n_rows
    x_ptrs = x_ptr + rows[:, None] * sxm + offs_k[None, :] * sxk
    a_ptrs = a_ptr + (r0 + offs_r).to(tl.int64)[None, :] * sar + offs_k[:, None] * sak  # A_catᵀ [BLOCK_K, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _dot(xt, at, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * sxk
        a_ptrs += BLOCK_K * sak
    return acc


@triton.jit
def _multi_lora_shrink_kernel(
    x_ptr, a_ptr, z_ptr,
    M, K, R,
    sxm, sxk, sar, sak, szm,
    RANK_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # One folded grid axis (axis 1 stops at 65,535 programs), the rank tile fastest: the programs
    # reading the same x rows run side by side, so x comes from HBM once.
    n_r = tl.cdiv(R, BLOCK_R)
    pid_r = tl.program_id(0) % n_r
    pid_m = tl.program_id(0) // n_r
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    r0 = pid_r * BLOCK_R
    n_rows = tl.multiple_of(R - r0, RANK_TILE)
    acc = _shrink_tile(x_ptr, a_ptr, rows, mask_m, r0, n_rows, K, sxm, sxk, sar, sak,
                       BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION, UPCAST)
    offs_r = tl.arange(0, BLOCK_R)
    tl.store(z_ptr + rows[:, None] * szm + (r0 + offs_r)[None, :], acc.to(z_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (offs_r < n_rows)[None, :])


@triton.jit
def _multi_lora_shrink_norm_kernel(
    x_ptr, a_ptr, offsets_ptr, factor_t_ptr, z_ptr, zs_ptr, norms_ptr,
    M, K, n_lora, eps,
    sxm, sxk, sar, sak, szm, snm,
    RANK_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    NORM_CHUNK: tl.constexpr, PER_TOKEN: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # PER_TOKEN: norms_ptr gets nᵢ(t) and zs_ptr the scaled zs (`output_per_token`); a program takes
    # every LoRA of its rows (the scale needs all k norms). Otherwise (`output`, per sample) pass 1
    # alone, one LoRA a program (3x the programs at k = 3: 1,668 instead of 556 one-block-per-SM
    # programs at CogVideoX-5B, 12.6 waves on 132 SMs instead of 4.2), the LoRAs fastest on the grid
    # so the programs reading the same x rows run side by side: norms_ptr gets the squared norms
    # nᵢ(t)², which _multi_lora_sample_norm_kernel sums over each sample's tokens; zs_ptr is not touched.
    if PER_TOKEN:
        pid_m, first = tl.program_id(0), 0
        last = n_lora
    else:
        pid_m, first = tl.program_id(0) // n_lora, tl.program_id(0) % n_lora
        last = first + 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, NORM_CHUNK)
    f_base = factor_t_ptr + first * BLOCK_R * BLOCK_R

    # Pass 1, per LoRA: zᵢ (unscaled, kept for the backward) and nᵢ(t)² = ‖zᵢ Fᵢᵀ‖². Fᵢᵀ is
    # zero-padded to BLOCK_R × BLOCK_R, and so are the columns of acc past rᵢ, so padding adds nothing.
    for i in range(first, last):
        r_start = tl.multiple_of(tl.load(offsets_ptr + i), RANK_TILE)
        n_rows = tl.multiple_of(tl.load(offsets_ptr + i + 1) - r_start, RANK_TILE)
        acc = _shrink_tile(x_ptr, a_ptr, rows, mask_m, r_start, n_rows, K, sxm, sxk, sar, sak,
                           BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION, UPCAST)
        tl.store(z_ptr + rows[:, None] * szm + (r_start + offs_r)[None, :], acc.to(dtype),
                 mask=mask_m[:, None] & (offs_r < n_rows)[None, :])
        zc = acc.to(dtype)
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in tl.static_range(0, BLOCK_R, NORM_CHUNK):
            ft = tl.load(f_base + offs_r[:, None] * BLOCK_R + (c0 + offs_c)[None, :])
            w = _dot(zc, ft.to(dtype), tl.zeros((BLOCK_M, NORM_CHUNK), dtype=tl.float32), DOT_PRECISION, UPCAST)
            sq += tl.sum(w * w, axis=1)
        if PER_TOKEN:
            sq = tl.sqrt(sq)
        tl.store(norms_ptr + rows * snm + i, sq, mask=mask_m)
        f_base += BLOCK_R * BLOCK_R
    if PER_TOKEN:
        _per_token_scale(z_ptr, zs_ptr, norms_ptr, offsets_ptr, rows, mask_m, n_lora, eps, szm, snm,
                         RANK_TILE, BLOCK_M)


@triton.jit
def _per_token_scale(z_ptr, zs_ptr, norms_ptr, offsets_ptr, rows, mask_m, n_lora, eps, szm, snm,
                     RANK_TILE: tl.constexpr, BLOCK_M: tl.constexpr):
    """`output_per_token` epilogue of the shrink: zsᵢ = α_t/(nᵢ(t)+ε) · zᵢ for the rows of this program."""
    dtype = z_ptr.dtype.element_ty

    # Every norm of these rows is written; the barrier makes this program's global writes visible
    # to all its threads. zsᵢ = α_t/(nᵢ(t)+ε) · zᵢ, z read back from L2.
    tl.debug_barrier()
    alpha = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(n_lora):
        alpha += tl.load(norms_ptr + rows * snm + j, mask=mask_m, other=0.0)
    alpha = alpha / n_lora
    offs_t = tl.arange(0, RANK_TILE)
    for i in range(n_lora):
        r_start = tl.multiple_of(tl.load(offsets_ptr + i), RANK_TILE)
        chunks = (tl.load(offsets_ptr + i + 1) - r_start) // RANK_TILE
        coef = alpha / (tl.load(norms_ptr + rows * snm + i, mask=mask_m, other=0.0) + eps)
        for c in range(chunks):
            cols = r_start + c * RANK_TILE + offs_t
            zt = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=mask_m[:, None], other=0.0)
            tl.store(zs_ptr + rows[:, None] * szm + cols[None, :], (zt.to(tl.float32) * coef[:, None]).to(dtype),
                     mask=mask_m[:, None])


@triton.jit
def _row_group_norms(norms_ptr, offs_m, mask_m, rows_per_group, n_lora, snm, BLOCK_L: tl.constexpr):
    """The norms row of each row's group ([groups, k] float32, row stride snm) and α = meanⱼ nⱼ there."""
    nrow = norms_ptr + (offs_m // rows_per_group).to(tl.int64) * snm
    offs_l = tl.arange(0, BLOCK_L)
    n = tl.load(nrow[:, None] + offs_l[None, :], mask=mask_m[:, None] & (offs_l < n_lora)[None, :], other=0.0)
    return nrow, tl.sum(n, axis=1) / n_lora


@triton.jit
def _multi_lora_output_bwd_scale_kernel(z_ptr, hb_ptr, norms_ptr, offsets_ptr, zs_ptr, ps_ptr,
                                        M, rows_per_group, n_lora, eps, szm, shm, snm,
                                        RANK_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """`output` backward, pass 1, for BLOCK_M rows and every LoRA: zsᵢ = ρᵢ zᵢ (stored in z's dtype) and
    psᵢ(t) = Σ_c hbᵢ(t, c) zᵢ(t, c) in fp32 ([M, k] contiguous), over the padded ranks (z and hb are 0
    in the padding)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    nrow, alpha = _row_group_norms(norms_ptr, offs_m, mask_m, rows_per_group, n_lora, snm, BLOCK_L)
    offs_t = tl.arange(0, RANK_TILE)
    dtype = zs_ptr.dtype.element_ty
    for i in range(n_lora):
        r_start = tl.multiple_of(tl.load(offsets_ptr + i), RANK_TILE)
        chunks = (tl.load(offsets_ptr + i + 1) - r_start) // RANK_TILE
        rho = alpha / (tl.load(nrow + i, mask=mask_m, other=0.0) + eps)
        ps = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c in range(chunks):
            cols = r_start + c * RANK_TILE + offs_t
            zt = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
            ht = tl.load(hb_ptr + rows[:, None] * shm + cols[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
            tl.store(zs_ptr + rows[:, None] * szm + cols[None, :], (zt * rho[:, None]).to(dtype),
                     mask=mask_m[:, None])
            ps += tl.sum(ht * zt, axis=1)
        tl.store(ps_ptr + rows * n_lora + i, ps, mask=mask_m)


@triton.jit
def _multi_lora_output_bwd_dz_kernel(z_ptr, hb_ptr, gram_ptr, norms_ptr, q_ptr, offsets_ptr, dz_ptr, zq_ptr,
                                     M, rows_per_group, n_lora, eps, szm, shm, sgr, snm, sqm,
                                     RANK_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
                                     DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """`output` backward, pass 2: dzᵢ = ρᵢ hbᵢ + qᵢ (zᵢ Gᵢ) and zqᵢ = qᵢ zᵢ, both stored in z's dtype (dz
    and zq share z's row stride); qᵢ per group ([groups, k] float32, row stride sqm). zᵢ Gᵢ is formed
    here, one RANK_TILE-wide column chunk at a time on the tensor cores (fp32 accumulator, never
    stored): the rows' zᵢ chunks (L1/L2-resident after the first) against Gᵢ's [RANK_TILE, RANK_TILE]
    tiles. gram holds Gᵢ = BᵢᵀBᵢ in z's dtype at rows offsetsᵢ.. of LoRA i, columns 0.. of its padded
    rank (row stride sgr, zero in the padding)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    nrow, alpha = _row_group_norms(norms_ptr, offs_m, mask_m, rows_per_group, n_lora, snm, BLOCK_L)
    qrow = q_ptr + (offs_m // rows_per_group).to(tl.int64) * sqm
    offs_t = tl.arange(0, RANK_TILE)
    dtype = dz_ptr.dtype.element_ty
    for i in range(n_lora):
        r_start = tl.multiple_of(tl.load(offsets_ptr + i), RANK_TILE)
        chunks = (tl.load(offsets_ptr + i + 1) - r_start) // RANK_TILE
        rho = (alpha / (tl.load(nrow + i, mask=mask_m, other=0.0) + eps))[:, None]
        q = tl.load(qrow + i, mask=mask_m, other=0.0)[:, None]
        for c in range(chunks):
            zg = tl.zeros((BLOCK_M, RANK_TILE), dtype=tl.float32)
            for kc in range(chunks):
                k_idx = r_start + kc * RANK_TILE + offs_t
                zk = tl.load(z_ptr + rows[:, None] * szm + k_idx[None, :], mask=mask_m[:, None], other=0.0)
                gk = tl.load(gram_ptr + k_idx[:, None].to(tl.int64) * sgr + (c * RANK_TILE + offs_t)[None, :])
                zg = _dot(zk, gk, zg, DOT_PRECISION, UPCAST)
            cols = (r_start + c * RANK_TILE + offs_t)[None, :]
            zt = tl.load(z_ptr + rows[:, None] * szm + cols, mask=mask_m[:, None], other=0.0).to(tl.float32)
            ht = tl.load(hb_ptr + rows[:, None] * shm + cols, mask=mask_m[:, None], other=0.0).to(tl.float32)
            tl.store(dz_ptr + rows[:, None] * szm + cols, (ht * rho + zg * q).to(dtype), mask=mask_m[:, None])
            tl.store(zq_ptr + rows[:, None] * szm + cols, (zt * q).to(dtype), mask=mask_m[:, None])


@triton.jit
def _multi_lora_sample_norm_kernel(sq_ptr, norms_ptr, coef_ptr, T, n_lora, eps, ssq,
                                   BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr):
    """`output` (per sample): program b sums its T tokens' squared norms nᵢ(t)² ([M, k], the sample's
    rows consecutive) into nᵢ(b) = sqrt(Σₜ nᵢ(t)²) and writes nᵢ(b) and cᵢ(b) = α_b/(nᵢ(b)+ε),
    α_b = meanᵢ nᵢ(b), both [b, k] float32. [M, k] is small (k floats a token): one program a sample."""
    pid = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < n_lora
    ptrs = sq_ptr + (pid * T + offs_t)[:, None] * ssq + offs_l[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_L), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        acc += tl.load(ptrs, mask=(offs_t < T - t0)[:, None] & mask_l[None, :], other=0.0)
        ptrs += BLOCK_T * ssq
    n = tl.sqrt(tl.sum(acc, axis=0))          # [BLOCK_L], 0 in the padding lanes
    alpha = tl.sum(n, axis=0) / n_lora
    tl.store(norms_ptr + pid * n_lora + offs_l, n, mask=mask_l)
    tl.store(coef_ptr + pid * n_lora + offs_l, alpha / (n + eps), mask=mask_l)


@triton.jit
def _lora_tail(acc, zs_ptr, b_ptr, rows, cols, mask_m, mask_n, r_start, n_chunks, szm, sbn, coef,
               BLOCK_R: tl.constexpr, SCALE_Z: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + zs[rows, r_start : r_start + n_chunks·BLOCK_R] @ B_cat[cols, same]ᵀ. r_start is a multiple
    of BLOCK_R and the ranks are padded, so no rank mask: aligned, vectorised, pipelined loads.
    SCALE_Z: each z row is scaled by coef ([BLOCK_M] float32, this LoRA's per-sample cᵢ(b)) as it is
    loaded, rounded to the input dtype like the shrink's zs (the `output` prologue)."""
    offs_r = tl.arange(0, BLOCK_R)
    z_ptrs = zs_ptr + rows[:, None] * szm + (r_start + offs_r)[None, :]
    b_ptrs = b_ptr + cols[None, :] * sbn + (r_start + offs_r)[:, None]  # B_catᵀ tile [BLOCK_R, BLOCK_N]
    for _ in range(n_chunks):
        zt = tl.load(z_ptrs, mask=mask_m[:, None], other=0.0)
        if SCALE_Z:
            zt = (zt.to(tl.float32) * coef[:, None]).to(zt.dtype)
        bt = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        acc = _dot(zt, bt, acc, DOT_PRECISION, UPCAST)
        z_ptrs += BLOCK_R
        b_ptrs += BLOCK_R
    return acc


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row tiles share each column tile of W and B_cat in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _bias_start(bias_ptr, offs_n, mask_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The accumulator's start: the bias row broadcast over the tile, or zeros. Read as [BLOCK_N] over
    128–256 threads, the row is one 2-byte scalar load a thread; read as 16 aliased rows (row stride 0)
    it is 128-bit loads, and a max over the identical rows gives it back exactly. Before the K loop, not
    in the epilogue, it costs no registers beside the live accumulator (sm_90: 116 vs 123 at 128×128,
    8 warps)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        bias_ptrs = bias_ptr + tl.zeros((16, 1), tl.int32) + offs_n[None, :]
        bias = tl.max(tl.load(bias_ptrs, mask=mask_n[None, :], other=0.0).to(tl.float32), axis=0)
        acc += bias[None, :]
    return acc


@triton.jit
def _multi_lora_expand_kernel(
    x_ptr, w_ptr, bias_ptr, zs_ptr, b_ptr, offsets_ptr, coef_ptr, y_ptr,
    M, N, K, R, M_BUCKET, n_lora, T,
    sxm, sxk, swn, swk, szm, sbn, syl, sym, syn,
    HAS_BIAS: tl.constexpr, SEPARATE: tl.constexpr, SAMPLE_COEF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # M_BUCKET (the power of two ≥ M) is only the autotuning key. SAMPLE_COEF (`output`): zs is the
    # unscaled z, and row t's LoRA-i chunks are scaled by coef[t // T, i] on load (T tokens a sample).
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    dtype = x_ptr.dtype.element_ty

    x_ptrs = x_ptr + rows[:, None] * sxm + offs_k[None, :] * sxk
    w_ptrs = w_ptr + cols[None, :] * swn + offs_k[:, None] * swk  # Wᵀ tile [BLOCK_K, BLOCK_N]
    acc = _bias_start(bias_ptr, offs_n, mask_n, BLOCK_M, BLOCK_N, HAS_BIAS)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(xt, wt, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk

    out_ptrs = y_ptr + rows[:, None] * sym + cols[None, :] * syn
    out_mask = mask_m[:, None] & mask_n[None, :]
    coef_rows = coef_ptr + (offs_m // T) * n_lora  # read only with SAMPLE_COEF; int32: no 64-bit division
    if SEPARATE or SAMPLE_COEF:
        for i in range(n_lora):
            r_start = tl.multiple_of(tl.load(offsets_ptr + i), BLOCK_R)
            n_chunks = (tl.load(offsets_ptr + i + 1) - r_start) // BLOCK_R
            coef = tl.load(coef_rows + i, mask=mask_m, other=0.0) if SAMPLE_COEF else 0.0
            if SEPARATE:
                out = _lora_tail(acc, zs_ptr, b_ptr, rows, cols, mask_m, mask_n, r_start, n_chunks, szm, sbn,
                                 coef, BLOCK_R, SAMPLE_COEF, DOT_PRECISION, UPCAST)
                tl.store(out_ptrs, out.to(dtype), mask=out_mask)
                # Advance the pointers rather than index with i·syl, which overflows int32 once
                # k·M·d_out ≥ 2³¹ (350 K tokens at d = 3072, k = 3).
                out_ptrs += syl
            else:
                acc = _lora_tail(acc, zs_ptr, b_ptr, rows, cols, mask_m, mask_n, r_start, n_chunks, szm, sbn,
                                 coef, BLOCK_R, SAMPLE_COEF, DOT_PRECISION, UPCAST)
        if not SEPARATE:
            tl.store(out_ptrs, acc.to(dtype), mask=out_mask)
    else:
        out = _lora_tail(acc, zs_ptr, b_ptr, rows, cols, mask_m, mask_n, 0, R // BLOCK_R, szm, sbn,
                         0.0, BLOCK_R, False, DOT_PRECISION, UPCAST)
        tl.store(out_ptrs, out.to(dtype), mask=out_mask)


@triton.jit
def _lora_tail_tma(acc, z_desc, b_desc, off_m, off_n, r_start, r_end, coef,
                   BLOCK_R: tl.constexpr, SCALE_Z: tl.constexpr, UPCAST: tl.constexpr):
    """acc + zs[rows, r_start:r_end] @ B_cat[cols, r_start:r_end]ᵀ in BLOCK_R-wide boxes; SCALE_Z: each
    z tile scaled by coef (this LoRA's cᵢ(b) per row) between shared memory and the product."""
    for r0 in range(r_start, r_end, BLOCK_R):
        zt = z_desc.load([off_m, r0])
        if SCALE_Z:
            zt = (zt.to(tl.float32) * coef[:, None]).to(zt.dtype)
        acc = _dot(zt, tl.trans(b_desc.load([off_n, r0])), acc, "tf32", UPCAST)
    return acc


@triton.jit
def _multi_lora_expand_tma_kernel(
    x_desc, w_desc, z_desc, b_desc, bias_ptr, offsets_ptr, coef_ptr, y_ptr,
    M, N, K, R, M_BUCKET, n_lora, T, syl, sym,
    HAS_BIAS: tl.constexpr, W_KN: tl.constexpr, SEPARATE: tl.constexpr, SAMPLE_COEF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
):
    """The expand (y = x Wᵀ + b + zs B_catᵀ, one accumulator) with every operand tile brought in by
    the copy engine (Hopper's TMA: bulk asynchronous copies into shared memory, zero-filled past M, N,
    K and R): no address arithmetic, masks or register staging in the two loops, which Triton
    software-pipelines as it does the cp.async kernel's. 16-bit. The rank loop takes BLOCK_K ranks a
    step (padding past R arrives as zeros), except with SEPARATE or SAMPLE_COEF (as in the cp.async
    kernel), where it runs per LoRA in BLOCK_R steps (the z and B_cat boxes are BLOCK_R wide, so no
    step straddles two LoRAs): SEPARATE writes yᵢ = base + zsᵢ Bᵢᵀ for each LoRA from the kept base
    tile ([k, M, N], syl apart); SAMPLE_COEF (`output` per sample): zs is the unscaled z and each z
    tile is scaled by its rows' cᵢ(b) between shared memory and the product.
    W_KN: w_desc walks a [K, N] row-major matrix (Wᵀ's storage: the backward's dx = g W + dz A_cat
    reads W [d_out, d_in] as its [K, N] operand) in [BLOCK_K, BLOCK_N] boxes; else [N, K] in
    [BLOCK_N, BLOCK_K] boxes, transposed in shared memory for the product."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = _bias_start(bias_ptr, offs_n, mask_n, BLOCK_M, BLOCK_N, HAS_BIAS)
    for k0 in range(0, K, BLOCK_K):
        if W_KN:
            wt = w_desc.load([k0, off_n])
        else:
            wt = tl.trans(w_desc.load([off_n, k0]))
        acc = _dot(x_desc.load([off_m, k0]), wt, acc, "tf32", UPCAST)
    out_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * sym + offs_n[None, :]
    out_mask = (offs_m < M)[:, None] & mask_n[None, :]
    if SEPARATE or SAMPLE_COEF:
        coef_rows = coef_ptr + (offs_m // T) * n_lora  # read only with SAMPLE_COEF; int32: no 64-bit division
        for i in range(n_lora):
            coef = tl.load(coef_rows + i, mask=offs_m < M, other=0.0) if SAMPLE_COEF else 0.0
            r_start, r_end = tl.load(offsets_ptr + i), tl.load(offsets_ptr + i + 1)
            if SEPARATE:
                out = _lora_tail_tma(acc, z_desc, b_desc, off_m, off_n, r_start, r_end, coef, BLOCK_R, SAMPLE_COEF,
                                     UPCAST)
                tl.store(out_ptrs, out.to(y_ptr.dtype.element_ty), mask=out_mask)
                out_ptrs += syl  # advanced, not i·syl: that overflows int32 past 2³¹ elements
            else:
                acc = _lora_tail_tma(acc, z_desc, b_desc, off_m, off_n, r_start, r_end, coef, BLOCK_R, SAMPLE_COEF,
                                     UPCAST)
        if not SEPARATE:
            tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        for r0 in range(0, R, BLOCK_K):
            acc = _dot(z_desc.load([off_m, r0]), tl.trans(b_desc.load([off_n, r0])), acc, "tf32", UPCAST)
        tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------
# Launch configurations.

# Interpreter: one small config (timing it would be noise).
_INTERPRETER_EXPAND = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                                    num_warps=4, num_stages=1)
def _cfg(m, n, k, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


# Candidates per (dtype family, SEPARATE[, "sample"]); the first is the one used untuned (inside a graph
# capture).
# SEPARATE keeps the base tile besides the running one (two accumulators), so its tiles hold at most
# 64 fp32 accumulator values per thread: 128×256 and 128×128 at 4 warps spill ~700 B there on sm_90.
# fp32 (IEEE FMA dots, operands in registers): no 128×256 or 128×128 tile (128×256 spilled 70 KB); no
# 128×64 at 8 warps, and 64×128 at 2 stages (sm_90: ptxas held those to 128 registers and spilled 4-20 B at
# 32-rank chunks, 128×64 also at 2 stages).
_EXPAND_CONFIGS = {
    ("16bit", False): [_cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 4, 4),
                       _cfg(64, 128, 64, 4, 4)],
    ("16bit", True): [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4), _cfg(64, 256, 64, 8, 3)],
    ("fp32", False): [_cfg(64, 64, 32, 4, 3), _cfg(64, 128, 32, 8, 2)],
    ("fp32", True): [_cfg(64, 64, 32, 8, 3), _cfg(32, 64, 32, 4, 3)],
}
# SAMPLE_COEF (`output` per sample) scales the z tile in registers before its wgmma, which costs
# registers: at the CogVideoX-5B shape on sm_90, 16-bit 128×256 spills 24 B, 128×128 at 4 warps 240 B,
# and with SEPARATE 64×128 at 4 warps 56 B and 64×256 12 B; those candidates are left out.
_EXPAND_CONFIGS.update({
    ("16bit", False, "sample"): [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4)],
    ("16bit", True, "sample"): [_cfg(128, 128, 64, 8, 3)],
    ("fp32", False, "sample"): _EXPAND_CONFIGS[("fp32", False)],
    ("fp32", True, "sample"): _EXPAND_CONFIGS[("fp32", True)],
})
# Rows that the compiler cannot prove 16-byte aligned (d_in, d_out or a row stride not a multiple of 16
# elements, as Triton specialises integers, or a base pointer off 16 bytes) turn the 16-bit tiles' loads
# into scalar ones that are software-pipelined through registers: every tile above spilled there on
# sm_90 (84 B to 3.1 KB, at d_in = 24, d_out = 20). Such layouts (no real model's: their widths are
# multiples of 64) take smaller K steps and tiles.
for _separate in (False, True):
    for _tail in ((), ("sample",)):
        _EXPAND_CONFIGS[("16bit", _separate, *_tail, "unaligned")] = [_cfg(128, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 3)]
# SEPARATE with SAMPLE_COEF there: 128×64 at 8 warps and 64×64 at 4 warps took 255 registers and spilled
# 4-8 B under Triton 3.6 (the GPU machines'; 233 and none under 3.9); 64×64 at 8 warps and 32×64 at 4
# take 114-161 and no spill under both (sm_90, 2026-12-07).
_EXPAND_CONFIGS[("16bit", True, "sample", "unaligned")] = [_cfg(64, 64, 32, 8, 3), _cfg(32, 64, 32, 4, 3)]
EXPAND_TUNING_KEY = ["M_BUCKET", "N", "K", "R", "n_lora", "HAS_BIAS", "SEPARATE", "SAMPLE_COEF"]
_EXPAND_TUNERS = {family: triton.autotune(configs=configs, key=EXPAND_TUNING_KEY)(_multi_lora_expand_kernel)
                  for family, configs in _EXPAND_CONFIGS.items()}


def _tma_blocks(nargs) -> None:
    """Config pre-hook of the TMA expand: the descriptors' boxes follow the config's tiles (the rank
    boxes of zs and B_cat are BLOCK_R wide with SEPARATE or SAMPLE_COEF, else BLOCK_K)."""
    rank = nargs["BLOCK_R"] if nargs["SEPARATE"] or nargs["SAMPLE_COEF"] else nargs["BLOCK_K"]
    for name, rows, cols in (("x_desc", "BLOCK_M", nargs["BLOCK_K"]), ("w_desc", "BLOCK_N", nargs["BLOCK_K"]),
                             ("z_desc", "BLOCK_M", rank), ("b_desc", "BLOCK_N", rank)):
        nargs[name].block_shape = [nargs[rows], cols]
    if nargs["W_KN"]:
        nargs["w_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


# The TMA expand takes the 16-bit candidates of the cp.async kernel (the same tiles and stages: the copy
# engine moves what cp.async moved, without the address math), with the per-sample coefficient too: the
# tiles left out of the cp.async "sample" families because scaling z in registers spilled there do not
# spill with TMA (sm_90, Triton 3.6 / 3.9, CogVideoX-5B with SAMPLE_COEF: 128×256 190 / 197 registers,
# 128×128 at 4 warps 223 / 236; with SEPARATE too, 64×128 at 4 warps 206 / 212, 64×256 206 / 213).
_TMA_CONFIGS = {separate: [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages,
                                         pre_hook=_tma_blocks) for c in _EXPAND_CONFIGS[("16bit", separate)]]
                for separate in (False, True)}
_INTERPRETER_TMA = triton.Config(dict(_INTERPRETER_EXPAND.kwargs), num_warps=4, num_stages=1, pre_hook=_tma_blocks)
TMA_TUNING_KEY = ["M_BUCKET", "N", "K", "R", "n_lora", "HAS_BIAS", "W_KN", "SEPARATE", "SAMPLE_COEF"]
_TMA_TUNERS = {separate: triton.autotune(configs=configs, key=TMA_TUNING_KEY)(_multi_lora_expand_tma_kernel)
               for separate, configs in _TMA_CONFIGS.items()}
_TUNED: set = set()  # (family, key values) the autotuner has benchmarked, outside any graph capture


def m_bucket(m: int) -> int:
    """The autotuning bucket of a token count: the next power of two (a new M in a bucket reuses it)."""
    return 1 << max(0, (int(m) - 1).bit_length())


def _family(dtype: torch.dtype, separate: bool, sample_coef: bool = False, aligned: bool = True) -> tuple:
    family = ("fp32" if dtype == torch.float32 else "16bit", bool(separate))
    family = (*family, "sample") if sample_coef else family
    return family if aligned or dtype == torch.float32 else (*family, "unaligned")


def rows_aligned(tensors, sizes) -> bool:
    """Whether Triton's specialisation proves every operand row 16-byte aligned: base pointers on 16
    bytes, every non-unit stride and every masked extent (`sizes`) a multiple of 16 elements."""
    return (all(t.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in t.stride() if st != 1) for t in tensors)
            and all(n % 16 == 0 for n in sizes))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def expand_launcher(dtype: torch.dtype, separate: bool, key: tuple, capturing: bool, sample_coef: bool = False,
                    aligned: bool = True):
    """(kernel, fixed config or None). The autotuner for this dtype family, which tunes on the first
    call per key; but inside a CUDA-graph capture a key not tuned yet must not be benchmarked (the
    timing launches and synchronisations are illegal there): it runs the family's first config."""
    family = _family(dtype, separate, sample_coef, aligned)
    if capturing and (family, key) not in _TUNED:
        return _multi_lora_expand_kernel, _EXPAND_CONFIGS[family][0]
    _TUNED.add((family, key))
    return _EXPAND_TUNERS[family], None


def _dot_flags(dtype: torch.dtype) -> dict:
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": _INTERPRET and dtype == torch.bfloat16}


def _shrink_tiles(dtype: torch.dtype, block_r: int, norms: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) for a shrink tile of block_r ranks. 16-bit: 128 rows
    even at 256 ranks, so each A_cat slice is streamed through L2 once per 128 tokens (the `output`
    kernel, whose norm epilogue holds z as a dot operand besides the accumulator, spills there on
    sm_90 and takes 64 rows at 256 ranks), always 8 warps (4 spill at 32 ranks with unaligned
    d_in); fp32 (FMA dots) takes smaller tiles that fit the register file."""
    if _INTERPRET:
        return 16, 32, 4, 1
    if dtype == torch.float32:  # (the ops send fp32 `output` above 64 ranks to cuBLAS)
        # The `output` kernel at 3 stages: ptxas held it to 128 registers and spilled 4 B under Triton
        # 3.6 (the GPU machines'); at 2 stages 102-108 registers and no spill under 3.6 and 3.9.
        return (32, 32, 8, 2) if norms else (64 if block_r <= 64 else 32, 32, 4, 3)
    block_m = 64 if norms and block_r >= 256 else 128
    return block_m, 64, 8, 3


def multi_lora_shrink_launch(x: torch.Tensor, a_cat: torch.Tensor, z: torch.Tensor, rank_tile: int) -> None:
    """z = x A_catᵀ. x: [M, d_in] (any strides); a_cat: [R, d_in], R a multiple of rank_tile;
    z: [M, R] contiguous (written)."""
    M, K = x.shape
    R = a_cat.shape[0]
    block_r = min(triton.next_power_of_2(R), 64 if x.dtype == torch.float32 else 256)
    block_r = min(block_r, 32) if _INTERPRET else block_r
    block_r = max(block_r, rank_tile)
    block_m, block_k, warps, stages = _shrink_tiles(x.dtype, block_r)
    grid = (triton.cdiv(R, block_r) * triton.cdiv(M, block_m),)
    _multi_lora_shrink_kernel[grid](
        x, a_cat, z, M, K, R,
        x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1), z.stride(0),
        RANK_TILE=rank_tile, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, **_dot_flags(x.dtype),
        num_warps=warps, num_stages=stages,
    )


def multi_lora_shrink_norm_launch(x: torch.Tensor, a_cat: torch.Tensor, offsets: torch.Tensor,
                                  factor_t: torch.Tensor, z: torch.Tensor, zs: torch.Tensor,
                                  norms: torch.Tensor, eps: float, rank_tile: int, per_token: bool = True) -> None:
    """`output` normalisations. x: [M, d_in]; a_cat: [R, d_in]; offsets: [k+1] int32 padded rank
    offsets (multiples of rank_tile); factor_t: [k, BR, BR] float32 zero-padded Fᵢᵀ (BR ≥ every
    padded rank, a power of two); z: [M, R] contiguous (written: x A_catᵀ); norms: [M, k] float32
    contiguous (written: nᵢ(t) with per_token, else nᵢ(t)²); zs: [M, R] contiguous (written with
    per_token: z scaled by cᵢ(t); else not used)."""
    M, K = x.shape
    n_lora = offsets.numel() - 1
    block_r = factor_t.shape[-1]
    block_m, block_k, warps, stages = _shrink_tiles(x.dtype, block_r, norms=True)
    _multi_lora_shrink_norm_kernel[(triton.cdiv(M, block_m) * (1 if per_token else n_lora),)](
        x, a_cat, offsets, factor_t, z, zs, norms,
        M, K, n_lora, float(eps),
        x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1), z.stride(0), norms.stride(0),
        RANK_TILE=rank_tile, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
        NORM_CHUNK=min(block_r, 16 if x.dtype == torch.float32 else 32), PER_TOKEN=bool(per_token),
        **_dot_flags(x.dtype), num_warps=warps, num_stages=stages,
    )


def multi_lora_sample_norm_launch(sq: torch.Tensor, norms: torch.Tensor, coef: torch.Tensor, eps: float) -> None:
    """`output` (per sample). sq: [M, k] float32 squared per-token norms, M = b·T with each sample's T
    tokens consecutive; norms, coef: [b, k] float32 contiguous (written: nᵢ(b), cᵢ(b))."""
    samples, n_lora = norms.shape
    tokens = sq.shape[0] // samples
    block_t = 16 if _INTERPRET else 512
    _multi_lora_sample_norm_kernel[(samples,)](
        sq, norms, coef, tokens, n_lora, float(eps), sq.stride(0),
        BLOCK_T=block_t, BLOCK_L=triton.next_power_of_2(n_lora), num_warps=4,
    )


def _output_bwd_tiles(rank_tile: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, num_warps) of the `output` backward passes: 32 elements a thread per [M, R] tensor and
    chunk in 16 bits (16-byte accesses; 80-128 registers on sm_90), 16 in fp32 (32 took 234 registers
    in the dz pass)."""
    if _INTERPRET:
        return 16, 4
    elements = 2048 if dtype == torch.float32 else 4096
    return max(16, elements // rank_tile), 4


def multi_lora_output_bwd_scale_launch(z: torch.Tensor, hb: torch.Tensor, norms: torch.Tensor,
                                       offsets: torch.Tensor, eps: float, rank_tile: int,
                                       zs: torch.Tensor, ps: torch.Tensor) -> None:
    """`output` backward, pass 1. z, hb: [M, R] (unit column stride; z's padding columns 0); norms:
    [groups, k] float32, groups dividing M (each group M/groups consecutive rows); offsets: [k+1] int32
    padded rank offsets. Writes zs [M, R] (z's dtype and strides) and ps [M, k] float32 contiguous."""
    M, n_lora = z.shape[0], norms.shape[1]
    block_m, warps = _output_bwd_tiles(rank_tile, z.dtype)
    _multi_lora_output_bwd_scale_kernel[(triton.cdiv(M, block_m),)](
        z, hb, norms, offsets, zs, ps, M, M // norms.shape[0], n_lora, float(eps),
        z.stride(0), hb.stride(0), norms.stride(0),
        RANK_TILE=rank_tile, BLOCK_M=block_m, BLOCK_L=triton.next_power_of_2(n_lora), num_warps=warps,
    )


def multi_lora_output_bwd_dz_launch(z: torch.Tensor, hb: torch.Tensor, gram: torch.Tensor, norms: torch.Tensor,
                                    q: torch.Tensor, offsets: torch.Tensor, eps: float, rank_tile: int,
                                    dz: torch.Tensor, zq: torch.Tensor) -> None:
    """`output` backward, pass 2. z, hb: [M, R] (unit column stride); gram: [R, P] in z's dtype (unit
    column stride), LoRA i's Gram at rows offsets[i].. and columns 0.. of its padded rank (P ≥ every
    padded rank; zero in the padding); norms, q: [groups, k] float32 (unit column stride). Writes dz and
    zq, [M, R] in z's dtype with z's strides."""
    M, n_lora = z.shape[0], norms.shape[1]
    block_m, warps = _output_bwd_tiles(rank_tile, z.dtype)
    _multi_lora_output_bwd_dz_kernel[(triton.cdiv(M, block_m),)](
        z, hb, gram, norms, q, offsets, dz, zq, M, M // norms.shape[0], n_lora, float(eps),
        z.stride(0), hb.stride(0), gram.stride(0), norms.stride(0), q.stride(0),
        RANK_TILE=rank_tile, BLOCK_M=block_m, BLOCK_L=triton.next_power_of_2(n_lora), num_warps=warps,
        **_dot_flags(z.dtype),
    )


def _tma_expand(x: torch.Tensor, weight: torch.Tensor, zs: torch.Tensor, b_cat: torch.Tensor, y: torch.Tensor,
                separate: bool, coef: torch.Tensor | None) -> bool:
    """Whether an expand on a TMA-capable GPU takes the TMA kernel: 16-bit (every normalisation, SEPARATE
    and the per-sample coefficient included), and every operand a 2-D tensor a descriptor can address
    (unit inner stride, rows and base on 16 bytes, not empty; y per LoRA with SEPARATE), the weight either
    way round (the backward's dx expand passes Wᵀ, a transposed view of a row-major W)."""
    def addressable(t):
        return (t.dim() == 2 and t.numel() > 0 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
                and t.data_ptr() % 16 == 0)
    return (x.dtype in (torch.float16, torch.bfloat16)
            and (addressable(weight) or addressable(weight.T))
            and all(addressable(t) for t in (x, zs, b_cat, y[0] if separate else y)))


def _expand_tma_launch(x, weight, bias, zs, b_cat, offsets, coef, y, separate, rank_chunk) -> None:
    """The TMA expand: descriptors over x [M, K], the weight ([N, K], or its row-major [K, N] storage when
    it is a transposed view), zs [M, R], B_cat [N, R] (boxes set per config by `_tma_blocks`), autotuned
    per key like the cp.async kernel. coef: None or the per-sample [b, k] cᵢ(b); with it or with
    `separate` (y [k, M, N]) the LoRAs are walked one by one in rank steps of rank_chunk."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = x.shape
    N, R = weight.shape[0], zs.shape[1]
    n_lora = offsets.numel() - 1
    w_kn = weight.stride(1) != 1
    separate, sample = bool(separate), coef is not None
    descs = [TensorDescriptor.from_tensor(t, [16, 16]) for t in (x, weight.T if w_kn else weight, zs, b_cat)]
    args = (*descs, bias if bias is not None else y, offsets, coef if sample else y, y, M, N, K, R, m_bucket(M),
            n_lora, M // coef.shape[0] if sample else 1, y.stride(0) if separate else 0, y.stride(-2))
    flags = dict(HAS_BIAS=bias is not None, W_KN=w_kn, SEPARATE=separate, SAMPLE_COEF=sample,
                 BLOCK_R=rank_chunk if separate or sample else None, UPCAST=_INTERPRET and x.dtype == torch.bfloat16)
    key = ("tma", separate, sample, m_bucket(M), N, K, R, n_lora, bias is not None, w_kn)
    cfg = None
    if _INTERPRET:
        cfg = _INTERPRETER_TMA
    elif _capturing(x.device) and key not in _TUNED:
        cfg = _TMA_CONFIGS[separate][0]
    else:
        _TUNED.add(key)
    if cfg is None:
        _TMA_TUNERS[separate][lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](
            *args, **flags)
        return
    _tma_blocks(dict(zip(("x_desc", "w_desc", "z_desc", "b_desc"), descs), **flags, **cfg.kwargs))
    grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
    _multi_lora_expand_tma_kernel[grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                        num_stages=cfg.num_stages)


def multi_lora_expand_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             zs: torch.Tensor, b_cat: torch.Tensor, offsets: torch.Tensor,
                             y: torch.Tensor, separate: bool, rank_tile: int,
                             coef: torch.Tensor | None = None, tma: bool = False) -> None:
    """y = x Wᵀ + b + zs B_catᵀ (or per LoRA with separate). x: [M, d_in]; weight: [d_out, d_in];
    bias: [d_out] or None; zs: [M, R] contiguous (z with its per-token coefficient applied, or, with
    coef, the unscaled z); coef: None or [b, k] float32 per-sample cᵢ(b) (M = b·T, samples consecutive);
    b_cat: [d_out, R] contiguous, scales folded in; offsets: [k+1] int32 padded rank offsets;
    y: [M, d_out], or [k, M, d_out] with separate (written). tma: the device has the copy engine's
    tensor loads (sm_90+): where `_tma_expand` allows, the TMA kernel runs."""
    # The rank chunk of the LoRA loop (a divisor of the rank tile, so chunks stay aligned). fp32 FMA
    # dots hold both operands in registers: 64-deep chunks spill there on sm_90, and 32-deep ones spilled
    # 4-12 B in 64×128 tiles (2 stages under Triton 3.6, 3 under 3.9); 16-deep take 128-239 registers
    # and no spill in every fp32 config under both (2026-12-07).
    chunk = min(rank_tile, 16 if x.dtype == torch.float32 else 64)
    if tma and _tma_expand(x, weight, zs, b_cat, y, separate, coef):
        _expand_tma_launch(x, weight, bias, zs, b_cat, offsets, coef, y, separate, chunk)
        return
    M, K = x.shape
    N = weight.shape[0]
    R = zs.shape[1]
    n_lora = offsets.numel() - 1
    y2 = y[0] if separate else y
    tokens = M // coef.shape[0] if coef is not None else 1
    args = (
        x, weight, bias if bias is not None else weight, zs, b_cat, offsets, coef if coef is not None else zs, y,
        M, N, K, R, m_bucket(M), n_lora, tokens,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), zs.stride(0), b_cat.stride(0),
        y.stride(0) if separate else 0, y2.stride(0), y2.stride(1),
    )
    flags = dict(HAS_BIAS=bias is not None, SEPARATE=bool(separate), SAMPLE_COEF=coef is not None, BLOCK_R=chunk,
                 **_dot_flags(x.dtype))
    if _INTERPRET:
        kernel, cfg = _multi_lora_expand_kernel, _INTERPRETER_EXPAND
    else:
        key = (m_bucket(M), N, K, R, n_lora, bias is not None, bool(separate), coef is not None)
        aligned = rows_aligned([t for t in (x, weight, bias, zs, b_cat, y) if t is not None], (K, N))
        kernel, cfg = expand_launcher(x.dtype, separate, key, _capturing(x.device), sample_coef=coef is not None,
                                      aligned=aligned)
    if cfg is not None:
        grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
        kernel[grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    kernel[grid](*args, **flags)
