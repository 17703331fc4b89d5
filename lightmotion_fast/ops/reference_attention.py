"""reference_attention: queries from the feature map m, keys/values from m and a reference bank p,
without materialising the concatenation (specs/motionflow.md, "Reference attention").

Checks, the custom op `lightmotion::reference_attention`, its autograd, and the choice of
implementation. The meaning is in reference/reference_attention.py, the speed in
kernels/dual_cross_attention.py (one online-softmax state running over both sources). The backward
recomputes with PyTorch's scaled_dot_product_attention over the concatenated keys/values (flash or
memory-efficient kernels on a GPU; the [n, n_m + n_p] probabilities are never stored).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend
from lightmotion_fast.ops.dual_cross_attention import MAX_HEAD_DIM, heads_last_empty
from lightmotion_fast.reference.reference_attention import reference_attention_reference


@torch.library.custom_op("lightmotion::reference_attention", mutates_args=())
def reference_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor,
                           v_ref: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """q: [b h n d]; k, v: [b h n_m d]; k_ref, v_ref: [b h n_p d]. Returns [b h n d] (stored [b n h d])."""
    out = heads_last_empty(q)
    if _common.select_backend(q.device) is Backend.TRITON:
        b, h, n, _ = q.shape
        lse = torch.empty((b * h, n), dtype=torch.float32, device=q.device)
        _common.kernel_module("dual_cross_attention").reference_attention_launch(
            q, k, v, k_ref, v_ref, softmax_scale, out, lse)
    else:
        out.copy_(reference_attention_reference(q, k, v, k_ref, v_ref, softmax_scale))
    return out


@reference_attention_op.register_fake
def _(q, k, v, k_ref, v_ref, softmax_scale):
    return heads_last_empty(q)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.softmax_scale = inputs[5]


def _backward(ctx, grad_out):
    q, k, v, k_ref, v_ref = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v, k_ref, v_ref)]
        lq, lk, lv, lkr, lvr = leaves
        out = F.scaled_dot_product_attention(lq, torch.cat([lk, lkr], 2), torch.cat([lv, lvr], 2),
                                             scale=ctx.softmax_scale)
        grads = torch.autograd.grad(out, leaves, grad_out)
    return (*grads, None)


reference_attention_op.register_autograd(_backward, setup_context=_setup_context)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q [k; k_ref]ᵀ · s) [v; v_ref] without building the concatenation.

    q: [b h n d] queries of the feature map m; k, v: [b h n_m d] from m; k_ref, v_ref: [b h n_p d]
    from the reference bank p (any strides). softmax_scale defaults to d^-½. Returns [b h n d] in
    q's dtype. Equal to MotionFlow's "concatenate m and p along the width, attend, keep the first
    half" when no positional term mixes the halves. Differentiable.

    >>> out = reference_attention(q, k, v, bank_k, bank_v)     # == SDPA(q, cat(k, bank_k), cat(v, bank_v))
    """
    _common.check_tensor("q", q, ndim=4, dims="b h n d")
    b, h, n, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM or n < 1:
        raise ValueError(f"q must have at least one query and a head dim of 1..{MAX_HEAD_DIM}, got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v), ("k_ref", k_ref), ("v_ref", v_ref)):
        _common.check_tensor(name, t, ndim=4, dims="b h m d")
        if t.shape[0] != b or t.shape[1] != h or t.shape[3] != d or t.shape[2] < 1:
            raise ValueError(f"{name} must have shape [{b}, {h}, m, {d}] with m >= 1 (q is {tuple(q.shape)}), "
                             f"got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if v_ref.shape != k_ref.shape:
        raise ValueError(f"v_ref must have the shape of k_ref {tuple(k_ref.shape)}, got {tuple(v_ref.shape)}")
    _common.check_same_device(q=q, k=k, v=v, k_ref=k_ref, v_ref=v_ref)
    softmax_scale = d ** -0.5 if softmax_scale is None else _common.check_finite_number("softmax_scale", softmax_scale)
    return reference_attention_op(q, k, v, k_ref, v_ref, softmax_scale)


def sample_inputs(device: torch.device):
    """Arguments for opcheck and torch.compile tests."""
    q = torch.randn(2, 2, 21, 40, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 21, 40, device=device, requires_grad=True) for _ in range(2))
    kr, vr = (torch.randn(2, 2, 17, 40, device=device) for _ in range(2))
    h = torch.randn(1, 3, 5, 16, device=device, dtype=torch.float16)
    hr = torch.randn(1, 3, 9, 16, device=device, dtype=torch.float16)
    return [(q, k, v, kr, vr, 40 ** -0.5), (h, h, h, hr, hr, 0.3)]
