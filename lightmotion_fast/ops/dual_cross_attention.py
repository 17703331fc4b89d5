"""dual_cross_attention: one query set, several key/value sets with separate softmaxes and weights
(specs/motionflow.md; IP-Adapter's text + image-prompt attention, MotionFlow's image + camera tokens).

Checks, the custom op `lightmotion::dual_cross_attention`, its autograd, and the choice of
implementation. The meaning is in reference/dual_cross_attention.py, the speed in
kernels/dual_cross_attention.py (fused forward; backward kernels for dq and for dk/dv per
condition, recomputing the probabilities from the forward's per-condition log-sum-exp). Without
Triton (CPU, reference backend) the backward does the same with PyTorch matmuls.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend
from lightmotion_fast.reference.dual_cross_attention import dual_cross_attention_reference

MAX_HEAD_DIM = 256
# What the custom ops take. float64 runs the PyTorch path (the Triton kernels are fp32/fp16/bf16).
ATTENTION_DTYPES = (*_common.FLOAT_DTYPES, torch.float64)


def triton_path(q: torch.Tensor) -> bool:
    """True when the attention ops run their Triton kernels for q (float64 always takes PyTorch)."""
    return _common.select_backend(q.device) is Backend.TRITON and q.dtype != torch.float64


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def heads_last_empty(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised [b h n d] tensor stored as [b n h d]: what a diffusers processor reshapes to
    [b n (h d)] next, so that reshape is free."""
    b, h, n, d = q.shape
    return q.new_empty((b, n, h, d), dtype=dtype or q.dtype).transpose(1, 2)


def scores_lse(q, k, softmax_scale, mask=None):
    """Natural log-sum-exp of the scaled, masked scores over the keys, float32 [b h n] (-inf for a
    fully masked row)."""
    c = _compute_dtype(q)
    scores = (q.to(c) @ k.to(c).transpose(-1, -2)) * softmax_scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(c)
    return torch.logsumexp(scores, dim=-1).float()


@torch.library.custom_op("lightmotion::dual_cross_attention", mutates_args=())
def dual_cross_attention_op(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                            scales: list[float], mask: torch.Tensor | None,
                            softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [b h n d]; keys[j], values[j]: [b h mⱼ d]; mask: None or broadcastable to [b h n m₀].
    Returns (out [b h n d], lse [conditions, b·h, n] float32)."""
    b, h, n, _ = q.shape
    out = heads_last_empty(q)
    lse = torch.empty((len(keys), b * h, n), dtype=torch.float32, device=q.device)
    full_mask = None if mask is None else mask.expand(b, h, n, keys[0].shape[2])
    if triton_path(q):
        _common.kernel_module("dual_cross_attention").dual_cross_attention_launch(
            q, keys, values, scales, full_mask, softmax_scale, out, lse, sm_count=_common.device_sm_count(q.device))
    else:
        out.copy_(dual_cross_attention_reference(q, keys, values, scales, full_mask, softmax_scale))
        for j, k in enumerate(keys):
            lse[j].copy_(scores_lse(q, k, softmax_scale, full_mask if j == 0 else None).reshape(b * h, n))
    return out, lse


@dual_cross_attention_op.register_fake
def _(q, keys, values, scales, mask, softmax_scale):
    b, h, n, _ = q.shape
    return heads_last_empty(q), q.new_empty((len(keys), b * h, n), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # an unused output's gradient arrives as None, not as zeros
    q, keys, values, scales, mask, softmax_scale = inputs
    _, lse = output
    ctx.save_for_backward(q, lse, *keys, *values)
    ctx.mask, ctx.scales, ctx.softmax_scale, ctx.conditions = mask, list(scales), softmax_scale, len(keys)


@torch.library.custom_op("lightmotion::dual_cross_attention_backward", mutates_args=())
def dual_cross_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, keys: list[torch.Tensor],
                                     values: list[torch.Tensor], scales: list[float], mask: torch.Tensor | None,
                                     softmax_scale: float, lse: torch.Tensor, grad_lse: torch.Tensor | None,
                                     kv_grads: list[bool]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Gradients (dq, dks, dvs) of dual_cross_attention_op's (out, lse) for incoming (grad_out, grad_lse);
    grad_lse None when no gradient reaches the LSE (the public op never returns it): nothing is read for it.
    kv_grads[j]: whether condition j's keys or values want gradients. Where not, dks[j] and dvs[j] come back
    empty ([0]) and that condition's dk/dv pass does not run: training an IP-Adapter leaves the text
    condition's projections frozen, and its dk/dv walk (77 keys over every query) is skipped."""
    b, h, n, _ = q.shape
    full_mask = None if mask is None else mask.expand(b, h, n, keys[0].shape[2])
    if triton_path(q):
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dks = [torch.empty_like(k) if need else None for k, need in zip(keys, kv_grads)]
        dvs = [torch.empty_like(v) if need else None for v, need in zip(values, kv_grads)]
        _common.kernel_module("dual_cross_attention").dual_cross_attention_backward_launch(
            grad_out, q, keys, values, scales, full_mask, softmax_scale, lse.contiguous(),
            None if grad_lse is None else grad_lse.float().contiguous(), dq, dks, dvs,
            sm_count=_common.device_sm_count(q.device))
    else:
        dq, dks, dvs = _backward_torch(grad_out, q, keys, values, scales, full_mask, softmax_scale, lse, grad_lse,
                                       kv_grads)
    return dq, [t if t is not None else q.new_empty(0) for t in dks], [t if t is not None else q.new_empty(0)
                                                                        for t in dvs]


@dual_cross_attention_backward_op.register_fake
def _(grad_out, q, keys, values, scales, mask, softmax_scale, lse, grad_lse, kv_grads):
    return (torch.empty_like(q), [torch.empty_like(k) if need else q.new_empty(0) for k, need in zip(keys, kv_grads)],
            [torch.empty_like(v) if need else q.new_empty(0) for v, need in zip(values, kv_grads)])


def _backward_torch(grad_out, q, keys, values, scales, mask, softmax_scale, lse, grad_lse, kv_grads=None):
    """The same gradients with PyTorch matmuls (CPU without the interpreter, reference backend, float64),
    in float32 (float64 for float64 inputs); dk, dv None for the conditions kv_grads leaves out."""
    b, h, n, _ = q.shape
    s = softmax_scale
    c = _compute_dtype(q)
    qf, dout = q.to(c), grad_out.to(c)
    dq = torch.zeros_like(qf)
    dks, dvs = [], []
    for j, (k, v, lam) in enumerate(zip(keys, values, scales)):
        kf, vf = k.to(c), v.to(c)
        scores = (qf @ kf.transpose(-1, -2)) * s
        if j == 0 and mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(c)
        lse_j = lse[j].reshape(b, h, n, 1).to(c)
        dead = torch.isinf(lse_j)
        p = torch.where(dead, torch.zeros_like(scores), torch.exp(scores - torch.where(dead, 0.0, lse_j)))
        do_j = lam * dout
        need = kv_grads is None or kv_grads[j]
        dvs.append((p.transpose(-1, -2) @ do_j).to(v.dtype) if need else None)
        dp = do_j @ vf.transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True)
                  + (0.0 if grad_lse is None else grad_lse[j].to(c).reshape(b, h, n, 1)))
        dq += (ds @ kf) * s
        dks.append(((ds.transpose(-1, -2) @ qf) * s).to(k.dtype) if need else None)
    return dq.to(q.dtype), dks, dvs


def _backward(ctx, grad_out, grad_lse):
    q, lse, *kv = ctx.saved_tensors
    keys, values = kv[:ctx.conditions], kv[ctx.conditions:]
    grad_out = torch.zeros_like(q) if grad_out is None else grad_out
    # grad_lse stays None (no [conditions, b·h, n] zeros made and read) when nothing uses the LSE
    kv_grads = [bool(nk or nv) for nk, nv in zip(ctx.needs_input_grad[1], ctx.needs_input_grad[2])]
    dq, dks, dvs = dual_cross_attention_backward_op(grad_out, q, keys, values, ctx.scales, ctx.mask,
                                                    ctx.softmax_scale, lse, grad_lse, kv_grads)
    dks = [dk if need else None for dk, need in zip(dks, kv_grads)]
    dvs = [dv if need else None for dv, need in zip(dvs, kv_grads)]
    return dq if ctx.needs_input_grad[0] else None, dks, dvs, None, None, None


dual_cross_attention_op.register_autograd(_common.without_autocast(_backward), setup_context=_setup_context)


def check_attention_inputs(q, keys, values, mask=None) -> None:
    """Shapes, dtypes and devices of q [b h n d], keys/values [b h mⱼ d] and the mask (first condition)."""
    _common.check_tensor("q", q, ndim=4, dims="b h n d", dtypes=ATTENTION_DTYPES)
    b, h, n, d = q.shape
    if d > MAX_HEAD_DIM or d < 1:
        raise ValueError(f"q's head dim must be 1..{MAX_HEAD_DIM}, got {d} (q shape {tuple(q.shape)})")
    if n < 1:
        raise ValueError(f"q must have at least one query, got shape {tuple(q.shape)}")
    if isinstance(keys, torch.Tensor) or isinstance(values, torch.Tensor):
        raise TypeError("keys and values must be sequences of tensors (one per condition), got a tensor")
    if len(keys) == 0 or len(keys) != len(values):
        raise ValueError(f"keys and values must be non-empty sequences of equal length, got {len(keys)} and {len(values)}")
    for j, (k, v) in enumerate(zip(keys, values)):
        _common.check_tensor(f"keys[{j}]", k, ndim=4, dims="b h m d", dtypes=ATTENTION_DTYPES)
        _common.check_tensor(f"values[{j}]", v, ndim=4, dims="b h m d", dtypes=ATTENTION_DTYPES)
        if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d or k.shape[2] < 1:
            raise ValueError(f"keys[{j}] must have shape [{b}, {h}, m, {d}] with m >= 1 (q is {tuple(q.shape)}), "
                             f"got {tuple(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"values[{j}] must have the shape of keys[{j}] {tuple(k.shape)}, got {tuple(v.shape)}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"keys[{j}] and values[{j}] must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
        _common.check_same_device(q=q, **{f"keys[{j}]": k, f"values[{j}]": v})
    if mask is not None:
        _common.check_tensor("mask", mask, dtypes=(*ATTENTION_DTYPES, torch.bool))
        m0 = keys[0].shape[2]
        try:
            torch.broadcast_shapes(mask.shape, (b, h, n, m0))
            if mask.ndim > 4 or torch.broadcast_shapes(mask.shape, (b, h, n, m0)) != (b, h, n, m0):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"mask must broadcast to [b h n m0] = {[b, h, n, m0]}, got {tuple(mask.shape)}") from None
        _common.check_same_device(q=q, mask=mask)
        if mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("mask requires grad, but the op gives no gradient to the mask (only to q, keys and "
                             "values): pass mask.detach(), or learn a bias through another op")


def dual_cross_attention(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                         scales: Sequence[float] | None = None, mask: torch.Tensor | None = None,
                         softmax_scale: float | None = None) -> torch.Tensor:
    """O = Σⱼ λⱼ · softmax(Q Kⱼᵀ · s + maskⱼ) Vⱼ with a separate softmax per key/value set.

    q: [b h n d]; keys[j], values[j]: [b h mⱼ d] (own lengths; any strides, e.g. the transposed views
    a diffusers processor makes); scales: one λ per condition (default 1 each); mask: float (added)
    or bool (True keeps), broadcastable to [b h n m₀], for the first condition only;
    softmax_scale: default d^-½. Returns [b h n d] in q's dtype (stored as [b n h d]). Differentiable
    in q, keys and values (not in the mask: a mask that requires grad is an error). Head dims up to 256; fp16/bf16/fp32 run the Triton kernels (fp32 dots are
    IEEE unless torch.backends.cuda.matmul.allow_tf32 is set), float64 runs PyTorch. NaN in the
    inputs propagates to the rows it touches on every backend.

    >>> q = torch.randn(2, 8, 4096, 40, device="cuda", dtype=torch.float16)
    >>> text_k, text_v, img_k, img_v = (torch.randn(2, 8, m, 40, device="cuda", dtype=torch.float16) for m in (77, 77, 4, 4))
    >>> out = dual_cross_attention(q, [text_k, img_k], [text_v, img_v], scales=[1.0, 0.6])
    """
    if isinstance(keys, torch.Tensor) or isinstance(values, torch.Tensor):
        raise TypeError("keys and values must be sequences of tensors (one per condition), got a tensor")
    keys, values = list(keys), list(values)
    check_attention_inputs(q, keys, values, mask)
    scales = [1.0] * len(keys) if scales is None else [_common.check_finite_number(f"scales[{j}]", s)
                                                        for j, s in enumerate(scales)]
    if len(scales) != len(keys):
        raise ValueError(f"scales must hold one weight per condition ({len(keys)}), got {len(scales)}")
    softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else _common.check_finite_number(
        "softmax_scale", softmax_scale)
    out, _ = dual_cross_attention_op(q, keys, values, scales, mask, softmax_scale)
    return out


def sample_inputs(device: torch.device):
    """Arguments for opcheck and torch.compile tests."""
    q = torch.randn(2, 3, 19, 40, device=device, requires_grad=True)
    kv = [torch.randn(2, 3, m, 40, device=device, requires_grad=True) for m in (13, 13, 4, 4)]
    mask = torch.randn(2, 1, 1, 13, device=device)
    q16 = torch.randn(1, 2, 9, 24, device=device, dtype=torch.float16)
    kv16 = [torch.randn(1, 2, m, 24, device=device, dtype=torch.float16) for m in (5, 5, 3, 3, 2, 2)]
    return [(q, [kv[0], kv[2]], [kv[1], kv[3]], [1.0, 0.5], mask, 40 ** -0.5),
            (q16, kv16[0::2], kv16[1::2], [1.0, 0.7, 0.3], None, 0.2)]


def backward_sample_inputs(device: torch.device):
    """Arguments for opcheck of the backward op: a forward's outputs and incoming gradients."""
    samples = []
    for q, keys, values, scales, mask, softmax_scale in sample_inputs(device):
        q, keys, values = q.detach(), [k.detach() for k in keys], [v.detach() for v in values]
        out, lse = dual_cross_attention_op(q, keys, values, scales, mask, softmax_scale)
        kv_grads = [j % 2 == 1 for j in range(len(keys))]   # frozen conditions' gradients come back empty
        samples.append((torch.randn_like(out), q, keys, values, scales, mask, softmax_scale, lse,
                        torch.randn_like(lse), kv_grads))
    return samples
