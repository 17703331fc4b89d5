"""Training one LiON-LoRA: a peft LoRA adapter and its scaling-token embedding, on the fused path.

    model.add_adapter(LoraConfig(r=256, lora_alpha=256, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                      adapter_name="orbit")
    trainer = LionLoraTrainer(model, "orbit", scheduler=CogVideoXDDIMScheduler.from_pretrained(...),
                              s_min=49 / 600)
    for clip in loader:                                    # latents, text embeddings, S per clip
        loss = trainer.step(clip.latents, clip.text, clip.scale)
    save: get_peft_model_state_dict(model, adapter_name="orbit") and trainer.embedding.state_dict()
    use:  patch(pipe, lion={"orbit": S}, lion_embeddings={"orbit": trainer.embedding})

The forward is the patched model's (`patch(model, lion={adapter: ...})`, lion_tokens.py): the scaling
token Eᵢ = Linear(γ(S)) is appended inside the forward, the self-attention projections run through
`multi_lora_linear` (forward and backward), so the gradients reach the LoRA's A and B and the
embedding. Only those are trained: every other parameter is frozen.

Recipe: which scale goes with which clip (LiON-LoRA §3.4). S ∈ [s_min, 1] is the motion amplitude
the clip shows, made by how much of a long source video the clip's frames span:
- camera LoRAs: each source video is a fixed-speed camera path rendered over T = 600 frames (the
  paper renders DL3DV scenes with 3D Gaussian splatting, one path per primitive: pan/offset,
  forward/backward, orbit). A training pair is (S, 49 frames sampled uniformly from the first
  round(600·S) frames): S = 1 is the whole path, S = s_min = 49/600 consecutive frames. Sample S
  uniformly in [s_min, 1] per clip and per step, so every amplitude is seen.
- object-motion LoRAs: static-camera videos of T = 240 frames, the same rule, s_min = 49/240.
`scale_range(T, F)` gives [s_min, 1]; `clip_frame_indices(T, S, F)` the frame indices of the clip for S;
`sample_clip(T, F, generator)` draws S and the indices together. Set the embedding's s_min to the
data's (ScalingTokenEmbedding rejects smaller S at inference). The LoRA is trained alone (k = 1);
several trained LoRAs are fused training-free with `patch(pipe, lion={...})`.
The paper trains rank-256 LoRAs on to_q/to_k/to_v/to_out.0 for 4,000 steps at lr 5e-4, batch 16.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import lightmotion_fast
from lightmotion_fast.integrations.diffusers.lion_lora import ScalingTokenEmbedding
from lightmotion_fast.integrations.diffusers.lion_tokens import CALL_SCALES

PREDICTIONS = ("epsilon", "v_prediction", "flow")


# -- the scale <-> data coupling -----------------------------------------------------------------------

def scale_range(total_frames: int, clip_frames: int = 49) -> tuple[float, float]:
    """[s_min, 1] for source videos of `total_frames` frames cut into clips of `clip_frames`."""
    if not 1 <= clip_frames <= total_frames:
        raise ValueError(f"clip_frames must lie in [1, total_frames={total_frames}], got {clip_frames}")
    return clip_frames / total_frames, 1.0


def clip_frame_indices(total_frames: int, scale: float, clip_frames: int = 49) -> torch.Tensor:
    """Indices [clip_frames] of the clip for amplitude S: uniform over the first round(T·S) frames."""
    s_min, _ = scale_range(total_frames, clip_frames)
    if not s_min - 1e-9 <= scale <= 1.0:
        raise ValueError(f"scale must lie in [s_min, 1] = [{s_min:.4f}, 1] for {total_frames} source frames "
                         f"and {clip_frames}-frame clips, got {scale}")
    span = max(clip_frames, round(total_frames * scale))
    return torch.linspace(0, span - 1, clip_frames).round().long()


def sample_clip(total_frames: int, clip_frames: int = 49, generator: torch.Generator | None = None):
    """(S, indices): S uniform in [s_min, 1] and the clip's frame indices for it."""
    s_min, _ = scale_range(total_frames, clip_frames)
    s = s_min + (1 - s_min) * torch.rand((), generator=generator).item()
    return s, clip_frame_indices(total_frames, s, clip_frames)


# -- the trainer ---------------------------------------------------------------------------------------

def _lora_parameters(model, adapter: str) -> dict[str, torch.nn.Parameter]:
    params = {name: p for name, p in model.named_parameters()
              if (".lora_A." in name or ".lora_B." in name) and name.split(".")[-2] == adapter}
    if not params:
        raise ValueError(f"adapter {adapter!r} has no LoRA weights in {type(model).__name__}; add it first "
                         "(model.add_adapter(LoraConfig(...), adapter_name=...))")
    return params


def _check_no_dropout(model, adapter: str) -> None:
    """The fused path has no LoRA dropout; a silently ignored dropout would change what is trained."""
    for name, module in model.named_modules():
        dropout = getattr(module, "lora_dropout", {})
        if adapter in dropout and isinstance(dropout[adapter], torch.nn.Dropout) and dropout[adapter].p > 0:
            raise ValueError(f"adapter {adapter!r} has lora_dropout={dropout[adapter].p} on {name}: the fused "
                             "LiON path does not apply LoRA dropout; use lora_dropout=0")


class LionLoraTrainer:
    """Diffusion training of one LoRA adapter and its scaling-token embedding.

    model: a CogVideoXTransformer3DModel or WanTransformer3DModel with the peft adapter loaded.
    scheduler: the noise schedule of the base model; a DDPM-family scheduler (add_noise, and
      get_velocity for prediction_type "v_prediction", CogVideoX) or a flow-matching one
      (FlowMatchEulerDiscreteScheduler, Wan: x_t = (1-σ)x₀ + σε, target ε - x₀, σ = t / 1000).
    embedding: the adapter's ScalingTokenEmbedding(num_loras=1, dim); a new one (s_min, J =
      num_frequencies) when None. lr/optimizer: AdamW over the LoRA and embedding parameters by default.
    The model is patched with lion={adapter: 1.0} while the trainer lives; `close()` unpatches.
    """

    def __init__(self, model, adapter: str, *, scheduler, embedding: ScalingTokenEmbedding | None = None,
                 s_min: float = 49 / 600, num_frequencies: int = 8, lr: float = 5e-4, optimizer=None,
                 lora_norm: str = "none"):
        self.model, self.adapter, self.scheduler = model, adapter, scheduler
        self._was_training = model.training
        self.prediction = self._prediction(scheduler)
        lora = _lora_parameters(model, adapter)
        _check_no_dropout(model, adapter)
        q_loras = [p for n, p in lora.items() if "to_q.lora_A" in n]
        if not q_loras:
            raise ValueError(f"adapter {adapter!r} has no LoRA on the self-attentions' to_q (its LoRA layers: "
                             f"{sorted({n.split('.lora_A')[0].split('.lora_B')[0] for n in lora})[:4] or 'none'}"
                             "...); LiON-LoRA trains LoRAs on to_q, to_k, to_v and to_out.0 of every "
                             "self-attention")
        dim = q_loras[0].shape[1]
        if embedding is None:
            weight = next(iter(lora.values()))
            embedding = ScalingTokenEmbedding(1, dim, num_frequencies, s_min).to(weight.device, weight.dtype)
        self.embedding = embedding
        for p in model.parameters():
            p.requires_grad_(False)
        for p in (*lora.values(), *embedding.parameters()):
            p.requires_grad_(True)
        self.parameters = [*lora.values(), *embedding.parameters()]
        self.optimizer = optimizer or torch.optim.AdamW(self.parameters, lr=lr, weight_decay=0.0)
        lightmotion_fast.patch(model, lion={adapter: 1.0}, lion_embeddings={adapter: embedding}, lora_norm=lora_norm)

    @staticmethod
    def _prediction(scheduler) -> str:
        if hasattr(scheduler, "scale_noise") and hasattr(scheduler, "sigmas"):
            return "flow"
        kind = getattr(getattr(scheduler, "config", None), "prediction_type", None)
        if kind == "flow_prediction":   # UniPC / DPM-Solver on flow sigmas (Wan's default): the same training
            return "flow"
        if kind not in ("epsilon", "v_prediction") or not hasattr(scheduler, "add_noise"):
            raise ValueError(f"scheduler must be a DDPM-family scheduler with prediction_type 'epsilon' or "
                             f"'v_prediction', or a flow-matching scheduler; got {type(scheduler).__name__} "
                             f"with prediction_type={kind!r}")
        return kind

    def noisy_and_target(self, latents, noise, timesteps):
        """x_t and the regression target for the scheduler's parameterisation (latents any layout, batch first)."""
        if self.prediction == "flow":
            sigma = (timesteps.float() / self.scheduler.config.num_train_timesteps).to(latents.dtype)
            sigma = sigma.reshape(-1, *[1] * (latents.ndim - 1))
            return (1 - sigma) * latents + sigma * noise, noise - latents
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)

    def loss(self, latents, encoder_hidden_states, scales, *, timesteps=None, noise=None,
             generator: torch.Generator | None = None, **model_kwargs) -> torch.Tensor:
        """Mean squared error of the model's prediction. latents: the model's latent layout with batch b;
        scales: S per clip [b] (or one number); timesteps [b] and noise drawn when None; model_kwargs
        (e.g. CogVideoX's image_rotary_emb) go to the model."""
        b = latents.shape[0]
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)
        timesteps = timesteps.to(latents.device)
        noisy, target = self.noisy_and_target(latents, noise, timesteps)
        scales = torch.as_tensor(scales, dtype=torch.float32).reshape(-1)
        if scales.numel() not in (1, b):
            raise ValueError(f"scales must be one number or one S per clip ({b}), got {scales.numel()}")
        scales = scales.expand(b)
        attention_kwargs = {**(model_kwargs.pop("attention_kwargs", None) or {}), CALL_SCALES: {self.adapter: scales}}
        pred = self.model(hidden_states=noisy, encoder_hidden_states=encoder_hidden_states, timestep=timesteps,
                          attention_kwargs=attention_kwargs, return_dict=False, **model_kwargs)[0]
        return F.mse_loss(pred.float(), target.float())

    def step(self, latents, encoder_hidden_states, scales, **kwargs) -> float:
        """One optimiser step; returns the loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(latents, encoder_hidden_states, scales, **kwargs)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the LiON-LoRA training loss is {loss.item()}")
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def close(self) -> None:
        """Unpatch the model (the trained adapter and embedding stay) and give it back in the train/eval
        mode it came in (step() puts it in training mode)."""
        lightmotion_fast.unpatch(self.model)
        self.model.train(self._was_training)
