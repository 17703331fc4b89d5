"""Writes the sample pose files next to this script (run it to regenerate them; they are small and
synthetic). A camera orbits the origin at radius 2, looking at it, turning 3° per frame about the
vertical (OpenCV axes: y down), 16 frames.

- orbit_gt.txt              ground truth, RealEstate10K text format (URL line, then one camera a line)
- orbit_gt.pt               the same c2w poses as a torch tensor [16, 4, 4]
- orbit_gen_drift2deg.txt   same camera centres, the view turning 2° per frame further than the
                            ground truth's (known answers: RPE rotation 2°, RotErr Σ_f 2°·f)
- orbit_gen_scale2x.npy     c2w [16, 4, 4], the same path at twice the size: no error under the
                            relative protocol, an error under the absolute one
"""
import math
from pathlib import Path

import numpy as np
import torch

from lightmotion_fast.camera.pose_io import save_realestate10k

FRAMES, RADIUS, STEP_DEG, DRIFT_DEG = 16, 2.0, 3.0, 2.0


def yaw(angle):
    """Rotation about the vertical y axis (OpenCV: y down)."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]], dtype=torch.float64)


def orbit(drift_deg=0.0, scale=1.0):
    poses = torch.eye(4, dtype=torch.float64).repeat(FRAMES, 1, 1)
    for f in range(FRAMES):
        phi = math.radians(STEP_DEG * f)
        poses[f, :3, 3] = scale * torch.tensor([RADIUS * math.sin(phi), 0.0, -RADIUS * math.cos(phi)])
        poses[f, :3, :3] = yaw(phi + math.radians(drift_deg * f))  # columns: x right, y down, z to the origin
    return poses


def main():
    here = Path(__file__).parent
    gt = orbit()
    intrinsics = torch.tensor([0.55, 0.98, 0.5, 0.5], dtype=torch.float64)
    save_realestate10k(here / "orbit_gt.txt", gt, intrinsics)
    text = (here / "orbit_gt.txt").read_text()
    (here / "orbit_gt.txt").write_text("https://www.youtube.com/watch?v=synthetic-orbit\n" + text)
    torch.save(gt.clone(), here / "orbit_gt.pt")
    save_realestate10k(here / "orbit_gen_drift2deg.txt", orbit(drift_deg=DRIFT_DEG), intrinsics)
    np.save(here / "orbit_gen_scale2x.npy", orbit(scale=2.0).numpy())


if __name__ == "__main__":
    main()
