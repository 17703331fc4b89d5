"""The trajectory branch inside the full 3D attention of a video DiT (issue 12, item 5).

The paper's appendix puts trajectory attention into the 3D attention module of a DiT instead of a
temporal attention. Here it is a branch on `attn1` of every block of diffusers'
`CogVideoXTransformer3DModel` (joint text-video attention) and `WanTransformer3DModel` (video
self-attention), installed by the same `patch(pipe, trajectories=..., valid=..., traj_weights=...)` as
the SVD branch (trajectory.py dispatches here by model family) and taken back exactly by `unpatch`.

Where the branch reads its input. attn1's processor receives the block's normalised, modulated video
tokens x [b, (t h w), c] (CogVideoX passes the text tokens separately; they are not part of any
trajectory). The branch projects x with its own to_q, to_k, to_v (no bias) as the SVD branch does,
then applies the host attention's own q/k normalisation (`attn.norm_q`/`norm_k`: CogVideoX's per-head
LayerNorm, Wan's RMSNorm across heads) and the host's rotary embedding when the call carries one
(Wan; CogVideoX-5B style). So, with the Q/K/V weights inherited from attn1 (the paper's "weight
inheriting"), the branch starts as the host's own 3D attention restricted to the tokens of one
trajectory, up to attn1's q/k/v biases, which the branch leaves out so that its checkpoint keeps the
official five tensors per branch (to_q, to_k, to_v, to_out.0.weight, to_out.0.bias). The host's norms
and rotary tables are read, not copied or trained. The output projection starts at zero, so a freshly
patched model computes exactly what the unpatched one does.

Token layout and trajectories. Tokens are ordered (t h w): t token frames, (h, w) the patch grid.
The trajectory level is the patch grid: a pixel (x, y) of the generated video (frame size
h·p_h·s × w·p_w·s, s the VAE's spatial factor) lands on patch (floor(y·h/H0), floor(x·w/W0)).
Trajectories come either with one frame per token frame (t frames), or with one per video frame:
(t − 1)·c + 1 frames, c = the VAE's temporal factor × the temporal patch size (4 for CogVideoX and
Wan 2.x). Token frame i then reads video frame i·c: frame 0 for the first latent frame (the causal
VAE encodes it alone) and the last video frame of each later latent frame's group.
Trajectories are subsampled to ratio·h·w = 2·h·w per call geometry, seed 0, as on SVD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from lightmotion_fast.camera.trajectories import TrajectoryTables
from lightmotion_fast.integrations.diffusers.registry import PatchContext
from lightmotion_fast.integrations.diffusers.trajectory import (
    TrajectoryAttnProcessor,
    TrajectoryState,
    load_trajectory_weights,
)
from lightmotion_fast.ops.trajectory_attention import trajectory_attention

# The transformer block whose attn1 carries the branch, per model family.
BLOCK_CLASSES = {"cogvideox": "CogVideoXBlock", "wan": "WanTransformerBlock"}


def token_frame_indices(num_frames: int, token_frames: int, stride: int) -> torch.Tensor:
    """Which trajectory frame each token frame reads: all of them when the trajectories have one frame
    per token frame, else every `stride`-th of (token_frames − 1)·stride + 1 video frames. [t] int64."""
    if num_frames == token_frames:
        return torch.arange(token_frames)
    video_frames = (token_frames - 1) * stride + 1
    if num_frames == video_frames:
        return torch.arange(token_frames) * stride
    raise ValueError(f"trajectories have {num_frames} frames; the model is called with {token_frames} token "
                     f"frames, so they must have {token_frames} (one per token frame) or {video_frames} (one per "
                     f"video frame, temporal factor {stride})")


class DiTTrajectoryState(TrajectoryState):
    """What all branches of one DiT share: the trajectories, the tables per token geometry, and the
    batch size and token grid (t, h, w) of the current call."""

    def __init__(self, trajectories, valid=None, spatial_scale: int = 8, temporal_stride: int = 4):
        super().__init__(trajectories, valid, vae_scale_factor=spatial_scale)
        self.temporal_stride = int(temporal_stride)
        self.grid: tuple[int, int, int] | None = None

    def begin_tokens(self, batch: int, grid: tuple[int, int, int], patch: tuple[int, int, int],
                     device: torch.device) -> None:
        """grid (t, h, w): token frames and patch grid of this call; patch (p_t, p_h, p_w)."""
        t, h, w = grid
        if self.coords is None:   # TrajectoryTables given: they must fit this call as they are
            if self.tables.frames != t or self.tables.sizes[0] != (h, w):
                raise ValueError(f"the trajectory tables were built for {self.tables.frames} frames of a "
                                 f"{self.tables.sizes[0]} grid; the model is called with {t} token frames of a "
                                 f"{(h, w)} patch grid")
        else:
            tables = self._built.get(grid)
            if tables is None:
                if torch.compiler.is_compiling():
                    raise RuntimeError(f"the trajectory tables for a {t}x{h}x{w} token grid do not exist yet and "
                                       "cannot be built inside a compiled graph: call the model once before "
                                       "torch.compile")
                frames = token_frame_indices(self.coords.shape[0], t, self.temporal_stride * patch[0])
                s = self.vae_scale_factor
                tables = self._built[grid] = TrajectoryTables(
                    self.coords[frames], self.valid[frames], frame_size=(h * patch[1] * s, w * patch[2] * s),
                    latent_size=(h, w), levels=1)
            self.tables = tables
        if not torch.compiler.is_compiling():
            self.tables.prepare(device)
        self.batch, self.grid = batch, grid


class DiTTrajectoryAttnProcessor(TrajectoryAttnProcessor):
    """attn1's original processor plus the trajectory branch, for CogVideoX and Wan attention.

    Called like the host's processor (CogVideoX: keyword `image_rotary_emb`, returns (video, text);
    Wan: positional `rotary_emb`, returns video); the branch's output is added to the video tokens'."""

    def __init__(self, hidden_size: int, heads: int, base_processor, state: DiTTrajectoryState | None = None,
                 implementation: str = "fused", **kwargs):
        if implementation != "fused":
            raise ValueError(f"the DiT trajectory branch has implementation 'fused' only, got {implementation!r} "
                             "(the reference runs through lightmotion_fast.backend('reference'))")
        super().__init__(hidden_size, heads, base_processor, state, implementation=implementation, **kwargs)
        self.__dict__["host_norms"] = (None, None)

    @classmethod
    def from_attention(cls, attn, state=None, **kwargs) -> "DiTTrajectoryAttnProcessor":
        """Q, K, V weights inherited from attn1 (its biases are not), output projection zero; the
        host's q/k norms are used as they are (read, not trained)."""
        proc = super().from_attention(attn, state, **kwargs)
        proc.__dict__["host_norms"] = (getattr(attn, "norm_q", None), getattr(attn, "norm_k", None))
        return proc

    def _host_qk(self, x: torch.Tensor, which: int, rotary_emb) -> torch.Tensor:
        """x [b, (t h w), (heads d)] -> [b, (t h w), heads, d] with the host's norm and rotary embedding."""
        norm = self.host_norms[which]
        inner = x.shape[-1]
        if norm is not None and _norm_width(norm) == inner:        # Wan: RMSNorm across heads
            x = norm(x)
        x = rearrange(x, "b s (h d) -> b s h d", h=self.heads)
        if norm is not None and _norm_width(norm) != inner:        # CogVideoX: LayerNorm per head
            x = norm(x)
        if rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            cos, sin = (r.reshape(-1, r.shape[-1]) for r in rotary_emb)   # [(t h w), d]
            x = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
        return x

    def branch(self, hidden_states: torch.Tensor, rotary_emb=None) -> torch.Tensor:
        """The trajectory branch alone: video tokens [b, (t h w), c] -> [b, (t h w), c]."""
        state = self.state
        if state is None or state.grid is None:
            raise RuntimeError("DiTTrajectoryAttnProcessor has no trajectories for this call: install it with "
                               "lightmotion_fast.patch(pipe, trajectories=...)")
        frames, height, width = state.grid
        if hidden_states.shape[1] != frames * height * width:
            raise ValueError(f"attn1 got {hidden_states.shape[1]} video tokens, the call's grid {state.grid} has "
                             f"{frames * height * width}")
        level = state.tables.level(height * width, hidden_states.device)

        def dense(t):   # [b, (t h w), h, d] -> [b, (h w), t, h, d], the op's layout
            return rearrange(t, "b (f s) h d -> b s f h d", f=frames)

        q = dense(self._host_qk(self.to_q(hidden_states), 0, rotary_emb))
        k = dense(self._host_qk(self.to_k(hidden_states), 1, rotary_emb))
        v = dense(rearrange(self.to_v(hidden_states), "b s (h d) -> b s h d", h=self.heads))
        out = trajectory_attention(q, k, v, level.index, mask_invalid=self.mask_invalid,
                                   deterministic=self.deterministic)
        out = F.linear(rearrange(out, "b s f h d -> b (f s) (h d)"), self.to_out[0].weight)
        # to_out's bias only where a token landed, as on SVD (to_out per token, then the average).
        landed = rearrange(level.landed, "f s -> 1 (f s) 1").to(out.dtype)
        return self.to_out[1](out + landed * self.to_out[0].bias)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 image_rotary_emb=None):
        # Positional, so it fits both hosts: the fifth argument is CogVideoX's image_rotary_emb and Wan's
        # rotary_emb.
        rope = rotary_emb if rotary_emb is not None else image_rotary_emb
        base = self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, rope)
        branch = self.branch(hidden_states, rope)
        if isinstance(base, tuple):   # CogVideoX: (video, text)
            return (base[0] + branch, *base[1:])
        return base + branch


def _norm_width(norm: torch.nn.Module) -> int:
    shape = getattr(norm, "normalized_shape", None)
    if shape is None:
        raise TypeError(f"cannot read the width of the host's q/k norm {type(norm).__name__}")
    return int(shape[-1])


# ---------------------------------------------------------------------------------------------
# Installing


def dit_attentions(model: torch.nn.Module, family: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, attn1) of every transformer block of a CogVideoX or Wan model, in module order."""
    block = BLOCK_CLASSES[family]
    return [(f"{name}.attn1", m.attn1) for name, m in model.named_modules() if type(m).__name__ == block]


def _token_grid(family: str, model: torch.nn.Module, latents: torch.Tensor):
    """(batch, (t, h, w) token grid, (p_t, p_h, p_w) patch) of a forward call's latent input."""
    if latents.ndim != 5:
        raise ValueError(f"the trajectory branch expects a 5-D video latent, got {tuple(latents.shape)}")
    config = model.config
    if family == "cogvideox":     # [b f c h w]
        batch, frames, _, height, width = latents.shape
        patch = (config.patch_size_t or 1, config.patch_size, config.patch_size)
    else:                         # wan: [b c f h w]
        batch, _, frames, height, width = latents.shape
        patch = tuple(config.patch_size)
    return batch, (frames // patch[0], height // patch[1], width // patch[2]), patch


def _scales(ctx: PatchContext) -> tuple[int, int]:
    """(spatial, temporal) VAE factors: the pipeline's, else the model config's, else 8 and 4."""
    pipe = ctx.pipe if ctx.pipe is not ctx.model else None
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or 8
    temporal = (getattr(pipe, "vae_scale_factor_temporal", None)
                or getattr(ctx.model.config, "temporal_compression_ratio", None) or 4)
    return int(spatial), int(temporal)


def install_dit_trajectory_processors(ctx: PatchContext, trajectories, valid=None, weights=None,
                                      **processor_kwargs) -> DiTTrajectoryState:
    """Put a DiTTrajectoryAttnProcessor on attn1 of every block, and wrap the model's forward so each
    call tells the branches its batch and token grid."""
    family, model = ctx.adapter.name, ctx.model
    spatial, temporal = _scales(ctx)
    state = DiTTrajectoryState(trajectories, valid, spatial_scale=spatial, temporal_stride=temporal)
    attns = dit_attentions(model, family)
    if not attns:
        raise ValueError(f"{type(model).__name__} has no {BLOCK_CLASSES[family]} for the trajectory branch")
    processors = [(name, DiTTrajectoryAttnProcessor.from_attention(attn, state, **processor_kwargs))
                  for name, attn in attns]
    if weights is not None:
        load_trajectory_weights(processors, weights)
    for (_, attn), (_, proc) in zip(attns, processors):
        ctx.set_processor(attn, proc)

    def forward(original, *args, **kwargs):
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch, grid, patch = _token_grid(family, model, latents)
        state.begin_tokens(batch, grid, patch, latents.device)
        return original(*args, **kwargs)

    ctx.wrap_forward(model, forward)
    return state
