"""Reference dual-condition cross-attention (specs/motionflow.md, "Dual-condition cross-attention").

One query set attends to two or more key/value sets, each with its own softmax and weight λⱼ:

    O = Σⱼ λⱼ · softmax(Q Kⱼᵀ · s + maskⱼ) Vⱼ        mask only on the first condition (j = 0)

MotionFlow uses it for image tokens + camera tokens (λ_c), IP-Adapter for text tokens + image-prompt
tokens (`ip_adapter_scale`, one set per adapter). The softmaxes are separate, not one joint softmax
over the concatenated keys. A query row whose keys are all masked out contributes 0 (where a plain
softmax would give NaN).

Masks as diffusers applies them: a float tensor is added to the scores, a bool tensor keeps the
positions that are True; either broadcasts to [b h n m₀].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, softmax_scale: float,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · s + mask) over the keys, with rows that are fully masked set to 0.
    q: [b h n d], k: [b h m d] -> [b h n m] in q's dtype. NaN in q or k stays NaN in the rows it
    reaches (as in the kernels): only the fully masked rows are zeroed, not every NaN."""
    scores = (q @ k.transpose(-1, -2)) * softmax_scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(scores.dtype)
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def dual_cross_attention_reference(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                                   scales: Sequence[float] | None = None, mask: torch.Tensor | None = None,
                                   softmax_scale: float | None = None) -> torch.Tensor:
    """q: [b h n d]; keys[j], values[j]: [b h mⱼ d]; scales: one λ per condition (default all 1);
    mask: broadcastable to [b h n m₀]; softmax_scale defaults to d^-½.

    Returns [b h n d] in q's dtype, computed in float32 (float64 for float64 inputs).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scales = [1.0] * len(keys) if scales is None else list(scales)
    softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    for j, (k, v, lam) in enumerate(zip(keys, values, scales)):
        p = attention_probabilities(q.to(compute), k.to(compute), softmax_scale, mask if j == 0 else None)
        out = out + lam * (p @ v.to(compute))
    return out.to(q.dtype)
