"""Triton kernels for trajectory attention (specs/trajectory_attention.md).

Tensors: q, k, v, out are [b s f h d] views (any strides; s = latent pixels of one level); idx [f, n]
int32 and valid [f, n] uint8 give the pixel of trajectory n at frame f; rowptr [f·s + 1] / col [nnz]
int32 are the per-pixel CSR lists of the valid tokens landing on (f, p), ascending in n.

Forward, one program per (trajectory, batch), walking the heads (the trajectory's pixels, validity
and landing counts are read once for all heads). With GROUP = G > 1 (the `released` semantics) a
program's sequence is G consecutive trajectories, G·F rows (row r = frame r mod F of trajectory
G·m + r div F) under one softmax; everything below is per row and holds unchanged. GROUP = 1 compiles
to exactly the per-trajectory kernel (the row layout is chosen at compile time):
  gather the trajectory's F rows of q, k, v straight from the dense tensors (invalid rows are loaded
  as zeros, padded frames and padded head channels are masked), S = Q Kᵀ on the tensor cores with
  fp32 accumulation, softmax in fp32 (padded frames, and invalid ones when mask_invalid, are -inf
  keys), O = P V, and divide every row by the number of tokens landing on its pixel (rowptr). Then
    atomic mode:        atomic_add of O/count into an fp32 [b s f h d] accumulator (one launch;
                        summation order, hence the last bits, vary from run to run);
    deterministic mode: store O/count (input dtype) into a token buffer [b n f h d], then a second
                        launch sums, for every pixel, its CSR list in ascending n in fp32 and writes
                        the output once, 0 where nothing lands. Two launches, bitwise repeatable.
Backward, the same structure: the program recomputes P from the gathered rows (F ≤ 64 fits on chip,
so nothing from the forward is saved besides the inputs), reads dO at the token's pixel (its 1/count
is applied to the fp32 products), and forms dQ = dS K/√d, dK = dSᵀ Q/√d, dV = Pᵀ dO/count with
dS = P ∘ (dP − rowsum(P ∘ dP)), dP = dO/count Vᵀ (rowsum(P ∘ dP) = rowsum(dO/count ∘ O): O is not
recomputed). It works on Pᵀ (keys on rows) so that k, v and dO are prefetched with cp.async (see the
kernel); dQ and dV come out transposed and are written through transposed addresses. Where the
whole-tile form spills (fp32 IEEE products at 64 rows) the backward takes the queries in chunks
instead, FlashAttention-2 style (_bwd_query_chunks).
Each token's gradient goes back to the dense position it was gathered from: atomically, or through
token buffers and the same CSR reduction (the tokens that read (f, p) are exactly those landing on it).

Why one head at a time, not all heads of a token as one [F, heads, d] row with batched per-head
products (the sm_90 review's proposal): each head's 64-element fp16 row is 128 bytes at a 128-byte
offset in the token's row, so the per-head gathers already fetch whole lines, the same lines a
full-row gather would; the head loop is software-pipelined (the next head's rows arrive by cp.async
while this head computes); and a full-row tile pads 5 heads to 8. A compile experiment of the
full-row forward at SVD-xt L0 (25 frames, 5 x 64, fp16, sm_90, 2026-12-07): 8 warps 136 registers
(Triton 3.9, 1 block/SM) or 128 (3.6, 2 blocks/SM), 4 warps 227-240 (2 blocks/SM), synchronous
128-bit loads only (no cp.async: the whole tile must arrive before the first product) and 64
mma.sync per trajectory, against this kernel's 72 registers, 3 blocks/SM under 3.9, 9 cp.async and
12 mma.sync per head. It has no occupancy or traffic to gain, so it is not built.

Safety and limits: every index read from the tables (idx, rowptr, col) is clamped into its tensor and
the reduction reads only token rows the first launch wrote, so no table content reads or writes out of
bounds (ops/trajectory_attention.py checks the tables once, when a TrajectoryIndex is built). Grids are
one folded axis (axes 1 and 2 stop at 65,535 programs); offsets that can pass 2³¹ are int64.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp2 is the hardware instruction


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton 3.9's interpreter returns garbage from tl.dot on bfloat16 operands (seen while
    # writing this file); under the interpreter bf16 operands are widened first, which computes the
    # same exact products the tensor cores do. On a GPU UPCAST is False.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _gather_rows(ptr, base, pix, frame, ok, dd, s_s, s_f, s_d, D: tl.constexpr, ALIGN: tl.constexpr):
    # Row strides arrive in units of ALIGN elements (see _alignment): multiplying here tells the
    # compiler every row starts on a 16-byte boundary, so a row is read with 128-bit accesses.
    rows = (base + pix.to(tl.int64) * s_s + frame.to(tl.int64) * s_f) * ALIGN
    mask = ok[:, None] & (dd[None, :] < D)
    return tl.load(ptr + rows[:, None] + dd[None, :].to(tl.int64) * s_d, mask=mask, other=0.0)


@triton.jit
def _softmax(s, key_ok, KEY_AXIS: tl.constexpr):
    """Scores s (log2 domain) normalised over the keys, which run along KEY_AXIS (fp32)."""
    s = tl.where(tl.expand_dims(key_ok, 1 - KEY_AXIS), s, float("-inf"))
    m = tl.max(s, axis=KEY_AXIS)
    m = tl.where(m == float("-inf"), 0.0, m)  # queries with no key at all (mask_invalid, all invalid)
    p = tl.exp2(s - tl.expand_dims(m, KEY_AXIS))
    l = tl.sum(p, axis=KEY_AXIS)
    l = tl.where(l == 0.0, 1.0, l)
    return p / tl.expand_dims(l, KEY_AXIS)


@triton.jit
def _probs(q, k, key_ok, qk_scale, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Row-normalised attention probabilities (fp32) of one trajectory: P [BLOCK_F queries, BLOCK_F keys]."""
    return _softmax(_mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale, key_ok, 1)


@triton.jit
def _probs_t(k, q, key_ok, qk_scale, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The same transposed, keys on rows: Pᵀ [BLOCK_F keys, BLOCK_F queries], k the A operand."""
    return _softmax(_mm(k, tl.trans(q), PRECISION, UPCAST) * qk_scale, key_ok, 0)


@triton.jit
def _trajectory_rows(idx_ptr, valid_ptr, rowptr_ptr, n, n_traj, n_pix, nnz, b, fr, in_f, dd, sd_b, sd_x, sd_f,
                     D: tl.constexpr, MASK_INVALID: tl.constexpr, ATOMIC: tl.constexpr):
    """What forward and backward need of trajectory n, read once for all heads: its pixel per frame,
    validity, 1 / landing count of each token, the key mask, the [f, d] store mask, and the rows its
    results go to (the dense pixels when ATOMIC, else the per-token buffer).

    The tables are validated on the host when they are built (ops/trajectory_attention.py); here every
    index read from them is clamped into its tensor anyway, so no table content can make the kernel
    read or write out of bounds (a wrong table gives a wrong result, never a fault)."""
    at = fr.to(tl.int64) * n_traj + n
    pix = tl.load(idx_ptr + at, mask=in_f, other=0)
    pix = tl.minimum(tl.maximum(pix, 0), n_pix - 1).to(tl.int64)
    ok = (tl.load(valid_ptr + at, mask=in_f, other=0) != 0) & in_f
    row = fr.to(tl.int64) * n_pix + pix
    start = tl.minimum(tl.maximum(tl.load(rowptr_ptr + row, mask=ok, other=0), 0), nnz)
    end = tl.minimum(tl.maximum(tl.load(rowptr_ptr + row + 1, mask=ok, other=0), start), nnz)
    inv_count = 1.0 / tl.maximum(end - start, 1).to(tl.float32)
    key_ok = ok if MASK_INVALID else in_f
    mask = ok[:, None] & (dd[None, :] < D)
    if ATOMIC:
        dst_rows = b * sd_b + pix * sd_x + fr.to(tl.int64) * sd_f
    else:
        dst_rows = b * sd_b + n.to(tl.int64) * sd_x + fr.to(tl.int64) * sd_f
    return pix, ok, inv_count, key_ok, mask, dst_rows


@triton.jit
def _sequence_rows(r, frames, GROUP: tl.constexpr):
    """Rows r (a block of row numbers) of one attention sequence: (frame, member of the group, row in
    use). GROUP = 1: row r is frame r of the program's one trajectory; GROUP = G: row r is frame
    r mod F of member r div F."""
    if GROUP == 1:
        fr = r
        member = 0
        in_f = r < frames
    else:
        fr = r % frames
        member = r // frames
        in_f = r < GROUP * frames
    return fr, member, in_f


@triton.jit
def _program_ids(n_prog):
    """(block of trajectories, batch) of this program. One folded grid axis: axis 1 and 2 are limited
    to 65,535 programs, axis 0 to 2³¹ − 1; trajectories of one batch are neighbours."""
    pid = tl.program_id(0)
    return pid % n_prog, (pid // n_prog).to(tl.int64)


@triton.jit
def _traj_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, valid_ptr, rowptr_ptr, dst_ptr,
    n_traj, n_pix, nnz, n_prog, frames, heads, qk_scale,
    sq_b, sq_s, sq_f, sq_h, sq_d,
    sk_b, sk_s, sk_f, sk_h, sk_d,
    sv_b, sv_s, sv_f, sv_h, sv_d,
    sd_b, sd_x, sd_f, sd_h, sd_d,
    D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, TRAJ_PER_PROG: tl.constexpr,
    MASK_INVALID: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    pid_n, b = _program_ids(n_prog)
    fr, member, in_f = _sequence_rows(tl.arange(0, BLOCK_F), frames, GROUP)
    dd = tl.arange(0, BLOCK_D)
    for t in range(TRAJ_PER_PROG):
        m = pid_n * TRAJ_PER_PROG + t  # the program's t-th sequence: one trajectory or GROUP of them
        if m * GROUP < n_traj:
            n = m if GROUP == 1 else m * GROUP + member  # trajectory of each row (a scalar when GROUP = 1)
            pix, ok, inv_count, key_ok, mask, dst_rows = _trajectory_rows(
                idx_ptr, valid_ptr, rowptr_ptr, n, n_traj, n_pix, nnz, b, fr, in_f, dd, sd_b, sd_x, sd_f,
                D, MASK_INVALID, ATOMIC)
            dst_cols = dd[None, :].to(tl.int64) * sd_d
            for h in range(heads):
                h64 = tl.cast(h, tl.int64)  # h × a head stride can pass 2³¹ in a large tensor
                q = _gather_rows(q_ptr, b * sq_b + h64 * sq_h, pix, fr, ok, dd, sq_s, sq_f, sq_d, D, ALIGN)
                k = _gather_rows(k_ptr, b * sk_b + h64 * sk_h, pix, fr, ok, dd, sk_s, sk_f, sk_d, D, ALIGN)
                v = _gather_rows(v_ptr, b * sv_b + h64 * sv_h, pix, fr, ok, dd, sv_s, sv_f, sv_d, D, ALIGN)
                p = _probs(q, k, key_ok, qk_scale, PRECISION, UPCAST)
                o = _mm(p.to(v.dtype), v, PRECISION, UPCAST) * inv_count[:, None]
                dst = dst_ptr + ((dst_rows + h64 * sd_h) * ALIGN)[:, None] + dst_cols
                if ATOMIC:
                    tl.atomic_add(dst, o, mask=mask, sem="relaxed")
                else:
                    tl.store(dst, o.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _traj_attn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, idx_ptr, valid_ptr, rowptr_ptr, dq_ptr, dk_ptr, dv_ptr,
    n_traj, n_pix, nnz, n_prog, frames, heads, qk_scale, sm_scale,
    sq_b, sq_s, sq_f, sq_h, sq_d,
    sk_b, sk_s, sk_f, sk_h, sk_d,
    sv_b, sv_s, sv_f, sv_h, sv_d,
    so_b, so_s, so_f, so_h, so_d,
    sd_b, sd_x, sd_f, sd_h, sd_d,
    D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, TRAJ_PER_PROG: tl.constexpr,
    MASK_INVALID: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ALIGN: tl.constexpr, GROUP: tl.constexpr, Q_CHUNK: tl.constexpr,
):
    pid_n, b = _program_ids(n_prog)
    fr, member, in_f = _sequence_rows(tl.arange(0, BLOCK_F), frames, GROUP)
    dd = tl.arange(0, BLOCK_D)
    for t in range(TRAJ_PER_PROG):
        m = pid_n * TRAJ_PER_PROG + t  # the program's t-th sequence: one trajectory or GROUP of them
        if m * GROUP < n_traj:
            n = m if GROUP == 1 else m * GROUP + member  # trajectory of each row (a scalar when GROUP = 1)
            pix, ok, inv_count, key_ok, mask, dst_rows = _trajectory_rows(
                idx_ptr, valid_ptr, rowptr_ptr, n, n_traj, n_pix, nnz, b, fr, in_f, dd, sd_b, sd_x, sd_f,
                D, MASK_INVALID, ATOMIC)
            dst_cols = dd[None, :].to(tl.int64) * sd_d
            for h in range(heads):
                h64 = tl.cast(h, tl.int64)
                if Q_CHUNK < BLOCK_F:
                    _bwd_query_chunks(
                        q_ptr, k_ptr, v_ptr, do_ptr, idx_ptr, valid_ptr, rowptr_ptr, dq_ptr, dk_ptr, dv_ptr,
                        m, n_traj, n_pix, nnz, frames, b, h64, qk_scale, sm_scale,
                        pix, fr, ok, key_ok, mask, dst_rows, dd,
                        sq_b, sq_s, sq_f, sq_h, sq_d, sk_b, sk_s, sk_f, sk_h, sk_d,
                        sv_b, sv_s, sv_f, sv_h, sv_d, so_b, so_s, so_f, so_h, so_d,
                        sd_b, sd_x, sd_f, sd_h, sd_d,
                        D, BLOCK_F, BLOCK_D, MASK_INVALID, ATOMIC, PRECISION, UPCAST, ALIGN, GROUP, Q_CHUNK)
                else:
                    q = _gather_rows(q_ptr, b * sq_b + h64 * sq_h, pix, fr, ok, dd, sq_s, sq_f, sq_d, D, ALIGN)
                    k = _gather_rows(k_ptr, b * sk_b + h64 * sk_h, pix, fr, ok, dd, sk_s, sk_f, sk_d, D, ALIGN)
                    v = _gather_rows(v_ptr, b * sv_b + h64 * sv_h, pix, fr, ok, dd, sv_s, sv_f, sv_d, D, ALIGN)
                    do = _gather_rows(do_ptr, b * so_b + h64 * so_h, pix, fr, ok, dd, so_s, so_f, so_d, D, ALIGN)
                    off = ((dst_rows + h64 * sd_h) * ALIGN)[:, None] + dst_cols
                    # Transposed form (keys on rows). The pipeliner (Triton 3.9, sm_90) loads a gathered tile
                    # with cp.async, prefetching the next head, only when all its products read it in the same
                    # operand role (A, or A transposed); a tile read as B both ways is loaded synchronously.
                    # Here k and dO are read as A only (dQ and dV come out transposed and are written through
                    # transposed addresses), v by one product, and only q as B both ways: 3 of 4 tiles are
                    # prefetched (sm_90 AOT at 25 frames x 64: 9 LDGSTS, 1 LDG.E.128 per head loop).
                    pt = _probs_t(k, q, key_ok, qk_scale, PRECISION, UPCAST)         # [keys, queries]
                    dpt = tl.trans(_mm(do, tl.trans(v), PRECISION, UPCAST)) * inv_count[None, :]  # (dO/count Vᵀ)ᵀ
                    # rowsum(dO/count ∘ O) with O = P V is rowsum(P ∘ dP): no O to recompute.
                    delta = tl.sum(pt * dpt, axis=0)
                    dst_c = (pt * (dpt - delta[None, :])).to(q.dtype)                 # dSᵀ
                    dk = _mm(dst_c, q, PRECISION, UPCAST) * sm_scale
                    _write_grad(dk_ptr + off, dk, mask, ATOMIC)
                    p_c = tl.trans((pt * inv_count[None, :]).to(do.dtype))           # P / count
                    dvt = _mm(tl.trans(do), p_c, PRECISION, UPCAST)                   # (Pᵀ dO/count)ᵀ
                    _write_grad(dv_ptr + tl.trans(off), dvt, tl.trans(mask), ATOMIC)
                    dqt = _mm(tl.trans(k), dst_c, PRECISION, UPCAST) * sm_scale  # (dS K)ᵀ
                    _write_grad(dq_ptr + tl.trans(off), dqt, tl.trans(mask), ATOMIC)


@triton.jit
def _bwd_query_chunks(
    q_ptr, k_ptr, v_ptr, do_ptr, idx_ptr, valid_ptr, rowptr_ptr, dq_ptr, dk_ptr, dv_ptr,
    m, n_traj, n_pix, nnz, frames, b, h64, qk_scale, sm_scale,
    pix, fr, ok, key_ok, mask, dst_rows, dd,
    sq_b, sq_s, sq_f, sq_h, sq_d, sk_b, sk_s, sk_f, sk_h, sk_d,
    sv_b, sv_s, sv_f, sv_h, sv_d, so_b, so_s, so_f, so_h, so_d,
    sd_b, sd_x, sd_f, sd_h, sd_d,
    D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, MASK_INVALID: tl.constexpr,
    ATOMIC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr, GROUP: tl.constexpr,
    Q_CHUNK: tl.constexpr,
):
    """One head's backward with the queries taken Q_CHUNK rows at a time (FlashAttention-2's backward
    order): fp32 dK and dV accumulators stay on chip for all BLOCK_F keys, and each chunk of queries
    brings its q and dO rows, forms its columns of Pᵀ and dSᵀ (the softmax runs over the keys, all
    present), adds its share to dK and dV and writes its dQ rows. Only [BLOCK_F, Q_CHUNK] probability
    tiles are live instead of [BLOCK_F, BLOCK_F]. K and V are gathered again for every chunk (L1/L2
    hits after the first) rather than held: k is read in two operand layouts, and a register copy kept
    across the loop is what spilled. This is the launch for fp32 IEEE products at 64 rows (FMA loops;
    the whole-tile form spills 0.9-1.1 KB there). sm_90, ptxas -v, 25 frames x 2 trajectories x 64
    dims, 16 warps, 1 stage (2026-12-07): 107-109 registers, no spill, at Q_CHUNK = 32 (16 rows: 103,
    no spill, K and V read four times; K and V held across chunks: 304-376 B spills at 16 or 32).
    The key rows' tables (pix, fr, ok, key_ok, mask, dst_rows) come from the caller; each chunk reads
    its own query rows' (a few bytes, L1-resident)."""
    dk = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    dst_cols = dd[None, :].to(tl.int64) * sd_d
    for c in range(0, BLOCK_F, Q_CHUNK):
        fr_c, member_c, in_c = _sequence_rows(c + tl.arange(0, Q_CHUNK), frames, GROUP)
        n_c = m if GROUP == 1 else m * GROUP + member_c
        pix_c, ok_c, inv_c, _, mask_c, dst_rows_c = _trajectory_rows(
            idx_ptr, valid_ptr, rowptr_ptr, n_c, n_traj, n_pix, nnz, b, fr_c, in_c, dd, sd_b, sd_x, sd_f,
            D, MASK_INVALID, ATOMIC)
        k = _gather_rows(k_ptr, b * sk_b + h64 * sk_h, pix, fr, ok, dd, sk_s, sk_f, sk_d, D, ALIGN)
        v = _gather_rows(v_ptr, b * sv_b + h64 * sv_h, pix, fr, ok, dd, sv_s, sv_f, sv_d, D, ALIGN)
        q = _gather_rows(q_ptr, b * sq_b + h64 * sq_h, pix_c, fr_c, ok_c, dd, sq_s, sq_f, sq_d, D, ALIGN)
        do = _gather_rows(do_ptr, b * so_b + h64 * so_h, pix_c, fr_c, ok_c, dd, so_s, so_f, so_d, D, ALIGN)
        pt = _probs_t(k, q, key_ok, qk_scale, PRECISION, UPCAST)                  # [keys, chunk queries]
        dpt = tl.trans(_mm(do, tl.trans(v), PRECISION, UPCAST)) * inv_c[None, :]  # (dO/count Vᵀ)ᵀ
        delta = tl.sum(pt * dpt, axis=0)
        dst_c = (pt * (dpt - delta[None, :])).to(q.dtype)                         # dSᵀ
        dk += _mm(dst_c, q, PRECISION, UPCAST)
        dv += _mm((pt * inv_c[None, :]).to(do.dtype), do, PRECISION, UPCAST)
        dq = _mm(tl.trans(dst_c), k, PRECISION, UPCAST) * sm_scale
        _write_grad(dq_ptr + ((dst_rows_c + h64 * sd_h) * ALIGN)[:, None] + dst_cols, dq, mask_c, ATOMIC)
    off = ((dst_rows + h64 * sd_h) * ALIGN)[:, None] + dst_cols
    _write_grad(dk_ptr + off, dk * sm_scale, mask, ATOMIC)
    _write_grad(dv_ptr + off, dv, mask, ATOMIC)


@triton.jit
def _write_grad(ptr, g, mask, ATOMIC: tl.constexpr):
    """A token's gradient: added atomically at its dense position, or stored in the token buffer."""
    if ATOMIC:
        tl.atomic_add(ptr, g, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, g.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _csr_reduce_kernel(
    tok_ptr, rowptr_ptr, col_ptr, valid_ptr, out_ptr,
    n_pix, n_traj, nnz, frames, heads,
    st_b, st_n, st_f, st_h,
    so_b, so_s, so_f, so_h, so_d,
    D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, p, f, h] = Σ tok[b, n, f, h] over n in the CSR list of (f, p), in list order; 0 if empty.
    One folded grid axis over (pixel block, frame, batch), pixel blocks fastest. Row pointers are
    clamped into [0, nnz], column indices into [0, n_traj), and only tokens valid at the frame (the
    rows the first launch wrote) are read: no table content reads out of bounds or unwritten memory."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n_pix, BLOCK_P)
    pid_p = pid % n_blocks
    frame = ((pid // n_blocks) % frames).to(tl.int64)
    b = (pid // (n_blocks * frames)).to(tl.int64)
    pp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    dd = tl.arange(0, BLOCK_D)
    in_p = pp < n_pix
    d_ok = dd[None, :] < D
    row = frame * n_pix + pp
    start = tl.minimum(tl.maximum(tl.load(rowptr_ptr + row, mask=in_p, other=0), 0), nnz)
    count = tl.minimum(tl.maximum(tl.load(rowptr_ptr + row + 1, mask=in_p, other=0), start), nnz) - start
    longest = tl.max(count, axis=0)
    dst_rows = b * so_b + frame * so_f + pp.to(tl.int64) * so_s
    for h in range(heads):
        h64 = tl.cast(h, tl.int64)
        acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        tok_base = tok_ptr + b * st_b + frame * st_f + h64 * st_h
        for j in range(0, longest):
            here = j < count
            n = tl.load(col_ptr + start + j, mask=here, other=0)
            n = tl.minimum(tl.maximum(n, 0), n_traj - 1).to(tl.int64)
            here = here & (tl.load(valid_ptr + frame * n_traj + n, mask=here, other=0) != 0)
            vals = tl.load(tok_base + (n * st_n)[:, None] + dd[None, :], mask=here[:, None] & d_ok, other=0.0)
            acc += vals.to(tl.float32)
        dst = out_ptr + (dst_rows + h64 * so_h)[:, None] + dd[None, :].to(tl.int64) * so_d
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=in_p[:, None] & d_ok)


# ---------------------------------------------------------------------------------------------
# Launchers


def _blocks(frames: int, dim: int) -> tuple[int, int]:
    # tl.dot wants every dimension >= 16; the sequence (frames, or group x frames) and the head dim
    # are padded to powers of two.
    return max(16, triton.next_power_of_2(frames)), max(16, triton.next_power_of_2(dim))


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full fp32 products (IEEE: tf32 would lose 3 digits against the reference) unless
    the caller allows TF32 for matmuls (torch.backends.cuda.matmul.allow_tf32 = True), as in the other
    attention ops; 16-bit products ignore the setting."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and t.device.type != "cuda"


def _warps(block_f: int, block_d: int) -> int:
    # 2026-11-21, ptxas -v for sm_90 (tests/gpu_compile_check.py --stats): at 32 frames x 64 dims
    # four warps spill 240-970 bytes in the fp16/bf16 forward and backward; eight do not (forward)
    # or spill ~100 bytes (backward). Not yet timed on a GPU.
    return 4 if block_f * block_d < 32 * 64 else 8


def _launch_options(block_f: int, block_d: int, dtype: torch.dtype) -> dict:
    """num_warps and num_stages of both trajectory kernels. sm_90, ptxas -v, 64-row sequences (the
    released GROUP = 2 at 25 frames, 64-wide heads):
    - 16-bit: the backward at 16 warps is capped at 128 registers and spilled 8-88 B; at 8 warps it
      takes 176-236 registers and does not spill (one block per SM either way: 115-123 KB of shared
      memory). (2026-11-22)
    - fp32, IEEE products (FMA loops that hold each operand row along the whole contraction): 16 warps,
      1 stage: forward 64 registers, no spill (8 B at 3 stages, 172 B at 8 warps); the backward takes
      the queries 32 at a time (_query_chunk, _bwd_query_chunks): 107-109 registers, no spill (the
      whole-tile backward spilled 0.9-1.1 KB here, 1.6 KB at 3 stages, 2.5 KB at 2, 1.9 KB at 8 warps).
    - fp32 with TF32 allowed (tensor-core products): 8 warps, 2 stages: forward 128, backward 255
      registers, no spill (40 B at 3 stages, 332-408 B at 16 warps). (2026-12-07)"""
    if block_f >= 64 and dtype == torch.float32:
        if _precision(dtype) == "ieee":
            return dict(num_warps=16, num_stages=1)
        return dict(num_warps=8, num_stages=2)
    return dict(num_warps=_warps(block_f, block_d), num_stages=3)


def _query_chunk(block_f: int, dtype: torch.dtype) -> int:
    """Queries per step of the backward: all BLOCK_F rows at once, except for fp32 IEEE products at 64
    rows, which take them 32 at a time (_bwd_query_chunks) because the whole-tile form spills there."""
    if block_f >= 64 and dtype == torch.float32 and _precision(dtype) == "ieee":
        return 32
    return block_f


def _alignment(*tensors: torch.Tensor) -> int:
    """16 bytes in elements when every tensor starts 16-byte aligned with a unit head-dim stride and
    all its other strides multiples of 16 bytes, else 1. The kernels take the row strides divided by
    this and multiply back by the constant: then the compiler knows each gathered row is 16-byte
    aligned and reads it with 128-bit (and cp.async) accesses, which a runtime stride cannot promise
    at head dims like 40 (Triton only specialises integer arguments divisible by 16)."""
    strides = [s for t in tensors for s in t.stride()[:-1]]
    if all(s % 16 == 0 for s in strides):
        # Triton already specialises integer arguments divisible by 16; scaling again costs registers
        # (sm_90 ptxas at 25 frames x 64 dims: 76 -> 98 in the atomic forward, 78 -> 172 in fp32).
        return 1
    align = 16 // tensors[0].element_size()
    for t in tensors:
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any(s % align for s in t.stride()[:-1]):
            return 1
    return align


def _strides(align: int, *tensors: torch.Tensor) -> list[int]:
    """[b s f h] strides of each tensor in units of `align` elements, then its head-dim stride."""
    out = []
    for t in tensors:
        out += [s // align for s in t.stride()[:-1]] + [t.stride(-1)]
    return out


def _traj_per_prog(n_traj: int, interpreting: bool) -> int:
    # On a GPU one trajectory per program keeps enough programs in flight to hide the gather latency;
    # the interpreter pays per program, so there it walks several.
    return 32 if interpreting else 1


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _reduce(tok: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor, valid: torch.Tensor, out: torch.Tensor) -> None:
    """out [b s f h d] (any strides) = per-pixel sums of the token buffer tok [b n f h d] over the CSR lists."""
    batch, n_pix, frames, heads, dim = out.shape
    n_traj = tok.shape[1]
    if n_traj == 0 or col.numel() == 0:
        out.zero_()
        return
    block_d = max(16, triton.next_power_of_2(dim))
    block_p = 32 if block_d <= 64 else 16
    grid = (triton.cdiv(n_pix, block_p) * frames * batch,)
    _csr_reduce_kernel[grid](
        tok, rowptr, col, valid, out, n_pix, n_traj, col.numel(), frames, heads,
        tok.stride(0), tok.stride(1), tok.stride(2), tok.stride(3),
        *out.stride(),
        D=dim, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=4,
    )


def _empty(q: torch.Tensor, n_traj: int) -> bool:
    # Nothing to gather (no pixel, trajectory or batch): every output is 0, and no launch is needed.
    return q.numel() == 0 or n_traj == 0


def trajectory_attention_fwd(q, k, v, idx, valid, rowptr, col, out, mask_invalid: bool, deterministic: bool,
                             group: int = 1) -> None:
    """Writes out [b s f h d] (any strides). idx int32 [f, n], valid uint8 [f, n], rowptr/col int32;
    group (dividing n): trajectories per softmax."""
    batch, n_pix, frames, heads, dim = q.shape
    n_traj = idx.shape[1]
    if _empty(q, n_traj):
        out.zero_()
        return
    block_f, block_d = _blocks(frames * group, dim)
    tpp = _traj_per_prog(n_traj, _interpreting(q))
    n_prog = triton.cdiv(n_traj // group, tpp)
    qk_scale = dim ** -0.5 * LOG2E
    if deterministic:
        dst = torch.empty((batch, n_traj, frames, heads, dim), dtype=q.dtype, device=q.device)
    else:
        dst = out if (out.dtype == torch.float32) else torch.empty(out.shape, dtype=torch.float32, device=q.device)
        dst.zero_()
    align = _alignment(q, k, v, dst)
    _traj_attn_fwd_kernel[(n_prog * batch,)](
        q, k, v, idx, valid, rowptr, dst,
        n_traj, n_pix, col.numel(), n_prog, frames, heads, qk_scale,
        *_strides(align, q, k, v, dst),
        D=dim, BLOCK_F=block_f, BLOCK_D=block_d, TRAJ_PER_PROG=tpp,
        MASK_INVALID=mask_invalid, ATOMIC=not deterministic, PRECISION=_precision(q.dtype), UPCAST=_upcast(q),
        ALIGN=align, GROUP=group, **_launch_options(block_f, block_d, q.dtype),
    )
    if deterministic:
        _reduce(dst, rowptr, col, valid, out)
    elif dst is not out:
        out.copy_(dst)


def trajectory_attention_bwd(dout, q, k, v, idx, valid, rowptr, col, dq, dk, dv,
                             mask_invalid: bool, deterministic: bool, group: int = 1) -> None:
    """Writes dq, dk, dv ([b s f h d], any strides) from dout [b s f h d]; group as in the forward."""
    batch, n_pix, frames, heads, dim = q.shape
    n_traj = idx.shape[1]
    if _empty(q, n_traj):
        for grad in (dq, dk, dv):
            grad.zero_()
        return
    block_f, block_d = _blocks(frames * group, dim)
    tpp = _traj_per_prog(n_traj, _interpreting(q))
    n_prog = triton.cdiv(n_traj // group, tpp)
    if deterministic:
        shape = (batch, n_traj, frames, heads, dim)
        bufs = [torch.empty(shape, dtype=q.dtype, device=q.device) for _ in range(3)]
    else:
        bufs = [torch.zeros(q.shape, dtype=torch.float32, device=q.device) for _ in range(3)]
    align = _alignment(q, k, v, dout, *bufs)
    _traj_attn_bwd_kernel[(n_prog * batch,)](
        q, k, v, dout, idx, valid, rowptr, *bufs,
        n_traj, n_pix, col.numel(), n_prog, frames, heads, dim ** -0.5 * LOG2E, dim ** -0.5,
        *_strides(align, q, k, v, dout, bufs[0]),
        D=dim, BLOCK_F=block_f, BLOCK_D=block_d, TRAJ_PER_PROG=tpp,
        MASK_INVALID=mask_invalid, ATOMIC=not deterministic, PRECISION=_precision(q.dtype), UPCAST=_upcast(q),
        ALIGN=align, GROUP=group, Q_CHUNK=_query_chunk(block_f, q.dtype),
        **_launch_options(block_f, block_d, q.dtype),
    )
    for buf, grad in zip(bufs, (dq, dk, dv)):
        if deterministic:
            _reduce(buf, rowptr, col, valid, grad)
        else:
            grad.copy_(buf)
