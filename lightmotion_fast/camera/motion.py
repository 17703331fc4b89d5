"""Camera motion parameters and the per-frame similarity transforms they define.

Conventions (specs/lightmotion.md, "Camera motion"), in latent pixel coordinates with x to the
right and y down, about the latent centre c = ((W-1)/2, (H-1)/2):

- pan=(x, y): totals over the clip as fractions of the latent width and height. x > 0 pans the
  camera right, so content moves left; y > 0 tilts the camera down, so content moves up.
- zoom=z: relative scale change at the last frame; z > 0 zooms in (content is magnified about the
  centre by 1 + z at the last frame), -1 < z < 0 zooms out.
- rotate=deg: counter-clockwise camera roll in degrees at the last frame; the content turns
  clockwise on screen by the same angle.
- Frame f of F moves by a = f / (F - 1) of each total, or by the fractions in a user `schedule`
  [F, 4] (columns: pan x, pan y, zoom, rotate). Frame 0 is the identity under the default schedule.

The forward transform of frame f maps a source position of the original frame to where its
content appears:  target = c + s·R(θ)·(src - c) - pan,  with s = 1 + a·z, θ = a·deg and
R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]] (clockwise on a y-down screen). Each output pixel p takes
src = round(A_f⁻¹ p); the kernels compute that from the 2×3 inverse matrix of each frame.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch


def _version(t: torch.Tensor) -> int | None:
    """t's in-place version counter (None for an inference tensor, which has none). ops._common's
    tensor_version does the same for the ops; importing it here would be a cycle (ops import the camera),
    and the camera's check never runs while torch.compile traces."""
    return None if t.is_inference() else t._version


def as_int(name: str, value, minimum: int = 0) -> int:
    """`value` as a Python int (numpy and torch integer scalars accepted); TypeError for anything that
    is not an integer (floats included, even 8.0), ValueError below `minimum`."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _finite(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"CameraMotion {name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"CameraMotion {name} must be finite, got {value}")
    return value


@dataclass(frozen=True, eq=False)
class CameraMotion:
    """Camera motion totals over a clip, and optionally a per-frame schedule.

    >>> cam = CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)
    >>> cam.inverse_affines(frames=16, height=64, width=64).shape
    torch.Size([16, 2, 3])
    """

    pan: tuple[float, float] = (0.0, 0.0)
    zoom: float = 0.0
    rotate: float = 0.0
    schedule: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _schedule_version: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        pan = self.pan
        if isinstance(pan, (int, float)):
            pan = (pan, 0.0)
        if len(tuple(pan)) != 2:
            raise ValueError(f"CameraMotion pan must be (x, y), got {self.pan!r}")
        object.__setattr__(self, "pan", (_finite("pan[0]", pan[0]), _finite("pan[1]", pan[1])))
        object.__setattr__(self, "zoom", _finite("zoom", self.zoom))
        object.__setattr__(self, "rotate", _finite("rotate", self.rotate))
        if self.schedule is not None:
            sched = self.schedule
            if not isinstance(sched, torch.Tensor):
                sched = torch.as_tensor(sched, dtype=torch.float64)
            if sched.ndim != 2 or sched.shape[1] != 4:
                raise ValueError(f"CameraMotion schedule must have shape [F, 4] (pan x, pan y, zoom, "
                                 f"rotate fractions per frame), got {tuple(sched.shape)}")
            if not sched.is_floating_point():
                sched = sched.to(torch.float64)
            if not bool(torch.isfinite(sched).all()):
                raise ValueError("CameraMotion schedule must be finite, got NaN or infinite entries")
            object.__setattr__(self, "schedule", sched.detach().to("cpu", torch.float64).clone())
            object.__setattr__(self, "_schedule_version", _version(self.schedule))
        fractions = self.schedule[:, 2] if self.schedule is not None else torch.tensor([0.0, 1.0])
        if bool(((1.0 + fractions.double() * self.zoom) <= 0).any()):
            raise ValueError(f"CameraMotion zoom={self.zoom} gives a non-positive scale at some frame "
                             "(zoom out is limited to zoom > -1)")

    def _check_schedule_unchanged(self) -> None:
        # The camera is immutable and caches what it computes from its schedule (its own copy). A host
        # check: skipped while torch.compile traces (a version counter is a data-dependent value there).
        if torch.compiler.is_compiling():
            return
        if _version(self.schedule) != self._schedule_version:
            raise RuntimeError("CameraMotion.schedule was modified in place after the camera was made; a camera "
                               "is immutable (it caches its transforms): make a new CameraMotion(schedule=...)")

    @property
    def is_identity(self) -> bool:
        return self.pan == (0.0, 0.0) and self.zoom == 0.0 and self.rotate == 0.0

    def fractions(self, frames: int) -> torch.Tensor:
        """[F, 4] float64: the fraction of each total (pan x, pan y, zoom, rotate) at every frame."""
        frames = as_int("frames", frames, minimum=1)
        if self.schedule is not None:
            self._check_schedule_unchanged()
            if self.schedule.shape[0] != frames:
                raise ValueError(f"CameraMotion schedule has {self.schedule.shape[0]} frames but the "
                                 f"latent has {frames} (frame dimension)")
            return self.schedule
        a = torch.arange(frames, dtype=torch.float64) / max(frames - 1, 1)
        return a[:, None].expand(frames, 4).clone()

    def affines(self, frames: int, height: int, width: int) -> torch.Tensor:
        """[F, 2, 3] float64 forward transforms: source position -> target position (x, y)."""
        frac = self.fractions(frames)
        height, width = as_int("height", height), as_int("width", width)
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        tx = frac[:, 0] * self.pan[0] * width
        ty = frac[:, 1] * self.pan[1] * height
        s = 1.0 + frac[:, 2] * self.zoom
        theta = torch.deg2rad(frac[:, 3] * self.rotate)
        cos, sin = torch.cos(theta) * s, torch.sin(theta) * s
        m = torch.zeros(frames, 2, 3, dtype=torch.float64)
        m[:, 0, 0], m[:, 0, 1] = cos, -sin
        m[:, 1, 0], m[:, 1, 1] = sin, cos
        # target = c + sR(src - c) - pan  =>  offset = c - sR c - pan
        m[:, 0, 2] = cx - (cos * cx - sin * cy) - tx
        m[:, 1, 2] = cy - (sin * cx + cos * cy) - ty
        return m

    def inverse_affines(self, frames: int, height: int, width: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
        """[F, 2, 3] float32 inverse transforms: target position -> source position (x, y).

        Built in float64 and rounded once to float32, which is what every implementation reads.
        Returns a new tensor the caller owns (the ops read a cached copy, see `cached_inverse_affines`).
        """
        return self.cached_inverse_affines(frames, height, width, device).clone()

    def cached_inverse_affines(self, frames: int, height: int, width: int,
                               device: torch.device | str = "cpu") -> torch.Tensor:
        """As `inverse_affines`, but the camera's cached tensor itself: read it, never modify it.

        Cached per (shape, device), so repeated calls on the GPU copy nothing to the device (the ops
        then need no host synchronisation and can be captured in a CUDA graph).
        """
        frames, height, width = as_int("frames", frames, 1), as_int("height", height), as_int("width", width)
        key = (frames, height, width, str(torch.device(device)))
        if self.schedule is not None:
            self._check_schedule_unchanged()
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        fwd = self.affines(frames, height, width)
        lin, off = fwd[:, :, :2], fwd[:, :, 2:]
        inv_lin = torch.linalg.inv(lin)
        inv = torch.cat([inv_lin, -inv_lin @ off], dim=2).to(torch.float32)
        inv = inv.to(device)
        self._cache[key] = inv
        return inv
