"""Camera-trajectory metrics for generated videos (specs/motionflow.md, "Camera-trajectory metrics").

Poses are camera-to-world matrices, [f 4 4] for one video or [n f 4 4] for a batch, estimated from
the generated video (e.g. by COLMAP/GLOMAP) and given as ground truth. Following the CamI2V
evaluation (Zheng et al., "CamI2V: Camera-Controlled Image-to-Video Diffusion Model", arXiv
2410.15957, camera-controllability metrics RotErr, TransErr, CamMC). The paper's text is not in
this project's papers folder, so the definitions below are taken from CamI2V's public evaluation
code (github.com/ZGCTroy/CamI2V, `evaluation/glomap_evaluation.py: metric`, `evaluation/utils/
common.py: normalize_t`); its absolute protocol arrived there with the same group's RealCam-I2V
(Li et al., arXiv 2502.10059), which makes both SfM trajectories metric with a monocular
metric-depth scale. Both trajectories are first made relative to their frame 0
(c2w_0⁻¹ · c2w_f), then their translations are scaled by one of the two protocols (`normalize=`):

- "relative" (or True, the default): each trajectory divided by its own extent, the distance of
  its camera farthest from frame 0. The scale of the generated camera path does not count (SfM
  poses are up to scale); CamI2V's TransErr_rel / CamMC_rel.
- "absolute": both divided by the ground truth's extent, so a generated path twice as long as the
  ground truth's is an error. Meaningful only when both trajectories share a metric scale (CamI2V
  makes the GLOMAP poses of both videos metric with a monocular metric-depth scale before this
  step); CamI2V's TransErr_abs / CamMC_abs.
- False: translations as given.

A trajectory that never moves is left unscaled. On those poses:

    RotErr   = Σ_f arccos(clamp((tr(R_genᵀ R_gt) − 1) / 2, −1, 1))          radians (CamI2V, and
               MotionFlow Appendix A, eq. 5); scale-free, so equal under both protocols
    TransErr = Σ_f ‖t_gen − t_gt‖₂                                          (MotionFlow eq. 6)
    CamMC    = Σ_f ‖[R|t]_gen − [R|t]_gt‖_F
    ATE      = RMSE_f ‖s·R·c_gen + t − c_gt‖ after Umeyama Sim(3) alignment of the camera centres
    RPE      = between consecutive frames, E = Δ_gt⁻¹ Δ_gen with Δ = P_f⁻¹ P_{f+1}:
               RPE-trans = RMSE ‖t_E‖, RPE-rot = mean angle(R_E) in degrees (Trajectory Attention,
               Table 1: "ATE (m), RPE trans (m), RPE Rot (deg)")

`degrees=` switches any angle metric's unit. Everything is computed in float64 (arccos near 1
needs it) and returned as float64 tensors with the batch shape ([] for one video, [n] for a batch).
`plot_trajectories` draws both trajectories from above and from the side as a PNG.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class TrajectoryErrors:
    """All metrics of `trajectory_errors`, each with the batch shape."""
    rot_err: torch.Tensor
    trans_err: torch.Tensor
    cam_mc: torch.Tensor
    ate: torch.Tensor
    rpe_trans: torch.Tensor
    rpe_rot: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"RotErr": self.rot_err, "TransErr": self.trans_err, "CamMC": self.cam_mc,
                "ATE": self.ate, "RPE_trans": self.rpe_trans, "RPE_rot": self.rpe_rot}


# Units of `TrajectoryErrors.as_dict()` with trajectory_errors' defaults (translations in units of
# the normalising extent, or as given with normalize=False).
UNITS = {"RotErr": "rad", "TransErr": "", "CamMC": "", "ATE": "", "RPE_trans": "", "RPE_rot": "deg"}
NORMALIZE_CHOICES = (True, False, "relative", "absolute")


def _check_poses(name: str, poses) -> torch.Tensor:
    if not isinstance(poses, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of c2w poses, got {type(poses).__name__}")
    if poses.ndim not in (3, 4) or tuple(poses.shape[-2:]) != (4, 4) or poses.shape[-3] == 0:
        raise ValueError(f"{name} must have shape [f, 4, 4] or [n, f, 4, 4] with f >= 1, got {tuple(poses.shape)}")
    if poses.is_complex() or not (poses.is_floating_point() or poses.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {poses.dtype}")
    poses = poses.detach().to(torch.float64)
    if not bool(torch.isfinite(poses).all()):
        raise ValueError(f"{name} contains NaN or inf")
    _check_invertible(name, poses)
    return poses


def _check_invertible(name: str, poses: torch.Tensor) -> None:
    """Every pose is inverted (relative to frame 0, RPE's steps): a singular one is a ValueError naming
    the pose, not a linear-algebra error from deep inside a metric. Singular means |det| tiny next to
    the size of the rotation-scale block, so a scaled (similarity) pose still counts as invertible."""
    size = poses[..., :3, :3].abs().amax(dim=(-2, -1))
    singular = torch.linalg.det(poses).abs() <= 1e-12 * size.pow(3).clamp_min(torch.finfo(poses.dtype).tiny)
    if bool(singular.any()):
        where = torch.nonzero(singular)[0].tolist()
        label = f"frame {where[-1]}" + (f" of video {where[0]}" if poses.ndim == 4 else "")
        raise ValueError(f"{name} has a singular pose at {label} (a c2w matrix must be invertible): "
                         f"{poses[tuple(where)].tolist()}")


def _pair(generated, ground_truth) -> tuple[torch.Tensor, torch.Tensor]:
    gen = _check_poses("generated", generated)
    gt = _check_poses("ground_truth", ground_truth)
    if gen.shape != gt.shape:
        raise ValueError(f"generated and ground_truth must have the same shape, got {tuple(gen.shape)} "
                         f"and {tuple(gt.shape)}")
    return gen, gt.to(gen.device)


def relative_to_first(c2w: torch.Tensor) -> torch.Tensor:
    """[... f 4 4] -> the same poses expressed in frame 0's camera: c2w_0⁻¹ · c2w_f."""
    return torch.linalg.inv(c2w[..., :1, :, :]) @ c2w


def _check_normalize(normalize) -> str | None:
    """normalize= as one of "relative", "absolute" or None (no scaling)."""
    if isinstance(normalize, bool):
        return "relative" if normalize else None
    if normalize in ("relative", "absolute"):
        return normalize
    raise ValueError(f"normalize must be True/\"relative\", \"absolute\" or False, got {normalize!r}")


def _extent(c2w: torch.Tensor) -> torch.Tensor:
    """Distance of the camera farthest from frame 0's camera, [...]; 1 for a camera that never moves."""
    t = c2w[..., :3, 3]
    extent = (t - t[..., :1, :]).norm(dim=-1).amax(dim=-1)
    return torch.where(extent > 0, extent, torch.ones_like(extent))


def _scale_translation(c2w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = c2w.clone()
    out[..., :3, 3] = c2w[..., :3, 3] / scale[..., None, None]
    return out


def normalize_translation(c2w: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Divide translations by the extent (distance of the camera farthest from frame 0's camera) of
    `reference`, by default of `c2w` itself (CamI2V's `normalize_t(rt, ref)`; a reference that
    never moves leaves the poses as they are)."""
    return _scale_translation(c2w, _extent(c2w if reference is None else reference))


def prepare(c2w: torch.Tensor, relative: bool = True, normalize: bool | str = True) -> torch.Tensor:
    """One trajectory as the relative protocol compares it: relative to frame 0 and divided by its
    own extent (both on by default). normalize="absolute" needs the ground truth: see
    `prepare_pair`."""
    mode = _check_normalize(normalize)
    if mode == "absolute":
        raise ValueError('normalize="absolute" scales by the ground truth: use prepare_pair(generated, ground_truth)')
    poses = _check_poses("c2w", c2w)
    if relative:
        poses = relative_to_first(poses)
    return normalize_translation(poses) if mode == "relative" else poses


def prepare_pair(generated, ground_truth, relative: bool = True,
                 normalize: bool | str = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Both trajectories as the metrics compare them (float64, checked): relative to their frame 0,
    then scaled by CamI2V's relative protocol (each by its own extent), its absolute protocol
    (both by the ground truth's extent) or not at all (see the module docstring)."""
    mode = _check_normalize(normalize)
    gen, gt = _pair(generated, ground_truth)
    if relative:
        gen, gt = relative_to_first(gen), relative_to_first(gt)
    if mode == "relative":
        gen, gt = normalize_translation(gen), normalize_translation(gt)
    elif mode == "absolute":
        scale = _extent(gt)
        gen, gt = _scale_translation(gen, scale), _scale_translation(gt, scale)
    return gen, gt


def rotation_angle(r_a: torch.Tensor, r_b: torch.Tensor, degrees: bool = False) -> torch.Tensor:
    """Geodesic angle between rotations [..., 3, 3]: arccos((tr(R_aᵀ R_b) − 1) / 2), in radians
    (degrees with degrees=True)."""
    trace = (r_a.transpose(-1, -2) @ r_b).diagonal(dim1=-2, dim2=-1).sum(-1)
    angle = torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0))
    return torch.rad2deg(angle) if degrees else angle


def rot_err(generated, ground_truth, *, relative: bool = True, normalize: bool | str = True,
            degrees: bool = False) -> torch.Tensor:
    """RotErr: per-frame rotation angle between generated and ground truth, summed over frames;
    radians as CamI2V and MotionFlow (Appendix A) report it, degrees with degrees=True."""
    gen, gt = prepare_pair(generated, ground_truth, relative, normalize)
    return rotation_angle(gen[..., :3, :3], gt[..., :3, :3], degrees).sum(-1)


def trans_err(generated, ground_truth, *, relative: bool = True, normalize: bool | str = True) -> torch.Tensor:
    """TransErr: per-frame distance of the camera translations, summed over frames."""
    gen, gt = prepare_pair(generated, ground_truth, relative, normalize)
    return (gen[..., :3, 3] - gt[..., :3, 3]).norm(dim=-1).sum(-1)


def cam_mc(generated, ground_truth, *, relative: bool = True, normalize: bool | str = True) -> torch.Tensor:
    """CamMC: per-frame Frobenius norm of the difference of the [R|t] matrices, summed over frames."""
    gen, gt = prepare_pair(generated, ground_truth, relative, normalize)
    return torch.linalg.matrix_norm(gen[..., :3, :] - gt[..., :3, :]).sum(-1)


def umeyama(source: torch.Tensor, target: torch.Tensor, with_scale: bool = True):
    """Least-squares similarity (Umeyama 1991) taking points source [..., n, 3] onto target:
    target ≈ s · R · source + t. Returns s [...], R [..., 3, 3], t [..., 3]."""
    mu_s, mu_t = source.mean(-2, keepdim=True), target.mean(-2, keepdim=True)
    xs, xt = source - mu_s, target - mu_t
    cov = xt.transpose(-1, -2) @ xs / source.shape[-2]
    u, sigma, vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    d = torch.ones_like(sigma)
    d[..., 2] = sign
    rot = u @ torch.diag_embed(d) @ vh
    if with_scale:
        var_s = xs.pow(2).sum(-1).mean(-1)
        scale = (sigma * d).sum(-1) / var_s.clamp_min(torch.finfo(var_s.dtype).tiny)
        scale = torch.where(var_s > 0, scale, torch.ones_like(scale))
    else:
        scale = torch.ones(sigma.shape[:-1], dtype=sigma.dtype, device=sigma.device)
    trans = mu_t.squeeze(-2) - scale[..., None] * (rot @ mu_s.squeeze(-2)[..., None]).squeeze(-1)
    return scale, rot, trans


def ate(generated, ground_truth, *, relative: bool = True, normalize: bool | str = True) -> torch.Tensor:
    """Absolute trajectory error: RMSE of camera centres after Umeyama Sim(3) alignment of the
    generated centres onto the ground truth (so any similarity transform of `generated` leaves it
    unchanged, and both protocols give the same value). In units of the (normalised) ground truth:
    metres for metric poses with normalize=False, as Trajectory Attention reports it."""
    gen, gt = prepare_pair(generated, ground_truth, relative, normalize)
    src, dst = gen[..., :3, 3], gt[..., :3, 3]
    scale, rot, trans = umeyama(src, dst)
    aligned = scale[..., None, None] * (src @ rot.transpose(-1, -2)) + trans[..., None, :]
    return (aligned - dst).pow(2).sum(-1).mean(-1).sqrt()


def _steps(poses: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(poses[..., :-1, :, :]) @ poses[..., 1:, :, :]


def rpe(generated, ground_truth, *, relative: bool = True, normalize: bool | str = True, degrees: bool = True):
    """Relative pose error between consecutive frames: (RMSE of the translation error, mean rotation
    error), the rotation in degrees as Trajectory Attention reports it (Table 1, "RPE Rot (deg)";
    radians with degrees=False). Both 0 for a single frame."""
    gen, gt = prepare_pair(generated, ground_truth, relative, normalize)
    if gen.shape[-3] < 2:
        zero = gen.new_zeros(gen.shape[:-3])
        return zero, zero.clone()
    err = torch.linalg.inv(_steps(gt)) @ _steps(gen)
    rpe_t = err[..., :3, 3].pow(2).sum(-1).mean(-1).sqrt()
    rpe_r = rotation_angle(err[..., :3, :3], torch.eye(3, dtype=err.dtype, device=err.device), degrees).mean(-1)
    return rpe_t, rpe_r


def trajectory_errors(generated, ground_truth, *, relative: bool = True,
                      normalize: bool | str = True) -> TrajectoryErrors:
    """Every metric at once for c2w poses [f 4 4] or [n f 4 4], in the papers' units (`UNITS`:
    RotErr in radians, RPE rotation in degrees). normalize: "relative"/True (CamI2V's relative
    protocol), "absolute" (CamI2V's absolute protocol: scaled by the ground truth's extent), False.

    >>> errs = trajectory_errors(estimated_c2w, ground_truth_c2w)
    >>> errs.rot_err, errs.trans_err, errs.cam_mc, errs.ate
    >>> absolute = trajectory_errors(metric_estimate, metric_ground_truth, normalize="absolute")
    """
    kw = {"relative": relative, "normalize": normalize}
    rpe_t, rpe_r = rpe(generated, ground_truth, **kw)
    return TrajectoryErrors(rot_err=rot_err(generated, ground_truth, **kw),
                            trans_err=trans_err(generated, ground_truth, **kw),
                            cam_mc=cam_mc(generated, ground_truth, **kw),
                            ate=ate(generated, ground_truth, **kw), rpe_trans=rpe_t, rpe_rot=rpe_r)


def plot_trajectories(generated, ground_truth, path: str | os.PathLike, *, relative: bool = True,
                      normalize: bool | str = True, title: str | None = None, align: bool = False) -> str:
    """Draw the camera centres of both trajectories from above (x–z) and from the side (z–y, y down as
    in OpenCV) into a PNG at `path`. For a batch, the first video is drawn. align=True first maps the
    generated centres onto the ground truth with the Umeyama Sim(3) used by ATE. Returns the path."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    gen, gt = prepare_pair(generated, ground_truth, relative, normalize)
    if gen.ndim == 4:
        gen, gt = gen[0], gt[0]
    c_gen, c_gt = gen[:, :3, 3], gt[:, :3, 3]
    if align:
        scale, rot, trans = umeyama(c_gen, c_gt)
        c_gen = scale * (c_gen @ rot.T) + trans
    c_gen, c_gt = c_gen.cpu().numpy(), c_gt.cpu().numpy()
    # Viewing direction (camera z axis) of every camera, drawn short.
    z_gen, z_gt = gen[:, :3, 2].cpu().numpy(), gt[:, :3, 2].cpu().numpy()
    extent = max(float(abs(c_gt).max()), float(abs(c_gen).max()), 1e-6)

    fig = Figure(figsize=(10, 4.6))
    axes = fig.subplots(1, 2)
    views = [("top view", 0, 2, "x", "z (forward)", False), ("side view", 2, 1, "z (forward)", "y (down)", True)]
    for ax, (name, i, j, xlabel, ylabel, flip) in zip(axes, views):
        for c, z, color, label, width in ((c_gt, z_gt, "tab:green", "ground truth", 4.0),
                                          (c_gen, z_gen, "tab:red", "generated", 1.5)):
            ax.plot(c[:, i], c[:, j], "-o", color=color, markersize=3, linewidth=width, alpha=0.8, label=label)
            ax.quiver(c[:, i], c[:, j], z[:, i], z[:, j], color=color, alpha=0.4, angles="xy",
                      scale_units="xy", scale=8.0 / extent, width=0.004)
            ax.plot(c[0, i], c[0, j], "s", color=color, markersize=7)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
        if flip:
            ax.invert_yaxis()
    axes[0].legend(loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=100)
    return path


__all__ = ["UNITS", "TrajectoryErrors", "ate", "cam_mc", "normalize_translation", "plot_trajectories", "prepare",
           "prepare_pair", "relative_to_first", "rot_err", "rotation_angle", "rpe", "trajectory_errors", "trans_err",
           "umeyama"]
