"""reference_attention: Triton kernel (interpreter on CPU) against SDPA over the materialised
concatenation and against the paper's width-concatenation formulation; backward; input checks."""
import pytest
import torch
import torch.nn.functional as F

import lightmotion_fast
from lightmotion_fast.ops.reference_attention import reference_attention
from lightmotion_fast.reference.reference_attention import width_concat_attention

TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (3e-2, 3e-2)}


def sdpa_concat(q, k, v, kr, vr):
    q, k, v, kr, vr = (t.double().cpu() for t in (q, k, v, kr, vr))
    return F.scaled_dot_product_attention(q, torch.cat([k, kr], 2), torch.cat([v, vr], 2))


@pytest.mark.parametrize("b,h,n,n_ref,d", [(1, 1, 1, 1, 40), (2, 3, 37, 29, 40), (1, 2, 50, 70, 80), (1, 1, 13, 9, 160)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_equals_sdpa_over_concatenation(device, poisoned, b, h, n, n_ref, d, dtype):
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3))
    kr, vr = (torch.randn(b, h, n_ref, d, device=device, dtype=dtype) for _ in range(2))
    with lightmotion_fast.backend("triton"):
        out = reference_attention(q, k, v, kr, vr)
    assert out.shape == q.shape and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), sdpa_concat(q, k, v, kr, vr), atol=atol, rtol=rtol)


def test_equals_width_concatenation_of_the_paper(device, poisoned):
    b, c, hh, w, heads = 2, 16, 3, 5, 2
    m = torch.randn(b, c, hh, w, device=device)
    p = torch.randn(b, c, hh, w, device=device)
    to_q, to_k, to_v = (torch.nn.Linear(c, c, bias=False).to(device) for _ in range(3))
    with torch.no_grad():
        want = width_concat_attention(m, p, to_q, to_k, to_v, heads)
        tokens = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731  [b (hh w) c]
        split = lambda t: t.view(b, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(to_q(tokens(m))), split(to_k(tokens(m))), split(to_v(tokens(m)))
        kr, vr = split(to_k(tokens(p))), split(to_v(tokens(p)))
        with lightmotion_fast.backend("triton"):
            out = reference_attention(q, k, v, kr, vr)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_backward(device, impl):
    q, k, v = (torch.randn(1, 2, 11, 24, device=device, requires_grad=True) for _ in range(3))
    kr, vr = (torch.randn(1, 2, 7, 24, device=device, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, 2, 11, 24, device=device)
    with lightmotion_fast.backend(impl):
        reference_attention(q, k, v, kr, vr).backward(grad)
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v, kr, vr)]
    sdpa_concat(*leaves).backward(grad.double().cpu())
    for got, want in zip((q, k, v, kr, vr), leaves):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, atol=5e-5, rtol=1e-4)


def test_bad_inputs(device):
    q = torch.randn(1, 2, 5, 16, device=device)
    kr = torch.randn(1, 2, 3, 16, device=device)
    with pytest.raises(ValueError, match="k_ref"):
        reference_attention(q, q, q, kr[:, :1], kr)
    with pytest.raises(ValueError, match="v_ref"):
        reference_attention(q, q, q, kr, kr[:, :, :2])
    with pytest.raises(TypeError, match="k"):
        reference_attention(q, q.half(), q, kr, kr)
    with pytest.raises(ValueError, match="q"):
        reference_attention(q[0], q, q, kr, kr)


# ---------------------------------------------------------------------------------------------
# Triton backward (no SDPA recompute), model head dims, layouts, NaN, float64 (issues 10 and 14)

BWD_TOL = {torch.float32: (5e-5, 1e-4), torch.float16: (3e-2, 3e-2), torch.bfloat16: (2e-1, 2e-1)}


def _heads_view(b, m, h, d, dtype, device):
    """[b m (h d)] projections viewed as [b h m d], as diffusers processors hand them over."""
    return torch.randn(b, m, h * d, device=device, dtype=dtype).view(b, m, h, d).transpose(1, 2).requires_grad_()


def _triton_and_float64(grad, *inputs):
    """Forward and backward of reference_attention through the Triton path, and of SDPA over the
    concatenation in float64 on copies of the inputs: (out, reference out, float64 leaves with grads)."""
    with lightmotion_fast.backend("triton"):
        out = reference_attention(*inputs)
        out.backward(grad)
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    want = sdpa_concat(*leaves)
    want.backward(grad.double().cpu())
    return out, want, leaves


@pytest.mark.parametrize("d", [40, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_model_head_dims_forward_backward(device, poisoned, d, dtype):
    b, h, n, n_ref = 1, 2, 19, 13
    q, k, v = (_heads_view(b, n, h, d, dtype, device) for _ in range(3))
    kr, vr = (_heads_view(b, n_ref, h, d, dtype, device) for _ in range(2))
    grad = torch.randn(b, h, n, d, device=device, dtype=dtype)
    out, want, leaves = _triton_and_float64(grad, q, k, v, kr, vr)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.detach().double().cpu(), want.detach(), atol=atol, rtol=rtol)
    atol, rtol = BWD_TOL[dtype]
    for got, ref in zip((q, k, v, kr, vr), leaves):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=atol, rtol=rtol)


def test_backward_does_not_recompute_through_sdpa(device, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("reference_attention's backward called scaled_dot_product_attention")

    q, k, v, kr, vr = (torch.randn(1, 2, m, 16, device=device, requires_grad=True) for m in (9, 9, 9, 5, 5))
    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)
    with lightmotion_fast.backend("triton"):
        reference_attention(q, k, v, kr, vr).sum().backward()
    assert all(t.grad is not None for t in (q, k, v, kr, vr))


@pytest.mark.parametrize("layout", ["head_dim_not_innermost", "odd_offset", "d_not_multiple_of_8"])
def test_unaligned_layouts_forward_backward(device, poisoned, layout):
    b, h, n, n_ref, d = 2, 2, 17, 11, (20 if layout == "d_not_multiple_of_8" else 40)

    def make(m):
        base = torch.randn(b, h, m, d, device=device)
        if layout == "head_dim_not_innermost":
            return base.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
        if layout == "odd_offset":
            padded = torch.zeros(b, h, m, d + 1, device=device)
            padded[..., 1:] = base
            return padded[..., 1:].detach().requires_grad_()
        return base.requires_grad_()

    q, k, v, kr, vr = (make(m) for m in (n, n, n, n_ref, n_ref))
    grad = torch.randn(b, h, n, d, device=device)
    out, want, leaves = _triton_and_float64(grad, q, k, v, kr, vr)
    torch.testing.assert_close(out.detach().double().cpu(), want.detach(), atol=2e-5, rtol=1e-4)
    for got, ref in zip((q, k, v, kr, vr), leaves):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=5e-5, rtol=1e-4)


def test_backward_with_split_dkdv_walk(device, poisoned):
    # 300 queries in 32-row fp32 tiles and one key tile per source: the dk/dv query walk is split.
    q, k, v = (torch.randn(1, 1, 300, 16, device=device, requires_grad=True) for _ in range(3))
    kr, vr = (torch.randn(1, 1, 7, 16, device=device, requires_grad=True) for _ in range(2))
    with lightmotion_fast.backend("triton"):
        reference_attention(q, k[:, :, :9], v[:, :, :9], kr, vr).square().sum().backward()
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v, kr, vr)]
    sdpa_concat(leaves[0], leaves[1][:, :, :9], leaves[2][:, :, :9], *leaves[3:]).square().sum().backward()
    for got, ref in zip((q, k, v, kr, vr), leaves):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=1e-4, rtol=1e-4)


def test_backward_op_passes_opcheck(device):
    from lightmotion_fast.ops.reference_attention import backward_sample_inputs, reference_attention_backward_op

    with lightmotion_fast.backend("triton"):
        for args in backward_sample_inputs(device):
            torch.library.opcheck(reference_attention_backward_op, args)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_nan_query_propagates(device, impl):
    q, k, v, kr, vr = (torch.randn(1, 2, m, 16, device=device) for m in (7, 7, 7, 5, 5))
    q[0, 0, 3, 2] = float("nan")
    with lightmotion_fast.backend(impl):
        out = reference_attention(q, k, v, kr, vr)
    assert torch.isnan(out[0, 0, 3]).all()
    out[0, 0, 3] = 0.0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_float64_accepted_and_differentiable(device, impl):
    q, k, v, kr, vr = (torch.randn(1, 1, m, 4, device=device, dtype=torch.float64, requires_grad=True)
                       for m in (3, 3, 3, 2, 2))
    with lightmotion_fast.backend(impl):
        out = reference_attention(q, k, v, kr, vr)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, sdpa_concat(q, k, v, kr, vr).to(device))
        assert torch.autograd.gradcheck(reference_attention, (q, k, v, kr, vr), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# The TMA forward (Hopper, 16-bit): the interpreter runs it when the device query says sm_90.

class _LaunchSpy:
    """Stands in for a @triton.jit kernel and counts its launches (and keeps their keyword arguments)."""

    def __init__(self, kernel):
        self.kernel, self.calls, self.kwargs = kernel, 0, []

    def __getitem__(self, grid):
        self.calls += 1

        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def hopper(monkeypatch):
    """Device queries answer sm_90, so reference_attention takes the TMA forward; its launch counter."""
    from lightmotion_fast.ops import _common

    kernels = _common.kernel_module("dual_cross_attention")
    spy = _LaunchSpy(kernels._reference_attention_fwd_tma_kernel)
    monkeypatch.setattr(kernels, "_reference_attention_fwd_tma_kernel", spy)
    monkeypatch.setattr(_common, "device_capability", lambda device: (9, 0))
    return spy


@pytest.mark.parametrize("d", [40, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,n_ref", [(19, 13), (70, 45)])
def test_tma_forward_model_head_dims(device, poisoned, hopper, d, dtype, n, n_ref):
    """K/V through TMA descriptors ([b, n, h, d] boxes, head-dim chunks, zero-filled past n and d) on
    diffusers' heads-last layout, source lengths that are not multiples of the key tile: one tile
    per source, and several (70 + 45 keys: 2 + 1 tiles of 64, 3 + 2 of 32), where heads up to 128
    wide run P V one tile behind the scores (LAG_PV) and wider ones do not."""
    b, h = 2, 2
    q, k, v = (_heads_view(b, n, h, d, dtype, device) for _ in range(3))
    kr, vr = (_heads_view(b, n_ref, h, d, dtype, device) for _ in range(2))
    with lightmotion_fast.backend("triton"):
        out = reference_attention(q, k, v, kr, vr)
    assert hopper.calls == 1
    assert hopper.kwargs[0]["LAG_PV"] == (d <= 128)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), sdpa_concat(q, k, v, kr, vr), atol=atol, rtol=rtol)


def test_tma_forward_falls_back_where_tma_cannot_address(device, poisoned, hopper):
    """A bank broadcast over the batch (stride 0) has no TMA descriptor: the cp.async kernel runs."""
    q, k, v = (torch.randn(3, 2, 21, 40, device=device, dtype=torch.float16) for _ in range(3))
    kr, vr = (torch.randn(1, 2, 9, 40, device=device, dtype=torch.float16).expand(3, -1, -1, -1) for _ in range(2))
    with lightmotion_fast.backend("triton"):
        out = reference_attention(q, k, v, kr, vr)
    assert hopper.calls == 0
    torch.testing.assert_close(out.double().cpu(), sdpa_concat(q, k, v, kr, vr), atol=3e-3, rtol=3e-3)


def test_backward_delta_in_one_pass_and_dq_in_its_dtype(device, poisoned, monkeypatch):
    """Δ = rowsum(dO ∘ O) comes from one Triton pass over dO and O (torch made fp32 copies of both, their
    product and its sum), and one dq launch takes both sources (one softmax: shared LSE and Δ rows)
    and writes dq once in q's dtype (no fp32 dq converted afterwards). Gradients against float64."""
    from lm_testing import record_launches

    kernels = lightmotion_fast.ops._common.kernel_module("dual_cross_attention")
    launches = record_launches(monkeypatch, kernels, "_row_dot_kernel", "_dual_bwd_dq_kernel")
    b, h, n, n_ref, d = 1, 2, 24, 10, 40
    inputs = [torch.randn(b, h, m, d, device=device, dtype=torch.bfloat16, requires_grad=True)
              for m in (n, n, n, n_ref, n_ref)]
    grad = torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16)
    with lightmotion_fast.backend("triton"):
        reference_attention(*inputs).backward(grad)
    assert [name for name, _, _ in launches] == ["_row_dot_kernel", "_dual_bwd_dq_kernel"]
    _, args, kw = launches[1]
    assert (kw["NUM_COND"], kw["DELTA_GIVEN"], kw["ACCUMULATE"], args[5].dtype) == (2, True, False, torch.bfloat16)
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    q, k, v, k_ref, v_ref = leaves
    F.scaled_dot_product_attention(q, torch.cat([k, k_ref], 2), torch.cat([v, v_ref], 2)).backward(
        grad.double().cpu())
    for got, ref in zip(inputs, leaves):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("frozen", ["bank", "main", "q"])
def test_frozen_inputs_get_no_gradient_and_no_pass(device, poisoned, monkeypatch, impl, frozen):
    """A frozen reference network (its bank k_ref, v_ref), a frozen main network (q, k, v) or frozen queries
    only: what does not require a gradient gets None and its pass is not launched (no dq kernel without q, no
    dk/dv kernel for a frozen source); the rest equals the float64 reference (SDPA over the concatenation)."""
    from lightmotion_fast.kernels import dual_cross_attention as attn_kernels
    from lm_testing import record_launches
    frozen_names = {"bank": ("kr", "vr"), "main": ("q", "k", "v"), "q": ("q",)}[frozen]
    names = ("q", "k", "v", "kr", "vr")
    q, k, v = (torch.randn(1, 2, 11, 24, device=device) for _ in range(3))
    kr, vr = (torch.randn(1, 2, 7, 24, device=device) for _ in range(2))
    leaves = dict(zip(names, (q, k, v, kr, vr)))
    for name, t in leaves.items():
        t.requires_grad_(name not in frozen_names)
    launches = record_launches(monkeypatch, attn_kernels, "_dual_bwd_dq_kernel", "_dual_bwd_dkdv_kernel")
    grad = torch.randn(1, 2, 11, 24, device=device)
    with lightmotion_fast.backend(impl):
        out = reference_attention(q, k, v, kr, vr)
        out.backward(grad)
    if impl == "triton":
        kinds = [name for name, *_ in launches]
        assert kinds.count("_dual_bwd_dq_kernel") == (0 if "q" in frozen_names else 1)
        assert kinds.count("_dual_bwd_dkdv_kernel") == 2 - (frozen in ("bank", "main"))
    want = {n: t.detach().double().cpu().requires_grad_(True) for n, t in leaves.items()}
    sdpa_concat(*want.values()).backward(grad.double().cpu())
    for name, t in leaves.items():
        if name in frozen_names:
            assert t.grad is None, name
        else:
            torch.testing.assert_close(t.grad.double().cpu(), want[name].grad, atol=5e-5, rtol=1e-4)
