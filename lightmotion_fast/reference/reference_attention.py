"""Reference attention (specs/motionflow.md, "Reference attention").

MotionFlow concatenates a reference feature map p with the feature map m along the width, runs
self-attention, and keeps the first half (the columns of m). Without positional terms that mix the
halves, that is: queries from m only, keys and values from m and p together,

    out = softmax(Q_m [K_m; K_p]ᵀ · s) [V_m; V_p]

which `reference_attention` computes without building [m; p] and without the discarded half of the
queries. `width_concat_attention` below is the paper's formulation, kept for tests.
"""
from __future__ import annotations

import torch
from einops import rearrange


def reference_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor,
                                  v_ref: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
    """q: [b h n d]; k, v: [b h n_m d] (from m); k_ref, v_ref: [b h n_p d] (from the bank p).
    Returns [b h n d] in q's dtype, computed in float32 (float64 for float64 inputs)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    keys = torch.cat([k, k_ref], dim=2).to(compute)
    values = torch.cat([v, v_ref], dim=2).to(compute)
    probs = torch.softmax((q.to(compute) @ keys.transpose(-1, -2)) * softmax_scale, dim=-1)
    return (probs @ values).to(q.dtype)


def width_concat_attention(m: torch.Tensor, p: torch.Tensor, to_q, to_k, to_v, heads: int) -> torch.Tensor:
    """The paper's formulation: feature maps m, p [b c h w] concatenated along the width to
    [b c h 2w], self-attention over all tokens with projections to_q/to_k/to_v (c -> heads·d), then
    the left half (m's columns) kept. Returns [b h (hh w) d] token outputs for m, row-major."""
    width = m.shape[-1]
    both = torch.cat([m, p], dim=-1)
    tokens = rearrange(both, "b c hh w2 -> b (hh w2) c")
    split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=heads)  # noqa: E731
    q, k, v = split(to_q(tokens)), split(to_k(tokens)), split(to_v(tokens))
    out = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
    out = rearrange(out, "b h (hh w2) d -> b h hh w2 d", w2=2 * width)[:, :, :, :width]
    return rearrange(out, "b h hh w d -> b h (hh w) d")
