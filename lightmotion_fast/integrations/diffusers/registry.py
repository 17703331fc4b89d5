"""The patch registry: model-family adapters, patch features, and a change log for exact restores.

`patch(pipe, **options)` finds the pipeline's denoiser (pipe.unet or pipe.transformer, or a model
passed directly, also a `torch.compile`d one), picks the adapter for its class, and runs every
registered feature that applies. Features change objects only through a PatchContext, which records
each change as (object, attribute, old value, new value); `unpatch` replays the record backwards.

The rules (issue 14):
- One patch per denoiser. The patch state lives on the model (`model._lightmotion_patch`), so the
  pipeline and its `.unet` are two handles on the same patch: `unpatch` through either takes all of
  it back. A second `patch` with other options, through either handle, replaces the first.
  `patched()` nests: an inner `patched(pipe, **other)` suspends the outer patch and resumes it on exit.
- `unpatch` takes back only what `patch` installed: an attribute or processor the user replaced
  while patched (`pipe.scheduler = ...`, `set_attn_processor(...)`) is left as the user set it, and
  forward wrappers that the user wrapped again turn into pass-throughs.
- Copies come out unpatched: `copy.deepcopy`, `copy.copy` and pickling (`torch.save`) of a patched
  pipeline, model or patched sub-object copy the unpatched object (the patch is suspended during the
  copy), so a copy never runs through closures bound to the original. Patch the copy to patch it.
  (While a copy is being taken the original is unpatched: don't copy a pipeline another thread runs.)
- `save_pretrained` of a patched pipeline or model writes exactly what the unpatched one writes.
"""
from __future__ import annotations

import contextlib
import copy
import textwrap
import warnings
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


@dataclass(frozen=True)
class Option:
    """One `patch()` keyword: its name, type and default as shown in help(patch), and what it does."""

    name: str
    type: str = "object"
    default: str = "None"
    help: str = ""


@dataclass
class Feature:
    """One thing `patch` can install. `install(ctx)` decides itself whether it applies (e.g. whether
    IP-Adapter processors are present) and makes every change through ctx. `options` are the patch()
    keywords it reads: `Option`s (documented in help(patch)) or bare names."""

    name: str
    install: Callable[["PatchContext"], None]
    options: tuple = ()
    families: tuple[str, ...] | None = None  # adapter names it applies to; None: all
    summary: str = ""                        # one line for help(patch)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name if isinstance(o, Option) else o for o in self.options)


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
    _refresh_patch_doc()
    return feature


def supported_models() -> str:
    return "; ".join(f"{a.model_class} ({', '.join(a.pipelines)})" for a in ADAPTERS)


# -- the change log ----------------------------------------------------------------------------------

def _current(obj, name: str):
    """The value `obj.name` has on the instance itself (not from its class), or _MISSING."""
    if isinstance(obj, torch.nn.Module):
        for store in ("_parameters", "_buffers", "_modules"):
            values = obj.__dict__.get(store)
            if values is not None and name in values:
                return values[name]
    if hasattr(obj, "__dict__"):
        return obj.__dict__.get(name, _MISSING)
    return getattr(obj, name, _MISSING)


def _assign(obj, name: str, value) -> None:
    """Set (or, for _MISSING, remove) an instance attribute. Not through a pipeline's __setattr__:
    diffusers would rewrite its config (model_index.json) for a component it doesn't recognise."""
    module = isinstance(obj, torch.nn.Module)
    if value is _MISSING:
        (delattr if module else object.__delattr__)(obj, name)
    else:
        (setattr if module else object.__setattr__)(obj, name, value)


@dataclass(eq=False)
class _Change:
    """One recorded change: `obj.name` (or `obj.processor` for kind "processor") went old -> new."""

    obj: object
    name: str
    old: object
    new: object
    kind: str = "attr"
    live: bool = True   # False while suspended or after undo; forward wrappers then pass through

    def get(self):
        return self.obj.processor if self.kind == "processor" else _current(self.obj, self.name)

    def put(self, value) -> None:
        if self.kind == "processor":
            self.obj.set_processor(value)
        else:
            _assign(self.obj, self.name, value)

    def revert(self) -> None:
        if self.get() is self.new:   # otherwise the user replaced it since: theirs stays
            self.put(self.old)
        self.live = False

    def reapply(self) -> None:
        if self.get() is self.old:
            self.put(self.new)
        self.live = True


@dataclass
class PatchContext:
    """The pipeline being patched, its denoiser and adapter, the options, and the change log.

    `data` holds live state a feature wants to reach later (e.g. LightMotion's sampler)."""

    pipe: object
    model: torch.nn.Module
    adapter: ModelAdapter
    options: dict
    installed: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    _changes: list[_Change] = field(default_factory=list, repr=False)
    _hooks: list[_Change] = field(default_factory=list, repr=False)      # state attribute, copy/save hooks
    _finalizers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _roots: dict = field(default_factory=dict, repr=False)                # id -> object that gets hooks

    # -- what features call --------------------------------------------------------------------
    def set_processor(self, attn: torch.nn.Module, processor) -> None:
        """Give one diffusers Attention module a new processor; unpatch gives back the old object."""
        change = _Change(attn, "processor", attn.processor, processor, kind="processor")
        change.put(processor)
        self._changes.append(change)

    def processor_set_here(self, attn: torch.nn.Module) -> bool:
        """Whether a feature of this patch already gave `attn` its current processor (so that a feature
        replacing processors outright can refuse to drop another's instead of silently doing so)."""
        return any(c.kind == "processor" and c.obj is attn for c in self._changes)

    def set_attr(self, obj, name: str, value) -> None:
        """Set an instance attribute; unpatch restores the old value, or removes one that was absent."""
        change = _Change(obj, name, _current(obj, name), value)
        change.put(value)
        self._changes.append(change)
        self._roots.setdefault(id(obj), obj)

    def wrap_forward(self, module: torch.nn.Module, fn: Callable) -> None:
        """Replace module.forward on this instance with `fn(original_forward, *args, **kwargs)`.
        Once unpatched (or suspended) the wrapper, if someone still holds it, calls the original."""
        original = module.forward
        change = None

        def forward(*args, **kwargs):
            if change is None or change.live:
                return fn(original, *args, **kwargs)
            return original(*args, **kwargs)

        self.set_attr(module, "forward", forward)
        change = self._changes[-1]

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Run `fn` when the patch is finally taken back (not when it is only suspended)."""
        self._finalizers.append(fn)

    # -- life cycle ----------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._hooks) and self._hooks[0].live

    def attach(self) -> None:
        """Make the patch findable from the model and install the copy/save hooks on every root."""
        self._hooks.append(_Change(self.model, _STATE_ATTR, _current(self.model, _STATE_ATTR), self))
        roots = {id(self.pipe): self.pipe, id(self.model): self.model, **self._roots}
        for obj in roots.values():
            self._hook(obj, "__deepcopy__", lambda memo, obj=obj: self._copy_unpatched(obj, memo))
            self._hook(obj, "__reduce_ex__", lambda protocol, obj=obj: self._reduce_unpatched(obj, protocol))
            if obj is self.pipe or obj is self.model:
                save = getattr(obj, "save_pretrained", None)
                if callable(save):
                    self._hook(obj, "save_pretrained", self._unpatched_call(save))
        for hook in self._hooks:
            hook.put(hook.new)

    def _hook(self, obj, name, fn) -> None:
        if hasattr(obj, "__dict__"):
            self._hooks.append(_Change(obj, name, _current(obj, name), fn))

    def suspend(self) -> None:
        """Take every change back but keep them, to `resume` later with the very same objects."""
        for change in reversed(self._hooks + self._changes):
            change.revert()

    def resume(self) -> None:
        for change in self._changes + self._hooks:
            change.reapply()

    def undo(self) -> None:
        self.suspend()
        self._changes.clear()
        self._hooks.clear()
        self._roots.clear()
        while self._finalizers:
            self._finalizers.pop()()
        self.installed.clear()

    @contextlib.contextmanager
    def _suspended(self) -> Iterator[None]:
        live = self.active
        if live:
            self.suspend()
        try:
            yield
        finally:
            if live:
                self.resume()

    def _copy_unpatched(self, obj, memo):
        with self._suspended():
            return copy.deepcopy(obj, memo)

    def _reduce_unpatched(self, obj, protocol):
        with self._suspended():
            clean = copy.deepcopy(obj)
        return clean.__reduce_ex__(protocol)

    def _unpatched_call(self, method):
        def call(*args, **kwargs):
            with self._suspended():
                return method(*args, **kwargs)

        call.__doc__ = method.__doc__
        return call


# -- finding the model -------------------------------------------------------------------------------

def _unwrap_compiled(model):
    """torch.compile returns an OptimizedModule around the real model; patch the real one."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(model, torch.nn.Module) and isinstance(inner, torch.nn.Module) else model


def find_model(pipe) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            return _unwrap_compiled(model)
    if isinstance(pipe, torch.nn.Module):
        return _unwrap_compiled(pipe)
    raise ValueError(f"pipe must be a diffusers pipeline with a .unet or .transformer, or a model; "
                     f"got {type(pipe).__name__}. Supported: {supported_models()}")


def find_adapter(model: torch.nn.Module) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise ValueError(f"lightmotion_fast has no adapter for {type(model).__name__}. "
                     f"Supported models: {supported_models()}")


def _known_options() -> set[str]:
    return {opt for f in FEATURES for opt in f.option_names}


def _check_options(options: dict, adapter: ModelAdapter) -> None:
    """Unknown options are a TypeError; an option no feature of this model family reads a ValueError."""
    unknown = set(options) - _known_options()
    if unknown:
        raise TypeError(f"patch() got unknown option(s) {sorted(unknown)}; "
                        f"known: {sorted(_known_options()) or 'none'}")
    for name, value in options.items():
        if value is None:   # None means "not given" for every option
            continue
        readers = [f for f in FEATURES if name in f.option_names]
        if any(f.families is None or adapter.name in f.families for f in readers):
            continue
        families = sorted({fam for f in readers for fam in (f.families or ())})
        pipelines = sorted({p for a in ADAPTERS if a.name in families for p in a.pipelines})
        raise ValueError(f"patch() option {name}= applies to the {', '.join(families)} model families "
                         f"({', '.join(pipelines)}), not to {adapter.model_class} ({adapter.name}); remove it")


def _live(obj) -> PatchContext | None:
    try:
        model = find_model(obj)
    except ValueError:
        return None
    ctx = getattr(model, "__dict__", {}).get(_STATE_ATTR)
    return ctx if isinstance(ctx, PatchContext) else None


# -- the public functions ------------------------------------------------------------------------------

def patch(pipe, **options):
    """Install lightmotion_fast's fused paths into a diffusers pipeline (or a bare denoiser model).

    Idempotent: patching again with the same options does nothing; with other options the old patch is
    taken back first. A patch that installs nothing warns and leaves `pipe` unpatched. Returns `pipe`.

    >>> lightmotion_fast.patch(pipe)                      # accelerate what the pipeline already runs
    >>> lightmotion_fast.unpatch(pipe)                    # original processors and forwards, exactly
    """
    model = find_model(pipe)
    adapter = find_adapter(model)
    _check_options(options, adapter)
    current = _live(pipe)
    if current is not None:
        if current.pipe is pipe and _same_options(current.options, options):
            return pipe
        current.undo()
    ctx = PatchContext(pipe=pipe, model=model, adapter=adapter, options=_snapshot(dict(options)))
    try:
        for feature in FEATURES:
            if feature.families is None or adapter.name in feature.families:
                before = len(ctx._changes)
                feature.install(ctx)
                if len(ctx._changes) > before:
                    ctx.installed.append(feature.name)
        if not ctx.installed:
            ctx.undo()
            warnings.warn(f"lightmotion_fast.patch installed nothing into {type(model).__name__} "
                          f"({adapter.name}) with options {sorted(options) or 'none'}: no feature applies "
                          f"(features: {', '.join(f.name for f in FEATURES)}); it is left unpatched",
                          UserWarning, stacklevel=2)
            return pipe
        ctx.attach()
    except BaseException:
        ctx.undo()
        raise
    return pipe


def unpatch(pipe):
    """Take back everything `patch` installed (through this handle or another one on the same
    denoiser); what the user changed since is kept. Not patched: returned unchanged."""
    ctx = _live(pipe)
    if ctx is not None:
        ctx.undo()
    return pipe


def is_patched(pipe) -> bool:
    """True while a patch is installed on this pipeline's denoiser (or on this model)."""
    return _live(pipe) is not None


def patch_state(pipe) -> PatchContext | None:
    """The live PatchContext of a patched pipeline or model: `.installed` names the features,
    `.options` the options; None when not patched."""
    return _live(pipe)


@contextlib.contextmanager
def patched(pipe, **options) -> Iterator[object]:
    """`with patched(pipe, **options): ...` patches on entry and restores on exit, also after an
    exception. Nested: an inner block with other options suspends the outer patch and brings it back
    on exit; with the same options it changes nothing."""
    outer = _live(pipe)
    if outer is not None and outer.pipe is pipe and _same_options(outer.options, options):
        yield pipe
        return
    find_adapter(find_model(pipe))
    if outer is not None:
        outer.suspend()
    try:
        patch(pipe, **options)
        try:
            yield pipe
        finally:
            unpatch(pipe)
    finally:
        if outer is not None:
            outer.resume()


def _snapshot(value):
    """The options as given, with their containers (dicts, lists, sets, tuples) copied: a caller who
    changes a dict after patching and patches again with it gets the new values (the patch keeps its
    own copy to compare with). Tensors and other objects are kept as they are."""
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return type(value)(_snapshot(v) for v in value) if type(value) in (list, tuple, set) else value
    return value


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


# -- help(patch), generated from the features ------------------------------------------------------------

_PATCH_DOC = patch.__doc__


def options_help() -> str:
    """Every patch() option with its type, default and the model families it applies to."""
    wrap = textwrap.TextWrapper(width=96, subsequent_indent="      ")
    lines = ["Options (keyword-only; None means not given). An option that no feature of the model's",
             "family reads is a ValueError; a patch that installs nothing warns and patches nothing.", ""]
    for feature in FEATURES:
        if feature.families is None:
            where = "every model family"
        else:
            pipes = [p for a in ADAPTERS if a.name in feature.families for p in a.pipelines]
            where = ", ".join(feature.families) + (f" ({', '.join(pipes)})" if pipes else "")
        lines += wrap.wrap(f"[{feature.name}] applies to {where}. {feature.summary}")
        for opt in feature.options:
            if isinstance(opt, Option):
                lines.append(f"  {opt.name}: {opt.type} = {opt.default}")
                lines += textwrap.wrap(opt.help, 96, initial_indent="      ", subsequent_indent="      ")
            else:
                lines.append(f"  {opt}")
        lines.append("")
    lines += wrap.wrap("Models: " + supported_models())
    return "\n".join(lines)


def _refresh_patch_doc() -> None:
    patch.__doc__ = _PATCH_DOC + "\n" + "\n".join("    " + line for line in options_help().splitlines()) + "\n"
