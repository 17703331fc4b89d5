"""Pixel trajectories and their per-level index tables (specs/trajectory_attention.md, "Trajectories").

    coords, valid = trajectories_from_depth(depth, K, poses)        # a depth map and a camera path
    coords, valid = trajectories_from_tracks(tracks, visibility)     # a point tracker's output
    # disparity -> depth, camera presets, optical flow, tracks + camera: camera/trajectory_sources.py
    tables = TrajectoryTables(coords, valid, frame_size=(576, 1024), latent_size=(72, 128), seed=0)
    level = tables.level(72 * 128, device="cuda")                    # idx, valid, rowptr, col, landed

coords are [f, n, 2] (x, y) in pixels of the original frame, pixel centres at integers (OpenCV);
valid [f, n] is False where a point is occluded, behind the camera, or out of frame. The z-buffer and
the table building run in the C++ extension when it is loaded; the Python functions here
(`zbuffer_reference`, `level_tables_reference`) are their references and fallbacks, and agree bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lightmotion_fast import _ext
from lightmotion_fast.ops._common import check_finite_number
from lightmotion_fast.ops.trajectory_attention import TrajectoryIndex
from lightmotion_fast.reference.trajectory_attention import (
    incoming_csr,
    level_indices,
    num_samples,
    subsample,
)


def _check(name: str, t, ndim: int, dims: str, last: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim or (last is not None and t.shape[-1] != last):
        raise ValueError(f"{name} must have shape [{dims}], got {tuple(t.shape)}")


def _integer(name: str, value) -> int:
    """A Python or numpy integer (anything with __index__, not a bool) as an int."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return value.__index__()


def _int_pair(name: str, value, dims: str) -> tuple[int, int]:
    """A pair of positive integers, e.g. a frame size in pixels."""
    if not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be {dims}, two positive integers, got {value!r}")
    try:
        pair = (_integer(name, value[0]), _integer(name, value[1]))
    except TypeError:
        raise TypeError(f"{name} must be {dims}, two positive integers, got {tuple(value)!r}") from None
    if min(pair) <= 0:
        raise ValueError(f"{name} must be {dims} > 0, got {pair}")
    return pair


def _check_invertible(name: str, m: torch.Tensor) -> None:
    """m [..., n, n] float64: each matrix invertible, checked without raising torch's LinAlgError."""
    _, info = torch.linalg.inv_ex(m)
    singular = (info != 0) | (torch.linalg.det(m).abs() < 1e-12)
    if bool(singular.any()):
        where = "" if m.ndim == 2 else f" (at {singular.nonzero().squeeze(1).tolist()[:5]})"
        raise ValueError(f"{name} must be invertible, got a singular matrix{where}")


def _check_finite(name: str, t: torch.Tensor, where: torch.Tensor | None = None) -> None:
    bad = ~torch.isfinite(t)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        raise ValueError(f"{name} has {int(bad.sum())} non-finite (NaN or inf) values"
                         + (" at valid points" if where is not None else ""))


# ---------------------------------------------------------------------------------------------
# Occlusion test


_SUB = 256                 # fixed-point vertex coordinates: 1/256 pixel
_MAX_COORD = 2.0 ** 20     # quads with a corner farther out than this (pixels) are not splatted


def _grid_quads(grid_height: int, grid_width: int) -> torch.Tensor:
    """[q, 4] int64: the corners a b c d of every quad of a row-major grid, pixel (i, j) with its right,
    diagonal and bottom neighbours, in that order around the quad."""
    n = torch.arange(grid_height * grid_width).reshape(grid_height, grid_width)
    return torch.stack([n[:-1, :-1], n[:-1, 1:], n[1:, 1:], n[1:, :-1]], dim=-1).reshape(-1, 4)


def _edge(v0: torch.Tensor, v1: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Twice the signed area of (v0, v1, p), int64 [..., 2] fixed point: exact."""
    return (v1[..., 0] - v0[..., 0]) * (p[..., 1] - v0[..., 1]) - (v1[..., 1] - v0[..., 1]) * (p[..., 0] - v0[..., 0])


def _in_triangle(v0, v1, v2, p) -> torch.Tensor:
    """Pixel centres p inside triangle v0 v1 v2 or on its boundary; zero-area triangles cover nothing."""
    e0, e1, e2 = _edge(v0, v1, p), _edge(v1, v2, p), _edge(v2, v0, p)
    inside = ((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))
    return inside & (_edge(v0, v1, v2) != 0)


def _quad_splats(uv: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int],
                 height: int, width: int, edge: float, chunk: int = 1 << 21) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame's quads rasterised: (flat pixel [m] int64, depth [m] float32), one entry per covered pixel.

    uv [n, 2] / depth [n] / valid [n] for the n = gh·gw source pixels. A quad (triangles a b c and a c d)
    is splatted with its largest corner depth when its four corners are valid and within 2^20 px, and its
    corner depths are within a factor 1 + edge (a larger jump is a depth edge, whose gap is disoccluded).
    A pixel is covered when its centre lies in a triangle or on its boundary, tested with exact integer
    edge functions on 1/256-px fixed-point vertices (so the C++ extension agrees bit for bit)."""
    corners = _grid_quads(*grid)
    z = depth[corners]                                                         # [q, 4]
    zmin, zmax = z.amin(1), z.amax(1)
    xy = uv[corners]                                                           # [q, 4, 2] float32
    use = valid[corners].all(1) & (xy.abs() <= _MAX_COORD).all(2).all(1)
    use &= zmax <= zmin * torch.tensor(1.0 + edge, dtype=torch.float32)
    corners, zmax, xy = corners[use], zmax[use], xy[use]
    fixed = torch.floor(xy.to(torch.float64) * _SUB + 0.5).to(torch.int64)      # [q, 4, 2]
    lo = -torch.div(-fixed.amin(1), _SUB, rounding_mode="floor")               # first pixel centre >= min
    hi = torch.div(fixed.amax(1), _SUB, rounding_mode="floor")                  # last pixel centre <= max
    limit = torch.tensor([width - 1, height - 1])
    lo, hi = lo.clamp(min=0), torch.minimum(hi, limit)
    span = (hi - lo + 1).clamp(min=0)                                           # [q, 2] pixels in x, y
    count = span[:, 0] * span[:, 1]
    pixels, depths = [], []
    start = 0
    while start < count.numel():   # chunks of quads, so the candidate pixels stay within `chunk` entries
        total = torch.cumsum(count[start:], 0)
        stop = start + max(1, int(torch.searchsorted(total, torch.tensor(chunk), right=True)))
        q = torch.repeat_interleave(torch.arange(start, stop), count[start:stop])
        local = torch.arange(q.numel()) - torch.repeat_interleave(torch.cumsum(count[start:stop], 0)
                                                                  - count[start:stop], count[start:stop])
        px = lo[q, 0] + local % span[q, 0]
        py = lo[q, 1] + torch.div(local, span[q, 0], rounding_mode="floor")
        p = torch.stack([px, py], -1) * _SUB
        v = fixed[q]
        hit = _in_triangle(v[:, 0], v[:, 1], v[:, 2], p) | _in_triangle(v[:, 0], v[:, 2], v[:, 3], p)
        pixels.append((py * width + px)[hit])
        depths.append(zmax[q][hit])
        start = stop
    if not pixels:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
    return torch.cat(pixels), torch.cat(depths)


def zbuffer_reference(uv: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor, height: int, width: int,
                      scale: float, grid: tuple[int, int] | None = None, edge: float = 0.1) -> torch.Tensor:
    """The occlusion test. uv [f, n, 2], depth [f, n] float32, valid [f, n] bool; returns the new valid [f, n].

    Per frame, every valid point is splatted to its nearest pixel (round half up), and with `grid` =
    (gh, gw) (the n points are that row-major source grid) every quad between neighbouring source pixels
    is rasterised too (see `_quad_splats`), filling the holes a magnified surface leaves between its
    points. Each pixel keeps its smallest depth; a valid point inside the frame deeper than `scale` × that
    at its pixel is occluded. Points outside the frame are returned as given. The C++ op
    trajectory_zbuffer computes exactly this."""
    x = torch.floor(uv[..., 0] + 0.5).to(torch.int64)
    y = torch.floor(uv[..., 1] + 0.5).to(torch.int64)
    on = valid & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    out = valid.clone()
    for f in range(uv.shape[0]):
        target = (y[f] * width + x[f])[on[f]]
        nearest = torch.full((height * width,), float("inf"), dtype=torch.float32)
        if grid is not None:
            pixels, depths = _quad_splats(uv[f], depth[f], valid[f], grid, height, width, edge)
            nearest.scatter_reduce_(0, pixels, depths, reduce="amin")
        nearest.scatter_reduce_(0, target, depth[f][on[f]], reduce="amin")
        behind = depth[f][on[f]] > nearest[target] * torch.tensor(scale, dtype=torch.float32)
        out[f, on[f].nonzero().squeeze(1)[behind]] = False
    return out


def _cpp_zbuffer_splats_quads() -> bool:
    """The extension's trajectory_zbuffer takes the source grid (an extension built before quad splatting
    does not: the reference runs instead)."""
    if not _ext.has_op("trajectory_zbuffer"):
        return False
    schema = torch.ops.lightmotion_cpp.trajectory_zbuffer.default._schema
    return any(argument.name == "grid_height" for argument in schema.arguments)


def _zbuffer(uv, depth, valid, height, width, scale, grid=None, edge=0.1):
    if _cpp_zbuffer_splats_quads():
        gh, gw = grid if grid is not None else (0, 0)
        return torch.ops.lightmotion_cpp.trajectory_zbuffer(uv, depth, valid, height, width, scale, gh, gw, edge)
    return zbuffer_reference(uv, depth, valid, height, width, scale, grid, edge)


SPLATS = ("quads", "points")
OUT_OF_FRAME = ("invalidate", "clamp")


def _choice(name: str, value, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def trajectories_from_depth(depth: torch.Tensor, K: torch.Tensor, poses: torch.Tensor, *,
                            tolerance: float = 0.03, near: float = 1e-4, splat: str = "quads", edge: float = 0.1,
                            out_of_frame: str = "invalidate") -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectories of frame 0's pixels under a camera path.

    depth: [H0, W0] depth of frame 0 (positive, along the optical axis); K: [3, 3] intrinsics;
    poses: [f, 4, 4] world-to-camera matrices (frame 0's included). Every pixel (u, v) of frame 0 is
    unprojected with its depth, moved into frame f's camera by poses[f] @ poses[0]⁻¹ and projected.
    A point is invalid at frame f when it is behind the camera (z ≤ near), or more than `tolerance`
    (relative) behind the nearest surface at its pixel (z-buffer). splat="quads" (default, as the
    official depth path) rasterises the quad between each pixel and its right / bottom / diagonal
    neighbours into the z-buffer, so a magnified surface hides what is behind it; quads whose corner
    depths differ by more than a factor 1 + `edge` span a depth edge and are left out. splat="points"
    splats single points only (what this library did before: behind a 2× magnified surface most
    background points stay valid). Out of the frame: out_of_frame="invalidate" (default) marks the point
    invalid; "clamp" (the official behaviour) clamps its coordinates to the border and keeps it valid
    (it is not occlusion-tested).
    Returns coords [f, H0·W0, 2] float32 (x, y) and valid [f, H0·W0] bool, on the CPU; trajectory
    n starts at pixel (n mod W0, n div W0); points behind the camera have coordinates (0, 0).

    >>> K = torch.tensor([[100.0, 0, 32], [0, 100.0, 24], [0, 0, 1]])
    >>> coords, valid = trajectories_from_depth(torch.full((48, 64), 2.0), K, torch.eye(4).repeat(5, 1, 1))
    """
    _check_depth_camera(depth, K, poses)
    for name, value in (("tolerance", tolerance), ("near", near), ("edge", edge)):
        if check_finite_number(name, value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    _choice("splat", splat, SPLATS)
    _choice("out_of_frame", out_of_frame, OUT_OF_FRAME)
    height0, width0 = depth.shape
    uv, z, front = project_depth(depth, K, poses, near)
    rx = torch.floor(uv[..., 0] + 0.5)
    ry = torch.floor(uv[..., 1] + 0.5)
    inside = (rx >= 0) & (rx < width0) & (ry >= 0) & (ry < height0)
    grid = (height0, width0) if splat == "quads" else None
    valid = _zbuffer(uv, z.to(torch.float32), front, height0, width0, 1.0 + float(tolerance), grid, float(edge))
    if out_of_frame == "invalidate":
        return uv, valid & inside
    border = torch.stack([uv[..., 0].clamp(0, width0 - 1), uv[..., 1].clamp(0, height0 - 1)], dim=-1)
    return torch.where((front & ~inside)[..., None], border, uv), valid


def _check_depth_camera(depth, K, poses) -> None:
    """depth [H0, W0] positive, K [3, 3] invertible, poses [f ≥ 1, 4, 4] invertible; all real and finite."""
    _check("depth", depth, 2, "H0 W0")
    _check("K", K, 2, "3 3")
    if tuple(K.shape) != (3, 3):
        raise ValueError(f"K must have shape [3, 3], got {tuple(K.shape)}")
    _check("poses", poses, 3, "f 4 4")
    if tuple(poses.shape[1:]) != (4, 4):
        raise ValueError(f"poses must have shape [f, 4, 4], got {tuple(poses.shape)}")
    for name, t in (("depth", depth), ("K", K), ("poses", poses)):
        if t.is_complex():
            raise TypeError(f"{name} must be real, got {t.dtype}")
        _check_finite(name, t.detach().cpu().to(torch.float64))
    if depth.numel() == 0:
        raise ValueError(f"depth must be a non-empty [H0 W0] map, got shape {tuple(depth.shape)}")
    if poses.shape[0] == 0:
        raise ValueError("poses must hold at least one frame (frame 0's pose), got shape [0, 4, 4]")
    if bool((depth <= 0).any()):
        raise ValueError("depth must be positive everywhere")
    _check_invertible("K", K.detach().cpu().to(torch.float64))
    _check_invertible("poses", poses.detach().cpu().to(torch.float64))


def project_depth(depth: torch.Tensor, K: torch.Tensor, poses: torch.Tensor,
                  near: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where frame 0's pixels land under a camera path, without any visibility test (inputs as
    `trajectories_from_depth`, unchecked). Returns uv [f, H0·W0, 2] float32 (zeros where behind the
    camera), camera depth z [f, H0·W0] float64 and front = z > near [f, H0·W0] bool."""
    height0, width0 = depth.shape
    d = depth.detach().cpu().to(torch.float64)
    k64 = K.detach().cpu().to(torch.float64)
    p64 = poses.detach().cpu().to(torch.float64)
    v, u = torch.meshgrid(torch.arange(height0, dtype=torch.float64), torch.arange(width0, dtype=torch.float64),
                          indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(-1, 3)
    points = (pix @ torch.linalg.inv(k64).T) * d.reshape(-1, 1)             # frame-0 camera coordinates
    relative = p64 @ torch.linalg.inv(p64[0])                                # [f, 4, 4] cam0 -> cam f
    cam = points @ relative[:, :3, :3].transpose(1, 2) + relative[:, None, :3, 3]   # [f, n, 3]
    z = cam[..., 2]
    front = z > near
    proj = cam @ k64.T
    uv = proj[..., :2] / torch.where(front, z, torch.ones_like(z))[..., None]
    uv = torch.where(front[..., None], uv, torch.zeros_like(uv)).to(torch.float32)
    return uv, z, front


def trajectories_from_tracks(tracks: torch.Tensor, visibility: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectories from point tracks, e.g. a tracker's output.

    tracks: [f, n, 2] (x, y) pixels (a leading batch dim of 1 is dropped); visibility: [f, n] bool
    or probabilities (> 0.5 is visible); None means all visible. Coordinates must be finite where
    visible; invisible points may hold anything (they are zeroed). Returns (coords float32, valid bool).
    """
    if isinstance(tracks, torch.Tensor) and tracks.ndim == 4 and tracks.shape[0] == 1:
        tracks = tracks[0]
        if isinstance(visibility, torch.Tensor) and visibility.ndim == 3 and visibility.shape[0] == 1:
            visibility = visibility[0]
    _check("tracks", tracks, 3, "f n 2", last=2)
    if tracks.is_complex() or tracks.dtype == torch.bool:
        raise TypeError(f"tracks must hold real (x, y) coordinates, got dtype {tracks.dtype}")
    if visibility is None:
        visibility = torch.ones(tracks.shape[:2], dtype=torch.bool)
    _check("visibility", visibility, 2, "f n")
    if tuple(visibility.shape) != tuple(tracks.shape[:2]):
        raise ValueError(f"visibility must have shape {tuple(tracks.shape[:2])} [f, n] to match tracks, "
                         f"got {tuple(visibility.shape)}")
    valid = visibility.detach().cpu()
    valid = valid if valid.dtype == torch.bool else valid > 0.5
    coords = tracks.detach().cpu().to(torch.float32)
    _check_finite("tracks", coords, valid[..., None].expand_as(coords))
    coords = torch.where(valid[..., None], coords, torch.zeros_like(coords))
    return coords.contiguous(), valid.contiguous()


# ---------------------------------------------------------------------------------------------
# Per-level tables


def level_tables_reference(coords: torch.Tensor, valid: torch.Tensor, selection: torch.Tensor,
                           frame_size: tuple[int, int], level_size: tuple[int, int]):
    """(idx int32 [f, n_s], valid bool [f, n_s], rowptr int32 [f·h·w + 1], col int32 [nnz]) for the
    selected trajectories at one level; the C++ trajectory_level_tables computes exactly this."""
    idx = level_indices(coords[:, selection], frame_size, level_size)
    ok = valid[:, selection]
    rowptr, col = incoming_csr(idx, ok, level_size[0] * level_size[1])
    return idx.to(torch.int32), ok.contiguous(), rowptr.to(torch.int32), col.to(torch.int32)


def _level_tables(coords, valid, selection, frame_size, level_size):
    if _ext.has_op("trajectory_level_tables"):
        return torch.ops.lightmotion_cpp.trajectory_level_tables(coords, valid, selection, *frame_size, *level_size)
    return level_tables_reference(coords, valid, selection, frame_size, level_size)


@dataclass
class TrajectoryLevel:
    """Index tables of one UNet level (latent size h×w), ready for `trajectory_attention`: `index` is a
    `TrajectoryIndex` (checked once, when the level is built); idx, valid, rowptr, col and landed are
    its tensors."""

    size: tuple[int, int]
    selection: torch.Tensor   # [n_s] int64: which input trajectories this level uses
    index: TrajectoryIndex    # idx [f, n_s] int32, valid [f, n_s] bool, rowptr [f·h·w + 1] / col [nnz] int32

    idx = property(lambda self: self.index.idx)
    valid = property(lambda self: self.index.valid)
    rowptr = property(lambda self: self.index.rowptr)
    col = property(lambda self: self.index.col)

    @property
    def landed(self) -> torch.Tensor:
        """[f, h·w] bool: pixels at least one valid token lands on (where to_out's bias applies)."""
        return self.index.landed

    def to(self, device) -> "TrajectoryLevel":
        return TrajectoryLevel(self.size, self.selection, self.index.to(device, non_blocking=True))


def level_sizes(latent_size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Latent sizes of the UNet levels: each downsampler (3×3 conv, stride 2, padding 1) gives ceil(x/2)."""
    sizes = [tuple(int(s) for s in latent_size)]
    for _ in range(levels - 1):
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    return sizes


class TrajectoryTables:
    """Index tables for every UNet level, built once (C++ when available) and reused by every block
    and every denoising step.

    coords [f, n, 2] / valid [f, n]: trajectories in pixels of the original frame (frame_size =
    (H0, W0)); latent_size: the level-0 latent (h, w); levels: how many levels (SVD: 4). Each level
    keeps N_s = min(n, ratio·h·w) trajectories drawn from `generator` (or `seed`), once per level in
    level order. resample=True draws afresh on every `level()` call, as the official code does.
    """

    def __init__(self, coords: torch.Tensor, valid: torch.Tensor | None, frame_size: tuple[int, int],
                 latent_size: tuple[int, int], *, levels: int = 4, ratio: float = 2.0,
                 generator: torch.Generator | None = None, seed: int | None = None, resample: bool = False):
        coords, valid = trajectories_from_tracks(coords, valid)
        frame_size = _int_pair("frame_size", frame_size, "(H0, W0)")
        latent_size = _int_pair("latent_size", latent_size, "(h, w)")
        levels = _integer("levels", levels)
        if levels <= 0:
            raise ValueError(f"levels must be a positive number of UNet levels, got {levels}")
        if not ratio > 0:
            raise ValueError(f"ratio must be positive, got {ratio}")
        self.coords, self.valid = coords, valid
        self.frames = coords.shape[0]
        self.frame_size = frame_size
        self.ratio = float(ratio)
        self.resample = bool(resample)
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        self.generator = generator
        self.sizes = level_sizes(latent_size, levels)
        self._levels = {self._key(size): self._build(size) for size in self.sizes}
        self._on_device: dict = {}

    @staticmethod
    def _key(size) -> int:
        return size[0] * size[1]

    def _build(self, size) -> TrajectoryLevel:
        n = self.coords.shape[1]
        selection = subsample(n, num_samples(n, size, self.ratio), self.generator)
        idx, ok, rowptr, col = _level_tables(self.coords, self.valid, selection, self.frame_size, size)
        return TrajectoryLevel(size, selection, TrajectoryIndex(idx, ok, size[0] * size[1], rowptr, col))

    def size_for(self, n_pix: int) -> tuple[int, int]:
        level = self._levels.get(int(n_pix))
        if level is None:
            raise ValueError(f"no trajectory level has {n_pix} latent pixels; levels: "
                             f"{[f'{h}x{w}' for h, w in self.sizes]}")
        return level.size

    def prepare(self, device: torch.device | str) -> None:
        """Copy every level's tables to `device` now (cached), so later `level()` calls only look them up."""
        if not self.resample:
            for size in self.sizes:
                self.level(size[0] * size[1], device)

    def level(self, n_pix: int, device: torch.device | str | None = None) -> TrajectoryLevel:
        """The tables of the level with n_pix = h·w latent pixels, on `device` (cached per device)."""
        size = self.size_for(n_pix)
        if self.resample:
            built = self._build(size)
            return built if device is None else built.to(device)
        if device is None or torch.device(device) == self._levels[int(n_pix)].index.device:
            return self._levels[int(n_pix)]
        key = (int(n_pix), str(torch.device(device)))
        if key not in self._on_device:
            self._on_device[key] = self._levels[int(n_pix)].to(device)
        return self._on_device[key]
