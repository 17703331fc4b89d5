"""The patch registry: model-family adapters, patch features, and an undo log for exact restores.

`patch(pipe, **options)` finds the pipeline's denoiser (pipe.unet or pipe.transformer, or a model
passed directly), picks the adapter for its class, and runs every registered feature that applies.
Features change the model only through a PatchContext, which records each change; `unpatch` replays
the record backwards, so the original processor objects, forwards and attributes come back exactly
(the idea of diffusers' hook registry, without touching the model classes).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

_STATE_ATTR = "_lightmotion_patch"
_MISSING = object()


@dataclass(frozen=True)
class ModelAdapter:
    """What the library knows about one diffusers model family."""

    name: str                    # e.g. "animatediff"
    model_class: str             # diffusers class name of the denoiser, e.g. "UNetMotionModel"
    latent_layout: str           # einops layout of the video latent the pipeline samples
    pipelines: tuple[str, ...]   # pipelines that use this denoiser (for messages and docs)
    description: str = ""

    def matches(self, model) -> bool:
        return any(cls.__name__ == self.model_class for cls in type(model).__mro__)


@dataclass
class Feature:
    """One thing `patch` can install. `install(ctx)` decides itself whether it applies (e.g. whether
    IP-Adapter processors are present) and makes every change through ctx."""

    name: str
    install: Callable[["PatchContext"], None]
    options: tuple[str, ...] = ()            # patch() keyword options this feature reads
    families: tuple[str, ...] | None = None  # adapter names it applies to; None: all


ADAPTERS: list[ModelAdapter] = []
FEATURES: list[Feature] = []


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    if any(a.name == adapter.name for a in ADAPTERS):
        raise ValueError(f"a model adapter named {adapter.name!r} is already registered")
    ADAPTERS.append(adapter)
    return adapter


def register_feature(feature: Feature) -> Feature:
    if any(f.name == feature.name for f in FEATURES):
        raise ValueError(f"a patch feature named {feature.name!r} is already registered")
    FEATURES.append(feature)
    return feature


def supported_models() -> str:
    return "; ".join(f"{a.model_class} ({', '.join(a.pipelines)})" for a in ADAPTERS)


@dataclass
class PatchContext:
    """The pipeline being patched, its denoiser and adapter, the options, and the undo log."""

    pipe: object
    model: torch.nn.Module
    adapter: ModelAdapter
    options: dict
    installed: list[str] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def set_processor(self, attn: torch.nn.Module, processor) -> None:
        """Give one diffusers Attention module a new processor; unpatch gives back the old object."""
        original = attn.processor
        attn.set_processor(processor)
        self._undo.append(lambda: attn.set_processor(original))

    def set_attr(self, obj, name: str, value) -> None:
        """Set an attribute; unpatch restores the old value, or removes an attribute that was absent."""
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)
        modules = obj.__dict__.get("_modules") if isinstance(obj, torch.nn.Module) else None
        if modules is not None and name in modules:
            old = modules[name]
        setattr(obj, name, value)

        def restore():
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(restore)

    def wrap_forward(self, module: torch.nn.Module, fn: Callable) -> None:
        """Replace module.forward on this instance with `fn(original_forward, *args, **kwargs)`."""
        original = module.forward

        def forward(*args, **kwargs):
            return fn(original, *args, **kwargs)

        self.set_attr(module, "forward", forward)

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Run `fn` when the patch is taken back (for state a feature keeps elsewhere)."""
        self._undo.append(fn)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.installed.clear()


def find_model(pipe) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            return model
    if isinstance(pipe, torch.nn.Module):
        return pipe
    raise ValueError(f"pipe must be a diffusers pipeline with a .unet or .transformer, or a model; "
                     f"got {type(pipe).__name__}. Supported: {supported_models()}")


def find_adapter(model: torch.nn.Module) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise ValueError(f"lightmotion_fast has no adapter for {type(model).__name__}. "
                     f"Supported models: {supported_models()}")


def _known_options() -> set[str]:
    return {opt for f in FEATURES for opt in f.options}


def patch(pipe, **options):
    """Install lightmotion_fast's fused paths into a diffusers pipeline (or a bare denoiser model).

    Idempotent: patching again with the same options does nothing; with other options the old patch is
    taken back first. Returns `pipe`.

    >>> lightmotion_fast.patch(pipe)                      # accelerate what the pipeline already runs
    >>> lightmotion_fast.unpatch(pipe)                    # original processors and forwards, exactly
    """
    unknown = set(options) - _known_options()
    if unknown:
        raise TypeError(f"patch() got unknown option(s) {sorted(unknown)}; "
                        f"known: {sorted(_known_options()) or 'none'}")
    model = find_model(pipe)
    adapter = find_adapter(model)
    current: PatchContext | None = getattr(pipe, _STATE_ATTR, None)
    if current is not None:
        if _same_options(current.options, options):
            return pipe
        unpatch(pipe)
    ctx = PatchContext(pipe=pipe, model=model, adapter=adapter, options=dict(options))
    try:
        for feature in FEATURES:
            if feature.families is None or adapter.name in feature.families:
                before = len(ctx._undo)
                feature.install(ctx)
                if len(ctx._undo) > before:
                    ctx.installed.append(feature.name)
    except BaseException:
        ctx.undo()
        raise
    object.__setattr__(pipe, _STATE_ATTR, ctx)
    return pipe


def unpatch(pipe):
    """Take back everything `patch` installed; a pipeline that is not patched is returned unchanged."""
    ctx: PatchContext | None = pipe.__dict__.get(_STATE_ATTR)
    if ctx is not None:
        ctx.undo()
        object.__delattr__(pipe, _STATE_ATTR)
    return pipe


def is_patched(pipe) -> bool:
    return _STATE_ATTR in getattr(pipe, "__dict__", {})


def patch_state(pipe) -> PatchContext | None:
    """The live PatchContext of a patched pipeline (which features are installed, with what options)."""
    return getattr(pipe, "__dict__", {}).get(_STATE_ATTR)


@contextlib.contextmanager
def patched(pipe, **options) -> Iterator[object]:
    """`with patched(pipe): ...` patches on entry and restores on exit, also after an exception."""
    patch(pipe, **options)
    try:
        yield pipe
    finally:
        unpatch(pipe)


def _same_options(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if x is y:
            continue
        if type(x) is not type(y) or isinstance(x, torch.Tensor):
            return False
        try:
            if not bool(x == y):
                return False
        except (RuntimeError, TypeError, ValueError):  # containers of tensors: compare by identity only
            return False
    return True
