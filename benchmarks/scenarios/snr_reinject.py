"""LightMotion's correction step: the fused snr_reinject (noise drawn in registers) against the
scheduler's own DDIM step with η (which draws its noise tensor itself), and against the unfused
recipe: the plain scheduler step, a separate torch.randn and an add; on a GPU also against the step
cx·x + cm·ε + cn·randn_like(x) compiled by torch.compile (Inductor fuses it into one kernel with
in-kernel Philox: the same design, the strongest peer)."""
import torch

import lightmotion_fast as lm
from lightmotion_fast.bench.scenario import Case
from lightmotion_fast.ops.snr_reinject import ddim_coefficients


def _scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(50)
    return sched


def _case(label, shape, device, dtype, quick, cpu=True):
    def setup():
        sched = _scheduler()
        t = int(sched.timesteps[10])
        prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t, a_p = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[prev])
        coeffs = ddim_coefficients(a_t, a_p, 1.0)
        x = torch.randn(shape, device=device, dtype=dtype)
        eps = torch.randn(shape, device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(0)

        def step_randn_add():
            plain = sched.step(eps, t, x, eta=0.0).prev_sample
            return plain + coeffs.cn * torch.randn(shape, device=device, dtype=dtype, generator=gen)

        providers = {
            "lightmotion": lambda: lm.snr_reinject(x, eps, coeffs, seed=0, offset=0),
            "scheduler_step_eta": lambda: sched.step(eps, t, x, eta=1.0, generator=gen).prev_sample,
            "step_randn_add": step_randn_add,
        }
        if device.type == "cuda":
            def step(x, eps):
                return coeffs.cx * x + coeffs.cm * eps + coeffs.cn * torch.randn_like(x)

            compiled = torch.compile(step, fullgraph=True, dynamic=False)
            compiled(x, eps)  # compile outside the timing
            providers["torch_compile_step"] = lambda: compiled(x, eps)
        for _ in range(3):  # the first calls of a custom op pay one-time dispatch costs
            providers["lightmotion"]()
        if device.type == "cuda" or x.numel() <= 1 << 18:  # the NumPy Philox reference is slow
            def reference():
                with lm.backend("reference"):
                    return lm.snr_reinject(x, eps, coeffs, seed=0, offset=0)
            providers["reference"] = reference
        return providers

    numel = 1
    for s in shape:
        numel *= s
    elem = torch.empty((), dtype=dtype).element_size()
    return Case(op="snr_reinject", shape=f"{label} {'x'.join(map(str, shape))}", setup=setup,
                dtype=str(dtype).replace("torch.", ""), bytes=3 * numel * elem, quick=quick, cpu=cpu,
                note="bytes: x and the model output read, x_prev written; the noise never touches memory"
                + ("" if device.type == "cuda" else " (CPU: our op runs its reference path, NumPy Philox noise)"))


def cases(device, quick):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    yield _case("small", (1, 4, 8, 32, 32), device, dtype, quick=True)
    yield _case("AnimateDiff", (2, 4, 16, 64, 64), device, dtype, quick=True)
    yield _case("SVD-xt", (2, 25, 4, 72, 128), device, dtype, quick=True, cpu=False)
    yield _case("bandwidth", (8, 16, 32, 128, 128), device, torch.float32, quick=False, cpu=False)
