"""snr_reinject: LightMotion's SNR noise re-injection step (specs/lightmotion.md, "Latent space correction").

Checks, the custom ops `lightmotion::snr_reinject` (the fused step) and `lightmotion::snr_noise`
(materialises the very noise the fused step draws, for tests and for the reference path), and the
choice of implementation. Meaning and coefficient formulas: reference/snr_reinject.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend
from lightmotion_fast.camera.motion import as_int
from lightmotion_fast.ops.latent_permute import LATENT_DTYPES, check_latent
from lightmotion_fast.reference.snr_reinject import (
    StepCoefficients,
    ddim_coefficients,
    euler_coefficients,
    philox_randn,
    renoise_coefficients,
    renoise_sigma_coefficients,
    snr_reinject_reference,
)

_MAX_SEED = 2**63


def _noise_reference(shape, seed: int, offset: int, device) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    return philox_randn(seed, offset, numel).reshape(shape).to(device)


@torch.library.custom_op("lightmotion::snr_reinject", mutates_args=())
def snr_reinject_op(x: torch.Tensor, model_output: Optional[torch.Tensor], region: Optional[torch.Tensor],
                    cx: float, cm: float, cn: float, cx0: float, cm0: float, seed: int, offset: int,
                    frames_first: bool) -> torch.Tensor:
    """x, model_output: [b c f h w] (frames_first=False) or [b f c h w]; region: [f, h, w] bool or None."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, like the noise indexing
    coeffs = StepCoefficients(cx, cm, cn, cx0, cm0)
    impl = _common.select_backend(x.device)
    if impl is Backend.TRITON:
        if frames_first:
            frames, inner = x.shape[1], x.shape[2] * x.shape[3] * x.shape[4]
        else:
            frames, inner = x.shape[2], x.shape[3] * x.shape[4]
        kernel = _common.kernel_module("snr_reinject")
        kernel.snr_reinject_launch(
            x.contiguous(), model_output.contiguous() if model_output is not None else None,
            region.contiguous().view(torch.uint8) if region is not None else None, out, seed, offset,
            (cx, cm, cn, cx0, cm0), inner, frames, x.shape[3] * x.shape[4])
    else:
        noise = _noise_reference(x.shape, seed, offset, x.device)
        out.copy_(snr_reinject_reference(x, model_output, noise, coeffs, region,
                                         "b f c h w" if frames_first else "b c f h w"))
    return out


@snr_reinject_op.register_fake
def _(x, model_output, region, cx, cm, cn, cx0, cm0, seed, offset, frames_first):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("lightmotion::snr_noise", mutates_args=())
def snr_noise_op(like: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """float32 noise shaped like `like`: element i (row-major) is tl.randn(seed, offset + i)."""
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    if _common.select_backend(like.device) is Backend.TRITON:
        _common.kernel_module("snr_reinject").snr_noise_launch(out, seed, offset)
    else:
        out.copy_(_noise_reference(like.shape, seed, offset, like.device))
    return out


@snr_noise_op.register_fake
def _(like, seed, offset):
    return torch.empty(like.shape, dtype=torch.float32, device=like.device)


def _check_seed(name: str, value) -> int:
    """A Python int in [0, 2**63) (numpy / torch integer scalars accepted)."""
    value = as_int(name, value, minimum=-(2**63))
    if not 0 <= value < _MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


def snr_reinject(x: torch.Tensor, model_output: torch.Tensor | None, coeffs: StepCoefficients, seed: int,
                 offset: int = 0, region: torch.Tensor | None = None, layout: str = "b c f h w") -> torch.Tensor:
    """One fused correction step: out = cx·x + cm·m + cn·n (plain cx0·x + cm0·m outside `region`).

    x, model_output: [b c f h w] (AnimateDiff) or [b f c h w] with layout="b f c h w" (SVD);
    model_output may be None (renoise). coeffs: from `ddim_coefficients`, `euler_coefficients`,
    `renoise_coefficients` or `renoise_sigma_coefficients`. The noise n is drawn inside the kernel:
    element i (row-major) is tl.randn(seed, offset + i); `snr_noise` materialises the same numbers.
    region: [f, h, w] bool, where the noise goes (e.g. the exposed mask); None: everywhere.

    >>> c = ddim_coefficients(alpha_t=0.5, alpha_prev=0.6, eta=1.0)
    >>> x_prev = snr_reinject(x, eps, c, seed=0, offset=step * x.numel())
    """
    frames, height, width = check_latent("x", x, layout)
    if model_output is not None:
        _common.check_tensor("model_output", model_output, ndim=5, dims=layout, dtypes=LATENT_DTYPES)
        if model_output.shape != x.shape:
            raise ValueError(f"model_output must have x's shape {tuple(x.shape)}, got {tuple(model_output.shape)}")
        _common.check_same_device(x=x, model_output=model_output)
    if not isinstance(coeffs, StepCoefficients):
        raise TypeError(f"coeffs must be a StepCoefficients, got {type(coeffs).__name__}")
    values = [_common.check_finite_number(f"coeffs.{k}", getattr(coeffs, k)) for k in ("cx", "cm", "cn", "cx0", "cm0")]
    seed, offset = _check_seed("seed", seed), _check_seed("offset", offset)
    if region is not None:
        _common.check_tensor("region", region, ndim=3, dims="f h w", dtypes=(torch.bool,))
        if tuple(region.shape) != (frames, height, width):
            raise ValueError(f"region must have shape [{frames}, {height}, {width}], got {tuple(region.shape)}")
        _common.check_same_device(x=x, region=region)
    return snr_reinject_op(x, model_output, region, *values, seed, offset, layout == "b f c h w")


def snr_noise(like: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """The noise `snr_reinject` draws for a tensor shaped like `like`, as a float32 tensor."""
    _common.check_tensor("like", like, dtypes=None)
    return snr_noise_op(like, _check_seed("seed", seed), _check_seed("offset", offset))


def sample_inputs(device: torch.device):
    x = torch.randn(1, 3, 4, 5, 7, device=device)
    m = torch.randn(1, 3, 4, 5, 7, device=device)
    region = torch.rand(4, 5, 7, device=device) > 0.5
    c = ddim_coefficients(0.4, 0.55, 1.0)
    xf = torch.randn(2, 3, 2, 4, 5, device=device)
    return [(x, m, None, c.cx, c.cm, c.cn, c.cx0, c.cm0, 3, 0, False),
            (xf, xf.clone(), region[:3, :4, :5].contiguous(), c.cx, c.cm, c.cn, c.cx0, c.cm0, 5, 100, True),
            (x, None, None, 0.9, 0.0, 0.3, 1.0, 0.0, 2**33, 7, False)]


def noise_sample_inputs(device: torch.device):
    return [(torch.empty(2, 3, 5, device=device), 1, 0), (torch.empty(7, device=device), 2**35, 2**33)]


__all__ = ["StepCoefficients", "ddim_coefficients", "euler_coefficients", "renoise_coefficients",
           "renoise_sigma_coefficients", "snr_noise", "snr_reinject"]
