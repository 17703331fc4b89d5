"""A multi-scale camera encoder for MotionFlow-style conditioning (specs/motionflow.md).

Plücker maps [b f 6 H W] (`lightmotion_fast.plucker_embedding`) go through
- a stem: pixel-unshuffle by `downscale` (image-resolution rays to latent resolution without
  losing them) and a 3×3 convolution to the first level's width;
- per level: a stride-2 convolution (from the second level on), residual conv blocks and, optionally,
  an attention block: across frames per pixel ("temporal", CameraCtrl's choice) or across pixels per
  frame ("spatial", the self-attention MotionFlow puts there instead);
- per level: a linear output projection to camera tokens [(b f) (h w) token_dim], one token per
  feature pixel (or per cell of a `token_grid`×`token_grid` average-pooled grid).

The output projections are zero-initialised: at initialisation every token is zero, so camera
attention (softmax(Q K_camᵀ) V_cam with V_cam = W_v · 0 = 0) adds nothing and the U-Net computes what
it did before. The levels match the U-Net's (level 0 = full latent resolution), so the list the
encoder returns is what `CameraTokenAttnProcessor` takes as per-level `camera_tokens`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _groups(channels: int, groups: int) -> int:
    """The largest group count ≤ `groups` dividing `channels` (GroupNorm needs a divisor)."""
    return next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus the input: [n c h w] -> [n c h w]."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(channels, groups), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(_groups(channels, groups), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AxisAttention(nn.Module):
    """Pre-norm self-attention with a residual along one axis of [b f c h w]: "temporal" attends
    across the f frames at each pixel, "spatial" across the h·w pixels of each frame. Temporal
    attention adds a learned position embedding per frame (frames are otherwise unordered)."""

    def __init__(self, channels: int, heads: int, axis: str, max_frames: int):
        super().__init__()
        if axis not in ("temporal", "spatial"):
            raise ValueError(f"attention must be 'temporal', 'spatial' or None, got {axis!r}")
        self.axis = axis
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.pos = nn.Parameter(torch.zeros(max_frames, channels)) if axis == "temporal" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, c, h, w = x.shape
        if self.axis == "temporal":
            if f > self.pos.shape[0]:
                raise ValueError(f"{f} frames, the encoder was built for at most {self.pos.shape[0]} (max_frames)")
            seq = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, f, c) + self.pos[:f]
        else:
            seq = x.permute(0, 1, 3, 4, 2).reshape(b * f, h * w, c)
        y = self.norm(seq)
        seq = seq + self.attn(y, y, y, need_weights=False)[0]
        if self.axis == "temporal":
            return seq.reshape(b, h, w, f, c).permute(0, 3, 4, 1, 2)
        return seq.reshape(b, f, h, w, c).permute(0, 1, 4, 2, 3)


class CameraEncoder(nn.Module):
    """Plücker maps [b f 6 H W] -> camera tokens per U-Net level, a list of [(b f) n_l token_dims[l]].

    channels: feature width per level (SD1.5: 320, 640, 1280, 1280); token_dims: token width per
    level (default: the channels); downscale: the pixel-unshuffle factor from the Plücker maps'
    resolution to the latent's (8 for image-resolution rays, 1 for rays at latent resolution);
    blocks_per_level: residual blocks per level; attention: "temporal", "spatial" or None;
    token_grid: pool each level's map to token_grid×token_grid tokens (None: one token per pixel).
    """

    def __init__(self, channels: Sequence[int] = (320, 640, 1280, 1280), token_dims: Sequence[int] | None = None,
                 downscale: int = 8, blocks_per_level: int = 1, attention: str | None = "temporal",
                 heads: int = 8, groups: int = 32, token_grid: int | None = None, max_frames: int = 32,
                 in_channels: int = 6):
        super().__init__()
        channels = list(channels)
        self.token_dims = list(token_dims) if token_dims is not None else list(channels)
        if len(self.token_dims) != len(channels):
            raise ValueError(f"token_dims has {len(self.token_dims)} entries, channels {len(channels)}")
        if downscale < 1 or token_grid is not None and token_grid < 1:
            raise ValueError(f"downscale and token_grid must be ≥ 1, got {downscale}, {token_grid}")
        self.in_channels, self.downscale, self.token_grid = in_channels, downscale, token_grid
        self.stem = nn.Sequential(nn.PixelUnshuffle(downscale),
                                  nn.Conv2d(in_channels * downscale ** 2, channels[0], 3, padding=1))
        self.down = nn.ModuleList(
            [nn.Identity()] + [nn.Conv2d(channels[i - 1], channels[i], 3, stride=2, padding=1)
                               for i in range(1, len(channels))])
        self.blocks = nn.ModuleList(nn.Sequential(*[ResBlock(c, groups) for _ in range(blocks_per_level)])
                                    for c in channels)
        self.attention = nn.ModuleList(
            AxisAttention(c, _heads(c, heads), attention, max_frames) if attention else nn.Identity()
            for c in channels)
        self.to_tokens = nn.ModuleList(nn.Linear(c, d) for c, d in zip(channels, self.token_dims))
        for proj in self.to_tokens:  # zero where the encoder joins the U-Net: the model starts unchanged
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, plucker: torch.Tensor) -> list[torch.Tensor]:
        if plucker.ndim != 5 or plucker.shape[2] != self.in_channels:
            raise ValueError(f"plucker must have shape [b, f, {self.in_channels}, H, W], got {tuple(plucker.shape)}")
        b, f, _, height, width = plucker.shape
        if height % self.downscale or width % self.downscale:
            raise ValueError(f"plucker H, W ({height}, {width}) must be multiples of downscale={self.downscale}")
        x = self.stem(plucker.flatten(0, 1).to(self.stem[1].weight.dtype))   # [(b f) c0 h0 w0]
        tokens = []
        for down, blocks, attention, to_tokens in zip(self.down, self.blocks, self.attention, self.to_tokens):
            x = blocks(down(x))
            if not isinstance(attention, nn.Identity):
                x = attention(x.unflatten(0, (b, f))).flatten(0, 1)
            tokens.append(to_tokens(self._grid(x).flatten(2).transpose(1, 2)))  # [(b f) n_l d_l]
        return tokens

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.token_grid is None else nn.functional.adaptive_avg_pool2d(x, self.token_grid)


def _heads(channels: int, heads: int) -> int:
    """The largest head count ≤ `heads` dividing `channels`."""
    return next(h for h in range(min(heads, channels), 0, -1) if channels % h == 0)
