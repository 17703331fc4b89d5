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
    check_group,
    incoming_csr,
    trajectory_attention_backward_reference,
    trajectory_attention_reference,
)

MAX_FRAMES = 64       # the kernel holds a sequence's rows on chip: F (or group·F) at most this
MAX_HEAD_DIM = 128


@torch.library.custom_op("lightmotion::trajectory_attention", mutates_args=())
def trajectory_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                            valid: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor,
                            mask_invalid: bool, deterministic: bool, group: int = 1) -> torch.Tensor:
    """q, k, v: [b s f h d]; idx [f, n] int32; valid [f, n] bool; rowptr [f·s + 1], col [nnz] int32;
    group: trajectories per softmax (dividing n)."""
    out = torch.empty_like(q)
    impl = _common.select_backend(q.device)
    if impl is Backend.TRITON:
        kernel = _common.kernel_module("trajectory_attention")
        kernel.trajectory_attention_fwd(q, k, v, idx, valid.view(torch.uint8), rowptr, col, out,
                                        mask_invalid, deterministic, group)
    else:
        out.copy_(trajectory_attention_reference(q, k, v, idx, valid, mask_invalid, group))
    return out


@trajectory_attention_op.register_fake
def _(q, k, v, idx, valid, rowptr, col, mask_invalid, deterministic, group=1):
    return torch.empty_like(q)


@torch.library.custom_op("lightmotion::trajectory_attention_backward", mutates_args=())
def trajectory_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     idx: torch.Tensor, valid: torch.Tensor, rowptr: torch.Tensor,
                                     col: torch.Tensor, mask_invalid: bool, deterministic: bool,
                                     group: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv ([b s f h d]) of trajectory_attention from dout [b s f h d]."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    impl = _common.select_backend(q.device)
    if impl is Backend.TRITON:
        kernel = _common.kernel_module("trajectory_attention")
        kernel.trajectory_attention_bwd(dout, q, k, v, idx, valid.view(torch.uint8), rowptr, col, dq, dk, dv,
                                        mask_invalid, deterministic, group)
    else:
        for dst, src in zip((dq, dk, dv), trajectory_attention_backward_reference(dout, q, k, v, idx, valid,
                                                                                  mask_invalid, group)):
            dst.copy_(src)
    return dq, dk, dv


@trajectory_attention_backward_op.register_fake
def _(dout, q, k, v, idx, valid, rowptr, col, mask_invalid, deterministic, group=1):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, idx, valid, rowptr, col, mask_invalid, deterministic, group = inputs
    ctx.save_for_backward(q, k, v, idx, valid, rowptr, col)
    ctx.mask_invalid = mask_invalid
    ctx.deterministic = deterministic
    ctx.group = group


def _backward(ctx, dout):
    q, k, v, idx, valid, rowptr, col = ctx.saved_tensors
    dq, dk, dv = trajectory_attention_backward_op(dout, q, k, v, idx, valid, rowptr, col,
                                                  ctx.mask_invalid, ctx.deterministic, ctx.group)
    return dq, dk, dv, None, None, None, None, None, None, None


trajectory_attention_op.register_autograd(_common.without_autocast(_backward), setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The index tables, validated once


class TrajectoryIndex:
    """The index tables of one level, checked once on the host when built: what `trajectory_attention`
    needs besides q, k, v.

    idx [f, n] (flat pixel y·w + x of trajectory n at frame f, in [0, n_pix) where valid), valid [f, n]
    bool, n_pix = h·w latent pixels. rowptr [f·n_pix + 1] / col [nnz] (the per-pixel CSR of the valid
    tokens landing on each (frame, pixel)) are built here, or, when given (e.g. by the C++ builder),
    checked to be exactly the table of idx and valid: a table built for other trajectories, a
    different level or garbage is a ValueError here, not a wrong result or a crash later.

    The object keeps its own int32 copies (idx is 0 at invalid points, whose pixel is never read), so
    later changes to the caller's tensors do not reach it; an in-place change to its own tensors is
    detected (tensor version counters, no read-back) at the next call, except writes PyTorch does not
    count (through `.data` or a NumPy view; tables built under `torch.inference_mode()` have no counter):
    the kernels still clamp every index they read, so such a change gives wrong rows, never a fault;
    build a new TrajectoryIndex instead. `to(device)` moves it without
    re-checking. Calls that take a TrajectoryIndex read no tensor values on the host (no GPU sync),
    so they trace under `torch.compile(fullgraph=True)`.

    >>> index = TrajectoryIndex(idx, valid, n_pix=h * w)   # once per level
    >>> out = trajectory_attention(q, k, v, index)          # every call
    """

    def __init__(self, idx: torch.Tensor, valid: torch.Tensor, n_pix: int, rowptr: torch.Tensor | None = None,
                 col: torch.Tensor | None = None):
        n_pix = _check_count("n_pix", n_pix)
        _check_tables(idx, valid, rowptr, col, n_pix)
        idx64 = idx.detach().to(torch.int64)
        if valid.numel():
            bad = valid & ((idx64 < 0) | (idx64 >= n_pix))
            if bool(bad.any()):
                wrong = idx64[bad]
                raise ValueError(f"idx values must lie in [0, {n_pix}) (pixels s of q) where valid, got "
                                 f"{int(bad.sum())} outside, range [{int(wrong.min())}, {int(wrong.max())}]")
        idx64 = torch.where(valid, idx64, torch.zeros_like(idx64))
        if rowptr is None:
            rowptr, col = incoming_csr(idx64, valid, n_pix)
        else:
            rowptr, col = rowptr.detach().to(torch.int64), col.detach().to(torch.int64)
            if not _is_csr_of(rowptr, col, idx64, valid, n_pix):
                raise ValueError("rowptr/col are not the CSR table of idx and valid (built for other trajectories, "
                                 "another level, or modified): build them from this idx and valid "
                                 "(TrajectoryTables does), or leave them out")
        self._set(idx64.to(torch.int32).contiguous(), valid.detach().clone().contiguous(), n_pix,
                  rowptr.to(torch.int32).contiguous(), col.to(torch.int32).contiguous())

    def _set(self, idx, valid, n_pix, rowptr, col) -> None:
        self.idx, self.valid, self.rowptr, self.col, self.n_pix = idx, valid, rowptr, col, int(n_pix)
        self._versions = self._current_versions()

    @classmethod
    def _trusted(cls, idx, valid, n_pix, rowptr, col) -> "TrajectoryIndex":
        """Wrap tables that are already checked (a move to another device, or the compile path)."""
        index = cls.__new__(cls)
        index._set(idx, valid, n_pix, rowptr, col)
        return index

    def _current_versions(self) -> tuple[int | None, ...]:
        # (tables built under torch.inference_mode() have no version counter: None, never checked)
        return tuple(_common.tensor_version(t) for t in (self.idx, self.valid, self.rowptr, self.col))

    @property
    def frames(self) -> int:
        return self.idx.shape[0]

    @property
    def num_trajectories(self) -> int:
        return self.idx.shape[1]

    @property
    def device(self) -> torch.device:
        return self.idx.device

    @property
    def landed(self) -> torch.Tensor:
        """[f, n_pix] bool: pixels at least one valid token lands on (where to_out's bias applies)."""
        return (self.rowptr[1:] > self.rowptr[:-1]).reshape(self.frames, self.n_pix)

    def to(self, device, non_blocking: bool = False) -> "TrajectoryIndex":
        if torch.device(device) == self.device:
            return self
        return TrajectoryIndex._trusted(*(t.to(device, non_blocking=non_blocking) for t in (self.idx, self.valid)),
                                        self.n_pix,
                                        *(t.to(device, non_blocking=non_blocking) for t in (self.rowptr, self.col)))

    def check_unchanged(self) -> None:
        if self._current_versions() != self._versions:
            raise RuntimeError("the tensors of this TrajectoryIndex were modified in place after it was built; "
                               "build a new TrajectoryIndex from the new idx/valid")

    def __repr__(self) -> str:
        return (f"TrajectoryIndex(frames={self.frames}, trajectories={self.num_trajectories}, n_pix={self.n_pix}, "
                f"landing tokens={self.col.numel()}, device={self.device})")


def _is_csr_of(rowptr: torch.Tensor, col: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, n_pix: int) -> bool:
    """Whether rowptr/col (int64) is exactly `incoming_csr(idx, valid, n_pix)`, in O(nnz) without sorting:
    rowptr starts at 0, never decreases and ends at len(col) = the number of valid tokens; every entry
    names a valid token that lands on its row; entries of a row ascend strictly. Distinct valid tokens,
    as many as there are, each on its own row: the table lists every valid token once, in order."""
    frames, n = idx.shape
    nnz = col.numel()
    counts = rowptr[1:] - rowptr[:-1]
    if int(rowptr[0]) != 0 or bool((counts < 0).any()) or int(rowptr[-1]) != nnz or nnz != int(valid.sum()):
        return False
    if nnz == 0:
        return True
    if bool(((col < 0) | (col >= n)).any()):
        return False
    rows = torch.repeat_interleave(torch.arange(frames * n_pix, device=col.device), counts)
    frame, pixel = rows // n_pix, rows % n_pix
    if not bool((valid[frame, col] & (idx[frame, col] == pixel)).all()):
        return False
    same_row = rows[1:] == rows[:-1]
    return not bool((same_row & (col[1:] <= col[:-1])).any())


def _check_count(name: str, value) -> int:
    # Python and numpy integers (anything with __index__), not bools or floats.
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = value.__index__()
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_tables(idx, valid, rowptr, col, n_pix: int, frames: int | None = None) -> None:
    """Types, shapes and devices of the tables (no values read)."""
    _common.check_tensor("idx", idx, ndim=2, dims="f n", dtypes=(torch.int32, torch.int64))
    if frames is not None and idx.shape[0] != frames:
        raise ValueError(f"idx must have shape [f, n] with f = {frames} (frames of q), got {tuple(idx.shape)}")
    _common.check_tensor("valid", valid, ndim=2, dims="f n", dtypes=(torch.bool,))
    if valid.shape != idx.shape:
        raise ValueError(f"valid must have idx's shape {tuple(idx.shape)} [f, n], got {tuple(valid.shape)}")
    if (rowptr is None) != (col is None):
        raise ValueError("rowptr and col must be given together (the CSR table of incoming tokens)")
    if rowptr is not None:
        _common.check_tensor("rowptr", rowptr, ndim=1, dims="f·s + 1", dtypes=(torch.int32, torch.int64))
        _common.check_tensor("col", col, ndim=1, dims="nnz", dtypes=(torch.int32, torch.int64))
        rows = idx.shape[0] * n_pix + 1
        if rowptr.shape[0] != rows:
            raise ValueError(f"rowptr must have shape [{rows}] (f·s + 1), got {tuple(rowptr.shape)}")
    _common.check_same_device(idx=idx, valid=valid, rowptr=rowptr, col=col)


# ---------------------------------------------------------------------------------------------
# Checks and the public function


def _float_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    # float64 runs where the op runs the reference (CPU without the interpreter, or the reference
    # backend forced); the kernels take fp32/fp16/bf16.
    if _common.select_backend(device) is Backend.TRITON:
        return _common.FLOAT_DTYPES
    return (*_common.FLOAT_DTYPES, torch.float64)


def check_inputs(q, k, v, group: int = 1) -> None:
    """Validate the shapes, dtypes and devices of q, k, v (no values read); group's range."""
    _common.check_tensor("q", q, ndim=5, dims="b s f h d", dtypes=None)
    _common.check_tensor("q", q, dtypes=_float_dtypes(q.device))
    for name, t in (("k", k), ("v", v)):
        _common.check_tensor(name, t, ndim=5, dims="b s f h d", dtypes=None)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} [b s f h d], got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    _, _, frames, _, dim = q.shape
    if isinstance(group, bool) or not hasattr(group, "__index__") or group.__index__() < 1:
        raise ValueError(f"group must be a positive integer (trajectories per softmax), got {group!r}")
    if frames > MAX_FRAMES:
        raise ValueError(f"q has {frames} frames; trajectory_attention supports at most {MAX_FRAMES}")
    if frames * group > MAX_FRAMES:
        raise ValueError(f"group={group} x {frames} frames = {frames * group} tokens per softmax; "
                         f"trajectory_attention supports at most {MAX_FRAMES}")
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {dim}; trajectory_attention supports at most {MAX_HEAD_DIM}")
    _common.check_same_device(q=q, k=k, v=v)


def _index_for_call(q, idx, valid, rowptr, col) -> TrajectoryIndex:
    """The TrajectoryIndex of a call: given, or built (and checked) from raw tables."""
    _, n_pix, frames, _, _ = q.shape
    if isinstance(idx, TrajectoryIndex):
        if valid is not None or rowptr is not None or col is not None:
            raise ValueError("valid, rowptr and col must be left out when idx is a TrajectoryIndex (it holds them)")
        if idx.frames != frames or idx.n_pix != n_pix:
            raise ValueError(f"the TrajectoryIndex was built for {idx.frames} frames of {idx.n_pix} pixels, "
                             f"q has {frames} frames of {n_pix} pixels (shape [b s f h d] = {tuple(q.shape)})")
        if idx.device != q.device:
            raise ValueError(f"the TrajectoryIndex is on {idx.device}, q on {q.device}: use index.to(q.device)")
        if not torch.compiler.is_compiling():
            idx.check_unchanged()
        return idx
    if valid is None:
        raise TypeError("trajectory_attention needs valid [f, n] bool with a tensor idx (or a TrajectoryIndex as idx)")
    _check_tables(idx, valid, rowptr, col, n_pix, frames)
    _common.check_same_device(q=q, idx=idx)
    if torch.compiler.is_compiling():
        # Inside a compiled graph nothing is read back: the table is built with shapes known in
        # advance and idx is not range-checked (the kernels clamp every index, so a bad idx cannot
        # fault; build a TrajectoryIndex beforehand to have it checked).
        idx64 = torch.where(valid, idx.to(torch.int64), torch.zeros((), dtype=torch.int64, device=idx.device))
        built_rowptr, built_col = incoming_csr(idx64, valid, n_pix, padded=True)
        return TrajectoryIndex._trusted(idx64.to(torch.int32), valid, n_pix, built_rowptr.to(torch.int32),
                                        built_col.to(torch.int32))
    return TrajectoryIndex(idx, valid, n_pix, rowptr, col)


def trajectory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor | TrajectoryIndex,
                         valid: torch.Tensor | None = None, rowptr: torch.Tensor | None = None,
                         col: torch.Tensor | None = None, *, mask_invalid: bool = False,
                         deterministic: bool = True, group: int = 1) -> torch.Tensor:
    """Attention along trajectories, averaged back onto the pixels they visit.

    q, k, v: [b s f h d] projected densely (s = H·W latent pixels, any strides, fp32/fp16/bf16, and
    float64 where the reference runs; f ≤ 64, d ≤ 128). idx: a `TrajectoryIndex` (built once, checked
    once: the fast path, and the one for torch.compile), or [f, n] flat pixels of trajectory n at
    frame f with valid [f, n] bool (and optionally their CSR table rowptr/col, checked against idx):
    raw tables are checked on every call (they are read on the host, which synchronises a GPU).
    mask_invalid=True removes invalid frames as keys (the official code keeps them as zero vectors).
    deterministic=True (default) is bitwise repeatable (two launches through the CSR table); False
    sums with fp32 atomics in one launch. group=G > 1 makes trajectories G·m … G·m + G − 1 (in idx's
    order; G must divide n) share one softmax over their G·f tokens (G·f ≤ 64): the released code's
    attention (reference/trajectory_attention.py, "released"); 1, the default, is per trajectory.
    Returns [b s f h d] in q's dtype; pixels no valid token lands on are 0. Differentiable in q, k, v.

    >>> idx = torch.randint(0, 6 * 8, (5, 100)); valid = torch.rand(5, 100) > 0.1
    >>> q = k = v = torch.randn(2, 6 * 8, 5, 2, 64)
    >>> out = trajectory_attention(q, k, v, TrajectoryIndex(idx, valid, n_pix=6 * 8))
    """
    check_inputs(q, k, v, group)
    group = group.__index__()
    index = _index_for_call(q, idx, valid, rowptr, col)
    check_group(group, index.num_trajectories)
    return trajectory_attention_op(q, k, v, index.idx, index.valid, index.rowptr, index.col,
                                   bool(mask_invalid), bool(deterministic), group)


def sample_inputs(device: torch.device):
    """Arguments for opcheck and torch.compile tests (see ops/__init__.py)."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for (batch, n_pix, frames, heads, dim, n), mask_invalid, deterministic, group in (
        ((1, 12, 5, 2, 16, 20), False, True, 1),
        ((2, 9, 3, 1, 40, 11), True, False, 1),
        ((2, 8, 3, 2, 16, 16), False, True, 2),
    ):
        idx = torch.randint(0, n_pix, (frames, n), generator=gen)
        valid = torch.rand(frames, n, generator=gen) > 0.25
        rowptr, col = incoming_csr(idx, valid, n_pix)
        q, k, v = (torch.randn(batch, n_pix, frames, heads, dim, generator=gen).to(device).requires_grad_()
                   for _ in range(3))
        samples.append((q, k, v, idx.to(device, torch.int32), valid.to(device), rowptr.to(device, torch.int32),
                        col.to(device, torch.int32), mask_invalid, deterministic, group))
    return samples


def backward_sample_inputs(device: torch.device):
    out = []
    for q, k, v, *rest in sample_inputs(device):
        q, k, v = (t.detach() for t in (q, k, v))
        out.append((torch.randn_like(q), q, k, v, *rest))
    return out
