"""Reference SNR noise re-injection (specs/lightmotion.md, "Latent space correction").

Every correction step is one elementwise affine map of the current latent x, the model output m and
fresh Gaussian noise n:

    out = cx·x + cm·m + cn·n                    (inside the correction region)
    out = cx0·x + cm0·m                         (outside it: the plain deterministic step)

The coefficients say which step it is; the functions below derive them:

- `ddim_coefficients`: the DDIM step with η (ᾱ-parametrisation, AnimateDiff):
  x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ²)·ε̂ + σ·n,  σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev),
  with (x̂0, ε̂) linear in (x, m) for epsilon / v_prediction / sample models.
- `euler_coefficients`: the same step in the σ-parametrisation (x = x̂0 + σ·ε, Euler/Karras, SVD):
  σ_up = η·√(σ_next²(σ² − σ_next²)/σ²), σ_down = √(σ_next² − σ_up²),
  x_next = x̂0 + (σ_down/σ)·(x − x̂0) + σ_up·n  (η = 0 is diffusers' EulerDiscreteScheduler step).
- `renoise_coefficients` / `renoise_sigma_coefficients`: the jump back to a noisier level,
  x_T2 = √(ᾱ_T2/ᾱ_T1)·x + √(1 − ᾱ_T2/ᾱ_T1)·n,  or x_σ2 = x + √(σ2² − σ1²)·n.

The reference takes the noise explicitly. `philox_randn` materialises, in NumPy, exactly the stream the
kernel draws in registers (element i of a tensor, row-major, is stream element g = offset + i):

    quad  = Philox-4x32-10(key = seed, counter = g // 4)        (tl.randint4x(seed, g // 4))
    pairs = (quad[0], quad[1]) for lanes g % 4 in {0, 1}, (quad[2], quad[3]) for lanes {2, 3}
    Box–Muller on a pair (a, b), both outputs kept (lane 0 / 2: cosine, lane 1 / 3: sine):
        u = (a >> 9) · 2⁻²³ + 2⁻²⁴ ∈ (0, 1),   e = −ln u,   r = √(2e)
        θ = π · int32(b) · 2⁻³¹ ∈ [−π, π),      n = (r cos θ, r sin θ)

so one Philox call gives four normals. −ln u is taken from the series v + v²/2 + v³/3 + v⁴/4 (v = 1 − u)
when v < 2⁻⁶ and from log2 otherwise: the GPU evaluates log2, sin and cos with the hardware's
approximate instructions, whose absolute error near u = 1 the square root would magnify; with the
series the GPU stream stays within a few 1e-6 of this reference everywhere. Imports nothing of the
package.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class StepCoefficients:
    """out = cx·x + cm·m + cn·n in the correction region, cx0·x + cm0·m elsewhere."""

    cx: float
    cm: float
    cn: float
    cx0: float
    cm0: float


def _level(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False,
           low_is: str = "", high_is: str = "") -> float:
    """value as a finite float in [low, high] (an open end where asked), else a ValueError naming it;
    low_is / high_is name a bound that is another argument."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)):
        lo = f"{low_is}={low:g}" if low_is else f"{low:g}"
        hi = "∞)" if math.isinf(high) else (f"{high_is}={high:g}" if high_is else f"{high:g}") + (")" if high_open else "]")
        raise ValueError(f"{name} must be finite and lie in {'(' if low_open else '['}{lo}, {hi}, got {value!r}")
    return v


def _x0_eps(alpha_t: float, prediction_type: str):
    """(x̂0, ε̂) as ((a_x, a_m), (b_x, b_m)): x̂0 = a_x·x + a_m·m, ε̂ = b_x·x + b_m·m."""
    sa, sb = math.sqrt(alpha_t), math.sqrt(1.0 - alpha_t)
    if prediction_type == "epsilon":
        return (1.0 / sa, -sb / sa), (0.0, 1.0)
    if prediction_type == "v_prediction":
        return (sa, -sb), (sb, sa)
    if prediction_type == "sample":
        return (0.0, 1.0), (1.0 / sb, -sa / sb)
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def ddim_sigma(alpha_t: float, alpha_prev: float, eta: float) -> float:
    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    return eta * math.sqrt(max(variance, 0.0))


def ddim_coefficients(alpha_t: float, alpha_prev: float, eta: float,
                      prediction_type: str = "epsilon") -> StepCoefficients:
    """One DDIM step from ᾱ_t to the less noisy ᾱ_prev (0 < ᾱ_t < 1, ᾱ_t <= ᾱ_prev <= 1, η >= 0)."""
    alpha_t = _level("alpha_t", alpha_t, 0.0, 1.0, low_open=True, high_open=True)
    alpha_prev = _level("alpha_prev", alpha_prev, alpha_t, 1.0, low_is="alpha_t")
    eta = _level("eta", eta, 0.0, math.inf)
    (ax, am), (bx, bm) = _x0_eps(alpha_t, prediction_type)

    def step(sigma):
        direction = math.sqrt(max(1.0 - alpha_prev - sigma * sigma, 0.0))
        sp = math.sqrt(alpha_prev)
        return sp * ax + direction * bx, sp * am + direction * bm

    sigma = ddim_sigma(alpha_t, alpha_prev, eta)
    (cx, cm), (cx0, cm0) = step(sigma), step(0.0)
    return StepCoefficients(cx, cm, sigma, cx0, cm0)


def euler_coefficients(sigma: float, sigma_next: float, eta: float,
                       prediction_type: str = "epsilon") -> StepCoefficients:
    """One Euler step from σ to the smaller σ_next (σ > 0, 0 <= σ_next <= σ, η >= 0)."""
    sigma = _level("sigma", sigma, 0.0, math.inf, low_open=True)
    sigma_next = _level("sigma_next", sigma_next, 0.0, sigma, high_is="sigma")
    eta = _level("eta", eta, 0.0, math.inf)
    if prediction_type == "epsilon":
        px, pm = 1.0, -sigma
    elif prediction_type == "v_prediction":
        px, pm = 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    elif prediction_type == "sample":
        px, pm = 0.0, 1.0
    else:
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")

    def step(eta_):
        up = 0.0 if sigma_next <= 0 else min(sigma_next, eta_ * math.sqrt(
            max(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2, 0.0)))
        down = math.sqrt(max(sigma_next ** 2 - up ** 2, 0.0))
        r = down / sigma
        return px * (1.0 - r) + r, pm * (1.0 - r), up

    cx, cm, up = step(eta)
    cx0, cm0, _ = step(0.0)
    return StepCoefficients(cx, cm, up, cx0, cm0)


def renoise_coefficients(alpha_from: float, alpha_to: float) -> StepCoefficients:
    """ᾱ_from at the current level T1, ᾱ_to at the noisier level T2 (0 <= ᾱ_to <= ᾱ_from, 0 < ᾱ_from <= 1)."""
    alpha_from = _level("alpha_from", alpha_from, 0.0, 1.0, low_open=True)
    alpha_to = _level("alpha_to", alpha_to, 0.0, alpha_from, high_is="alpha_from")
    ratio = alpha_to / alpha_from
    return StepCoefficients(math.sqrt(ratio), 0.0, math.sqrt(max(1.0 - ratio, 0.0)), 1.0, 0.0)


def renoise_sigma_coefficients(sigma_from: float, sigma_to: float) -> StepCoefficients:
    """σ-parametrisation: 0 <= σ_from <= σ_to."""
    sigma_from = _level("sigma_from", sigma_from, 0.0, math.inf)
    sigma_to = _level("sigma_to", sigma_to, sigma_from, math.inf, low_is="sigma_from")
    return StepCoefficients(1.0, 0.0, math.sqrt(max(sigma_to ** 2 - sigma_from ** 2, 0.0)), 1.0, 0.0)


# --- the kernel's normal stream (Philox-4x32-10, four normals per call), in NumPy ----------------

_PHILOX_KEY_A, _PHILOX_KEY_B = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_PHILOX_ROUND_A, _PHILOX_ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)


def _philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    mask32 = np.uint64(0xFFFFFFFF)
    for _ in range(rounds):
        prod_b = _PHILOX_ROUND_B * c2.astype(np.uint64)
        prod_a = _PHILOX_ROUND_A * c0.astype(np.uint64)
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0,
            (prod_b & mask32).astype(np.uint32),
            (prod_a >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1,
            (prod_a & mask32).astype(np.uint32),
        )
        k0 = np.uint32((int(k0) + int(_PHILOX_KEY_A)) & 0xFFFFFFFF)
        k1 = np.uint32((int(k1) + int(_PHILOX_KEY_B)) & 0xFFFFFFFF)
    return c0, c1, c2, c3


_SERIES_BELOW = np.float32(2.0 ** -6)


def neg_log_uniform(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """k: uint32 in [0, 2²³). Returns (u, −ln u) in float32 for u = k·2⁻²³ + 2⁻²⁴ (the kernel's order)."""
    kf = k.astype(np.float32)
    u = kf * np.float32(2.0 ** -23) + np.float32(2.0 ** -24)
    v = (np.float32(2.0 ** 23 - 1) - kf) * np.float32(2.0 ** -23) + np.float32(2.0 ** -24)  # 1 - u, exact
    series = v * (np.float32(1.0) + v * (np.float32(0.5) + v * (np.float32(1.0 / 3.0) + v * np.float32(0.25))))
    with np.errstate(divide="ignore"):
        logs = np.float32(-0.6931471805599453) * np.log2(u)
    return u, np.where(v < _SERIES_BELOW, series, logs).astype(np.float32)


def box_muller_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two normals from two uint32 words (both Box–Muller outputs), float32."""
    _, e = neg_log_uniform(a >> np.uint32(9))
    r = np.sqrt(np.float32(2.0) * e)
    theta = b.view(np.int32).astype(np.float32) * np.float32(math.pi * 2.0 ** -31)
    return r * np.cos(theta), r * np.sin(theta)


def philox_randn(seed: int, offset: int, numel: int) -> torch.Tensor:
    """float32 [numel]: element i is the kernel's normal number offset + i (stream defined above)."""
    first, last = offset // 4, (offset + numel + 3) // 4
    counter = np.arange(first, last, dtype=np.uint64)
    c0 = (counter & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    c1 = (counter >> np.uint64(32)).astype(np.uint32)
    zero = np.zeros_like(c0)
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
    w0, w1, w2, w3 = _philox4x32(c0, c1, zero, zero.copy(), k0, k1)
    n0, n1 = box_muller_pair(w0, w1)
    n2, n3 = box_muller_pair(w2, w3)
    quads = np.stack([n0, n1, n2, n3], axis=1).reshape(-1)   # stream elements first*4 ... last*4 - 1
    start = offset - first * 4
    return torch.from_numpy(np.ascontiguousarray(quads[start:start + numel], dtype=np.float32))


def snr_reinject_reference(x: torch.Tensor, model_output: torch.Tensor | None, noise: torch.Tensor,
                           coeffs: StepCoefficients, region: torch.Tensor | None = None,
                           layout: str = "b c f h w") -> torch.Tensor:
    """x, model_output, noise: [b c f h w] (or [b f c h w]); region: [f h w] bool or None (everywhere).

    Computed in float32 (float64 if x is float64), returned in x's dtype."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, nf = x.to(work), noise.to(work)
    mf = model_output.to(work) if model_output is not None else torch.zeros_like(xf)
    out = coeffs.cx * xf + coeffs.cm * mf + coeffs.cn * nf
    if region is not None:
        plain = coeffs.cx0 * xf + coeffs.cm0 * mf
        where = region[None, None] if layout == "b c f h w" else region[None, :, None]
        out = torch.where(where.to(out.device), out, plain)
    return out.to(x.dtype)
