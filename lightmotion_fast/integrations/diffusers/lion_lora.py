"""LiON-LoRA scaling tokens and training-free per-LoRA attention fusion for CogVideoX
(specs/multi_lora.md, "Scaling tokens and per-LoRA attention fusion").

- `fourier_embedding(S)`: γ(S) = [sin(2ʲπS), cos(2ʲπS)]_{j<J}.
- `ScalingTokenEmbedding`: γ(Sᵢ) -> the i-th LoRA's own linear -> token Eᵢ [d]; Sᵢ ∈ [s_min, 1].
- `LionLoraFusionProcessor`: a CogVideoX attention processor for k LoRAs loaded through peft on
  to_q/to_k/to_v/to_out.0. hidden_states carry the video tokens H followed by the k scaling tokens
  E₁..E_k side by side. Branch i attends over [text; H; Eᵢ] with projections adapted by LoRA i only
  (W + sᵢcᵢBᵢAᵢ); afterwards text and H are averaged over the branches and each branch's token is
  kept in its slot. q, k and v come from `multi_lora_linear(separate=True)` (one launch per
  projection for all k branches, on the shared sequence [text; H; E₁..E_k]); the k branches then run
  as ONE batched attention call (branches stacked on the batch axis). to_out takes one fused call per
  branch (the branches' inputs differ there).
- `LionLoraWanProcessor`: the same fusion on a Wan self-attention (`WanAttention` attn1): no text in
  the sequence, q/k RMS-normalised over all heads, Wan's interleaved RoPE on the video tokens only.
- `lion_lora_fusion_reference`: the same, as a plain loop over branches with explicitly merged
  weights, for tests.

Normalisation (`norm`), over each adapter's effective update γᵢBᵢAᵢ (γᵢ = lora_alpha/r): "none";
"weight" (cᵢ = α/‖γᵢBᵢAᵢ‖_F per projection); "output", per layer and per sample b:
cᵢ(b) = α_b/(nᵢ(b)+ε), nᵢ(b) the norm of LoRA i's output over the sample's tokens: for to_q/to_k/to_v
over the shared input [text; H; E₁..E_k] (the fused op's per-sample `output`), for to_out over branch
i's own attention output (the branches' inputs differ there, so to_out's LoRA terms run as PyTorch
matmuls under "output"). "output_per_token" is not offered here.

Where the scaling tokens come from. `patch(pipe, lion={adapter: S, ...})` (lion_tokens.py) appends
E₁..E_k inside the model's forward, installs these processors and strips the tokens before the
output projection; the processors then know the token layout from that patch. Called directly, a
processor must be told: `num_scaling_tokens=k` (after `append_scaling_tokens`). A processor that has
neither raises ValueError rather than take the last k video tokens for scaling tokens.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from lightmotion_fast.ops import multi_lora as _ml
from lightmotion_fast.ops.multi_lora import multi_lora_linear

FUSION_NORMS = ("none", "weight", "output")
_EPS = 1e-6  # ε of the `output` normalisation, as multi_lora_linear's default
PROJECTIONS = ("to_q", "to_k", "to_v")


def fourier_embedding(s: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """γ(S): [... ] -> [... 2J], frequencies 2ʲπ for j < J (sin block, then cos block)."""
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32, device=s.device)
    angles = s.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ScalingTokenEmbedding(torch.nn.Module):
    """k scalars Sᵢ (camera amplitude / motion strength) -> k tokens Eᵢ = Linearᵢ(γ(Sᵢ)).

    >>> emb = ScalingTokenEmbedding(num_loras=3, dim=3072)
    >>> tokens = emb(torch.tensor([1.0, 0.5, 0.25]))      # [3, 3072]
    """

    def __init__(self, num_loras: int, dim: int, num_frequencies: int = 8, s_min: float = 0.0):
        super().__init__()
        if num_loras < 1 or dim < 1 or num_frequencies < 1:
            raise ValueError(f"num_loras, dim and num_frequencies must be ≥ 1, got {num_loras}, {dim}, {num_frequencies}")
        if not 0.0 <= s_min <= 1.0:
            raise ValueError(f"s_min must lie in [0, 1], got {s_min}")
        self.num_loras, self.num_frequencies, self.s_min = num_loras, num_frequencies, float(s_min)
        self.proj = torch.nn.ModuleList(torch.nn.Linear(2 * num_frequencies, dim) for _ in range(num_loras))

    def forward(self, s) -> torch.Tensor:
        """s: [k] or [b k] -> tokens [k d] or [b k d]."""
        s = torch.as_tensor(s, dtype=torch.float32, device=self.proj[0].weight.device)
        if s.ndim not in (1, 2) or s.shape[-1] != self.num_loras:
            raise ValueError(f"S must have shape [{self.num_loras}] or [b, {self.num_loras}] (one scale per "
                             f"LoRA), got {tuple(s.shape)}")
        if not torch.isfinite(s).all() or (s < self.s_min).any() or (s > 1).any():
            raise ValueError(f"every S must lie in [s_min, 1] = [{self.s_min}, 1], got {s.tolist()}")
        gamma = fourier_embedding(s, self.num_frequencies).to(self.proj[0].weight.dtype)
        return torch.stack([proj(gamma[..., i, :]) for i, proj in enumerate(self.proj)], dim=-2)


def append_scaling_tokens(hidden_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[b n d] video tokens + [k d] or [b k d] scaling tokens -> [b (n+k) d]."""
    if tokens.ndim == 2:
        tokens = tokens.expand(hidden_states.shape[0], *tokens.shape)
    if tokens.ndim != 3 or tokens.shape[-1] != hidden_states.shape[-1] or tokens.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"tokens must have shape [k, {hidden_states.shape[-1]}] or "
                         f"[{hidden_states.shape[0]}, k, {hidden_states.shape[-1]}], got {tuple(tokens.shape)}")
    return torch.cat([hidden_states, tokens.to(hidden_states.dtype)], dim=1)


# ---------------------------------------------------------------------------------------------

def _lora_parts(layer, adapters: Sequence[str]):
    """(weight, bias, [Aᵢ], [Bᵢ], [sᵢ]) of a peft lora.Linear for the given adapters, in order."""
    missing = [a for a in adapters if a not in getattr(layer, "lora_A", {})]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded on {type(layer).__name__} "
                         f"(loaded: {list(getattr(layer, 'lora_A', {}))})")
    base = layer.base_layer
    return (base.weight, base.bias, [layer.lora_A[a].weight for a in adapters],
            [layer.lora_B[a].weight for a in adapters], [float(layer.scaling[a]) for a in adapters])


def _gammas(layer, adapters: Sequence[str]) -> list[float]:
    """γᵢ = peft's lora_alpha/r of each adapter: the scale inside its effective update."""
    from lightmotion_fast.integrations.diffusers.lora import adapter_scaling

    return [adapter_scaling(layer, a) for a in adapters]


def _branch_scales(parts, norm: str, gammas: Sequence[float]) -> list[float]:
    """sᵢ, times cᵢ = α/‖γᵢBᵢAᵢ‖_F for "weight" ("output"'s per-sample cᵢ(b) come from
    _output_coefficients)."""
    _, _, a, b, s = parts
    if norm != "weight":
        return list(s)
    c = _ml._weight_coefficients(_ml.effective_weight_norms(a, b, gammas)).tolist()
    return [si * ci for si, ci in zip(s, c)]


def _output_coefficients(deltas: Sequence[torch.Tensor], gammas: Sequence[float]) -> torch.Tensor:
    """deltas[i]: LoRA i's output (x_i Aᵢᵀ)Bᵢᵀ, [b L d]. Returns cᵢ(b) = α_b/(nᵢ(b)+ε), [k b], with
    nᵢ(b) = |γᵢ| ‖deltas[i][b]‖_F and α_b = meanᵢ nᵢ(b)."""
    norms = torch.stack([abs(g) * d.flatten(1).norm(dim=1) for d, g in zip(deltas, gammas)])
    return norms.mean(0) / (norms + _EPS)


def _check_sequence(hidden_states, image_rotary_emb, k: int, expected_n: int | None = None) -> int:
    """Number of video tokens n, checking that exactly k scaling tokens follow them (and, when the
    forward that appended them said how many video tokens there were, that n is that number)."""
    n = hidden_states.shape[1] - k
    if expected_n is not None and n != expected_n:
        raise ValueError(f"hidden_states has {hidden_states.shape[1]} tokens: the model's forward appended "
                         f"{k} scaling tokens to {expected_n} video tokens, so expected {expected_n + k}")
    if n < 1:
        raise ValueError(f"hidden_states has {hidden_states.shape[1]} tokens: expected the video tokens "
                         f"followed by {k} scaling tokens (one per LoRA)")
    if image_rotary_emb is not None:
        n_rope = image_rotary_emb[0].shape[0]
        if n_rope != n:
            raise ValueError(f"hidden_states has {hidden_states.shape[1]} tokens and the rotary embedding "
                             f"covers {n_rope} video tokens: expected {k} scaling tokens (one per LoRA) "
                             f"after them, found {hidden_states.shape[1] - n_rope}")
    return n


def _rope(x, image_rotary_emb, start: int, stop: int):
    from diffusers.models.embeddings import apply_rotary_emb

    x = x.clone()
    x[:, :, start:stop] = apply_rotary_emb(x[:, :, start:stop], image_rotary_emb)
    return x


class LionLoraFusionProcessor:
    """CogVideoX attention processor: training-free fusion of k LoRAs, one batched attention call.

    `patch(pipe, lion={...})` installs it with `tokens` (the patch's token state), so it knows where
    the scaling tokens are. Directly: append them yourself and say how many,

    >>> proc = LionLoraFusionProcessor(["pan", "orbit", "zoom"])
    >>> proc(attn, append_scaling_tokens(h, tokens), text, num_scaling_tokens=3)
    """

    def __init__(self, adapters: Sequence[str], norm: str = "none", tokens=None):
        if isinstance(adapters, str) or len(adapters) < 1:
            raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
        if norm not in FUSION_NORMS:
            raise ValueError(f"norm must be one of {FUSION_NORMS} for the fusion processor, got {norm!r}")
        self.adapters, self.norm, self.tokens = list(adapters), norm, tokens

    def _video_tokens(self, hidden_states, image_rotary_emb, num_scaling_tokens) -> int:
        """n, from an explicit `num_scaling_tokens` or from the layout the patched forward recorded;
        a clear error when neither says that scaling tokens were appended."""
        k = len(self.adapters)
        layout = self.tokens.layout if self.tokens is not None else None
        if num_scaling_tokens is None and layout is None:
            raise ValueError(
                f"{type(self).__name__} found no scaling tokens: nothing appended them to hidden_states in "
                f"this call, and it would otherwise take the last {k} video tokens for them. Use "
                f"patch(pipe, lion={{adapter: scale, ...}}), which appends them inside the model's forward, "
                f"or append them yourself (append_scaling_tokens) and pass num_scaling_tokens={k}")
        if num_scaling_tokens is not None and num_scaling_tokens != k:
            raise ValueError(f"num_scaling_tokens must equal the number of adapters ({k}), got {num_scaling_tokens}")
        expected_n = None
        if num_scaling_tokens is None:
            expected_n, appended = layout
            if appended != k:
                raise ValueError(f"the model's forward appended {appended} scaling tokens, this processor "
                                 f"fuses {k} adapters {self.adapters}")
        return _check_sequence(hidden_states, image_rotary_emb, k, expected_n)

    def _check_live_state(self, attn) -> None:
        """The fusion reads every adapter's weights itself, so peft's live switches must agree with it:
        a merged adapter is already inside the base weight (fusing it again would count it twice), and a
        disabled or inactive one would silently be switched back on, another active adapter and LoRA dropout
        in training would silently be left out. Clear errors instead."""
        for name, layer in [(p, getattr(attn, p)) for p in PROJECTIONS] + [("to_out.0", attn.to_out[0])]:
            if getattr(layer, "merged", False):
                raise ValueError(f"{name}: LoRA adapters are merged into the base weight (fuse_lora / merge); "
                                 f"the LiON fusion needs them unmerged: call unfuse_lora() first")
            if getattr(layer, "disable_adapters", False):
                raise ValueError(f"{name}: LoRA adapters are disabled (disable_lora), but the LiON fusion of "
                                 f"{self.adapters} is installed: enable them (enable_lora) or unpatch the pipeline")
            active = list(getattr(layer, "active_adapters", self.adapters))
            loaded = getattr(layer, "lora_A", {})
            _lora_parts(layer, self.adapters)   # a name that is not loaded: that error first
            inactive = [a for a in self.adapters if a in loaded and a not in active]
            if inactive:
                raise ValueError(f"{name}: adapters {inactive} are fused by LiON but not active in peft (active: "
                                 f"{active}); call set_adapters({self.adapters}) or patch with the adapters you use")
            others = [a for a in active if a in loaded and a not in self.adapters]
            if others:
                raise ValueError(f"{name}: adapters {others} are active in peft but not among the LiON-fused "
                                 f"{self.adapters}; the fusion would leave them out: patch with lion= naming them "
                                 f"too, or set_adapters({self.adapters})")
            dropping = [a for a in self.adapters if layer.training and a in getattr(layer, "lora_dropout", {})
                        and isinstance(layer.lora_dropout[a], torch.nn.Dropout) and layer.lora_dropout[a].p > 0]
            if dropping:
                raise NotImplementedError(f"{name}: adapters {dropping} have LoRA dropout in training mode, which the "
                                          "LiON fusion does not apply: train with lora_dropout=0 (LionLoraTrainer "
                                          "checks this), or call model.eval() for inference")

    def _qk_norm(self, attn, q, key):
        """CogVideoX: LayerNorm per head. q, key: [(k b) h l e]."""
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return q, key

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 num_scaling_tokens: int | None = None):
        if attention_mask is not None:
            raise NotImplementedError("LionLoraFusionProcessor does not take an attention mask")
        self._check_live_state(attn)
        k = len(self.adapters)
        batch, text = hidden_states.shape[0], encoder_hidden_states.shape[1]
        n = self._video_tokens(hidden_states, image_rotary_emb, num_scaling_tokens)
        shared = text + n
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [b, text + n + k, d]

        qkv = []
        for name in PROJECTIONS:
            parts = _lora_parts(getattr(attn, name), self.adapters)
            w, bias, a, b, s = parts
            y = multi_lora_linear(x, w, bias, a, b, s, norm=self.norm, separate=True,  # [k b L d]
                                  lora_scaling=_gammas(getattr(attn, name), self.adapters))
            own = y[torch.arange(k), :, shared + torch.arange(k)]                       # [k b d]: Eᵢ in branch i
            seq = torch.cat([y[:, :, :shared], own[:, :, None]], dim=2)                 # [k b shared+1 d]
            qkv.append(rearrange(seq, "k b l (h e) -> (k b) h l e", h=attn.heads))
        q, key, v = qkv
        q, key = self._qk_norm(attn, q, key)
        if image_rotary_emb is not None:
            q = _rope(q, image_rotary_emb, text, shared)
            if not attn.is_cross_attention:
                key = _rope(key, image_rotary_emb, text, shared)
        o = F.scaled_dot_product_attention(q, key, v, dropout_p=0.0, is_causal=False)  # all k branches
        o = rearrange(o, "(k b) h l e -> k b l (h e)", k=k)

        outs = attn.to_out[1](self._out_projection(attn, o))
        merged = outs[:, :, :shared].mean(0)                                 # text and H: branch average
        tokens = outs[torch.arange(k), :, shared]                            # [k b d]
        hidden = torch.cat([merged[:, text:], rearrange(tokens, "k b d -> b k d")], dim=1)
        return hidden, merged[:, :text]


    def _out_projection(self, attn, o):
        """to_out of every branch, [k b L d] -> [k b L d]: branch i through W + LoRA i only."""
        k = len(self.adapters)
        out_parts = _lora_parts(attn.to_out[0], self.adapters)
        w, bias, a, b, s = out_parts
        gammas = _gammas(attn.to_out[0], self.adapters)
        if self.norm != "output":
            scales = _branch_scales(out_parts, self.norm, gammas)
            return torch.stack([multi_lora_linear(o[i], w, bias, [a[i]], [b[i]], [scales[i]]) for i in range(k)])
        deltas = [(o[i] @ a[i].T) @ b[i].T for i in range(k)]
        coef = _output_coefficients(deltas, gammas)
        return torch.stack([F.linear(o[i], w, bias) + s[i] * coef[i][:, None, None] * deltas[i] for i in range(k)])


class LionLoraWanProcessor(LionLoraFusionProcessor):
    """The fusion on a Wan self-attention (attn1 of a `WanTransformer3DModel` block): the sequence is
    [H; E₁..E_k] with no text, q and k are RMS-normalised over all heads (Wan's norm_q/norm_k), and
    Wan's RoPE (interleaved pairs, freqs [1 n 1 e]) turns only the n video tokens. Returns H'."""

    def _qk_norm(self, attn, q, key):
        """Wan: RMSNorm over the whole inner dim, before the heads are split. q, key: [(k b) h l e]."""
        heads = q.shape[1]
        whole = lambda t: rearrange(t, "kb h l e -> kb l (h e)")  # noqa: E731
        split = lambda t: rearrange(t, "kb l (h e) -> kb h l e", h=heads)  # noqa: E731
        return split(attn.norm_q(whole(q))), split(attn.norm_k(whole(key)))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 num_scaling_tokens: int | None = None):
        if encoder_hidden_states is not None:
            raise ValueError("LionLoraWanProcessor is for Wan's self-attention (attn1): "
                             "encoder_hidden_states must be None")
        # Wan's cos/sin [1 n 1 e] repeat each frequency for the pair (2j, 2j+1); diffusers'
        # apply_rotary_emb with [n e] tables computes the same rotation, so the parent's RoPE is reused.
        rope = None if rotary_emb is None else tuple(t[0, :, 0, :] for t in rotary_emb)
        empty_text = hidden_states[:, :0]
        hidden, _ = super().__call__(attn, hidden_states, empty_text, attention_mask, rope, num_scaling_tokens)
        return hidden


def lion_lora_fusion_reference(attn, hidden_states, encoder_hidden_states, adapters: Sequence[str],
                               norm: str = "none", image_rotary_emb=None):
    """A loop over branches in float64, each projection W + sᵢcᵢBᵢAᵢ of branch i formed explicitly
    (its LoRA term as (x Aᵢᵀ)Bᵢᵀ); what the processor computes."""
    k = len(adapters)
    text = encoder_hidden_states.shape[1]
    n = hidden_states.shape[1] - k
    shared = text + n

    def lora_linear(layer, i, inp, coef_inputs):
        """Branch i of a LoRA layer in float64: base + sᵢcᵢ (inp Aᵢᵀ)Bᵢᵀ; for "output", cᵢ(b) from the
        k LoRAs' outputs on coef_inputs[j] (the layer's shared input, or each branch's own)."""
        parts = _lora_parts(layer, adapters)
        w, bias, a, b, s = (t.double() if isinstance(t, torch.Tensor) else t for t in parts)
        a, b = [t.double() for t in a], [t.double() for t in b]
        gammas = _gammas(layer, adapters)
        if norm == "output":
            deltas = [(ci.double() @ a[j].T) @ b[j].T for j, ci in enumerate(coef_inputs)]
            scale = s[i] * _output_coefficients(deltas, gammas)[i][:, None, None]
        else:
            scale = _branch_scales(parts, norm, gammas)[i]
        inp = inp.double()
        return (inp @ w.T + bias + scale * ((inp @ a[i].T) @ b[i].T)).to(hidden_states.dtype)

    shared_input = [torch.cat([encoder_hidden_states, hidden_states], dim=1)] * k  # text, H, E₁..E_k
    attn_out = []
    for i in range(k):
        x = torch.cat([encoder_hidden_states, hidden_states[:, :n], hidden_states[:, n + i:n + i + 1]], dim=1)
        q, key, v = (rearrange(lora_linear(getattr(attn, p), i, x, shared_input), "b l (h e) -> b h l e",
                               h=attn.heads) for p in PROJECTIONS)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            q = _rope(q, image_rotary_emb, text, shared)
            key = _rope(key, image_rotary_emb, text, shared)
        attn_out.append(rearrange(F.scaled_dot_product_attention(q, key, v), "b h l e -> b l (h e)"))
    outs = [lora_linear(attn.to_out[0], i, o, attn_out) for i, o in enumerate(attn_out)]
    merged = torch.stack([o[:, :shared] for o in outs]).mean(0)
    tokens = torch.stack([o[:, shared] for o in outs], dim=1)
    return torch.cat([merged[:, text:], tokens], dim=1), merged[:, :text]
