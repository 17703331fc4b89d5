"""Patch feature "lion": LiON-LoRA's scaling tokens inside the model's forward (CogVideoX, Wan).

    patch(pipe, lion={"pan": 0.5, "orbit": 1.0}, lion_embeddings={"pan": emb_pan, "orbit": emb_orbit})
    pipe(...)                                          # every transformer call appends E_pan, E_orbit
    set_lion_scales(pipe, {"pan": 0.8})                # later calls use S_pan = 0.8; no re-patch
    pipe(..., attention_kwargs={"lion_scales": {"orbit": 0.3}})   # this call only

`lion` maps each fused adapter (loaded through peft / `load_lora_weights`) to its scaling value
Sᵢ ∈ [s_min, 1]; `lion_embeddings` maps it to its trained `ScalingTokenEmbedding(num_loras=1, dim)`
(γ(Sᵢ) -> its own linear -> Eᵢ [d]). peft's adapter weights (`set_adapters`) still scale each LoRA.
`lora_norm` ("none" | "weight" | "output") picks the fusion processors' normalisation (lion_lora.py).

What one forward of the patched denoiser does:
1. the model's forward wrapper turns the current scales (the patch's, or this call's
   `attention_kwargs["lion_scales"]`, popped before diffusers sees it) into tokens [b k d];
2. they are appended right after the patch embedding: CogVideoX's `patch_embed` output
   [b (text+n) d] becomes [b (text+n+k) d], so the blocks see hidden_states = [H; E₁..E_k];
   Wan's `patch_embedding` (a Conv3d, [b d f h w]) returns [b d (n+k)], which the forward's
   `flatten(2).transpose(1, 2)` turns into [b (n+k) d];
3. every block's self-attention runs `LionLoraFusionProcessor` / `LionLoraWanProcessor`: branch i
   attends over [(text;) H; Eᵢ] with LoRA i, RoPE on the video tokens only (the pipeline's rotary
   tables cover the n video tokens), H averaged over the branches, tokens kept side by side;
   every other per-token layer (norms, feed-forward, Wan's cross-attention) takes the k tokens as
   k more tokens;
4. the k tokens are dropped before the output head (CogVideoX `norm_final`, Wan `norm_out`), so
   the projection and unpatchify see the n video tokens and the output shape is unchanged.
The processors read the layout (n, k) recorded in step 2 and raise ValueError when a call carries
no appended tokens. With gradient checkpointing the layout is kept after the forward, so the
recomputation in backward finds it. Not supported: Wan 2.2 TI2V's per-token timesteps.
`unpatch` restores the processors and forwards; the embeddings are the caller's modules (move them
with the model: `emb.to(device, dtype)`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lightmotion_fast.integrations.diffusers.lion_lora import (
    LionLoraFusionProcessor,
    LionLoraWanProcessor,
    ScalingTokenEmbedding,
)
from lightmotion_fast.integrations.diffusers.registry import (
    Feature,
    Option,
    PatchContext,
    _live,
    register_feature,
)

CALL_SCALES = "lion_scales"  # attention_kwargs key for this call's scales


@dataclass(frozen=True)
class _Wiring:
    """Where the tokens enter and leave one model family, and the processor of its blocks."""

    blocks: str       # ModuleList of blocks; each block's attn1 gets the fusion processor
    enter: str        # module whose output the tokens are appended to
    leave: str        # first per-token module after the blocks: the tokens are dropped at its input
    processor: type


_WIRING = {
    "cogvideox": _Wiring("transformer_blocks", "patch_embed", "norm_final", LionLoraFusionProcessor),
    "wan": _Wiring("blocks", "patch_embedding", "norm_out", LionLoraWanProcessor),
}


class LionTokens:
    """The live state of `patch(pipe, lion=...)`: adapters, scales, embeddings, and the layout of the
    tokens the running (or last checkpointed) forward appended. Reach it with `lion_state(pipe)`."""

    def __init__(self, scales: Mapping[str, object], embeddings: Mapping[str, ScalingTokenEmbedding], dim: int):
        self.adapters = list(scales)
        self.embeddings = _check_embeddings(embeddings, self.adapters, dim)
        self.scales: dict[str, object] = {}
        self.set_scales(scales)
        self.pending: torch.Tensor | None = None   # [b? k d] tokens to append in the running forward
        self.layout: tuple[int, int] | None = None  # (n video tokens, k) of the appended tokens

    def set_scales(self, scales: Mapping[str, object]) -> None:
        """Update some or all adapters' Sᵢ (a number, or a tensor [b] of per-sample values)."""
        self.scales.update(self._checked(scales))

    def _checked(self, scales) -> dict:
        if not isinstance(scales, Mapping):
            raise TypeError(f"lion scales must be a dict {{adapter: S}}, got {type(scales).__name__}")
        unknown = [a for a in scales if a not in self.adapters]
        if unknown:
            raise ValueError(f"lion scales name adapters {unknown} that this patch does not fuse "
                             f"({self.adapters}); patch again with lion={{...}} to fuse other adapters")
        out = {}
        for name, s in scales.items():
            s = torch.as_tensor(s, dtype=torch.float32)
            if s.ndim > 1:
                raise ValueError(f"lion scale of {name!r} must be a number or a tensor [b], got shape {tuple(s.shape)}")
            emb = self.embeddings[name]
            if not torch.isfinite(s).all() or (s < emb.s_min).any() or (s > 1).any():
                raise ValueError(f"lion scale of {name!r} must lie in [s_min, 1] = [{emb.s_min}, 1], got {s.tolist()}")
            out[name] = s
        return out

    def tokens(self, call_scales=None) -> torch.Tensor:
        """Eᵢ = embeddingᵢ(Sᵢ) for every adapter in order: [k d], or [b k d] with per-sample scales."""
        scales = dict(self.scales)
        if call_scales is not None:
            scales.update(self._checked(call_scales))
        batch = {s.shape[0] for s in scales.values() if s.ndim == 1}
        if len(batch) > 1:
            raise ValueError(f"per-sample lion scales must share one batch size, got {sorted(batch)}")
        b = batch.pop() if batch else None
        tokens = []
        for name in self.adapters:
            emb, s = self.embeddings[name], scales[name]
            s = s.expand(b) if b is not None else s
            tokens.append(emb(s.reshape(-1, 1))[:, 0] if b is not None else emb(s.reshape(1))[0])
        return torch.stack(tokens, dim=-2)


def _check_embeddings(embeddings, adapters, dim) -> dict:
    if not isinstance(embeddings, Mapping):
        raise TypeError("lion_embeddings must be a dict {adapter: ScalingTokenEmbedding(num_loras=1, dim)}, "
                        f"got {type(embeddings).__name__}")
    missing = [a for a in adapters if a not in embeddings]
    if missing:
        raise ValueError(f"lion_embeddings has no scaling-token embedding for adapters {missing}: each fused "
                         "adapter needs the ScalingTokenEmbedding trained with it (lightmotion_fast.training.lion)")
    for name in adapters:
        emb = embeddings[name]
        if not isinstance(emb, ScalingTokenEmbedding) or emb.num_loras != 1:
            raise TypeError(f"lion_embeddings[{name!r}] must be a ScalingTokenEmbedding with num_loras=1, "
                            f"got {type(emb).__name__}")
        if emb.proj[0].out_features != dim:
            raise ValueError(f"lion_embeddings[{name!r}] makes tokens of width {emb.proj[0].out_features}, the "
                             f"model's hidden width is {dim}")
    return {name: embeddings[name] for name in adapters}


# -- the forward wrappers ----------------------------------------------------------------------------

def _model_forward(state: LionTokens, model, family: str):
    def forward(original, *args, **kwargs):
        attention_kwargs = kwargs.get("attention_kwargs")
        call_scales = None
        if isinstance(attention_kwargs, Mapping) and CALL_SCALES in attention_kwargs:
            attention_kwargs = dict(attention_kwargs)          # the caller's dict stays as it was
            call_scales = attention_kwargs.pop(CALL_SCALES)
            kwargs["attention_kwargs"] = attention_kwargs or None
        if family == "wan":
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:
                raise NotImplementedError("lion scaling tokens do not support per-token timesteps (Wan 2.2 TI2V)")
        state.pending, state.layout = state.tokens(call_scales), None
        try:
            out = original(*args, **kwargs)
            if state.pending is not None:
                raise RuntimeError(f"lion: {type(model).__name__}.forward never reached the module where the "
                                   "scaling tokens are appended")
            return out
        finally:
            state.pending = None
            if not (torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False)):
                state.layout = None   # kept only for checkpoint recomputation in backward

    return forward


def _take(state: LionTokens, batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """The pending tokens as [b k d] in like's dtype and device; records the layout (n, k)."""
    tokens = state.pending
    state.pending = None
    if tokens.ndim == 2:
        tokens = tokens.expand(batch, *tokens.shape)
    elif tokens.shape[0] != batch:
        raise ValueError(f"per-sample lion scales hold {tokens.shape[0]} values, the batch has {batch} "
                         "samples (classifier-free guidance doubles the batch)")
    state.layout = (n, tokens.shape[1])
    return tokens.to(device=like.device, dtype=like.dtype)


def _append_cogvideox(state: LionTokens):
    def forward(original, text_embeds, image_embeds, *args, **kwargs):
        out = original(text_embeds, image_embeds, *args, **kwargs)       # [b (text+n) d]
        if state.pending is None:
            return out
        tokens = _take(state, out.shape[0], out.shape[1] - text_embeds.shape[1], out)
        return torch.cat([out, tokens], dim=1)                             # [b (text+n+k) d]

    return forward


def _append_wan(state: LionTokens):
    def forward(original, x, *args, **kwargs):
        out = original(x, *args, **kwargs)                                 # [b d f h w]
        if state.pending is None:
            return out
        flat = out.flatten(2)                                              # [b d n]
        tokens = _take(state, out.shape[0], flat.shape[2], out)
        # The forward goes on with .flatten(2).transpose(1, 2): a no-op flatten on [b d (n+k)].
        return torch.cat([flat, tokens.transpose(1, 2)], dim=2)

    return forward


def _strip(state: LionTokens):
    def forward(original, hidden_states, *args, **kwargs):
        if state.layout is not None:
            n, k = state.layout
            if hidden_states.shape[1] != n + k:
                raise RuntimeError(f"lion: {hidden_states.shape[1]} tokens reach the output head, expected the "
                                   f"{n} video tokens and {k} scaling tokens appended after the patch embedding")
            hidden_states = hidden_states[:, :n]
        return original(hidden_states, *args, **kwargs)

    return forward


# -- the feature -------------------------------------------------------------------------------------

def _check_adapters(blocks, adapters) -> None:
    """Every block's self-attention must carry every adapter on to_q, to_k, to_v and to_out.0."""
    for i, block in enumerate(blocks):
        attn = block.attn1
        for name, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out.0", attn.to_out[0])):
            loaded = list(getattr(layer, "lora_A", {}))
            missing = [a for a in adapters if a not in loaded]
            if missing:
                raise ValueError(f"lion names adapters {missing} that are not loaded on block {i}'s attn1.{name} "
                                 f"(loaded: {loaded or 'none'}); LiON-LoRA fuses LoRAs on to_q, to_k, to_v and "
                                 "to_out.0 of every self-attention: load them with peft / load_lora_weights")


def install(ctx: PatchContext) -> None:
    scales = ctx.options.get("lion")
    if scales is None:
        if ctx.options.get("lion_embeddings") is not None:
            raise ValueError("lion_embeddings= needs lion={adapter: scale, ...}")
        return
    if not isinstance(scales, Mapping) or not scales or not all(isinstance(a, str) for a in scales):
        raise ValueError(f"lion must be a non-empty dict {{adapter name: scale}}, got {scales!r}")
    wiring, model = _WIRING[ctx.adapter.name], ctx.model
    blocks = getattr(model, wiring.blocks)
    _check_adapters(blocks, list(scales))
    if any(ctx.processor_set_here(block.attn1) for block in blocks):
        # CogVideoX's attn1 is also its text attention, where camera= (LightMotion) captures the subject
        # mask: the fusion processor would replace that capture and the mask would silently be lost.
        raise ValueError(f"lion= replaces the self-attention processors of {type(model).__name__}, where another "
                         "option of this patch already installed its own (camera=: LightMotion's subject-mask "
                         "capture on the joint text attention); with camera=, give the background mask= too "
                         "(then nothing is captured there)")
    dim = blocks[0].attn1.to_q.base_layer.in_features
    state = LionTokens(scales, ctx.options.get("lion_embeddings") or {}, dim)
    norm = ctx.options.get("lora_norm") or "none"
    processors = [wiring.processor(state.adapters, norm=norm, tokens=state) for _ in blocks]
    ctx.data["lion"] = state
    ctx.wrap_forward(model, _model_forward(state, model, ctx.adapter.name))
    ctx.wrap_forward(getattr(model, wiring.enter),
                     _append_cogvideox(state) if ctx.adapter.name == "cogvideox" else _append_wan(state))
    ctx.wrap_forward(getattr(model, wiring.leave), _strip(state))
    for block, processor in zip(blocks, processors):
        ctx.set_processor(block.attn1, processor)


def lion_state(pipe) -> LionTokens:
    """The LionTokens of a pipeline (or model) patched with lion={...}."""
    ctx = _live(pipe)
    state = ctx.data.get("lion") if ctx is not None else None
    if state is None:
        raise ValueError("this pipeline is not patched with lion={adapter: scale, ...}")
    return state


def set_lion_scales(pipe, scales: Mapping[str, object]) -> None:
    """Change some adapters' scaling values Sᵢ for the following calls, without patching again.
    The patch's `lion` option follows, so patch(pipe, lion=<the same dict>) stays a no-op."""
    state = lion_state(pipe)
    state.set_scales(scales)
    ctx = _live(pipe)
    ctx.options["lion"] = {**ctx.options["lion"], **dict(scales)}


FEATURE = register_feature(Feature(
    name="lion", install=install, families=tuple(_WIRING),
    options=(Option("lion", "dict[str, float]", "None",
                    "LiON-LoRA: {adapter: S in [s_min, 1]} fuses these peft adapters per branch and appends "
                    "their scaling tokens inside the forward; change S later with set_lion_scales(pipe, ...) "
                    "or per call with attention_kwargs={'lion_scales': {...}}"),
             Option("lion_embeddings", "dict[str, ScalingTokenEmbedding]", "None",
                    "each lion adapter's trained scaling-token embedding (num_loras=1)")),
    summary="LiON-LoRA scaling tokens appended inside the forward, per-LoRA attention fusion",
))
