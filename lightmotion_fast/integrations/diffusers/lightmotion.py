"""LightMotion sampler: tuning-free camera motion inside AnimateDiff, SVD, CogVideoX and Wan pipelines
(specs/lightmotion.md, "Sampler and pipelines").

    lightmotion_fast.patch(pipe, camera=CameraMotion(pan=(0.25, 0), zoom=0.16))
    frames = pipe(...).frames           # the same call as before
    lightmotion_fast.unpatch(pipe)      # the original scheduler and attention processors, exactly

What the patch does (only when `camera` is given; camera=None installs nothing):
- gives the pipeline's own scheduler object a `LightMotionSampler` (instance attributes
  `set_timesteps`, `scale_model_input`, `step`; `pipe.scheduler` stays the same diffusers object, so
  save_pretrained and from_pipe see a plain scheduler). It runs the paper's timeline (the framework
  figure: Z_T -> Z_T0 -> edit -> ordinary denoising to Z_T1 -> noise re-introduced to Z*_T2 ->
  denoising to the end):
    T0 `edit_step`      after T0 steps, permute + resample the latent (`latent_resample`, one gather
                        with a fill map built once per call);
    T1 `denoise_until`  ordinary scheduler steps T0 .. T1-1;
    T2 `renoise_to`     the closed-form jump x_T1 -> x_T2 = √(ᾱ_T2/ᾱ_T1)·x_T1 + √(1-ᾱ_T2/ᾱ_T1)·ε
                        (each scheduler's own form: lightmotion_schedulers.py) with fresh noise
                        (`snr_reinject` without a model output),
                        then steps T2 .. end: the pipeline runs T1 - T2 extra UNet steps, which
                        `timesteps` lists right after set_timesteps.
  Each is an int number of steps run before that point, or a fraction of the run. Defaults 0.2,
  0.4, 0.3: the figure fixes the order of the events, not the values (README, "LightMotion").
  Other corrections: `renoise_immediate` (T1 = T0, T2 = T0 - `correction_steps`), `stochastic`
  (the `correction_steps` steps after the edit become fused η-steps, optionally only on the exposed
  region), None. Steps count from where the pipeline starts (video-to-video with strength < 1
  starts part-way, which the re-noise corrections refuse); coefficients come from the timestep the
  pipeline passes.
- Per model family (FAMILIES: a `LatentVideo` each; the latent layout is the adapter's): gives every
  text-attention site (AnimateDiff: attn2 of the spatial transformer blocks; CogVideoX: the text part
  of the joint attn1; Wan: the cross-attention attn2, conditional calls only) a capturing processor that, during the steps up to the edit, records the subject tokens' attention
  probabilities next to the unchanged output of the original processor; at the edit they are
  averaged over heads, layers and steps, resized to the latent size and thresholded per frame
  (foreground: above mean + `mask_threshold`·std); background = the rest. The subject tokens are
  `subject_tokens`, else the `subject` words found in each call's prompt through pipe.tokenizer
  (`subject_token_positions`), else every prompt token. A user `mask` overrides it.
- CogVideoX and Wan: a latent frame encodes 4 video frames (the first alone): the camera is read at
  the latent frames' video times (`LatentFrameCamera`: each latent frame takes the mean fraction of
  the video frames it covers).
- SVD: its cross-attention sees a single image token, so there is nothing to capture: the
  background mask is the user's `mask`, or everything is background.

Options: OPTION_DOCS below (shown by help(lightmotion_fast.patch)). A user `mask` is checked for
dtype and rank at patch time and for its [f, h, w] against the call's latent before the first UNet
step; other LightMotion options without `camera` are an error.

The reference sampler is the same code with every op on its PyTorch reference
(LIGHTMOTION_BACKEND=reference or `with lightmotion_fast.backend("reference")`): fill map from the
Python builder, gather by advanced indexing, correction with the NumPy Philox noise. Both give the
same video from the same seed.

Schedulers (lightmotion_schedulers.py, a table of kinds): DDIM, Euler, Euler ancestral, DPM-Solver++
(multistep), UniPC, LCM and flow-matching Euler. Every ordinary step is the scheduler's own (its generator
included); the kind supplies the noise levels, x̂0, the re-noise jump and the multistep history: the edit's
gather is applied to the history too, and the jump and the η-steps restart it at first order. DDIM with
clip_sample / thresholding runs its own step with the correction noise. The edit alone (correction=None)
works with any scheduler; the correction on another is a ValueError at patch time naming the supported ones.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lightmotion_fast.camera.motion import CameraMotion
from lightmotion_fast.integrations.diffusers.lightmotion_schedulers import (
    eta_step_coefficients,
    jump_coefficients,
    scheduler_kind,
)
from lightmotion_fast.integrations.diffusers.registry import (
    ADAPTERS,
    Feature,
    Option,
    PatchContext,
    patch_state,
    register_feature,
)
from lightmotion_fast.ops.latent_resample import build_fill_map, latent_resample
from lightmotion_fast.ops.snr_reinject import snr_noise, snr_reinject
from lightmotion_fast.reference.latent_permute import source_positions
from lightmotion_fast.reference.snr_reinject import StepCoefficients

OPTION_DOCS = (
    Option("camera", "CameraMotion", "None", "the camera motion; without it this feature installs nothing"),
    Option("edit_step", "int | float", "0.2", "T0, the edit: steps run before the edit, an int or a fraction of "
           "the steps the call runs (rounded, at least 1); an int past the schedule is an error"),
    Option("correction", "'renoise' | 'renoise_immediate' | 'stochastic' | None", "'renoise'",
           "the correction after the edit: 'renoise' is the paper's (denoise T0 -> T1, re-noise to T2, denoise "
           "to the end); 'renoise_immediate' re-noises right at the edit, `correction_steps` levels back; "
           "'stochastic' runs η-steps for `correction_steps` steps after the edit"),
    Option("denoise_until", "int | float", "0.4", "T1 ('renoise'): steps run before the re-noise (ordinary "
           "denoising from T0 to T1), an int or a fraction of the run; must be after edit_step"),
    Option("renoise_to", "int | float", "0.3", "T2 ('renoise'): the level re-noised to, as the number of steps "
           "before it (an int or a fraction of the run): noisier than T1 (< denoise_until), >= 0 (the start); "
           "the pipeline runs T1 - T2 extra UNet steps"),
    Option("correction_steps", "int | float", "0.1", "window of 'stochastic' and 'renoise_immediate': an int or a "
           "fraction of the steps, >= 1"),
    Option("eta", "float", "1.0", "correction strength η >= 0 ('stochastic')"),
    Option("correction_region", "'all' | 'exposed'", "'all'", "where the stochastic correction adds noise"),
    Option("mask", "bool Tensor [f, h, w]", "None", "background mask at latent size (True: background); "
           "default: captured from the subject tokens' text attention (AnimateDiff, CogVideoX, Wan) or all background (SVD)"),
    Option("subject", "str | Sequence[str]", "None", "the subject as word(s) of the prompt (AnimateDiff, CogVideoX, Wan): "
           "resolved at call time through pipe.tokenizer to every token position of each word (sub-word pieces "
           "included, case-insensitive); subject_tokens or mask win over it"),
    Option("subject_tokens", "Sequence[int]", "None", "token positions in the prompt that mark the subject "
           "(default: `subject`'s tokens, else every prompt token but the start token)"),
    Option("mask_threshold", "float", "0.5", "std multiplier of the per-frame foreground threshold"),
    Option("motion_seed", "int", "0", "seed of the fill draws and the correction noise, in [0, 2**62)"),
)
OPTIONS = tuple(o.name for o in OPTION_DOCS)
CORRECTIONS = ("renoise", "renoise_immediate", "stochastic", None)
RENOISE = ("renoise", "renoise_immediate")


@dataclass
class LightMotionConfig:
    camera: CameraMotion
    edit_step: float | int = 0.2
    correction: str | None = "renoise"
    denoise_until: float | int = 0.4
    renoise_to: float | int = 0.3
    correction_steps: float | int = 0.1
    eta: float = 1.0
    correction_region: str = "all"
    mask: torch.Tensor | None = None
    subject: tuple[str, ...] | None = None
    subject_tokens: tuple[int, ...] | None = None
    mask_threshold: float = 0.5
    motion_seed: int = 0

    def __post_init__(self):
        if not isinstance(self.camera, CameraMotion):
            raise TypeError(f"camera must be a lightmotion_fast.CameraMotion, got {type(self.camera).__name__}")
        if self.correction == "off":
            self.correction = None
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {list(CORRECTIONS)}, got {self.correction!r}")
        if self.correction_region not in ("all", "exposed"):
            raise ValueError(f"correction_region must be 'all' or 'exposed', got {self.correction_region!r}")
        for name in ("edit_step", "denoise_until", "renoise_to", "correction_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    isinstance(value, float) and value > 1):
                raise ValueError(f"{name} must be an int number of steps or a fraction in [0, 1], got {value!r}")
        for name in ("eta", "mask_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self._check_order()
        if self.mask is not None:
            if not isinstance(self.mask, torch.Tensor) or self.mask.ndim != 3 or self.mask.dtype != torch.bool:
                raise ValueError("mask must be a bool tensor [f, h, w] at latent size (True: background), got "
                                 f"{getattr(self.mask, 'shape', type(self.mask).__name__)}")
        if self.subject is not None:
            self.subject = _subject_words(self.subject)
        if self.subject_tokens is not None:
            self.subject_tokens = _token_positions(self.subject_tokens)
        if isinstance(self.motion_seed, bool) or not isinstance(self.motion_seed, int) or not 0 <= self.motion_seed < 2**62:
            raise ValueError(f"motion_seed must be an int in [0, 2**62), got {self.motion_seed!r}")

    def _check_order(self) -> None:
        """T0 < T1 and T2 < T1 where both sides are given in the same unit (steps or fractions); mixed units
        are checked when the call's number of steps is known."""
        pairs = (("edit_step", "denoise_until", "denoise_until (T1) must come after edit_step (T0)"),
                 ("renoise_to", "denoise_until", "renoise_to (T2) must be a noisier level than denoise_until (T1), "
                                                 "i.e. fewer steps"))
        for early, late, what in pairs:
            a, b = getattr(self, early), getattr(self, late)
            if type(a) is type(b) and a >= b:
                raise ValueError(f"{what}: got {early}={a!r}, {late}={b!r}")

    def steps(self, value, total: int) -> int:
        return int(value) if isinstance(value, int) else int(round(value * total))


def _subject_words(subject) -> tuple[str, ...]:
    """subject as a tuple of non-empty words."""
    words = (subject,) if isinstance(subject, str) else subject
    if not hasattr(words, "__iter__") or isinstance(words, bytes):
        raise TypeError(f"subject must be a word or a sequence of words (str), got {subject!r}")
    words = tuple(words)
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"subject must be a non-empty word or a non-empty sequence of non-empty words, got {subject!r}")
    return tuple(w.strip() for w in words)


def subject_token_positions(tokenizer, prompt: str, subject) -> tuple[int, ...]:
    """Token positions of the subject word(s) in the prompt, as the pipeline's text encoder sees them.

    Each word is tokenized alone (no special tokens; as written, lower case, capitalised and upper case,
    each with and without a leading space, so case and BPE word-start markers do not matter) and every
    occurrence of its piece sequence in the prompt's token ids is taken: a word split into sub-word
    pieces gives all its pieces. A word not found is a ValueError naming it and the prompt's tokens."""
    ids = list(tokenizer(prompt, truncation=True).input_ids)
    positions = set()
    for word in _subject_words(subject):
        found = set()
        for variant in {word, word.lower(), word.capitalize(), word.upper()}:
            for text in (variant, " " + variant):
                pieces = list(tokenizer(text, add_special_tokens=False).input_ids)
                n = len(pieces)
                if n == 0:
                    continue
                found.update(p for i in range(len(ids) - n + 1) if ids[i:i + n] == pieces
                             for p in range(i, i + n))
        if not found:
            raise ValueError(f"subject word {word!r} is not in the prompt {prompt!r}; its tokens are "
                             f"{tokenizer.convert_ids_to_tokens(ids)}")
        positions |= found
    return tuple(sorted(positions))


def _token_positions(tokens) -> tuple[int, ...]:
    """subject_tokens as a tuple of non-negative ints (numpy integers and 0-d tensors included)."""
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"subject_tokens must be a sequence of token positions (ints), got {tokens!r}")
    out = []
    for t in tokens:
        if isinstance(t, (str, bytes)):
            raise TypeError(f"subject_tokens must hold token positions (ints), got the word {t!r}; give words "
                            f"as subject={t!r}")
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise TypeError(f"subject_tokens must hold token positions (ints), got {t!r}")
        out.append(operator.index(t))
    if not out or min(out) < 0:
        raise ValueError(f"subject_tokens must be a non-empty sequence of token positions >= 0, got {out}")
    return tuple(out)


class _Lazy:
    """A record entry computed when first read, then kept (the un-noised edit, which the fused edit +
    re-noise launch never materialises)."""

    def __init__(self, make):
        self._make, self._value = make, None

    def value(self):
        if self._value is None:
            self._value = self._make()
        return self._value


class _Record(dict):
    """SamplerState.record: a dict whose _Lazy entries are computed on first read."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        return value.value() if isinstance(value, _Lazy) else value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return [self[key] for key in self]

    def items(self):
        return [(key, self[key]) for key in self]

    def raw(self, key):
        """The entry as stored (a _Lazy stays unevaluated): to share it under another name."""
        return super().__getitem__(key)


@dataclass
class SamplerState:
    """What one pipeline call of a patched pipeline knows; `record` is kept for inspection and tests."""

    capturing: bool = False
    maps: dict = field(default_factory=dict)      # hw or TokenGrid -> [sum of (rows, tokens) maps, count]
    prompt_positions: tuple | None = None         # the last prompt's own tokens (no start/end/padding), if known
    subject_positions: tuple | None = None        # `subject` resolved in the last prompt
    prompt_embeds: torch.Tensor | None = None     # the conditional text encode_prompt returned last
    conditional: bool = True                      # False during a model call on the negative prompt (Wan)
    record: dict = field(default_factory=_Record)

    def reset(self):
        self.maps.clear()
        self.record = _Record()


# -- model families: their text attention and their latent frames ------------------------------------------

@dataclass(frozen=True)
class TokenGrid:
    """Key of a DiT's captured maps: rows of `tokens` video tokens, each token a patch of `patch` =
    (pt, ph, pw) latent pixels, in (f h w) order (CogVideoX's and Wan's patch embeddings)."""

    tokens: int
    patch: tuple[int, int, int]

    def size(self, frames: int, height: int, width: int) -> tuple[int, int, int] | None:
        """(f', h', w') of a latent [frames, height, width], or None when it does not give `tokens`."""
        pt, ph, pw = self.patch
        grid = (-(-frames // pt), height // ph, width // pw)
        return grid if math.prod(grid) == self.tokens else None


@dataclass(frozen=True)
class TextAttention:
    """Where a model family's video tokens attend to the prompt (the subject mask's source).

    sites(model): the attention modules whose processors capture.
    query_key(attn, hidden_states, context, kwargs) -> (q [B, heads, N, d], k [B, heads, T, d], scale):
        video queries and text keys as the family's own processor makes them; the map is
        softmax(q·kᵀ·scale) over the T text tokens.
    patch(model): None for a U-Net (rows are batch·frames, N a level's h·w), else the DiT's
        (pt, ph, pw): rows are the batch, N the (f h w) patches of the latent.
    first_token: the first prompt token when no tokenizer says (1: CLIP's start token).
    separate_cfg_calls: the negative prompt runs as its own model call (Wan); only the calls whose
        text is the prompt's own are captured."""

    sites: Callable
    query_key: Callable
    patch: Callable | None = None
    first_token: int = 0
    separate_cfg_calls: bool = False


@dataclass(frozen=True)
class LatentVideo:
    """What LightMotion needs of a model family besides its adapter's `latent_layout`."""

    text: TextAttention | None = None     # None: no text attention (SVD): the user's mask, or all background
    temporal_compression: int = 1         # video frames per latent frame, the first alone; the pipeline's
                                          # `vae_scale_factor_temporal` wins where it has one
    extra_denoisers: tuple[str, ...] = ()  # pipeline attributes with a second denoiser (Wan 2.2's transformer_2)


def _unet_cross_attention_sites(model):
    return [m for m in model.modules() if getattr(m, "is_cross_attention", False) and hasattr(m, "processor")]


def _unet_query_key(attn, hidden_states, context, kwargs):
    """The U-Net's text cross-attention (attn2): rows are (b f), tokens a level's h·w."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    rows = hidden_states.shape[0]
    q = attn.head_to_batch_dim(attn.to_q(hidden_states)).float().unflatten(0, (rows, attn.heads))
    k = attn.head_to_batch_dim(attn.to_k(context)).float().unflatten(0, (rows, attn.heads))
    return q, k, attn.scale


def _heads(attn, x):
    """[B, S, heads·d] -> [B, heads, S, d]"""
    return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)


def _cogvideox_sites(model):
    return [block.attn1 for block in model.transformer_blocks]


def _cogvideox_query_key(attn, hidden_states, context, kwargs):
    """CogVideoX's attn1 attends jointly over [text; video]. Its text part for the video queries: the
    video queries (with the RoPE CogVideoXAttnProcessor2_0 gives them) against the text keys (no RoPE),
    renormalised over the text tokens so that it reads like a cross-attention map."""
    q, k = _heads(attn, attn.to_q(hidden_states)), _heads(attn, attn.to_k(context))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    rope = kwargs.get("image_rotary_emb")
    if rope is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        q = apply_rotary_emb(q, rope)
    return q.float(), k.float(), q.shape[-1] ** -0.5


def _cogvideox_patch(model):
    return (model.config.patch_size_t or 1, model.config.patch_size, model.config.patch_size)


WAN_TEXT_TOKENS = 512   # WanAttnProcessor: with image tokens first (Wan 2.1 I2V), the last 512 are the text


def _wan_sites(model):
    return [block.attn2 for block in model.blocks]


def _wan_query_key(attn, hidden_states, context, kwargs):
    """Wan's attn2 is cross-attention to the text (and, in Wan 2.1 I2V, a separate attention to the
    image tokens placed before the text, which is left out)."""
    if attn.add_k_proj is not None:
        context = context[:, context.shape[1] - WAN_TEXT_TOKENS:]
    q = _heads(attn, attn.norm_q(attn.to_q(hidden_states)))
    k = _heads(attn, attn.norm_k(attn.to_k(context)))
    return q.float(), k.float(), q.shape[-1] ** -0.5


def _wan_patch(model):
    return tuple(model.config.patch_size)


FAMILIES: dict[str, LatentVideo] = {
    "animatediff": LatentVideo(TextAttention(_unet_cross_attention_sites, _unet_query_key, first_token=1)),
    "svd": LatentVideo(),
    "cogvideox": LatentVideo(TextAttention(_cogvideox_sites, _cogvideox_query_key, _cogvideox_patch),
                             temporal_compression=4),
    "wan": LatentVideo(TextAttention(_wan_sites, _wan_query_key, _wan_patch, separate_cfg_calls=True),
                       temporal_compression=4, extra_denoisers=("transformer_2",)),
}


def latent_frame_spans(latent_frames: int, frames_per_latent: int) -> list[range]:
    """The video frames each latent frame of a causal video VAE encodes: frame 0 alone, then latent
    frame i >= 1 the k video frames k(i-1)+1 .. k·i (k = frames_per_latent; CogVideoX and Wan: 4)."""
    k = frames_per_latent
    return [range(0, 1)] + [range(k * (i - 1) + 1, k * i + 1) for i in range(1, latent_frames)]


@dataclass(frozen=True, eq=False)
class LatentFrameCamera(CameraMotion):
    """A CameraMotion read at the latent frames of a temporally compressed video latent.

    The camera's totals and schedule are over the *video* frames, k(n-1)+1 of them for n latent frames.
    Latent frame i takes the mean of the per-frame fractions of the video frames it encodes
    (`latent_frame_spans`): for the default linear schedule that is the fraction at the mean video time,
    0 for frame 0 and (k·i - (k-1)/2) / (k(n-1)) for i >= 1, and since pan, zoom scale and angle are all
    linear in the fraction, each latent frame moves by the average of its video frames' motions. The
    last latent frame so stops (k-1)/2 video frames short of the totals, which the last video frame reaches.
    A user schedule has a row per video frame (averaged the same way) or a row per latent frame (as is)."""

    frames_per_latent: int = 4

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.frames_per_latent, bool) or not isinstance(self.frames_per_latent, int) or \
                self.frames_per_latent < 1:
            raise ValueError(f"frames_per_latent must be an int >= 1, got {self.frames_per_latent!r}")

    @classmethod
    def of(cls, camera: CameraMotion, frames_per_latent: int) -> "LatentFrameCamera":
        return cls(pan=camera.pan, zoom=camera.zoom, rotate=camera.rotate, schedule=camera.schedule,
                   frames_per_latent=frames_per_latent)

    def video_frames(self, latent_frames: int) -> int:
        return self.frames_per_latent * (latent_frames - 1) + 1

    def fractions(self, frames: int) -> torch.Tensor:
        """[frames, 4] float64 fractions at the latent frames (`frames` is the latent frame count)."""
        video = self.video_frames(frames)
        rows = None if self.schedule is None else self.schedule.shape[0]
        if rows == frames and rows != video:
            return self.schedule
        if rows is not None and rows != video:
            raise ValueError(f"CameraMotion schedule has {rows} rows, but a latent of {frames} frames is {video} video "
                             f"frames ({self.frames_per_latent} per latent frame, the first alone): give {video} rows "
                             f"(one per video frame) or {frames} (one per latent frame)")
        per_video = super().fractions(video)
        return torch.stack([per_video[span.start:span.stop].mean(0)
                            for span in latent_frame_spans(frames, self.frames_per_latent)])


class _CrossAttentionCapture:
    """Runs the original processor (the output is exactly the original's) and, while capturing and in
    a call on the prompt (not the negative prompt), records the subject tokens' text-attention
    probabilities, averaged over heads: (rows, tokens) maps summed per key (hw, or a TokenGrid)."""

    def __init__(self, original, state: SamplerState, subject_tokens, text: TextAttention | None = None,
                 patch: tuple[int, int, int] | None = None):
        if isinstance(self, torch.nn.Module):
            # Around a processor that is a module (IP-Adapter's, camera-token processors): the capture is a
            # module sharing the original's own parameter, buffer and child tables, so that while patched
            # the model's parameters(), state_dict() (same key names), .to() and train() still reach
            # them (a plain wrapper made diffusers drop the processor from the model's modules).
            torch.nn.Module.__init__(self)
            for table in ("_parameters", "_buffers", "_modules"):
                object.__setattr__(self, table, getattr(original, table))
        object.__setattr__(self, "original", original)   # not a child: its children are ours already
        self.state = state
        self.subject_tokens = subject_tokens
        self.text = text or FAMILIES["animatediff"].text
        self.patch = patch

    @classmethod
    def wrapping(cls, original, *args, **kwargs) -> "_CrossAttentionCapture":
        """A capture around `original` whose __call__ shows the original's signature: diffusers' Attention
        passes a processor only the keywords its __call__ names (CogVideoX's image_rotary_emb)."""
        return _capture_class(type(original))(original, *args, **kwargs)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        state = self.state
        if state.capturing and state.conditional and encoder_hidden_states is not None and hidden_states.ndim == 3:
            with torch.no_grad():
                self._record(attn, hidden_states, encoder_hidden_states, kwargs)
        return out

    def _record(self, attn, hidden_states, context, kwargs):
        q, k, scale = self.text.query_key(attn, hidden_states, context, kwargs)
        n_text = k.shape[-2]
        if self.subject_tokens and max(self.subject_tokens) >= n_text:
            raise ValueError(f"subject_tokens must be token positions < {n_text} (the prompt's length in "
                             f"tokens), got {list(self.subject_tokens)}")
        tokens = list(self.subject_tokens or self.state.subject_positions or self._default_tokens(n_text))
        subject = 0
        # fp32 scores and maps whatever the caller's autocast (the projections above keep it): under bf16
        # autocast they had been bf16, and ~15 % of a tiny run's mask pixels flipped.
        with torch.autocast(q.device.type, enabled=False):
            q, k = q.float(), k.float()
            for h in range(q.shape[1]):   # one head at a time: (rows, N, T) probabilities, not (rows, heads, N, T)
                probs = (q[:, h] @ k[:, h].transpose(-1, -2) * scale).softmax(dim=-1)
                subject = subject + probs[..., tokens].mean(-1)
        subject = subject / q.shape[1]                                          # (rows, N)
        key = subject.shape[1] if self.patch is None else TokenGrid(subject.shape[1], tuple(self.patch))
        entry = self.state.maps.setdefault(key, [torch.zeros_like(subject), 0])
        if entry[0].shape == subject.shape:
            entry[0] += subject
            entry[1] += 1

    def _default_tokens(self, n_tokens: int):
        positions = self.state.prompt_positions
        if positions is not None:
            return [p for p in positions if p < n_tokens] or [0]
        start = self.text.first_token
        return list(range(start, n_tokens)) if n_tokens > start else [0]


_CAPTURE_CLASSES: dict[type, type] = {}


def _capture_class(processor_cls: type) -> type:
    """The _CrossAttentionCapture subclass for one processor class: the same __call__, declared with
    that class's __call__ signature (one class each, so that compiled graphs stay traceable), and an
    nn.Module when the processor is one (see _CrossAttentionCapture.__init__)."""
    cls = _CAPTURE_CLASSES.get(processor_cls)
    if cls is not None:
        return cls
    bases = (_CrossAttentionCapture, torch.nn.Module) if issubclass(processor_cls, torch.nn.Module) else \
        (_CrossAttentionCapture,)
    body = {}
    try:
        signature = inspect.signature(processor_cls.__call__)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        def __call__(self, *args, **kwargs):
            return _CrossAttentionCapture.__call__(self, *args, **kwargs)

        __call__.__signature__ = signature
        body["__call__"] = __call__
    elif bases == (_CrossAttentionCapture,):
        return _CrossAttentionCapture
    cls = type(f"_CrossAttentionCapture_{processor_cls.__name__}", bases, body)
    _CAPTURE_CLASSES[processor_cls] = cls
    return cls


def _map_grid(key, batch: int, frames: int, height: int, width: int):
    """(conditional rows, (f', h', w')) of a captured map on this latent, or None when it does not fit.
    A U-Net map has batch·frames rows of one level's h·w (down-sampling by 2^k rounds up); a DiT map
    (TokenGrid key) has batch rows of all its (f h w) patches."""
    if isinstance(key, TokenGrid):
        size = key.size(frames, height, width)
        return None if size is None else (batch, size)
    for k in range(8):
        h, w = -(-height // 2**k), -(-width // 2**k)
        if h * w == key:
            return batch * frames, (frames, h, w)
    return None


def capture_to_mask(maps: dict, batch: int, frames: int, height: int, width: int,
                    threshold: float = 0.5) -> torch.Tensor | None:
    """Average captured maps into [f, h, w] and threshold per frame: True = background.

    Classifier-free guidance stacks [uncond, cond] rows: the last (conditional) rows are used, averaged
    over the batch. Maps are resized bilinearly to the latent's h, w; a DiT's patch frames (CogVideoX
    1.5: 2 latent frames a token) are spread over the latent frames they cover."""
    total, weight = None, 0
    for key, (acc, count) in maps.items():
        grid = _map_grid(key, batch, frames, height, width)
        if grid is None or acc.shape[0] % grid[0]:
            continue
        rows, (f, h, w) = grid
        cond = (acc[-rows:] / count).reshape(batch * f, 1, h, w)
        up = F.interpolate(cond, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        up = up.reshape(batch, f, height, width)
        if f != frames:
            up = up[:, torch.arange(frames) * f // frames]
        up = up.mean(0)
        total = up * count if total is None else total + up * count
        weight += count
    if total is None:
        return None
    avg = (total / weight).float()
    flat = avg.reshape(frames, -1)
    cut = flat.mean(1) + threshold * flat.std(1, unbiased=False)
    foreground = avg > cut[:, None, None]
    return (~foreground).cpu()


class LightMotionSampler:
    """LightMotion's edit and correction, installed on the pipeline's own scheduler object.

    `patch` sets three instance attributes on the scheduler (`set_timesteps`, `scale_model_input`,
    `step`), so the pipeline keeps its own scheduler: saving, `from_pipe` and `pipe.scheduler`
    assignments see a plain diffusers scheduler. Everything else is the scheduler's own.

    The sampler follows the steps the pipeline actually runs: a video-to-video call with strength < 1
    starts part-way into the schedule (found from the first timestep the pipeline passes, or the
    scheduler's begin index), `edit_step` and `correction_steps` count steps of that run, and the
    correction's coefficients come from the `timestep` argument (DDIM) or the scheduler's own step
    index (Euler), never from a call counter.

    The re-noise corrections are planned in set_timesteps: `plan` maps run positions to schedule
    indices, [0 .. T1-1] + [T2 .. n-1], and `timesteps` is replaced by the planned list."""

    def __init__(self, scheduler, config: LightMotionConfig, layout: str, state: SamplerState):
        self.scheduler = scheduler
        self.lm_config = config
        self.layout = layout
        self.state = state
        # the scheduler's own bound methods, captured before patching (the instance attributes that
        # replace them are this sampler's methods)
        self._set_timesteps = scheduler.set_timesteps
        self._scale_model_input = getattr(scheduler, "scale_model_input", None)   # flow matching has none
        self._step = scheduler.step
        self._step_params = set(inspect.signature(scheduler.step).parameters)
        self.full = None        # the schedule set_timesteps made, before any renoise plan
        self.plan = None        # run position -> schedule index, once the run has begun
        self.position = 0
        self.edit = self.window = self.start = 0
        self.t1 = self.t2 = None   # renoise: steps before the re-noise, level re-noised to (run indices)
        self._begun = False
        name = type(scheduler).__name__
        if "Inverse" in name:
            raise ValueError(f"LightMotion samples forward in time; pipe.scheduler is {name}, an inversion "
                             f"scheduler. Give the pipeline a forward scheduler (e.g. DDIMScheduler)")
        # the per-scheduler math (levels, x̂0, jump, history); None: correction=None on a scheduler
        # outside the table (the edit alone)
        self.kind = scheduler_kind(scheduler, config.correction)

    def install(self, ctx: PatchContext) -> None:
        for name in ("set_timesteps", "scale_model_input", "step"):
            if name != "scale_model_input" or self._scale_model_input is not None:
                ctx.set_attr(self.scheduler, name, getattr(self, name))

    # -- schedule --------------------------------------------------------------------------------
    def set_timesteps(self, *args, **kwargs):
        out = self._set_timesteps(*args, **kwargs)
        sch, cfg = self.scheduler, self.lm_config
        self.full = sch.timesteps
        self.plan, self.position, self._begun = None, 0, False
        self.state.reset()
        self.state.capturing = True
        if cfg.correction in RENOISE:
            # the rewind needs extra UNet steps: the pipeline reads them from `timesteps` right after
            # set_timesteps. The scheduler's own step bookkeeping stays on the full schedule.
            n = len(self.full)
            self.edit, self.window = self._window(n)
            self.t1, self.t2 = self._renoise_times(n, self.edit, self.window)
            plan = list(range(self.t1)) + list(range(self.t2, n))
            sch.timesteps = self.full[torch.as_tensor(plan, device=self.full.device)]
            if hasattr(sch, "set_begin_index"):
                sch.set_begin_index(0)   # stepped schedulers: find step 0 by index, not by a timestep that now repeats
            self.plan, self.start = plan, 0
        return out

    def _window(self, n_run: int) -> tuple[int, int]:
        """(T0 = steps before the edit, correction window) for a run of n_run steps."""
        cfg = self.lm_config
        if isinstance(cfg.edit_step, int) and cfg.edit_step >= n_run:
            raise ValueError(f"edit_step={cfg.edit_step} is past the schedule: this call runs {n_run} steps; "
                             f"give an int < {n_run} or a fraction of the steps")
        edit = min(max(cfg.steps(cfg.edit_step, n_run), 1), max(n_run - 1, 1))
        window = max(cfg.steps(cfg.correction_steps, n_run), 1) if cfg.correction else 0
        if cfg.correction == "renoise_immediate":
            window = min(window, edit)
        return edit, window

    def _renoise_times(self, n_run: int, edit: int, window: int) -> tuple[int, int]:
        """(T1, T2) as run step indices: the latent after T1 steps is re-noised to the level the run
        had after T2 steps, and the run continues with step T2. 'renoise_immediate': T1 = T0,
        T2 = T0 - window. 'renoise': from denoise_until / renoise_to; fractions are rounded and then
        kept in order (T0 < T1, T2 < T1), explicit ints are checked as given."""
        cfg = self.lm_config
        if cfg.correction == "renoise_immediate":
            return edit, edit - window
        t1 = cfg.steps(cfg.denoise_until, n_run)
        t2 = cfg.steps(cfg.renoise_to, n_run)
        if isinstance(cfg.denoise_until, float):
            t1 = min(max(t1, edit + 1), n_run)   # T1 = n_run: re-noise the finished latent (very short runs)
        if isinstance(cfg.renoise_to, float):
            t2 = min(t2, t1 - 1)
        if t1 <= edit:
            raise ValueError(f"denoise_until (T1) must come after edit_step (T0): got T1 = {t1} steps, T0 = {edit} "
                             f"steps of the {n_run} this call runs")
        if t1 > n_run:
            raise ValueError(f"denoise_until (T1) is past the schedule: got {t1} steps, this call runs {n_run}; "
                             f"give an int <= {n_run} or a fraction of the steps")
        if not 0 <= t2 < t1:
            raise ValueError(f"renoise_to (T2) must be a noisier level than denoise_until (T1) and not beyond the "
                             f"start: 0 <= T2 < T1 = {t1} steps, got T2 = {t2}")
        return t1, t2

    def _begin(self, timestep, sample) -> None:
        """First call of a run: where in the schedule the pipeline starts, and the user mask's shape."""
        if self.full is None:
            raise RuntimeError("the LightMotion-patched scheduler was used before set_timesteps")
        if self.plan is None:
            start = self._start_index(timestep)
            self.edit, self.window = self._window(len(self.full) - start)
            self.plan, self.start = list(range(start, len(self.full))), start
        elif timestep is not None and float(timestep) != float(self.full[0]):
            raise ValueError(f"correction={self.lm_config.correction!r} (the re-noise jump) plans its extra steps "
                             f"on the whole schedule, but this pipeline starts part-way (at timestep "
                             f"{float(timestep)}, e.g. video-to-video with strength < 1); use "
                             f"correction='stochastic' there")
        mask = self.lm_config.mask
        if mask is not None:
            want = self._frames_hw(sample)
            if tuple(mask.shape) != want:
                raise ValueError(f"mask must have shape [{want[0]}, {want[1]}, {want[2]}] (latent frames, height, "
                                 f"width of this call), got {tuple(mask.shape)}")
        self._begun = True

    def _start_index(self, timestep) -> int:
        begin = getattr(self.scheduler, "begin_index", None)
        if begin is not None:
            return int(begin)
        if timestep is None:
            return 0
        hits = (self.full == torch.as_tensor(timestep).to(self.full)).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(timestep)} is not in the schedule set_timesteps made")
        return int(hits[0])

    def _frames_hw(self, sample) -> tuple[int, int, int]:
        frames_dim = 2 if self.layout == "b c f h w" else 1
        return sample.shape[frames_dim], sample.shape[3], sample.shape[4]

    def scale_model_input(self, sample, *args, **kwargs):
        timestep = args[0] if args else kwargs.get("timestep")
        if not self._begun and timestep is not None:
            self._begin(timestep, sample)   # before the first UNet step: a bad mask fails now
        return self._scale_model_input(sample, *args, **kwargs)

    # -- the step --------------------------------------------------------------------------------
    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None, return_dict: bool = True,
             **kwargs):
        if not self._begun:
            self._begin(timestep, sample)
        cfg = self.lm_config
        j = self.position
        index = self.plan[j] if j < len(self.plan) else self.plan[-1]    # index into the full schedule
        edit_at = self.start + self.edit                                 # schedule index of the first edited step
        first_pass = j < self.edit
        corrected = (cfg.correction == "stochastic" and not first_pass and edit_at <= index < edit_at + self.window)
        offset = j * sample.numel()
        if corrected:
            prev = self._stochastic_step(model_output, timestep, sample, index, offset)
        else:
            if "eta" in self._step_params:
                kwargs["eta"] = eta
            if "generator" in self._step_params:
                kwargs["generator"] = generator   # Euler ancestral, LCM, SDE solvers: the user's noise
            with self._full_schedule():
                prev = self._step(model_output, timestep, sample, return_dict=False, **kwargs)[0]
        renoise_now = cfg.correction in RENOISE and j == self.t1 - 1 and self.t1 > self.t2
        if j == self.edit - 1:
            # 'renoise_immediate': the jump follows the edit in the same step, so the gather and the
            # re-noise run as one latent_resample launch (the same noise snr_reinject would draw).
            jump = self._jump(index) if renoise_now else None
            prev = self._edit(prev, index, timestep, offset, jump)
            self._edit_history()
            if renoise_now:
                self._rewind(index, pre_renoise=self.state.record.raw("post_edit"), renoised=prev)
                renoise_now = False
        if renoise_now:
            prev = self._renoise(prev, index, timestep, offset=offset)
        self.position = j + 1
        return _Output(prev) if return_dict else (prev,)

    @contextlib.contextmanager
    def _full_schedule(self):
        """The scheduler's own step reads `timesteps` (LCM: the next timestep; DPM-Solver/UniPC: how many
        steps are left, for the lower-order final steps): during it, show the full schedule, not the
        re-noise plan that the pipeline iterates."""
        sch = self.scheduler
        planned = sch.timesteps
        if self.full is not None:
            sch.timesteps = self.full
        try:
            yield
        finally:
            sch.timesteps = planned

    def _edit_history(self) -> None:
        """Apply the edit's gather to the multistep history (lightmotion_schedulers.py, "History")."""
        if self.kind is None:
            return
        fill = self.state.record["fill_map"]
        mapped = self.kind.map_history(self.scheduler, lambda h: latent_resample(h, fill, self.layout))
        self.state.record["history_edited"] = mapped

    def _region(self, sample):
        if self.lm_config.correction_region != "exposed":
            return None
        return self.state.record["exposed"].to(sample.device)

    def _stochastic_step(self, model_output, timestep, sample, index, offset):
        """The η-step of the correction window from schedule index `index` (fused, noise from motion_seed);
        the scheduler then continues from index + 1 with its history restarted."""
        cfg, sch, kind = self.lm_config, self.scheduler, self.kind
        seed = cfg.motion_seed
        if not kind.x0_is_affine(sch):
            # DDIM with x̂0 clipped: not an affine map any more; the scheduler's own step with the same noise
            noise = snr_noise(sample, seed, offset).to(sample.dtype)
            with self._full_schedule():
                out = self._step(model_output, timestep, sample, eta=cfg.eta, variance_noise=noise,
                                 return_dict=False)[0]
                if self._region(sample) is not None:
                    plain = self._step(model_output, timestep, sample, eta=0.0, return_dict=False)[0]
                    out = torch.where(self._expand(self._region(sample)), out, plain)
        else:
            now, nxt = kind.level(sch, self.full, index), kind.next_level(sch, self.full, index)
            coeffs = eta_step_coefficients(now, nxt, kind.x0(sch, self.full, index), cfg.eta)
            out = snr_reinject(sample, model_output.to(sample.dtype), coeffs, seed, offset, self._region(sample),
                               self.layout).to(model_output.dtype)
        kind.restart(sch, index + 1)
        return out

    def _expand(self, region):
        return region[None, None] if self.layout == "b c f h w" else region[None, :, None]

    def _edit(self, latents, index, timestep, offset, jump: StepCoefficients | None = None):
        """The latent edit at T0 (permute + resample through the fill map); with `jump`, the re-noise
        jump in the same launch (the record's post_edit, the un-noised edit, is then computed only if
        read)."""
        cfg, state = self.lm_config, self.state
        state.capturing = False
        frames, height, width = self._frames_hw(latents)
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
        if jump is None:
            edited = post_edit = latent_resample(latents, fill, self.layout)
        else:
            edited = latent_resample(latents, fill, self.layout, renoise=jump, seed=cfg.motion_seed, offset=offset)
            post_edit = _Lazy(lambda: latent_resample(latents, fill, self.layout))
        state.record.update(pre_edit=latents, post_edit=post_edit, fill_map=fill, background=background,
                            background_source=source, exposed=~kept, edit_index=index)
        state.maps.clear()
        return edited

    def _renoise(self, latents, index, timestep, offset):
        """Jump x_T1 -> x_T2 with fresh noise: from the level step `index` (= T1 - 1) produced back to the
        level entering step T2 (closed form, `snr_reinject` with no model output); the scheduler restarts
        at T2 with its multistep history forgotten (the next step is first order)."""
        out = snr_reinject(latents, None, self._jump(index), self.lm_config.motion_seed, offset, None, self.layout)
        self._rewind(index, pre_renoise=latents, renoised=out)
        return out

    def _jump(self, index) -> StepCoefficients:
        """The re-noise jump's coefficients, from the level step `index` (= T1 - 1) produced to the
        level entering step T2."""
        sch, kind = self.scheduler, self.kind
        return jump_coefficients(kind.next_level(sch, self.full, index), kind.level(sch, self.full, self.t2))

    def _rewind(self, index, **record) -> None:
        """After the jump: the scheduler restarts at T2 (multistep history forgotten)."""
        self.kind.restart(self.scheduler, self.t2)
        self.state.record.update(renoise_index=index, rewind_to=self.t2, **record)


class _Output:
    """The part of a scheduler output the pipelines read."""

    def __init__(self, prev_sample):
        self.prev_sample = prev_sample

    def __getitem__(self, i):
        return (self.prev_sample,)[i]


def sampler_state(pipe) -> SamplerState | None:
    """The LightMotion state of a patched pipeline (its `record` holds the last call's edit)."""
    ctx = patch_state(pipe)
    sampler = ctx.data.get("lightmotion") if ctx is not None else None
    return sampler.state if sampler is not None else None


def _install(ctx: PatchContext) -> None:
    opts = ctx.options
    given = {k: opts[k] for k in OPTIONS if k in opts and (opts[k] is not None or k == "correction")}
    if opts.get("camera") is None:
        extra = sorted(k for k in OPTIONS if k != "camera" and opts.get(k) is not None)
        if extra:
            raise ValueError(f"patch() got LightMotion option(s) {extra} without camera=")
        return
    config = LightMotionConfig(**given)
    _check_options_apply(config, given)
    pipe = ctx.pipe
    family = FAMILIES[ctx.adapter.name]
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise ValueError(f"LightMotion needs a pipeline with a scheduler ({', '.join(_pipelines())}), "
                         f"got {type(pipe).__name__}")
    _check_tokens_fit(config.subject_tokens, getattr(pipe, "tokenizer", None))
    if config.subject is not None and family.text is None:
        text_families = ", ".join(name for name, fam in FAMILIES.items() if fam.text is not None)
        raise ValueError(f"subject= names words of a text prompt; it applies to the {text_families} families, not "
                         f"{ctx.adapter.name} (give mask= instead)")
    _check_step_signature(scheduler)
    compression = family.temporal_compression
    if compression > 1:
        compression = int(getattr(pipe, "vae_scale_factor_temporal", compression))
        config.camera = LatentFrameCamera.of(config.camera, compression)
    state = SamplerState()
    sampler = LightMotionSampler(scheduler, config, ctx.adapter.latent_layout, state)
    ctx.data["lightmotion"] = sampler
    if family.text is not None and config.mask is None:
        _install_capture(ctx, family, config, state)
    sampler.install(ctx)
    _warn_when_scheduler_replaced(ctx, sampler)


def _check_step_signature(scheduler) -> None:
    """A scheduler whose step the pipeline calls with more state than (model_output, timestep, sample)
    (CogVideoXDPMScheduler: old_pred_original_sample, timestep_back) cannot go through a sampler step
    that does not take it: say so at patch time, not as a TypeError mid-call."""
    own = set(inspect.signature(scheduler.step).parameters)
    ours = set(inspect.signature(LightMotionSampler.step).parameters)
    extra = sorted({"old_pred_original_sample", "timestep_back"} & own - ours)
    if extra:
        raise ValueError(f"LightMotion cannot drive {type(scheduler).__name__} yet: the pipeline calls its step with "
                         f"{', '.join(extra)}; use CogVideoXDDIMScheduler (CogVideoX's default) or DDIMScheduler: "
                         f"pipe.scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)")


def _pipelines() -> list[str]:
    return [p for a in ADAPTERS if a.name in FAMILIES for p in a.pipelines]


def _install_capture(ctx: PatchContext, family: LatentVideo, config: LightMotionConfig, state: SamplerState) -> None:
    """Capturing processors on the family's text-attention sites of every denoiser, and the prompt's
    tokens (and, for separate negative-prompt calls, its embeddings) taken from encode_prompt."""
    text, pipe = family.text, ctx.pipe
    denoisers = [ctx.model] + [getattr(pipe, name) for name in family.extra_denoisers
                               if isinstance(getattr(pipe, name, None), torch.nn.Module)]
    for model in denoisers:
        patch = text.patch(model) if text.patch is not None else None
        for attn in text.sites(model):
            ctx.set_processor(attn, _CrossAttentionCapture.wrapping(attn.processor, state, config.subject_tokens, text,
                                                                   patch))
        if text.separate_cfg_calls:
            ctx.wrap_forward(model, _mark_conditional_calls(state))
    encode = getattr(pipe, "encode_prompt", None)
    tokenizer = getattr(pipe, "tokenizer", None)
    if config.subject is not None and config.subject_tokens is None and (encode is None or tokenizer is None):
        raise ValueError(f"subject={list(config.subject)} needs the pipeline's tokenizer and text encoder to find "
                         f"the words in the prompt; {type(pipe).__name__} has none: give subject_tokens= or mask=")
    if encode is None:
        return

    def encode_prompt(*args, **kwargs):
        prompt = args[0] if args else kwargs.get("prompt")
        state.subject_positions = state.prompt_positions = state.prompt_embeds = None
        if isinstance(prompt, (list, tuple)) and len(set(prompt)) > 1:
            # One mask per call, captured from the text attention averaged over the batch and located by
            # prompt[0]'s tokens: every video would get a blend of the prompts' subjects.
            raise ValueError(f"LightMotion captures one subject mask per call, but the {len(prompt)} prompts differ; "
                             "call the pipeline once per prompt, or give mask= (a batch of one prompt, or "
                             "num_videos_per_prompt, is fine)")
        first = prompt if isinstance(prompt, str) else (
            prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else None)
        if first is not None and tokenizer is not None:
            state.prompt_positions = prompt_token_positions(tokenizer, first)
        if config.subject is not None and config.subject_tokens is None:
            if first is None:
                raise ValueError(f"subject={list(config.subject)} needs the prompt as text (prompt=...), "
                                 f"not prompt_embeds; or give subject_tokens=")
            state.subject_positions = subject_token_positions(tokenizer, first, config.subject)
        out = encode(*args, **kwargs)
        state.prompt_embeds = out[0] if isinstance(out, tuple) else out
        return out

    ctx.set_attr(pipe, "encode_prompt", encode_prompt)


def prompt_token_positions(tokenizer, prompt: str) -> tuple[int, ...]:
    """Positions of the prompt's own tokens as the text encoder sees them: no start, end or padding
    token (CLIP: 1 .. n; T5: 0 .. n-1)."""
    encoded = tokenizer(prompt, truncation=True, return_special_tokens_mask=True)
    return tuple(i for i, special in enumerate(encoded["special_tokens_mask"]) if not special)


def _mark_conditional_calls(state: SamplerState):
    """Forward wrapper for a pipeline that runs the negative prompt as a call of its own (Wan): a call
    is conditional when its text is the prompt embeddings encode_prompt returned (by identity, else by
    value: the pipeline may cast them); unknown embeddings count as conditional."""
    def forward(original, *args, **kwargs):
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        prompt = state.prompt_embeds
        state.conditional = (text is None or prompt is None or text is prompt or (
            text.shape == prompt.shape and torch.equal(text, prompt.to(text.device, text.dtype))))
        try:
            return original(*args, **kwargs)
        finally:
            state.conditional = True

    return forward


def _warn_when_scheduler_replaced(ctx: PatchContext, sampler: LightMotionSampler) -> None:
    """`pipe.scheduler = ...` after patching leaves the new scheduler unpatched (and unpatch keeps it):
    say so at the start of each call, which every diffusers pipeline opens with check_inputs."""
    pipe = ctx.pipe
    check = getattr(pipe, "check_inputs", None)
    if check is None:
        return

    def check_inputs(*args, **kwargs):
        if pipe.scheduler is not sampler.scheduler:
            warnings.warn(f"pipe.scheduler was replaced after lightmotion_fast.patch (now "
                          f"{type(pipe.scheduler).__name__}): this call runs without LightMotion's camera "
                          f"motion; patch again (unpatch + patch) to apply it to the new scheduler",
                          UserWarning, stacklevel=3)
        return check(*args, **kwargs)

    ctx.set_attr(pipe, "check_inputs", check_inputs)


def _check_options_apply(config: LightMotionConfig, given: dict) -> None:
    """A schedule option the chosen correction does not read is an error, not silently ignored."""
    if config.correction != "renoise":
        for name in ("denoise_until", "renoise_to"):
            if name in given:
                raise ValueError(f"{name} applies to correction='renoise' (the paper's schedule), but correction "
                                 f"is {config.correction!r}")
    elif "correction_steps" in given:
        raise ValueError("correction_steps applies to correction='stochastic' or 'renoise_immediate'; "
                         "correction='renoise' re-noises from denoise_until (T1) to renoise_to (T2)")


def _check_tokens_fit(tokens, tokenizer) -> None:
    limit = getattr(tokenizer, "model_max_length", None)
    if tokens and isinstance(limit, int) and limit < 10**6 and max(tokens) >= limit:
        raise ValueError(f"subject_tokens must be token positions < {limit} (the tokenizer's model_max_length), "
                         f"got {list(tokens)}")


register_feature(Feature(name="lightmotion", install=_install, options=OPTION_DOCS, families=tuple(FAMILIES),
                         summary="LightMotion camera motion: latent edit + SNR correction in the sampler"))
