"""trajectory_attention: attention along pixel trajectories (specs/trajectory_attention.md).

Checks, the custom ops `lightmotion::trajectory_attention` (+ its backward), autograd, and the
choice of implementation. The meaning is in reference/trajectory_attention.py, the speed in
kernels/trajectory_attention.py; the index tables come from camera/trajectories.py.
"""
from __future__ import annotations

import torch

from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend
from lightmotion_fast.reference.trajectory_attention import (
    incoming_csr,
    trajectory_attention_backward_reference,
    trajectory_attention_reference,
)

MAX_FRAMES = 64       # the kernel holds a trajectory's F rows on chip
MAX_HEAD_DIM = 128


@torch.library.custom_op("lightmotion::trajectory_attention", mutates_args=())
def trajectory_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                            valid: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor,
                            mask_invalid: bool, deterministic: bool) -> torch.Tensor:
    """q, k, v: [b s f h d]; idx [f, n] int32; valid [f, n] bool; rowptr [f·s + 1], col [nnz] int32."""
    out = torch.empty_like(q)
    impl = _common.select_backend(q.device)
    if impl is Backend.TRITON:
        kernel = _common.kernel_module("trajectory_attention")
        kernel.trajectory_attention_fwd(q, k, v, idx, valid.view(torch.uint8), rowptr, col, out,
                                        mask_invalid, deterministic)
    else:
        out.copy_(trajectory_attention_reference(q, k, v, idx, valid, mask_invalid))
    return out


@trajectory_attention_op.register_fake
def _(q, k, v, idx, valid, rowptr, col, mask_invalid, deterministic):
    return torch.empty_like(q)


@torch.library.custom_op("lightmotion::trajectory_attention_backward", mutates_args=())
def trajectory_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     idx: torch.Tensor, valid: torch.Tensor, rowptr: torch.Tensor,
                                     col: torch.Tensor, mask_invalid: bool,
                                     deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv ([b s f h d]) of trajectory_attention from dout [b s f h d]."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    impl = _common.select_backend(q.device)
    if impl is Backend.TRITON:
        kernel = _common.kernel_module("trajectory_attention")
        kernel.trajectory_attention_bwd(dout, q, k, v, idx, valid.view(torch.uint8), rowptr, col, dq, dk, dv,
                                        mask_invalid, deterministic)
    else:
        for dst, src in zip((dq, dk, dv), trajectory_attention_backward_reference(dout, q, k, v, idx, valid,
                                                                                  mask_invalid)):
            dst.copy_(src)
    return dq, dk, dv


@trajectory_attention_backward_op.register_fake
def _(dout, q, k, v, idx, valid, rowptr, col, mask_invalid, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, idx, valid, rowptr, col, mask_invalid, deterministic = inputs
    ctx.save_for_backward(q, k, v, idx, valid, rowptr, col)
    ctx.mask_invalid = mask_invalid
    ctx.deterministic = deterministic


def _backward(ctx, dout):
    q, k, v, idx, valid, rowptr, col = ctx.saved_tensors
    dq, dk, dv = trajectory_attention_backward_op(dout, q, k, v, idx, valid, rowptr, col,
                                                  ctx.mask_invalid, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None


trajectory_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Checks and the public function


def check_inputs(q, k, v, idx, valid, rowptr=None, col=None) -> None:
    """Validate shapes, dtypes and devices. Index values are range-checked when they live on the CPU
    (tables from TrajectoryTables are checked when built); on a GPU that would synchronise the host."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_tensor(name, t, ndim=5, dims="b s f h d")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} [b s f h d], got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    _, n_pix, frames, _, dim = q.shape
    if frames > MAX_FRAMES:
        raise ValueError(f"q has {frames} frames; trajectory_attention supports at most {MAX_FRAMES}")
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {dim}; trajectory_attention supports at most {MAX_HEAD_DIM}")
    _common.check_tensor("idx", idx, ndim=2, dims="f n", dtypes=(torch.int32, torch.int64))
    if idx.shape[0] != frames:
        raise ValueError(f"idx must have shape [f, n] with f = {frames} (frames of q), got {tuple(idx.shape)}")
    _common.check_tensor("valid", valid, ndim=2, dims="f n", dtypes=(torch.bool,))
    if valid.shape != idx.shape:
        raise ValueError(f"valid must have idx's shape {tuple(idx.shape)} [f, n], got {tuple(valid.shape)}")
    _common.check_same_device(q=q, k=k, v=v, idx=idx, valid=valid, rowptr=rowptr, col=col)
    if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_pix):
        raise ValueError(f"idx values must lie in [0, {n_pix}) (pixels s of q), got range "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    if (rowptr is None) != (col is None):
        raise ValueError("rowptr and col must be given together (the CSR table of incoming tokens)")
    if rowptr is not None:
        _common.check_tensor("rowptr", rowptr, ndim=1, dims="f·s + 1", dtypes=(torch.int32, torch.int64))
        _common.check_tensor("col", col, ndim=1, dims="nnz", dtypes=(torch.int32, torch.int64))
        if rowptr.shape[0] != frames * n_pix + 1:
            raise ValueError(f"rowptr must have shape [{frames * n_pix + 1}] (f·s + 1), got {tuple(rowptr.shape)}")


def trajectory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                         valid: torch.Tensor, rowptr: torch.Tensor | None = None, col: torch.Tensor | None = None,
                         *, mask_invalid: bool = False, deterministic: bool = True) -> torch.Tensor:
    """Attention along trajectories, averaged back onto the pixels they visit.

    q, k, v: [b s f h d] projected densely (s = H·W latent pixels, any strides, fp32/fp16/bf16,
    f ≤ 64, d ≤ 128); idx: [f, n] flat pixel of trajectory n at frame f; valid: [f, n] bool.
    rowptr/col: the per-pixel CSR of incoming tokens (built here when not given; TrajectoryTables
    builds them once for every level). mask_invalid=True removes invalid frames as keys (the
    official code keeps them as zero vectors). deterministic=True (default) is bitwise repeatable
    (two launches through the CSR table); False sums with fp32 atomics in one launch.
    Returns [b s f h d] in q's dtype; pixels no valid token lands on are 0. Differentiable in q, k, v.

    >>> idx = torch.randint(0, 6 * 8, (5, 100)); valid = torch.rand(5, 100) > 0.1
    >>> q = k = v = torch.randn(2, 6 * 8, 5, 2, 64)
    >>> out = trajectory_attention(q, k, v, idx, valid)
    """
    check_inputs(q, k, v, idx, valid, rowptr, col)
    if rowptr is None:
        rowptr, col = incoming_csr(idx, valid, q.shape[1])
    return trajectory_attention_op(q, k, v, idx.to(torch.int32), valid, rowptr.to(torch.int32),
                                   col.to(torch.int32), bool(mask_invalid), bool(deterministic))


def sample_inputs(device: torch.device):
    """Arguments for opcheck and torch.compile tests (see ops/__init__.py)."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for (batch, n_pix, frames, heads, dim, n), mask_invalid, deterministic in (
        ((1, 12, 5, 2, 16, 20), False, True),
        ((2, 9, 3, 1, 40, 11), True, False),
    ):
        idx = torch.randint(0, n_pix, (frames, n), generator=gen)
        valid = torch.rand(frames, n, generator=gen) > 0.25
        rowptr, col = incoming_csr(idx, valid, n_pix)
        q, k, v = (torch.randn(batch, n_pix, frames, heads, dim, generator=gen).to(device).requires_grad_()
                   for _ in range(3))
        samples.append((q, k, v, idx.to(device, torch.int32), valid.to(device), rowptr.to(device, torch.int32),
                        col.to(device, torch.int32), mask_invalid, deterministic))
    return samples


def backward_sample_inputs(device: torch.device):
    out = []
    for q, k, v, *rest in sample_inputs(device):
        q, k, v = (t.detach() for t in (q, k, v))
        out.append((torch.randn_like(q), q, k, v, *rest))
    return out
