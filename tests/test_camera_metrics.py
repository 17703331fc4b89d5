"""Camera-trajectory metrics: known answers (specs/motionflow.md, CamI2V convention)."""
import math

import pytest
import torch

from lightmotion_fast.camera import metrics


def rotation(axis, angle):
    axis = torch.as_tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def random_trajectory(frames, batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (frames,) if batch is None else (batch, frames)
    poses = torch.eye(4, dtype=torch.float64).repeat(*shape, 1, 1)
    flat = poses.reshape(-1, 4, 4)
    for i in range(flat.shape[0]):
        axis = torch.randn(3, generator=g, dtype=torch.float64)
        flat[i, :3, :3] = rotation(axis, float(torch.rand(1, generator=g)) * 1.5)
    poses[..., :3, 3] = torch.randn(*shape, 3, generator=g, dtype=torch.float64).cumsum(-2)
    return poses


def similarity(scale, rot, trans):
    s = torch.eye(4, dtype=torch.float64)
    s[:3, :3] = scale * rot
    s[:3, 3] = torch.as_tensor(trans, dtype=torch.float64)
    return s


def apply_similarity(sim, c2w):
    """World change by a similarity: centres map through sim, orientations rotate with it."""
    scale = torch.linalg.det(sim[:3, :3]) ** (1 / 3)
    out = c2w.clone()
    out[..., :3, :3] = (sim[:3, :3] / scale) @ c2w[..., :3, :3]
    out[..., :3, 3] = c2w[..., :3, 3] @ sim[:3, :3].T + sim[:3, 3]
    return out


@pytest.mark.parametrize("batch", [None, 3])
def test_identical_trajectories_give_zero(batch):
    gt = random_trajectory(7, batch)
    errs = metrics.trajectory_errors(gt.float(), gt)
    for name, value in errs.as_dict().items():
        assert value.shape == (() if batch is None else (batch,)), name
        # float32 input rounding only: 2e-3 rad (or its equivalent for an angle in degrees)
        assert value.abs().max() < 2e-3 * (180 / math.pi if metrics.UNITS[name] == "deg" else 1), (name, value)
    exact = metrics.trajectory_errors(gt, gt.clone())
    for name, value in exact.as_dict().items():
        assert value.abs().max() < 1e-6, (name, value)


def test_constant_rotation_offset_gives_its_angle_per_frame():
    frames, angle = 6, 0.3
    gt = random_trajectory(frames)
    offset = torch.eye(4, dtype=torch.float64)
    offset[:3, :3] = rotation([0.2, 1.0, -0.4], angle)
    gen = gt @ offset  # every camera turned by `angle` about an axis of its own frame; centres unchanged
    absolute = metrics.rot_err(gen, gt, relative=False)
    assert absolute.item() == pytest.approx(frames * angle, abs=1e-9)
    # Relative to frame 0 the first frame carries no error, every later frame the whole angle.
    gen_later = gt.clone()
    gen_later[1:] = gt[1:] @ offset
    relative = metrics.rot_err(gen_later, gt)
    assert relative.item() == pytest.approx((frames - 1) * angle, abs=1e-9)
    assert metrics.trans_err(gen, gt, relative=False).item() == pytest.approx(0, abs=1e-9)
    # CamMC of a pure rotation offset: ‖R − R·Q‖_F = ‖I − Q‖_F = 2·sqrt(2)·sin(θ/2) per frame.
    want = frames * 2 * math.sqrt(2) * math.sin(angle / 2)
    assert metrics.cam_mc(gen, gt, relative=False).item() == pytest.approx(want, abs=1e-9)


def test_rpe_known_answers():
    frames = 5
    gt = random_trajectory(frames)
    assert metrics.rpe(gt, gt)[0].item() == pytest.approx(0, abs=1e-9)
    step = torch.eye(4, dtype=torch.float64)
    step[:3, :3] = rotation([0, 0, 1], 0.1)
    step[:3, 3] = torch.tensor([0.0, 0.0, 1.0])
    traj = torch.stack([torch.linalg.matrix_power(step, f) for f in range(frames)])
    still = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
    rpe_t, rpe_r = metrics.rpe(traj, still, normalize=False)
    assert rpe_t.item() == pytest.approx(1.0, abs=1e-9)
    assert rpe_r.item() == pytest.approx(math.degrees(0.1), abs=1e-9)  # degrees, as Trajectory Attention reports it
    assert metrics.rpe(traj, still, normalize=False, degrees=False)[1].item() == pytest.approx(0.1, abs=1e-9)


def test_translation_normalised_by_farthest_camera():
    gt = random_trajectory(6)
    prepared = metrics.prepare(gt)
    distances = prepared[:, :3, 3].norm(dim=-1)
    assert distances.max().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(prepared[0], torch.eye(4, dtype=torch.float64), atol=1e-12)
    # A generated video whose camera moved the same path at 3x the scale (SfM scale is arbitrary):
    # no error after normalisation, a large one without it.
    gen = gt.clone()
    gen[:, :3, 3] = gt[:, :3, 3] * 3.0 + torch.tensor([5.0, -1.0, 2.0], dtype=torch.float64)
    assert metrics.trans_err(gen, gt).item() == pytest.approx(0, abs=1e-9)
    assert metrics.cam_mc(gen, gt).item() == pytest.approx(0, abs=1e-9)
    assert metrics.trans_err(gen, gt, normalize=False).item() > 1.0
    # A camera that never moves is left unscaled rather than divided by zero.
    still = torch.eye(4, dtype=torch.float64).repeat(4, 1, 1)
    assert torch.isfinite(metrics.prepare(still)).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_ate_invariant_to_similarity_of_estimate(normalize):
    gt = random_trajectory(8)
    noisy = gt.clone()
    noisy[:, :3, 3] += 0.2 * torch.randn(8, 3, dtype=torch.float64)
    sim = similarity(2.5, rotation([1.0, -2.0, 0.5], 0.8), [3.0, -4.0, 1.0])
    base = metrics.ate(noisy, gt, relative=False, normalize=normalize)
    moved = metrics.ate(apply_similarity(sim, noisy), gt, relative=False, normalize=normalize)
    assert base.item() > 1e-3
    assert moved.item() == pytest.approx(base.item(), rel=1e-9, abs=1e-12)
    # An exact similarity copy of the ground truth has no error at all.
    assert metrics.ate(apply_similarity(sim, gt), gt, relative=False).item() == pytest.approx(0, abs=1e-9)
    assert metrics.ate(apply_similarity(sim, gt), gt).item() == pytest.approx(0, abs=1e-9)


def test_umeyama_recovers_similarity():
    src = torch.randn(10, 3, dtype=torch.float64)
    rot = rotation([0.3, 0.1, 1.0], 1.1)
    dst = 1.7 * src @ rot.T + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    scale, r, t = metrics.umeyama(src, dst)
    assert scale.item() == pytest.approx(1.7, abs=1e-10)
    assert torch.allclose(r, rot, atol=1e-10) and torch.allclose(t, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_batched_equals_per_video():
    gt = random_trajectory(5, batch=3, seed=1)
    gen = random_trajectory(5, batch=3, seed=2)
    batched = metrics.trajectory_errors(gen, gt).as_dict()
    for i in range(3):
        single = metrics.trajectory_errors(gen[i], gt[i]).as_dict()
        for name in batched:
            assert batched[name][i].item() == pytest.approx(single[name].item(), rel=1e-9, abs=1e-12), name


def test_bad_inputs():
    gt = random_trajectory(4)
    with pytest.raises(ValueError, match="same shape"):
        metrics.rot_err(gt[:3], gt)
    with pytest.raises(ValueError, match="generated"):
        metrics.trans_err(gt[:, :3], gt[:, :3])
    with pytest.raises(TypeError, match="generated"):
        metrics.ate(gt.tolist(), gt)
    bad = gt.clone()
    bad[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        metrics.cam_mc(gt, bad)


def test_plot_writes_png(tmp_path):
    gt = random_trajectory(8)
    gen = gt.clone()
    gen[:, :3, 3] += 0.1
    path = metrics.plot_trajectories(gen, gt, tmp_path / "traj.png", title="test")
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "traj.png").stat().st_size > 5000
    metrics.plot_trajectories(gen[None].repeat(2, 1, 1, 1), gt[None].repeat(2, 1, 1, 1), tmp_path / "b.png", align=True)
    assert (tmp_path / "b.png").exists()


@pytest.mark.parametrize("frame", [0, 2])
def test_singular_pose_is_a_value_error_naming_the_argument(frame):
    gt = random_trajectory(4)
    gen = gt.clone()
    gen[frame, :3, :3] = 0  # a camera without orientation: c2w not invertible
    for fn in (metrics.trajectory_errors, metrics.rpe, metrics.rot_err):
        with pytest.raises(ValueError, match=f"generated has a singular pose at frame {frame}"):
            fn(gen, gt)
    with pytest.raises(ValueError, match=f"ground_truth has a singular pose at frame {frame} of video 1"):
        metrics.trajectory_errors(torch.stack([gt, gt]), torch.stack([gt, gen]))
    with pytest.raises(ValueError, match="c2w has a singular pose"):
        metrics.prepare(gen)


def test_scaled_poses_still_count_as_invertible_and_bad_inputs_are_named():
    gt = random_trajectory(3)
    scaled = gt.clone()
    scaled[:, :3, :3] *= 1e-3  # a similarity, not a singular pose
    assert torch.isfinite(metrics.trajectory_errors(scaled, gt).rot_err)
    with pytest.raises(ValueError, match="generated must have shape"):
        metrics.trajectory_errors(gt[:0], gt[:0])
    with pytest.raises(TypeError, match="generated must hold real numbers"):
        metrics.trajectory_errors(gt.to(torch.complex128), gt)


# --- CamI2V's two protocols, degrees, pose files (issue 15 item 9) ---------------------------------------

def cami2v_metric(c2w_gt, c2w_gen):
    """CamI2V's evaluation (its public `glomap_evaluation.py: metric`), written out independently:
    relative poses, RotErr, then TransErr/CamMC with each path scaled by its own largest translation
    (relative) and with both scaled by the ground truth's (absolute)."""
    rel = lambda p: torch.linalg.inv(p[:1]) @ p  # noqa: E731
    gt, gen = rel(c2w_gt), rel(c2w_gen)
    trace = (gt[:, :3, :3].transpose(-1, -2) @ gen[:, :3, :3]).diagonal(dim1=-1, dim2=-2).sum(-1)
    rot = ((trace - 1) / 2).clamp(-1, 1).acos().sum()

    def scaled(p, ref):
        out = p.clone()
        out[:, :3, 3] = p[:, :3, 3] / ref[:, :3, 3].norm(dim=-1).amax()
        return out

    def trans_cammc(a, b):
        trans = (a[:, :3, 3] - b[:, :3, 3]).norm(dim=-1).sum()
        return trans, (a[:, :3, :4] - b[:, :3, :4]).reshape(-1, 12).norm(dim=-1).sum()

    t_rel, mc_rel = trans_cammc(scaled(gt, gt), scaled(gen, gen))
    t_abs, mc_abs = trans_cammc(scaled(gt, gt), scaled(gen, gt))
    return rot, t_rel, mc_rel, t_abs, mc_abs


@pytest.mark.parametrize("seed", [0, 1])
def test_both_protocols_equal_cami2v_definitions(seed):
    gt = random_trajectory(9, seed=seed)
    gen = random_trajectory(9, seed=seed + 10)
    rot, t_rel, mc_rel, t_abs, mc_abs = cami2v_metric(gt, gen)
    rel = metrics.trajectory_errors(gen, gt)
    ab = metrics.trajectory_errors(gen, gt, normalize="absolute")
    for got, want in ((rel.rot_err, rot), (ab.rot_err, rot), (rel.trans_err, t_rel), (rel.cam_mc, mc_rel),
                      (ab.trans_err, t_abs), (ab.cam_mc, mc_abs)):
        assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    assert abs(t_abs - t_rel) > 1e-3  # the two protocols do differ on these paths


def test_absolute_protocol_counts_a_wrong_path_length():
    gt = random_trajectory(7)
    rel_t = metrics.relative_to_first(gt)[:, :3, 3]
    gen = gt.clone()
    gen[:, :3, 3] = gt[:1, :3, 3] + 3.0 * (gt[:, :3, 3] - gt[:1, :3, 3])  # the same path, 3x as long
    assert metrics.trans_err(gen, gt).item() == pytest.approx(0, abs=1e-9)
    want = (2.0 * rel_t.norm(dim=-1)).sum() / rel_t.norm(dim=-1).max()
    assert metrics.trans_err(gen, gt, normalize="absolute").item() == pytest.approx(want.item(), rel=1e-12)
    # ATE aligns by a similarity: the protocol does not change it.
    assert metrics.ate(gen, gt, normalize="absolute").item() == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="normalize must be"):
        metrics.trans_err(gen, gt, normalize="metric")
    with pytest.raises(ValueError, match="prepare_pair"):
        metrics.prepare(gt, normalize="absolute")


def test_angles_in_degrees_on_request_and_by_default_for_rpe():
    frames, step = 6, math.radians(2.5)
    gt = random_trajectory(frames)
    gen = gt.clone()
    for f in range(frames):  # each camera turned f·step about its own z axis: steps differ by `step`
        gen[f, :3, :3] = gt[f, :3, :3] @ rotation([0, 0, 1], f * step)
    # Consecutive steps: Δ_gen = Q_fᵀ Δ_gt Q_{f+1}; E's rotation angle is not simply `step` for a
    # general Δ, so compare the two units against each other and RotErr against its closed form.
    assert metrics.rot_err(gen, gt).item() == pytest.approx(step * sum(range(frames)), abs=1e-9)
    assert metrics.rot_err(gen, gt, degrees=True).item() == pytest.approx(2.5 * sum(range(frames)), abs=1e-7)
    rad = metrics.rpe(gen, gt, degrees=False)[1].item()
    assert metrics.rpe(gen, gt)[1].item() == pytest.approx(math.degrees(rad), rel=1e-12)
    assert metrics.trajectory_errors(gen, gt).rpe_rot.item() == pytest.approx(math.degrees(rad), rel=1e-12)
    assert metrics.UNITS["RotErr"] == "rad" and metrics.UNITS["RPE_rot"] == "deg"


def test_pose_files_round_trip(tmp_path):
    import numpy as np

    from lightmotion_fast.camera import pose_io

    gt = random_trajectory(5)
    k = torch.tensor([0.6, 0.9, 0.5, 0.45], dtype=torch.float64)
    pose_io.save_realestate10k(tmp_path / "a.txt", gt, k)
    text = (tmp_path / "a.txt").read_text().splitlines()
    assert len(text) == 5 and all(len(line.split()) == 19 for line in text)
    # The dataset's URL line, comments and blank lines are skipped.
    (tmp_path / "b.txt").write_text("https://www.youtube.com/watch?v=x\n# comment\n\n" + "\n".join(text) + "\n")
    for name in ("a.txt", "b.txt"):
        poses = pose_io.load_poses(tmp_path / name)
        torch.testing.assert_close(poses.c2w, gt, rtol=0, atol=1e-12)
        torch.testing.assert_close(poses.intrinsics, k.expand(5, 4))
        assert poses.timestamps.tolist() == [0, 33333, 66666, 99999, 133332]
    # Row 1 of the text holds the w2c matrix, the inverse of the c2w pose.
    w2c = torch.tensor([float(x) for x in text[1].split()[7:]], dtype=torch.float64).reshape(3, 4)
    torch.testing.assert_close(w2c, torch.linalg.inv(gt[1])[:3], rtol=0, atol=1e-12)
    np.save(tmp_path / "c.npy", gt[:, :3, :].numpy())  # [f, 3, 4]: bottom row implied
    torch.save(gt.float(), tmp_path / "d.pt")
    torch.testing.assert_close(pose_io.load_poses(tmp_path / "c.npy").c2w, gt, rtol=0, atol=0)
    assert pose_io.load_poses(tmp_path / "d.pt").c2w.dtype == torch.float64
    torch.save({"c2w": gt}, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="one tensor"):
        pose_io.load_poses(tmp_path / "e.pt")
    singular = text[2].split()
    singular[7:] = ["0"] * 12
    (tmp_path / "f.txt").write_text(" ".join(singular) + "\n")
    with pytest.raises(ValueError, match="frame 0 is singular"):
        pose_io.load_poses(tmp_path / "f.txt")
    (tmp_path / "g.txt").write_text(text[0] + "\n" + "not numbers here\n")
    with pytest.raises(ValueError, match="line 2: expected 19 numbers"):
        pose_io.load_poses(tmp_path / "g.txt")
    with pytest.raises(ValueError, match="unknown pose file type"):
        pose_io.load_poses(tmp_path / "h.json")
