"""latent_permute: LightMotion's latent permutation gather (specs/lightmotion.md).

Checks, the custom op `lightmotion::latent_permute`, and the choice of implementation. The meaning
is in reference/latent_permute.py, the speed in kernels/latent_permute.py and csrc/latent_permute.cpp.
"""
from __future__ import annotations

import torch

from lightmotion_fast.camera.motion import CameraMotion
from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend
from lightmotion_fast.reference.latent_permute import latent_permute_reference

LAYOUTS = ("b c f h w", "b f c h w")
# What the latent ops take: every floating dtype their custom ops, kernels and references handle.
LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@torch.library.custom_op("lightmotion::latent_permute", mutates_args=())
def latent_permute_op(z: torch.Tensor, inv_affine: torch.Tensor, frames_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """z: [b c f h w] (frames_first=False) or [b f c h w] (True); inv_affine: [f, 2, 3] float32."""
    out = torch.empty_like(z)
    zv, ov = (z, out) if not frames_first else (z.transpose(1, 2), out.transpose(1, 2))
    frames, height, width = zv.shape[2:]
    exposed = torch.empty((frames, height, width), dtype=torch.bool, device=z.device)
    impl = _common.select_backend(z.device, cpp_op="latent_permute_out")
    if exposed.numel() == 0:
        return out, exposed  # h = 0 or w = 0: nothing to compute (and no grid to launch)
    if impl is Backend.TRITON:
        kernel = _common.kernel_module("latent_permute")
        kernel.latent_permute_launch(zv, inv_affine.reshape(frames, 6).contiguous(), ov, exposed,
                                     sm_count=_common.device_sm_count(z.device))
    elif impl is Backend.CPP:
        torch.ops.lightmotion_cpp.latent_permute_out(zv, inv_affine.contiguous(), ov, exposed)
    else:
        ref, ref_exposed = latent_permute_reference(zv, inv_affine)
        ov.copy_(ref)
        exposed.copy_(ref_exposed)
    return out, exposed


@latent_permute_op.register_fake
def _(z, inv_affine, frames_first):
    frames, height, width = (z.shape[2], z.shape[3], z.shape[4]) if not frames_first else (
        z.shape[1], z.shape[3], z.shape[4])
    return torch.empty_like(z), z.new_empty((frames, height, width), dtype=torch.bool)


def check_latent(name: str, z, layout: str) -> tuple[int, int, int]:
    """Validate a 5-D video latent; returns (frames, height, width)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _common.check_tensor(name, z, ndim=5, dims=layout, dtypes=LATENT_DTYPES)
    frames = z.shape[2] if layout == "b c f h w" else z.shape[1]
    return frames, z.shape[3], z.shape[4]


def latent_permute(z: torch.Tensor, camera: CameraMotion, layout: str = "b c f h w"):
    """Move every frame of a video latent by the camera's per-frame similarity transform.

    z: [b c f h w] (AnimateDiff) or [b f c h w] with layout="b f c h w" (SVD); any strides.
    Returns (out, exposed): out has z's shape and dtype; exposed [f, h, w] bool marks output pixels
    whose source falls outside the frame. out holds 0 at exposed pixels; `latent_resample` fills
    them. z is not modified.

    >>> cam = CameraMotion(pan=(0.25, 0.0), zoom=0.16, rotate=-16)
    >>> out, exposed = latent_permute(torch.randn(2, 4, 16, 64, 64), cam)
    """
    frames, height, width = check_latent("z", z, layout)
    if not isinstance(camera, CameraMotion):
        raise TypeError(f"camera must be a lightmotion_fast.CameraMotion, got {type(camera).__name__}")
    if frames == 0:   # an empty clip, like an empty batch or plane: nothing to move
        inv = torch.empty((0, 2, 3), dtype=torch.float32, device=z.device)
    else:
        inv = camera.cached_inverse_affines(frames, height, width, device=z.device)
    return latent_permute_op(z, inv, layout == "b f c h w")


def latent_permute_affine(z: torch.Tensor, inv_affine: torch.Tensor, layout: str = "b c f h w"):
    """As `latent_permute`, with the [f, 2, 3] float32 inverse transforms given directly
    (target pixel -> source pixel), e.g. precomputed on the GPU for CUDA-graph capture."""
    frames, _, _ = check_latent("z", z, layout)
    _common.check_tensor("inv_affine", inv_affine, ndim=3, dims="f 2 3", dtypes=(torch.float32,))
    if tuple(inv_affine.shape) != (frames, 2, 3):
        raise ValueError(f"inv_affine must have shape [{frames}, 2, 3] (frames of z), got {tuple(inv_affine.shape)}")
    _common.check_same_device(z=z, inv_affine=inv_affine)
    # Values are not inspected here: reading them back from a GPU would synchronise the host.
    return latent_permute_op(z, inv_affine, layout == "b f c h w")


def sample_inputs(device: torch.device):
    """Arguments for opcheck and torch.compile tests (see ops/_registry.py)."""
    cam = CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)
    z = torch.randn(1, 3, 5, 9, 11, device=device)
    inv = cam.inverse_affines(5, 9, 11, device=device)
    zf = torch.randn(2, 4, 3, 6, 7, device=device)
    return [(z, inv, False), (zf, cam.inverse_affines(4, 6, 7, device=device), True)]

