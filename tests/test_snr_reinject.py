"""snr_reinject: the fused step (Triton through the interpreter on CPU) equals the reference given
the kernel's own noise; the in-kernel noise stream; the ᾱ and σ step formulas against diffusers."""
import math

import numpy as np
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.ops.snr_reinject import (
    ddim_coefficients,
    euler_coefficients,
    renoise_coefficients,
    renoise_sigma_coefficients,
)
from lightmotion_fast.reference.snr_reinject import _philox4x32, neg_log_uniform, philox_randn, snr_reinject_reference
from lm_testing import TOLERANCES

COEFFS = {
    "ddim_eps": ddim_coefficients(0.35, 0.5, 1.0, "epsilon"),
    "ddim_v": ddim_coefficients(0.35, 0.5, 0.7, "v_prediction"),
    "euler_v": euler_coefficients(3.0, 2.1, 1.0, "v_prediction"),
    "renoise": renoise_coefficients(0.6, 0.4),
}


@pytest.mark.parametrize("shape", [(1, 3, 4, 5, 7), (2, 4, 3, 8, 8), (1, 1, 2, 3, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(COEFFS))
def test_kernel_matches_reference_given_its_noise(shape, dtype, name, device, poisoned):
    c = COEFFS[name]
    x = torch.randn(shape, device=device).to(dtype)
    m = None if name == "renoise" else torch.randn(shape, device=device).to(dtype)
    seed, offset = 17, 3 * x.numel()
    with lm.backend("triton"):
        out = lm.snr_reinject(x, m, c, seed=seed, offset=offset)
        noise = lm.snr_noise(x, seed, offset)
    ref = snr_reinject_reference(x.cpu().double(), None if m is None else m.cpu().double(), noise.cpu().double(), c)
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol * 4, rtol=rtol)


@pytest.mark.parametrize("numel", [3000, 4093])
def test_kernel_noise_equals_numpy_philox(numel, device):
    like = torch.empty(numel, device=device)
    # offsets at every position inside a quad (offset % 4 = 0..3), and counters past 2**32
    for seed, offset in ((0, 0), (123, 5000), (5, 7), (9, 2**34 + 1), (2**33 + 1, 2**32 - 10)):
        with lm.backend("triton"):
            noise = lm.snr_noise(like, seed, offset)
        torch.testing.assert_close(noise.cpu(), philox_randn(seed, offset, numel), atol=2e-5, rtol=1e-5)


def test_philox_known_answers():
    """The reference's Philox-4x32-10 against Random123's published known-answer vectors."""
    def words(counter, key):
        c = [np.asarray([w], dtype=np.uint32) for w in counter]
        return [int(w[0]) for w in _philox4x32(*c, np.uint32(key[0]), np.uint32(key[1]))]

    assert words([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_one_philox_call_gives_four_normals():
    """Stream elements 4c .. 4c+3 are the two Box–Muller pairs of the words of counter c."""
    seed, c = 77, 12345
    key = (np.uint32(seed), np.uint32(0))
    zero = np.zeros(1, dtype=np.uint32)
    w = _philox4x32(np.asarray([c], dtype=np.uint32), zero, zero, zero.copy(), *key)
    expected = []
    for a, b in ((w[0], w[1]), (w[2], w[3])):
        u = (int(a[0]) >> 9) * 2.0 ** -23 + 2.0 ** -24
        theta = math.pi * int(np.asarray(b).view(np.int32)[0]) * 2.0 ** -31
        r = math.sqrt(-2.0 * math.log(u))
        expected += [r * math.cos(theta), r * math.sin(theta)]
    got = philox_randn(seed, 4 * c, 4)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=2e-6, rtol=1e-6)


def test_neg_log_is_accurate_for_every_uniform():
    """−ln u as the stream computes it (series near u = 1, log2 elsewhere), for all 2²³ values of u."""
    k = np.arange(2**23, dtype=np.uint32)
    u, e = neg_log_uniform(k)
    exact = -np.log(u.astype(np.float64))
    assert np.all(e > 0)
    assert np.max(np.abs(e - exact) / exact) < 4e-7


def test_noise_statistics_and_streams(device):
    like = torch.empty(64, 1024, device=device)
    with lm.backend("triton"):
        a = lm.snr_noise(like, 1, 0)
        a_again = lm.snr_noise(like, 1, 0)
        other_seed = lm.snr_noise(like, 2, 0)
        next_step = lm.snr_noise(like, 1, like.numel())
        shifted = lm.snr_noise(like, 1, 5)
    assert abs(a.mean().item()) < 0.02 and abs(a.std().item() - 1.0) < 0.02
    assert torch.equal(a, a_again)
    for other in (other_seed, next_step):
        assert not torch.allclose(a, other) and abs(torch.corrcoef(torch.stack([a.flatten(), other.flatten()]))[0, 1]) < 0.02
    # an offset shifts the counter: the same numbers, moved by 5 positions
    assert torch.equal(a.flatten()[5:], shifted.flatten()[:-5])


@pytest.mark.parametrize("layout", ["b c f h w", "b f c h w"])
def test_region_mode_leaves_outside_as_the_plain_step(layout, device, poisoned):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(10)
    t = int(sched.timesteps[3])
    prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
    a_t, a_p = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[prev])
    c = ddim_coefficients(a_t, a_p, 1.0)
    shape = (2, 3, 4, 6, 5) if layout == "b c f h w" else (2, 4, 3, 6, 5)
    x, eps = torch.randn(shape, device=device), torch.randn(shape, device=device)
    region = torch.rand(4, 6, 5, device=device) > 0.5
    with lm.backend("triton"):
        out = lm.snr_reinject(x, eps, c, seed=9, offset=0, region=region, layout=layout)
        noise = lm.snr_noise(x, 9, 0)
    plain = sched.step(eps.cpu(), t, x.cpu(), eta=0.0).prev_sample
    stochastic = sched.step(eps.cpu(), t, x.cpu(), eta=1.0, variance_noise=noise.cpu()).prev_sample
    where = region[None, None] if layout == "b c f h w" else region[None, :, None]
    where = where.expand(shape).cpu()
    torch.testing.assert_close(out.cpu()[~where], plain[~where], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cpu()[where], stochastic[where], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.cpu()[where], plain[where])


def test_euler_coefficients_match_diffusers_step():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True)
    sched.set_timesteps(6)
    x, m = torch.randn(1, 2, 4, 3, 3), torch.randn(1, 2, 4, 3, 3)
    i = 2
    sched._step_index = i
    expected = sched.step(m, sched.timesteps[i], x).prev_sample
    c = euler_coefficients(float(sched.sigmas[i]), float(sched.sigmas[i + 1]), 0.0, "v_prediction")
    torch.testing.assert_close(c.cx * x + c.cm * m, expected, atol=1e-5, rtol=1e-5)
    # η > 0: the step keeps the marginal noise level σ_next (σ_down² + σ_up² = σ_next²)
    s, sn = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
    c1 = euler_coefficients(s, sn, 1.0, "epsilon")
    # for x = x0 + s·e, m = e (a perfect ε model): out = x0 + (σ_down/s)·s·e + σ_up·n
    assert math.isclose((c1.cx * s + c1.cm) ** 2 + c1.cn ** 2, sn ** 2, rel_tol=1e-9)


def test_renoise_keeps_the_marginal_variance():
    c = renoise_coefficients(0.6, 0.4)
    # a unit-variance x at level ᾱ=0.6 jumps to ᾱ=0.4: √(ᾱ2/ᾱ1)² + (1 − ᾱ2/ᾱ1) = 1
    assert math.isclose(c.cx ** 2 + c.cn ** 2, 1.0) and c.cx < 1.0
    s = renoise_sigma_coefficients(1.5, 4.0)
    assert math.isclose(1.5 ** 2 + s.cn ** 2, 4.0 ** 2)


def test_reference_backend_uses_the_same_noise(poisoned):
    x, m = torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 3, 4, 5)
    c = COEFFS["ddim_eps"]
    with lm.backend("reference"):
        ref = lm.snr_reinject(x, m, c, seed=4, offset=11)
    with lm.backend("triton"):
        fused = lm.snr_reinject(x, m, c, seed=4, offset=11)
    torch.testing.assert_close(ref, fused, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    x = torch.randn(1, 2, 3, 4, 5)
    c = COEFFS["ddim_eps"]
    with pytest.raises(ValueError, match="model_output"):
        lm.snr_reinject(x, x[:, :1], c, seed=0)
    with pytest.raises(ValueError, match="region"):
        lm.snr_reinject(x, x, c, seed=0, region=torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="seed"):
        lm.snr_reinject(x, x, c, seed=-3)
    with pytest.raises(TypeError, match="coeffs"):
        lm.snr_reinject(x, x, (1.0, 0.0, 0.0), seed=0)
    with pytest.raises(ValueError, match="coeffs.cn"):
        lm.snr_reinject(x, x, c.__class__(1.0, 0.0, float("nan"), 1.0, 0.0), seed=0)
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_coefficients(0.3, 0.4, 1.0, "flow")


@pytest.mark.parametrize("helper,args,name", [
    (renoise_coefficients, (0.4, 0.6), "alpha_to"),         # the wrong way: cx > 1 and no noise, silently
    (renoise_coefficients, (0.0, 0.0), "alpha_from"),       # was a ZeroDivisionError
    (renoise_sigma_coefficients, (2.0, 1.0), "sigma_to"),   # the wrong way: silently the identity
    (renoise_sigma_coefficients, (-1.0, 1.0), "sigma_from"),
    (ddim_coefficients, (1.0, 1.0, 1.0), "alpha_t"),        # was a ZeroDivisionError
    (ddim_coefficients, (0.0, 0.5, 1.0), "alpha_t"),
    (ddim_coefficients, (0.6, 0.5, 1.0), "alpha_prev"),     # a step towards more noise
    (ddim_coefficients, (0.5, 0.6, -1.0), "eta"),
    (ddim_coefficients, (0.5, float("nan"), 1.0), "alpha_prev"),
    (euler_coefficients, (0.0, 0.0, 1.0), "sigma"),          # was a ZeroDivisionError
    (euler_coefficients, (1.0, 2.0, 0.0), "sigma_next"),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_coefficient_helpers_refuse_levels_out_of_range_or_order(helper, args, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        helper(*args)


def test_coefficient_helpers_accept_the_ends_of_their_ranges():
    assert renoise_coefficients(0.6, 0.0).cn == 1.0          # to pure noise
    assert renoise_coefficients(0.6, 0.6).cn == 0.0          # no jump
    assert renoise_sigma_coefficients(0.0, 2.0).cn == 2.0
    assert ddim_coefficients(0.5, 1.0, 1.0).cn == 0.0        # the last DDIM step (ᾱ_prev = 1)
    assert euler_coefficients(1.0, 0.0, 1.0).cn == 0.0       # the last Euler step (σ_next = 0)


def test_numpy_integer_seeds_and_float64(device, poisoned):
    """numpy integers are seeds and offsets; float64 latents are taken (issue 14 item 10)."""
    x = torch.randn(1, 2, 3, 4, 8, device=device, dtype=torch.float64)
    m = torch.randn_like(x)
    c = COEFFS["ddim_eps"]
    with lm.backend("triton"):
        out = lm.snr_reinject(x, m, c, seed=np.int64(4), offset=np.uint32(8))
        noise = lm.snr_noise(x, np.int32(4), np.int64(8))
    assert out.dtype == torch.float64
    assert torch.equal(noise, lm.snr_noise(x, 4, 8))
    ref = snr_reinject_reference(x.cpu(), m.cpu(), noise.cpu().double(), c)
    # the kernel takes the coefficients as float32 scalars: float64 data agree to float32 precision
    torch.testing.assert_close(out.cpu(), ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="seed must be an int"):
        lm.snr_reinject(x, m, c, seed=1.0)


def test_compiles_fullgraph_through_the_public_function():
    x = torch.randn(1, 2, 3, 6, 8)
    region = torch.rand(3, 6, 8) > 0.5
    c = COEFFS["ddim_eps"]

    def step(x):
        return lm.snr_reinject(x, 2 * x, c, seed=3, offset=4, region=region), lm.snr_noise(x, 3, 4)

    torch._dynamo.reset()
    got, expected = torch.compile(step, fullgraph=True, backend="aot_eager")(x), step(x)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
