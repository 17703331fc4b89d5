"""LightMotion on every common scheduler (issue 13, item 4): DDIM, Euler, Euler ancestral, DPM-Solver++
(2M, 3M, SDE), UniPC (also Wan's flow form), LCM and flow-matching Euler.

Most tests drive `LightMotionSampler` directly on a scheduler with a small pixel-wise "model" (fast, no
UNet); one tiny AnimateDiff pipeline checks DPM-Solver++ end to end. Held: without an edit the sampler is
the scheduler's own step, bit for bit (the user's generator included); the edit moves the multistep
history with the latent (for a pixel-wise model, editing mid-run equals editing the result); the re-noise
jump restarts the solver at first order; reference == fused; the default T0/T1/T2 timeline; the errors."""
import inspect
import math

import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.integrations.diffusers import lightmotion as lmi
from lightmotion_fast.integrations.diffusers import lightmotion_schedulers as lms
from lightmotion_fast.reference.latent_resample import latent_resample_reference
from lightmotion_fast.reference.snr_reinject import ddim_coefficients, euler_coefficients, philox_randn

CAM = lm.CameraMotion(pan=(0.25, -0.1), zoom=0.1)
BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1, clip_sample=False)


def make_scheduler(name: str):
    """The scheduler `name`, built from the tiny AnimateDiff pipeline's DDIM config as a user swaps it in."""
    import diffusers

    base = diffusers.DDIMScheduler(**BASE).config
    specs = {
        "ddim": ("DDIMScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
        "dpmsolver++2m": ("DPMSolverMultistepScheduler", {}),
        "dpmsolver++3m_karras": ("DPMSolverMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True)),
        "sde-dpmsolver++": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
        "unipc": ("UniPCMultistepScheduler", {}),
        "unipc_flow": ("UniPCMultistepScheduler", dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                        flow_shift=3.0)),   # what Wan ships
        "lcm": ("LCMScheduler", {}),
        "flow_match": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
        "cogvideox_ddim": ("CogVideoXDDIMScheduler", dict(prediction_type="v_prediction", snr_shift_scale=3.0,
                                                          timestep_spacing="trailing")),   # CogVideoX's default
    }
    cls, extra = specs[name]
    cls = getattr(diffusers, cls)
    if name == "flow_match":
        return cls(**extra)
    return cls.from_config(base, **extra)


ALL = ("ddim", "euler", "euler_ancestral", "dpmsolver++2m", "dpmsolver++3m_karras", "sde-dpmsolver++", "unipc",
       "unipc_flow", "lcm", "flow_match", "cogvideox_ddim")
STOCHASTIC = ("euler_ancestral", "sde-dpmsolver++", "lcm")          # their steps draw from the user's generator
DETERMINISTIC = tuple(n for n in ALL if n not in STOCHASTIC)
MULTISTEP = ("dpmsolver++2m", "dpmsolver++3m_karras", "unipc", "unipc_flow")


def model(x, t):
    """A pixel-wise, timestep-dependent stand-in for the UNet (any prediction type)."""
    w = 0.3 + float(t) / 2000.0
    return torch.tanh(x * w) + 0.05 * x


def latent(seed: int = 0):
    return torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def sampler_for(sch, **options):
    config = lmi.LightMotionConfig(**{"camera": CAM, **options})
    return lmi.LightMotionSampler(sch, config, "b c f h w", lmi.SamplerState())


def run(sch, steps: int, sampler=None, seed: int = 0, x=None):
    """Sample as a diffusers pipeline does; returns (output after every step, timesteps iterated)."""
    obj = sampler or sch
    obj.set_timesteps(steps)
    x = (latent() if x is None else x) * float(getattr(sch, "init_noise_sigma", 1.0))
    generator = torch.Generator().manual_seed(seed)
    takes_generator = sampler is not None or "generator" in inspect.signature(sch.step).parameters
    outs, seen = [], []
    for t in list(sch.timesteps):
        seen.append(float(t))
        inp = obj.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        kwargs = {"generator": generator} if takes_generator else {}
        x = obj.step(model(inp, t), t, x, return_dict=False, **kwargs)[0]
        outs.append(x)
    return outs, seen


# -- without an edit: the scheduler's own step ---------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_without_an_edit_each_step_is_the_schedulers_own(name):
    steps = 5
    plain, seen_plain = run(make_scheduler(name), steps, seed=7)
    sch = make_scheduler(name)
    sampler = sampler_for(sch, camera=lm.CameraMotion(), edit_step=2, correction=None)
    patched, seen = run(sch, steps, sampler, seed=7)
    assert seen == seen_plain and len(patched) == steps
    for a, b in zip(patched, plain):
        assert torch.equal(a, b)                    # bit for bit, the (identity) edit and its history included
    assert sampler.state.record["edit_index"] == 1
    if name in MULTISTEP:
        assert sampler.state.record["history_edited"] >= 1
    if name in STOCHASTIC:                          # the generator is really the one the steps draw from
        other, _ = run(make_scheduler(name), steps, seed=8)
        assert not torch.equal(other[-1], plain[-1])


# -- the edit moves the history with the latent -----------------------------------------------------------------

@pytest.mark.parametrize("name", DETERMINISTIC)
def test_edit_mid_run_equals_editing_the_result_for_a_pixelwise_model(name, monkeypatch):
    """The edit is a gather G of latent pixels; with a pixel-wise model every step commutes with G, so
    sampling with the edit after step T0 must give G(plain result) exactly, which holds for a multistep
    solver only if its history (x̂0 / ε of earlier steps, UniPC's previous sample) is gathered too."""
    steps, background = 6, torch.ones(3, 8, 8, dtype=torch.bool)
    plain, _ = run(make_scheduler(name), steps)
    sch = make_scheduler(name)
    sampler = sampler_for(sch, edit_step=3, correction=None, mask=background)
    edited, _ = run(sch, steps, sampler)
    fill = sampler.state.record["fill_map"]
    assert sampler.state.record["exposed"].any()
    torch.testing.assert_close(edited[-1], latent_resample_reference(plain[-1], fill), atol=1e-6, rtol=1e-6)
    if name in MULTISTEP:                            # and the history is what makes it hold
        monkeypatch.setattr(type(sampler.kind), "map_history", lambda self, sch, fn: 0)
        sch = make_scheduler(name)
        stale, _ = run(sch, steps, sampler_for(sch, edit_step=3, correction=None, mask=background))
        assert not torch.allclose(stale[-1], latent_resample_reference(plain[-1], fill), atol=1e-3)


# -- the jump ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_default_timeline_visits_t0_t1_t2_in_order(name):
    """10 steps, defaults T0 = 0.2, T1 = 0.4, T2 = 0.3: steps 0, 1, the edit, steps 2, 3, the jump from the
    level step 3 produced back to the level entering step 3, steps 3..9; the scheduler ends on its last step."""
    steps = 10
    sch = make_scheduler(name)
    sampler = sampler_for(sch)
    outs, seen = run(sch, steps, sampler)
    full = [float(t) for t in sampler.full]
    record = sampler.state.record
    assert seen == [full[i] for i in [0, 1, 2, 3] + list(range(3, steps))]
    assert (record["edit_index"], record["renoise_index"], record["rewind_to"]) == (1, 3, 3)
    assert not torch.equal(record["pre_edit"], record["post_edit"])
    assert all(torch.isfinite(o).all() for o in outs)
    if sampler.kind.stepped:
        assert sch.step_index == steps
    assert [float(t) for t in sch.timesteps] == seen     # the pipeline's view: the planned list


@pytest.mark.parametrize("name", ALL)
def test_the_jump_is_the_closed_form_and_restarts_at_first_order(name):
    """x_T2 = (a2/a1)·x_T1 + √(s2² − (a2/a1)²s1²)·n with the kind's levels, and the step after the jump is what
    a fresh scheduler does from x_T2 at step T2: first order, no UniPC corrector, the user's generator."""
    steps = 10                                      # defaults: T1 = 4, T2 = 3; run position 4 is step T2
    sch = make_scheduler(name)
    sampler = sampler_for(sch, motion_seed=3)
    sampler.set_timesteps(steps)
    x = latent() * float(getattr(sch, "init_noise_sigma", 1.0))
    for j, t in enumerate(list(sch.timesteps)[:5]):
        inp = sampler.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        x = sampler.step(model(inp, t), t, x, return_dict=False, generator=torch.Generator().manual_seed(j))[0]
        if j == 3:
            x1, x2 = sampler.state.record["pre_renoise"], sampler.state.record["renoised"]
            assert torch.equal(x, x2)
            if name in MULTISTEP:
                assert sch.lower_order_nums == 0 and all(h is None for h in sch.model_outputs)
    src = sampler.kind.next_level(sch, sampler.full, 3)
    dst = sampler.kind.level(sch, sampler.full, 3)
    noise = philox_randn(3, 3 * x1.numel(), x1.numel()).reshape(x1.shape).to(x1.dtype)
    r = dst.a / src.a
    want = r * x1 + math.sqrt(max(dst.s ** 2 - (r * src.s) ** 2, 0.0)) * noise
    torch.testing.assert_close(x2, want, atol=1e-5, rtol=1e-5)
    # the step after the jump equals a fresh scheduler's step from x_T2, placed at step T2
    fresh = make_scheduler(name)
    fresh.set_timesteps(steps)
    if sampler.kind.stepped:
        fresh._step_index = 3
    t = fresh.timesteps[3]
    kwargs = {"generator": torch.Generator().manual_seed(4)} if "generator" in inspect.signature(fresh.step).parameters else {}
    inp = fresh.scale_model_input(x2, t) if hasattr(fresh, "scale_model_input") else x2
    want_next = fresh.step(model(inp, t), t, x2, return_dict=False, **kwargs)[0]
    torch.testing.assert_close(x, want_next, atol=1e-6, rtol=1e-6)


def test_flow_matching_jump_keeps_the_interpolation():
    """Flow matching: x_σ = (1−σ)·x0 + σ·ε; the jump σ1 -> σ2 keeps the signal (1−σ2)·x0 and the total noise σ2."""
    sch = make_scheduler("flow_match")
    sch.set_timesteps(6)
    s1, s2 = float(sch.sigmas[4]), float(sch.sigmas[2])
    c = lms.jump_coefficients(lms.Level(1 - s1, s1), lms.Level(1 - s2, s2))
    assert c.cm == 0.0 and math.isclose(c.cx * (1 - s1), 1 - s2, rel_tol=1e-12)
    assert math.isclose((c.cx * s1) ** 2 + c.cn ** 2, s2 ** 2, rel_tol=1e-12)
    with pytest.raises(ValueError, match="no signal"):
        lms.jump_coefficients(lms.Level(0.0, 1.0), lms.Level(0.5, 0.5))
    # an η = 1 step out of pure noise (σ = 1) draws all of the next level's noise fresh
    c = lms.eta_step_coefficients(lms.Level(0.0, 1.0), lms.Level(0.5, 0.5), (1.0, -1.0), 1.0)
    assert math.isclose(c.cn, 0.5) and math.isclose(c.cx, 0.5) and math.isclose(c.cm, -0.5)


# -- the η-step coefficients ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_eta_step_is_ddims_and_eulers(prediction):
    a_t, a_p = 0.35, 0.5
    vp = lambda ab: lms.Level(math.sqrt(ab), math.sqrt(1 - ab))
    for eta in (0.0, 0.5, 1.0):
        x0 = lms.x0_coefficients(prediction, math.sqrt(a_t), math.sqrt(1 - a_t), "DDIMScheduler")
        got = lms.eta_step_coefficients(vp(a_t), vp(a_p), x0, eta)
        want = ddim_coefficients(a_t, a_p, eta, prediction)
        for k in ("cx", "cm", "cn", "cx0", "cm0"):
            assert math.isclose(getattr(got, k), getattr(want, k), rel_tol=1e-12, abs_tol=1e-12), (eta, k)
    sch = make_scheduler("euler")
    sch.register_to_config(prediction_type=prediction)
    sch.set_timesteps(6)
    for eta in (0.0, 0.5, 1.0, 2.0):
        got = lms.eta_step_coefficients(lms.Level(1, float(sch.sigmas[2])), lms.Level(1, float(sch.sigmas[3])),
                                        lms.EulerKind().x0(sch, sch.timesteps, 2), eta)
        want = euler_coefficients(float(sch.sigmas[2]), float(sch.sigmas[3]), eta, prediction)
        for k in ("cx", "cm", "cn", "cx0", "cm0"):
            assert math.isclose(getattr(got, k), getattr(want, k), rel_tol=1e-12, abs_tol=1e-12), (eta, k)


@pytest.mark.parametrize("name", ["euler_ancestral", "flow_match", "ddim", "lcm"])
def test_eta_step_coefficients_reproduce_the_schedulers_step(name):
    """η = 1 is Euler ancestral's own step (same noise); η = 0 is flow matching's and DDIM's own step; LCM's
    x̂0 (boundary conditions included) re-noised with the same noise is LCM's step."""
    sch = make_scheduler(name)
    sch.set_timesteps(6)
    kind, i = lms.find_kind(sch), 2
    t = sch.timesteps[i]
    if kind.stepped:
        sch._step_index = i
    x = latent(1) * 3
    inp = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
    m = model(inp, t)
    now, nxt = kind.level(sch, sch.timesteps, i), kind.next_level(sch, sch.timesteps, i)
    px, pm = kind.x0(sch, sch.timesteps, i)
    kwargs = {"generator": torch.Generator().manual_seed(4)} if "generator" in inspect.signature(sch.step).parameters else {}
    own = sch.step(m, t, x, return_dict=False, **kwargs)[0]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    if name == "lcm":      # LCM: x̂0 re-noised to the next level, no ε̂ term
        want = nxt.a * (px * x + pm * m) + nxt.s * noise
    else:
        c = lms.eta_step_coefficients(now, nxt, (px, pm), 1.0 if name == "euler_ancestral" else 0.0)
        want = c.cx * x + c.cm * m + c.cn * noise
    torch.testing.assert_close(own, want, atol=1e-5, rtol=1e-5)


# -- reference == fused with an edit -------------------------------------------------------------------------------

@pytest.mark.parametrize("correction", ["renoise", "stochastic"])
@pytest.mark.parametrize("name", ALL)
def test_reference_and_fused_agree_with_an_edit(name, correction):
    options = dict(correction=correction)
    if correction == "stochastic":
        options.update(edit_step=2, correction_steps=2, correction_region="exposed")
    results = {}
    for backend in ("reference", "triton"):
        sch = make_scheduler(name)
        sampler = sampler_for(sch, **options)
        with lm.backend(backend):
            outs, _ = run(sch, 6, sampler, seed=2)
        results[backend] = outs[-1]
    plain, _ = run(make_scheduler(name), 6, seed=2)
    torch.testing.assert_close(results["triton"], results["reference"], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(results["triton"]).all() and not torch.allclose(results["triton"], plain[-1], atol=1e-3)


# -- set-up and errors -------------------------------------------------------------------------------------------------

def _error(fn) -> str:
    with pytest.raises(ValueError) as err:
        fn()
    return str(err.value)


def test_unsupported_scheduler_names_the_supported_ones():
    from diffusers import DDPMScheduler, HeunDiscreteScheduler, PNDMScheduler

    for sch in (PNDMScheduler(), HeunDiscreteScheduler(), DDPMScheduler()):
        with pytest.raises(ValueError) as err:
            sampler_for(sch)
        message = str(err.value)
        assert type(sch).__name__ in message
        assert all(n in message for n in ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                          "LCMScheduler", "EulerAncestralDiscreteScheduler",
                                          "FlowMatchEulerDiscreteScheduler", "EulerDiscreteScheduler"))
    # The edit alone: schedulers that keep the latent between steps (Heun's first-stage sample, PNDM's
    # stored samples) would undo most of it at their next step: refused; another unknown one runs, warned.
    for sch in (PNDMScheduler(), HeunDiscreteScheduler()):
        assert "correction=None" not in _error(lambda: sampler_for(sch))
        with pytest.raises(ValueError, match="keeps the latent between steps"):
            sampler_for(sch, correction=None)
    assert "correction=None" in _error(lambda: sampler_for(DDPMScheduler()))
    with pytest.warns(UserWarning, match="does not know DDPMScheduler"):
        assert sampler_for(DDPMScheduler(), correction=None).kind is None
    dpm = make_scheduler("dpmsolver++2m")
    dpm.register_to_config(thresholding=True)
    with pytest.raises(ValueError, match="stochastic.*thresholding"):
        sampler_for(dpm, correction="stochastic")
    assert sampler_for(dpm).kind.name == "dpmsolver_multistep"        # the re-noise jump does not need x̂0
    odd = make_scheduler("unipc")
    odd.register_to_config(prediction_type="velocity")
    with pytest.raises(ValueError, match="prediction_type 'velocity'"):
        sampler_for(odd)


def test_subclasses_match_and_flow_matching_installs_no_scale_model_input():
    from diffusers import DPMSolverMultistepScheduler

    class MyDPM(DPMSolverMultistepScheduler):
        pass

    assert lms.find_kind(MyDPM()).name == "dpmsolver_multistep"
    sch = make_scheduler("flow_match")
    sampler = sampler_for(sch)

    class Ctx:
        set_attr = staticmethod(setattr)

    sampler.install(Ctx())
    assert {"set_timesteps", "step"} <= set(vars(sch)) and "scale_model_input" not in vars(sch)


# -- end to end in a tiny AnimateDiff pipeline -------------------------------------------------------------------------

@torch.no_grad()
def test_dpmsolver_in_a_tiny_animatediff_pipeline():
    """DPM-Solver++ (the most used AnimateDiff sampler) swapped in as a user does: zero camera without a
    correction gives the unpatched video bit for bit; the default timeline visits T0, T1, T2 in order."""
    from diffusers import DPMSolverMultistepScheduler
    from tiny_models import animatediff_inputs, tiny_animatediff_pipeline

    pipe = tiny_animatediff_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    steps, frames = 4, 2
    base = pipe(**animatediff_inputs(frames=frames, steps=steps)).frames
    with lm.patched(pipe, camera=lm.CameraMotion(), edit_step=2, correction=None):
        assert torch.equal(pipe(**animatediff_inputs(frames=frames, steps=steps)).frames, base)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(torch.as_tensor(args[1] if len(args) > 1 else
                                                                         kwargs["timestep"]).reshape(-1)[0])),
        with_kwargs=True)
    try:
        with lm.patched(pipe, camera=CAM):
            out = pipe(**animatediff_inputs(frames=frames, steps=steps)).frames
            full = [float(t) for t in lmi.patch_state(pipe).data["lightmotion"].full]
            record = lmi.sampler_state(pipe).record
    finally:
        handle.remove()
    # 4 steps: T0 = round(0.8) = 1, T1 = round(1.6) = 2, T2 = round(1.2) = 1
    assert seen == [full[i] for i in (0, 1, 1, 2, 3)]
    assert (record["edit_index"], record["renoise_index"], record["rewind_to"]) == (0, 1, 1)
    assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-3)
