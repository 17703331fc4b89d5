"""plucker_embedding: per-pixel Plücker rays of a camera trajectory (specs/motionflow.md).

Checks, the custom op `lightmotion::plucker_embedding`, and the choice of implementation. The meaning
is in reference/plucker.py, the speed in kernels/plucker.py.
"""
from __future__ import annotations

import operator

import torch

from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend
from lightmotion_fast.reference.plucker import plucker_embedding_reference

# Poses read from files are rarely orthonormal to the last bit; these bounds catch scale, shear,
# reflection and garbage, not rounding: the rotation bound widens to twice the machine epsilon of a
# 16-bit c2w (a rotation rounded to bfloat16 is off by up to ~4e-3, to float16 by ~1e-3).
ROTATION_ATOL = 1e-3
LAST_ROW_ATOL = 1e-5


@torch.library.custom_op("lightmotion::plucker_embedding", mutates_args=())
def plucker_embedding_op(intrinsics: torch.Tensor, c2w: torch.Tensor, height: int, width: int,
                         relative: bool, channels_first: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """intrinsics: [b f 4] or [b f 3 3]; c2w: [b f 4 4]. Returns [b f 6 h w] or [b 6 f h w]."""
    batch, frames = c2w.shape[:2]
    shape = (batch, 6, frames, height, width) if channels_first else (batch, frames, 6, height, width)
    out = torch.empty(shape, dtype=out_dtype, device=c2w.device)
    view = out.transpose(1, 2) if channels_first else out        # always [b f 6 h w] for the kernel
    impl = _common.select_backend(c2w.device)
    if impl is Backend.TRITON:
        _common.kernel_module("plucker").plucker_launch(intrinsics, c2w, view, relative)
    else:
        out.copy_(plucker_embedding_reference(intrinsics, c2w, height, width, relative, channels_first, out_dtype))
    return out


@plucker_embedding_op.register_fake
def _(intrinsics, c2w, height, width, relative, channels_first, out_dtype):
    batch, frames = c2w.shape[:2]
    shape = (batch, 6, frames, height, width) if channels_first else (batch, frames, 6, height, width)
    return c2w.new_empty(shape, dtype=out_dtype)


def check_cameras(intrinsics: torch.Tensor, c2w: torch.Tensor) -> None:
    """Raise ValueError for NaN/inf, a singular K or a pose that is not a rigid transform.
    Reads the values back (one host synchronisation on a GPU)."""
    with torch.no_grad():
        k = intrinsics.double()
        pose = c2w.double()
        if not bool(torch.isfinite(k).all()):
            raise ValueError(f"intrinsics contain NaN or inf (shape {tuple(intrinsics.shape)})")
        if not bool(torch.isfinite(pose).all()):
            raise ValueError(f"c2w contains NaN or inf (shape {tuple(c2w.shape)})")
        if k.ndim == 3:
            singular = (k[..., 0] == 0) | (k[..., 1] == 0)
        else:
            scale = k.abs().amax(dim=(-2, -1)).clamp_min(1e-300)
            singular = torch.linalg.det(k).abs() <= 1e-9 * scale**3
        if bool(singular.any()):
            b, f = torch.nonzero(singular)[0].tolist()
            raise ValueError(f"intrinsics of batch {b}, frame {f} are singular (fx or fy is 0, or det K = 0): "
                             f"{intrinsics[b, f].tolist()}")
        rot = pose[..., :3, :3]
        rot_atol = max(ROTATION_ATOL, 2 * torch.finfo(c2w.dtype).eps)
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        ortho_err = (rot.transpose(-1, -2) @ rot - eye).abs().amax(dim=(-2, -1))
        det_err = (torch.linalg.det(rot) - 1).abs()
        last = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=pose.dtype, device=pose.device)
        row_err = (pose[..., 3, :] - last).abs().amax(dim=-1)
        bad = (ortho_err > rot_atol) | (det_err > rot_atol) | (row_err > LAST_ROW_ATOL)
        if bool(bad.any()):
            b, f = torch.nonzero(bad)[0].tolist()
            raise ValueError(
                f"c2w of batch {b}, frame {f} is not a rigid camera-to-world pose (expected R orthonormal "
                f"with det 1 and last row [0, 0, 0, 1]; |RᵀR − I| = {ortho_err[b, f]:.3g}, "
                f"|det R − 1| = {det_err[b, f]:.3g}, last row {pose[b, f, 3].tolist()})")


# float64 too: poses and intrinsics read from files and numpy arrive in float64, and the op computes in
# float64 for them (reference and kernel alike).
DTYPES = (*_common.FLOAT_DTYPES, torch.float64)


def _positive_int(name: str, value) -> int:
    """An int >= 1; numpy and other integer types are taken (operator.index), floats and bools are not."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(number)


def _should_validate(validate: bool | None, c2w: torch.Tensor) -> bool:
    """Whether to run the value checks. They read the cameras back to the host, which a graph being
    traced by torch.compile cannot do: the default checks eager calls only."""
    if validate is None:
        return not torch.compiler.is_compiling() and c2w.device.type != "meta"
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be True, False or None, got {validate!r}")
    if validate and torch.compiler.is_compiling():
        raise ValueError("validate=True reads the cameras back to the host, which torch.compile cannot trace: "
                         "leave validate=None (checks eager calls only) or pass validate=False")
    return validate


def plucker_embedding(intrinsics: torch.Tensor, c2w: torch.Tensor, height: int, width: int, *,
                      relative: bool = False, channels_first: bool = False, dtype: torch.dtype | None = None,
                      validate: bool | None = None) -> torch.Tensor:
    """Plücker ray embedding (o × d, d) of every pixel of every frame (CameraCtrl / CamI2V convention).

    intrinsics: [b f 4] (fx, fy, cx, cy, in pixels of the H×W target) or [b f 3 3];
    c2w: [b f 4 4] camera-to-world poses, OpenCV axes (x right, y down, z forward).
    Both float32, float16, bfloat16 or float64 (computed in float64 when c2w is float64, else float32).
    relative=True expresses every pose relative to the first frame (c2w_0⁻¹ · c2w_f).
    Returns [b f 6 h w] (or [b 6 f h w] with channels_first=True) in `dtype` (default c2w's dtype);
    channels 0-2 are the moment t × d, 3-5 the unit direction d.

    validate: the value checks (NaN/inf, singular K, a pose that is not rigid) read the cameras back
    to the host (one synchronisation on a GPU). None (default): checked on eager calls, skipped while
    torch.compile traces the call (so `torch.compile(fullgraph=True)` works) and for meta tensors;
    True: always checked (an error inside torch.compile); False: never.

    Differentiable in intrinsics and c2w: when either requires grad (and grad mode is on) the call runs
    the PyTorch reference, which autograd differentiates; otherwise the kernel.

    >>> k = torch.tensor([[[300.0, 300.0, 128.0, 128.0]]]).expand(1, 16, 4)
    >>> rays = plucker_embedding(k, torch.eye(4).expand(1, 16, 4, 4), 256, 256)   # [1, 16, 6, 256, 256]
    """
    _common.check_tensor("c2w", c2w, ndim=4, dims="b f 4 4", dtypes=DTYPES)
    _common.check_tensor("intrinsics", intrinsics, ndim=(3, 4), dims="b f 4 or b f 3 3", dtypes=DTYPES)
    if tuple(c2w.shape[2:]) != (4, 4):
        raise ValueError(f"c2w must have shape [b, f, 4, 4], got {tuple(c2w.shape)}")
    if intrinsics.shape[:2] != c2w.shape[:2] or (
            tuple(intrinsics.shape[2:]) not in ((4,), (3, 3))):
        raise ValueError(f"intrinsics must have shape [{c2w.shape[0]}, {c2w.shape[1]}, 4] or "
                         f"[{c2w.shape[0]}, {c2w.shape[1]}, 3, 3] (b, f of c2w), got {tuple(intrinsics.shape)}")
    _common.check_same_device(intrinsics=intrinsics, c2w=c2w)
    height, width = _positive_int("height", height), _positive_int("width", width)
    if c2w.shape[0] == 0 or c2w.shape[1] == 0:
        raise ValueError(f"c2w must have at least one batch and one frame, got shape {tuple(c2w.shape)}")
    out_dtype = dtype or c2w.dtype
    if out_dtype not in DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, float64, got {out_dtype}")
    if _should_validate(validate, c2w):
        check_cameras(intrinsics, c2w)
    if torch.is_grad_enabled() and (intrinsics.requires_grad or c2w.requires_grad):
        # Gradients to the cameras (pose or focal-length optimisation): the PyTorch reference, which
        # autograd differentiates; the kernel has no backward.
        with torch.autocast(c2w.device.type, enabled=False):   # as the op: computed as called
            return plucker_embedding_reference(intrinsics, c2w, height, width, relative, channels_first, out_dtype)
    return plucker_embedding_op(intrinsics, c2w, height, width, relative, channels_first, out_dtype)


def sample_inputs(device: torch.device):
    """Arguments for opcheck and torch.compile tests."""
    k = torch.tensor([40.0, 44.0, 6.0, 5.0], device=device).expand(2, 3, 4).contiguous()
    theta = torch.linspace(0, 0.5, 3, device=device)
    pose = torch.eye(4, device=device).repeat(2, 3, 1, 1)
    pose[:, :, 0, 0], pose[:, :, 0, 2] = torch.cos(theta), torch.sin(theta)
    pose[:, :, 2, 0], pose[:, :, 2, 2] = -torch.sin(theta), torch.cos(theta)
    pose[:, :, :3, 3] = torch.randn(2, 3, 3, device=device)
    k33 = torch.tensor([[40.0, 0.0, 6.0], [0.0, 44.0, 5.0], [0.0, 0.0, 1.0]], device=device).expand(2, 3, 3, 3)
    return [(k, pose, 9, 11, False, False, torch.float32),
            (k33.contiguous(), pose, 7, 5, True, True, torch.float16)]
