"""multi_lora_linear: LiON-LoRA's normalized multi-LoRA linear layer (specs/multi_lora.md).

Checks, the custom op `lightmotion::multi_lora_linear` with its autograd, the weight cache and the
choice of implementation. The meaning is in reference/multi_lora.py, the speed in
kernels/multi_lora.py.

Weight cache. Per set of LoRA weights (A₁..A_k, B₁..B_k) the op keeps, built on first use and
reused by every later call: A_cat [R, d_in] and B_cat [d_out, R] with each LoRA's rank zero-padded
to the rank tile (`rank_layout`), the static per-LoRA factor (sᵢ, times cᵢ = α/‖γᵢBᵢAᵢ‖ for `weight`)
folded into B_cat (with the factors themselves), the weight norms and the norm factors γᵢFᵢ; the rank
offsets on the device are kept per rank layout. So a call concatenates nothing, copies nothing
host-to-device and never synchronises: after a first (warm-up) call it can be captured in a CUDA graph.
A training step rebuilds the entry after the optimiser's update (device work only: no host copy).
- Valid while every weight's storage is alive and its `_version` is unchanged: in-place updates
  (optimizer steps, `load_state_dict`, `copy_` under no_grad) rebuild the entry. Writes through
  `.data` do not bump `_version`; peft's LoRA hotswap (`load_lora_weights(..., hotswap=True)`,
  `peft.utils.hotswap`) writes that way, so once peft is loaded its hotswap function is wrapped to
  clear this cache afterwards. After any other `.data` write, call `clear_weight_cache()`.
- Bounded: least-recently-used entries are dropped once the cache holds more than
  `set_weight_cache_limit(max_bytes)` (default 4 GiB; a CogVideoX-5B layer with three rank-256
  LoRAs takes about 10 MB) or 4096 entries; entries whose weights were freed go first.

The op returns (y, z, norms): z = x A_catᵀ ([M, R], R the padded total rank, unscaled) and the
effective output norms (`output`: per sample nᵢ(b), [samples, k]; `output_per_token`: nᵢ(t), [M, k];
else [0, k]) are saved for the backward and are not differentiable. The `output` family is one
computation over row groups: `samples` groups of M/samples consecutive rows (per token: M groups of 1).
"""
from __future__ import annotations

import collections
import functools
import itertools
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.multiprocessing.reductions import StorageWeakRef

from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend
from lightmotion_fast.reference.multi_lora import NORMS, sample_count

OUTPUT_NORMS = ("output", "output_per_token")

MAX_KERNEL_RANK = 256  # one LoRA's ranks live in one shrink tile; larger ranks take the torch path


# ---------------------------------------------------------------------------------------------
# Rank layout: each LoRA's rank padded to the rank tile, so every rank chunk the kernels touch is
# aligned and unmasked. A pure function of the ranks (the fake implementation needs R too).

@dataclass(frozen=True)
class RankLayout:
    ranks: tuple[int, ...]
    rank_tile: int               # 16, 32 or 64: the padding granule and the expand's rank chunk
    padded: tuple[int, ...]      # each rank rounded up to rank_tile
    offsets: tuple[int, ...]     # k+1 starts of the padded ranks
    norm_block: int              # power of two ≥ every padded rank (the `output` shrink tile)

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def spans(self):
        """(start, start + rᵢ) of each LoRA's real ranks inside the padded layout."""
        return [(o, o + r) for o, r in zip(self.offsets, self.ranks)]


def rank_layout(ranks: tuple[int, ...]) -> RankLayout:
    # Under torch.compile with dynamic shapes the ranks may be SymInts: int() specialises them (the
    # layout, like the kernels' tiles, depends on their exact values).
    return _rank_layout(tuple(int(r) for r in ranks))


@functools.lru_cache(maxsize=256)
def _rank_layout(ranks: tuple[int, ...]) -> RankLayout:
    tile = min(64, max(16, _common.next_power_of_2(max(ranks))))
    padded = tuple(-(-r // tile) * tile for r in ranks)
    offsets = (0, *itertools.accumulate(padded))
    return RankLayout(tuple(ranks), tile, padded, offsets, _common.next_power_of_2(max(padded)))


# ---------------------------------------------------------------------------------------------
# The weight cache (see the module docstring).

_DEFAULT_MAX_BYTES = 4 << 30


class _Pack:
    """One cache entry: the stamps it is valid for and the tensors built from the weights."""
    __slots__ = ("stamps", "data", "nbytes")

    def __init__(self, stamps):
        self.stamps = stamps
        self.data: dict = {}
        self.nbytes = 0

    def valid_for(self, tensors) -> bool:
        return all(not ref.expired() and t._version == v for (ref, v), t in zip(self.stamps, tensors))

    def expired(self) -> bool:
        return any(ref.expired() for ref, _ in self.stamps)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _cacheable(tensors) -> bool:
    # Under torch.compile's tracing (fake tensors) or on meta tensors there is nothing to reuse; weights
    # made under torch.inference_mode() have no version counter to tell an update by.
    return not any(t.device.type == "meta" or is_fake(t) or t.is_inference() for t in tensors)


class _WeightCache:
    """LRU map from a LoRA weight set to its _Pack, bounded in bytes and entries."""

    def __init__(self, max_bytes: int = _DEFAULT_MAX_BYTES, max_entries: int = 4096):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.entries: collections.OrderedDict[tuple, _Pack] = collections.OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @staticmethod
    def _key(tensors):
        return tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device) for t in tensors)

    def get(self, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> _Pack:
        tensors = [*lora_a, *lora_b]
        if not _cacheable(tensors):
            return _Pack(None)  # used for this call only
        key = self._key(tensors)
        with self._lock:
            pack = self.entries.get(key)
            if pack is not None and pack.valid_for(tensors):
                self.entries.move_to_end(key)
                self.hits += 1
                return pack
            self.misses += 1
            if pack is not None:
                self._drop(key)
            for stale in [k for k, p in self.entries.items() if p.expired()]:
                self._drop(stale)
            pack = _Pack([(StorageWeakRef(t.untyped_storage()), t._version) for t in tensors])
            self.entries[key] = pack
            self._evict(keep=pack)
        _watch_peft_hotswap()
        return pack

    def store(self, pack: _Pack, name: str, value):
        """pack.data[name] = value, counted against the byte budget (other entries may be evicted)."""
        with self._lock:
            added = _tensor_bytes(value) - _tensor_bytes(pack.data.get(name))
            pack.data[name] = value
            if pack.stamps is not None and any(p is pack for p in self.entries.values()):
                pack.nbytes += added
                self.nbytes += added
                self._evict(keep=pack)
        return value

    def _drop(self, key) -> None:
        self.nbytes -= self.entries.pop(key).nbytes

    def _evict(self, keep: _Pack) -> None:
        for key in list(self.entries):
            if self.nbytes <= self.max_bytes and len(self.entries) <= self.max_entries:
                return
            if self.entries[key] is not keep:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.nbytes = 0


_CACHE = _WeightCache()


def clear_weight_cache() -> None:
    """Forget every cached LoRA layout, folded weight and norm. Needed only after writing LoRA
    weights through `.data` (which bypasses the version counters the cache checks); peft's hotswap
    does this by itself."""
    _CACHE.clear()


def set_weight_cache_limit(max_bytes: int) -> None:
    """Bound the weight cache to max_bytes (least-recently-used entries are dropped beyond it)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be an int ≥ 0, got {max_bytes!r}")
    with _CACHE._lock:
        _CACHE.max_bytes = max_bytes
        _CACHE._evict(keep=None)


_PEFT_WATCHED = False


def _watch_peft_hotswap() -> None:
    """Once peft is imported, wrap `peft.utils.hotswap.hotswap_adapter_from_state_dict` (which
    diffusers' `load_lora_weights(..., hotswap=True)` and peft's `hotswap_adapter` call) so that it
    clears the weight cache: it writes the new adapter through `.data.copy_`, which leaves the
    weights' version counters (and so every cache stamp) unchanged."""
    global _PEFT_WATCHED
    if _PEFT_WATCHED or "peft" not in sys.modules:
        return
    try:
        import peft.utils.hotswap as hotswap
    except ImportError:
        return
    _PEFT_WATCHED = True
    original = hotswap.hotswap_adapter_from_state_dict
    if getattr(original, "_clears_lightmotion_cache", False):
        return

    @functools.wraps(original)
    def hotswap_adapter_from_state_dict(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            clear_weight_cache()

    hotswap_adapter_from_state_dict._clears_lightmotion_cache = True
    hotswap.hotswap_adapter_from_state_dict = hotswap_adapter_from_state_dict


def _cached(pack: _Pack, name: str, build):
    value = pack.data.get(name)
    if value is None:
        with torch.no_grad():
            value = _CACHE.store(pack, name, build())
    return value


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck of the op); everything else accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def weight_norms(lora_a, lora_b, pack=None) -> torch.Tensor:
    """[k] float32 (float64 for float64 weights): ‖BᵢAᵢ‖_F = sqrt(tr((AᵢAᵢᵀ)(BᵢᵀBᵢ))), cached."""
    pack = _CACHE.get(lora_a, lora_b) if pack is None else pack

    def build():
        norms = []
        for a, b in zip(lora_a, lora_b):
            a32, b32 = a.detach().to(_acc_dtype(a)), b.detach().to(_acc_dtype(b))
            norms.append(((a32 @ a32.T) * (b32.T @ b32)).sum().clamp_min(0).sqrt())
        return torch.stack(norms)
    return _cached(pack, "weight_norms", build)


def effective_weight_norms(lora_a, lora_b, lora_scaling, pack=None) -> torch.Tensor:
    """[k]: ‖γᵢ BᵢAᵢ‖_F, the norms of the effective updates (γᵢ = peft's lora_alpha/r); from the cached
    ‖BᵢAᵢ‖ times Python floats (no host-to-device copy)."""
    raw = weight_norms(lora_a, lora_b, pack)
    return torch.stack([raw[i] * abs(g) for i, g in enumerate(lora_scaling)])


def _weight_coefficients(n: torch.Tensor) -> torch.Tensor:
    """cᵢ = α/Nᵢ, α = mean N; 0 for a LoRA with N = 0 (it contributes nothing either way)."""
    alpha = n.mean()
    return torch.where(n > 0, alpha / torch.where(n > 0, n, 1), 0)


_DEVICE_OFFSETS: dict = {}   # (padded offsets, device) -> int32 tensor; a few bytes per layout in use


def _offsets(layout: RankLayout, device) -> torch.Tensor:
    """[k+1] int32 padded rank offsets on the device. They depend on the ranks only, so they are kept per
    layout and device, not per weight pack: a training step, whose optimiser update invalidates every
    pack, makes no host-to-device copy (a synchronisation, and not allowed in a CUDA-graph capture)."""
    key = (layout.offsets, torch.device(device))
    value = _DEVICE_OFFSETS.get(key)
    if value is None:
        value = torch.tensor(layout.offsets, dtype=torch.int32, device=device)
        if _cacheable([value]):   # not a tracer's fake tensor
            _DEVICE_OFFSETS[key] = value
    return value


def _a_cat(pack, lora_a, layout: RankLayout) -> torch.Tensor:
    """[R, d_in]: the Aᵢ stacked along the padded rank, zero rows in the padding."""
    def build():
        out = lora_a[0].new_zeros((layout.total, lora_a[0].shape[1]))
        for a, (lo, hi) in zip(lora_a, layout.spans()):
            out[lo:hi] = a
        return out
    return _cached(pack, "a_cat", build)


def _lora_factors(lora_a, lora_b, scales, lora_scaling, norm, pack) -> list:
    """The static factor folded into each Bᵢ: sᵢ, times cᵢ = α/‖γᵢBᵢAᵢ‖ for `weight` (a device
    scalar: no synchronisation)."""
    if norm != "weight":
        return list(scales)
    coef = _weight_coefficients(effective_weight_norms(lora_a, lora_b, lora_scaling, pack))
    return [s * coef[i] for i, s in enumerate(scales)]


def _b_cat(pack, lora_a, lora_b, layout: RankLayout, scales, lora_scaling, norm) -> torch.Tensor:
    """[d_out, R] contiguous: fᵢ Bᵢ side by side along the padded rank (fᵢ from _lora_factors), zero
    columns in the padding. One variant per pack: new scales rebuild it (no host sync either)."""
    return _b_cat_and_factors(pack, lora_a, lora_b, layout, scales, lora_scaling, norm)[0]


def _b_cat_and_factors(pack, lora_a, lora_b, layout: RankLayout, scales, lora_scaling, norm) -> tuple:
    """(_b_cat, the factors fᵢ folded into it), cached together: the backward reuses the fᵢ (device
    scalars for `weight`) without recomputing them from the norms."""
    weighted = norm == "weight"
    variant = ("b_cat", weighted, tuple(scales), tuple(lora_scaling) if weighted else ())
    cached = pack.data.get("b_cat")
    if cached is not None and cached[0] == variant:
        return cached[1:]
    with torch.no_grad():
        factors = _lora_factors(lora_a, lora_b, scales, lora_scaling, norm, pack)
        acc = _acc_dtype(lora_b[0])
        out = lora_b[0].new_zeros((lora_b[0].shape[0], layout.total))
        for b, f, (lo, hi) in zip(lora_b, factors, layout.spans()):
            out[:, lo:hi] = b.to(acc) * f
        _CACHE.store(pack, "b_cat", (variant, out, factors))
    return out, factors


def _factors_t(pack, lora_b, layout: RankLayout, lora_scaling) -> torch.Tensor:
    """[k, BR, BR] float32: (|γᵢ|Fᵢ)ᵀ zero-padded, Fᵢ = R of the QR of Bᵢ, so the kernel's norms are
    those of the effective outputs: γᵢ²FᵢᵀFᵢ = γᵢ²BᵢᵀBᵢ. One variant per pack (keyed by the γᵢ)."""
    variant = tuple(lora_scaling)
    cached = pack.data.get("factors_t")
    if cached is not None and cached[0] == variant:
        return cached[1]
    with torch.no_grad():
        br = layout.norm_block
        out = torch.zeros((len(lora_b), br, br), dtype=torch.float32, device=lora_b[0].device)
        for i, (b, g) in enumerate(zip(lora_b, lora_scaling)):
            r = torch.linalg.qr(b.float(), mode="r").R  # [min(d_out, r), r]
            out[i, : r.shape[1], : r.shape[0]] = r.T * abs(g)
        _CACHE.store(pack, "factors_t", (variant, out))
    return out


def _column_expand(per_lora: torch.Tensor, layout: RankLayout) -> torch.Tensor:
    """[M, k] -> [M, R]: each LoRA's value repeated over its padded ranks (no host sync)."""
    return torch.cat([per_lora[:, i:i + 1].expand(-1, p) for i, p in enumerate(layout.padded)], dim=1)


def _groups(norm: str, m: int, samples: int) -> int:
    """The row groups the `output` norms are taken over: per sample, or every row its own group."""
    return m if norm == "output_per_token" else samples


def _output_norms(z: torch.Tensor, lora_b, layout: RankLayout, lora_scaling, groups: int) -> torch.Tensor:
    """[groups, k]: nᵢ(g) = |γᵢ| sqrt(Σ_{t∈g} zᵢ(t) Gᵢ zᵢ(t)ᵀ), Gᵢ = BᵢᵀBᵢ, from z's real rank columns
    (in z's dtype); the M rows of z are `groups` consecutive groups of equal size."""
    if z.shape[0] == 0:   # no rows: no group holds a token (per token: no group at all)
        return z.new_zeros((groups, len(lora_b)))
    cols = []
    for b, g, (lo, hi) in zip(lora_b, lora_scaling, layout.spans()):
        zi, bf = z[:, lo:hi], b.to(z.dtype)
        sq = ((zi @ (bf.T @ bf)) * zi).sum(-1).reshape(groups, -1).sum(1)
        cols.append(abs(g) * sq.clamp_min(0).sqrt())
    return torch.stack(cols, dim=1)


def _per_row(per_group: torch.Tensor, m: int) -> torch.Tensor:
    """[groups, c] -> [M, c]: each group's row repeated over its M/groups consecutive rows."""
    groups = per_group.shape[0]
    if groups == 0:   # no rows (per token, M = 0)
        return per_group.new_empty((m, per_group.shape[1]))
    return per_group[:, None, :].expand(groups, m // groups, per_group.shape[1]).reshape(m, per_group.shape[1])


# ---------------------------------------------------------------------------------------------
# Implementations: the same structure (padded cached weights, z, zs = cᵢ(t) z, one expand).

def _forward_torch(x, weight, bias, lora_a, lora_b, scales, lora_scaling, norm, eps, separate, samples, pack,
                   layout):
    """Composite torch path (CPU without the interpreter, float64, or ranks above MAX_KERNEL_RANK)."""
    acc = _acc_dtype(x)
    a_cat = _a_cat(pack, lora_a, layout)
    b_cat = _b_cat(pack, lora_a, lora_b, layout, scales, lora_scaling, norm)
    z = x @ a_cat.T
    base = x.to(acc) @ weight.to(acc).T
    if bias is not None:
        base = base + bias.to(acc)
    zs = z.to(acc)
    norms = x.new_empty((0, len(lora_a)), dtype=acc)
    if norm in OUTPUT_NORMS:
        norms = _output_norms(zs, lora_b, layout, lora_scaling, _groups(norm, x.shape[0], samples))
        zs = zs * _per_row(_column_expand(norms.mean(1, keepdim=True) / (norms + eps), layout), x.shape[0])
    b_acc = b_cat.to(acc)
    if separate:
        pad = zip(layout.offsets, layout.offsets[1:])
        y = torch.stack([base + zs[:, lo:hi] @ b_acc[:, lo:hi].T for lo, hi in pad]).to(x.dtype)
    else:
        y = (base + zs @ b_acc.T).to(x.dtype)
    return y, z, norms


def _forward_triton(x, weight, bias, lora_a, lora_b, scales, lora_scaling, norm, eps, separate, samples, pack,
                    layout):
    kernel = _common.kernel_module("multi_lora")
    k, m = len(lora_a), x.shape[0]
    bias = None if bias is None else bias.contiguous()   # the expand reads the bias at unit stride
    a_cat = _a_cat(pack, lora_a, layout)
    b_cat = _b_cat(pack, lora_a, lora_b, layout, scales, lora_scaling, norm)
    offsets = _offsets(layout, x.device)
    z = torch.empty((m, layout.total), dtype=x.dtype, device=x.device)
    y = torch.empty((k, m, weight.shape[0]) if separate else (m, weight.shape[0]), dtype=x.dtype, device=x.device)
    coef = None
    if m == 0:
        groups = _groups(norm, m, samples) if norm in OUTPUT_NORMS else 0
        return y, z, x.new_zeros((groups, k), dtype=torch.float32)
    if norm == "output_per_token" or (norm == "output" and samples == m):  # one token a sample: the same
        zs, norms = torch.empty_like(z), torch.empty((m, k), dtype=torch.float32, device=x.device)
        kernel.multi_lora_shrink_norm_launch(x, a_cat, offsets, _factors_t(pack, lora_b, layout, lora_scaling), z,
                                             zs, norms, eps, layout.rank_tile, per_token=True)
    elif norm == "output":
        # shrink (z and nᵢ(t)²), a per-sample reduce (nᵢ(b), cᵢ(b)), cᵢ(b) applied in the expand.
        sq = torch.empty((m, k), dtype=torch.float32, device=x.device)
        norms, coef = (torch.empty((samples, k), dtype=torch.float32, device=x.device) for _ in range(2))
        kernel.multi_lora_shrink_norm_launch(x, a_cat, offsets, _factors_t(pack, lora_b, layout, lora_scaling), z,
                                             z, sq, eps, layout.rank_tile, per_token=False)
        kernel.multi_lora_sample_norm_launch(sq, norms, coef, eps)
        zs = z
    else:
        zs, norms = z, x.new_empty((0, k), dtype=torch.float32)
        kernel.multi_lora_shrink_launch(x, a_cat, z, layout.rank_tile)
    kernel.multi_lora_expand_launch(x, weight, bias, zs, b_cat, offsets, y, separate, layout.rank_tile, coef=coef,
                                    tma=_common.has_tma(x.device))
    return y, z, norms


def _kernel_handles(dtype: torch.dtype, norm: str, layout: RankLayout) -> bool:
    """Whether the Triton kernels take this call. Not for float64 (gradcheck), ranks above
    MAX_KERNEL_RANK, or fp32 `output` above 64 ranks: the kernel's IEEE FMA dots over a whole
    LoRA's rank spill tens of KB of registers on sm_90 there, and cuBLAS's SGEMM is faster anyway."""
    if dtype == torch.float64 or max(layout.ranks) > MAX_KERNEL_RANK:
        return False
    return not (dtype == torch.float32 and norm in OUTPUT_NORMS and layout.norm_block > 64)


@torch.library.custom_op("lightmotion::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scales: list[float],
                         norm: str, eps: float, separate: bool, lora_scaling: list[float],
                         samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [M, d_in] (any strides), its rows `samples` consecutive samples of M/samples tokens (read by
    `output` only); lora_scaling: the γᵢ inside the normalised updates. Returns y [M, d_out] (or
    [k, M, d_out] with separate), z [M, R] (R = rank_layout(ranks).total) and the norms: [samples, k]
    (`output`), [M, k] (`output_per_token`) or [0, k], float32. float64 inputs (gradcheck) take the
    torch path and keep float64 throughout."""
    if norm == "output" and (samples < 1 or x.shape[0] % samples) and x.shape[0]:
        raise ValueError(f"samples must be ≥ 1 and divide the {x.shape[0]} rows of x, got {samples}")
    layout = rank_layout(tuple(a.shape[0] for a in lora_a))
    pack = _CACHE.get(lora_a, lora_b)
    impl = _common.select_backend(x.device)
    args = (x, weight, bias, lora_a, lora_b, scales, lora_scaling, norm, eps, separate, samples, pack, layout)
    if impl is Backend.TRITON and _kernel_handles(x.dtype, norm, layout):
        return _forward_triton(*args)
    return _forward_torch(*args)


@multi_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scales, norm, eps, separate, lora_scaling, samples):
    k, m, d_out = len(lora_a), x.shape[0], weight.shape[0]
    rank = rank_layout(tuple(a.shape[0] for a in lora_a)).total
    y = x.new_empty((k, m, d_out) if separate else (m, d_out))
    norms_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    groups = _groups(norm, m, samples) if norm in OUTPUT_NORMS else 0
    return y, x.new_empty((m, rank)), x.new_empty((groups, k), dtype=norms_dtype)


# ---------------------------------------------------------------------------------------------
# Backward: matmuls over the cached padded A_cat/B_cat, so each LoRA GEMM is one launch for all k
# LoRAs (h = g B_cat, dB_cat = gᵀ zs, dA_cat = dzᵀ x as torch GEMMs: reductions over the M tokens,
# cuBLAS's ground); everything else in r×r or [M, k] space. No [M, d_out] tensor per LoRA is formed
# (except g itself with separate). dx = g W + dz A_cat, the largest product, is on the Triton path
# the forward's expand kernel run on transposed operands: one pipelined GEMM over K = d_out + R that
# writes dx once, accumulated in fp32 throughout. Plan at CogVideoX-5B (M = 35,552, d = 3072, R = 768,
# bf16): torch writes g W as a bf16 [M, d_in] temporary (218 MB) and addmm reads it back (218 MB)
# before writing dx; the fused expand has no temporary: ~436 MB (~145 µs at 3 TB/s) less traffic per
# layer call, the same FLOPs, one launch instead of two.
# Not fused: h = g B_cat and dB_cat' = gᵀ zs both read g, and one pass could form both, saving one read
# of g (218 MB, ~73 µs at 3 TB/s) at the cost of a split-M reduction of fp32 [d_out, R] partials. The
# backward at that shape is compute-bound: ~1.34 TFLOP (h, dx, dA, dB: 0.17 + 0.84 + 0.17 + 0.17), ~1.7
# ms at a measured 798 TFLOP/s, against ~1.3 GB of traffic (~0.45 ms at 3 TB/s), so the saved read
# would hide under the GEMMs' time.


def _a_cat_t(pack, lora_a, layout: RankLayout) -> torch.Tensor:
    """A_catᵀ [d_in, R] contiguous, cached with the adapters: the "B_cat" of the dx expand."""
    return _cached(pack, "a_cat_t", lambda: _a_cat(pack, lora_a, layout).T.contiguous())


def _grad_x(g_sum, weight, dz, a_cat, pack, lora_a, layout: RankLayout, triton_path: bool) -> torch.Tensor:
    """dx = g W + dz A_cat [M, d_in]: one expand launch on the Triton path (x := g, weight := Wᵀ,
    zs := dz, B_cat := A_catᵀ), else one addmm over the torch GEMM."""
    if triton_path and _kernel_handles(g_sum.dtype, "none", layout):
        dx = torch.empty((g_sum.shape[0], weight.shape[1]), dtype=g_sum.dtype, device=g_sum.device)
        if dx.shape[0]:
            _common.kernel_module("multi_lora").multi_lora_expand_launch(
                g_sum, weight.T, None, dz.contiguous(), _a_cat_t(pack, lora_a, layout),
                _offsets(layout, g_sum.device), dx, False, layout.rank_tile, tma=_common.has_tma(dx.device))
        return dx
    return torch.addmm(g_sum @ weight, dz, a_cat)  # base and all LoRAs accumulated in one

def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scales, norm, eps, separate, lora_scaling, samples = inputs
    _, z, norms = output
    ctx.mark_non_differentiable(z, norms)
    # Their gradients reach the backward as None, not as zeros autograd would otherwise allocate and
    # fill ([M, R] for z: 55 MB at CogVideoX-5B, every call).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, z, norms, *lora_a, *lora_b)
    ctx.k = len(lora_a)
    ctx.scales, ctx.norm, ctx.eps, ctx.separate = list(scales), norm, eps, separate
    ctx.lora_scaling = list(lora_scaling)
    ctx.has_bias = bias is not None
    # The backward's kernels run where the forward's did (the backend chosen at forward time).
    ctx.triton_path = _common.select_backend(x.device) is Backend.TRITON


def _backward(ctx, grad_y, grad_z, grad_norms):
    x, weight, z, norms, *ab = ctx.saved_tensors
    if grad_y is None:  # y unused (only z or norms were): no gradient flows back
        return None, None, None, [None] * ctx.k, [None] * ctx.k, None, None, None, None, None, None
    k, scales, norm = ctx.k, ctx.scales, ctx.norm
    lora_a, lora_b = ab[:k], ab[k:]
    layout = rank_layout(tuple(a.shape[0] for a in lora_a))
    pack = _CACHE.get(lora_a, lora_b)
    gammas = ctx.lora_scaling
    a_cat = _a_cat(pack, lora_a, layout)
    b_cat, factors = _b_cat_and_factors(pack, lora_a, lora_b, layout, scales, gammas, norm)  # fᵢ folded in
    dtype, acc = x.dtype, _acc_dtype(x)
    g = grad_y
    m = z.shape[0]
    padded = list(zip(layout.offsets, layout.offsets[1:]))
    output = norm in OUTPUT_NORMS
    # Per LoRA weight, whether autograd wants its gradient (frozen adapters, e.g. while training
    # only the scaling tokens, skip dA_cat = dzᵀ x and dB_cat' = gᵀ zs: token-long GEMMs).
    need_a, need_b = list(ctx.needs_input_grad[3]), list(ctx.needs_input_grad[4])
    if z.shape[0] == 0:   # no tokens: every gradient is zero (and the row-group bookkeeping has no groups)
        zeros = lambda t, wanted: torch.zeros_like(t) if wanted else None  # noqa: E731
        return (zeros(x, ctx.needs_input_grad[0]), zeros(weight, ctx.needs_input_grad[1]),
                grad_y.new_zeros(weight.shape[0]) if ctx.has_bias and ctx.needs_input_grad[2] else None,
                [zeros(a, w) for a, w in zip(lora_a, need_a)], [zeros(b, w) for b, w in zip(lora_b, need_b)],
                None, None, None, None, None, None)
    weighted = norm == "weight" and (any(need_a) or any(need_b))  # dA, dB through the weight norms
    # The `output` norms' elementwise work on the [M, R] tensors in two Triton passes (see
    # _output_backward_fused) where the forward ran the kernels; else in PyTorch below.
    fused = output and m > 0 and ctx.triton_path and _kernel_handles(dtype, norm, layout)
    kernel = _common.kernel_module("multi_lora") if fused else None

    # y = base + Σᵢ ρᵢ zᵢ (fᵢ Bᵢ)ᵀ with ρᵢ = α/(nᵢ+ε) per row group for the `output` norms, else 1:
    # norms is [groups, k]; per row, its group's values. Without ρ the [M, R] tensors stay in the
    # input dtype (z, hb and dz round-tripped through fp32 are the same values): at CogVideoX-5B in bf16
    # that is four [M, R] conversion passes (~0.65 GB, ~0.2 ms at 3.35 TB/s) fewer per layer call.
    if output:
        alpha = norms.mean(1, keepdim=True)
        inv = 1.0 / (norms + ctx.eps)
    if output and not fused:
        zf = z.to(acc)
        rho = _per_row(_column_expand(alpha * inv, layout), m)
        zs = (zf * rho).to(dtype)
    elif not output:
        zs = z
    # hb = g (f B)_cat: hbᵢ = fᵢ gᵢ Bᵢ;  dB_cat' = gᵀ zs: dL/dBᵢ = fᵢ dB_cat'ᵢ.
    if ctx.separate:
        hb = torch.cat([g[i] @ b_cat[:, lo:hi] for i, (lo, hi) in enumerate(padded)], dim=1)
        g_sum = g.sum(0)
    else:
        hb = g @ b_cat
        g_sum = g
    if fused:
        # pass 1: zs = ρ z and the per-row psᵢ(t) = Σ hbᵢ(t)·zᵢ(t), one read of z and hb
        zs, ps_rows = torch.empty_like(z), torch.empty((m, k), dtype=torch.float32, device=z.device)
        kernel.multi_lora_output_bwd_scale_launch(z, hb, norms, _offsets(layout, z.device), ctx.eps,
                                                  layout.rank_tile, zs, ps_rows)
    if not (any(need_b) or weighted):
        db = None
    elif ctx.separate:
        db = torch.cat([g[i].T @ zs[:, lo:hi] for i, (lo, hi) in enumerate(padded)], dim=1)
    else:
        db = g.T @ zs
    if output and not fused:
        hb = hb.to(acc)
        dz = hb * rho
    # dL/dBᵢ = fᵢ dB_cat'ᵢ (+ the norms' terms below). `output` sums its terms in fp32; otherwise it stays
    # in the input dtype (a 16-bit product by a scalar computes in fp32 and rounds once, the same values
    # as a trip through fp32 without the conversion passes; `weight` adds its terms by an fp32 addcmul).
    d_b = None if db is None else [(f * db[:, lo:hi].to(acc)) if output else db[:, lo:hi] * f
                                   for f, (lo, hi) in zip(factors, layout.spans())]

    if output:
        # ρᵢ = α/(nᵢ+ε), α = mean nⱼ, and fᵢ = sᵢ: with psᵢ(g) = Σ_{t∈g} hbᵢ(t)·zᵢ(t) (= sᵢ Σₜ gᵢ·(zᵢBᵢᵀ)),
        # ∂L/∂nⱼ = Σᵢ psᵢ/(k(nᵢ+ε)) − psⱼ α/(nⱼ+ε)²; nⱼ(g)² = γⱼ² Σ_{t∈g} zⱼ(t)Gⱼzⱼ(t)ᵀ gives
        # ∂nⱼ/∂zⱼ(t) = γⱼ²Gⱼzⱼ(t)/nⱼ and ∂nⱼ/∂Gⱼ = γⱼ² Σₜ zⱼᵀzⱼ/(2nⱼ).
        groups = norms.shape[0]
        if fused:
            ps = ps_rows.reshape(groups, -1, k).sum(1)
        else:
            ps = torch.stack([(hb[:, lo:hi] * zf[:, lo:hi]).sum(1).reshape(groups, -1).sum(1)
                              for lo, hi in layout.spans()], dim=1)
        d_n = (ps * inv).sum(1, keepdim=True) / k - ps * alpha * inv * inv
        d_n = torch.stack([d_n[:, j] * (gm * gm) for j, gm in enumerate(gammas)], dim=1)  # γⱼ² ∂L/∂nⱼ
        q_groups = torch.where(norms > 0, d_n / torch.where(norms > 0, norms, 1), 0)
    if fused:
        dz_d = _output_backward_fused(kernel, z, hb, norms, q_groups, lora_b, layout, ctx.eps, d_b, need_b,
                                      pack)
    elif output:
        q = _per_row(q_groups, m)
        dz_terms = []
        for i, (b, (lo, hi)) in enumerate(zip(lora_b, layout.spans())):
            if dtype in (torch.float16, torch.bfloat16):
                # Every product on the tensor cores, operands in the input dtype: Gⱼ = BⱼᵀBⱼ (its
                # d_out-long sums in fp32, rounded once), z in its own (exact) values, zq rounded once,
                # products rounded once more: two roundings of the input dtype in terms that dz and dB
                # are rounded to anyway. In fp32 on the FMA units (~4.7 GFLOP each per LoRA at
                # CogVideoX-5B, M = 35,552, r = 256) the two [M, r]-long ones were the backward's only
                # fp32 GEMMs.
                z16 = z[:, lo:hi]
                zq = (zf[:, lo:hi] * q[:, i:i + 1]).to(dtype)
                dz_terms.append((lo, hi, (z16 @ (b.T @ b)).to(acc) * q[:, i:i + 1]))
                if need_b[i]:
                    d_b[i] = d_b[i] + b @ (z16.T @ zq)
            else:
                zq = zf[:, lo:hi] * q[:, i:i + 1]
                dz_terms.append((lo, hi, zq @ (b.T @ b)))
                if need_b[i]:
                    d_b[i] = d_b[i] + b @ (zf[:, lo:hi].T @ zq)
        for lo, hi, term in dz_terms:  # dz = hb * rho is a fresh tensor here
            dz[:, lo:hi] += term
        dz_d = dz.to(dtype)
    elif weighted:
        w_n = _weight_norm_backward(lora_a, lora_b, db, scales, gammas, layout, pack)

    if not output:
        dz_d = hb
    grad_x = grad_w = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_x(g_sum, weight, dz_d, a_cat, pack, lora_a, layout, ctx.triton_path)
    if ctx.needs_input_grad[1]:
        grad_w = g_sum.T @ x
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = g_sum.sum(0)
    da_cat = dz_d.T @ x if any(need_a) else None  # all k LoRAs in one GEMM, each a contiguous row slice
    grad_a, grad_b = [None] * k, [None] * k
    for i, (a, b, (lo, hi)) in enumerate(zip(lora_a, lora_b, layout.spans())):
        # `weight`: ∂N/∂Aᵢ = γᵢ² Gᵢ Aᵢ/Nᵢ and ∂N/∂Bᵢ = γᵢ² Bᵢ Pᵢ/Nᵢ, Gᵢ = BᵢᵀBᵢ and Pᵢ = AᵢAᵢᵀ (r × r):
        # four r×d-long products per LoRA in the input dtype (tensor cores in 16-bit; the Grams rounded
        # once, like the `output` norms' zG), each term added to its gradient in one fp32 addcmul.
        if need_a[i]:
            grad_a[i] = da_cat[lo:hi]
            if weighted:
                grad_a[i] = torch.addcmul(grad_a[i], (b.T @ b) @ a, w_n[i], value=gammas[i] ** 2)
            grad_a[i] = grad_a[i].to(a.dtype)
        if need_b[i]:
            grad_b[i] = d_b[i]
            if weighted:
                grad_b[i] = torch.addcmul(grad_b[i], b @ (a @ a.T), w_n[i], value=gammas[i] ** 2)
            grad_b[i] = grad_b[i].to(b.dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None, None, None


def _weight_norm_backward(lora_a, lora_b, db, scales, gammas, layout: RankLayout, pack) -> torch.Tensor:
    """[k] (∂L/∂Nⱼ)/Nⱼ for the `weight` norms (0 where Nⱼ = 0), Nⱼ = ‖γⱼBⱼAⱼ‖ and fᵢ = sᵢ α/Nᵢ folded
    into B_cat, α = mean Nⱼ. With dcᵢ = sᵢ Σₜ gᵢ·(zᵢBᵢᵀ) = sᵢ ⟨Bᵢ, dB_cat'ᵢ⟩ (fp32 sums),
    ∂L/∂Nⱼ = Σᵢ dcᵢ/(k Nᵢ) − dcⱼ α/Nⱼ² over the Nᵢ > 0. No host branch on which Nᵢ vanish (no sync);
    N² = γ² tr(AAᵀ BᵀB) then gives ∂N/∂A and ∂N/∂B (applied in _backward)."""
    k, acc = len(lora_b), _acc_dtype(db)
    n_w = effective_weight_norms(lora_a, lora_b, gammas, pack).to(acc)
    alive = n_w > 0
    safe = torch.where(alive, n_w, 1)
    dc = torch.stack([s * (b.to(acc) * db[:, lo:hi]).sum() for s, b, (lo, hi) in zip(scales, lora_b, layout.spans())])
    u = torch.where(alive, dc / safe, 0)   # dcᵢ/Nᵢ
    d_n = u.sum() / k - u * (n_w.mean() / safe)
    return torch.where(alive, d_n / safe, 0)


def _output_grams(pack, lora_b, layout: RankLayout, dtype: torch.dtype) -> torch.Tensor:
    """[R, P] in `dtype` (P the largest padded rank): Gᵢ = BᵢᵀBᵢ at rows offsetsᵢ.. and columns 0.. of
    LoRA i's padded rank, zero in the padding; fp32 sums rounded once. Cached with the weights (a
    function of the Bᵢ only: a training step rebuilds it once, a frozen set never)."""
    def build():
        gram = torch.zeros((layout.total, max(layout.padded)), dtype=dtype, device=lora_b[0].device)
        for b, (lo, hi) in zip(lora_b, layout.spans()):
            gram[lo:hi, : hi - lo] = b.detach().T.to(dtype) @ b.detach().to(dtype)
        return gram
    return _cached(pack, f"output_grams_{dtype}", build)


def _output_backward_fused(kernel, z, hb, norms, q_groups, lora_b, layout: RankLayout, eps, d_b, need_b, pack):
    """The `output` norms' backward through nᵢ on the Triton path: dz = ρ hb + q (z G) in z's dtype,
    and d_b[i] += Bᵢ (zᵢᵀ (q zᵢ)), as the PyTorch branch of _backward computes them. The kernel forms
    zᵢGᵢ itself (Gᵢ = BᵢᵀBᵢ from the weight cache in the input dtype, 16-bit tensor-core products into an
    fp32 accumulator: zG is not rounded to the input dtype as the PyTorch branch's is) and writes dz and
    zq = q z in the same pass. At CogVideoX-5B (M = 35,552, k = 3, r = 256, bf16) the two passes move
    ~0.38 GB where the PyTorch branch's ~20 elementwise passes over fp32 copies moved ~3.4 GB
    (sm90-static.md, "PyTorch work inside the ops"); a stored zG (three GEMMs reading z and writing it,
    the pass reading it back) cost 0.16 GB more, ~55 µs at 3 TB/s."""
    gram = _output_grams(pack, lora_b, layout, z.dtype)
    dz, zq = torch.empty_like(z), torch.empty_like(z)
    kernel.multi_lora_output_bwd_dz_launch(z, hb, gram, norms, q_groups, _offsets(layout, z.device), eps,
                                           layout.rank_tile, dz, zq)
    for i, (b, (lo, hi)) in enumerate(zip(lora_b, layout.spans())):
        if need_b[i]:
            d_b[i] = d_b[i] + b @ (z[:, lo:hi].T @ zq[:, lo:hi])   # input-dtype products, fp32 sum
    return dz


multi_lora_linear_op.register_autograd(_common.without_autocast(_backward), setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function.

def _numbers(name, values, k):
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, (int, float)) or not isinstance(values, Sequence) or len(values) != k:
        raise ValueError(f"{name} must hold one number per LoRA ({k}), got {values!r}")
    return [_common.check_finite_number(f"{name}[{i}]", v) for i, v in enumerate(values)]


def _check(x, weight, bias, lora_a, lora_b, scales, norm, eps, lora_scaling):
    _common.check_tensor("x", x, ndim=range(1, 9), dims="... d_in", dtypes=_common.FLOAT_DTYPES_AND_64)
    _common.check_tensor("weight", weight, ndim=2, dims="d_out d_in", dtypes=_common.FLOAT_DTYPES_AND_64)
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have shape [..., {d_in}] (d_in of weight {tuple(weight.shape)}), "
                         f"got {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        _common.check_tensor("bias", bias, ndim=1, dims="d_out", dtypes=_common.FLOAT_DTYPES_AND_64)
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
        _common.check_tensor(f"lora_a[{i}]", a, ndim=2, dims="r d_in", dtypes=_common.FLOAT_DTYPES_AND_64)
        _common.check_tensor(f"lora_b[{i}]", b, ndim=2, dims="d_out r", dtypes=_common.FLOAT_DTYPES_AND_64)
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
    scales = _numbers("scales", scales, len(lora_a))
    lora_scaling = [1.0] * len(lora_a) if lora_scaling is None else _numbers("lora_scaling", lora_scaling, len(lora_a))
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    eps = _common.check_finite_number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be ≥ 0, got {eps}")
    return scales, eps, lora_scaling


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                      scales: Sequence[float], norm: str = "none", eps: float = 1e-6,
                      separate: bool = False, lora_scaling: Sequence[float] | None = None) -> torch.Tensor:
    """y = x Wᵀ + b + Σᵢ sᵢ cᵢ (x Aᵢᵀ) Bᵢᵀ with LiON-LoRA's normalisation `norm` of the effective
    updates γᵢBᵢAᵢ (γᵢ = lora_scaling[i], peft's lora_alpha/r; default 1):
    "none" (cᵢ = 1, peft's multi-adapter forward), "weight" (cᵢ = α/‖γᵢBᵢAᵢ‖_F, α the mean),
    "output" (per sample b, the paper's reading: cᵢ(b) = α_b/(nᵢ(b)+ε), nᵢ(b) = ‖γᵢ(x_b Aᵢᵀ)Bᵢᵀ‖_F
    over the sample's tokens, α_b the mean; the sample axis is x's first) or "output_per_token"
    (the same per token t). See reference/multi_lora.py.

    x: [b ... d_in]; weight: [d_out d_in]; bias: [d_out] or None; lora_a[i]: [r_i d_in];
    lora_b[i]: [d_out r_i]; scales: k numbers sᵢ (peft's `scaling`, lora_alpha/r × adapter weight);
    lora_scaling: k numbers γᵢ or None. Returns [b ... d_out], or [k b ... d_out] with separate=True
    (yᵢ = x Wᵀ + b + sᵢcᵢ(x Aᵢᵀ)Bᵢᵀ, normalised over all k). Differentiable in x, every Aᵢ and Bᵢ
    (and W, b) including through the normalisation.

    >>> a = [torch.randn(8, 64) for _ in range(3)]; b = [torch.randn(32, 8) for _ in range(3)]
    >>> y = multi_lora_linear(torch.randn(2, 10, 64), torch.randn(32, 64), None, a, b,
    ...                       [1.0, 0.5, 0.5], norm="output")
    """
    scales, eps, lora_scaling = _check(x, weight, bias, lora_a, lora_b, scales, norm, eps, lora_scaling)
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1])  # (-1 is ambiguous when d_in = 0)
    samples = sample_count(x.shape) if x2.shape[0] else 1
    y, _, _ = multi_lora_linear_op(x2, weight, bias, list(lora_a), list(lora_b), scales, norm, eps, separate,
                                   lora_scaling, samples)
    if separate:
        return y.reshape(len(lora_a), *lead, weight.shape[0])
    return y.reshape(*lead, weight.shape[0])


def sample_inputs(device: torch.device):
    """Arguments for opcheck and torch.compile tests (ops/__init__.py OP_SAMPLES)."""
    def lora(ranks, d_in, d_out):
        return ([torch.randn(r, d_in, device=device) * 0.3 for r in ranks],
                [torch.randn(d_out, r, device=device) * 0.3 for r in ranks])

    x = torch.randn(18, 24, device=device)
    w, b = torch.randn(20, 24, device=device) * 0.2, torch.randn(20, device=device)
    a2, b2 = lora([4, 8], 24, 20)
    a1, b1 = lora([16], 24, 20)
    return [
        (x, w, b, a2, b2, [1.0, 0.5], "none", 1e-6, False, [1.0, 1.0], 1),
        (x, w, None, a2, b2, [0.7, 1.3], "weight", 1e-6, False, [2.0, 0.5], 1),
        (x, w, b, a2, b2, [1.0, 0.5], "output", 1e-6, False, [2.0, 0.5], 3),
        (x, w, b, a2, b2, [1.0, 0.5], "output_per_token", 1e-6, False, [1.0, 1.0], 1),
        (x, w, b, a1, b1, [2.0], "output", 1e-6, True, [1.0], 2),
    ]
