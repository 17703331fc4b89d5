"""Training the trajectory branch (issue 12, item 4): only the branch learns, through the fused op.

    lightmotion_fast.patch(unet, trajectories=coords0, valid=valid0)      # branch: Q/K/V inherited, to_out 0
    trainer = TrajectoryBranchTrainer(unet, edm_v_objective(), predict, lr=1e-5, max_grad_norm=1.0)
    for latents, coords, valid in data:                                   # one clip's latents and trajectories
        loss = trainer.step(latents, coords, valid)
    save_branch(unet, "branch.pt", format="official")                     # or format="state_dict"
    lightmotion_fast.patch(pipe, trajectories=..., traj_weights=load_branch_file("branch.pt"))

`predict(model, model_input, timestep)` calls the denoiser with the rest of its conditioning bound,
e.g. for SVD `lambda unet, x, t: unet(torch.cat([x, image_latents], 2), t, image_embeds, added_ids).sample`;
an objective draws the noise level and returns (model_input, timestep, target); the loss is the mean
squared error between the prediction and the target. Trajectory attention's forward and backward
both run in the fused op (`lightmotion_fast.ops.trajectory_attention`) whenever its Triton backend is
selected (CUDA, or the interpreter in the tests); the rest of the model is frozen.

Recipe for real data (frames + flow -> trajectories -> branch loss), as the paper trains the branch
(its training data are frames, predicted optical flow and occlusion masks):
  1. Per clip, resize the frames to the generation size (H0, W0) and encode them with the pipeline's
     VAE: latents [b f c h w] (SVD, CogVideoX) or [b c f h w] (Wan), scaled by the VAE's scaling factor.
     For SVD also encode the first frame (the image condition) and its CLIP embedding, as the pipeline
     does; for the DiTs encode the caption.
  2. Estimate optical flow between consecutive frames with any flow network run by the user, at (H0, W0),
     forward and backward. Chain it from frame 0 into trajectories [f, n, 2] (x, y) with a validity
     mask [f, n] from a forward-backward consistency test: `lightmotion_fast.camera.trajectory_sources`
     builds these (trajectories from flow); point tracks from a tracker work as well
     (`trajectories_from_tracks`). For the DiTs, give one trajectory frame per video frame
     ((t - 1)·4 + 1 frames): the branch reads every fourth, one per latent frame.
  3. Patch the model once with the first clip's trajectories (the branch starts from the host
     attention's Q/K/V, output projection zero, so training starts from the unchanged model), build
     the trainer with the objective of the model's scheduler (`edm_v_objective` for SVD,
     `ddpm_objective(scheduler)` for CogVideoX, `flow_objective` for Wan) and call `step(latents,
     coords, valid)` per clip: it installs the clip's trajectories, draws noise and a noise level,
     and takes one optimizer step on the branch parameters with the gradient norm clipped.
  4. Save the branch with `save_branch` (the official list of five tensors per branch, or a state
     dict) and load it for inference with `patch(pipe, trajectories=..., traj_weights=...)`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from lightmotion_fast.integrations.diffusers.registry import find_model
from lightmotion_fast.integrations.diffusers.trajectory import (
    PARAM_NAMES,
    TrajectoryAttnProcessor,
    load_trajectory_weights,
)
from lightmotion_fast.integrations.diffusers.trajectory_dit import DiTTrajectoryState

# An objective maps (clean latents x0, noise ε, generator) to (model input, timestep, target).
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], tuple]


# ---------------------------------------------------------------------------------------------
# The branch of a patched model


def branch_processors(model) -> list[tuple[str, TrajectoryAttnProcessor]]:
    """(attention module name, trajectory processor) of every branch of a patched pipeline or model, in
    module order (the order of the official list format); any model family."""
    model = find_model(model)
    return [(name, m.processor) for name, m in model.named_modules()
            if isinstance(getattr(m, "processor", None), TrajectoryAttnProcessor)]


def _processors_or_raise(model) -> list[tuple[str, TrajectoryAttnProcessor]]:
    processors = branch_processors(model)
    if not processors:
        raise ValueError(f"{type(find_model(model)).__name__} has no trajectory branch: patch it first with "
                         "lightmotion_fast.patch(model, trajectories=...)")
    return processors


def branch_parameters(model) -> list[torch.nn.Parameter]:
    """The trainable parameters of every branch (to_q, to_k, to_v, to_out.0.weight, to_out.0.bias each)."""
    return [p for _, proc in _processors_or_raise(model) for p in proc.parameters()]


def branch_state_dict(model) -> dict[str, torch.Tensor]:
    """The branch weights keyed '<attention name>.<param>' (param in PARAM_NAMES), detached copies."""
    return {f"{name}.{p}": proc.state_dict()[p].detach().clone()
            for name, proc in _processors_or_raise(model) for p in PARAM_NAMES}


def branch_weight_list(model) -> list[torch.Tensor]:
    """The official release's checkpoint format: a list of tensors, five per branch (PARAM_NAMES) in
    module order."""
    return list(branch_state_dict(model).values())


def save_branch(model, path: str | Path, format: str = "official") -> None:
    """Write the branch weights with torch.save: format "official" (list of tensors) or "state_dict"."""
    if format == "official":
        weights = branch_weight_list(model)
    elif format == "state_dict":
        weights = branch_state_dict(model)
    else:
        raise ValueError(f"format must be 'official' or 'state_dict', got {format!r}")
    torch.save([w.cpu() for w in weights] if isinstance(weights, list) else {k: v.cpu() for k, v in weights.items()},
               path)


def load_branch_file(path: str | Path):
    """A checkpoint written by `save_branch` (either format), to pass as `traj_weights=` or to `load_branch`."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_branch(model, weights) -> None:
    """Copy weights (a list in the official format, a state dict, or a path to either) into the branches
    of a patched model."""
    if isinstance(weights, (str, Path)):
        weights = load_branch_file(weights)
    load_trajectory_weights(_processors_or_raise(model), weights)


def set_trajectories(model, trajectories, valid: torch.Tensor | None = None) -> None:
    """Give a patched model new trajectories (a training clip's) without re-patching: the branches keep
    their parameters (and the optimizer its state). trajectories/valid as for patch(trajectories=...)."""
    state = _processors_or_raise(model)[0][1].state
    # The processors and the patched forward all hold this one state object, so it is re-initialised
    # in place (same scales), not replaced.
    if isinstance(state, DiTTrajectoryState):
        DiTTrajectoryState.__init__(state, trajectories, valid, state.vae_scale_factor, state.temporal_stride)
    else:
        type(state).__init__(state, trajectories, valid, vae_scale_factor=state.vae_scale_factor,
                             semantics=state.semantics)


# ---------------------------------------------------------------------------------------------
# Objectives: the noise level, the model input and the regression target


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[b] -> [b, 1, 1, ...] broadcasting against `like`."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def edm_v_objective(p_mean: float = 0.7, p_std: float = 1.6) -> Objective:
    """Stable Video Diffusion (EDM, v-prediction, continuous timesteps): ln σ ~ N(p_mean, p_std²),
    x_σ = x0 + σ·ε, the UNet sees c_in·x_σ (c_in = 1/√(σ²+1)) at timestep ¼·ln σ and its output F
    denoises as c_skip·x_σ + c_out·F (c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1), diffusers' Euler
    scheduler). The target is the F that denoises exactly, (x0 − c_skip·x_σ)/c_out; with EDM's weight
    1/c_out² the loss in F is unweighted. (p_mean, p_std: values commonly used to fine-tune SVD.)"""
    def objective(x0, noise, generator=None):
        log_sigma = torch.randn(x0.shape[0], generator=generator) * p_std + p_mean
        sigma = _per_sample(log_sigma.exp().to(x0.device), x0)
        noisy = x0 + sigma * noise
        c_in, c_skip, c_out = 1 / (sigma**2 + 1).sqrt(), 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1).sqrt()
        return c_in * noisy, 0.25 * log_sigma.to(x0.device, x0.dtype), (x0 - c_skip * noisy) / c_out
    return objective


def flow_objective(num_train_timesteps: int = 1000) -> Objective:
    """Flow matching (Wan): σ ~ U(0, 1), x_σ = (1 − σ)·x0 + σ·ε, target ε − x0, timestep σ·1000."""
    def objective(x0, noise, generator=None):
        sigma = torch.rand(x0.shape[0], generator=generator).to(x0.device)
        s = _per_sample(sigma, x0)
        return (1 - s) * x0 + s * noise, sigma * num_train_timesteps, noise - x0
    return objective


def ddpm_objective(scheduler) -> Objective:
    """A DDPM-family scheduler's training objective (CogVideoX: v-prediction): t uniform over its
    training steps, x_t = scheduler.add_noise(x0, ε, t), target v (get_velocity) or ε."""
    prediction = scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"ddpm_objective supports prediction_type 'epsilon' or 'v_prediction', got {prediction!r}")

    def objective(x0, noise, generator=None):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        target = scheduler.get_velocity(x0, noise, t) if prediction == "v_prediction" else noise
        return scheduler.add_noise(x0, noise, t), t, target
    return objective


# ---------------------------------------------------------------------------------------------
# The loop


class TrajectoryBranchTrainer:
    """One optimizer over the branch parameters of a patched model; everything else is frozen.

    Building the trainer sets requires_grad=False on every parameter of the model except the branches'
    (that is the point: only the branch learns) and puts the model in train mode. `step` returns the
    loss as a float; `last_grad_norm` holds the norm before clipping."""

    def __init__(self, model, objective: Objective, predict: Callable, *, lr: float = 1e-5,
                 weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 optimizer: torch.optim.Optimizer | None = None):
        self.model = find_model(model)
        self.objective, self.predict = objective, predict
        self.params = branch_parameters(self.model)
        branch_ids = {id(p) for p in self.params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in branch_ids)
        self.model.train()
        self.max_grad_norm = max_grad_norm
        self.optimizer = optimizer or torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.last_grad_norm: float | None = None

    def loss(self, latents: torch.Tensor, trajectories, valid: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoising loss of one clip (latents in the model's layout) under its trajectories."""
        set_trajectories(self.model, trajectories, valid)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        model_input, timestep, target = self.objective(latents, noise, generator)
        prediction = self.predict(self.model, model_input, timestep)
        return torch.nn.functional.mse_loss(prediction.float(), target.float())

    def step(self, latents: torch.Tensor, trajectories, valid: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(latents, trajectories, valid, generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the branch loss is {float(loss)}; no step taken")
        loss.backward()
        if self.max_grad_norm is not None:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict:
        """Branch weights and optimizer state, to resume training: a snapshot (the optimizer's own
        state_dict holds its live moment tensors, which later steps would change under a kept copy)."""
        return {"branch": branch_state_dict(self.model), "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        load_branch(self.model, state["branch"])
        self.optimizer.load_state_dict(state["optimizer"])


__all__ = [
    "TrajectoryBranchTrainer", "branch_parameters", "branch_processors", "branch_state_dict", "branch_weight_list",
    "ddpm_objective", "edm_v_objective", "flow_objective", "load_branch", "load_branch_file", "save_branch",
    "set_trajectories",
]
