"""Camera-motion metric: known answers on synthetic warps (issue 13 item 6).

Videos are a smooth random texture (low-pass filtered noise, correlation length ≈ 2.7 px) warped by
a CameraMotion's exact inverse transforms with bilinear sampling (zeros where the source leaves the
frame), so every frame's true similarity is known.

Tolerances. A similarity fitted to ~4000 pixels of a smooth texture is limited by interpolation
error, not by pixel noise; measured errors on these videos are ≤ 0.03 px of endpoint error, ≤ 0.1 %
zoom and ≤ 0.03° rotation. The clean-warp tests allow 0.05 px of pan, 0.25 % of zoom, 0.1° of
rotation and 0.05 px endpoint error (sub-pixel with a 2.5-5x margin); the harder cases (outlier
fills of the exposed borders, an independently moving object) allow 0.1 px, 0.5 %, 0.2° (a zoom or
rotation error of that size moves a pixel at the frame edge by ≈ 0.16 / 0.11 px on 64x64 frames);
nearest-neighbour `latent_permute` videos are looser still (see that test).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import lightmotion_fast as lm
from lightmotion_fast.camera import (CameraMotionErrors, EstimatedMotion, camera_motion_errors,
                                     estimate_camera_motion, motion_report, requested_camera_motion)

H = W = 64
FRAMES = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The fit is thousands of tiny ops; on a shared, busy CPU intra-op threads only wait for each
    other (measured 3-6 s vs 0.4 s per 4-frame video with 2 threads vs 1), so run this file on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_texture(channels=1, height=H, width=W, seed=0):
    """[c h w] float64 low-pass filtered noise, zero mean, unit-ish std."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(channels, height, width, generator=g, dtype=torch.float64)
    fy = torch.fft.fftfreq(height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, dtype=torch.float64)
    lowpass = torch.exp(-(fy[:, None] ** 2 + fx[None, :] ** 2) / (2 * 0.06 ** 2))
    tex = torch.fft.ifft2(torch.fft.fft2(noise) * lowpass).real
    return tex / tex.std()


def warp(image, inv_affine):
    """Bilinear warp of image [c h w] by one inverse 2x3 transform (target pixel -> source pixel)."""
    _, height, width = image.shape
    inv = inv_affine.to(torch.float64)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    grid = torch.stack([2 * sx / (width - 1) - 1, 2 * sy / (height - 1) - 1], dim=-1)[None]
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def camera_video(cam, frames=FRAMES, image=None):
    """[f c h w]: frame f is the texture moved by cam's transform of frame f (exact float64 inverse)."""
    image = smooth_texture() if image is None else image
    fwd = cam.affines(frames, image.shape[1], image.shape[2])
    inv_lin = torch.linalg.inv(fwd[:, :, :2])
    inv = torch.cat([inv_lin, -inv_lin @ fwd[:, :, 2:]], dim=2)
    return torch.stack([warp(image, inv[f]) for f in range(frames)])


def assert_motion(errors, pan_px, zoom, rotate_deg, epe_px):
    pan_err_px = errors.max_abs[:2] * torch.tensor([W, H], dtype=torch.float64)
    assert float(pan_err_px.max()) < pan_px, (pan_err_px, errors.table())
    assert float(errors.max_abs[2]) < zoom, errors.table()
    assert float(errors.max_abs[3]) < rotate_deg, errors.table()
    assert errors.epe_max < epe_px, errors.table()


CAMERAS = {
    "pan": lm.CameraMotion(pan=(0.137, -0.061)),                 # 8.77 px and -3.90 px: sub-pixel totals
    "zoom_in": lm.CameraMotion(zoom=0.13),
    "zoom_out": lm.CameraMotion(zoom=-0.11),
    "rotate": lm.CameraMotion(rotate=-11.3),
    "combined": lm.CameraMotion(pan=(0.09, 0.07), zoom=0.08, rotate=7.5),
}


@pytest.mark.parametrize("name", list(CAMERAS))
def test_known_warps_sub_pixel(name):
    cam = CAMERAS[name]
    video = camera_video(cam)
    errors = camera_motion_errors(video, cam)
    assert isinstance(errors, CameraMotionErrors)
    assert errors.estimated.shape == errors.requested.shape == (FRAMES, 4)
    assert_motion(errors, pan_px=0.05, zoom=0.0025, rotate_deg=0.1, epe_px=0.05)
    # Frame 0 is the reference: identity exactly.
    assert errors.estimated[0].abs().max() < 1e-12
    assert float(errors.estimate.inlier_fraction[1:].min()) > 0.5


@pytest.mark.parametrize("cam", [lm.CameraMotion(pan=(0.25, 0.1)), lm.CameraMotion(rotate=45),
                                 lm.CameraMotion(rotate=-60),
                                 lm.CameraMotion(pan=(0.1, -0.1), zoom=0.4, rotate=-35)],
                         ids=["pan16px", "rotate45", "rotate-60", "combined"])
def test_abrupt_motion_in_one_step(cam):
    """Two frames, large motion, no earlier frame to start from: the spectral capture stage supplies
    the start. Without the Fourier–Mellin candidates the rotations end 30-64 px off (measured); without
    the translation-only candidate the 16 px pan ends 60 px off (the log-polar step locks onto the
    straight edges of the exposed border)."""
    errors = camera_motion_errors(camera_video(cam, frames=2, image=smooth_texture(seed=4)), cam)
    assert_motion(errors, pan_px=0.05, zoom=0.0025, rotate_deg=0.1, epe_px=0.05)


def test_brightness_changes_between_frames():
    """Generated videos flicker: a per-frame, per-channel gain (up to 1.6x) and offset is fitted
    alongside the motion, so it does not bias the geometry."""
    cam = CAMERAS["combined"]
    video = camera_video(cam, image=smooth_texture(channels=3, seed=6))
    f = torch.arange(FRAMES, dtype=torch.float64)[:, None, None, None]
    gain = 1 + f * torch.tensor([0.2, -0.1, 0.1], dtype=torch.float64)[:, None, None]
    video = video * gain + 0.3 * f
    assert_motion(camera_motion_errors(video, cam), pan_px=0.05, zoom=0.0025, rotate_deg=0.1, epe_px=0.05)


def flat_graphics(height=96, width=96):
    """[3 h w] piecewise-flat card: a brightness ramp, flat discs and bars, thin grid lines."""
    y = torch.linspace(0, 1, height, dtype=torch.float64)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width, dtype=torch.float64)[None, :].expand(height, width)
    img = torch.stack([0.3 + 0.4 * y, 0.5 + 0.2 * y, 0.9 - 0.5 * y])
    grid = ((torch.arange(width) % 24) < 2)[None, :] | ((torch.arange(height) % 24) < 2)[:, None]
    img[:, grid] *= 0.5
    for cy, cx, r, colour in [(0.3, 0.25, 0.1, (0.9, 0.2, 0.2)), (0.6, 0.7, 0.14, (0.2, 0.8, 0.3))]:
        img[:, (y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = torch.tensor(colour, dtype=torch.float64)[:, None]
    img[:, (x > 0.45) & (x < 0.5) & (y > 0.1) & (y < 0.45)] = 0.05
    return img


def test_piecewise_flat_content():
    """Graphics-like frames (flat areas, hard edges: the demo's test card) have mostly zero residual
    whatever the motion; the robust scale comes from the pixels with gradient, else the fit rejects
    every edge pixel (measured with a MAD over all pixels: 0.45 px EPE here, 0.65 px on the 256x256
    demo card). Hard edges are not band-limited, so the fit works on frames blurred by a 1 px
    Gaussian (without it, Gauss–Newton creeps and stops 0.1-0.2 px off). Now 0.037 px here and
    0.06 px on the demo card; the tolerance is 0.25 px, 0.5 %, 0.2°."""
    cam = lm.CameraMotion(pan=(0.15, -0.1), zoom=0.12, rotate=-10)
    errors = camera_motion_errors(camera_video(cam, image=flat_graphics()), cam)
    assert_motion(errors, pan_px=0.25, zoom=0.005, rotate_deg=0.2, epe_px=0.25)


def test_requested_values_follow_camera_motion():
    cam = lm.CameraMotion(pan=(0.2, -0.1), zoom=0.3, rotate=12)
    req = requested_camera_motion(cam, 5)
    a = torch.arange(5, dtype=torch.float64) / 4
    torch.testing.assert_close(req, a[:, None] * torch.tensor([0.2, -0.1, 0.3, 12.0], dtype=torch.float64))
    sched = torch.tensor([[0, 0, 0, 0], [1, 0, 0.5, 0], [0.5, 1, 1, 1]], dtype=torch.float64)
    req = requested_camera_motion(lm.CameraMotion(pan=(0.1, 0.2), zoom=0.1, rotate=5, schedule=sched), 3)
    torch.testing.assert_close(req, sched * torch.tensor([0.1, 0.2, 0.1, 5.0], dtype=torch.float64))


def test_schedule_back_and_forth():
    """A non-monotone schedule (pan out and back, zoom only in the middle) is read back frame by frame."""
    sched = torch.tensor([[0, 0, 0, 0], [1, 0.5, 1, 0], [0.3, 1, 0, 1], [-0.5, 0.2, 0.5, -1]], dtype=torch.float64)
    cam = lm.CameraMotion(pan=(0.1, -0.08), zoom=0.1, rotate=6, schedule=sched)
    errors = camera_motion_errors(camera_video(cam), cam)
    assert_motion(errors, pan_px=0.05, zoom=0.0025, rotate_deg=0.1, epe_px=0.05)


@pytest.mark.parametrize("fill", ["zeros", "noise"])
def test_large_exposed_borders(fill):
    """Large motion exposes over a third of the last frame, filled with zeros (as the warp leaves
    them) or with unrelated content (strong noise, worse than a plausible fill): the fit never
    samples them, so the answer is unchanged."""
    cam = lm.CameraMotion(pan=(-0.3, 0.2), zoom=-0.15, rotate=9)
    video = camera_video(cam)
    inside = camera_video(cam, image=torch.ones(1, H, W, dtype=torch.float64)) > 0.999
    assert float((~inside[-1]).double().mean()) > 0.35
    if fill == "noise":
        g = torch.Generator().manual_seed(3)
        video = torch.where(inside, video, 3 * torch.randn(video.shape, generator=g, dtype=torch.float64))
    assert_motion(camera_motion_errors(video, cam), pan_px=0.1, zoom=0.005, rotate_deg=0.2, epe_px=0.1)


def test_independently_moving_object():
    """A 14x14 patch of other texture moving against the camera (down-right, 3 px per frame) is an
    outlier the robust fit gives no weight; the camera's motion comes back."""
    cam = lm.CameraMotion(pan=(0.12, 0.05), zoom=0.06, rotate=-5)
    video = camera_video(cam).clone()
    patch = 4 * smooth_texture(seed=7)[:, :14, :14]
    for f in range(FRAMES):
        y, x = 10 + 3 * f, 12 + 3 * f
        video[f, :, y:y + 14, x:x + 14] = patch
    errors = camera_motion_errors(video, cam)
    assert_motion(errors, pan_px=0.1, zoom=0.005, rotate_deg=0.2, epe_px=0.1)
    # The object's pixels (about 2 x 196 of 4096 per frame) are among those left out.
    assert float(errors.estimate.inlier_fraction[1:].max()) < 0.97


# Pans of whole pixels per frame (12 and -6 px over 3 steps; 6 and 3 px): latent_permute moves whole
# pixels, so a pure pan of 4.27 px per frame really moves the content by 4 px, and the metric says so.
@pytest.mark.parametrize("cam", [lm.CameraMotion(pan=(12 / W, -6 / H)), lm.CameraMotion(zoom=0.15),
                                 lm.CameraMotion(rotate=12),
                                 lm.CameraMotion(pan=(6 / W, 3 / H), zoom=-0.1, rotate=-8)],
                         ids=["pan", "zoom", "rotate", "combined"])
def test_sign_conventions_match_latent_permute(cam):
    """lm.latent_permute of a static texture (nearest-neighbour source pixels, zeros exposed) reads
    back as the camera that made it, signs included; a wrong sign would be off by twice the motion."""
    tex = smooth_texture(channels=4, seed=1).to(torch.float32)
    z = tex[None, :, None].expand(1, 4, FRAMES, H, W).contiguous()
    out, _ = lm.latent_permute(z, cam)
    video = out[0].transpose(0, 1)                        # [f c h w]
    # Nearest-neighbour sampling displaces each pixel by up to half a pixel in a sawtooth pattern
    # across the frame, which a least-squares fit over 64 px does not fully average out: measured
    # 0.39 % zoom and 0.11 px EPE for the 15 % zoom, 0.15° for the rotation. A wrong sign would be
    # off by 10-24 px, 15 % or 12°.
    assert_motion(camera_motion_errors(video, cam), pan_px=0.1, zoom=0.01, rotate_deg=0.5, epe_px=0.25)


def test_directions_in_plain_words():
    """Content moving left reads as a positive pan x; content magnified as a positive zoom;
    content turned clockwise on screen (y down) as a positive rotate."""
    tex = smooth_texture()
    left = torch.stack([tex, torch.roll(tex, shifts=-3, dims=2)])[:, :, 8:-8, 8:-8]   # content moves 3 px left
    est = estimate_camera_motion(left)
    assert abs(float(est.pan[1, 0]) * (W - 16) - 3) < 0.05 and abs(float(est.pan[1, 1])) < 1e-3
    # Built by hand, not through CameraMotion: the point 10 px right of the centre moves down (y
    # grows), i.e. the content turns clockwise on a y-down screen by 6°; then magnified by 10 %.
    c = torch.tensor([(W - 1) / 2, (H - 1) / 2], dtype=torch.float64)
    th = math.radians(6)
    for lin, column, expected in [(torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]],
                                                dtype=torch.float64), 3, 6.0),
                                  (1.1 * torch.eye(2, dtype=torch.float64), 2, 0.1)]:
        inv_lin = torch.linalg.inv(lin)
        inv = torch.cat([inv_lin, (c - inv_lin @ c)[:, None]], dim=1)     # target -> source about c
        assert float((lin @ torch.tensor([10.0, 0.0], dtype=torch.float64))[1]) >= 0
        est = estimate_camera_motion(torch.stack([tex, warp(tex, inv)]))
        assert abs(float(est.as_tensor()[1, column]) - expected) < (0.1 if column == 3 else 0.0025)


def test_layouts_and_channels():
    """[F, H, W] and [F, C, H, W] give the same motion; float32 too."""
    cam = CAMERAS["combined"]
    video = camera_video(cam, frames=2)
    gray = estimate_camera_motion(video[:, 0])
    four = estimate_camera_motion(video.expand(2, 4, H, W).to(torch.float32))
    torch.testing.assert_close(gray.as_tensor(), four.as_tensor(), atol=2e-4, rtol=0)
    assert isinstance(gray, EstimatedMotion) and gray.affines.shape == (2, 2, 3)


def test_non_square_frames_and_uint8():
    """Pan fractions use the width and the height separately, about the centre of a 40x72 frame;
    8-bit frames (decoded video) are accepted."""
    cam = lm.CameraMotion(pan=(0.08, -0.1), zoom=0.07, rotate=-6)
    video = camera_video(cam, frames=3, image=smooth_texture(channels=3, height=40, width=72, seed=5))
    errors = camera_motion_errors(video, cam)
    assert (errors.estimate.height, errors.estimate.width) == (40, 72)
    assert errors.epe_max < 0.05 and float(errors.max_abs[3]) < 0.1, errors.table()
    as_bytes = ((video - video.min()) / (video.max() - video.min()) * 255).round().to(torch.uint8)
    assert camera_motion_errors(as_bytes, cam).epe_max < 0.05   # measured 0.007 px, as in float64


def test_single_frame_is_identity():
    est = estimate_camera_motion(smooth_texture()[None])
    assert est.as_tensor().shape == (1, 4) and float(est.as_tensor().abs().max()) == 0.0


def test_endpoint_error_is_in_pixels():
    """Comparing against a camera whose pan differs by 2 px at the last frame gives ≈ 2 px there."""
    cam = lm.CameraMotion(pan=(0.1, 0.0))
    est = estimate_camera_motion(camera_video(cam, frames=2))
    shifted = lm.CameraMotion(pan=(0.1 + 2 / W, 0.0))
    errors = camera_motion_errors(est, shifted)
    assert abs(float(errors.endpoint_px[1]) - 2.0) < 0.05
    assert abs(float(errors.max_abs[0]) * W - 2.0) < 0.05


def test_report_table():
    cam = CAMERAS["combined"]
    errors = camera_motion_errors(camera_video(cam), cam)
    text = errors.table()
    assert text == motion_report(errors)
    lines = text.splitlines()
    assert "pan x %" in lines[0] and "rotate deg" in lines[0] and "EPE px" in lines[0]
    assert len(lines) == 3 + FRAMES + 3
    last = lines[3 + FRAMES - 1].split("|")
    # Requested and achieved pan x (% of the width) and rotation (degrees) of the last frame.
    req, got = map(float, last[1].split())
    assert req == 9.0 and abs(got - 9.0) <= 0.02
    req, got = map(float, last[4].split())
    assert req == 7.5 and abs(got - 7.5) <= 0.02
    assert "EPE: mean" in lines[-1]


def test_bad_input():
    cam = CAMERAS["pan"]
    with pytest.raises(TypeError, match="video"):
        estimate_camera_motion([[1.0]])
    with pytest.raises(ValueError, match="video"):
        estimate_camera_motion(torch.zeros(2, 1, 1, 32, 32))
    with pytest.raises(ValueError, match="video"):
        estimate_camera_motion(torch.rand(2, 1, 4, 32))
    with pytest.raises(TypeError, match="video"):
        estimate_camera_motion(torch.zeros(2, 32, 32, dtype=torch.int64))
    bad = torch.rand(2, 32, 32)
    bad[1, 3, 3] = math.nan
    with pytest.raises(ValueError, match="video contains NaN"):
        estimate_camera_motion(bad)
    with pytest.raises(ValueError, match="frame 0 is constant"):
        estimate_camera_motion(torch.ones(2, 32, 32))
    with pytest.raises(ValueError, match="iterations"):
        estimate_camera_motion(torch.rand(2, 32, 32), iterations=0)
    with pytest.raises(TypeError, match="camera"):
        camera_motion_errors(torch.rand(2, 32, 32), "pan right")
    with pytest.raises(TypeError, match="camera"):
        requested_camera_motion(None, 3)
    sched = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="schedule has 3 frames"):
        camera_motion_errors(camera_video(cam, frames=2), lm.CameraMotion(pan=(0.1, 0.0), schedule=sched))
    with pytest.raises(TypeError, match="errors"):
        motion_report("table")


def test_video_not_modified():
    video = camera_video(CAMERAS["combined"], frames=2).to(torch.float32)
    before = video.clone()
    estimate_camera_motion(video)
    assert torch.equal(video, before)
