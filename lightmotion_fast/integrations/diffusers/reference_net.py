"""MotionFlow's reference network end to end (specs/motionflow.md, "Reference attention").

An image U-Net (SD1.5's `UNet2DConditionModel`, the "reference motion network") sees the reference
image latent; a video U-Net (AnimateDiff's `UNetMotionModel`) denoises the video. In every spatial
transformer of the video U-Net, self-attention also attends to the reference network's features of
the matching layer (MotionFlow §3.5: m and p concatenated along the width, attention, first half
kept; here queries from m, keys/values from [m; p], through the fused `reference_attention`).

- Writers: forward pre-hooks on the reference U-Net's spatial self-attentions (attn1) that record
  the hidden states entering them (the block's norm1 output, before any projection), into a shared
  `ReferenceBank` keyed by the matching video layer's name. The reference U-Net itself is left as it
  is (no processor replaced), so it computes what it computed before, camera processors included.
- Readers: a `ReferenceAttnProcessor` on each of the video U-Net's spatial self-attentions. They
  project the bank with their own `to_k`/`to_v` (the paper's concatenated feature map goes through
  the video layer's projections), so the bank is the features and not K/V.
- `ReferenceNet(reference_unet, video_unet)(sample, t, text, reference_latents=..., ...)` runs the
  reference U-Net (writers fill the bank), then the video U-Net (readers consume it), and clears the
  bank, also when the video forward raises. `remove()` takes both sides off and restores exactly.
- Inside a pipeline: `with net.attached(reference_latents, image_tokens): pipe(...)` runs the
  reference U-Net before every forward of the video U-Net (each denoising step, at that step's
  timestep) and clears the bank after it.

Layers are paired by module name (SD1.5 and AnimateDiff share them: `down_blocks.0.attentions.0.
transformer_blocks.0.attn1`, ...); a U-Net pair whose spatial self-attentions differ in names or
widths is a ValueError listing the differences. `layer_map` pairs other architectures explicitly.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from lightmotion_fast.integrations.diffusers.ip_adapter import (
    ReferenceBank,
    install_reference_processors,
    release_quiet_per_call_kwargs,
    spatial_attention_modules,
)


def pair_reference_layers(reference_unet: torch.nn.Module, video_unet: torch.nn.Module,
                          layer_map: Mapping[str, str] | None = None) -> dict[str, str]:
    """{video layer name: reference layer name} over the spatial self-attentions (attn1, never a
    temporal module's) of both U-Nets; by equal names unless `layer_map` ({video name: reference
    name}) says otherwise. Raises ValueError when a video layer has no partner, a reference layer
    is left over, or a pair differs in width (query_dim)."""
    ref_layers = dict(spatial_attention_modules(reference_unet, cross=False))
    video_layers = dict(spatial_attention_modules(video_unet, cross=False))
    if not video_layers:
        raise ValueError(f"video_unet ({type(video_unet).__name__}) has no spatial self-attention to read a "
                         "reference from")
    if layer_map is None:
        pairs = {name: name for name in video_layers}
    else:
        pairs = dict(layer_map)
        unknown = sorted(set(pairs) - set(video_layers))
        if unknown:
            raise ValueError(f"layer_map names video layers that are not spatial self-attentions: {unknown}")
    missing = sorted(v for v in video_layers if pairs.get(v) not in ref_layers)
    unused = sorted(set(ref_layers) - set(pairs.values()))
    if missing or unused:
        raise ValueError(
            "reference_unet and video_unet do not match layer for layer: "
            f"video layers without a reference layer: {missing or 'none'}; "
            f"reference layers without a video layer: {unused or 'none'}"
            + ("" if layer_map is not None else " (pass layer_map={video name: reference name} to pair them)"))
    widths = [(v, r, video_layers[v].query_dim, ref_layers[r].query_dim) for v, r in pairs.items()
              if video_layers[v].query_dim != ref_layers[r].query_dim]
    if widths:
        raise ValueError("paired layers differ in width (query_dim): "
                         + "; ".join(f"{v} has {wv}, reference {r} has {wr}" for v, r, wv, wr in widths))
    return pairs


class ReferenceNet(torch.nn.Module):
    """A reference U-Net and a video U-Net run as one model (MotionFlow's reference attention).

    >>> net = ReferenceNet(sd15_unet, animatediff_unet)        # writers + readers installed
    >>> out = net(latents, t, text, reference_latents=ref,     # ref: [b or b·f, 4, h, w]
    ...           reference_encoder_hidden_states=img_tokens).sample
    >>> net.remove()                                           # both U-Nets as they were

    The reference batch r is the video U-Net's attention batch (b·f for AnimateDiff: MotionFlow's
    frame-by-frame reference maps), the number of videos b (every frame of a video attends to its
    reference), or 1. Both U-Nets are submodules: `net.parameters()` trains both (gradients flow
    through the bank into the reference U-Net).
    """

    def __init__(self, reference_unet: torch.nn.Module, video_unet: torch.nn.Module,
                 layer_map: Mapping[str, str] | None = None):
        super().__init__()
        self.pairs = pair_reference_layers(reference_unet, video_unet, layer_map)
        self.reference_unet, self.video_unet = reference_unet, video_unet
        self.bank = ReferenceBank()
        self._writing: dict[str, torch.Tensor] | None = None
        by_name = dict(reference_unet.named_modules())
        self._hooks = [by_name[ref].register_forward_pre_hook(self._writer(video), with_kwargs=True)
                       for video, ref in self.pairs.items()]
        video_modules = dict(video_unet.named_modules())
        self._original_processors = {name: video_modules[name].processor for name in self.pairs}
        self.readers = install_reference_processors(video_unet, self.bank)

    def _writer(self, video_name: str):
        def hook(module, args, kwargs):
            if self._writing is not None:  # outside `capture` the reference U-Net runs unobserved
                hidden = args[0] if args else kwargs["hidden_states"]
                self._writing[video_name] = hidden
        return hook

    def capture(self, reference_latents: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                **reference_kwargs) -> dict[str, torch.Tensor]:
        """Run the reference U-Net once and return the bank it wrote: {video layer name: [r n_p c]}."""
        self._writing = {}
        try:
            self.reference_unet(reference_latents, timestep, encoder_hidden_states, **reference_kwargs)
            bank = self._writing
        finally:
            self._writing = None
        missing = sorted(set(self.pairs) - set(bank))
        if missing:
            raise ValueError(f"the reference U-Net's forward did not reach the paired layers {missing}")
        return bank

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *,
                reference_latents: torch.Tensor, reference_encoder_hidden_states: torch.Tensor,
                reference_timestep=None, reference_cross_attention_kwargs: dict | None = None, **video_kwargs):
        """Reference U-Net on `reference_latents` (at `reference_timestep`, default the video's
        `timestep`; `reference_cross_attention_kwargs`, e.g. camera tokens for its cross-attention),
        then the video U-Net on (sample, timestep, encoder_hidden_states, **video_kwargs) with every
        spatial self-attention reading its layer's bank. Returns the video U-Net's output."""
        self._fill(timestep, reference_latents, reference_encoder_hidden_states, reference_timestep,
                   reference_cross_attention_kwargs)
        try:
            return self.video_unet(sample, timestep, encoder_hidden_states, **video_kwargs)
        finally:
            self.bank.clear()

    def _fill(self, timestep, reference_latents, reference_encoder_hidden_states, reference_timestep,
              reference_cross_attention_kwargs) -> None:
        """Run the reference U-Net (at `reference_timestep`, default the video's) into the bank."""
        if torch.is_grad_enabled() and getattr(self.video_unet, "is_gradient_checkpointing", False):
            # The bank is cleared when the video U-Net returns; checkpointed blocks recompute their forward
            # in the backward pass, where the readers would find it empty (torch's CheckpointError).
            raise NotImplementedError("ReferenceNet does not support gradient checkpointing on the video U-Net: "
                                      "call video_unet.disable_gradient_checkpointing() (the reference U-Net "
                                      "may keep it), or run under torch.no_grad()")
        if not isinstance(reference_latents, torch.Tensor):
            raise TypeError(f"reference_latents must be a tensor [r, c, h, w], got {type(reference_latents).__name__}")
        ref_t = timestep if reference_timestep is None else reference_timestep
        self.bank.features = self.capture(reference_latents, ref_t, reference_encoder_hidden_states,
                                          cross_attention_kwargs=reference_cross_attention_kwargs)

    @contextlib.contextmanager
    def attached(self, reference_latents: torch.Tensor, reference_encoder_hidden_states: torch.Tensor, *,
                 reference_timestep=None,
                 reference_cross_attention_kwargs: dict | None = None) -> Iterator[ReferenceNet]:
        """Inside the block every call of `video_unet` (a pipeline's denoising loop calls it once per
        step) first runs the reference U-Net at the same timestep, and clears the bank after it,
        also when it raises. Give the reference inputs at the batch the video U-Net sees: with
        classifier-free guidance the pipeline doubles it, so pass e.g. `torch.cat([ref, ref])`.

        >>> with net.attached(ref_latents, image_tokens):
        ...     frames = pipe(prompt, num_frames=16).frames
        """
        def before(module, args, kwargs):
            if self.bank.active:  # a call of `self(...)` inside the block: its own inputs filled the bank
                return
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            self._fill(timestep, reference_latents, reference_encoder_hidden_states, reference_timestep,
                       reference_cross_attention_kwargs)

        def after(module, args, kwargs, output):
            self.bank.clear()

        handles = [self.video_unet.register_forward_pre_hook(before, with_kwargs=True),
                   self.video_unet.register_forward_hook(after, with_kwargs=True, always_call=True)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.bank.clear()

    def remove(self) -> None:
        """Take the writers and readers off: both U-Nets compute exactly what they did before."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        modules = dict(self.video_unet.named_modules())
        for name, proc in self._original_processors.items():
            modules[name].set_processor(proc)
        self._original_processors = {}
        self.readers = {}
        release_quiet_per_call_kwargs(self.video_unet)


__all__ = ["ReferenceNet", "pair_reference_layers"]
