"""Camera pose files: RealEstate10K's text format and c2w arrays (.npy / .pt).

RealEstate10K (Zhou et al. 2018) stores one camera per line,

    timestamp fx fy cx cy 0 0 r11 r12 r13 t1 r21 r22 r23 t2 r31 r32 r33 t3

with the intrinsics as fractions of the image width/height and the 3×4 world-to-camera matrix
row-major (OpenCV axes). The dataset's files start with the video's URL on a line of its own; that
line, blank lines and `#` comments are skipped. `.npy` / `.pt` files hold camera-to-world
matrices [f, 4, 4] (or [f, 3, 4], the bottom row implied).

>>> poses = load_poses("gt.txt")          # Poses(c2w [f 4 4] float64, intrinsics [f 4] or None, ...)
>>> save_realestate10k("out.txt", poses.c2w, poses.intrinsics)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RE10K_COLUMNS = 19  # timestamp, fx fy cx cy, two zeros, 12 numbers of the 3×4 w2c matrix


@dataclass
class Poses:
    """c2w [f 4 4] float64; intrinsics [f 4] (fx fy cx cy as stored) and timestamps [f] from a
    RealEstate10K file, None for a c2w array."""
    c2w: torch.Tensor
    intrinsics: torch.Tensor | None = None
    timestamps: torch.Tensor | None = None


def _rows_to_44(rows: torch.Tensor) -> torch.Tensor:
    """[f 3 4] -> [f 4 4] with the bottom row 0 0 0 1."""
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=rows.dtype).expand(rows.shape[0], 1, 4)
    return torch.cat([rows, bottom], dim=1)


def _invert(w2c: torch.Tensor, path) -> torch.Tensor:
    det = torch.linalg.det(w2c[:, :3, :3])
    bad = torch.nonzero(det.abs() < 1e-12).flatten().tolist()
    if bad:
        raise ValueError(f"{path}: the world-to-camera matrix of frame {bad[0]} is singular")
    return torch.linalg.inv(w2c)


def read_realestate10k(path: str | os.PathLike) -> Poses:
    """Read a RealEstate10K camera file (see the module docstring) into c2w poses."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            fields = text.split()
            try:
                values = [float(f) for f in fields]
            except ValueError:
                if not rows and len(fields) == 1:  # the dataset's first line: the video URL
                    continue
                raise ValueError(f"{path}, line {number}: expected {RE10K_COLUMNS} numbers "
                                 f"(timestamp fx fy cx cy 0 0 and a 3x4 w2c matrix), got {text[:60]!r}") from None
            if len(values) != RE10K_COLUMNS:
                raise ValueError(f"{path}, line {number}: expected {RE10K_COLUMNS} numbers (timestamp fx fy cx cy "
                                 f"0 0 and a 3x4 w2c matrix), got {len(values)}")
            rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no camera lines (RealEstate10K format: one line per frame)")
    table = torch.tensor(rows, dtype=torch.float64)
    if not bool(torch.isfinite(table).all()):
        raise ValueError(f"{path}: contains NaN or inf")
    w2c = _rows_to_44(table[:, 7:].reshape(-1, 3, 4))
    return Poses(c2w=_invert(w2c, path), intrinsics=table[:, 1:5], timestamps=table[:, 0])


def _c2w_array(array, path) -> torch.Tensor:
    c2w = torch.as_tensor(array)
    if c2w.is_complex() or not (c2w.is_floating_point() or c2w.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{path}: expected real c2w matrices, got dtype {c2w.dtype}")
    c2w = c2w.to(torch.float64)
    if c2w.ndim != 3 or tuple(c2w.shape[1:]) not in ((4, 4), (3, 4)) or c2w.shape[0] == 0:
        raise ValueError(f"{path}: expected c2w matrices [f, 4, 4] (or [f, 3, 4]) with f >= 1, "
                         f"got shape {tuple(c2w.shape)}")
    return _rows_to_44(c2w) if c2w.shape[1] == 3 else c2w


def load_poses(path: str | os.PathLike) -> Poses:
    """Poses from `.txt` (RealEstate10K), `.npy` or `.pt`/`.pth` (c2w [f, 4, 4] or [f, 3, 4])."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_realestate10k(path)
    if suffix == ".npy":
        return Poses(c2w=_c2w_array(np.load(path, allow_pickle=False), path))
    if suffix in (".pt", ".pth"):
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{path}: expected one tensor of c2w matrices, got {type(data).__name__}")
        return Poses(c2w=_c2w_array(data, path))
    raise ValueError(f"{path}: unknown pose file type {suffix or '(none)'!r}: expected .txt (RealEstate10K), "
                     ".npy or .pt (c2w [f, 4, 4])")


def save_realestate10k(path: str | os.PathLike, c2w: torch.Tensor, intrinsics: torch.Tensor | None = None,
                       timestamps=None) -> None:
    """Write c2w poses [f 4 4] as a RealEstate10K camera file (no URL line). intrinsics [f 4] or [4]
    (fx fy cx cy as fractions of the image size; default 0.5 0.5 0.5 0.5); timestamps default to
    the frame index × 33333 µs (30 fps)."""
    c2w = _c2w_array(c2w, "c2w")
    frames = c2w.shape[0]
    k = torch.full((4,), 0.5) if intrinsics is None else torch.as_tensor(intrinsics)
    k = k.to(torch.float64).expand(frames, 4)
    stamps = torch.arange(frames, dtype=torch.float64) * 33333 if timestamps is None else \
        torch.as_tensor(timestamps, dtype=torch.float64)
    w2c = torch.linalg.inv(c2w)[:, :3, :].reshape(frames, 12)
    with open(path, "w", encoding="utf-8") as fh:
        for f in range(frames):
            numbers = [f"{int(stamps[f])}", *(f"{float(x):.9g}" for x in k[f]), "0", "0",
                       *(f"{float(x):.17g}" for x in w2c[f])]
            fh.write(" ".join(numbers) + "\n")


__all__ = ["Poses", "load_poses", "read_realestate10k", "save_realestate10k"]
