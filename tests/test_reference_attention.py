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
