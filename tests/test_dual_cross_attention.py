"""dual_cross_attention: fused Triton forward (interpreter on CPU) and the backward against the float64
reference, at odd lengths, with masks, several conditions and all three dtypes; input checks."""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import lightmotion_fast
from lightmotion_fast.kernels import dual_cross_attention as attn_kernels
from lightmotion_fast.ops.dual_cross_attention import dual_cross_attention
from lightmotion_fast.reference.dual_cross_attention import dual_cross_attention_reference
from lm_testing import record_launches

# Attention outputs are averages of values, so fp16/bf16 bounds follow the output rounding.
ATTN_TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (4e-2, 3e-2)}


def make_inputs(b, h, n, d, lengths, dtype, device, requires_grad=False):
    q = torch.randn(b, h, n, d, dtype=dtype, device=device)
    keys = [torch.randn(b, h, m, d, dtype=dtype, device=device) for m in lengths]
    values = [torch.randn(b, h, m, d, dtype=dtype, device=device) for m in lengths]
    if requires_grad:
        for t in (q, *keys, *values):
            t.requires_grad_(True)
    return q, keys, values


def as64(ts):
    return [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in ts]


@pytest.mark.parametrize("b,h,n,d,lengths", [
    (1, 1, 1, 40, (1, 1)),
    (2, 3, 37, 40, (11, 4)),
    (1, 2, 70, 80, (77, 16)),
    (1, 1, 19, 160, (9, 5)),
    (2, 1, 17, 24, (3, 5, 2)),
    (1, 2, 21, 32, (7, 2, 3, 4, 6)),  # more conditions than one launch holds: chained launches
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_matches_float64_reference(device, poisoned, b, h, n, d, lengths, dtype):
    q, keys, values = make_inputs(b, h, n, d, lengths, dtype, device)
    scales = [1.0] + [0.7 - 0.1 * j for j in range(len(lengths) - 1)]
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, scales)
    want = dual_cross_attention_reference(*[as64([t])[0] for t in (q,)], as64(keys), as64(values), scales)
    assert out.shape == q.shape and out.dtype == dtype
    atol, rtol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), want, atol=atol * len(lengths), rtol=rtol)


@pytest.mark.parametrize("kind", ["additive", "bool", "per_query", "key_padding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mask_on_first_condition(device, poisoned, kind, dtype):
    b, h, n, d, m0 = 2, 2, 23, 40, 13
    q, keys, values = make_inputs(b, h, n, d, (m0, 4), dtype, device)
    if kind == "additive":
        mask = torch.randn(b, 1, 1, m0, device=device).to(dtype)
    elif kind == "bool":
        mask = torch.rand(b, h, n, m0, device=device) > 0.4
        mask[0, 1, 5] = False                    # a fully masked row: that condition contributes 0
    elif kind == "per_query":
        mask = torch.randn(b, h, n, m0, device=device).to(dtype)
    else:  # diffusers' key padding: large negative on the padded keys
        mask = torch.zeros(b, 1, 1, m0, device=device, dtype=dtype)
        mask[1, ..., 9:] = -10000.0
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, [1.0, 0.5], mask=mask)
    want = dual_cross_attention_reference(as64([q])[0], as64(keys), as64(values), [1.0, 0.5],
                                          mask.cpu() if mask.dtype == torch.bool else mask.double().cpu())
    atol, rtol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), want, atol=atol * 2, rtol=rtol)
    if kind == "bool":
        only_second = dual_cross_attention_reference(as64([q])[0], as64(keys[1:]), as64(values[1:]), [0.5])
        torch.testing.assert_close(out[0, 1, 5].double().cpu(), only_second[0, 1, 5], atol=atol * 2, rtol=rtol)


def test_equals_two_sdpa_calls_plus_add(device, poisoned):
    # IP-Adapter's formulation: SDPA over text, SDPA over image tokens, scaled and added.
    q, keys, values = make_inputs(2, 4, 33, 40, (77, 4), torch.float32, device)
    mask = torch.zeros(2, 1, 1, 77, device=device)
    mask[0, ..., 70:] = float("-inf")
    want = F.scaled_dot_product_attention(q, keys[0], values[0], attn_mask=mask) + \
        0.6 * F.scaled_dot_product_attention(q, keys[1], values[1])
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, [1.0, 0.6], mask=mask)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


def test_strided_views_and_softmax_scale(device, poisoned):
    # [b n (h d)] projections viewed as [b h n d], as diffusers processors hand them over.
    b, n, h, d = 2, 19, 3, 40
    q = torch.randn(b, n, h * d, device=device).view(b, n, h, d).transpose(1, 2)
    kv = [torch.randn(b, m, h * d, device=device).view(b, m, h, d).transpose(1, 2) for m in (11, 11, 5, 5)]
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, kv[0::2], kv[1::2], [1.0, 2.0], softmax_scale=0.05)
    want = dual_cross_attention_reference(q.double(), [t.double() for t in kv[0::2]], [t.double() for t in kv[1::2]],
                                          [1.0, 2.0], softmax_scale=0.05)
    torch.testing.assert_close(out.double(), want, atol=3e-5, rtol=1e-4)
    assert out.transpose(1, 2).is_contiguous()  # ready for the processor's reshape to [b n (h d)]


@pytest.mark.parametrize("b,h,n,d,lengths,masked", [
    (1, 2, 13, 40, (7, 3), "additive"),
    (2, 1, 9, 24, (5, 2, 3), None),
    (1, 1, 70, 80, (77, 4), "bool"),       # two query tiles, two key tiles, a fully masked row
])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_backward_matches_float64_autograd(device, poisoned, b, h, n, d, lengths, masked, impl):
    q, keys, values = make_inputs(b, h, n, d, lengths, torch.float32, device, requires_grad=True)
    if masked == "additive":
        mask = torch.randn(b, 1, n, lengths[0], device=device)
    elif masked == "bool":
        mask = torch.rand(b, h, n, lengths[0], device=device) > 0.3
        mask[0, 0, 66] = False
    else:
        mask = None
    scales = [1.0] + [0.5] * (len(lengths) - 1)
    grad = torch.randn(b, h, n, d, device=device)
    with lightmotion_fast.backend(impl):
        out = dual_cross_attention(q, keys, values, scales, mask=mask)
        out.backward(grad)
    q64, k64, v64 = as64([q])[0], as64(keys), as64(values)
    mask64 = None if mask is None else (mask.cpu() if mask.dtype == torch.bool else mask.double().cpu())
    want = dual_cross_attention_reference(q64, k64, v64, scales, mask64)
    want.backward(grad.double().cpu())
    torch.testing.assert_close(out.detach().double().cpu(), want.detach(), atol=2e-5, rtol=1e-4)
    for got, ref in zip((q, *keys, *values), (q64, *k64, *v64)):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_low_precision(device, poisoned, dtype):
    q, keys, values = make_inputs(1, 2, 11, 40, (6, 3), dtype, device, requires_grad=True)
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, [1.0, 0.8])
        out.float().square().sum().backward()
    q64, k64, v64 = as64([q])[0], as64(keys), as64(values)
    dual_cross_attention_reference(q64, k64, v64, [1.0, 0.8]).square().sum().backward()
    tol = 3e-2 if dtype == torch.float16 else 2e-1
    for got, ref in zip((q, *keys, *values), (q64, *k64, *v64)):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=tol, rtol=tol)


def test_bad_inputs(device):
    q, keys, values = make_inputs(1, 2, 5, 16, (3, 2), torch.float32, device)
    with pytest.raises(ValueError, match="q"):
        dual_cross_attention(q[0], keys, values)
    with pytest.raises(ValueError, match="keys\\[1\\]"):
        dual_cross_attention(q, [keys[0], keys[1][:, :1]], values)
    with pytest.raises(ValueError, match="values\\[0\\]"):
        dual_cross_attention(q, keys, [values[0][:, :, :2], values[1]])
    with pytest.raises(ValueError, match="equal length"):
        dual_cross_attention(q, keys, values[:1])
    with pytest.raises(TypeError, match="keys\\[0\\]"):
        dual_cross_attention(q, [keys[0].half(), keys[1]], values)
    with pytest.raises(TypeError, match="sequences"):
        dual_cross_attention(q, keys[0], values[0])
    with pytest.raises(ValueError, match="scales"):
        dual_cross_attention(q, keys, values, scales=[1.0])
    with pytest.raises(ValueError, match="scales\\[1\\]"):
        dual_cross_attention(q, keys, values, scales=[1.0, float("nan")])
    with pytest.raises(ValueError, match="mask"):
        dual_cross_attention(q, keys, values, mask=torch.zeros(1, 2, 5, 2))
    with pytest.raises(TypeError, match="mask"):
        dual_cross_attention(q, keys, values, mask=torch.zeros(1, 1, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="head dim"):
        dual_cross_attention(torch.randn(1, 1, 2, 300), [torch.randn(1, 1, 2, 300)], [torch.randn(1, 1, 2, 300)])
    # a learnable mask would silently get no gradient: an error while grad is on, fine under no_grad
    learned = torch.zeros(1, 1, 1, 3, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="mask requires grad"):
        dual_cross_attention(q, keys, values, mask=learned)
    with torch.no_grad():
        dual_cross_attention(q, keys, values, mask=learned)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_gradient_through_lse_output(device, impl):
    # The custom op also returns each condition's log-sum-exp; a loss on it must be differentiated too.
    from lightmotion_fast.ops.dual_cross_attention import dual_cross_attention_op

    q, keys, values = make_inputs(1, 2, 9, 16, (5, 3), torch.float32, device, requires_grad=True)
    with lightmotion_fast.backend(impl):
        out, lse = dual_cross_attention_op(q, keys, values, [1.0, 0.5], None, 0.25)
        (out.sum() + (lse * torch.arange(18.0, device=device).reshape(1, 2, 9)).sum()).backward()
    q64, k64, v64 = as64([q])[0], as64(keys), as64(values)
    lse64 = torch.stack([torch.logsumexp(q64 @ k.transpose(-1, -2) * 0.25, -1).reshape(2, 9) for k in k64])
    (dual_cross_attention_reference(q64, k64, v64, [1.0, 0.5], softmax_scale=0.25).sum()
     + (lse64 * torch.arange(18.0).reshape(1, 2, 9)).sum()).backward()
    for got, ref in zip((q, *keys, *values), (q64, *k64, *v64)):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=5e-5, rtol=1e-4)


def test_unused_lse_gradient_is_neither_made_nor_read(device, monkeypatch):
    """The public op returns only the output: the backward gets no LSE gradient, and neither a zero
    [conditions, b·h, n] tensor is made for it nor do the dq kernels read one (HAS_GLSE off)."""
    from lm_testing import TensorOutputs
    launches = record_launches(monkeypatch, attn_kernels, "_dual_bwd_dq_kernel", "_dual_bwd_dq_resident_kernel")
    q, keys, values = make_inputs(1, 2, 9, 16, (5, 3), torch.float32, device, requires_grad=True)
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, [1.0, 0.5])
    with TensorOutputs() as outputs:
        out.backward(torch.ones_like(out))
    assert launches and not any(kw["HAS_GLSE"] for _, _, kw in launches)
    assert not [s for s in outputs.seen if s[1] == (2, 2, 9) and s[0] != "detach"], outputs.seen  # (saved lse)


# ---------------------------------------------------------------------------------------------
# Real models' head dims, memory layouts, large grids, NaN, float64 (issue 10, issue 14 items 8/10)

BWD_TOL = {torch.float32: (5e-5, 1e-4), torch.float16: (3e-2, 3e-2), torch.bfloat16: (2e-1, 2e-1)}


@pytest.mark.parametrize("d", [40, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_model_head_dims_forward_backward(device, poisoned, d, dtype):
    # Diffusers' layout: [b n (h d)] projections viewed as [b h n d] (head dim innermost, heads interleaved).
    b, h, n, lengths = 1, 2, 21, (11, 4)
    def view(m):
        return torch.randn(b, m, h * d, device=device, dtype=dtype).view(b, m, h, d).transpose(1, 2).requires_grad_()
    q, keys, values = view(n), [view(m) for m in lengths], [view(m) for m in lengths]
    mask = torch.rand(b, 1, n, lengths[0], device=device) > 0.3
    grad = torch.randn(b, h, n, d, device=device, dtype=dtype)
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, [1.0, 0.6], mask=mask)
        out.backward(grad)
    q64, k64, v64 = as64([q])[0], as64(keys), as64(values)
    want = dual_cross_attention_reference(q64, k64, v64, [1.0, 0.6], mask.cpu())
    want.backward(grad.double().cpu())
    atol, rtol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.detach().double().cpu(), want.detach(), atol=2 * atol, rtol=rtol)
    atol, rtol = BWD_TOL[dtype]
    for got, ref in zip((q, *keys, *values), (q64, *k64, *v64)):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=atol, rtol=rtol)


def _layouts(b, h, n, d, device):
    """The same [b h n d] values in layouts that take the launcher's copy path: head dim not innermost
    ([b h d n] transposed), an odd storage offset / row stride (rows of 41 elements), and the plain
    contiguous layout that takes none."""
    base = torch.randn(b, h, n, d, device=device)
    not_innermost = base.transpose(2, 3).contiguous().transpose(2, 3)
    odd = torch.zeros(b, h, n, d + 1, device=device)
    odd[..., 1:] = base
    return {"contiguous": base.clone(), "head_dim_not_innermost": not_innermost, "odd_offset": odd[..., 1:]}


def _assert_fp32_triton_matches_float64(q, keys, values, grad):
    """Forward and backward through the Triton path (scales 1.0, 0.5) against the float64 reference."""
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, [1.0, 0.5])
        out.backward(grad)
    q64, k64, v64 = as64([q])[0], as64(keys), as64(values)
    want = dual_cross_attention_reference(q64, k64, v64, [1.0, 0.5])
    want.backward(grad.double().cpu())
    torch.testing.assert_close(out.detach().double().cpu(), want.detach(), atol=4e-5, rtol=1e-4)
    for got, ref in zip((q, *keys, *values), (q64, *k64, *v64)):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "head_dim_not_innermost", "odd_offset"])
def test_unaligned_layouts_forward_backward(device, poisoned, layout):
    b, h, n, d, lengths = 2, 2, 19, 40, (9, 5)
    q = _layouts(b, h, n, d, device)[layout].requires_grad_()
    keys = [_layouts(b, h, m, d, device)[layout].requires_grad_() for m in lengths]
    values = [_layouts(b, h, m, d, device)[layout].requires_grad_() for m in lengths]
    grad = _layouts(b, h, n, d, device)[layout]
    _assert_fp32_triton_matches_float64(q, keys, values, grad)


def test_head_dim_not_a_multiple_of_8(device, poisoned):
    # d = 20: rows are padded to 24 in an aligned copy; output written through an aligned scratch.
    q, keys, values = make_inputs(1, 2, 13, 20, (7, 3), torch.float32, device, requires_grad=True)
    grad = torch.randn(1, 2, 13, 20, device=device)
    _assert_fp32_triton_matches_float64(q, keys, values, grad)


def test_dkdv_query_split_matches_reference(device, poisoned):
    # 300 queries in 32-row fp32 tiles (10 tiles) with one (b, h) and one key tile per condition:
    # the dk/dv walk is split across programs and its partial sums added.
    kern = attn_kernels
    assert kern._dkdv_split(programs=1, q_tiles=10, sm_count=4) == 2
    q, keys, values = make_inputs(1, 1, 300, 16, (5, 3), torch.float32, device, requires_grad=True)
    mask = torch.randn(1, 1, 300, 5, device=device)
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, [1.0, 0.5], mask=mask)
        out.backward(torch.ones_like(out))
    q64, k64, v64 = as64([q])[0], as64(keys), as64(values)
    dual_cross_attention_reference(q64, k64, v64, [1.0, 0.5], mask.double().cpu()).sum().backward()
    for got, ref in zip((q, *keys, *values), (q64, *k64, *v64)):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dkdv_query_split_adds_its_partials_in_the_last_program(dtype, device, poisoned, monkeypatch):
    """16-bit with the dk/dv walk split over programs: each split stores fp32 partial sums and the last
    split of a key tile to finish adds them and writes dk, dv in their dtype, in the same launch (no
    PyTorch reduction or cast after it); equal to the float64 reference."""
    from lm_testing import TensorOutputs
    launches = record_launches(monkeypatch, attn_kernels, "_dual_bwd_dkdv_kernel")
    q, keys, values = make_inputs(1, 1, 640, 16, (5, 3), dtype, device, requires_grad=True)
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, [1.0, 0.5])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    with TensorOutputs() as outputs:
        out.backward(grad)
    assert launches and all(kw["REDUCE"] for _, _, kw in launches), [kw.get("REDUCE") for _, _, kw in launches]
    assert not [s for s in outputs.seen if s[0] == "sum" and s[2] == torch.float32], outputs.seen
    q64, k64, v64 = as64([q])[0], as64(keys), as64(values)
    dual_cross_attention_reference(q64, k64, v64, [1.0, 0.5]).backward(grad.double().cpu())
    for got, ref in zip((q, *keys, *values), (q64, *k64, *v64)):
        scale = ref.grad.abs().max().item()
        assert (got.grad.double().cpu() - ref.grad).abs().max().item() <= 1e-2 * scale


class _GridRecorder:
    """Stands in for a Triton kernel: records the grids it is launched with, runs nothing."""
    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


def test_grids_fit_cuda_limits_when_batch_times_heads_is_large(monkeypatch):
    # CUDA grids allow 2³¹ − 1 programs on axis 0 but only 65,535 on axes 1 and 2; b·h = 70,000
    # (e.g. a temporal attention over (b·h·w) sequences) must not land on axis 1.
    kern = attn_kernels
    names = ("_dual_cross_attention_fwd_kernel", "_dual_cross_attention_fwd_resident_kernel",
             "_reference_attention_fwd_kernel", "_dual_bwd_dq_kernel", "_dual_bwd_dkdv_kernel")
    recorders = {name: _GridRecorder() for name in names}
    for name, rec in recorders.items():
        monkeypatch.setattr(kern, name, rec)
    b, h, n, d = 35000, 2, 3, 8
    q = torch.randn(b, h, n, d)
    k = torch.randn(b, h, 2, d)
    lse = torch.empty(1, b * h, n)
    kern.dual_cross_attention_launch(q, [k], [k], [1.0], None, 0.3, torch.empty_like(q), lse)
    q16, k16 = q.half(), k.half()
    kern.dual_cross_attention_launch(q16, [k16], [k16], [1.0], None, 0.3, torch.empty_like(q16), lse)
    kern.reference_attention_launch(q, k, k, k, k, 0.3, torch.empty_like(q), lse[0])
    kern.dual_cross_attention_backward_launch(q, q, [k], [k], [1.0], None, 0.3, lse, lse, torch.empty_like(q),
                                              [torch.empty_like(k)], [torch.empty_like(k)])
    for name, rec in recorders.items():
        assert rec.grids, name
        for grid in rec.grids:
            assert grid[0] < 2 ** 31 and all(g <= 65535 for g in grid[1:]), (name, grid)


@triton.jit
def _rows_probe(out_ptr, idx, stride8):
    tl.store(out_ptr + tl.arange(0, 2), attn_kernels._rows(idx + tl.arange(0, 2), stride8))


def test_offsets_are_int64_past_2_to_the_31(device):
    # The kernels address every tile through _rows(index, stride / 8): with stride 2³³ (2³⁰ · 8) and
    # index 3 the offset 3 · 2³³ needs 64 bits.
    out = torch.zeros(2, dtype=torch.int64, device=device)
    _rows_probe[(1,)](out, 3, 2 ** 30)
    assert out.tolist() == [3 * 2 ** 33, 4 * 2 ** 33]


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_nan_query_propagates_on_every_backend(device, poisoned, impl):
    # Issue 14 item 8: a NaN query row gives NaN in that row (not 0), everything else is unaffected;
    # fully masked rows still give 0 from that condition.
    q, keys, values = make_inputs(1, 2, 9, 16, (5, 3), torch.float32, device)
    q[0, 1, 4, 7] = float("nan")
    mask = torch.ones(1, 2, 9, 5, dtype=torch.bool, device=device)
    mask[0, 0, 2] = False
    with lightmotion_fast.backend(impl):
        out = dual_cross_attention(q, keys, values, [1.0, 0.5], mask=mask)
    assert torch.isnan(out[0, 1, 4]).all()
    finite = torch.ones(out.shape[:3], dtype=torch.bool)
    finite[0, 1, 4] = False
    assert torch.isfinite(out[finite.to(out.device)]).all()
    want = dual_cross_attention_reference(*as64([q]), as64(keys), as64(values), [1.0, 0.5], mask.cpu())
    torch.testing.assert_close(out.double().cpu(), want, atol=4e-5, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_float64_accepted_and_differentiable(device, impl):
    # Issue 14 item 10: the public op takes what the custom op takes (float64 runs PyTorch).
    q, keys, values = make_inputs(1, 1, 3, 4, (3, 2), torch.float64, device, requires_grad=True)
    mask = torch.randn(1, 1, 3, 3, dtype=torch.float64, device=device)
    with lightmotion_fast.backend(impl):
        out = dual_cross_attention(q, keys, values, [1.0, 0.5], mask=mask)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, dual_cross_attention_reference(q, keys, values, [1.0, 0.5], mask))
        assert torch.autograd.gradcheck(lambda q, k0, k1, v0, v1: dual_cross_attention(
            q, [k0, k1], [v0, v1], [1.0, 0.5], mask=mask), (q, *keys, *values), fast_mode=True)


def test_fp32_dots_use_tf32_only_when_the_caller_allows_it():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert attn_kernels._precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert attn_kernels._precision(torch.float32) == "tf32"
    finally:
        matmul.allow_tf32 = before


def test_head_dim_chunks():
    """The forwards' head-dim chunks: powers of two ≥ 16 summing to the next multiple of 16 up to
    128-wide heads (16-bit), one power-of-two chunk otherwise (kernels/dual_cross_attention.py)."""
    from lightmotion_fast.kernels.dual_cross_attention import _d_split

    half = torch.float16
    assert [_d_split(d, half) for d in (8, 16, 24, 40, 48, 64, 80, 96, 112, 128)] == [
        (16, 0), (16, 0), (32, 0), (32, 16), (32, 16), (64, 0), (64, 16), (64, 32), (128, 0), (128, 0)]
    assert _d_split(160, half) == (256, 0) and _d_split(256, torch.bfloat16) == (256, 0)
    assert _d_split(40, torch.float32) == (64, 0)
    for d in range(1, 129):
        hi, lo = _d_split(d, half)
        assert hi + lo >= d and (hi + lo - d < 16 or lo == 0) and hi & (hi - 1) == 0
        assert lo == 0 or (lo >= 16 and lo & (lo - 1) == 0)


@pytest.mark.parametrize("op", ["dual", "dual_masked", "reference"])
@pytest.mark.parametrize("d, chunks, dkdv", [(40, (32, 16), (32, 16)), (80, (64, 16), (64, 16)),
                                            (96, (64, 32), (128, 0)), (64, (64, 0), (64, 0))])
def test_backward_kernels_take_head_dim_chunks(device, poisoned, monkeypatch, op, d, chunks, dkdv):
    """The 16-bit backwards hold the head dim in the forwards' chunks (40 → 32 + 16), not one tile padded
    to the next power of two (40 → 64); dk/dv up to 64-wide heads, and at 80-wide heads with 64-key
    tiles at 4 warps, 8 with a mask (`_dkdv_wgmma_80`): every dq and dk/dv launch says so, and the
    gradients hold."""
    from lightmotion_fast.ops.reference_attention import reference_attention

    launches = record_launches(monkeypatch, attn_kernels, "_dual_bwd_dq_kernel", "_dual_bwd_dq_resident_kernel",
                               "_dual_bwd_dkdv_kernel")
    b, h, n, lengths = 1, 2, 21, (11, 5)

    def view(m):
        return torch.randn(b, m, h * d, device=device, dtype=torch.float16).view(b, m, h, d).transpose(1, 2)
    q = view(n).requires_grad_()
    keys = [view(m).requires_grad_() for m in lengths]
    values = [view(m).requires_grad_() for m in lengths]
    grad = torch.randn(b, h, n, d, device=device, dtype=torch.float16)
    mask = torch.rand(b, 1, n, lengths[0], device=device) > 0.3 if op == "dual_masked" else None
    with lightmotion_fast.backend("triton"):
        if op == "reference":
            out = reference_attention(q, keys[0], values[0], keys[1], values[1])
        else:
            out = dual_cross_attention(q, keys, values, [1.0, 0.6], mask=mask)
        out.backward(grad)
    kinds = {(name, kw["D_HI"], kw["D_LO"]) for name, _, kw in launches}
    dq_name = "_dual_bwd_dq_kernel" if op == "reference" else "_dual_bwd_dq_resident_kernel"   # short key lists
    assert (dq_name, *chunks) in kinds and ("_dual_bwd_dkdv_kernel", *dkdv) in kinds
    dkdv_launches = [kw for name, _, kw in launches if name == "_dual_bwd_dkdv_kernel"]
    if d == 80:
        want_tiles = [(64, 8) if kw["HAS_MASK"] else (64, 4) for kw in dkdv_launches]
        assert [(kw["BLOCK_N"], kw["num_warps"]) for kw in dkdv_launches] == want_tiles
        assert [kw["HAS_MASK"] for kw in dkdv_launches] == [op == "dual_masked", False]
    else:
        assert len(kinds) == 2
    dq_launches = 1 if attn_kernels._dq_sets_per_launch(d) > 1 else 2  # both sets in one up to 64-wide heads
    assert len(launches) == dq_launches + 2  # and a dk/dv launch per set
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, *keys, *values)]
    if op != "reference":
        want = dual_cross_attention_reference(leaves[0], leaves[1:3], leaves[3:], [1.0, 0.6],
                                              mask=None if mask is None else mask.cpu())
    else:
        want = torch.nn.functional.scaled_dot_product_attention(
            leaves[0], torch.cat(leaves[1:3], 2), torch.cat(leaves[3:], 2))
    want.backward(grad.double().cpu())
    for got, ref in zip((q, *keys, *values), leaves):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("d", [160, 256])
def test_fp32_wide_dkdv_streams_scores_from_memory(device, poisoned, monkeypatch, d):
    """fp32 dk/dv from 160-wide heads forms S and dP from memory 32 head-dim columns at a time
    (`_dkdv_s_chunk`; holding K, V spilled on sm_90): the launch says so, and with a float mask,
    λ ≠ 1 and head-interleaved views ([b, m, h, d] buffers) the gradients equal float64's."""
    launches = record_launches(monkeypatch, attn_kernels, "_dual_bwd_dkdv_kernel")
    b, h, n, lengths = 1, 2, 19, (13, 6)

    def view(m):  # [b, h, m, d] over a [b, m, h, d] buffer: head stride d, row stride h·d
        return torch.randn(b, m, h, d, device=device, dtype=torch.float32).transpose(1, 2)
    q = view(n).requires_grad_()
    keys = [view(m).requires_grad_() for m in lengths]
    values = [view(m).requires_grad_() for m in lengths]
    mask = torch.randn(b, h, n, lengths[0], device=device)
    grad = torch.randn(b, h, n, d, device=device)
    with lightmotion_fast.backend("triton"):
        dual_cross_attention(q, keys, values, [1.0, 0.6], mask=mask).backward(grad)
    assert [(kw["S_CHUNK"], kw["D_HI"], kw["D_LO"]) for _, _, kw in launches] == \
        [(32, 128, triton.next_power_of_2(d - 128))] * 2
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, *keys, *values)]
    want = dual_cross_attention_reference(leaves[0], leaves[1:3], leaves[3:], [1.0, 0.6], mask=mask.double().cpu())
    want.backward(grad.double().cpu())
    for got, ref in zip((q, *keys, *values), leaves):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype, d, stages", [(torch.float16, 160, 2), (torch.float16, 256, 4), (torch.float32, 80, 3),
                                              (torch.float32, 256, 2)])
def test_forward_pipeline_stages_by_head_dim(device, poisoned, monkeypatch, dtype, d, stages):
    """The dual forward takes 4 pipeline stages at 16-bit heads wider than 192 and 3 at fp32 heads 65-128
    wide (fewer spilled on sm_90 with a mask), 2 elsewhere (3 spilled at fp32 256); the output holds at
    each against float64."""
    launches = record_launches(monkeypatch, attn_kernels, "_dual_cross_attention_fwd_kernel")
    b, h, n, lengths = 1, 1, 12, (9, 4)
    q = torch.randn(b, h, n, d, device=device, dtype=dtype)
    keys = [torch.randn(b, h, m, d, device=device, dtype=dtype) for m in lengths]
    values = [torch.randn(b, h, m, d, device=device, dtype=dtype) for m in lengths]
    mask = torch.rand(b, 1, n, lengths[0], device=device) > 0.3
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, [1.0, 0.5], mask=mask)
    assert [kw["num_stages"] for _, _, kw in launches] == [stages]
    want = dual_cross_attention_reference(q.double().cpu(), [k.double().cpu() for k in keys],
                                          [v.double().cpu() for v in values], [1.0, 0.5], mask=mask.cpu())
    tol = 4e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.double().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("triton_version, d, conditions, warps", [
    ((3, 6), 160, 2, [4]), ((3, 6), 160, 3, [8]), ((3, 6), 160, 5, [8, 4]), ((3, 6), 256, 2, [8]),
    ((3, 9), 160, 2, [8])])
def test_forward_warps_at_160_wide_heads_by_compiler(device, poisoned, monkeypatch, triton_version, d, conditions,
                                                    warps):
    """16-bit heads 129-192 wide (32 × 256 tiles): Triton before 3.9 fits 8 warps in 139 registers on
    sm_90, one block per SM, so launches of up to two conditions take 4 warps (two blocks); three or
    four conditions (4 warps spill there), 256-wide heads and Triton 3.9 keep 8. The output holds at
    each against float64."""
    monkeypatch.setattr(attn_kernels, "_TRITON_VERSION", triton_version)
    launches = record_launches(monkeypatch, attn_kernels, "_dual_cross_attention_fwd_kernel")
    b, h, n = 1, 1, 33
    lengths = (9, 4, 5, 3, 6)[:conditions]
    q = torch.randn(b, h, n, d, device=device, dtype=torch.float16)
    keys = [torch.randn(b, h, m, d, device=device, dtype=torch.float16) for m in lengths]
    values = [torch.randn(b, h, m, d, device=device, dtype=torch.float16) for m in lengths]
    scales = [1.0, 0.5, 0.25, 0.75, 0.4][:conditions]
    with lightmotion_fast.backend("triton"):
        out = dual_cross_attention(q, keys, values, scales)
    assert [(kw["BLOCK_M"], kw["num_warps"]) for _, _, kw in launches] == [(32, w) for w in warps]
    want = dual_cross_attention_reference(q.double().cpu(), [k.double().cpu() for k in keys],
                                          [v.double().cpu() for v in values], scales)
    torch.testing.assert_close(out.double().cpu(), want, atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("dtype, d, lengths, resident", [
    (torch.float16, 40, (77, 4), True), (torch.bfloat16, 80, (128, 16), True), (torch.float16, 128, (5, 9), True),
    (torch.float16, 40, (129, 4), False), (torch.float16, 160, (77, 4), False), (torch.float32, 40, (77, 4), False)])
def test_forward_keeps_short_key_lists_resident(device, poisoned, monkeypatch, dtype, d, lengths, resident):
    """16-bit heads up to 128 wide whose every condition has at most 128 keys take the resident-keys
    forward (keys loaded once per program, one softmax pass per condition over two key blocks); longer
    key lists, wider heads and fp32 the online-softmax kernel. Output and lse hold against float64."""
    from lightmotion_fast.ops.dual_cross_attention import dual_cross_attention_op, scores_lse

    launches = record_launches(monkeypatch, attn_kernels, "_dual_cross_attention_fwd_kernel",
                               "_dual_cross_attention_fwd_resident_kernel")
    b, h, n = 1, 2, 70
    q, keys, values = make_inputs(b, h, n, d, lengths, dtype, device)
    with lightmotion_fast.backend("triton"):
        out, lse = dual_cross_attention_op(q, keys, values, [1.0, 0.6], None, d ** -0.5)
    name = "_dual_cross_attention_fwd_resident_kernel" if resident else "_dual_cross_attention_fwd_kernel"
    assert [launch[0] for launch in launches] == [name]
    if resident:
        kw = launches[0][2]
        assert [(kw[f"KEYS{j}_A"], kw[f"KEYS{j}_B"]) for j in range(2)] == [
            attn_kernels._resident_key_blocks(m) for m in lengths]
    want = dual_cross_attention_reference(as64([q])[0], as64(keys), as64(values), [1.0, 0.6])
    atol, rtol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), want, atol=atol * 2, rtol=rtol)
    for j, k in enumerate(keys):
        want_lse = scores_lse(q.double().cpu(), k.double().cpu(), d ** -0.5).reshape(b * h, n)
        torch.testing.assert_close(lse[j].double().cpu(), want_lse.double(), atol=1e-2, rtol=1e-3)


def test_online_softmax_forward_still_holds_for_short_key_lists(device, poisoned, monkeypatch):
    """The key-streaming forward that the resident one replaced for short key lists (the benchmark's
    `lightmotion/streamed_keys` row runs it there): same outputs at 16 bits, masked and not."""
    monkeypatch.setattr(attn_kernels, "_resident_keys", lambda *args: False)
    launches = record_launches(monkeypatch, attn_kernels, "_dual_cross_attention_fwd_kernel")
    b, h, n, d, lengths = 1, 2, 70, 80, (77, 16)
    q, keys, values = make_inputs(b, h, n, d, lengths, torch.float16, device)
    mask = torch.rand(b, 1, n, lengths[0], device=device) > 0.3
    for m in (None, mask):
        with lightmotion_fast.backend("triton"):
            out = dual_cross_attention(q, keys, values, [1.0, 0.6], mask=m)
        want = dual_cross_attention_reference(as64([q])[0], as64(keys), as64(values), [1.0, 0.6],
                                              None if m is None else m.cpu())
        torch.testing.assert_close(out.double().cpu(), want, atol=8e-3, rtol=4e-3)
    assert len(launches) == 2


@pytest.mark.parametrize("d, lengths, fwd_blocks, dq_blocks, dkdv_blocks", [
    (40, (200, 4), (32, 32), (32, 32), (64, 64)),    # 40-wide: a masked set at most 32 keys a tile
    (96, (9, 4), None, None, (16, 32)),              # 96-wide: masked dk/dv 16 keys (short keys: resident fwd, dq)
])
def test_masked_set_takes_narrow_key_tiles(device, poisoned, monkeypatch, d, lengths, fwd_blocks, dq_blocks,
                                           dkdv_blocks):
    """A masked key/value set holds the mask tile beside its scores: the online-softmax forward and dq
    take at most 32 keys a tile for it (64 spilled 96-624 B on sm_90), dk/dv above 64-wide heads 16
    (32 spilled 84 B under Triton 3.6); the unmasked set keeps its tile. Gradients hold."""
    launches = record_launches(monkeypatch, attn_kernels, "_dual_cross_attention_fwd_kernel", "_dual_bwd_dq_kernel",
                               "_dual_bwd_dq_resident_kernel", "_dual_bwd_dkdv_kernel")
    b, h, n = 1, 2, 21
    q, keys, values = make_inputs(b, h, n, d, lengths, torch.float16, device, requires_grad=True)
    mask = torch.rand(b, 1, n, lengths[0], device=device) > 0.3
    grad = torch.randn(b, h, n, d, device=device, dtype=torch.float16)
    with lightmotion_fast.backend("triton"):
        dual_cross_attention(q, keys, values, [1.0, 0.6], mask=mask).backward(grad)
    by_name = {}
    for name, _, kw in launches:
        by_name.setdefault(name, []).append(kw)
    if fwd_blocks:
        (fwd,) = by_name["_dual_cross_attention_fwd_kernel"]
        assert (fwd["BLOCK_N0"], fwd["BLOCK_N1"]) == fwd_blocks
    if dq_blocks:
        dq = by_name["_dual_bwd_dq_kernel"][0]
        assert (dq["BLOCK_N0"], dq["BLOCK_N1"]) == dq_blocks
    else:
        assert "_dual_bwd_dq_resident_kernel" in by_name and "_dual_bwd_dq_kernel" not in by_name
    assert tuple(kw["BLOCK_N"] for kw in by_name["_dual_bwd_dkdv_kernel"]) == dkdv_blocks
    leaves = as64([q, *keys, *values])
    want = dual_cross_attention_reference(leaves[0], leaves[1:3], leaves[3:], [1.0, 0.6], mask=mask.cpu())
    want.backward(grad.double().cpu())
    for got, ref in zip((q, *keys, *values), leaves):
        scale = ref.grad.abs().max().item() + 1e-6
        assert (got.grad.double().cpu() - ref.grad).abs().max().item() <= 2e-2 * scale


def test_resident_key_blocks():
    """A resident condition's keys: a power-of-two block plus a power-of-two rest, each at least 16."""
    blocks = {m: attn_kernels._resident_key_blocks(m) for m in (0, 1, 16, 17, 33, 64, 65, 77, 100, 128)}
    assert blocks == {0: (16, 0), 1: (16, 0), 16: (16, 0), 17: (16, 16), 33: (32, 16), 64: (64, 0), 65: (64, 16),
                      77: (64, 16), 100: (64, 64), 128: (128, 0)}
    for m, (a, rest) in blocks.items():
        assert a + rest >= m and (rest == 0 or a < m)


@pytest.mark.parametrize("per_program", [1, 2, 3, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_resident_programs_walk_several_query_tiles(device, poisoned, monkeypatch, per_program, masked):
    """A resident program walks `per_program` consecutive 64-query tiles of its head (the last program
    of a head fewer): 300 queries are 5 tiles, so 2 and 3 leave a short last program and 8 one program
    per head. Every query row, its lse and a first-condition mask land where they belong."""
    from lightmotion_fast.ops.dual_cross_attention import dual_cross_attention_op, scores_lse

    monkeypatch.setattr(attn_kernels, "_tiles_per_program", lambda *args: per_program)
    launches = record_launches(monkeypatch, attn_kernels, "_dual_cross_attention_fwd_resident_kernel",
                               "_dual_bwd_dq_resident_kernel")
    b, h, n, d, lengths = 2, 2, 300, 40, (77, 4)
    q, keys, values = make_inputs(b, h, n, d, lengths, torch.float16, device, requires_grad=True)
    mask = torch.randn(b, h, n, lengths[0], device=device).to(torch.float16) if masked else None
    grad = torch.randn(b, h, n, d, device=device, dtype=torch.float16)
    g_lse = torch.randn(2, b * h, n, device=device)
    with lightmotion_fast.backend("triton"):
        out, lse = dual_cross_attention_op(q, keys, values, [1.0, 0.6], mask, d ** -0.5)
        ((out.float() * grad).sum() + (lse * g_lse).sum()).backward()
    at = {"_dual_cross_attention_fwd_resident_kernel": 15, "_dual_bwd_dq_resident_kernel": 21}  # tiles_per_program
    assert [(name, args[at[name]]) for name, args, _ in launches] == [(name, per_program) for name in at]
    m64 = None if mask is None else mask.double().cpu()
    leaves = as64([q, *keys, *values])
    want = dual_cross_attention_reference(leaves[0], leaves[1:3], leaves[3:], [1.0, 0.6], m64)
    torch.testing.assert_close(out.double().cpu(), want.detach(), atol=8e-3, rtol=4e-3)
    want_lse = torch.stack([scores_lse(leaves[0], k, d ** -0.5, m64 if j == 0 else None).reshape(b * h, n)
                            for j, k in enumerate(leaves[1:3])]).double()
    torch.testing.assert_close(lse.double().cpu(), want_lse.detach(), atol=1e-2, rtol=1e-3)
    ((want * grad.double().cpu()).sum() + (want_lse * g_lse.double().cpu()).sum()).backward()
    for got, ref in zip((q, *keys, *values), leaves):
        scale = ref.grad.abs().max().item()
        assert (got.grad.double().cpu() - ref.grad).abs().max().item() <= 1e-2 * scale


def test_tiles_per_program():
    """Up to 8 query tiles a program, fewer when that would leave under ~4 programs per SM."""
    f = attn_kernels._tiles_per_program
    assert f(64, 256, 132) == 8          # SD1.5 64×64: 16,384 tiles -> 2,048 programs
    assert f(64, 20, 132) == 2           # SDXL 64×64 at b = 2: 1,280 tiles -> 640 programs
    assert f(4, 20, 132) == 1 and f(3, 1, 132) == 1 and f(1, 10 ** 6, 132) == 1


@pytest.mark.parametrize("d", [40, 80])
@pytest.mark.parametrize("conditions", [1, 2, 5])
def test_16bit_dq_is_written_once_in_its_dtype(device, poisoned, monkeypatch, conditions, d):
    """At heads up to 64 wide one dq launch takes up to four key/value sets, sums their dQ in registers
    and writes dq once in q's dtype (no fp32 dq converted afterwards); a fifth set chains a second launch
    that adds the first's fp32 partial sum; wider heads take a launch per set, chained the same way.
    Gradients against float64. (Short key lists: the resident dq kernel, chained the same way.)"""
    launches = record_launches(monkeypatch, attn_kernels, "_dual_bwd_dq_kernel", "_dual_bwd_dq_resident_kernel")
    b, h, n = 1, 2, 24
    lengths = (9, 4, 3, 5, 2)[:conditions]
    scales = [1.0, 0.6, 0.3, 0.8, 0.5][:conditions]
    q = torch.randn(b, h, n, d, device=device, dtype=torch.float16, requires_grad=True)
    keys = [torch.randn(b, h, m, d, device=device, dtype=torch.float16, requires_grad=True) for m in lengths]
    values = [torch.randn(b, h, m, d, device=device, dtype=torch.float16, requires_grad=True) for m in lengths]
    grad = torch.randn(b, h, n, d, device=device, dtype=torch.float16)
    with lightmotion_fast.backend("triton"):
        dual_cross_attention(q, keys, values, scales).backward(grad)
    # (NUM_COND, ACCUMULATE, dtype of dq_ptr, dqacc_ptr)
    seen = [(kw["NUM_COND"], kw["ACCUMULATE"], args[5].dtype, args[6]) for _, args, kw in launches]
    per_launch = 4 if d <= 64 else 1
    sizes = [min(per_launch, conditions - i) for i in range(0, conditions, per_launch)]
    dtypes = [torch.float32] * (len(sizes) - 1) + [torch.float16]
    assert [s[:3] for s in seen] == [(n_sets, i > 0, dt) for i, (n_sets, dt) in enumerate(zip(sizes, dtypes))]
    for (_, prev, _), (_, _, _, acc) in zip(launches, seen[1:]):
        assert acc is prev[5]  # each launch adds the partial sum the one before wrote
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, *keys, *values)]
    dual_cross_attention_reference(leaves[0], leaves[1:1 + conditions], leaves[1 + conditions:],
                                   scales).backward(grad.double().cpu())
    for got, ref in zip((q, *keys, *values), leaves):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=3e-2, rtol=3e-2)


_BWD_KERNELS = ("_dual_bwd_dq_kernel", "_dual_bwd_dq_resident_kernel", "_dual_bwd_dkdv_kernel")


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("frozen", [(0,), (1,), (0, 2)])
def test_frozen_conditions_get_no_gradient_and_no_dkdv_pass(device, poisoned, monkeypatch, impl, frozen):
    """IP-Adapter training: the text condition's keys and values come from frozen projections. Conditions
    whose keys and values do not require gradients get None and their dk/dv pass is not launched (one
    dk/dv launch per trainable condition); every gradient asked for equals the float64 reference."""
    lengths = (9, 4, 5)
    q, keys, values = make_inputs(1, 2, 21, 40, lengths, torch.float32, device, requires_grad=True)
    for j in frozen:
        keys[j].requires_grad_(False)
        values[j].requires_grad_(False)
    launches = record_launches(monkeypatch, attn_kernels, *_BWD_KERNELS)
    grad = torch.randn(q.shape, device=device)
    with lightmotion_fast.backend(impl):
        out = dual_cross_attention(q, keys, values, [1.0, 0.6, 0.3])
        launches.clear()
        out.backward(grad)
    if impl == "triton":
        assert sum(name == "_dual_bwd_dkdv_kernel" for name, *_ in launches) == len(lengths) - len(frozen)
        assert any(name != "_dual_bwd_dkdv_kernel" for name, *_ in launches)   # dq (and every Δ) still runs
    q64, k64, v64 = as64([q])[0], as64(keys), as64(values)
    dual_cross_attention_reference(q64, k64, v64, [1.0, 0.6, 0.3]).backward(grad.double().cpu())
    for j, (k, v) in enumerate(zip(keys, values)):
        assert (k.grad is None and v.grad is None) == (j in frozen)
    for got, ref in zip((q, *keys, *values), (q64, *k64, *v64)):
        if got.requires_grad:
            torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=5e-5, rtol=1e-4)
