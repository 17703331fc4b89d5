"""Every trajectory source of Trajectory Attention (specs/trajectory_attention.md, "Trajectories").

    depth = depth_from_disparity(disparity)                          # a monocular depth model's output
    K, poses = camera_preset("orbit_horizontal", 25, frame_size=(576, 1024))
    coords, valid = trajectories_from_depth(depth, K, poses)         # image camera control
    coords, valid = trajectories_from_flow(forward, backward)        # chained optical flow (training, video)
    coords, valid = merge_tracks_with_camera(tracks, visibility, depths, K, poses)   # video camera control

All of them return coords [f, n, 2] float32 (x, y) in pixels (pixel centres at integers) and valid [f, n]
bool on the CPU, ready for `TrajectoryTables`. The inputs (disparity or depth maps, flows, tracks) come
from the user's own models; nothing here downloads one.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lightmotion_fast.camera.trajectories import (
    OUT_OF_FRAME,
    _check,
    _check_finite,
    _choice,
    _int_pair,
    _integer,
    trajectories_from_depth,
    trajectories_from_tracks,
)
from lightmotion_fast.ops._common import check_finite_number

# ---------------------------------------------------------------------------------------------
# Disparity -> depth


def depth_from_disparity(disparity: torch.Tensor, *, scale: float = 10000.0, min_disparity: float = 1e-5,
                         near: float = 1e-4, far: float = 1e4) -> torch.Tensor:
    """Depth from a relative (affine-invariant) disparity map, the official convention for
    Depth-Anything-V2 outputs (larger = nearer): depth = clip(scale / max(disparity, min_disparity),
    near, far) with scale 10⁴, min_disparity 10⁻⁵ and [near, far] = [10⁻⁴, 10⁴].

    The unit is arbitrary but shared with `camera_preset`'s radius (200 by default: the orbit pivots
    about the point at depth 200, i.e. disparity 50). disparity: [..., H, W] (e.g. [f, H, W] per-frame);
    returns a new tensor of the same shape, float64 if given float64, float32 otherwise.
    """
    if not isinstance(disparity, torch.Tensor):
        raise TypeError(f"disparity must be a torch.Tensor, got {type(disparity).__name__}")
    if disparity.ndim < 2 or disparity.numel() == 0:
        raise ValueError(f"disparity must be a non-empty [..., H, W] map, got shape {tuple(disparity.shape)}")
    if disparity.is_complex() or disparity.dtype == torch.bool:
        raise TypeError(f"disparity must be real, got {disparity.dtype}")
    for name, value in (("scale", scale), ("min_disparity", min_disparity), ("near", near), ("far", far)):
        if not check_finite_number(name, value) > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if not near < far:
        raise ValueError(f"near must be < far, got near={near}, far={far}")
    d = disparity.detach().to(torch.float64)
    _check_finite("disparity", d)
    depth = (float(scale) / d.clamp(min=float(min_disparity))).clamp(float(near), float(far))
    return depth.to(torch.float64 if disparity.dtype == torch.float64 else torch.float32)


# ---------------------------------------------------------------------------------------------
# Camera-path presets


class CameraPath(NamedTuple):
    """Intrinsics K [3, 3] and world-to-camera poses [f, 4, 4] (float64): `trajectories_from_depth(depth, *path)`."""

    K: torch.Tensor
    poses: torch.Tensor


PRESETS = {"orbit_horizontal": "horizontal", "orbit_vertical": "vertical", "zoom_in": "zoomin", "zoom_out": "zoomout"}
OFFICIAL_FOCAL = 260.0        # pixels, for 1024-pixel-wide frames
OFFICIAL_RADIUS = 200.0       # distance from camera 0 to the pivot, in depth_from_disparity's unit


def _look_at(position: torch.Tensor) -> torch.Tensor:
    """World-to-camera [4, 4] of a camera at `position` looking at the origin, up = +y (the official
    construction: camera axes right = up × forward, up' = forward × right, forward = to the origin)."""
    forward = -position / position.norm()
    right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), forward)
    right = right / right.norm()
    up = torch.linalg.cross(forward, right)
    pose = torch.eye(4, dtype=torch.float64)
    rotation = torch.stack([right, up, forward])                      # rows: camera axes in world
    pose[:3, :3] = rotation
    pose[:3, 3] = -rotation @ position
    return pose


def camera_preset(mode: str, num_frames: int = 25, *, degrees_per_frame: float = 0.5,
                  radius: float = OFFICIAL_RADIUS, major_radius: float | None = None, focal: float | None = None,
                  frame_size: tuple[int, int] = (576, 1024)) -> CameraPath:
    """The official camera paths: "orbit_horizontal", "orbit_vertical", "zoom_in", "zoom_out" (the
    official names "horizontal", "vertical", "zoomin", "zoomout" are accepted too).

    Frame i's camera sits at angle a = i · degrees_per_frame on a path around a pivot at depth `radius`
    in front of camera 0 and looks at it, up = +y:
      orbit_horizontal: (major · sin a, 0, radius · cos a)   (the scene turns about the pivot's y axis)
      orbit_vertical:   (0, major · sin a, radius · cos a)   (about its x axis)
      zoom_in:          (0, 0, radius · cos a)               (moves toward the pivot)
      zoom_out:         (0, 0, radius · (1 + sin a))         (moves away)
    with major = major_radius (default: radius). Defaults are the official ones: radius 200 (in the
    unit of `depth_from_disparity`), focal 260 px for a 1024-px-wide frame (scaled with the width:
    the same field of view at any size), principal point (W0/2, H0/2). frame_size: (H0, W0).
    Returns CameraPath(K [3, 3], poses [num_frames, 4, 4]) in float64; frame 0's pose is camera 0.
    """
    if mode not in PRESETS and mode not in PRESETS.values():
        raise ValueError(f"mode must be one of {tuple(PRESETS)} (or the official {tuple(PRESETS.values())}), "
                         f"got {mode!r}")
    mode = PRESETS.get(mode, mode)
    num_frames = _integer("num_frames", num_frames)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    height0, width0 = _int_pair("frame_size", frame_size, "(H0, W0)")
    degrees = check_finite_number("degrees_per_frame", degrees_per_frame)
    major = radius if major_radius is None else major_radius
    for name, value in (("radius", radius), ("major_radius", major)):
        if not check_finite_number(name, value) > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    focal = OFFICIAL_FOCAL * width0 / 1024.0 if focal is None else focal
    if not check_finite_number("focal", focal) > 0:
        raise ValueError(f"focal must be > 0, got {focal}")
    K = torch.tensor([[focal, 0.0, width0 / 2.0], [0.0, focal, height0 / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    poses = []
    for i in range(num_frames):
        a = math.radians(degrees * i)
        s, c = math.sin(a), math.cos(a)
        position = {"horizontal": (major * s, 0.0, radius * c), "vertical": (0.0, major * s, radius * c),
                    "zoomin": (0.0, 0.0, radius * c), "zoomout": (0.0, 0.0, radius * (1.0 + s))}[mode]
        position = torch.tensor(position, dtype=torch.float64)
        # the look-at frame is undefined at the pivot or looking straight up or down
        if position.norm() < 1e-9 * radius or torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
                                                                  position).norm() < 1e-9 * position.norm():
            raise ValueError(f"degrees_per_frame={degrees_per_frame} puts camera {i} of {mode!r} at the pivot or "
                             "straight above/below it, where the look-at frame is undefined; use fewer degrees")
        poses.append(_look_at(position))
    return CameraPath(K, torch.stack(poses))


# ---------------------------------------------------------------------------------------------
# Chained optical flow


def _bilinear(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """field [2, H, W] sampled bilinearly at points [n, 2] (x, y; pixel centres at integers): [n, 2].
    Beyond the outermost pixel centres (the half-pixel border of the frame) the border cell's bilinear
    function is extended, so fields linear in position (a pan, a zoom, a rotation) are exact everywhere."""
    _, height, width = field.shape
    x, y = points[:, 0], points[:, 1]
    x0 = torch.floor(x).clamp(0, max(width - 2, 0)).to(torch.int64)
    y0 = torch.floor(y).clamp(0, max(height - 2, 0)).to(torch.int64)
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    g = field.permute(1, 2, 0)                                              # [H, W, 2]
    top = g[y0, x0] * (1 - fx) + g[y0, x1] * fx
    bottom = g[y1, x0] * (1 - fx) + g[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _check_flows(forward: torch.Tensor, backward: torch.Tensor) -> None:
    for name, t in (("forward", forward), ("backward", backward)):
        _check(name, t, 4, "f-1 2 H W")
        if t.shape[1] != 2:
            raise ValueError(f"{name} must have shape [f-1, 2, H, W] (x and y channels), got {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be a real flow field, got {t.dtype}")
    if forward.shape != backward.shape:
        raise ValueError(f"backward must have forward's shape {tuple(forward.shape)}, got {tuple(backward.shape)}")
    if forward.shape[0] == 0 or forward.shape[2] == 0 or forward.shape[3] == 0:
        raise ValueError(f"forward must hold at least one non-empty flow field, got shape {tuple(forward.shape)}")


def trajectories_from_flow(forward: torch.Tensor, backward: torch.Tensor, *, stride: int = 1,
                           relative: float = 0.01, absolute: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectories of frame 0's pixels by chaining optical flow, with forward–backward consistency
    as the occlusion test (training data and video control).

    forward [f-1, 2, H, W]: flow from frame t to t+1 at frame t's pixels (x, y channels, in pixels;
    the layout of RAFT / torchvision); backward [f-1, 2, H, W]: flow from frame t+1 to t at frame t+1's
    pixels. Trajectories start at every `stride`-th pixel of frame 0 (row-major). At each step a point
    p moves by w = forward[t](p) (bilinear); it stays valid when its new position q rounds to a pixel of
    the frame and the flows agree: |w + ŵ|² ≤ relative · (|w|² + |ŵ|²) + absolute, ŵ = backward[t](q)
    (the usual test of Sundaram et al. 2010; defaults 0.01 and 0.5 px²). A point that fails is
    occluded or lost: invalid from then on (chained flow cannot find it again), coordinates (0, 0).
    Returns coords [f, n, 2] float32, valid [f, n] bool (computed in float64).
    """
    _check_flows(forward, backward)
    stride = _integer("stride", stride)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    for name, value in (("relative", relative), ("absolute", absolute)):
        if check_finite_number(name, value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    fwd = forward.detach().cpu().to(torch.float64)
    bwd = backward.detach().cpu().to(torch.float64)
    _check_finite("forward", fwd)
    _check_finite("backward", bwd)
    steps, _, height, width = fwd.shape
    ys, xs = torch.meshgrid(torch.arange(0, height, stride, dtype=torch.float64),
                            torch.arange(0, width, stride, dtype=torch.float64), indexing="ij")
    p = torch.stack([xs, ys], dim=-1).reshape(-1, 2)
    alive = torch.ones(p.shape[0], dtype=torch.bool)
    coords, valid = [p], [alive]
    for t in range(steps):
        w = _bilinear(fwd[t], p)
        q = p + w
        rounded = torch.floor(q + 0.5)
        inside = (rounded[:, 0] >= 0) & (rounded[:, 0] < width) & (rounded[:, 1] >= 0) & (rounded[:, 1] < height)
        back = _bilinear(bwd[t], q)
        agree = (w + back).square().sum(1) <= relative * (w.square().sum(1) + back.square().sum(1)) + absolute
        alive = alive & inside & agree
        p = torch.where(alive[:, None], q, torch.zeros_like(q))
        coords.append(p)
        valid.append(alive)
    return torch.stack(coords).to(torch.float32), torch.stack(valid)


# ---------------------------------------------------------------------------------------------
# Video camera control: point tracks + camera-induced flow from per-frame depth


def merge_tracks_with_camera(tracks: torch.Tensor, visibility: torch.Tensor | None, depths: torch.Tensor,
                             K: torch.Tensor, poses: torch.Tensor, *, tolerance: float = 0.03, splat: str = "quads",
                             edge: float = 0.1, out_of_frame: str = "invalidate") -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectories for camera control of an existing video (the official video path): each point track
    of the input video is moved by the flow the new camera path induces at its position.

    tracks [f, n, 2] / visibility [f, n]: a point tracker's output on the input video (as
    `trajectories_from_tracks`); depths [f, H0, W0]: each input frame's depth (or [H0, W0] for all);
    K [3, 3], poses [f, 4, 4]: the new camera path (e.g. `camera_preset`), frame 0's pose the input
    camera. At frame t, the camera-induced flow of frame t's pixels is where `trajectories_from_depth`
    (depths[t], poses[0] → poses[t]) takes them; a track visible at pixel p (its position rounded)
    becomes track + flow(p). It is valid when the track is visible inside the frame, the camera path
    keeps p visible (not occluded, not behind the camera; tolerance, splat, edge as in
    `trajectories_from_depth`) and the merged point is inside the frame, or with out_of_frame="clamp"
    (official) clamped to the border and kept. Returns coords [f, n, 2] float32, valid [f, n] bool.
    """
    coords, valid = trajectories_from_tracks(tracks, visibility)
    frames = coords.shape[0]
    if isinstance(depths, torch.Tensor) and depths.ndim == 2:
        depths = depths.expand(frames, *depths.shape)
    _check("depths", depths, 3, "f H0 W0")
    if depths.shape[0] != frames:
        raise ValueError(f"depths must hold one depth map per track frame ({frames}), got shape {tuple(depths.shape)}")
    _check("poses", poses, 3, "f 4 4")
    if poses.shape[0] != frames:
        raise ValueError(f"poses must hold one pose per track frame ({frames}), got shape {tuple(poses.shape)}")
    _choice("out_of_frame", out_of_frame, OUT_OF_FRAME)
    height0, width0 = depths.shape[1:]
    px = torch.floor(coords[..., 0] + 0.5).to(torch.int64)
    py = torch.floor(coords[..., 1] + 0.5).to(torch.int64)
    valid = valid & (px >= 0) & (px < width0) & (py >= 0) & (py < height0)
    pixel = (py.clamp(0, height0 - 1) * width0 + px.clamp(0, width0 - 1))          # [f, n]
    v, u = torch.meshgrid(torch.arange(height0, dtype=torch.float32), torch.arange(width0, dtype=torch.float32),
                          indexing="ij")
    grid = torch.stack([u, v], dim=-1).reshape(-1, 2)
    merged = torch.empty_like(coords)
    for t in range(frames):
        moved, seen = trajectories_from_depth(depths[t], K, poses[[0, t]], tolerance=tolerance, splat=splat,
                                              edge=edge, out_of_frame=out_of_frame)
        flow = moved[1] - grid                                                    # [H0·W0, 2]
        merged[t] = coords[t] + flow[pixel[t]]
        valid[t] &= seen[1][pixel[t]]
    if out_of_frame == "clamp":
        merged = torch.stack([merged[..., 0].clamp(0, width0 - 1), merged[..., 1].clamp(0, height0 - 1)], dim=-1)
    else:
        rx, ry = torch.floor(merged[..., 0] + 0.5), torch.floor(merged[..., 1] + 0.5)
        valid &= (rx >= 0) & (rx < width0) & (ry >= 0) & (ry < height0)
    merged = torch.where(valid[..., None], merged, torch.zeros_like(merged))
    return merged.contiguous(), valid.contiguous()
