"""Camera motion achieved by a video: per-frame similarity transforms estimated from its pixels,
and their error against the requested `CameraMotion`.

The estimate of frame f is the similarity A_f (scale, rotation, translation about the frame centre)
with frame_f(A_f p) ≈ frame_0(p) for the pixels p of frame 0 — the same forward transform that
`CameraMotion.affines` defines, so it reads back in CameraMotion's units: pan as fractions of the
width and height (x > 0: content moved left), zoom as s − 1 (s > 1: content magnified), rotate in
degrees (> 0: content turned clockwise on screen, a counter-clockwise camera roll).

Method, and why. Two stages, because neither alone is both robust and precise:

1. Global capture (Fourier–Mellin phase correlation). The magnitude spectrum of a frame is
   unchanged by translation, and in log-polar coordinates a rotation or scale of the image is a
   shift of that spectrum; a phase correlation of the two log-polar spectra gives rotation and
   scale, a second one of the de-rotated, de-scaled frame gives translation. Phase correlation
   finds the dominant motion anywhere in the frame (one sharp peak; a small independently moving
   object makes a second, weaker peak), so it needs no initial guess. Frames are Hann-windowed so
   the frame edges and the zero-filled exposed borders do not dominate the spectrum, and peaks are
   refined to sub-pixel by a parabola. On small frames its precision is limited by the log-polar
   grid (about a degree, a percent of scale), so it only initialises the second stage.
2. Sub-pixel fit (robust Gauss–Newton, Lucas–Kanade). The four parameters (s·cos θ, s·sin θ, t)
   are refined by iteratively reweighted least squares on the bilinear-interpolated intensity
   residuals of every pixel, coarse to fine over an image pyramid, together with a gain and an
   offset per channel (generated videos flicker; unmodelled, a 1.6x gain change cost 0.16 px).
   Pixels whose warped position leaves frame f (exposed borders) are masked out, and Huber then
   Tukey weights give a pixel of an independently moving object no say in the fit. It uses every
   pixel of the overlap, which is what makes it sub-pixel (≤ 0.03 px of endpoint error on smooth
   synthetic warps, see tests/test_motion_estimate.py), but it only converges from a start within a
   few pixels and degrees (a 60° roll from the identity ends 30 px off), hence stage 1. It works on
   frames blurred by a 1 px Gaussian, so that hard edges (graphics, nearest-neighbour resampling)
   obey the linearisation it relies on.

Every frame is fitted against frame 0 directly (no drift accumulates), starting from the best of:
the previous frame's estimate, its constant-velocity extrapolation, that estimate composed with the
frame-to-frame Fourier–Mellin step, the direct Fourier–Mellin estimate against frame 0, and the
same two with a translation-only phase correlation (best = lowest robust residual after a few
iterations at the coarsest level). So smooth and abrupt motions both start inside the fit's
convergence basin, and a failed spectral estimate (exposed borders filled with unrelated texture,
or their straight edges dominating a small frame's log-polar spectrum) costs nothing.

It is pure PyTorch (torch.fft, grid_sample) in float64 on the video's device; it is a metric, not a
hot path. It assumes the frames share content (overlap), |rotation| < 90° and a textured scene;
`inlier_fraction` reports how much of frame 0 the fit could use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lightmotion_fast.camera.motion import CameraMotion

COMPONENTS = ("pan_x", "pan_y", "zoom", "rotate")
_MIN_SIZE = 8          # smaller frames carry too little texture to register
_PYRAMID_MIN = 24      # coarsest pyramid level keeps at least this many pixels per side
_SELECT_ITERATIONS = 6  # Gauss–Newton iterations spent on each starting point before choosing one
# The fit sees frames blurred by this Gaussian (px): hard edges and nearest-neighbour steps are not
# band-limited, so their interpolated gradients mispredict the residual and Gauss–Newton creeps
# (0.01 px per iteration for 30+ iterations on a graphics card); a 1 px blur restores the linear model.
_BLUR_SIGMA = 1.0


# --------------------------------------------------------------------------------------------- input
def _check_video(video) -> torch.Tensor:
    """video [f c h w] or [f h w] -> float64 [f c h w], each channel normalised by frame 0's statistics."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor [F, C, H, W] or [F, H, W], got {type(video).__name__}")
    if video.ndim not in (3, 4):
        raise ValueError(f"video must have shape [F, C, H, W] or [F, H, W], got {tuple(video.shape)}")
    if not (video.is_floating_point() or video.dtype == torch.uint8):
        raise TypeError(f"video must be a floating-point (or uint8) tensor, got {video.dtype}")
    x = video.detach().to(torch.float64)
    if x.ndim == 3:
        x = x[:, None]
    frames, channels, height, width = x.shape
    if frames < 1 or channels < 1:
        raise ValueError(f"video needs at least one frame and one channel, got shape {tuple(video.shape)}")
    if height < _MIN_SIZE or width < _MIN_SIZE:
        raise ValueError(f"video frames must be at least {_MIN_SIZE}x{_MIN_SIZE} pixels, got {height}x{width}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("video contains NaN or inf")
    mean = x[0].mean(dim=(1, 2), keepdim=True)
    std = x[0].std(dim=(1, 2), keepdim=True)
    textured = std > 1e-8 * (x[0].abs().amax() + 1e-30)
    if not bool(textured.any()):
        raise ValueError("video frame 0 is constant: there is no texture to estimate camera motion from")
    # Constant channels carry no information; zero them rather than divide by zero.
    x = torch.where(textured, (x - mean) / torch.where(textured, std, torch.ones_like(std)), torch.zeros_like(x))
    return x


def _blur(x: torch.Tensor, sigma: float = _BLUR_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of [f c h w] (replicated borders)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    frames, channels, height, width = x.shape
    y = F.pad(x.reshape(frames * channels, 1, height, width), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return y.reshape(frames, channels, height, width)


# ----------------------------------------------------------------------------------- similarity maths
def _centre(height: int, width: int) -> tuple[float, float]:
    return (width - 1) / 2.0, (height - 1) / 2.0


def params_to_matrix(q: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """q = (a, b, tx, ty) with A p = c + [[a, -b], [b, a]] (p - c) + t  ->  [3, 3] forward matrix."""
    cx, cy = _centre(height, width)
    a, b, tx, ty = q.unbind()
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([
        torch.stack([a, -b, cx - a * cx + b * cy + tx]),
        torch.stack([b, a, cy - b * cx - a * cy + ty]),
        torch.stack([zero, zero, one]),
    ])


def matrix_to_params(m: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, 3] forward matrix (a similarity) -> q = (a, b, tx, ty) about the frame centre."""
    cx, cy = _centre(height, width)
    a = 0.5 * (m[0, 0] + m[1, 1])
    b = 0.5 * (m[1, 0] - m[0, 1])
    tx = m[0, 2] - (cx - a * cx + b * cy)
    ty = m[1, 2] - (cy - b * cx - a * cy)
    return torch.stack([a, b, tx, ty])


def _warp(image: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample image [c h w] at m·p for every pixel p (bilinear): returns (sampled [c h w], inside [h w]).

    inside marks positions at least one pixel from the border, so bilinear weights never reach the
    zero padding (or the first/last row, whose central-difference gradients are one-sided)."""
    _, height, width = image.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=m.dtype, device=m.device),
                            torch.arange(width, dtype=m.dtype, device=m.device), indexing="ij")
    wx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    wy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    inside = (wx >= 1) & (wx <= width - 2) & (wy >= 1) & (wy <= height - 2)
    grid = torch.stack([2 * wx / (width - 1) - 1, 2 * wy / (height - 1) - 1], dim=-1)
    out = F.grid_sample(image[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0], inside


# --------------------------------------------------------------------------- stage 1: Fourier–Mellin
def _hann(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    wy = torch.hann_window(height, periodic=False, dtype=like.dtype, device=like.device)
    wx = torch.hann_window(width, periodic=False, dtype=like.dtype, device=like.device)
    return wy[:, None] * wx[None, :]


def _parabolic(left: torch.Tensor, mid: torch.Tensor, right: torch.Tensor) -> float:
    denom = float(left - 2 * mid + right)
    return 0.0 if abs(denom) < 1e-30 else max(-0.5, min(0.5, 0.5 * float(left - right) / denom))


def phase_correlation(ref: torch.Tensor, mov: torch.Tensor, window: bool = True) -> tuple[float, float]:
    """(dx, dy) such that mov(p + d) ≈ ref(p); ref, mov [c h w]. Sub-pixel by a parabola per axis.

    The cross-power spectrum is whitened (phase only) and then weighted by a Gaussian, which turns
    the ideal delta into a smooth peak whose parabola vertex is a good sub-pixel estimate."""
    _, height, width = ref.shape
    if window:
        w = _hann(height, width, ref)
        ref, mov = (ref - ref.mean(dim=(1, 2), keepdim=True)) * w, (mov - mov.mean(dim=(1, 2), keepdim=True)) * w
    cross = (torch.fft.fft2(mov) * torch.fft.fft2(ref).conj()).sum(dim=0)
    cross = cross / (cross.abs() + 1e-12 * cross.abs().max() + 1e-300)
    fy = torch.fft.fftfreq(height, dtype=ref.dtype, device=ref.device)
    fx = torch.fft.fftfreq(width, dtype=ref.dtype, device=ref.device)
    sigma = 0.25  # cycles/pixel: peak width ~0.6 px, wide enough for a 3-point fit, narrow enough to stay sharp
    cross = cross * torch.exp(-(fy[:, None] ** 2 + fx[None, :] ** 2) / (2 * sigma ** 2))
    corr = torch.fft.ifft2(cross).real
    iy, ix = divmod(int(torch.argmax(corr)), width)
    dy = iy + _parabolic(corr[(iy - 1) % height, ix], corr[iy, ix], corr[(iy + 1) % height, ix])
    dx = ix + _parabolic(corr[iy, (ix - 1) % width], corr[iy, ix], corr[iy, (ix + 1) % width])
    # Shifts wrap around: the peak at index n means -(size - n).
    dy = dy - height if dy > height / 2 else dy
    dx = dx - width if dx > width / 2 else dx
    return dx, dy


def _log_polar_spectrum(image: torch.Tensor, n_radius: int, n_angle: int, rho_min: float) -> torch.Tensor:
    """[c h w] -> [1 n_radius n_angle]: high-passed log magnitude spectrum on a log-polar grid.

    Radii run geometrically from rho_min to 0.5 cycles/pixel and angles over [0, π) (the magnitude
    of a real image's spectrum is point-symmetric). Frequencies are in cycles/pixel on each axis, so
    a rotation of a non-square frame is still a pure angular shift."""
    _, height, width = image.shape
    windowed = (image - image.mean(dim=(1, 2), keepdim=True)) * _hann(height, width, image)
    mag = torch.fft.fftshift(torch.fft.fft2(windowed).abs().sum(dim=0))
    fy = torch.fft.fftshift(torch.fft.fftfreq(height, dtype=image.dtype, device=image.device))
    fx = torch.fft.fftshift(torch.fft.fftfreq(width, dtype=image.dtype, device=image.device))
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    # Smooth textures put nearly all energy at the lowest frequencies; the ramp evens out the bands
    # so the correlation sees structure, not the DC neighbourhood.
    spec = torch.log1p(mag) * radius
    rho = rho_min * (0.5 / rho_min) ** (torch.arange(n_radius, dtype=image.dtype, device=image.device) / n_radius)
    phi = math.pi * torch.arange(n_angle, dtype=image.dtype, device=image.device) / n_angle
    sx = rho[:, None] * torch.cos(phi)[None, :]
    sy = rho[:, None] * torch.sin(phi)[None, :]
    # fftshifted index of frequency f is f*size + size//2; grid_sample wants [-1, 1] (align_corners).
    gx = (sx * width + width // 2) / (width - 1) * 2 - 1
    gy = (sy * height + height // 2) / (height - 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)[None]
    return F.grid_sample(spec[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def fourier_mellin(ref: torch.Tensor, mov: torch.Tensor) -> torch.Tensor:
    """Coarse similarity [3, 3] with mov(A p) ≈ ref(p); ref, mov [c h w] float64."""
    _, height, width = ref.shape
    n_radius, n_angle = max(height, width), 2 * max(height, width)
    rho_min = 2.0 / min(height, width)
    lp_ref = _log_polar_spectrum(ref, n_radius, n_angle, rho_min)
    lp_mov = _log_polar_spectrum(mov, n_radius, n_angle, rho_min)
    # The log-polar image is periodic in angle only; window the radius axis alone.
    wr = torch.hann_window(n_radius, periodic=False, dtype=ref.dtype, device=ref.device)[None, :, None]
    d_angle, d_radius = phase_correlation(lp_ref * wr, lp_mov * wr, window=False)
    # Content magnified by s shrinks its spectrum by 1/s: a shift of -log(s) along log-radius;
    # content turned by θ turns its spectrum by θ.
    log_step = math.log(0.5 / rho_min) / n_radius
    scale = math.exp(-d_radius * log_step)
    theta = d_angle * math.pi / n_angle
    theta = (theta + math.pi / 2) % math.pi - math.pi / 2  # spectra cannot tell θ from θ + π
    q = torch.tensor([scale * math.cos(theta), scale * math.sin(theta), 0.0, 0.0], dtype=ref.dtype, device=ref.device)
    rot_scale = params_to_matrix(q, height, width)
    derotated, _ = _warp(mov, rot_scale)           # derotated(p) = mov(c + sR(p - c))
    dx, dy = phase_correlation(ref, derotated)
    # derotated(p + d) ≈ ref(p)  =>  A p = c + sR(p - c) + sR d.
    t = rot_scale[:2, :2] @ torch.tensor([dx, dy], dtype=ref.dtype, device=ref.device)
    return params_to_matrix(torch.stack([q[0], q[1], t[0], t[1]]), height, width)


# ------------------------------------------------------------------- stage 2: robust Gauss–Newton fit
def _pyramid(video: torch.Tensor) -> list[torch.Tensor]:
    """[f c h w] -> levels, finest first; each level halves the size (area average)."""
    levels = [video]
    while min(levels[-1].shape[-2:]) >= 2 * _PYRAMID_MIN:
        h, w = levels[-1].shape[-2:]
        levels.append(F.interpolate(levels[-1], size=(h // 2, w // 2), mode="area"))
    return levels


def _rescale_params(q: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Move (a, b, tx, ty) between pyramid levels: about the centre only the translation scales."""
    fx, fy = dst_hw[1] / src_hw[1], dst_hw[0] / src_hw[0]
    return torch.stack([q[0], q[1], q[2] * fx, q[3] * fy])


def _residuals(ref, mov, grad, q):
    """Residual r [c n], Jacobian J [c n 4] and valid mask [n] of mov(A_q p) - ref(p) over frame 0's pixels."""
    _, height, width = ref.shape
    m = params_to_matrix(q, height, width)
    both, inside = _warp(torch.cat([mov, grad]), m)
    channels = ref.shape[0]
    warped, gx, gy = both[:channels], both[channels:2 * channels], both[2 * channels:]
    cx, cy = _centre(height, width)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=q.dtype, device=q.device),
                            torch.arange(width, dtype=q.dtype, device=q.device), indexing="ij")
    dx, dy = xs - cx, ys - cy
    jac = torch.stack([gx * dx + gy * dy, gy * dx - gx * dy, gx, gy], dim=-1)
    return (warped - ref).flatten(1), jac.flatten(1, 2), inside.flatten()


def _robust_weights(r: torch.Tensor, jac: torch.Tensor, valid: torch.Tensor, tukey: bool) -> torch.Tensor:
    """Per-pixel IRLS weights [n] from the residual norm over channels (r [c n], jac [c n 4]).

    The residual scale is the MAD over the valid pixels that carry motion information (squared
    image gradient at least a quarter of its 90th percentile): on piecewise-flat content
    (graphics, sky, gentle ramps) most residuals are near zero whatever the motion, and a MAD over
    all pixels would collapse and reject every edge pixel, i.e. all the evidence."""
    norm = r.pow(2).mean(dim=0).sqrt()
    count = int(valid.sum())
    if count == 0:
        return torch.zeros_like(norm)
    energy = jac[..., 2:].pow(2).sum(dim=(0, 2))                          # [n] |∇|² over channels
    high = energy[valid].kthvalue(max(1, math.ceil(0.9 * count))).values
    informative = valid & (energy >= 0.25 * high) & (energy > 0)
    sigma = 1.4826 * norm[informative if bool(informative.any()) else valid].median().clamp_min(1e-6)
    u = norm / sigma
    if tukey:
        w = (1 - (u / 4.685) ** 2).clamp_min(0) ** 2
    else:
        w = torch.where(u <= 1.345, torch.ones_like(u), 1.345 / u.clamp_min(1e-12))
    return w * valid


class _Fit(NamedTuple):
    q: torch.Tensor            # [4] (a, b, tx, ty)
    weights: torch.Tensor      # [n] final IRLS weights
    residual: torch.Tensor     # [c n] at q, after the fitted gain and offset
    valid: torch.Tensor        # [n] frame-0 pixels whose warped position stays inside frame f
    contrast: torch.Tensor     # [c 1] fitted 1 + gain

    def cost(self) -> float:
        """Comparable fit quality for different starting points: truncated mean squared residual in
        units of frame 0's std, with pixels that leave frame f counted at the truncation (so a fit
        cannot win by sliding off the frame). Dividing by the fitted contrast stops a misaligned
        start from looking good by fading the reference out (contrast → 0 leaves only frame f's own
        variance as residual)."""
        contrast = self.contrast.clamp_min(1e-3)
        per_pixel = (self.residual / contrast).pow(2).mean(dim=0).clamp_max(1.0)
        return float(torch.where(self.valid, per_pixel, torch.ones_like(per_pixel)).mean())

    def inliers(self) -> tuple[float, float]:
        """(share of pixels with weight > 0.5, rms residual over them; NaN if none)."""
        used = self.weights > 0.5
        if not bool(used.any()):
            return float(used.double().mean()), math.nan
        return float(used.double().mean()), float(self.residual.pow(2).mean(dim=0)[used].mean().sqrt())


def _normal_equations(jac, ref, r, weights):
    """Weighted normal equations of the motion (4) and a gain and offset per channel (2c).

    The model is mov(A p) ≈ (1 + g_c)·ref_c(p) + o_c, so the photometric Jacobian of channel c is
    (−ref_c, −1) on that channel only; the system is assembled block by block rather than from a
    [c n 4+2c] Jacobian, which would be mostly zeros. Returns (H [k k], rhs [k]) with k = 4 + 2c."""
    channels = ref.shape[0]
    wjac = jac * weights[None, :, None]                                  # [c n 4]
    photo = torch.stack([-ref, -torch.ones_like(ref)], dim=-1)           # [c n 2]
    wphoto = photo * weights[None, :, None]
    k = 4 + 2 * channels
    hess = r.new_zeros(k, k)
    rhs = r.new_zeros(k)
    hess[:4, :4] = wjac.reshape(-1, 4).T @ jac.reshape(-1, 4)
    rhs[:4] = -(wjac.reshape(-1, 4).T @ r.reshape(-1))
    cross = wjac.transpose(1, 2) @ photo                                 # [c 4 2]
    hess[:4, 4:] = cross.permute(1, 0, 2).reshape(4, 2 * channels)
    hess[4:, :4] = hess[:4, 4:].T
    hess[4:, 4:] = torch.block_diag(*(wphoto.transpose(1, 2) @ photo).unbind())
    rhs[4:] = -(wphoto.transpose(1, 2) @ r[..., None]).reshape(-1)
    return hess, rhs


def _gauss_newton(ref, mov, q, iterations: int, tol_px: float = 1e-3) -> _Fit:
    """Refine q for mov(A_q p) ≈ (1 + g)·ref(p) + o (gain g and offset o per channel, fitted too:
    generated videos flicker); ref, mov [c h w]."""
    grad = _gradients(mov)
    channels, height, width = ref.shape
    half = max(height, width) / 2.0
    gain = ref.new_zeros(channels, 1)
    offset = ref.new_zeros(channels, 1)
    weights = torch.zeros(height * width, dtype=q.dtype, device=q.device)
    for it in range(iterations):
        r, jac, valid = _residuals(ref, mov, grad, q)
        if int(valid.sum()) < 16:
            break
        r = r - gain * ref.flatten(1) - offset
        weights = _robust_weights(r, jac, valid, tukey=it >= min(3, iterations // 2))
        hess, rhs = _normal_equations(jac, ref.flatten(1), r, weights)
        scale = float(torch.diagonal(hess)[:4].mean())
        if not scale > 0:  # no weighted pixel has any gradient: nothing to fit
            break
        # Tiny Levenberg damping keeps a nearly textureless frame (or a blank channel) from
        # producing a wild step.
        diag = torch.diagonal(hess).clamp_min(0)
        hess = hess + 1e-9 * torch.diag(diag + diag.mean())
        step = torch.linalg.solve(hess, rhs)
        q = q + step[:4]
        gain = gain + step[4::2, None]
        offset = offset + step[5::2, None]
        # Largest displacement the step causes inside the frame, in pixels.
        if float(step[:2].abs().sum() * half + step[2:4].abs().max()) < tol_px:
            break
    r, _, valid = _residuals(ref, mov, grad, q)
    return _Fit(q, weights, r - gain * ref.flatten(1) - offset, valid, 1 + gain)


def _gradients(image: torch.Tensor) -> torch.Tensor:
    """[c h w] -> [2c h w]: x gradients of every channel, then y gradients (central differences)."""
    gy, gx = torch.gradient(image, dim=(1, 2))
    return torch.cat([gx, gy])


# ------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class EstimatedMotion:
    """Per-frame camera motion achieved by a video, relative to frame 0, in CameraMotion's units.

    pan [F, 2]: (x, y) as fractions of width and height (x > 0: content moved left, as CameraMotion).
    zoom [F]: scale − 1 (> 0: content magnified). rotate [F]: degrees (> 0: content turned clockwise).
    All tensors are float64 on the CPU. affines [F, 2, 3]: forward transforms in pixels (frame-0
    position -> frame-f position), as CameraMotion.affines. inlier_fraction [F]: share of frame 0's
    pixels that the fit used (weight > 0.5). residual [F]: rms intensity residual of those pixels,
    in units of frame 0's std per channel (a low inlier share or a high residual flags a frame whose
    estimate should not be trusted: little overlap, a scene change, no texture).
    """
    pan: torch.Tensor
    zoom: torch.Tensor
    rotate: torch.Tensor
    affines: torch.Tensor
    inlier_fraction: torch.Tensor
    residual: torch.Tensor
    height: int
    width: int

    def as_tensor(self) -> torch.Tensor:
        """[F, 4] float64 columns (pan_x, pan_y, zoom, rotate)."""
        return torch.cat([self.pan, self.zoom[:, None], self.rotate[:, None]], dim=1)


def estimate_camera_motion(video: torch.Tensor, iterations: int = 30) -> EstimatedMotion:
    """Estimate each frame's similarity transform relative to frame 0.

    video: [F, C, H, W] or [F, H, W] float (or uint8), CPU or CUDA; channels are used jointly.
    iterations: Gauss–Newton iterations per pyramid level (stops earlier once converged).

    Example (the demo's "requested vs achieved"; `video` [F, 3, H, W] decoded frames):

        errors = camera_motion_errors(video, camera)      # estimates, then compares
        print(errors.table())                             # per-frame table + mean/max errors, EPE
        errors.estimate.pan, errors.estimate.zoom, errors.estimate.rotate   # [F, 2], [F], [F]
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    x = _check_video(video)
    frames, _, height, width = x.shape
    levels = _pyramid(_blur(x))
    coarse = levels[-1]
    ch, cw = coarse.shape[-2:]
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    # Fourier–Mellin only initialises the fit: run it on the smallest level that still has 64 pixels
    # a side (its log-polar grid needs them), which bounds its cost on large decoded frames.
    spectral_level = next((lv for lv in reversed(levels) if min(lv.shape[-2:]) >= 64), levels[0])

    def spectral(i: int, j: int) -> torch.Tensor:
        sh, sw = spectral_level.shape[-2:]
        q = matrix_to_params(fourier_mellin(spectral_level[i], spectral_level[j]), sh, sw)
        return params_to_matrix(_rescale_params(q, (sh, sw), (height, width)), height, width)

    def shift(i: int, j: int) -> torch.Tensor:
        # Translation alone: when exposed borders put straight edges into one spectrum only, the
        # log-polar step can lock onto them, while a plain phase correlation still finds the shift.
        sh, sw = spectral_level.shape[-2:]
        dx, dy = phase_correlation(spectral_level[i], spectral_level[j])
        q = torch.tensor([1.0, 0.0, dx * width / sw, dy * height / sh], dtype=x.dtype, device=x.device)
        return params_to_matrix(q, height, width)

    mats = [eye]
    inliers = [1.0]
    residuals = [0.0]
    for f in range(1, frames):
        prev = mats[-1]
        # Constant velocity: the last frame-to-frame step repeated (exact for CameraMotion's linear schedule).
        velocity = prev @ torch.linalg.inv(mats[-2]) @ prev if f >= 2 else prev
        candidates = [prev, velocity, spectral(f - 1, f) @ prev, spectral(0, f),
                      shift(f - 1, f) @ prev, shift(0, f)]
        # A few iterations suffice to tell a start inside the convergence basin from one outside.
        starts = [_rescale_params(matrix_to_params(m, height, width), (height, width), (ch, cw)) for m in candidates]
        trials = [_gauss_newton(coarse[0], coarse[f], q, min(iterations, _SELECT_ITERATIONS)) for q in starts]
        fit = _gauss_newton(coarse[0], coarse[f], min(trials, key=_Fit.cost).q, iterations)
        size = (ch, cw)
        for level in reversed(levels[:-1]):
            lh, lw = level.shape[-2:]
            fit = _gauss_newton(level[0], level[f], _rescale_params(fit.q, size, (lh, lw)), iterations)
            size = (lh, lw)
        share, rms = fit.inliers()
        inliers.append(share)
        residuals.append(rms)
        mats.append(params_to_matrix(fit.q, height, width))
    affines = torch.stack(mats)[:, :2, :]
    q_all = torch.stack([matrix_to_params(m, height, width) for m in mats])
    scale = torch.sqrt(q_all[:, 0] ** 2 + q_all[:, 1] ** 2)
    rotate = torch.rad2deg(torch.atan2(q_all[:, 1], q_all[:, 0]))
    # CameraMotion: target = c + sR(src - c) - pan, so the fitted translation is minus the pan.
    pan = torch.stack([-q_all[:, 2] / width, -q_all[:, 3] / height], dim=1)
    # A metric's few numbers: hand them back on the CPU whatever device the video was on.
    pan, scale, rotate, affines = pan.cpu(), scale.cpu(), rotate.cpu(), affines.cpu()
    return EstimatedMotion(pan=pan, zoom=scale - 1, rotate=rotate, affines=affines,
                           inlier_fraction=torch.tensor(inliers, dtype=torch.float64),
                           residual=torch.tensor(residuals, dtype=torch.float64), height=height, width=width)


def requested_camera_motion(camera: CameraMotion, frames: int) -> torch.Tensor:
    """[F, 4] float64 per-frame (pan_x, pan_y, zoom, rotate) that `camera` asks for, in the units of
    `EstimatedMotion` (pan as fractions, zoom as s − 1, rotate in degrees)."""
    if not isinstance(camera, CameraMotion):
        raise TypeError(f"camera must be a lightmotion_fast.CameraMotion, got {type(camera).__name__}")
    frac = camera.fractions(frames)
    totals = torch.tensor([camera.pan[0], camera.pan[1], camera.zoom, camera.rotate], dtype=torch.float64)
    return frac * totals


@dataclass(frozen=True)
class CameraMotionErrors:
    """Requested vs achieved camera motion of one video.

    estimated, requested [F, 4]: columns (pan_x, pan_y, zoom, rotate), CameraMotion's units.
    mean_abs, max_abs [4]: mean / max over frames of |estimated − requested| per column.
    endpoint_px [F]: per frame, the mean over all pixels of the distance between where the estimated
    and the requested transforms send each frame-0 pixel, in pixels of the video.
    epe_mean, epe_max: mean / max of endpoint_px over frames. estimate: the full `EstimatedMotion`.
    """
    estimated: torch.Tensor
    requested: torch.Tensor
    mean_abs: torch.Tensor
    max_abs: torch.Tensor
    endpoint_px: torch.Tensor
    epe_mean: float
    epe_max: float
    estimate: EstimatedMotion

    def table(self) -> str:
        """Printable 'requested vs achieved' table, one row per frame plus the summary."""
        return motion_report(self)


def _endpoint_errors(est: torch.Tensor, req: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, 2, 3] x2 -> [F] mean over the pixel grid of |est·p − req·p|."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    p = torch.stack([xs.flatten(), ys.flatten(), torch.ones(height * width, dtype=torch.float64)])
    diff = (est.cpu() - req.cpu()) @ p                      # [F, 2, n]
    return diff.norm(dim=1).mean(dim=1)


def camera_motion_errors(video, camera: CameraMotion, iterations: int = 30) -> CameraMotionErrors:
    """Estimate the motion of `video` (or take an `EstimatedMotion`) and compare it with `camera`.

    video: [F, C, H, W] / [F, H, W] tensor, or the `EstimatedMotion` of one. The requested transforms
    are `camera`'s at the video's own resolution (its units are fractions, so a decoded RGB video is
    compared as well as its latent).
    """
    if not isinstance(camera, CameraMotion):
        raise TypeError(f"camera must be a lightmotion_fast.CameraMotion, got {type(camera).__name__}")
    est = video if isinstance(video, EstimatedMotion) else estimate_camera_motion(video, iterations=iterations)
    frames = est.pan.shape[0]
    requested = requested_camera_motion(camera, frames)
    estimated = est.as_tensor().cpu()
    err = (estimated - requested).abs()
    epe = _endpoint_errors(est.affines, camera.affines(frames, est.height, est.width)[:, :2], est.height, est.width)
    return CameraMotionErrors(estimated=estimated, requested=requested, mean_abs=err.mean(dim=0),
                              max_abs=err.amax(dim=0), endpoint_px=epe, epe_mean=float(epe.mean()),
                              epe_max=float(epe.amax()), estimate=est)


def motion_report(errors: CameraMotionErrors) -> str:
    """A fixed-width table of requested vs achieved pan (% of width/height), zoom (%), rotate (°)."""
    if not isinstance(errors, CameraMotionErrors):
        raise TypeError(f"errors must be a CameraMotionErrors, got {type(errors).__name__}")
    units = torch.tensor([100.0, 100.0, 100.0, 1.0], dtype=torch.float64)
    head = (f"{'frame':>5} | {'pan x %':>15} | {'pan y %':>15} | {'zoom %':>15} | {'rotate deg':>15} | "
            f"{'EPE px':>6} | {'inliers':>7}")
    sub = f"{'':>5} | " + " | ".join(f"{'req':>7} {'got':>7}" for _ in COMPONENTS) + f" | {'':>6} | {'':>7}"
    lines = [head, sub, "-" * len(head)]
    req, got = errors.requested * units, errors.estimated * units

    def cell(value) -> str:
        return f"{round(float(value), 2) + 0.0:7.2f}"   # + 0.0: no "-0.00" for values that round to zero

    for f in range(req.shape[0]):
        cells = " | ".join(f"{cell(req[f, k])} {cell(got[f, k])}" for k in range(4))
        lines.append(f"{f:>5} | {cells} | {float(errors.endpoint_px[f]):6.2f} | "
                     f"{float(errors.estimate.inlier_fraction[f]):7.2f}")
    lines.append("-" * len(head))
    mean, mx = errors.mean_abs * units, errors.max_abs * units
    lines.append(f"{'|err|':>5} | " + " | ".join(f"{float(mean[k]):7.2f} {float(mx[k]):7.2f}" for k in range(4))
                 + f" | {errors.epe_mean:6.2f} | (mean, max)")
    lines.append(f"EPE: mean {errors.epe_mean:.3f} px, max {errors.epe_max:.3f} px over frames "
                 f"({errors.estimate.width}x{errors.estimate.height} video)")
    return "\n".join(lines)
