"""trajectory_attention: Triton kernels (forward, backward; deterministic and atomic) against the float64
reference, the reference against autograd/gradcheck and against the official computation, and input checks."""
import pytest
import torch
from einops import rearrange

import lightmotion_fast
from lightmotion_fast.ops.trajectory_attention import TrajectoryIndex, trajectory_attention
from lightmotion_fast.reference.trajectory_attention import (
    incoming_csr,
    landed,
    level_indices,
    official_trajectory_branch,
    trajectory_attention_backward_reference,
    trajectory_attention_reference,
)
from lm_testing import record_launches

# Tolerances relative to the largest reference magnitude (outputs and gradients round to the dtype).
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_case(batch, height, width, frames, heads, dim, n, p_valid=0.8, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(frames, n, 2, generator=g) * torch.tensor([width * 8.0, height * 8.0])
    valid = torch.rand(frames, n, generator=g) < p_valid
    idx = level_indices(coords, (height * 8, width * 8), (height, width))
    q, k, v = (torch.randn(batch, height * width, frames, heads, dim, generator=g, dtype=torch.float64)
               for _ in range(3))
    return [t.to(device) for t in (q, k, v)], idx.to(device), valid.to(device)


def close(got, want, dtype, what):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    assert err <= REL_TOL[dtype] * scale, f"{what}: max error {err:.3g} > {REL_TOL[dtype]} x {scale:.3g}"


# (batch, h, w, frames, heads, dim, n): odd frames, odd h×w, n not a multiple of any block, head dims 40-128
SHAPES = [
    (1, 3, 5, 5, 1, 40, 13),
    (2, 3, 5, 9, 2, 64, 11),
    (1, 2, 3, 33, 1, 128, 5),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(shape, dtype, device, poisoned):
    (q, k, v), idx, valid = make_case(*shape, device=device)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    for mask_invalid, deterministic in ((False, True), (True, False)):
        want = trajectory_attention_reference(q.double(), k.double(), v.double(), idx, valid, mask_invalid)
        with lightmotion_fast.backend("triton"):
            got = trajectory_attention(q, k, v, idx, valid, mask_invalid=mask_invalid, deterministic=deterministic)
        assert got.dtype == dtype and got.shape == q.shape
        close(got, want, dtype, f"out (mask_invalid={mask_invalid}, deterministic={deterministic})")


@pytest.mark.parametrize("shape, dtype, deterministic, mask_invalid", [
    (SHAPES[0], torch.float32, True, False),
    (SHAPES[1], torch.float32, False, True),
    (SHAPES[1], torch.float16, True, True),
    (SHAPES[0], torch.float16, False, False),
    (SHAPES[1], torch.bfloat16, True, False),
    (SHAPES[2], torch.bfloat16, False, True),
    (SHAPES[2], torch.float32, True, True),
], ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_backward_matches_reference(shape, dtype, deterministic, mask_invalid, device, poisoned):
    (q, k, v), idx, valid = make_case(*shape, device=device, seed=1)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    with lightmotion_fast.backend("triton"):
        out = trajectory_attention(q, k, v, idx, valid, mask_invalid=mask_invalid, deterministic=deterministic)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = trajectory_attention_backward_reference(dout.double(), q.detach().double(), k.detach().double(),
                                                   v.detach().double(), idx, valid, mask_invalid)
    for name, g, w in zip("qkv", grads, want):
        assert g.dtype == dtype
        close(g, w, dtype, f"d{name}")


# The backward works on Pᵀ (keys on rows) and writes dQ, dV through transposed addresses; every head of
# a token is gathered from its [h d] row. Heads 1-5 at head dims 40 and 64 (the 16-byte-aligned path at
# 40, the stride-specialised one at 64), odd frames, one trajectory with no valid frame.
@pytest.mark.parametrize("heads, dim", [(1, 40), (2, 64), (3, 40), (4, 64), (5, 40), (5, 64)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_heads_forward_and_backward_match_float64(heads, dim, dtype, device, poisoned):
    (q, k, v), idx, valid = make_case(1, 3, 3, 7, heads, dim, 6, device=device, seed=10 + heads)
    valid[:, 0] = False
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    qd, kd, vd = (t.detach().double() for t in (q, k, v))
    for mask_invalid, deterministic in ((heads % 2 == 0, True), (heads % 2 == 1, False)):
        with lightmotion_fast.backend("triton"):
            out = trajectory_attention(q, k, v, idx, valid, mask_invalid=mask_invalid, deterministic=deterministic)
        what = f"(mask_invalid={mask_invalid}, deterministic={deterministic})"
        close(out, trajectory_attention_reference(qd, kd, vd, idx, valid, mask_invalid), dtype, "out " + what)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        want = trajectory_attention_backward_reference(dout.double(), qd, kd, vd, idx, valid, mask_invalid)
        for name, g, w in zip("qkv", grads, want):
            close(g, w, dtype, f"d{name} " + what)


def test_permuted_views_need_no_copy(device, poisoned):
    # The processor hands [(b s), f, (h d)] projections; a transposed view must give the same result.
    (q, k, v), idx, valid = make_case(2, 3, 4, 6, 2, 48, 20, device=device, seed=2)
    q, k, v = (t.float() for t in (q, k, v))
    qt = rearrange(q, "b s f h d -> b f s h d").contiguous().transpose(1, 2)
    want = trajectory_attention_reference(q.double(), k.double(), v.double(), idx, valid)
    with lightmotion_fast.backend("triton"):
        got = trajectory_attention(qt, k, v, idx, valid)
    close(got, want, torch.float32, "out from a strided q")


def test_deterministic_mode_is_bitwise_repeatable(device):
    (q, k, v), idx, valid = make_case(2, 3, 4, 9, 1, 64, 20, device=device, seed=3)
    q, k, v = (t.half().requires_grad_() for t in (q, k, v))
    runs = []
    for _ in range(2):
        with lightmotion_fast.backend("triton"):
            out = trajectory_attention(q, k, v, idx, valid, deterministic=True)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_unreached_pixels_are_zero(device, poisoned):
    (q, k, v), idx, valid = make_case(1, 4, 6, 5, 1, 64, 6, device=device, seed=4)  # 6 tokens for 24 pixels
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    hit = landed(idx, valid, 24)  # [f s]
    assert (~hit).any()
    for deterministic in (True, False):
        with lightmotion_fast.backend("triton"):
            out = trajectory_attention(q, k, v, idx, valid, deterministic=deterministic)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        missed = rearrange(~hit, "f s -> 1 s f")
        for t in (out, dq, dk, dv):
            assert torch.equal(t[missed], torch.zeros_like(t[missed]))
        assert out[rearrange(hit, "f s -> 1 s f")].abs().sum() > 0


def test_trajectory_with_no_valid_frame_is_finite(device, poisoned):
    (q, k, v), idx, valid = make_case(1, 3, 3, 4, 1, 32, 5, device=device, seed=5)
    valid[:, 0] = False
    q, k, v = (t.float() for t in (q, k, v))
    for mask_invalid in (False, True):
        with lightmotion_fast.backend("triton"):
            got = trajectory_attention(q, k, v, idx, valid, mask_invalid=mask_invalid)
        close(got, trajectory_attention_reference(q.double(), k.double(), v.double(), idx, valid, mask_invalid),
              torch.float32, "out")


def test_reference_gradcheck_float64():
    (q, k, v), idx, valid = make_case(1, 2, 2, 3, 2, 2, 6, seed=6)
    for mask_invalid in (False, True):
        inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
        assert torch.autograd.gradcheck(
            lambda a, b, c: trajectory_attention_reference(a, b, c, idx, valid, mask_invalid), inputs)


def test_written_backward_reference_matches_autograd():
    (q, k, v), idx, valid = make_case(2, 3, 4, 5, 2, 8, 30, seed=7)
    for mask_invalid in (False, True):
        inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
        out = trajectory_attention_reference(*inputs, idx, valid, mask_invalid)
        dout = torch.randn_like(out)
        auto = torch.autograd.grad(out, inputs, dout)
        written = trajectory_attention_backward_reference(dout, q, k, v, idx, valid, mask_invalid)
        for a, w in zip(auto, written):
            torch.testing.assert_close(w, a, rtol=1e-10, atol=1e-12)


def test_op_with_projection_equals_official_computation():
    """Dense projection + op + to_out with bias where landed == the official per-call computation."""
    batch, height, width, frames, heads, dim, n = 2, 4, 5, 6, 2, 8, 70
    g = torch.Generator().manual_seed(8)
    coords = torch.rand(frames, n, 2, generator=g) * torch.tensor([width * 8.0, height * 8.0])
    valid = torch.rand(frames, n, generator=g) < 0.8
    channels = heads * dim
    x = torch.randn(batch * height * width, frames, channels, generator=g, dtype=torch.float64)
    w_q, w_k, w_v, w_o = (torch.randn(channels, channels, generator=g, dtype=torch.float64) / channels ** 0.5
                          for _ in range(4))
    b_o = torch.randn(channels, generator=g, dtype=torch.float64)
    from lightmotion_fast.reference.trajectory_attention import num_samples, subsample
    selection = subsample(n, num_samples(n, (height, width), 2.0), torch.Generator().manual_seed(9))
    assert len(selection) == 40
    for mask_invalid in (False, True):
        official = official_trajectory_branch(x, coords, valid, (height * 8, width * 8), (height, width), batch,
                                              w_q, w_k, w_v, w_o, b_o, heads, mask_invalid=mask_invalid,
                                              generator=torch.Generator().manual_seed(9))
        idx = level_indices(coords[:, selection], (height * 8, width * 8), (height, width))
        ok = valid[:, selection]
        q, k, v = (rearrange(x @ w.t(), "(b s) f (h d) -> b s f h d", b=batch, h=heads) for w in (w_q, w_k, w_v))
        out = trajectory_attention_reference(q, k, v, idx, ok, mask_invalid)
        hit = rearrange(landed(idx, ok, height * width), "f s -> s f 1").repeat(batch, 1, 1)
        ours = rearrange(out, "b s f h d -> (b s) f (h d)") @ w_o.t() + b_o * hit
        torch.testing.assert_close(ours, official, rtol=1e-10, atol=1e-10)


def test_incoming_csr_lists_tokens_in_order():
    idx = torch.tensor([[0, 2, 0, 1], [3, 3, 3, 0]])
    valid = torch.tensor([[True, True, True, False], [True, False, True, True]])
    rowptr, col = incoming_csr(idx, valid, 4)
    assert rowptr.tolist() == [0, 2, 2, 3, 3, 4, 4, 4, 6]
    assert col.tolist() == [0, 2, 1, 3, 0, 2]


def _inputs():
    (q, k, v), idx, valid = make_case(1, 3, 4, 5, 1, 16, 10)
    return q.float(), k.float(), v.float(), idx, valid


def test_bad_inputs_raise_clear_errors():
    q, k, v, idx, valid = _inputs()
    with pytest.raises(ValueError, match=r"idx must have shape \[f, n\] with f = 5"):
        trajectory_attention(q, k, v, idx[:4], valid[:4])
    with pytest.raises(ValueError, match="valid must have idx's shape"):
        trajectory_attention(q, k, v, idx, valid[:, :7])
    with pytest.raises(TypeError, match="valid must have dtype"):
        trajectory_attention(q, k, v, idx, valid.float())
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, 12\)"):
        trajectory_attention(q, k, v, idx + 12, valid)
    with pytest.raises(ValueError, match="k must have q's shape"):
        trajectory_attention(q, k[:, :, :4], v, idx, valid)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        trajectory_attention(q, k, v.half(), idx, valid)
    with pytest.raises(ValueError, match=r"q must have shape \[b s f h d\]"):
        trajectory_attention(q[0], k, v, idx, valid)
    with pytest.raises(TypeError, match="q must have dtype"):
        trajectory_attention(q.double(), k.double(), v.double(), idx, valid)
    with pytest.raises(ValueError, match="at most 64"):
        big = torch.zeros(1, 2, 65, 1, 16)
        trajectory_attention(big, big, big, torch.zeros(65, 3, dtype=torch.long), torch.ones(65, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="rowptr and col must be given together"):
        trajectory_attention(q, k, v, idx, valid, rowptr=torch.zeros(61, dtype=torch.int32))
    rowptr, col = incoming_csr(idx, valid, 12)
    with pytest.raises(ValueError, match=r"rowptr must have shape \[61\]"):
        trajectory_attention(q, k, v, idx, valid, rowptr[:-1], col)


# ---------------------------------------------------------------------------------------------
# Strides, grids, tables (issue 10 item 5, issue 14 items 2 and 11)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dim_not_innermost_in_both_modes(dtype, device, poisoned):
    # q, k, v viewed from a [b s f d h] tensor: the head dim has stride `heads`. The atomic mode once
    # accumulated straight into an fp32 output with an implied unit stride (max error 3.2).
    (q, k, v), idx, valid = make_case(2, 3, 4, 5, 3, 16, 20, device=device, seed=11)
    views = [rearrange(rearrange(t, "b s f h d -> b s f d h").to(dtype).contiguous(), "b s f d h -> b s f h d")
             .requires_grad_() for t in (q, k, v)]
    assert views[0].stride(-1) == 3
    dout = torch.randn(q.shape, dtype=torch.float64, device=device)
    want = trajectory_attention_reference(q, k, v, idx, valid)
    want_grads = trajectory_attention_backward_reference(dout, q, k, v, idx, valid)
    for deterministic in (True, False):
        with lightmotion_fast.backend("triton"):
            out = trajectory_attention(*views, idx, valid, deterministic=deterministic)
        close(out, want, dtype, f"out (deterministic={deterministic})")
        grads = torch.autograd.grad(out, views, dout.to(dtype))
        for name, g, w in zip("qkv", grads, want_grads):
            close(g, w, dtype, f"d{name} (deterministic={deterministic})")


class _GridRecorder:
    """Stands in for a kernel: records the launch grids instead of running."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_grids_stay_within_cuda_limits_for_large_batches(monkeypatch):
    # CUDA allows 2³¹ − 1 programs on grid axis 0 but only 65,535 on axes 1 and 2; batch 70,000 once
    # went on axis 1 (forward, backward) and axis 2 (the CSR reduction) and failed to launch.
    kernels = lightmotion_fast.ops._common.kernel_module("trajectory_attention")
    recorders = {}
    for name in ("_traj_attn_fwd_kernel", "_traj_attn_bwd_kernel", "_csr_reduce_kernel"):
        recorders[name] = _GridRecorder()
        monkeypatch.setattr(kernels, name, recorders[name])
    monkeypatch.setattr(kernels, "_interpreting", lambda t: False)
    batch = 70_000
    idx = torch.tensor([[0, 1, 1]]).repeat(2, 1)
    valid = torch.ones(2, 3, dtype=torch.bool)
    q = torch.zeros(batch, 2, 2, 1, 16, requires_grad=True)
    with lightmotion_fast.backend("triton"):
        for deterministic in (True, False):
            out = trajectory_attention(q, q, q, idx, valid, deterministic=deterministic)
            out.backward(torch.ones_like(out))
    for name, rec in recorders.items():
        assert rec.grids, f"{name} never launched"
        for grid in rec.grids:
            assert grid[0] < 2 ** 31 and all(g <= 65_535 for g in grid[1:]), f"{name} grid {grid}"


def _garbage_tables(idx, valid, n_pix):
    """Ways a CSR table can be wrong: garbage columns, garbage row pointers, a table of other trajectories."""
    rowptr, col = incoming_csr(idx, valid, n_pix)
    other_idx = (idx + 1) % n_pix
    yield "col", rowptr, torch.full_like(col, 1_000_000)
    yield "rowptr", rowptr * 1000 - 7, col
    yield "stale", *incoming_csr(other_idx, valid, n_pix)


def test_wrong_tables_are_rejected_when_attached():
    q, k, v, idx, valid = _inputs()
    for what, rowptr, col in _garbage_tables(idx, valid, 12):
        with pytest.raises(ValueError, match="not the CSR table of idx and valid"):
            TrajectoryIndex(idx, valid, 12, rowptr, col)
        with pytest.raises(ValueError, match="not the CSR table of idx and valid"):
            trajectory_attention(q, k, v, idx, valid, rowptr, col)
    rowptr, col = incoming_csr(idx, valid, 12)
    index = TrajectoryIndex(idx, valid, 12, rowptr.to(torch.int32), col)  # the right table is accepted
    torch.testing.assert_close(trajectory_attention(q, k, v, index),
                               trajectory_attention_reference(q, k, v, idx, valid))
    index.idx[0, 0] = 3  # changed in place after the check: caught without reading values
    with pytest.raises(RuntimeError, match="modified in place"):
        trajectory_attention(q, k, v, index)
    with pytest.raises(ValueError, match="built for 5 frames of 12 pixels"):
        trajectory_attention(q[:, :6], k[:, :6], v[:, :6], TrajectoryIndex(idx, valid, 12))
    with pytest.raises(ValueError, match="must be left out"):
        trajectory_attention(q, k, v, TrajectoryIndex(idx, valid, 12), valid)


def test_index_keeps_its_own_copies():
    q, k, v, idx, valid = _inputs()
    index = TrajectoryIndex(idx, valid, 12)
    want = trajectory_attention(q, k, v, index)
    idx.zero_()
    valid.fill_(False)
    assert torch.equal(trajectory_attention(q, k, v, index), want)


def test_kernels_never_read_out_of_bounds_whatever_the_tables_hold(device):
    # The public path rejects such tables; the kernels themselves (reached through the custom op)
    # clamp every index they read from them. Before: SIGSEGV (garbage col or rowptr) or ~1e34 (stale).
    (q, k, v), idx, valid = make_case(1, 3, 4, 5, 2, 16, 10, device=device, seed=12)
    q, k, v = (t.float() for t in (q, k, v))
    kernels = lightmotion_fast.ops._common.kernel_module("trajectory_attention")
    bad_idx = idx.masked_fill(torch.rand(idx.shape) < 0.3, 1_000_000).to(torch.int32)
    cases = [(w, idx.to(torch.int32), r.to(torch.int32), c.to(torch.int32))
             for w, r, c in _garbage_tables(idx, valid, 12)]
    rowptr, col = incoming_csr(idx, valid, 12)
    cases.append(("idx", bad_idx, rowptr.to(torch.int32), col.to(torch.int32)))
    for what, table_idx, rowptr, col in cases:
        for deterministic in (True, False):
            out = torch.full_like(q, float("nan"))
            kernels.trajectory_attention_fwd(q, k, v, table_idx, valid.view(torch.uint8), rowptr, col, out,
                                             False, deterministic)
            grads = [torch.full_like(q, float("nan")) for _ in range(3)]
            kernels.trajectory_attention_bwd(torch.ones_like(q), q, k, v, table_idx, valid.view(torch.uint8),
                                             rowptr, col, *grads, False, deterministic)
            for t in (out, *grads):
                # softmax averages of bounded values stay bounded; gradients too (count ≥ 1)
                assert torch.isfinite(t).all() and t.abs().max() < 1e3, f"{what}, deterministic={deterministic}"


def test_out_of_range_idx_at_invalid_points_is_accepted(device):
    q, k, v, idx, valid = _inputs()
    far = idx.masked_fill(~valid, 1_000_000)
    want = trajectory_attention_reference(q, k, v, idx, valid)
    torch.testing.assert_close(trajectory_attention(q, k, v, far, valid), want)
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, 12\) \(pixels s of q\) where valid"):
        trajectory_attention(q, k, v, far.masked_fill(valid, 12), valid)


def test_index_arguments_accept_numpy_integers_and_float64_runs_on_the_reference():
    import numpy as np
    q, k, v, idx, valid = _inputs()
    index = TrajectoryIndex(idx, valid, np.int64(12))
    with lightmotion_fast.backend("reference"):
        out = trajectory_attention(q.double(), k.double(), v.double(), index)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, trajectory_attention_reference(q.double(), k.double(), v.double(), idx, valid))
    with pytest.raises(TypeError, match="n_pix must be an integer"):
        TrajectoryIndex(idx, valid, 12.0)
    with pytest.raises(TypeError, match="needs valid"):
        trajectory_attention(q, k, v, idx)


def test_padded_csr_lists_the_same_tokens():
    _, idx, valid = make_case(1, 3, 4, 6, 1, 8, 40, seed=13)
    rowptr, col = incoming_csr(idx, valid, 12)
    prow, pcol = incoming_csr(idx, valid, 12, padded=True)
    assert torch.equal(prow, rowptr) and pcol.numel() == idx.numel()
    assert torch.equal(pcol[: col.numel()], col)


@pytest.mark.parametrize("with_index", [True, False], ids=["TrajectoryIndex", "raw tensors"])
def test_public_function_compiles_fullgraph(with_index):
    # Nothing is read back on the host inside the graph: no data-dependent guard, no graph break.
    q, k, v, idx, valid = _inputs()
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    torch._dynamo.reset()
    if with_index:
        index = TrajectoryIndex(idx, valid, 12)
        fn = torch.compile(lambda a, b, c: trajectory_attention(a, b, c, index), fullgraph=True, backend="aot_eager")
    else:
        fn = torch.compile(lambda a, b, c: trajectory_attention(a, b, c, idx, valid), fullgraph=True,
                           backend="aot_eager")
    out = fn(q, k, v)
    torch.testing.assert_close(out, trajectory_attention_reference(q.detach(), k.detach(), v.detach(), idx, valid))
    out.sum().backward()
    want = trajectory_attention_backward_reference(torch.ones_like(out), q.detach(), k.detach(), v.detach(), idx,
                                                   valid)
    for g, w in zip((q.grad, k.grad, v.grad), want):
        torch.testing.assert_close(g, w)


def test_offsets_past_two_to_the_31_elements(device):
    # Head h of a view whose head stride is 2³⁰ + 16 elements starts past 2³¹ for h = 2: an int32
    # product h · stride wraps there. On the CPU the 4 GiB storage is reserved, not touched (only the
    # rows the view holds are written), so the test needs a few hundred MB of memory.
    (q0, _, _), idx, valid = make_case(1, 2, 2, 3, 3, 16, 6, device=device, seed=14)
    stride_h = 2 ** 30 + 16
    batch, n_pix, frames, heads, dim = q0.shape
    storage = torch.empty((heads - 1) * stride_h + n_pix * frames * dim, dtype=torch.float16, device=device)
    q = storage.as_strided(q0.shape, (0, frames * dim, dim, stride_h, 1))
    for h in range(heads):
        q[:, :, :, h] = q0[:, :, :, h].half()
    want = trajectory_attention_reference(q.double(), q.double(), q.double(), idx, valid)
    for deterministic in (True, False):
        with lightmotion_fast.backend("triton"):
            got = trajectory_attention(q, q, q, idx, valid, deterministic=deterministic)
        close(got, want, torch.float16, f"out (deterministic={deterministic})")


@pytest.mark.parametrize("allow_tf32,deterministic,mask_invalid,frames,group", [
    (False, True, False, 25, 2), (False, False, True, 25, 2), (True, True, False, 25, 2),
    (False, False, False, 40, 1), (False, True, True, 40, 1)])
def test_fp32_long_sequences_launch_by_product_precision(poisoned, monkeypatch, allow_tf32, deterministic,
                                                        mask_invalid, frames, group):
    """fp32 with 64-row sequences (25 frames, two trajectories per softmax, as the released semantics
    runs; or 40 frames, one trajectory): IEEE products (the default) at 16 warps and 1 stage, the backward taking the queries 32 at a
    time; TF32 products, where the caller allows them through torch.backends.cuda.matmul.allow_tf32, at
    8 warps and 2 stages with whole tiles (the launches that compile without spills on sm_90; see
    `_launch_options`, `_query_chunk`). Forward and gradients still equal float64's in both write modes
    (the interpreter's TF32 dot is exact fp32)."""
    kernels = lightmotion_fast.ops._common.kernel_module("trajectory_attention")
    launches = record_launches(monkeypatch, kernels, "_traj_attn_fwd_kernel", "_traj_attn_bwd_kernel")
    (q, k, v), idx, valid = make_case(1, 2, 3, frames, 2, 16, 4)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(leaves[0])
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = allow_tf32
        with lightmotion_fast.backend("triton"):
            out = trajectory_attention(*leaves, idx, valid, group=group, deterministic=deterministic,
                                       mask_invalid=mask_invalid)
            out.backward(grad)
    finally:
        matmul.allow_tf32 = before
    want_opts = ("tf32", 8, 2) if allow_tf32 else ("ieee", 16, 1)
    seen = sorted((name, kw["PRECISION"], kw["num_warps"], kw["num_stages"]) for name, _, kw in launches)
    assert seen == [("_traj_attn_bwd_kernel", *want_opts), ("_traj_attn_fwd_kernel", *want_opts)]
    (bwd_kwargs,) = [kw for name, _, kw in launches if name == "_traj_attn_bwd_kernel"]
    assert (bwd_kwargs["BLOCK_F"], bwd_kwargs["Q_CHUNK"]) == ((64, 64) if allow_tf32 else (64, 32))
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    want = trajectory_attention_reference(*ref, idx, valid, group=group, mask_invalid=mask_invalid)
    want.backward(grad.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    for got, r in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), r.grad, atol=1e-5, rtol=1e-5)
