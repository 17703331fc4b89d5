"""Tiny models with LoRA adapters and the reference forward for the LiON-LoRA scaling-token tests.

The reference is built from diffusers' and peft's own pieces, not from this library's processors:
each block's self-attention runs diffusers' processor once per branch with only that branch's adapter
active in peft, on [H; Eᵢ], with the RoPE tables extended by the identity rotation for the token (so
RoPE turns the video tokens only); the branches' H are averaged. The tokens enter through a pre-hook
on the first block and leave through a pre-hook on the output norm.
"""
import contextlib

import torch

import tiny_models as tiny
from lightmotion_fast.integrations.diffusers.lion_lora import ScalingTokenEmbedding

RANKS = {"pan": 4, "orbit": 8}
WEIGHTS = {"pan": 1.0, "orbit": 0.7}
PROJECTIONS = ("to_q", "to_k", "to_v")


# -- models --------------------------------------------------------------------------------------------

def cogvideox(rope: bool):
    """tiny_models.tiny_cogvideox's config; rope=True is the CogVideoX-5B kind (RoPE, no sin-cos
    positions added in the patch embedding), rope=False the CogVideoX-2B kind."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(4)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=rope,
    ).eval()


def cogvideox_call(rope: bool):
    inputs = tiny.cogvideox_inputs()
    if rope:
        f, _, h, w = inputs["hidden_states"].shape[1:]
        n = f * (h // 2) * (w // 2)
        angles = torch.randn(n, 8, generator=torch.Generator().manual_seed(2))
        inputs["image_rotary_emb"] = (angles.cos(), angles.sin())
    return inputs


def with_adapters(model, names=tuple(RANKS)):
    for seed, name in enumerate(names):
        tiny.add_random_lora(model, RANKS[name], seed, name)
    model.set_adapters(list(names), weights=[WEIGHTS[n] for n in names])
    return model


def embeddings(dim=16, names=tuple(RANKS)):
    torch.manual_seed(7)
    return {name: ScalingTokenEmbedding(1, dim, num_frequencies=4, s_min=0.1) for name in names}


# -- the reference -------------------------------------------------------------------------------------

def _extend_rope(rope, k_extra: int, wan: bool):
    """RoPE tables for n tokens -> n + k_extra, the extra rows the identity rotation (cos 1, sin 0)."""
    if rope is None:
        return None
    cos, sin = rope
    dim = 1 if wan else 0
    shape = list(cos.shape)
    shape[dim] = k_extra
    return (torch.cat([cos, cos.new_ones(shape)], dim), torch.cat([sin, sin.new_zeros(shape)], dim))


class BranchLoop:
    """Reference processor: diffusers' own processor once per branch, peft with only adapter i active."""

    def __init__(self, adapters, wan: bool):
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.adapters, self.wan = list(adapters), wan
        self.inner = WanAttnProcessor() if wan else CogVideoXAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        k = len(self.adapters)
        n = hidden_states.shape[1] - k
        layers = [getattr(attn, p) for p in PROJECTIONS] + [attn.to_out[0]]
        active = [list(layer.active_adapters) for layer in layers]
        rope = _extend_rope(image_rotary_emb, 1, self.wan)
        hs, enc = [], []
        try:
            for i, name in enumerate(self.adapters):
                for layer in layers:
                    layer.set_adapter(name)
                x = torch.cat([hidden_states[:, :n], hidden_states[:, n + i:n + i + 1]], dim=1)
                if self.wan:
                    hs.append(self.inner(attn, x, None, None, rope))
                else:
                    h, e = self.inner(attn, x, encoder_hidden_states, image_rotary_emb=rope)
                    hs.append(h)
                    enc.append(e)
        finally:
            for layer, names in zip(layers, active):
                layer.set_adapter(names)
        out = torch.cat([torch.stack([h[:, :n] for h in hs]).mean(0), torch.stack([h[:, n] for h in hs], dim=1)], 1)
        return out if self.wan else (out, torch.stack(enc).mean(0))


def reference_forward(model, inputs, scales, embs, wan: bool, grad: bool = False):
    """The model with BranchLoop processors, tokens added by hooks (no lightmotion_fast code but the
    embeddings). scales: {adapter: S} with S a number or a tensor [b]."""
    adapters = list(scales)
    with contextlib.nullcontext() if grad else torch.no_grad():
        tokens = torch.stack([embs[a](torch.as_tensor(scales[a], dtype=torch.float32).reshape(-1, 1))[:, 0]
                              for a in adapters], dim=1)  # [1 or b, k, d]
    blocks = model.blocks if wan else model.transformer_blocks
    leave = model.norm_out if wan else model.norm_final
    n_video = []

    def enter(module, args, kwargs):
        if wan:
            (h, *rest) = args
        else:
            h = kwargs["hidden_states"]
        n_video.append(h.shape[1])
        h = torch.cat([h, tokens.expand(h.shape[0], -1, -1).to(h.dtype)], dim=1)
        if wan:
            return (h, *rest), kwargs
        return args, {**kwargs, "hidden_states": h}

    def strip(module, args):
        return (args[0][:, :n_video[-1]], *args[1:])

    saved = {name: proc for name, proc in model.attn_processors.items()}
    hooks = [blocks[0].register_forward_pre_hook(enter, with_kwargs=True), leave.register_forward_pre_hook(strip)]
    try:
        for block in blocks:
            block.attn1.set_processor(BranchLoop(adapters, wan))
        with contextlib.nullcontext() if grad else torch.no_grad():
            return model(**inputs)[0]
    finally:
        for hook in hooks:
            hook.remove()
        model.set_attn_processor(saved)


