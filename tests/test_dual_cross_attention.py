"""dual_cross_attention: fused Triton forward (interpreter on CPU) and the backward against the float64
reference, at odd lengths, with masks, several conditions and all three dtypes; input checks."""
import pytest
import torch
import torch.nn.functional as F

import lightmotion_fast
from lightmotion_fast.ops.dual_cross_attention import dual_cross_attention
from lightmotion_fast.reference.dual_cross_attention import dual_cross_attention_reference

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
