"""reference_attention: queries from the feature map m, keys/values from m and a reference bank p,
without materialising the concatenation (specs/motionflow.md, "Reference attention").

Checks, the custom ops `lightmotion::reference_attention` (returns the output and the row
log-sum-exp) and `lightmotion::reference_attention_backward`, its autograd, and the choice of
implementation. The meaning is in reference/reference_attention.py, the speed in
kernels/dual_cross_attention.py: one online-softmax state running over both sources forward (key/value
tiles by TMA on sm_90+, `_tma`); the
backward runs the dual-attention dq and dk/dv kernels once per source with the shared
Δ = rowsum(dO ∘ O) (no [n, n_m + n_p] probabilities stored, no recompute through SDPA). Without
Triton (CPU, reference backend, float64) both run in PyTorch over the concatenation.
"""
from __future__ import annotations

import torch

from lightmotion_fast.ops import _common
from lightmotion_fast.ops.dual_cross_attention import (ATTENTION_DTYPES, MAX_HEAD_DIM, _backward_torch,
                                                       heads_last_empty, scores_lse, triton_path)
from lightmotion_fast.reference.reference_attention import reference_attention_reference


@torch.library.custom_op("lightmotion::reference_attention", mutates_args=())
def reference_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor,
                           v_ref: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [b h n d]; k, v: [b h n_m d]; k_ref, v_ref: [b h n_p d]. Returns (out [b h n d] (stored
    [b n h d]), lse [b·h, n] float32: the natural log-sum-exp of the scaled scores over both sources)."""
    b, h, n, _ = q.shape
    out = heads_last_empty(q)
    lse = torch.empty((b * h, n), dtype=torch.float32, device=q.device)
    if triton_path(q):
        _common.kernel_module("dual_cross_attention").reference_attention_launch(
            q, k, v, k_ref, v_ref, softmax_scale, out, lse, tma=_tma(q))
    else:
        out.copy_(reference_attention_reference(q, k, v, k_ref, v_ref, softmax_scale))
        lse.copy_(scores_lse(q, torch.cat([k, k_ref], 2), softmax_scale).reshape(b * h, n))
    return out, lse


def _tma(q: torch.Tensor) -> bool:
    """Whether the forward brings K/V in through TMA: Hopper or newer (compute capability 9+)."""
    return _common.has_tma(q.device)


@reference_attention_op.register_fake
def _(q, k, v, k_ref, v_ref, softmax_scale):
    b, h, n, _ = q.shape
    return heads_last_empty(q), q.new_empty((b * h, n), dtype=torch.float32)


def _wanted(needs) -> list[bool]:
    """[q, (k, v), (k_ref, v_ref)] -> one flag per gradient [dq, dk, dv, dk_ref, dv_ref]."""
    return [needs[0], needs[1], needs[1], needs[2], needs[2]]


@torch.library.custom_op("lightmotion::reference_attention_backward", mutates_args=())
def reference_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    k_ref: torch.Tensor, v_ref: torch.Tensor, out: torch.Tensor, softmax_scale: float,
                                    lse: torch.Tensor, grad_lse: torch.Tensor | None,
                                    needs: list[bool]) -> list[torch.Tensor]:
    """Gradients [dq, dk, dv, dk_ref, dv_ref] of reference_attention_op's (out, lse) for incoming
    (grad_out, grad_lse); grad_lse None when no gradient reaches the LSE. needs: [q, (k, v), (k_ref, v_ref)]
    want gradients; what is not wanted comes back empty ([0]) and its pass does not run (a frozen
    reference network's bank, or a frozen main network training only the reference one)."""
    want = _wanted(needs)
    if triton_path(q):
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if needs[0] else None
        grads = [torch.empty_like(t) if w else None for t, w in zip((k, v, k_ref, v_ref), want[1:])]
        _common.kernel_module("dual_cross_attention").reference_attention_backward_launch(
            grad_out, q, out, ((k, v), (k_ref, v_ref)), softmax_scale, lse.contiguous(),
            None if grad_lse is None else grad_lse.float().contiguous(), dq, (grads[0:2], grads[2:4]),
            sm_count=_common.device_sm_count(q.device))
        result = [dq, *grads]
    else:
        # One softmax over the concatenation: the single-condition dual backward over [k; k_ref].
        n_m = k.shape[2]
        dq, (dk_cat,), (dv_cat,) = _backward_torch(grad_out, q, [torch.cat([k, k_ref], 2)],
                                                   [torch.cat([v, v_ref], 2)], [1.0], None, softmax_scale, lse[None],
                                                   None if grad_lse is None else grad_lse[None])
        # clone: the slices may be views of one buffer, and custom-op outputs must not alias.
        result = [dq, dk_cat[:, :, :n_m].clone(), dv_cat[:, :, :n_m].clone(), dk_cat[:, :, n_m:].clone(),
                  dv_cat[:, :, n_m:].clone()]
    return [t if w else q.new_empty(0) for t, w in zip(result, want)]


@reference_attention_backward_op.register_fake
def _(grad_out, q, k, v, k_ref, v_ref, out, softmax_scale, lse, grad_lse, needs):
    want = _wanted(needs)
    return [torch.empty_like(t) if w else q.new_empty(0) for t, w in zip((q, k, v, k_ref, v_ref), want)]


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # an unused output's gradient arrives as None, not as zeros
    ctx.save_for_backward(*inputs[:5], *output)
    ctx.softmax_scale = inputs[5]


def _backward(ctx, grad_out, grad_lse):
    q, k, v, k_ref, v_ref, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    n = ctx.needs_input_grad
    needs = [bool(n[0]), bool(n[1] or n[2]), bool(n[3] or n[4])]
    # grad_lse stays None (no [b·h, n] zeros made and read) when nothing uses the LSE
    grads = reference_attention_backward_op(grad_out, q, k, v, k_ref, v_ref, out, ctx.softmax_scale, lse, grad_lse,
                                            needs)
    want = _wanted(needs)
    return (*[g if w else None for g, w in zip(grads, want)], None)


reference_attention_op.register_autograd(_common.without_autocast(_backward), setup_context=_setup_context)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q [k; k_ref]ᵀ · s) [v; v_ref] without building the concatenation.

    q: [b h n d] queries of the feature map m; k, v: [b h n_m d] from m; k_ref, v_ref: [b h n_p d]
    from the reference bank p (any strides). softmax_scale defaults to d^-½. Returns [b h n d] in
    q's dtype. Equal to MotionFlow's "concatenate m and p along the width, attend, keep the first
    half" when no positional term mixes the halves. Differentiable. fp16/bf16/fp32 run the Triton
    kernels, float64 runs PyTorch.

    >>> out = reference_attention(q, k, v, bank_k, bank_v)     # == SDPA(q, cat(k, bank_k), cat(v, bank_v))
    """
    _common.check_tensor("q", q, ndim=4, dims="b h n d", dtypes=ATTENTION_DTYPES)
    b, h, n, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM or n < 1:
        raise ValueError(f"q must have at least one query and a head dim of 1..{MAX_HEAD_DIM}, got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v), ("k_ref", k_ref), ("v_ref", v_ref)):
        _common.check_tensor(name, t, ndim=4, dims="b h m d", dtypes=ATTENTION_DTYPES)
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
    out, _ = reference_attention_op(q, k, v, k_ref, v_ref, softmax_scale)
    return out


def sample_inputs(device: torch.device):
    """Arguments for opcheck and torch.compile tests."""
    q = torch.randn(2, 2, 21, 40, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 21, 40, device=device, requires_grad=True) for _ in range(2))
    kr, vr = (torch.randn(2, 2, 17, 40, device=device) for _ in range(2))
    h = torch.randn(1, 3, 5, 16, device=device, dtype=torch.float16)
    hr = torch.randn(1, 3, 9, 16, device=device, dtype=torch.float16)
    return [(q, k, v, kr, vr, 40 ** -0.5), (h, h, h, hr, hr, 0.3)]


def backward_sample_inputs(device: torch.device):
    """Arguments for opcheck of the backward op: a forward's outputs and incoming gradients."""
    samples = []
    for q, k, v, kr, vr, softmax_scale in sample_inputs(device):
        q, k, v = q.detach(), k.detach(), v.detach()
        out, lse = reference_attention_op(q, k, v, kr, vr, softmax_scale)
        needs = [True, True, False] if not samples else [False, True, True]   # a frozen bank, then a frozen q
        samples.append((torch.randn_like(out), q, k, v, kr, vr, out, softmax_scale, lse, torch.randn_like(lse), needs))
    return samples
