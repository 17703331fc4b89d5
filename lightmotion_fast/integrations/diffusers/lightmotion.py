"""LightMotion sampler: tuning-free camera motion inside AnimateDiff and SVD pipelines
(specs/lightmotion.md, "Sampler and pipelines").

    lightmotion_fast.patch(pipe, camera=CameraMotion(pan=(0.25, 0), zoom=0.16))
    frames = pipe(...).frames           # the same call as before
    lightmotion_fast.unpatch(pipe)      # the original scheduler and attention processors, exactly

What the patch does (only when `camera` is given; camera=None installs nothing):
- wraps `pipe.scheduler` in a `LightMotionScheduler` that defers to the original scheduler except:
  at the edit step it permutes + resamples the latent (`latent_resample`, one gather with a fill map
  built once per call), then runs the correction: `stochastic` (default) replaces the scheduler
  step by the fused `snr_reinject` step with η for `correction_steps` steps, optionally only on the
  exposed region; `renoise` jumps the latent back `correction_steps` levels and rewinds the
  schedule (the pipeline then runs that many extra UNet steps; `timesteps` already lists them);
- AnimateDiff: gives every text cross-attention (attn2 of the spatial transformer blocks) a
  capturing processor that, during the steps up to the edit, records the subject tokens' attention
  probabilities next to the unchanged output of the original processor; at the edit they are
  averaged over heads, layers and steps, resized to the latent size and thresholded per frame
  (foreground: above mean + `mask_threshold`·std); background = the rest. A user `mask` overrides it.
- SVD: its cross-attention sees a single image token, so there is nothing to capture: the
  background mask is the user's `mask`, or everything is background.

Options (patch keywords):
  camera             CameraMotion, required for this feature
  edit_step          steps done before the edit: int, or a fraction of the steps (default 0.2)
  correction         "stochastic" (default), "renoise", or None/"off"
  correction_steps   window length: int, or a fraction of the steps (default 0.1), at least 1
  eta                correction strength η (default 1.0)
  correction_region  "all" (default) or "exposed" (noise only where the edit exposed pixels)
  mask               user background mask [f, h, w] bool (True: background) at latent size
  subject_tokens     token indices whose cross-attention marks the subject (default: every
                     non-padding token of the prompt except the start token; with prompt_embeds
                     only: every token but the first)
  mask_threshold     std multiplier of the per-frame threshold (default 0.5)
  motion_seed        seed of the fill draws and of the correction noise (default 0)

The reference sampler is the same code with every op on its PyTorch reference
(LIGHTMOTION_BACKEND=reference or `with lightmotion_fast.backend("reference")`): fill map from the
Python builder, gather by advanced indexing, correction with the NumPy Philox noise. Both give the
same video from the same seed.

Schedulers: DDIMScheduler (ᾱ-parametrised correction; clip_sample / thresholding run the
scheduler's own step with the same noise) and EulerDiscreteScheduler (σ-parametrised, s_churn = 0,
as SVD uses it). The edit alone works with any scheduler.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lightmotion_fast.camera.motion import CameraMotion
from lightmotion_fast.integrations.diffusers.registry import Feature, PatchContext, register_feature
from lightmotion_fast.ops.latent_resample import build_fill_map, latent_resample
from lightmotion_fast.ops.snr_reinject import (
    ddim_coefficients,
    euler_coefficients,
    renoise_coefficients,
    renoise_sigma_coefficients,
    snr_noise,
    snr_reinject,
)
from lightmotion_fast.reference.latent_permute import source_positions

OPTIONS = ("camera", "edit_step", "correction", "correction_steps", "eta", "correction_region", "mask",
           "subject_tokens", "mask_threshold", "motion_seed")
CORRECTIONS = ("stochastic", "renoise", None)


@dataclass
class LightMotionConfig:
    camera: CameraMotion
    edit_step: float | int = 0.2
    correction: str | None = "stochastic"
    correction_steps: float | int = 0.1
    eta: float = 1.0
    correction_region: str = "all"
    mask: torch.Tensor | None = None
    subject_tokens: tuple[int, ...] | None = None
    mask_threshold: float = 0.5
    motion_seed: int = 0

    def __post_init__(self):
        if not isinstance(self.camera, CameraMotion):
            raise TypeError(f"camera must be a lightmotion_fast.CameraMotion, got {type(self.camera).__name__}")
        if self.correction == "off":
            self.correction = None
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be 'stochastic', 'renoise' or None, got {self.correction!r}")
        if self.correction_region not in ("all", "exposed"):
            raise ValueError(f"correction_region must be 'all' or 'exposed', got {self.correction_region!r}")
        for name in ("edit_step", "correction_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    isinstance(value, float) and value > 1):
                raise ValueError(f"{name} must be an int number of steps or a fraction in [0, 1], got {value!r}")
        for name in ("eta", "mask_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.mask is not None:
            if not isinstance(self.mask, torch.Tensor) or self.mask.ndim != 3 or self.mask.dtype != torch.bool:
                raise ValueError("mask must be a bool tensor [f, h, w] at latent size (True: background), got "
                                 f"{getattr(self.mask, 'shape', type(self.mask).__name__)}")
        if self.subject_tokens is not None:
            self.subject_tokens = tuple(int(i) for i in self.subject_tokens)
        if isinstance(self.motion_seed, bool) or not isinstance(self.motion_seed, int) or not 0 <= self.motion_seed < 2**62:
            raise ValueError(f"motion_seed must be an int in [0, 2**62), got {self.motion_seed!r}")

    def steps(self, value, total: int) -> int:
        return int(value) if isinstance(value, int) else int(round(value * total))


@dataclass
class SamplerState:
    """What one pipeline call of a patched pipeline knows; `record` is kept for inspection and tests."""

    capturing: bool = False
    maps: dict = field(default_factory=dict)     # hw -> [sum of (B, hw) maps, count]
    prompt_tokens: int | None = None              # non-padding tokens of the last prompt, if known
    record: dict = field(default_factory=dict)

    def reset(self):
        self.maps.clear()
        self.record = {}


class _CrossAttentionCapture:
    """Runs the original processor (the output is exactly the original's) and, while capturing,
    records the subject tokens' attention probabilities, averaged over heads."""

    def __init__(self, original, state: SamplerState, subject_tokens):
        self.original = original
        self.state = state
        self.subject_tokens = subject_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if self.state.capturing and encoder_hidden_states is not None and hidden_states.ndim == 3:
            with torch.no_grad():
                self._record(attn, hidden_states, encoder_hidden_states)
        return out

    def _record(self, attn, hidden_states, context):
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states)).float()
        k = attn.head_to_batch_dim(attn.to_k(context)).float()
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)       # (B·heads, hw, tokens)
        probs = probs.reshape(hidden_states.shape[0], attn.heads, *probs.shape[1:]).mean(1)
        tokens = self.subject_tokens or self._default_tokens(probs.shape[-1])
        tokens = [t for t in tokens if 0 <= t < probs.shape[-1]] or list(range(probs.shape[-1]))
        subject = probs[..., tokens].mean(-1)                                  # (B, hw)
        entry = self.state.maps.setdefault(subject.shape[1], [torch.zeros_like(subject), 0])
        if entry[0].shape == subject.shape:
            entry[0] += subject
            entry[1] += 1

    def _default_tokens(self, n_tokens: int):
        count = self.state.prompt_tokens
        end = min(count, n_tokens) if count else n_tokens
        return list(range(1, end)) if end > 1 else [0]


def capture_to_mask(maps: dict, batch: int, frames: int, height: int, width: int,
                    threshold: float = 0.5) -> torch.Tensor | None:
    """Average captured (B, hw) maps into [f, h, w] and threshold per frame: True = background.

    B = groups · batch · frames (classifier-free guidance stacks [uncond, cond]): the last
    batch · frames rows (the conditional half) are used, averaged over the batch."""
    total, weight = None, 0
    for hw, (acc, count) in maps.items():
        size = None
        for k in range(8):  # down-sampling by 2^k rounds up in the U-Net
            h, w = -(-height // 2**k), -(-width // 2**k)
            if h * w == hw:
                size = (h, w)
                break
        if size is None or acc.shape[0] % (batch * frames):
            continue
        cond = acc[-batch * frames:] / count
        up = F.interpolate(cond.reshape(batch * frames, 1, *size), size=(height, width), mode="bilinear",
                           align_corners=False)[:, 0]
        up = up.reshape(batch, frames, height, width).mean(0)
        total = up * count if total is None else total + up * count
        weight += count
    if total is None:
        return None
    avg = (total / weight).float()
    flat = avg.reshape(frames, -1)
    cut = flat.mean(1) + threshold * flat.std(1, unbiased=False)
    foreground = avg > cut[:, None, None]
    return (~foreground).cpu()


class LightMotionScheduler:
    """Wraps a diffusers scheduler; everything but `timesteps`, `set_timesteps` and `step` is the
    original's. See the module docstring for what `step` adds."""

    def __init__(self, inner, config: LightMotionConfig, layout: str, state: SamplerState):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "lm_config", config)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "plan", None)
        object.__setattr__(self, "position", 0)
        object.__setattr__(self, "_inner_step_params", set(inspect.signature(inner.step).parameters))
        name = type(inner).__name__
        kind = "euler" if "EulerDiscrete" in name else ("ddim" if name.startswith("DDIM") else None)
        if config.correction is not None and kind is None:
            raise ValueError(f"LightMotion's correction supports DDIMScheduler (AnimateDiff) and "
                             f"EulerDiscreteScheduler (SVD), got {name}; use correction=None for the edit alone")
        object.__setattr__(self, "kind", kind)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)

    # -- schedule --------------------------------------------------------------------------------
    def set_timesteps(self, *args, **kwargs):
        out = self.inner.set_timesteps(*args, **kwargs)
        cfg = self.lm_config
        n = len(self.inner.timesteps)
        edit = min(max(cfg.steps(cfg.edit_step, n), 1), max(n - 1, 1))
        window = max(cfg.steps(cfg.correction_steps, n), 1) if cfg.correction else 0
        if cfg.correction == "renoise":
            window = min(window, edit)
            plan = list(range(edit)) + list(range(edit - window, n))
        else:
            plan = list(range(n))
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "edit", edit)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "position", 0)
        self.state.reset()
        self.state.capturing = True
        return out

    @property
    def timesteps(self):
        ts = self.inner.timesteps
        if self.plan is None or len(self.plan) == len(ts):
            return ts
        return ts[torch.as_tensor(self.plan, device=ts.device)]

    # -- the step --------------------------------------------------------------------------------
    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None, return_dict: bool = True,
             **kwargs):
        if self.plan is None:
            raise RuntimeError("LightMotionScheduler.step called before set_timesteps")
        cfg = self.lm_config
        j = self.position
        index = self.plan[j] if j < len(self.plan) else self.plan[-1]
        first_pass = j < self.edit
        corrected = (cfg.correction == "stochastic" and not first_pass and self.edit <= index < self.edit + self.window)
        if corrected:
            prev = self._stochastic_step(model_output, timestep, sample, index, offset=j * sample.numel())
        else:
            if "eta" in self._inner_step_params:
                kwargs["eta"] = eta
            if "generator" in self._inner_step_params:
                kwargs["generator"] = generator
            prev = self.inner.step(model_output, timestep, sample, return_dict=False, **kwargs)[0]
        if j == self.edit - 1:
            prev = self._edit(prev, index, offset=j * sample.numel())
        object.__setattr__(self, "position", j + 1)
        return _Output(prev) if return_dict else (prev,)

    def _level(self, index: int, sample):
        """(ᾱ_t, ᾱ_prev) of DDIM step `index`, or (σ, σ_next) of Euler step `index`."""
        inner = self.inner
        if self.kind == "euler":
            return float(inner.sigmas[index]), float(inner.sigmas[index + 1])
        t = int(inner.timesteps[index])
        prev_t = t - inner.config.num_train_timesteps // inner.num_inference_steps
        a_t = float(inner.alphas_cumprod[t])
        a_prev = float(inner.alphas_cumprod[prev_t]) if prev_t >= 0 else float(inner.final_alpha_cumprod)
        return a_t, a_prev

    def _region(self, sample):
        if self.lm_config.correction_region != "exposed":
            return None
        return self.state.record["exposed"].to(sample.device)

    def _stochastic_step(self, model_output, timestep, sample, index, offset):
        cfg, inner = self.lm_config, self.inner
        seed = cfg.motion_seed
        level = self._level(index, sample)
        prediction = inner.config.prediction_type
        if self.kind == "euler":
            coeffs = euler_coefficients(level[0], level[1], cfg.eta, prediction)
            out = snr_reinject(sample, model_output.to(sample.dtype), coeffs, seed, offset, self._region(sample), self.layout)
            inner._step_index = (inner.step_index or 0) + 1
            return out.to(model_output.dtype)
        if getattr(inner.config, "clip_sample", False) or getattr(inner.config, "thresholding", False):
            # x̂0 is clipped: not an affine map any more; the scheduler's own step with the same noise
            noise = snr_noise(sample, seed, offset).to(sample.dtype)
            out = inner.step(model_output, timestep, sample, eta=cfg.eta, variance_noise=noise, return_dict=False)[0]
            if self._region(sample) is not None:
                plain = inner.step(model_output, timestep, sample, eta=0.0, return_dict=False)[0]
                out = torch.where(self._expand(self._region(sample)), out, plain)
            return out
        coeffs = ddim_coefficients(level[0], level[1], cfg.eta, prediction)
        return snr_reinject(sample, model_output.to(sample.dtype), coeffs, seed, offset, self._region(sample), self.layout)

    def _expand(self, region):
        return region[None, None] if self.layout == "b c f h w" else region[None, :, None]

    def _edit(self, latents, index, offset):
        cfg, state = self.lm_config, self.state
        state.capturing = False
        frames_dim = 2 if self.layout == "b c f h w" else 1
        frames, height, width = latents.shape[frames_dim], latents.shape[3], latents.shape[4]
        background = cfg.mask
        source = "user"
        if background is None:
            background = capture_to_mask(state.maps, latents.shape[0], frames, height, width, cfg.mask_threshold)
            source = "cross-attention"
        if background is None:
            background = torch.ones(frames, height, width, dtype=torch.bool)
            source = "all background"
        if tuple(background.shape) != (frames, height, width):
            raise ValueError(f"mask must have shape [{frames}, {height}, {width}] (latent frames, height, width), "
                             f"got {tuple(background.shape)}")
        fill = build_fill_map(cfg.camera, frames, height, width, background.cpu(), seed=cfg.motion_seed,
                              device=latents.device)
        _, _, kept = source_positions(cfg.camera.inverse_affines(frames, height, width), height, width)
        edited = latent_resample(latents, fill, self.layout)
        state.record.update(pre_edit=latents, post_edit=edited, fill_map=fill, background=background,
                            background_source=source, exposed=~kept, edit_index=index)
        state.maps.clear()
        if cfg.correction == "renoise" and self.window > 0:
            edited = self._renoise(edited, index, offset)
        return edited

    def _renoise(self, latents, index, offset):
        """Jump from the level after step `index` back to the level before step index+1-window."""
        inner, cfg = self.inner, self.lm_config
        target = index + 1 - self.window
        if self.kind == "euler":
            coeffs = renoise_sigma_coefficients(float(inner.sigmas[index + 1]), float(inner.sigmas[target]))
            inner._step_index = target
        else:
            a_from = self._level(index, latents)[1]
            a_to = float(inner.alphas_cumprod[int(inner.timesteps[target])])
            coeffs = renoise_coefficients(a_from, a_to)
        out = snr_reinject(latents, None, coeffs, cfg.motion_seed, offset, None, self.layout)
        self.state.record.update(renoised=out, rewind_to=target)
        return out


class _Output:
    """The part of a scheduler output the pipelines read."""

    def __init__(self, prev_sample):
        self.prev_sample = prev_sample

    def __getitem__(self, i):
        return (self.prev_sample,)[i]


def sampler_state(pipe) -> SamplerState | None:
    """The LightMotion state of a patched pipeline (its `record` holds the last call's edit)."""
    scheduler = getattr(pipe, "scheduler", None)
    return scheduler.state if isinstance(scheduler, LightMotionScheduler) else None


def _install(ctx: PatchContext) -> None:
    opts = ctx.options
    if opts.get("camera") is None:
        return
    config = LightMotionConfig(**{k: opts[k] for k in OPTIONS if k in opts and (opts[k] is not None or k == "correction")})
    pipe = ctx.pipe
    if getattr(pipe, "scheduler", None) is None:
        raise ValueError(f"LightMotion needs a pipeline with a scheduler (AnimateDiffPipeline, "
                         f"StableVideoDiffusionPipeline), got {type(pipe).__name__}")
    state = SamplerState()
    layout = ctx.adapter.latent_layout
    wrapper = LightMotionScheduler(pipe.scheduler, config, layout, state)
    if ctx.adapter.name == "animatediff" and config.mask is None:
        for module in ctx.model.modules():
            if getattr(module, "is_cross_attention", False) and hasattr(module, "processor"):
                ctx.set_processor(module, _CrossAttentionCapture(module.processor, state, config.subject_tokens))
        encode = getattr(pipe, "encode_prompt", None)
        tokenizer = getattr(pipe, "tokenizer", None)
        if encode is not None and tokenizer is not None:
            def encode_prompt(prompt, *args, **kwargs):
                if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
                    first = prompt if isinstance(prompt, str) else prompt[0]
                    state.prompt_tokens = len(tokenizer(first, truncation=True).input_ids) - 1  # without the end token
                return encode(prompt, *args, **kwargs)

            ctx.set_attr(pipe, "encode_prompt", encode_prompt)
    ctx.set_attr(pipe, "scheduler", wrapper)


register_feature(Feature(name="lightmotion", install=_install, options=OPTIONS, families=("animatediff", "svd")))
