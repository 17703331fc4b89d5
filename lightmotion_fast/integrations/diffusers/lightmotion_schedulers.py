"""Per-scheduler math for LightMotion's correction: a small table of scheduler *kinds*.

The sampler (lightmotion.py, `LightMotionSampler`) runs the pipeline's own scheduler for every ordinary
step. It needs scheduler-specific knowledge only where it steps itself or moves the run somewhere else:

- the noise level of the sample entering step i, and of the sample that step i produces, written in one
  form for every scheduler: x = a·x0 + s·ε (`Level(a, s)`). DDPM-family schedulers (DDIM, DPM-Solver++,
  UniPC, LCM) are variance preserving: a = √ᾱ, s = √(1−ᾱ). Euler-family schedulers carry the unscaled
  sample x = x0 + σ·ε: a = 1, s = σ. Flow matching carries x = (1−σ)·x0 + σ·ε: a = 1−σ, s = σ.
- the model's x0 prediction as an affine map of (sample, model output): x̂0 = px·x + pm·m;
- the re-noise jump from level (a1, s1) to the noisier (a2, s2), in closed form for every kind:
      x2 = (a2/a1)·x1 + √(s2² − (a2/a1)²·s1²)·n
  (the signal is rescaled to a2, then fresh noise tops the noise up to s2). VP: √(ᾱ2/ᾱ1)·x + √(1−ᾱ2/ᾱ1)·n;
  Euler: x + √(σ2²−σ1²)·n; flow: ((1−σ2)/(1−σ1))·x + √(σ2² − ((1−σ2)σ1/(1−σ1))²)·n;
- the η-step the 'stochastic' correction runs instead of the scheduler's step (DDIM's η-step, written for
  any (a, s)): x_next = a'·x̂0 + √(s'² − σ_n²)·ε̂ + σ_n·n with ε̂ = (x − a·x̂0)/s and
  σ_n = min(s', η·s'·√(1 − (λ'/λ)²)), λ = s/a. With a = √ᾱ this is DDIM's σ (η ≤ 1); with a = 1 it is
  Euler ancestral's σ_up; η = 1 on Euler ancestral is that scheduler's own step;
- the scheduler's state between steps: its step index, and the multistep history (DPM-Solver++:
  `model_outputs`, `lower_order_nums`; UniPC: also `timestep_list`, `last_sample`).

History across the edit and the jump:
- The edit (permute + resample) is one gather of latent pixels. The history tensors are per-pixel
  quantities on the same latent grid (x0 or ε predictions, UniPC's previous sample), so the same gather is
  applied to them (`map_history`): the next multistep update then combines the edited sample with history
  that moved with it. For a model that acts pixel by pixel this makes editing mid-run exactly equal to
  editing the finished result (tested), and a zero camera leaves the run bit-identical.
- The re-noise jump and a 'stochastic' η-step add fresh noise: the sample leaves the trajectory that the
  history was computed on, and the history's timesteps no longer precede the step that comes next (after a
  jump back to T2 the stored outputs belong to steps T1−2, T1−1, later than T2). Extrapolating from it would
  be wrong, so `restart` forgets it: `lower_order_nums = 0` (with the stored outputs and UniPC's
  `last_sample` cleared) makes the next step a first-order step, exactly as the first step of a run is,
  and UniPC skips its corrector (it has no previous sample on this trajectory). The order builds up again
  over the next steps.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from lightmotion_fast.reference.snr_reinject import StepCoefficients


@dataclass(frozen=True)
class Level:
    """A noise level: the sample is x = a·x0 + s·ε."""

    a: float
    s: float


def jump_coefficients(src: Level, dst: Level) -> StepCoefficients:
    """Re-noise from level `src` to the noisier level `dst`: x_dst = (a2/a1)·x + √(s2² − (a2/a1)²·s1²)·n."""
    if src.a <= 0:
        raise ValueError(f"the re-noise jump starts from a level with no signal left (a = {src.a})")
    r = dst.a / src.a
    return StepCoefficients(r, 0.0, math.sqrt(max(dst.s ** 2 - (r * src.s) ** 2, 0.0)), 1.0, 0.0)


def eta_step_coefficients(now: Level, nxt: Level, x0: tuple[float, float], eta: float) -> StepCoefficients:
    """The η-step from level `now` to `nxt` given x̂0 = px·x + pm·m (see the module docstring).

    Returns out = cx·x + cm·m + cn·n (the η-step) and cx0·x + cm0·m (η = 0, the deterministic step)."""
    px, pm = x0
    a, s, a2, s2 = now.a, now.s, nxt.a, nxt.s
    # ε̂ = (x − a·x̂0)/s = ex·x + em·m
    ex, em = (1.0 - a * px) / s, -a * pm / s
    sigma = 0.0
    if s2 > 0 and a2 > 0:
        ratio = 0.0 if a == 0 else (s2 / a2) / (s / a)     # λ'/λ, < 1 on a denoising step (λ = ∞ at pure noise)
        sigma = min(s2, eta * s2 * math.sqrt(max(1.0 - ratio * ratio, 0.0)))

    def step(noise):
        direction = math.sqrt(max(s2 * s2 - noise * noise, 0.0))
        return a2 * px + direction * ex, a2 * pm + direction * em

    (cx, cm), (cx0, cm0) = step(sigma), step(0.0)
    return StepCoefficients(cx, cm, sigma, cx0, cm0)


def x0_coefficients(prediction_type: str, a: float, s: float, scheduler: str) -> tuple[float, float]:
    """x̂0 = px·x + pm·m for a model that sees x at level (a, s), per prediction type."""
    if prediction_type == "epsilon":
        return 1.0 / a, -s / a
    if prediction_type == "v_prediction":       # v = a·ε − s·x0 with a² + s² = 1
        return a, -s
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "flow_prediction":    # m = ε − x0, x = (1 − s)·x0 + s·ε
        return 1.0, -s
    raise ValueError(f"LightMotion's correction does not know {scheduler}'s prediction_type {prediction_type!r}")


def _vp(alpha_cumprod) -> Level:
    alpha_cumprod = float(alpha_cumprod)
    return Level(math.sqrt(alpha_cumprod), math.sqrt(max(1.0 - alpha_cumprod, 0.0)))


class SchedulerKind:
    """What the sampler needs to know about one family of schedulers. `timesteps` is the full schedule
    set_timesteps made (before LightMotion's plan repeats steps); `index` indexes it."""

    name = ""
    classes: tuple[str, ...] = ()    # diffusers class names (subclasses match too)
    stepped = True                   # the scheduler keeps `_step_index` (DDIM does not)
    history: tuple[str, ...] = ()    # attributes holding per-pixel tensors, or lists of them

    def level(self, sch, timesteps, index: int) -> Level:
        """The level of the sample entering step `index` (index = len(timesteps): the end)."""
        raise NotImplementedError

    def next_level(self, sch, timesteps, index: int) -> Level:
        """The level the scheduler's step `index` produces."""
        return self.level(sch, timesteps, index + 1)

    def x0(self, sch, timesteps, index: int) -> tuple[float, float]:
        """x̂0 = px·x + pm·m at step `index`, as the scheduler's step computes it."""
        level = self.level(sch, timesteps, index)
        return x0_coefficients(sch.config.prediction_type, level.a, level.s, type(sch).__name__)

    def x0_is_affine(self, sch) -> bool:
        """False when the scheduler clips or thresholds x̂0 (then no fixed coefficients describe its step)."""
        return not (getattr(sch.config, "thresholding", False) or getattr(sch.config, "clip_sample", False))

    def map_history(self, sch, fn) -> int:
        """Replace every history tensor h by fn(h) (the edit's gather). Returns how many were mapped."""
        count = 0
        for name in self.history:
            value = getattr(sch, name, None)
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is not None:
                        value[i] = fn(item)
                        count += 1
            elif value is not None:
                setattr(sch, name, fn(value))
                count += 1
        return count

    def restart(self, sch, index: int) -> None:
        """Continue from schedule index `index` on a new trajectory (after a jump or an η-step): the step
        index moves there and the multistep history is forgotten, so the next step is first order."""
        if self.stepped:
            sch._step_index = index


class DDIMKind(SchedulerKind):
    """DDIMScheduler: VP, stateless; step t goes to t − T/n (diffusers' rule, whatever the spacing).
    CogVideoXDDIMScheduler (CogVideoX's default) is the same η = 0 step on its SNR-shifted ᾱ table, which
    it stores as `alphas_cumprod`, so the same levels apply."""

    name, classes, stepped = "ddim", ("DDIMScheduler", "CogVideoXDDIMScheduler"), False

    def level(self, sch, timesteps, index):
        if index >= len(timesteps):
            return _vp(sch.final_alpha_cumprod)
        return _vp(sch.alphas_cumprod[int(timesteps[index])])

    def next_level(self, sch, timesteps, index):
        prev_t = int(timesteps[index]) - sch.config.num_train_timesteps // sch.num_inference_steps
        return _vp(sch.alphas_cumprod[prev_t] if prev_t >= 0 else sch.final_alpha_cumprod)


class EulerKind(SchedulerKind):
    """EulerDiscreteScheduler and EulerAncestralDiscreteScheduler: the sample is x = x0 + σ·ε and the
    model sees x/√(σ²+1), i.e. the VP level (1, σ)/√(σ²+1)."""

    name, classes = "euler", ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")

    def level(self, sch, timesteps, index):
        return Level(1.0, float(sch.sigmas[index]))

    def x0(self, sch, timesteps, index):
        sigma = float(sch.sigmas[index])
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        px, pm = x0_coefficients(sch.config.prediction_type, c_in, sigma * c_in, type(sch).__name__)
        return px * c_in, pm


class SigmaVPKind(SchedulerKind):
    """DPMSolverMultistepScheduler / UniPCMultistepScheduler: levels from the scheduler's own σ → (α_t, σ_t)
    map (VP, or flow with use_flow_sigmas), multistep history."""

    def level(self, sch, timesteps, index):
        alpha_t, sigma_t = sch._sigma_to_alpha_sigma_t(sch.sigmas[index])
        return Level(float(alpha_t), float(sigma_t))

    def restart(self, sch, index):
        super().restart(sch, index)
        order = sch.config.solver_order
        sch.model_outputs = [None] * order
        sch.lower_order_nums = 0


class DPMSolverKind(SigmaVPKind):
    name, classes, history = "dpmsolver_multistep", ("DPMSolverMultistepScheduler",), ("model_outputs",)


class UniPCKind(SigmaVPKind):
    name, classes, history = "unipc_multistep", ("UniPCMultistepScheduler",), ("model_outputs", "last_sample")

    def restart(self, sch, index):
        super().restart(sch, index)
        sch.timestep_list = [None] * sch.config.solver_order
        sch.last_sample = None     # no previous sample on this trajectory: the next step skips the corrector


class LCMKind(SchedulerKind):
    """LCMScheduler (AnimateLCM): VP by timestep; x̂0 is the boundary-conditioned c_skip·x + c_out·x0_pred;
    the step re-noises x̂0 to the next timestep with the user's generator, the last step returns x̂0."""

    name, classes = "lcm", ("LCMScheduler",)

    def level(self, sch, timesteps, index):
        if index >= len(timesteps):
            return Level(1.0, 0.0)
        return _vp(sch.alphas_cumprod[int(timesteps[index])])

    def x0(self, sch, timesteps, index):
        t = int(timesteps[index])
        level = self.level(sch, timesteps, index)
        px, pm = x0_coefficients(sch.config.prediction_type, level.a, level.s, type(sch).__name__)
        c_skip, c_out = (float(c) for c in sch.get_scalings_for_boundary_condition_discrete(t))
        return c_skip + c_out * px, c_out * pm


class FlowMatchKind(SchedulerKind):
    """FlowMatchEulerDiscreteScheduler (Wan, HunyuanVideo, LTX): x = (1−σ)·x0 + σ·ε, the model predicts the
    velocity m = ε − x0, so x̂0 = x − σ·m."""

    name, classes = "flow_match_euler", ("FlowMatchEulerDiscreteScheduler",)

    def level(self, sch, timesteps, index):
        sigma = float(sch.sigmas[index])
        return Level(1.0 - sigma, sigma)

    def x0(self, sch, timesteps, index):
        return 1.0, -float(sch.sigmas[index])

    def x0_is_affine(self, sch):
        return True


KINDS: tuple[SchedulerKind, ...] = (DDIMKind(), EulerKind(), DPMSolverKind(), UniPCKind(), LCMKind(), FlowMatchKind())
SUPPORTED = tuple(name for kind in KINDS for name in kind.classes)


def find_kind(scheduler) -> SchedulerKind | None:
    """The kind of `scheduler` (its class or a base class by name), or None."""
    for cls in type(scheduler).__mro__:
        for kind in KINDS:
            if cls.__name__ in kind.classes:
                return kind
    return None


# Schedulers that carry the latent itself between steps (Heun's first-stage sample, PNDM's and the
# single-step DPM-Solver's stored samples and outputs, ...): the edit moves the latent, their copy stays,
# and the next step largely undoes the edit (tiny CogVideoX/Wan runs: 1-35 % of its change to the output left).
STATEFUL_MARKERS = ("Heun", "PNDM", "Singlestep", "KDPM2", "DEIS", "SASolver")


def _stateful(scheduler) -> str | None:
    """The STATEFUL_MARKERS entry a scheduler's class (or a base) matches, or None."""
    return next((m for m in STATEFUL_MARKERS if any(m in c.__name__ for c in type(scheduler).__mro__)), None)


def scheduler_kind(scheduler, correction) -> SchedulerKind | None:
    """The kind LightMotion uses for `scheduler`; a clear ValueError where the correction cannot run on it.
    correction=None (the edit alone) takes a scheduler not in the table too (None), except those known to
    keep the latent between steps (a ValueError), with a warning that its own state is not edited."""
    name = type(scheduler).__name__
    kind = find_kind(scheduler)
    if correction is None:
        if kind is None:
            stateful = _stateful(scheduler)
            if stateful:
                raise ValueError(f"{name} keeps the latent between steps ({stateful}-style stored samples), which "
                                 f"LightMotion does not edit: its next step would undo most of the camera edit. "
                                 f"Use one of {', '.join(SUPPORTED)} (X.from_config(pipe.scheduler.config))")
            warnings.warn(f"LightMotion does not know {name}: the edit moves the latent, but whatever the scheduler "
                          f"keeps between steps is not moved with it; {', '.join(SUPPORTED)} are handled",
                          UserWarning, stacklevel=4)
        return kind
    if kind is None:
        alone = "" if _stateful(scheduler) else " or use correction=None for the edit alone"
        raise ValueError(f"LightMotion's correction supports {', '.join(SUPPORTED)}; got {name}. Switch "
                         f"the pipeline's scheduler (e.g. pipe.scheduler = DPMSolverMultistepScheduler.from_config("
                         f"pipe.scheduler.config)){alone}")
    if correction == "stochastic" and not kind.x0_is_affine(scheduler) and kind.name != "ddim":
        raise ValueError(f"correction='stochastic' on {name} with clip_sample or thresholding is not supported "
                         f"(only DDIMScheduler's own step can take the correction noise); turn them off or use "
                         f"correction='renoise'")
    if kind.name != "flow_match_euler":    # an unknown prediction type fails now, not at the correction
        x0_coefficients(getattr(scheduler.config, "prediction_type", None), 1.0, 0.5, name)
    return kind
