"""Reference normalized multi-LoRA linear layer (specs/multi_lora.md, LiON-LoRA).

    y = x Wᵀ + b + Σᵢ sᵢ · cᵢ · (x Aᵢᵀ) Bᵢᵀ          Aᵢ: [r, d_in], Bᵢ: [d_out, r], i = 1..k

sᵢ is the whole factor peft applies (`scaling` = lora_alpha / r × adapter weight). γᵢ (`lora_scaling`,
peft's lora_alpha / r, default 1) is the part of sᵢ that belongs to the adapter's trained update: the
normalisations measure each adapter's *effective* update ΔWᵢ = γᵢ BᵢAᵢ, so two adapters trained with
different alpha/r come out with equal norms; the rest of sᵢ (the adapter weight λᵢ = sᵢ/γᵢ) still
scales the normalised update. The LoRA coefficients cᵢ, chosen by `norm`:
  "none":   cᵢ = 1: peft's own multi-adapter `Linear.forward` (base layer, then a loop over the active
            adapters).
  "weight": cᵢ = α / Nᵢ, Nᵢ = ‖γᵢ BᵢAᵢ‖_F, α = meanᵢ Nᵢ, one number per LoRA and layer. A LoRA whose
            ‖BA‖ is exactly 0 (peft initialises B to zeros) contributes nothing whatever cᵢ is; its cᵢ
            is set to 0 there instead of α/0.
  "output": per layer and per sample b (the paper's reading): nᵢ(b) = ‖γᵢ (x_b Aᵢᵀ) Bᵢᵀ‖_F over the
            sample's tokens, α_b = meanᵢ nᵢ(b), cᵢ(b) = α_b / (nᵢ(b) + ε). The sample axis is x's first
            axis: x [b ... d_in] has b samples (each of its [...] tokens); a 1-D x is one sample.
  "output_per_token": the same per token t: nᵢ(t) = ‖γᵢ (x_t Aᵢᵀ) Bᵢᵀ‖₂, cᵢ(t) = α_t / (nᵢ(t) + ε).
(For a 2-D x [b, d_in] every row is its own sample, so "output" equals "output_per_token" there.)

Written for reading: the deltas (x Aᵢᵀ) Bᵢᵀ are formed explicitly, [t, d_out] each, and the norms
taken from them. The kernels never form them; they use the r×r identities below, which the helpers
`weight_delta_norm` and `output_delta_norms` state in code:
  ‖BA‖²_F = tr((AAᵀ)(BᵀB))            nᵢ(t)² = zᵢ Gᵢ zᵢᵀ,  zᵢ = x_t Aᵢᵀ,  Gᵢ = BᵢᵀBᵢ,
and a sample's squared norm is the sum of its tokens' squared norms.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange

NORMS = ("none", "weight", "output", "output_per_token")


def weight_delta_norm(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """‖B A‖_F from r×r products only: sqrt(tr((A Aᵀ)(Bᵀ B))). A: [r, d_in], B: [d_out, r]."""
    gram_a = lora_a @ lora_a.T
    gram_b = lora_b.T @ lora_b
    return (gram_a * gram_b).sum().clamp_min(0).sqrt()  # tr(PQ) = Σ P∘Qᵀ, and Q is symmetric


def output_delta_norms(z: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Per-token ‖z Bᵀ‖₂ from the Gram form: sqrt(z G zᵀ), G = BᵀB. z: [t, r] -> [t]."""
    gram = lora_b.T @ lora_b
    return ((z @ gram) * z).sum(-1).clamp_min(0).sqrt()


def sample_count(shape: Sequence[int]) -> int:
    """The number of samples b of an input [b ... d_in] (1 for a 1-D input)."""
    return int(shape[0]) if len(shape) >= 2 else 1


def lora_coefficients(deltas: Sequence[torch.Tensor], lora_a, lora_b, norm: str, eps: float,
                      samples: int = 1, lora_scaling: Sequence[float] | None = None):
    """cᵢ for every LoRA, as a list of tensors broadcastable against deltas[i] ([t, d_out], the t rows
    being `samples` consecutive groups of equal size)."""
    gammas = [1.0] * len(deltas) if lora_scaling is None else [abs(float(g)) for g in lora_scaling]
    if norm == "none":
        return [torch.ones((), dtype=d.dtype, device=d.device) for d in deltas]
    if norm == "weight":
        norms = torch.stack([g * torch.linalg.matrix_norm(b @ a) for a, b, g in zip(lora_a, lora_b, gammas)])
        alpha = norms.mean()
        return [torch.where(n > 0, alpha / torch.where(n > 0, n, 1), 0) for n in norms]
    if norm in ("output", "output_per_token"):
        groups = deltas[0].shape[0] if norm == "output_per_token" else samples
        per_group = [rearrange(g * d, "(s t) o -> s (t o)", s=groups).norm(dim=-1)
                     for d, g in zip(deltas, gammas)]
        norms = torch.stack(per_group)  # [k, groups]
        alpha = norms.mean(0)
        return [torch.repeat_interleave(alpha / (n + eps), deltas[0].shape[0] // groups)[:, None]
                for n in norms]
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def multi_lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                                scales: Sequence[float], norm: str = "none", eps: float = 1e-6,
                                separate: bool = False,
                                lora_scaling: Sequence[float] | None = None) -> torch.Tensor:
    """x: [... d_in] (for "output", [b ... d_in]: b samples); weight: [d_out, d_in]; bias: [d_out] or
    None; lora_a[i]: [r_i, d_in]; lora_b[i]: [d_out, r_i]; scales: k numbers sᵢ; lora_scaling: k
    numbers γᵢ (the part of sᵢ inside the normalised update) or None (γᵢ = 1).

    Returns y: [... d_out], or with separate=True the k per-LoRA outputs stacked, [k ... d_out],
    y_i = x Wᵀ + b + sᵢ cᵢ (x Aᵢᵀ) Bᵢᵀ (cᵢ normalised over all k LoRAs as above).
    """
    lead = x.shape[:-1]
    samples = sample_count(x.shape)
    x = rearrange(x, "... d -> (...) d")
    base = x @ weight.T
    if bias is not None:
        base = base + bias
    deltas = [(x @ a.T) @ b.T for a, b in zip(lora_a, lora_b)]
    coefs = lora_coefficients(deltas, lora_a, lora_b, norm, eps, samples, lora_scaling)
    terms = [s * c * d for s, c, d in zip(scales, coefs, deltas)]
    if separate:
        y = torch.stack([base + t for t in terms])
        return y.reshape(len(terms), *lead, y.shape[-1])
    y = base
    for t in terms:
        y = y + t
    return y.reshape(*lead, y.shape[-1])
