"""`demo --trajectory` (issue 12): depth + camera preset -> trajectories -> branch training -> patched SVD
frames, on a small random SVD pipeline through the fused op (the Triton interpreter on a CPU)."""
import pytest
import torch

from lightmotion_fast import cli
from lightmotion_fast.demo_trajectory import run_trajectory_demo, warp_along_trajectories


def test_trajectory_demo_runs_end_to_end(tmp_path, capsys):
    result = run_trajectory_demo(tmp_path, frames=3, size=32, train_steps=2, steps=1, degrees_per_frame=6.0)
    assert result["ok"], capsys.readouterr().out
    losses = result["losses"]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert result["video"].shape == (3, 3, 32, 32) and torch.isfinite(result["video"]).all()
    assert result["max_abs_diff_reference"] < 1e-3 and result["max_abs_diff_plain"] > 0
    for path in result["paths"].values():
        assert path.is_file() and path.stat().st_size > 0
    out = capsys.readouterr().out
    assert "orbit_horizontal" in out and "loss" in out


def test_warp_follows_the_trajectories():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    n = 12
    xy = torch.stack([torch.arange(n) % 4, torch.arange(n) // 4], -1).float()
    coords = torch.stack([xy, xy + torch.tensor([1.0, 0.0])])        # frame 1: everything one pixel right
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 0] = False                                               # pixel (0, 0) hidden at frame 1
    frames = warp_along_trajectories(image, coords, valid)
    assert torch.equal(frames[0], image)
    assert torch.equal(frames[1][:, :, 1:], image[:, :, :3].masked_fill(torch.tensor([[True, False, False]] + [[False] * 3] * 2), 0))
    assert (frames[1][:, :, 0] == 0).all()                            # nothing lands on the first column


def test_trajectory_flag_rejects_model(tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--trajectory", "--model", str(tmp_path), "--out", str(tmp_path)])
    assert exc.value.code == 2
