"""Reference normalized multi-LoRA linear layer (specs/multi_lora.md, LiON-LoRA).

    y = x Wᵀ + b + Σᵢ sᵢ · cᵢ · (x Aᵢᵀ) Bᵢᵀ          Aᵢ: [r, d_in], Bᵢ: [d_out, r], i = 1..k

with the LoRA coefficients cᵢ chosen by `norm`:
  "none":   cᵢ = 1. sᵢ carries peft's `lora_alpha / r × adapter weight`, so this is peft's own
            multi-adapter `Linear.forward` (base layer, then a loop over the active adapters).
  "weight": cᵢ = α / ‖BᵢAᵢ‖_F with α = meanᵢ ‖BᵢAᵢ‖_F, one number per LoRA and layer. A LoRA whose
            ‖BA‖ is exactly 0 (peft initialises B to zeros) contributes nothing whatever cᵢ is;
            its cᵢ is set to 0 there instead of α/0.
  "output": per token t, nᵢ(t) = ‖(x_t Aᵢᵀ) Bᵢᵀ‖₂, α_t = meanᵢ nᵢ(t), cᵢ(t) = α_t / (nᵢ(t) + ε).

Written for reading: the deltas (x Aᵢᵀ) Bᵢᵀ are formed explicitly, [t, d_out] each, and the norms
taken from them. The kernels never form them; they use the r×r identities below, which the helpers
`weight_delta_norm` and `output_delta_norms` state in code:
  ‖BA‖²_F = tr((AAᵀ)(BᵀB))            nᵢ(t)² = zᵢ Gᵢ zᵢᵀ,  zᵢ = x_t Aᵢᵀ,  Gᵢ = BᵢᵀBᵢ.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange

NORMS = ("none", "weight", "output")


def weight_delta_norm(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """‖B A‖_F from r×r products only: sqrt(tr((A Aᵀ)(Bᵀ B))). A: [r, d_in], B: [d_out, r]."""
    gram_a = lora_a @ lora_a.T
    gram_b = lora_b.T @ lora_b
    return (gram_a * gram_b).sum().clamp_min(0).sqrt()  # tr(PQ) = Σ P∘Qᵀ, and Q is symmetric


def output_delta_norms(z: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Per-token ‖z Bᵀ‖₂ from the Gram form: sqrt(z G zᵀ), G = BᵀB. z: [t, r] -> [t]."""
    gram = lora_b.T @ lora_b
    return ((z @ gram) * z).sum(-1).clamp_min(0).sqrt()


def lora_coefficients(deltas: Sequence[torch.Tensor], lora_a, lora_b, norm: str, eps: float):
    """cᵢ for every LoRA, as a list of tensors broadcastable against deltas[i] ([t, d_out])."""
    if norm == "none":
        return [torch.ones((), dtype=d.dtype, device=d.device) for d in deltas]
    if norm == "weight":
        norms = torch.stack([torch.linalg.matrix_norm(b @ a) for a, b in zip(lora_a, lora_b)])
        alpha = norms.mean()
        return [torch.where(n > 0, alpha / torch.where(n > 0, n, 1), 0) for n in norms]
    if norm == "output":
        norms = torch.stack([d.norm(dim=-1) for d in deltas])  # [k, t]
        alpha = norms.mean(0)
        return [rearrange(alpha / (n + eps), "t -> t 1") for n in norms]
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def multi_lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                                scales: Sequence[float], norm: str = "none", eps: float = 1e-6,
                                separate: bool = False) -> torch.Tensor:
    """x: [... d_in]; weight: [d_out, d_in]; bias: [d_out] or None; lora_a[i]: [r_i, d_in];
    lora_b[i]: [d_out, r_i]; scales: k numbers sᵢ.

    Returns y: [... d_out], or with separate=True the k per-LoRA outputs stacked, [k ... d_out],
    y_i = x Wᵀ + b + sᵢ cᵢ (x Aᵢᵀ) Bᵢᵀ (cᵢ normalised over all k LoRAs as above).
    """
    lead = x.shape[:-1]
    x = rearrange(x, "... d -> (...) d")
    base = x @ weight.T
    if bias is not None:
        base = base + bias
    deltas = [(x @ a.T) @ b.T for a, b in zip(lora_a, lora_b)]
    coefs = lora_coefficients(deltas, lora_a, lora_b, norm, eps)
    terms = [s * c * d for s, c, d in zip(scales, coefs, deltas)]
    if separate:
        y = torch.stack([base + t for t in terms])
        return y.reshape(len(terms), *lead, y.shape[-1])
    y = base
    for t in terms:
        y = y + t
    return y.reshape(*lead, y.shape[-1])
