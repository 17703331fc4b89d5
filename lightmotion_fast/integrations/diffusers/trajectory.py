"""Patch feature "trajectory" and `TrajectoryAttnProcessor` (specs/trajectory_attention.md).

`patch(pipe, trajectories=..., valid=..., traj_weights=...)` on a StableVideoDiffusionPipeline (or a
bare UNetSpatioTemporalConditionModel) installs a `TrajectoryAttnProcessor` on attn1 of every
`TemporalBasicTransformerBlock`. The processor runs the block's original temporal attention and adds
the trajectory branch:  attn1(x) + to_out(trajectory_attention(to_q x, to_k x, to_v x)),  x the
normalised input [(b h w), f, c]. The branch's weights live in the processor (an nn.Module, so they
move with `.to()` and appear in the UNet's state_dict while patched). `unpatch` restores the
original processors and forward exactly.

Options:
  trajectories  TrajectoryTables, or coords [f, n, 2] (x, y) in pixels of the generated frames (tables
                are then built at the first UNet call from the latent size, seed 0, ratio 2)
  valid         [f, n] bool for coords (None: all valid)
  traj_weights  None (initialise from the temporal attention: Q, K, V copied, output projection zero,
                so outputs are unchanged until trained), a state dict (keys as from
                `trajectory_state_dict`, with or without ".processor"), or the official release's
                format: a list of tensors, 5 per branch (to_q, to_k, to_v, to_out.0.weight,
                to_out.0.bias) in module order.
  semantics     "per_trajectory" (default: the paper's attention along each trajectory, as the official
                xformers processor computes it; subset drawn once per level from a seeded generator)
                or "released" (what the released code computes on torch 2.x, to reproduce its demos:
                on every block call a fresh subset of int(H·W/4)·8 trajectories from the *global*
                generator, float64 coordinates scaled by W/W0 and truncated, any non-zero visibility
                visible, and two trajectories per softmax; see reference/trajectory_attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from lightmotion_fast.camera.trajectories import TrajectoryLevel, TrajectoryTables, level_sizes
from lightmotion_fast.integrations.diffusers.registry import Feature, Option, PatchContext, register_feature
from lightmotion_fast.ops.trajectory_attention import TrajectoryIndex, trajectory_attention
from lightmotion_fast.reference.trajectory_attention import (
    official_trajectory_branch,
    released_group,
    released_level_indices,
    released_selection,
    released_visible,
)

PARAM_NAMES = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
SEMANTICS = ("per_trajectory", "released")


class TrajectoryState:
    """What all processors of one UNet share: the tables and the batch size of the current call, and
    the semantics ("per_trajectory" or "released", see the module docstring)."""

    def __init__(self, trajectories, valid=None, vae_scale_factor: int = 8, semantics: str = "per_trajectory"):
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        if isinstance(trajectories, TrajectoryTables) and valid is not None:
            raise ValueError("valid= cannot be combined with trajectories=TrajectoryTables(...): the tables hold "
                             "their visibility already; pass valid to TrajectoryTables(coords, valid, ...)")
        self.semantics = semantics
        if semantics == "released":
            valid = _released_inputs(self, trajectories, valid)
        if isinstance(trajectories, TrajectoryTables):
            self.tables, self.coords, self.valid = trajectories, None, None
        else:
            if not isinstance(trajectories, torch.Tensor):
                raise TypeError("trajectories must be a TrajectoryTables or a [f, n, 2] tensor of (x, y) "
                                f"pixel coordinates, got {type(trajectories).__name__}")
            from lightmotion_fast.camera.trajectories import trajectories_from_tracks

            self.coords, self.valid = trajectories_from_tracks(trajectories, valid)
            self.tables = None
        self.vae_scale_factor = vae_scale_factor
        self.batch: int | None = None
        self._built: dict[tuple[int, int], TrajectoryTables] = {}   # tables made from coords, per latent size
        self._released_sizes: dict[int, tuple[int, int]] = {}        # n_pix -> (h, w) of the current call

    @property
    def frames(self) -> int:
        return self.tables.frames if self.tables is not None else self.coords.shape[0]

    def begin_call(self, sample: torch.Tensor) -> None:
        """sample: the UNet's input [b f c h w]. Tables built from coords are made here, once per latent
        size, outside any compiled graph: under torch.compile they must exist already (pass a
        TrajectoryTables to patch, or run the model once before compiling)."""
        if sample.ndim != 5:
            raise ValueError(f"the trajectory branch expects a [b f c h w] sample, got {tuple(sample.shape)}")
        batch, frames, _, height, width = sample.shape
        if frames != self.frames:
            raise ValueError(f"trajectories have {self.frames} frames but the UNet is called with {frames}")
        if self.semantics == "released":
            # Tables are drawn afresh on every block call (released_level): only the level sizes here.
            self._released_sizes = {h * w: (h, w) for h, w in level_sizes((height, width), 4)}
            s = self.vae_scale_factor
            self.released_frame_size = self._released_given_frame_size or (height * s, width * s)
            self.batch = batch
            return
        if self.coords is not None and (self.tables is None or self.tables.sizes[0] != (height, width)):
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "the trajectory tables for a {}x{} latent do not exist yet and cannot be built inside a "
                    "compiled graph: patch with trajectories=TrajectoryTables(coords, valid, frame_size, "
                    "latent_size), or call the model once before torch.compile".format(height, width))
            s = self.vae_scale_factor
            self.tables = self._built.get((height, width))
            if self.tables is None:
                self.tables = self._built[(height, width)] = TrajectoryTables(
                    self.coords, self.valid, frame_size=(height * s, width * s), latent_size=(height, width),
                    levels=4)
        elif self.tables.sizes[0] != (height, width):
            raise ValueError(f"the trajectory tables were built for a {self.tables.sizes[0]} latent, "
                             f"the UNet is called with {(height, width)}")
        if not torch.compiler.is_compiling():
            self.tables.prepare(sample.device)  # every level's tables on the device before the blocks run
        self.batch = batch


    def released_level(self, n_pix: int, device: torch.device) -> tuple[TrajectoryLevel, int]:
        """The released processor's per-call tables at the level of n_pix latent pixels, and its group
        size. Draws from the global generator (torch.randperm), exactly once per call as the released
        code does, so a fixed torch.manual_seed reproduces its subsets block by block."""
        size = self._released_sizes.get(int(n_pix))
        if size is None:
            raise ValueError(f"no UNet level has {n_pix} latent pixels; levels: "
                             f"{[f'{h}x{w}' for h, w in self._released_sizes.values()]}")
        selection = released_selection(self.released_coords.shape[1], size)
        group = released_group(selection.numel(), size)
        idx = released_level_indices(self.released_coords[:, selection], self.released_frame_size, size)
        index = TrajectoryIndex(idx, self.released_valid[:, selection].contiguous(), size[0] * size[1])
        return TrajectoryLevel(size, selection, index.to(device)), group


def _released_inputs(state: TrajectoryState, trajectories, valid):
    """Keep the released semantics' own copies: coordinates in float64 (its arithmetic), visibility as
    `!= 0`. Returns the bool validity for the per-trajectory checks that follow."""
    if isinstance(trajectories, TrajectoryTables):
        state.released_coords = trajectories.coords.to(torch.float64)
        state.released_valid = trajectories.valid.clone()
        state._released_given_frame_size = trajectories.frame_size
        return valid
    if not isinstance(trajectories, torch.Tensor):
        return valid  # the TypeError below names what is expected
    state.released_coords = trajectories.detach().cpu().to(torch.float64)
    if valid is None:
        valid = torch.ones(trajectories.shape[:-1], dtype=torch.bool)
    elif isinstance(valid, torch.Tensor):
        valid = released_visible(valid)
    state.released_valid = valid
    state._released_given_frame_size = None   # the generated frame size, known at each call
    return valid


class TrajectoryAttnProcessor(torch.nn.Module):
    """attn1's original processor plus the trajectory branch (to_q, to_k, to_v without bias; to_out
    with bias). implementation="fused" runs the `trajectory_attention` op on densely projected
    q, k, v; "official" recomputes the branch the way the official processor does (a benchmark and
    test peer; it uses the same tables' trajectory selection)."""

    def __init__(self, hidden_size: int, heads: int, base_processor, state: TrajectoryState | None = None,
                 implementation: str = "fused", mask_invalid: bool = False, deterministic: bool = True):
        super().__init__()
        if implementation not in ("fused", "official"):
            raise ValueError(f"implementation must be 'fused' or 'official', got {implementation!r}")
        self.hidden_size, self.heads = hidden_size, heads
        self.to_q = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_k = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_v = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(hidden_size, hidden_size), torch.nn.Dropout(0.0)])
        # Plain attributes, not submodules: the base processor's state stays where it was.
        self.__dict__["base_processor"] = base_processor
        self.__dict__["state"] = state
        self.implementation = implementation
        self.mask_invalid = mask_invalid
        self.deterministic = deterministic

    @classmethod
    def from_attention(cls, attn, state: TrajectoryState | None = None, **kwargs) -> "TrajectoryAttnProcessor":
        """Initialised for training from the temporal attention: Q, K, V copied, output projection zero."""
        proc = cls(attn.to_q.in_features, attn.heads, attn.processor, state, **kwargs)
        proc.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
        with torch.no_grad():
            for name in ("to_q", "to_k", "to_v"):
                getattr(proc, name).weight.copy_(getattr(attn, name).weight)
            proc.to_out[0].weight.zero_()
            proc.to_out[0].bias.zero_()
        return proc

    def branch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The trajectory branch alone: [(b s), f, c] -> [(b s), f, c]."""
        state = self.state
        if state is None or state.batch is None:
            raise RuntimeError("TrajectoryAttnProcessor has no trajectories for this call: install it with "
                               "lightmotion_fast.patch(pipe, trajectories=...)")
        rows, frames, channels = hidden_states.shape
        batch = state.batch
        n_pix = rows // batch
        if state.semantics == "released":
            if self.implementation == "official":
                raise ValueError("implementation='official' recomputes the per-trajectory semantics; "
                                 "with semantics='released' use implementation='fused'")
            level, group = state.released_level(n_pix, hidden_states.device)
        else:
            level, group = state.tables.level(n_pix, hidden_states.device), 1
        if self.implementation == "official":
            tables = state.tables
            return official_trajectory_branch(
                hidden_states, tables.coords.to(hidden_states.device), tables.valid.to(hidden_states.device),
                tables.frame_size, level.size, batch, self.to_q.weight, self.to_k.weight, self.to_v.weight,
                self.to_out[0].weight, self.to_out[0].bias, self.heads, mask_invalid=self.mask_invalid,
                selection=level.selection)
        heads = self.heads

        def project(layer):
            return rearrange(layer(hidden_states), "(b s) f (h d) -> b s f h d", b=batch, h=heads)

        out = trajectory_attention(project(self.to_q), project(self.to_k), project(self.to_v), level.index,
                                   mask_invalid=self.mask_invalid, deterministic=self.deterministic, group=group)
        out = F.linear(rearrange(out, "b s f h d -> (b s) f (h d)"), self.to_out[0].weight)
        # to_out's bias only where a token landed (the official order: to_out per token, then average).
        landed = rearrange(level.landed, "f s -> 1 s f 1").to(out.dtype)
        out = rearrange(out, "(b s) f c -> b s f c", b=batch) + landed * self.to_out[0].bias
        return self.to_out[1](rearrange(out, "b s f c -> (b s) f c"))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        base = self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is not None:  # not the temporal self-attention: nothing to add
            return base
        return base + self.branch(hidden_states)


# ---------------------------------------------------------------------------------------------
# Installing and weights


def temporal_attentions(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, attn1) of every TemporalBasicTransformerBlock, in module order (the official order)."""
    from diffusers.models.attention import TemporalBasicTransformerBlock

    return [(f"{name}.attn1", m.attn1) for name, m in unet.named_modules()
            if isinstance(m, TemporalBasicTransformerBlock)]


def trajectory_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The branch weights of a patched UNet, keyed '<attn1 name>.<param>' (param in PARAM_NAMES)."""
    out = {}
    for name, attn in temporal_attentions(unet):
        if isinstance(attn.processor, TrajectoryAttnProcessor):
            for key, value in attn.processor.state_dict().items():
                out[f"{name}.{key}"] = value
    return out


def load_trajectory_weights(processors: list[tuple[str, TrajectoryAttnProcessor]], weights) -> None:
    """Load branch weights from a state dict or from the official list-of-tensors format."""
    expected = [(name, p) for name, _ in processors for p in PARAM_NAMES]
    if isinstance(weights, (list, tuple)):
        if len(weights) != len(expected):
            raise ValueError(f"traj_weights as a list must hold {len(expected)} tensors (5 per branch: "
                             f"{', '.join(PARAM_NAMES)}; {len(processors)} branches), got {len(weights)}")
        weights = {f"{name}.{p}": t for (name, p), t in zip(expected, weights)}
    if not isinstance(weights, dict):
        raise TypeError(f"traj_weights must be None, a state dict or a list of tensors, got {type(weights).__name__}")
    weights = {k.replace(".processor.", "."): v for k, v in weights.items()}
    missing = [f"{n}.{p}" for n, p in expected if f"{n}.{p}" not in weights]
    if missing:
        raise ValueError(f"traj_weights lacks {len(missing)} entries, e.g. {missing[:3]}")
    for name, proc in processors:
        with torch.no_grad():
            params = dict(proc.named_parameters())
            for p in PARAM_NAMES:
                value = weights[f"{name}.{p}"]
                if tuple(value.shape) != tuple(params[p].shape):
                    raise ValueError(f"traj_weights['{name}.{p}'] has shape {tuple(value.shape)}, "
                                     f"expected {tuple(params[p].shape)}")
                params[p].copy_(value)


def install_trajectory_processors(ctx: PatchContext, trajectories, valid=None, weights=None,
                                  semantics: str = "per_trajectory", **processor_kwargs) -> TrajectoryState:
    unet = ctx.model
    scale = getattr(ctx.pipe, "vae_scale_factor", 8) if ctx.pipe is not unet else 8
    state = TrajectoryState(trajectories, valid, vae_scale_factor=int(scale), semantics=semantics)
    attns = temporal_attentions(unet)
    if not attns:
        raise ValueError(f"{type(unet).__name__} has no TemporalBasicTransformerBlock for the trajectory branch")
    processors = [(name, TrajectoryAttnProcessor.from_attention(attn, state, **processor_kwargs))
                  for name, attn in attns]
    if weights is not None:
        load_trajectory_weights(processors, weights)
    for (_, attn), (_, proc) in zip(attns, processors):
        ctx.set_processor(attn, proc)

    def forward(original, sample, *args, **kwargs):
        state.begin_call(sample)
        return original(sample, *args, **kwargs)

    ctx.wrap_forward(unet, forward)
    return state


def _install(ctx: PatchContext) -> None:
    trajectories = ctx.options.get("trajectories")
    if trajectories is None:
        for name in ("valid", "traj_weights", "semantics"):
            if ctx.options.get(name) is not None:
                raise ValueError(f"patch() got {name}= without trajectories=")
        return
    semantics = ctx.options.get("semantics")
    if ctx.adapter.name != "svd":   # CogVideoX, Wan: the branch in the DiT's 3D attention
        if semantics not in (None, "per_trajectory"):
            raise ValueError(f"semantics={semantics!r} reproduces the released SVD code; on {ctx.adapter.name} "
                             "the trajectory branch has only the per-trajectory semantics")
        from lightmotion_fast.integrations.diffusers.trajectory_dit import install_dit_trajectory_processors

        install_dit_trajectory_processors(ctx, trajectories, ctx.options.get("valid"), ctx.options.get("traj_weights"))
        return
    install_trajectory_processors(ctx, trajectories, ctx.options.get("valid"), ctx.options.get("traj_weights"),
                                  semantics="per_trajectory" if semantics is None else semantics)


FEATURE = register_feature(Feature(
    name="trajectory",
    install=_install,
    options=(
        Option("trajectories", "TrajectoryTables | Tensor [f, n, 2]", "None",
               "trajectory tables, or (x, y) pixel coordinates of the generated frames; without it this feature "
               "installs nothing"),
        Option("valid", "bool Tensor [f, n]", "None", "visibility of each coordinate (None: all visible)"),
        Option("traj_weights", "state dict | official list | None", "None",
               "branch weights; None initialises from the temporal attention (output projection zero)"),
        Option("semantics", '"per_trajectory" | "released"', '"per_trajectory"',
               "per_trajectory: the paper's attention along each trajectory (official xformers processor); "
               "released: the released SDPA code's behaviour (two random trajectories per softmax, a fresh "
               "subset from the global generator on every call), to reproduce its published demos"),
    ),
    families=("svd", "cogvideox", "wan"),
))
