"""Patch feature "ip_adapter" and MotionFlow's attention processors (specs/motionflow.md).

- `FusedIPAdapterAttnProcessor`: a drop-in for diffusers' `IPAdapterAttnProcessor2_0`. The text
  attention and every image adapter's attention run as ONE fused `dual_cross_attention` launch
  (separate softmaxes, Q read once, O written once) instead of 1 + k SDPA calls and k adds.
  `patch(pipe)` installs it on every attention module whose processor is an
  `IPAdapterAttnProcessor2_0` (SD1.5/SDXL U-Nets, AnimateDiff's UNetMotionModel, ...). It subclasses
  the processor it replaces and shares its `to_k_ip`/`to_v_ip` layers and its `scale` list, so
  `pipe.set_ip_adapter_scale(...)` keeps working while patched. Adapters with an
  `ip_adapter_masks` entry (diffusers' regional IP-Adapter masks) are applied as diffusers does:
  their attention, per image, times the downsampled mask, added to the output.
- `CameraTokenAttnProcessor`: MotionFlow-style camera conditioning on cross-attention: text (or
  image) tokens plus camera tokens, O = softmax(QK_textᵀ)V_text + λ_c softmax(QK_camᵀ)V_cam; the
  camera tokens are passed per call (`cross_attention_kwargs={"camera_tokens": ...}`).
- `ReferenceAttnProcessor`: for self-attention (attn1); the layer attends to [own tokens; bank
  tokens] through `reference_attention` without building the concatenation. The bank comes from a
  `ReferenceBank` shared with a writer on a reference U-Net (`reference_net.ReferenceNet` runs both
  networks in one call), or per call (`cross_attention_kwargs={"reference_bank": {name: features}}`).

`install_camera_token_processors` / `install_reference_processors` put the MotionFlow processors
into a U-Net's spatial attention layers only (never AnimateDiff's motion modules), where the method
has them; they add weights or change what the model computes, so they are not patch features.
Camera tokens may be per level (`camera_encoder.CameraEncoder` makes them from Plücker maps).
Both installers also silence diffusers' warning that the other layers (self-attention, motion
modules) do not expect `camera_tokens` / `reference_bank`: those layers ignore them, as intended,
and diffusers would otherwise log one line per layer per U-Net call (`_quiet_per_call_kwargs`).
"""
from __future__ import annotations

import ast
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Union

import torch

from lightmotion_fast.integrations.diffusers.registry import Feature, PatchContext, register_feature
from lightmotion_fast.ops.dual_cross_attention import dual_cross_attention
from lightmotion_fast.ops.reference_attention import reference_attention

try:  # diffusers is optional for the package as a whole
    from diffusers.image_processor import IPAdapterMaskProcessor
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
except ImportError:  # pragma: no cover - exercised only without diffusers
    Attention = IPAdapterAttnProcessor2_0 = IPAdapterMaskProcessor = None


def _split_heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """[b n (h d)] -> a [b h n d] view (no copy): the layout the fused ops read through strides."""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[b h n d] -> [b n (h d)]; free for the ops' outputs, which are stored as [b n h d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _prologue(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    """The part every diffusers 2.0 processor shares: spatial/group norm, 4-D inputs, the mask
    prepared as [b h (1|n) m], and the query. Returns what the epilogue needs too."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    shape4 = None
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        shape4 = (batch, channel, height, width)
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    return residual, hidden_states, query, attention_mask, batch, shape4


def _epilogue(attn, hidden_states, residual, shape4):
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if shape4 is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*shape4)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _is_zero(scale) -> bool:
    return all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0


_Base = IPAdapterAttnProcessor2_0 if IPAdapterAttnProcessor2_0 is not None else torch.nn.Module


class FusedIPAdapterAttnProcessor(_Base):
    """IPAdapterAttnProcessor2_0 with text + image-prompt attention fused into one kernel launch.

    Built from the processor it replaces; shares its projection layers and scale list.
    """

    def __init__(self, original):
        torch.nn.Module.__init__(self)  # not the parent's __init__: it would create new layers
        self.hidden_size = original.hidden_size
        self.cross_attention_dim = original.cross_attention_dim
        self.num_tokens = original.num_tokens
        self.to_k_ip = original.to_k_ip
        self.to_v_ip = original.to_v_ip
        self.__dict__["_original"] = original  # not a submodule: its layers are already ours

    @property
    def scale(self):
        return self.__dict__["_original"].scale

    @scale.setter
    def scale(self, value):
        self.__dict__["_original"].scale = value

    @property
    def original(self):
        return self.__dict__["_original"]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, ip_adapter_masks=None):
        if encoder_hidden_states is None:  # not a cross-attention call: nothing to fuse
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale,
                                 ip_adapter_masks)
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        else:  # diffusers' deprecated form: image tokens appended to the text tokens
            end = encoder_hidden_states.shape[1] - self.num_tokens[0]
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]]
        masks = self._checked_masks(ip_adapter_masks, ip_hidden_states)

        residual, hidden_states, query, attention_mask, batch, shape4 = _prologue(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        heads = attn.heads
        q = _split_heads(query, batch, heads)
        keys, values, weights = [_split_heads(key, batch, heads)], [_split_heads(value, batch, heads)], [1.0]
        masked = []
        for ip_states, ip_scale, to_k, to_v, mask in zip(ip_hidden_states, self.scale, self.to_k_ip,
                                                          self.to_v_ip, masks):
            if _is_zero(ip_scale):
                continue
            if mask is not None:
                masked.append((ip_states, ip_scale, to_k, to_v, mask))
                continue
            keys.append(_split_heads(to_k(ip_states), batch, heads))
            values.append(_split_heads(to_v(ip_states), batch, heads))
            weights.append(float(ip_scale))
        # SDPA's default scale, as the replaced processor uses (it ignores attn.scale).
        softmax_scale = q.shape[-1] ** -0.5
        out = _merge_heads(dual_cross_attention(q, keys, values, weights, mask=attention_mask,
                                                softmax_scale=softmax_scale)).to(query.dtype)
        for ip_states, ip_scale, to_k, to_v, mask in masked:
            per_image = ip_scale if isinstance(ip_scale, list) else [ip_scale] * mask.shape[1]
            for i in range(mask.shape[1]):
                k_i = _split_heads(to_k(ip_states[:, i]), batch, heads)
                v_i = _split_heads(to_v(ip_states[:, i]), batch, heads)
                image_out = _merge_heads(dual_cross_attention(q, [k_i], [v_i], softmax_scale=softmax_scale))
                down = IPAdapterMaskProcessor.downsample(mask[:, i], batch, image_out.shape[1], image_out.shape[2])
                out = out + per_image[i] * (image_out.to(query.dtype) * down.to(dtype=query.dtype, device=query.device))
        return _epilogue(attn, out, residual, shape4)

    def _checked_masks(self, ip_adapter_masks, ip_hidden_states):
        if ip_adapter_masks is None:
            return [None] * len(self.scale)
        if not isinstance(ip_adapter_masks, list):
            ip_adapter_masks = list(ip_adapter_masks.unsqueeze(1))
        if not (len(ip_adapter_masks) == len(self.scale) == len(ip_hidden_states)):
            raise ValueError(f"Length of ip_adapter_masks array ({len(ip_adapter_masks)}) must match length of "
                             f"self.scale array ({len(self.scale)}) and number of ip_hidden_states "
                             f"({len(ip_hidden_states)})")
        for index, (mask, scale, ip_state) in enumerate(zip(ip_adapter_masks, self.scale, ip_hidden_states)):
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
                raise ValueError("Each element of the ip_adapter_masks array should be a tensor with shape "
                                 "[1, num_images_for_ip_adapter, height, width]. Please use "
                                 "`IPAdapterMaskProcessor` to preprocess your mask")
            if mask.shape[1] != ip_state.shape[1]:
                raise ValueError(f"Number of masks ({mask.shape[1]}) does not match number of ip images "
                                 f"({ip_state.shape[1]}) at index {index}")
            if isinstance(scale, list) and len(scale) != mask.shape[1]:
                raise ValueError(f"Number of masks ({mask.shape[1]}) does not match number of scales "
                                 f"({len(scale)}) at index {index}")
        return ip_adapter_masks


CameraTokens = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[Union[int, str], torch.Tensor]]


class CameraTokenAttnProcessor(torch.nn.Module):
    """Cross-attention with an extra set of camera tokens (MotionFlow-style camera conditioning):

        O = softmax(Q K_ctxᵀ · s + mask) V_ctx + λ_c · softmax(Q K_camᵀ · s) V_cam

    K_cam, V_cam come from the camera tokens through this processor's own `to_k_cam`/`to_v_cam`.
    Camera tokens are given per call, `cross_attention_kwargs={"camera_tokens": c}`, as
    - one tensor [b n_cam camera_dim] used by every layer;
    - a list/tuple with one tensor per U-Net resolution level (level 0 = the full latent resolution:
      down_blocks.0, the last up block; the mid block is the deepest level), as a multi-scale camera
      encoder produces them (`CameraEncoder`);
    - a dict keyed by level (int) or by layer name (str, the attention module's name in the U-Net; a
      name entry wins over a level entry). A layer without an entry runs plain attention.
    b is the attention batch, e.g. batch·frames in AnimateDiff; a batch of 1 broadcasts.
    """

    def __init__(self, hidden_size: int, camera_dim: int, scale: float = 1.0, name: str = "",
                 level: int | None = None):
        super().__init__()
        self.hidden_size, self.camera_dim, self.scale = hidden_size, camera_dim, scale
        self.name, self.level = name, level
        self.to_k_cam = torch.nn.Linear(camera_dim, hidden_size, bias=False)
        self.to_v_cam = torch.nn.Linear(camera_dim, hidden_size, bias=False)

    def select_tokens(self, camera_tokens: CameraTokens | None) -> torch.Tensor | None:
        """This layer's camera tokens out of the per-call argument (see the class docstring)."""
        if camera_tokens is None or isinstance(camera_tokens, torch.Tensor):
            return camera_tokens
        if isinstance(camera_tokens, Mapping):
            if self.name in camera_tokens:
                return camera_tokens[self.name]
            return camera_tokens.get(self.level) if self.level is not None else None
        if isinstance(camera_tokens, Sequence):
            if self.level is None:
                raise ValueError(f"camera_tokens given per level, but layer {self.name!r} has no level "
                                 "(install it with install_camera_token_processors)")
            if self.level >= len(camera_tokens):
                raise ValueError(f"camera_tokens has {len(camera_tokens)} levels, layer {self.name!r} is at "
                                 f"level {self.level}")
            return camera_tokens[self.level]
        raise TypeError(f"camera_tokens must be a tensor, a list of tensors per level or a dict, "
                        f"got {type(camera_tokens).__name__}")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 camera_tokens: CameraTokens | None = None):
        camera_tokens = self.select_tokens(camera_tokens)
        residual, hidden_states, query, attention_mask, batch, shape4 = _prologue(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        heads = attn.heads
        q = _split_heads(query, batch, heads)
        keys = [_split_heads(attn.to_k(context), batch, heads)]
        values = [_split_heads(attn.to_v(context), batch, heads)]
        weights = [1.0]
        if camera_tokens is not None and self.scale != 0:
            if camera_tokens.ndim != 3 or camera_tokens.shape[0] not in (1, batch) or \
                    camera_tokens.shape[-1] != self.camera_dim:
                raise ValueError(f"camera_tokens for layer {self.name!r} (level {self.level}) must have shape "
                                 f"[{batch} (or 1), n_cam, {self.camera_dim}], got {tuple(camera_tokens.shape)}")
            camera_tokens = camera_tokens.to(query.dtype).expand(batch, -1, -1)
            keys.append(_split_heads(self.to_k_cam(camera_tokens), batch, heads))
            values.append(_split_heads(self.to_v_cam(camera_tokens), batch, heads))
            weights.append(float(self.scale))
        out = dual_cross_attention(q, keys, values, weights, mask=attention_mask, softmax_scale=attn.scale)
        return _epilogue(attn, _merge_heads(out).to(query.dtype), residual, shape4)


class ReferenceBank:
    """The features a reference network wrote for one call, shared by the writer and every reader.

    `features` is {video layer name: [r n_p c] hidden states} while a call is running (filled by the
    writer hooks of `reference_net.ReferenceNet`), None otherwise; readers that share the bank read
    their entry from it. Cleared after each call, so no features outlive the call they belong to."""

    def __init__(self):
        self.features: dict[str, torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.features is not None

    def clear(self) -> None:
        self.features = None


def _bank_rows(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Bank rows [r ...] -> [batch ...]: r == batch as is; r == 1 broadcast (a view); batch = r·k
    repeats each row k times in a row, i.e. one reference per video for AnimateDiff's "(b f)" frame
    batch, every frame of video i attending to reference i."""
    r = t.shape[0]
    if r == batch:
        return t
    if r == 1:
        return t.expand(batch, *t.shape[1:])
    if r > 0 and batch % r == 0:
        return t.repeat_interleave(batch // r, dim=0)
    raise ValueError(f"reference bank for layer {name!r} has batch {r}; the layer's attention batch is {batch} "
                     f"(expected {batch}, 1, or a divisor of {batch}: one reference per video of consecutive frames)")


class ReferenceAttnProcessor:
    """Self-attention (attn1) that also attends to a reference bank of features (MotionFlow's
    reference attention, specs/motionflow.md):

        out = softmax(Q_m [K_m; K_p]ᵀ s) [V_m; V_p],   K_p, V_p = attn.to_k/to_v(bank)

    computed by the fused `reference_attention` without building the concatenation. The bank holds
    the reference network's hidden states entering its matching attn1, [r n_p c] (or [r c h w]);
    r is the attention batch, 1, or the number of videos (each video's frames share its row).

    Where the bank comes from, first match wins:
    - `bank`, a `ReferenceBank` shared with a writer (`reference_net.ReferenceNet` sets this up):
      while it is active this layer's entry must be there (a missing one is a ValueError: the
      writer did not reach the matching layer);
    - per call, `cross_attention_kwargs={"reference_bank": {name: features}}` keyed by this layer's
      module name, or one tensor used by every layer.
    With neither, or no entry for this layer, it runs plain self-attention."""

    def __init__(self, name: str = "", bank: ReferenceBank | None = None):
        self.name, self.bank = name, bank

    def select_bank(self, reference_bank) -> torch.Tensor | None:
        if self.bank is not None and self.bank.active:
            if self.name not in self.bank.features:
                raise ValueError(f"the reference network wrote no features for layer {self.name!r} in this call "
                                 f"(it wrote {sorted(self.bank.features)})")
            return self.bank.features[self.name]
        if isinstance(reference_bank, Mapping):
            return reference_bank.get(self.name)
        if reference_bank is None or isinstance(reference_bank, torch.Tensor):
            return reference_bank
        raise TypeError(f"reference_bank must be a dict {{layer name: tensor}} or a tensor, "
                        f"got {type(reference_bank).__name__}")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference_bank=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("ReferenceAttnProcessor is for self-attention (attn1) without a mask")
        bank = self.select_bank(reference_bank)
        residual, hidden_states, query, _, batch, shape4 = _prologue(attn, hidden_states, None, None, temb)
        heads = attn.heads
        q = _split_heads(query, batch, heads)
        k = _split_heads(attn.to_k(hidden_states), batch, heads)
        v = _split_heads(attn.to_v(hidden_states), batch, heads)
        if bank is None:
            out = dual_cross_attention(q, [k], [v], softmax_scale=attn.scale)
        else:
            if bank.ndim == 4:
                bank = bank.flatten(2).transpose(1, 2)
            if bank.ndim != 3 or bank.shape[-1] != hidden_states.shape[-1]:
                raise ValueError(f"reference bank for layer {self.name!r} must be [r, n_p, {hidden_states.shape[-1]}] "
                                 f"(or [r, {hidden_states.shape[-1]}, h, w]), got {tuple(bank.shape)}")
            bank = bank.to(query.dtype)
            if attn.group_norm is not None:
                bank = attn.group_norm(bank.transpose(1, 2)).transpose(1, 2)
            # Project the r bank rows, then spread them over the batch: r·n_p·c work, not batch·n_p·c.
            k_ref = _bank_rows(attn.to_k(bank), batch, self.name)
            v_ref = _bank_rows(attn.to_v(bank), batch, self.name)
            out = reference_attention(q, k, v, _split_heads(k_ref, batch, heads), _split_heads(v_ref, batch, heads),
                                      softmax_scale=attn.scale)
        return _epilogue(attn, _merge_heads(out).to(query.dtype), residual, shape4)


# Modules whose attention runs along time (AnimateDiff's motion modules, SVD's temporal blocks): the
# MotionFlow processors do not belong there (they would sit inert, or change temporal attention).
_TEMPORAL_MODULES = ("AnimateDiffTransformer3D", "TransformerTemporalModel", "TemporalBasicTransformerBlock")


def _temporal_prefixes(model: torch.nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if type(m).__name__ in _TEMPORAL_MODULES]


def spatial_attention_modules(model: torch.nn.Module, cross: bool) -> list:
    """[(name, Attention)] of the U-Net's spatial transformers: cross-attention (attn2 with a context)
    when `cross`, else self-attention (attn1); never an attention inside a temporal module."""
    temporal = _temporal_prefixes(model)
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, Attention) or any(name.startswith(p) for p in temporal):
            continue
        if cross and m.is_cross_attention or not cross and name.endswith("attn1") and not m.is_cross_attention:
            found.append((name, m))
    return found


def unet_level(name: str, num_levels: int) -> int:
    """Resolution level of a U-Net module from its name: 0 is the full latent resolution
    (down_blocks.0, up_blocks.{num_levels-1}), num_levels-1 the deepest (and the mid block)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return num_levels - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return num_levels - 1
    raise ValueError(f"cannot tell the U-Net level of module {name!r}")


def _num_levels(model: torch.nn.Module) -> int:
    if not isinstance(getattr(model, "down_blocks", None), torch.nn.ModuleList):
        raise TypeError(f"expected a diffusers U-Net with down_blocks (UNet2DConditionModel, UNetMotionModel), "
                        f"got {type(model).__name__}")
    return len(model.down_blocks)


# The keyword arguments our processors take per call through `cross_attention_kwargs`. diffusers'
# Attention.forward passes the same dict to every attention layer and logs, for each layer whose
# processor does not take a key, "cross_attention_kwargs [...] are not expected by ... and will be
# ignored" before dropping the key; it keeps only its own IP-Adapter keys quiet.
PER_CALL_KWARGS = frozenset({"camera_tokens", "reference_bank"})
_UNEXPECTED = re.compile(r"cross_attention_kwargs (\[.*?\]) are not expected by ")


class _PerCallKwargsFilter(logging.Filter):
    """Drops diffusers' unexpected-kwargs record when every key it names is one of PER_CALL_KWARGS and it
    comes from inside the forward of a model that has our processors (_QUIET_IN, set by its hooks); a
    record naming any other key (a user's typo, say), or from a model without them (where the keys
    would silently do nothing), still goes through."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_QUIET_IN, "depth", 0):
            return True
        found = _UNEXPECTED.match(record.getMessage())
        if found is None:
            return True
        try:
            names = ast.literal_eval(found.group(1))
        except (ValueError, SyntaxError):
            return True
        return not (names and set(names) <= PER_CALL_KWARGS)


_QUIET_IN = threading.local()


# (Both no-ops while torch.compile traces the model: nothing for Dynamo to trace or break the graph on.)
def _enter_quiet(module, args, kwargs):
    if not torch.compiler.is_compiling():
        _QUIET_IN.depth = getattr(_QUIET_IN, "depth", 0) + 1


def _leave_quiet(module, args, kwargs, output):
    if not torch.compiler.is_compiling():
        _QUIET_IN.depth = getattr(_QUIET_IN, "depth", 1) - 1


def _quiet_per_call_kwargs(model: torch.nn.Module) -> None:
    """Installs _PerCallKwargsFilter once on diffusers' attention-processor logger, and on `model` (once)
    the forward hooks that scope it to that model's calls."""
    logger = logging.getLogger("diffusers.models.attention_processor")
    if not any(isinstance(f, _PerCallKwargsFilter) for f in logger.filters):
        logger.addFilter(_PerCallKwargsFilter())
    if getattr(model, "_lightmotion_quiet_kwargs", None) is None:
        model._lightmotion_quiet_kwargs = (model.register_forward_pre_hook(_enter_quiet, with_kwargs=True),
                                           model.register_forward_hook(_leave_quiet, with_kwargs=True,
                                                                       always_call=True))


def release_quiet_per_call_kwargs(model: torch.nn.Module) -> None:
    """Take _quiet_per_call_kwargs's hooks off `model` once none of its layers has a processor that reads a
    per-call key any more (ReferenceNet.remove: the model computes exactly what it did before)."""
    handles = getattr(model, "_lightmotion_quiet_kwargs", None)
    readers = (CameraTokenAttnProcessor, ReferenceAttnProcessor)
    if handles is None or any(isinstance(getattr(m, "processor", None), readers) for m in model.modules()):
        return
    for handle in handles:
        handle.remove()
    del model._lightmotion_quiet_kwargs


def install_camera_token_processors(model: torch.nn.Module, camera_dim: int | Sequence[int], scale: float = 1.0,
                                    zero_init: bool = True) -> dict:
    """Give every spatial cross-attention of a U-Net (SD1.5 UNet2DConditionModel, AnimateDiff's
    UNetMotionModel; not the motion modules) a CameraTokenAttnProcessor knowing its name and level.

    camera_dim: one width for every layer, or one per level (a multi-scale encoder's token widths,
    `CameraEncoder.token_dims`). zero_init: zero camera projections, so the model is unchanged until
    they are trained or loaded. With a `CameraEncoder` pass zero_init=False: the encoder's output
    projections are the zero-initialised join (zero tokens give zero camera attention whatever
    these weights are), and zero weights on both sides would leave every gradient zero.
    Returns {module name: processor}."""
    levels = _num_levels(model)
    dims = [camera_dim] * levels if isinstance(camera_dim, int) else list(camera_dim)
    if len(dims) != levels:
        raise ValueError(f"camera_dim has {len(dims)} entries, the U-Net has {levels} levels")
    installed = {}
    for name, attn in spatial_attention_modules(model, cross=True):
        level = unet_level(name, levels)
        proc = CameraTokenAttnProcessor(attn.inner_dim, dims[level], scale, name=name, level=level)
        proc = proc.to(attn.to_q.weight.device, attn.to_q.weight.dtype)
        if zero_init:
            torch.nn.init.zeros_(proc.to_k_cam.weight)
            torch.nn.init.zeros_(proc.to_v_cam.weight)
        attn.set_processor(proc)
        installed[name] = proc
    _quiet_per_call_kwargs(model)
    return installed


def install_reference_processors(model: torch.nn.Module, bank: ReferenceBank | None = None) -> dict:
    """Give every spatial self-attention (attn1, not the motion modules') of a U-Net a
    ReferenceAttnProcessor named after its module. Returns {module name: processor}; the names are
    the keys of the per-call `reference_bank`. `bank`: a `ReferenceBank` shared with a writer
    (`reference_net.ReferenceNet` installs both sides and runs them in one call)."""
    installed = {}
    for name, attn in spatial_attention_modules(model, cross=False):
        proc = ReferenceAttnProcessor(name, bank)
        attn.set_processor(proc)
        installed[name] = proc
    _quiet_per_call_kwargs(model)
    return installed


def _install(ctx: PatchContext) -> None:
    if IPAdapterAttnProcessor2_0 is None:
        return
    for module in ctx.model.modules():
        if isinstance(module, Attention) and type(module.processor) is IPAdapterAttnProcessor2_0:
            ctx.set_processor(module, FusedIPAdapterAttnProcessor(module.processor))


FEATURE = register_feature(Feature(
    name="ip_adapter", install=_install,
    summary="IPAdapterAttnProcessor2_0 layers run text + image attention as one dual_cross_attention (no options)",
))
