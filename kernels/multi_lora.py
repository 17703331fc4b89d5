"""Triton kernels for the normalized multi-LoRA linear layer (specs/multi_lora.md, LiON-LoRA).

Two launches per call, for any number k of LoRAs:

shrink  z = x A_catᵀ over the rank-concatenated A ([R, d_in], R = Σ rᵢ). Program (i, m) owns BLOCK_M
        tokens and all rᵢ ranks of LoRA i, so its epilogue holds a whole zᵢ row and writes the
        per-token norm nᵢ(t) = sqrt(zᵢ Gᵢ zᵢᵀ) with Gᵢ = BᵢᵀBᵢ = FᵢᵀFᵢ (Fᵢ an r×r factor computed
        once on the host): nᵢ² = ‖zᵢ Fᵢᵀ‖², one small dot per rank chunk, no pass over d_out.
        The LoRA index is the fastest grid axis, so the k programs reading the same x tile run
        side by side and x comes from HBM once.
expand  y = x Wᵀ + b + Σᵢ coefᵢ(t) zᵢ Bᵢᵀ: one accumulator, K loop over d_in for the base weight,
        then over each LoRA's rank chunk of B_cat ([d_out, R]) with zᵢ scaled by sᵢcᵢ(t) as it is
        loaded; bias in the epilogue. With SEPARATE, the base tile is kept and the k outputs
        yᵢ = x Wᵀ + b + coefᵢ zᵢ Bᵢᵀ are written from the same launch ([k, M, d_out]).
        `output` normalisation computes cᵢ(t) = α_t/(nᵢ(t)+ε) from the shrink's norms on load.

Everything accumulates in fp32; z and y are stored in the input dtype. fp32 inputs use IEEE dots
(no TF32), so fp32 results match an fp32 reference. Launch configurations: one small config under
the interpreter (TRITON_INTERPRET=1); on a GPU, 128-wide tiles for Hopper, autotuned on the expand.
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
def _multi_lora_shrink_kernel(
    x_ptr, a_ptr, offsets_ptr, factor_t_ptr, z_ptr, norms_ptr,
    M, K,
    sxm, sxk, sar, sak, szm, szr, snm, snl,
    COMPUTE_NORMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, NORM_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    lora = tl.program_id(0)
    pid_m = tl.program_id(1)
    r_start = tl.load(offsets_ptr + lora)
    r_end = tl.load(offsets_ptr + lora + 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows_a = r_start + offs_r
    mask_m = offs_m < M
    mask_r = rows_a < r_end

    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * sxm + offs_k[None, :] * sxk
    a_ptrs = a_ptr + rows_a.to(tl.int64)[None, :] * sar + offs_k[:, None] * sak  # [BLOCK_K, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _dot(xt, at, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * sxk
        a_ptrs += BLOCK_K * sak

    z_ptrs = z_ptr + offs_m.to(tl.int64)[:, None] * szm + rows_a[None, :] * szr
    tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])

    if COMPUTE_NORMS:
        # nᵢ(t)² = zᵢ Gᵢ zᵢᵀ = ‖zᵢ Fᵢᵀ‖². Fᵢᵀ is zero-padded to BLOCK_R × BLOCK_R, and so are the
        # columns of acc past rᵢ (masked A rows), so padding adds nothing.
        zc = acc.to(x_ptr.dtype.element_ty)
        offs_c = tl.arange(0, NORM_CHUNK)
        f_base = factor_t_ptr + lora.to(tl.int64) * BLOCK_R * BLOCK_R
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in tl.static_range(0, BLOCK_R, NORM_CHUNK):
            ft = tl.load(f_base + offs_r[:, None] * BLOCK_R + (c0 + offs_c)[None, :])
            w = _dot(zc, ft.to(x_ptr.dtype.element_ty), tl.zeros((BLOCK_M, NORM_CHUNK), dtype=tl.float32),
                     DOT_PRECISION, UPCAST)
            sq += tl.sum(w * w, axis=1)
        tl.store(norms_ptr + offs_m.to(tl.int64) * snm + lora * snl, tl.sqrt(sq), mask=mask_m)


@triton.jit
def _multi_lora_expand_kernel(
    x_ptr, w_ptr, bias_ptr, z_ptr, b_ptr, offsets_ptr, scale_ptr, norms_ptr, y_ptr,
    M, N, K, n_lora, eps,
    sxm, sxk, swn, swk, szm, szr, sbn, sbr, snm, snl, syl, sym, syn,
    HAS_BIAS: tl.constexpr, NORM_OUTPUT: tl.constexpr, SEPARATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Grouped program order: GROUP_M row tiles share each column tile of W and B_cat in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(xt, wt, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    if NORM_OUTPUT:
        alpha = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for j in range(n_lora):
            alpha += tl.load(norms_ptr + rows * snm + j * snl, mask=mask_m, other=0.0)
        alpha = alpha / n_lora

    offs_r = tl.arange(0, BLOCK_R)
    out = acc
    for i in range(n_lora):
        r_start = tl.load(offsets_ptr + i)
        r_end = tl.load(offsets_ptr + i + 1)
        scale = tl.load(scale_ptr + i)
        if NORM_OUTPUT:
            n_i = tl.load(norms_ptr + rows * snm + i * snl, mask=mask_m, other=0.0)
            coef = scale * alpha / (n_i + eps)
        else:
            coef = tl.zeros((BLOCK_M,), dtype=tl.float32) + scale
        for r0 in range(r_start, r_end, BLOCK_R):
            ranks = r0 + offs_r
            mask_r = ranks < r_end
            zt = tl.load(z_ptr + rows[:, None] * szm + ranks[None, :] * szr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            zt = (zt.to(tl.float32) * coef[:, None]).to(dtype)
            bt = tl.load(b_ptr + cols[None, :] * sbn + ranks[:, None] * sbr,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # B_catᵀ tile [BLOCK_R, BLOCK_N]
            out = _dot(zt, bt, out, DOT_PRECISION, UPCAST)
        if SEPARATE:
            tl.store(y_ptr + i * syl + rows[:, None] * sym + cols[None, :] * syn, out.to(dtype),
                     mask=mask_m[:, None] & mask_n[None, :])
            out = acc
    if not SEPARATE:
        tl.store(y_ptr + rows[:, None] * sym + cols[None, :] * syn, out.to(dtype),
                 mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configurations.

def _expand_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


# Autotuned on the GPU only: under the interpreter there is one config, and timing it would be noise.
_expand = None if _INTERPRET else triton.autotune(
    configs=_expand_configs(), key=["M", "N", "K", "n_lora", "HAS_BIAS", "NORM_OUTPUT", "SEPARATE"],
)(_multi_lora_expand_kernel)


def _dot_flags(dtype: torch.dtype) -> dict:
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": _INTERPRET and dtype == torch.bfloat16}


def rank_block(max_rank: int) -> int:
    """The rank tile of the shrink: every rank of one LoRA in one program (≥ 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(int(max_rank)))


def multi_lora_shrink_launch(x: torch.Tensor, a_cat: torch.Tensor, offsets: torch.Tensor,
                             factor_t: torch.Tensor | None, z: torch.Tensor, norms: torch.Tensor | None,
                             max_rank: int) -> None:
    """x: [M, d_in] (any strides); a_cat: [R, d_in]; offsets: [k+1] int32 rank offsets;
    factor_t: [k, BR, BR] float32 zero-padded Fᵢᵀ with FᵢᵀFᵢ = BᵢᵀBᵢ, BR = rank_block(max_rank),
    or None; z: [M, R] (written); norms: [M, k] float32 (written when factor_t is given)."""
    M, K = x.shape
    n_lora = offsets.numel() - 1
    block_r = rank_block(max_rank)
    if _INTERPRET:
        block_m, block_k, warps, stages = 16, 32, 4, 1
    else:
        block_m = 64 if block_r >= 256 else 128
        block_k = 64
        warps = 8 if block_m * block_r >= 128 * 128 else 4
        stages = 3
    compute_norms = factor_t is not None
    if not compute_norms:
        factor_t, norms = z, z  # never read
    grid = (n_lora, triton.cdiv(M, block_m))
    _multi_lora_shrink_kernel[grid](
        x, a_cat, offsets, factor_t, z, norms,
        M, K,
        x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1), z.stride(0), z.stride(1),
        norms.stride(0) if compute_norms else 0, norms.stride(1) if compute_norms else 0,
        COMPUTE_NORMS=compute_norms, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
        NORM_CHUNK=min(block_r, 64), **_dot_flags(x.dtype),
        num_warps=warps, num_stages=stages,
    )


def multi_lora_expand_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             z: torch.Tensor, b_cat: torch.Tensor, offsets: torch.Tensor,
                             scale: torch.Tensor, norms: torch.Tensor | None, eps: float,
                             y: torch.Tensor, separate: bool, min_rank: int = 64) -> None:
    """x: [M, d_in]; weight: [d_out, d_in]; bias: [d_out] or None; z: [M, R]; b_cat: [d_out, R];
    offsets: [k+1] int32; scale: [k] float32 (sᵢ, times cᵢ for `weight`); norms: [M, k] float32 for
    `output` normalisation, else None; y: [M, d_out], or [k, M, d_out] with separate (written);
    min_rank: the smallest rᵢ (picks the rank tile)."""
    M, K = x.shape
    N = weight.shape[0]
    n_lora = offsets.numel() - 1
    norm_output = norms is not None
    y_lora_stride = y.stride(0) if separate else 0
    y2 = y[0] if separate else y
    args = (
        x, weight, bias if bias is not None else weight, z, b_cat, offsets, scale,
        norms if norm_output else scale, y,
        M, N, K, n_lora, float(eps),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), z.stride(0), z.stride(1),
        b_cat.stride(0), b_cat.stride(1),
        norms.stride(0) if norm_output else 0, norms.stride(1) if norm_output else 0,
        y_lora_stride, y2.stride(0), y2.stride(1),
    )
    flags = dict(HAS_BIAS=bias is not None, NORM_OUTPUT=norm_output, SEPARATE=bool(separate),
                 **_dot_flags(x.dtype))
    # The rank chunk of the expand's second K loop: small ranks don't pay for a 64-wide tile.
    block_r = min(32 if _INTERPRET else 64, rank_block(min_rank))
    if _INTERPRET:
        cfg = _expand_configs()[0]
        grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
        _multi_lora_expand_kernel[grid](*args, **flags, BLOCK_R=block_r, **cfg.kwargs,
                                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _expand[grid](*args, **flags, BLOCK_R=block_r)
