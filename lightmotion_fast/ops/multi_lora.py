"""multi_lora_linear: LiON-LoRA's normalized multi-LoRA linear layer (specs/multi_lora.md).

Checks, the custom op `lightmotion::multi_lora_linear` with its autograd, the weight-norm cache and
the choice of implementation. The meaning is in reference/multi_lora.py, the speed in
kernels/multi_lora.py.

The op returns (y, z, norms): z = x A_catᵀ ([M, R], the shrunk activations) and the per-token norms
nᵢ(t) ([M, k] for `output`, else [0, k]) are saved for the backward and are not differentiable.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend
from lightmotion_fast.reference.multi_lora import NORMS

MAX_KERNEL_RANK = 256  # one LoRA's ranks live in one shrink tile; larger ranks take the torch path


# ---------------------------------------------------------------------------------------------
# Per-layer constants computed in r×r space, cached until a LoRA weight changes.

class _WeightCache:
    """Per set of (Aᵢ, Bᵢ): rank offsets, weight norms ‖BᵢAᵢ‖_F and the zero-padded factors Fᵢᵀ
    (FᵢᵀFᵢ = BᵢᵀBᵢ, from a QR of Bᵢ) used by the shrink epilogue.

    An entry is valid while every weight's storage is alive and its `_version` is unchanged, so
    in-place updates (optimizer steps, `load_state_dict`, `copy_` under no_grad) invalidate it.
    Writes through `.data` bypass the version counter: call `clear_weight_cache()` after those.
    """

    def __init__(self, max_entries: int = 2048):
        self.max_entries = max_entries
        self.entries: dict[tuple, tuple[list, dict]] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(tensors):
        return tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device) for t in tensors)

    def get(self, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> dict:
        tensors = [*lora_a, *lora_b]
        key = self._key(tensors)
        entry = self.entries.get(key)
        if entry is not None:
            stamps, pack = entry
            if all(not ref.expired() and t._version == v for (ref, v), t in zip(stamps, tensors)):
                self.hits += 1
                return pack
        self.misses += 1
        if len(self.entries) >= self.max_entries:
            self.entries.pop(next(iter(self.entries)))
        pack = {}
        self.entries[key] = ([(StorageWeakRef(t.untyped_storage()), t._version) for t in tensors], pack)
        return pack

    def clear(self) -> None:
        self.entries.clear()


_CACHE = _WeightCache()


def clear_weight_cache() -> None:
    """Forget every cached weight norm and factor (needed only after writes through `.data`)."""
    _CACHE.clear()


def _offsets(pack, lora_a, device):
    if "offsets" not in pack:
        ranks = [a.shape[0] for a in lora_a]
        pack["offsets"] = torch.tensor([0, *itertools.accumulate(ranks)], dtype=torch.int32, device=device)
    return pack["offsets"]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck of the op); everything else accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def weight_norms(lora_a, lora_b, pack=None) -> torch.Tensor:
    """[k] float32: ‖BᵢAᵢ‖_F = sqrt(tr((AᵢAᵢᵀ)(BᵢᵀBᵢ))), cached."""
    pack = _CACHE.get(lora_a, lora_b) if pack is None else pack
    if "weight_norms" not in pack:
        norms = []
        for a, b in zip(lora_a, lora_b):
            a32, b32 = a.detach().to(_acc_dtype(a)), b.detach().to(_acc_dtype(b))
            norms.append(((a32 @ a32.T) * (b32.T @ b32)).sum().clamp_min(0).sqrt())
        pack["weight_norms"] = torch.stack(norms)
    return pack["weight_norms"]


def _factors_t(lora_b, block_r, pack) -> torch.Tensor:
    """[k, BR, BR] float32: Fᵢᵀ zero-padded, Fᵢ = R of the QR of Bᵢ, so FᵢᵀFᵢ = BᵢᵀBᵢ."""
    if "factors_t" not in pack:
        out = torch.zeros((len(lora_b), block_r, block_r), dtype=torch.float32, device=lora_b[0].device)
        for i, b in enumerate(lora_b):
            r = torch.linalg.qr(b.detach().float(), mode="r").R  # [min(d_out, r), r]
            out[i, : r.shape[1], : r.shape[0]] = r.T
        pack["factors_t"] = out
    return pack["factors_t"]


def _weight_coefficients(n: torch.Tensor) -> torch.Tensor:
    """cᵢ = α/Nᵢ, α = mean N; 0 for a LoRA with N = 0 (it contributes nothing either way)."""
    alpha = n.mean()
    return torch.where(n > 0, alpha / torch.where(n > 0, n, 1), 0)


# ---------------------------------------------------------------------------------------------
# Implementations.

def _forward_torch(x, weight, bias, lora_a, lora_b, scale, norm, eps, separate, pack):
    """Composite torch path (CPU without the interpreter, or ranks above MAX_KERNEL_RANK): the same
    two-GEMM structure as the kernels, norms in Gram form, no [M, d_out] tensor per LoRA."""
    ranks = [a.shape[0] for a in lora_a]
    acc = _acc_dtype(x)
    a_cat, b_cat = torch.cat(list(lora_a)), torch.cat(list(lora_b), dim=1)
    z = x @ a_cat.T
    zf = z.to(acc)
    base = x.to(acc) @ weight.to(acc).T
    if bias is not None:
        base = base + bias.to(acc)
    coef = scale.to(acc)[None, :]
    norms = x.new_empty((0, len(ranks)), dtype=acc)
    if norm == "output":
        chunks = zf.split(ranks, dim=1)
        norms = torch.stack([((c @ (b.to(acc).T @ b.to(acc))) * c).sum(-1).clamp_min(0).sqrt()
                             for c, b in zip(chunks, lora_b)], dim=1)
        coef = scale * norms.mean(1, keepdim=True) / (norms + eps)
    scaled = zf * coef.repeat_interleave(torch.tensor(ranks, device=x.device), dim=1)
    if separate:
        parts = [base + s @ b.to(acc).T for s, b in zip(scaled.split(ranks, dim=1), lora_b)]
        y = torch.stack(parts).to(x.dtype)
    else:
        y = (base + scaled @ b_cat.to(acc).T).to(x.dtype)
    return y, z, norms


def _forward_triton(x, weight, bias, lora_a, lora_b, scale, norm, eps, separate, pack):
    kernel = _common.kernel_module("multi_lora")
    k = len(lora_a)
    ranks = [a.shape[0] for a in lora_a]
    a_cat, b_cat = torch.cat(list(lora_a)), torch.cat(list(lora_b), dim=1)
    offsets = _offsets(pack, lora_a, x.device)
    m = x.shape[0]
    z = torch.empty((m, a_cat.shape[0]), dtype=x.dtype, device=x.device)
    if norm == "output":
        norms = torch.empty((m, k), dtype=torch.float32, device=x.device)
        factors = _factors_t(lora_b, kernel.rank_block(max(ranks)), pack)
    else:
        norms, factors = x.new_empty((0, k), dtype=torch.float32), None
    kernel.multi_lora_shrink_launch(x, a_cat, offsets, factors, z, norms if factors is not None else None,
                                    max(ranks))
    shape = (k, m, weight.shape[0]) if separate else (m, weight.shape[0])
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    kernel.multi_lora_expand_launch(x, weight, bias, z, b_cat, offsets, scale,
                                    norms if norm == "output" else None, eps, y, separate,
                                    min_rank=min(ranks))
    return y, z, norms


@torch.library.custom_op("lightmotion::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scales: list[float],
                         norm: str, eps: float, separate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [M, d_in] (any strides). Returns y [M, d_out] (or [k, M, d_out] with separate),
    z [M, R] and norms [M, k] float32 (`output`) or [0, k]. float64 inputs (gradcheck) take the
    torch path and keep float64 throughout."""
    pack = _CACHE.get(lora_a, lora_b)
    scale = torch.tensor(scales, dtype=torch.float32, device=x.device)
    if norm == "weight":
        scale = scale * _weight_coefficients(weight_norms(lora_a, lora_b, pack))
    impl = _common.select_backend(x.device)
    if (impl is Backend.TRITON and max(a.shape[0] for a in lora_a) <= MAX_KERNEL_RANK
            and x.dtype != torch.float64):
        return _forward_triton(x, weight, bias, lora_a, lora_b, scale, norm, eps, separate, pack)
    return _forward_torch(x, weight, bias, lora_a, lora_b, scale, norm, eps, separate, pack)


@multi_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scales, norm, eps, separate):
    k, m, d_out = len(lora_a), x.shape[0], weight.shape[0]
    rank = sum(a.shape[0] for a in lora_a)
    y = x.new_empty((k, m, d_out) if separate else (m, d_out))
    norms_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return y, x.new_empty((m, rank)), x.new_empty((m if norm == "output" else 0, k), dtype=norms_dtype)


# ---------------------------------------------------------------------------------------------
# Backward: torch matmuls on the shrunk tensors (z, and h = g B_cat), everything else in r×r or
# [M, k] space. No [M, d_out] tensor per LoRA is formed (except g itself with separate=True).

def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scales, norm, eps, separate = inputs
    _, z, norms = output
    ctx.mark_non_differentiable(z, norms)
    ctx.save_for_backward(x, weight, z, norms, *lora_a, *lora_b)
    ctx.k = len(lora_a)
    ctx.scales, ctx.norm, ctx.eps, ctx.separate = list(scales), norm, eps, separate
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, grad_z, grad_norms):
    x, weight, z, norms, *ab = ctx.saved_tensors
    k = ctx.k
    lora_a, lora_b = ab[:k], ab[k:]
    ranks = [a.shape[0] for a in lora_a]
    dtype, acc = x.dtype, _acc_dtype(x)
    scale = torch.tensor(ctx.scales, dtype=acc, device=x.device)
    zf = z.to(acc)
    z_chunks = zf.split(ranks, dim=1)
    g = grad_y

    # The coefficients the forward used: [1, k] or [M, k].
    if ctx.norm == "weight":
        n_w = weight_norms(lora_a, lora_b)
        coef = (scale * _weight_coefficients(n_w).to(acc))[None, :]
    elif ctx.norm == "output":
        alpha = norms.mean(1, keepdim=True)
        coef = scale * alpha / (norms + ctx.eps)
    else:
        coef = scale[None, :]

    # h = g B (per LoRA: gᵢ with separate outputs), dBᵢ = gᵢᵀ (coefᵢ zᵢ), pᵢ(t) = gᵢ(t)·uᵢ(t) = hᵢ·zᵢ.
    h_chunks, d_b = [], []
    for i, b in enumerate(lora_b):
        gi = g[i] if ctx.separate else g
        h_chunks.append((gi @ b).to(acc))
        d_b.append((gi.T @ (z_chunks[i] * coef[:, i:i + 1]).to(dtype)).to(acc))
    p = torch.stack([(h * zc).sum(1) for h, zc in zip(h_chunks, z_chunks)], dim=1)  # [M, k]
    dz = [coef[:, i:i + 1] * h_chunks[i] for i in range(k)]
    d_a = [None] * k

    if ctx.norm == "output":
        # coefᵢ = sᵢ α/(nᵢ+ε), α = mean nⱼ  =>  ∂L/∂nⱼ = Σᵢ pᵢ sᵢ/(k(nᵢ+ε)) − pⱼ sⱼ α/(nⱼ+ε)².
        inv = 1.0 / (norms + ctx.eps)
        d_n = (p * scale * inv).sum(1, keepdim=True) / k - p * scale * alpha * inv * inv
        q = torch.where(norms > 0, d_n / torch.where(norms > 0, norms, 1), 0)  # ∂L/∂nⱼ / nⱼ
        for i, b in enumerate(lora_b):
            bf = b.to(acc)
            gram = bf.T @ bf
            zq = z_chunks[i] * q[:, i:i + 1]
            dz[i] = dz[i] + zq @ gram                    # ∂nⱼ/∂zⱼ = Gⱼ zⱼ / nⱼ
            d_b[i] = d_b[i] + bf @ (z_chunks[i].T @ zq)  # ∂nⱼ/∂Gⱼ = zⱼᵀzⱼ/(2nⱼ), G = BᵀB
    elif ctx.norm == "weight":
        # coefᵢ = sᵢ α/Nᵢ, α = mean Nⱼ  =>  ∂L/∂Nⱼ = Σᵢ dcᵢ/(k Nᵢ) − dcⱼ α/Nⱼ²   (over Nᵢ > 0),
        # with dcᵢ = sᵢ Σ_t pᵢ(t); N² = tr(AAᵀ BᵀB) gives ∂N/∂A = G A/N, ∂N/∂B = B (AAᵀ)/N.
        alive = n_w > 0
        safe = torch.where(alive, n_w, 1)
        dc = scale * p.sum(0)
        d_n = torch.where(alive, dc / safe, 0).sum() / k - torch.where(alive, dc * n_w.mean() / safe**2, 0)
        for i, (a, b) in enumerate(zip(lora_a, lora_b)):
            if alive[i]:
                af, bf = a.to(acc), b.to(acc)
                d_a[i] = (d_n[i] / n_w[i]) * ((bf.T @ bf) @ af)
                d_b[i] = d_b[i] + (d_n[i] / n_w[i]) * (bf @ (af @ af.T))

    dz_cat = torch.cat(dz, dim=1).to(dtype)
    grad_x = grad_w = grad_bias = None
    g_sum = g.sum(0) if ctx.separate else g
    if ctx.needs_input_grad[0]:
        grad_x = torch.addmm((g_sum @ weight).to(acc), dz_cat.to(acc), torch.cat(list(lora_a)).to(acc)).to(dtype)
    if ctx.needs_input_grad[1]:
        grad_w = g_sum.T @ x
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = g_sum.sum(0)
    grad_a = []
    for i, dzi in enumerate(dz_cat.split(ranks, dim=1)):
        da = (dzi.T @ x).to(acc)
        grad_a.append((da if d_a[i] is None else da + d_a[i]).to(lora_a[i].dtype))
    grad_b = [db.to(b.dtype) for db, b in zip(d_b, lora_b)]
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


multi_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function.

def _check(x, weight, bias, lora_a, lora_b, scales, norm, eps):
    _common.check_tensor("x", x, ndim=range(1, 9), dims="... d_in")
    _common.check_tensor("weight", weight, ndim=2, dims="d_out d_in")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have shape [..., {d_in}] (d_in of weight {tuple(weight.shape)}), "
                         f"got {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        _common.check_tensor("bias", bias, ndim=1, dims="d_out")
        if bias.shape[0] != d_out or bias.dtype != x.dtype:
            raise ValueError(f"bias must have shape [{d_out}] and dtype {x.dtype}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")
    for name, seq in (("lora_a", lora_a), ("lora_b", lora_b)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list of tensors (one per LoRA), got {type(seq).__name__}")
    if len(lora_a) == 0 or len(lora_a) != len(lora_b):
        raise ValueError(f"lora_a and lora_b must hold the same number k ≥ 1 of LoRAs, "
                         f"got {len(lora_a)} and {len(lora_b)}")
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        _common.check_tensor(f"lora_a[{i}]", a, ndim=2, dims="r d_in")
        _common.check_tensor(f"lora_b[{i}]", b, ndim=2, dims="d_out r")
        if a.shape[1] != d_in or a.shape[0] < 1:
            raise ValueError(f"lora_a[{i}] must have shape [r, {d_in}] with r ≥ 1, got {tuple(a.shape)}")
        if tuple(b.shape) != (d_out, a.shape[0]):
            raise ValueError(f"lora_b[{i}] must have shape [{d_out}, {a.shape[0]}] (d_out, rank of "
                             f"lora_a[{i}]), got {tuple(b.shape)}")
        if a.dtype != x.dtype or b.dtype != x.dtype:
            raise TypeError(f"lora_a[{i}] and lora_b[{i}] must have x's dtype {x.dtype}, "
                            f"got {a.dtype} and {b.dtype}")
    _common.check_same_device(x=x, weight=weight, bias=bias,
                              **{f"lora_a[{i}]": a for i, a in enumerate(lora_a)},
                              **{f"lora_b[{i}]": b for i, b in enumerate(lora_b)})
    if isinstance(scales, torch.Tensor):
        scales = scales.tolist()
    if isinstance(scales, (int, float)) or not isinstance(scales, Sequence) or len(scales) != len(lora_a):
        raise ValueError(f"scales must hold one number per LoRA ({len(lora_a)}), got {scales!r}")
    scales = [_common.check_finite_number(f"scales[{i}]", s) for i, s in enumerate(scales)]
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    eps = _common.check_finite_number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be ≥ 0, got {eps}")
    return scales, eps


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                      scales: Sequence[float], norm: str = "none", eps: float = 1e-6,
                      separate: bool = False) -> torch.Tensor:
    """y = x Wᵀ + b + Σᵢ sᵢ cᵢ (x Aᵢᵀ) Bᵢᵀ with LiON-LoRA's normalisation `norm`:
    "none" (cᵢ = 1, peft's multi-adapter forward), "weight" (cᵢ = α/‖BᵢAᵢ‖_F, α the mean) or
    "output" (per token cᵢ(t) = α_t/(nᵢ(t)+ε), nᵢ(t) = ‖(x_t Aᵢᵀ)Bᵢᵀ‖, α_t the mean).

    x: [... d_in]; weight: [d_out d_in]; bias: [d_out] or None; lora_a[i]: [r_i d_in];
    lora_b[i]: [d_out r_i]; scales: k numbers. Returns [... d_out], or [k ... d_out] with
    separate=True (yᵢ = x Wᵀ + b + sᵢcᵢ(x Aᵢᵀ)Bᵢᵀ, normalised over all k). Differentiable in x,
    every Aᵢ and Bᵢ (and W, b) including through the normalisation.

    >>> a = [torch.randn(8, 64) for _ in range(3)]; b = [torch.randn(32, 8) for _ in range(3)]
    >>> y = multi_lora_linear(torch.randn(2, 10, 64), torch.randn(32, 64), None, a, b,
    ...                       [1.0, 0.5, 0.5], norm="output")
    """
    scales, eps = _check(x, weight, bias, lora_a, lora_b, scales, norm, eps)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y, _, _ = multi_lora_linear_op(x2, weight, bias, list(lora_a), list(lora_b), scales, norm, eps, separate)
    if separate:
        return y.reshape(len(lora_a), *lead, weight.shape[0])
    return y.reshape(*lead, weight.shape[0])


def sample_inputs(device: torch.device):
    """Arguments for opcheck and torch.compile tests (ops/__init__.py OP_SAMPLES)."""
    def lora(ranks, d_in, d_out):
        return ([torch.randn(r, d_in, device=device) * 0.3 for r in ranks],
                [torch.randn(d_out, r, device=device) * 0.3 for r in ranks])

    x = torch.randn(19, 24, device=device)
    w, b = torch.randn(20, 24, device=device) * 0.2, torch.randn(20, device=device)
    a2, b2 = lora([4, 8], 24, 20)
    a1, b1 = lora([16], 24, 20)
    return [
        (x, w, b, a2, b2, [1.0, 0.5], "none", 1e-6, False),
        (x, w, None, a2, b2, [0.7, 1.3], "weight", 1e-6, False),
        (x, w, b, a2, b2, [1.0, 0.5], "output", 1e-6, False),
        (x, w, b, a1, b1, [2.0], "output", 1e-6, True),
    ]
