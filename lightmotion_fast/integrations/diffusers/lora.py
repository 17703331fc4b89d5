"""Patch feature "multi_lora": peft LoRA `Linear` layers run through `multi_lora_linear`.

`patch(pipe)` wraps the forward of every peft `lora.Linear` in the denoiser. On each call the wrapper
reads peft's live state — active adapters (`set_adapters`), their `scaling` (adapter weights),
`disable_adapters`, `merged` — so changes after patching are honoured, and runs the base layer and
all active LoRAs as one fused op (two launches instead of 1 + 2k matmuls).

Options (the normalisations measure each adapter's effective update γᵢBᵢAᵢ, γᵢ = lora_alpha/r, or
lora_alpha/√r with rslora; the adapter weight of `set_adapters` scales the normalised update):
  lora_norm="none"              (default) cᵢ = 1: the output is peft's own multi-adapter forward.
  lora_norm="weight"            LiON-LoRA norm consistency, cᵢ = α/‖γᵢBᵢAᵢ‖_F per layer.
  lora_norm="output"            the paper's reading: per layer and per sample (x's first axis),
                                cᵢ(b) = α_b/(nᵢ(b)+ε), nᵢ(b) = ‖γᵢBᵢAᵢ x_b‖ over the sample's tokens.
  lora_norm="output_per_token"  the same per token, cᵢ(t) = α_t/(nᵢ(t)+ε).

What falls back to peft's forward with lora_norm="none" (and raises NotImplementedError with a
normalisation, since peft has no normalised version to fall back to): DoRA and other LoRA variants,
`lora_bias=True`, `fan_in_fan_out`, per-sample `adapter_names`, active LoRA dropout while training,
base layers that are not `nn.Linear`. Mixed dtypes (LoRA weights in another dtype than x) fall back
under "none" (peft's casting is kept exactly) and are cast to x's dtype under a normalisation.
`unpatch` restores peft's forward.
"""
from __future__ import annotations

import math

import torch

from lightmotion_fast.integrations.diffusers.registry import Feature, Option, PatchContext, register_feature
from lightmotion_fast.ops.multi_lora import multi_lora_linear
from lightmotion_fast.reference.multi_lora import NORMS


def _peft_lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft is optional: without it there are no LoRA layers to route
        return None
    return Linear


def adapter_scaling(layer, name: str) -> float:
    """γ of adapter `name` on a peft LoRA layer: the scale trained into its update (lora_alpha/r, or
    lora_alpha/√r with rslora), without the adapter weight `set_adapters` multiplies into `scaling`."""
    rank = layer.r[name]
    return float(layer.lora_alpha[name] / (math.sqrt(rank) if layer.use_rslora.get(name, False) else rank))


def _unsupported(layer, names, args, kwargs) -> str | None:
    """Why this call can't take the fused op, or None."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (e.g. per-sample adapter_names)"
    if not isinstance(layer.base_layer, torch.nn.Linear):
        return f"base layer {type(layer.base_layer).__name__} is not nn.Linear"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    for name in names:
        if name in getattr(layer, "lora_variant", {}):
            return f"adapter {name!r} is a LoRA variant (e.g. DoRA)"
        if getattr(layer, "lora_bias", {}).get(name, False):
            return f"adapter {name!r} has lora_bias=True"
        dropout = layer.lora_dropout[name]
        if layer.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
            return f"adapter {name!r} has active dropout (p={dropout.p}) in training mode"
    return None


def _fused_forward(layer, norm: str):
    def forward(original, x, *args, **kwargs):
        if layer.disable_adapters or layer.merged:
            return original(x, *args, **kwargs)
        names = [n for n in layer.active_adapters if n in layer.lora_A]
        if not names:
            return original(x, *args, **kwargs)
        why = _unsupported(layer, names, args, kwargs)
        base = layer.base_layer
        lora_a = [layer.lora_A[n].weight for n in names]
        lora_b = [layer.lora_B[n].weight for n in names]
        mixed = any(t.dtype != x.dtype for t in (base.weight, *lora_a, *lora_b))
        if why is None and mixed and norm == "none":
            why = "mixed dtypes"
        if why is not None:
            if norm == "none":
                return original(x, *args, **kwargs)
            raise NotImplementedError(f"lightmotion_fast lora_norm={norm!r} does not support this peft "
                                      f"layer: {why}. Use lora_norm='none' or change the adapter.")
        if mixed:
            lora_a = [a.to(x.dtype) for a in lora_a]
            lora_b = [b.to(x.dtype) for b in lora_b]
        weight = base.weight.to(x.dtype)
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        scales = [float(layer.scaling[n]) for n in names]
        gammas = [adapter_scaling(layer, n) for n in names]
        return multi_lora_linear(x, weight, bias, lora_a, lora_b, scales, norm=norm, lora_scaling=gammas)

    return forward


def install(ctx: PatchContext) -> None:
    norm = ctx.options.get("lora_norm", "none")
    if norm not in NORMS:
        raise ValueError(f"lora_norm must be one of {NORMS}, got {norm!r}")
    lora_linear = _peft_lora_linear_class()
    if lora_linear is None:
        return
    for module in ctx.model.modules():
        if isinstance(module, lora_linear):
            ctx.wrap_forward(module, _fused_forward(module, norm))


FEATURE = register_feature(Feature(
    name="multi_lora", install=install,
    options=(Option("lora_norm", "'none' | 'weight' | 'output' | 'output_per_token'", "'none'",
                    "LiON-LoRA normalisation of the peft LoRA layers: 'none' is peft's own sum"),),
    summary="peft LoRA layers run base + every active adapter as one fused multi_lora_linear",
))
