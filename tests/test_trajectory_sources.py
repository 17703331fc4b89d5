"""Trajectory sources (issue 12 item 3): disparity -> depth, camera presets, chained optical flow, and
tracks merged with the camera-induced flow. Each on synthetic scenes with a known answer: a pure pan, a
dolly, a rotating scene and an occluder."""
import math

import pytest
import torch

import lightmotion_fast as lm
import lightmotion_fast.camera  # noqa: F401
from lightmotion_fast.camera import (
    camera_preset,
    depth_from_disparity,
    merge_tracks_with_camera,
    trajectories_from_depth,
    trajectories_from_flow,
)

H, W = 24, 32
F = 5
K = torch.tensor([[40.0, 0.0, 16.0], [0.0, 40.0, 12.0], [0.0, 0.0, 1.0]])
CENTRE = torch.tensor([16.0, 12.0])


def pixel_grid(height=H, width=W):
    ys, xs = torch.meshgrid(torch.arange(height * 1.0), torch.arange(width * 1.0), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(-1, 2).double()


def rotation2(angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


# Scenes with a known image motion. Each gives the camera path for a wall at depth 2 and the exact
# position at frame t of the content at pixel p of frame 0 (image coordinates, float64).
def pan(t):        # camera moves right 0.05 per frame: content moves left f·0.05/2 = 1 px per frame
    pose = torch.eye(4)
    pose[0, 3] = -0.05 * t
    return pose, lambda p: p - torch.tensor([1.0 * t, 0.0], dtype=torch.float64)


def dolly(t):      # camera moves forward 0.07 per frame: magnified 2 / (2 - 0.07 t) about the centre
    pose = torch.eye(4)
    pose[2, 3] = -0.07 * t
    return pose, lambda p: CENTRE + (p - CENTRE) * (2.0 / (2.0 - 0.07 * t))


def roll(t):       # the scene turns 0.05 rad per frame about the optical axis
    pose = torch.eye(4)
    pose[:2, :2] = rotation2(0.05 * t).float()
    return pose, lambda p: CENTRE + (p - CENTRE) @ rotation2(0.05 * t).T


SCENES = {"pan": pan, "dolly": dolly, "rotation": roll}


def camera(scene):
    return torch.stack([SCENES[scene](t)[0] for t in range(F)])


def expected(scene, points):
    return torch.stack([SCENES[scene](t)[1](points) for t in range(F)])


def inside(points, height=H, width=W):
    r = torch.floor(points + 0.5)
    return (r[..., 0] >= 0) & (r[..., 0] < width) & (r[..., 1] >= 0) & (r[..., 1] < height)


# ---------------------------------------------------------------------------------------------
# disparity -> depth


def test_depth_from_disparity_follows_the_official_convention():
    disparity = torch.tensor([[50.0, 100.0, 0.0], [-3.0, 1e-9, 2e9]])
    depth = depth_from_disparity(disparity)
    want = torch.tensor([[200.0, 100.0, 1e4], [1e4, 1e4, 1e-4]])   # 10⁴ / max(d, 10⁻⁵) in [10⁻⁴, 10⁴]
    torch.testing.assert_close(depth, want, rtol=1e-6, atol=0)
    assert depth.dtype == torch.float32 and disparity[1, 0] == -3.0     # input untouched
    assert depth_from_disparity(disparity.double()).dtype == torch.float64
    per_frame = depth_from_disparity(torch.rand(3, 4, 5) + 1.0)
    assert per_frame.shape == (3, 4, 5)
    # a wall at disparity 100 seen through a pan: the depth unit is camera_preset's
    coords, _ = trajectories_from_depth(depth_from_disparity(torch.full((H, W), 100.0)), K, camera("pan"))
    assert torch.isfinite(coords).all()
    with pytest.raises(ValueError, match="disparity has 1 non-finite"):
        depth_from_disparity(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="near must be < far"):
        depth_from_disparity(disparity, near=10.0, far=1.0)
    with pytest.raises(ValueError, match="disparity must be a non-empty"):
        depth_from_disparity(torch.ones(5))


# ---------------------------------------------------------------------------------------------
# camera presets


def test_camera_preset_defaults_are_the_official_ones():
    K0, poses = camera_preset("orbit_horizontal")
    assert poses.shape == (25, 4, 4) and poses.dtype == torch.float64
    torch.testing.assert_close(K0, torch.tensor([[260.0, 0, 512], [0, 260.0, 288], [0, 0, 1]], dtype=torch.float64))
    assert camera_preset("zoom_in", 3, frame_size=(288, 512)).K[0, 0] == 130.0   # the same field of view
    for mode in ("orbit_horizontal", "orbit_vertical", "zoom_in", "zoom_out", "horizontal", "zoomout"):
        _, poses = camera_preset(mode, 6, degrees_per_frame=3.0)
        rotation = poses[:, :3, :3]
        eye = torch.eye(3, dtype=torch.float64).expand(6, 3, 3)
        torch.testing.assert_close(rotation @ rotation.transpose(1, 2), eye)
        torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(6, dtype=torch.float64))
        # camera 0 looks at the pivot, 200 ahead on its optical axis
        torch.testing.assert_close(poses[0] @ torch.tensor([0.0, 0, 0, 1], dtype=torch.float64),
                                   torch.tensor([0.0, 0, 200, 1], dtype=torch.float64))
    with pytest.raises(ValueError, match="mode must be one of"):
        camera_preset("dolly")
    with pytest.raises(ValueError, match="straight above"):
        camera_preset("orbit_vertical", 3, degrees_per_frame=90.0)
    with pytest.raises(ValueError, match="at the pivot"):
        camera_preset("zoom_out", 2, degrees_per_frame=-90.0)
    with pytest.raises(ValueError, match="radius must be > 0"):
        camera_preset("zoom_in", radius=0.0)


@pytest.mark.parametrize("mode", ["orbit_horizontal", "orbit_vertical", "zoom_in", "zoom_out"])
def test_camera_preset_moves_the_scene_as_its_formula_says(mode):
    # A wall at depth 150 (in front of the pivot at 200). In camera-0 coordinates (x, y, z' = z - 200),
    # frame i sees the scene turned about the pivot by a = i·deg (horizontal: (x, z') by +a; vertical:
    # (y, z') by -a) or moved along the axis (zoom in: z - 200(1 - cos a); zoom out: z + 200 sin a).
    deg, r = 2.0, 200.0
    K0, poses = camera_preset(mode, F, degrees_per_frame=deg, frame_size=(H, W))
    depth = torch.full((H, W), 150.0)
    coords, valid = trajectories_from_depth(depth, K0, poses)
    rays = torch.cat([pixel_grid(), torch.ones(H * W, 1, dtype=torch.float64)], 1) @ torch.linalg.inv(K0).T
    points = rays * 150.0
    for i in range(F):
        a = math.radians(deg * i)
        x, y, z = points.unbind(1)
        if mode == "orbit_horizontal":
            x, z = x * math.cos(a) - (z - r) * math.sin(a), x * math.sin(a) + (z - r) * math.cos(a) + r
        elif mode == "orbit_vertical":
            y, z = y * math.cos(a) + (z - r) * math.sin(a), -y * math.sin(a) + (z - r) * math.cos(a) + r
        elif mode == "zoom_in":
            z = z - r * (1 - math.cos(a))
        else:
            z = z + r * math.sin(a)
        want = torch.stack([x / z, y / z, torch.ones_like(z)], 1) @ K0.T
        torch.testing.assert_close(coords[i].double(), want[:, :2], atol=2e-3, rtol=0)
        assert torch.equal(valid[i], inside(want[:, :2]))      # a plain wall: only the frame's edge hides
    if mode.startswith("zoom"):  # zoom in magnifies the wall about the principal point, zoom out shrinks it
        centre = K0[:2, 2].float()
        growth = (coords[-1] - centre).norm(dim=1) / (coords[0] - centre).norm(dim=1).clamp(min=1e-6)
        assert ((growth > 1.005) if mode == "zoom_in" else (growth < 0.995))[(coords[0] - centre).norm(dim=1) > 1].all()


# ---------------------------------------------------------------------------------------------
# depth + camera on the known scenes (quads) and an occluder


@pytest.mark.parametrize("scene", sorted(SCENES))
def test_trajectories_from_depth_on_known_scenes(scene):
    coords, valid = trajectories_from_depth(torch.full((H, W), 2.0), K, camera(scene))
    want = expected(scene, pixel_grid())
    torch.testing.assert_close(coords.double()[valid], want[valid], atol=1e-4, rtol=0)
    assert torch.equal(valid, inside(want))


# ---------------------------------------------------------------------------------------------
# chained optical flow


def flows_of(scene):
    """Exact forward (t -> t+1 at frame t's pixels) and backward (t+1 -> t at frame t+1's pixels) flows."""
    grid = pixel_grid()
    step = {"pan": lambda p: p - torch.tensor([1.0, 0.0], dtype=torch.float64),
            "dolly": None, "rotation": lambda p: CENTRE + (p - CENTRE) @ rotation2(0.05).T}[scene]
    forward, backward = [], []
    for t in range(F - 1):
        if scene == "dolly":   # magnification m_t = 2 / (2 - 0.07 t); step t -> t+1 scales by m_{t+1} / m_t
            ratio = (2.0 - 0.07 * t) / (2.0 - 0.07 * (t + 1))
            ahead = CENTRE + (grid - CENTRE) * ratio
            behind = CENTRE + (grid - CENTRE) / ratio
        else:
            ahead = step(grid)
            behind = CENTRE + (grid - CENTRE) @ rotation2(-0.05).T if scene == "rotation" else \
                grid + torch.tensor([1.0, 0.0], dtype=torch.float64)
        forward.append((ahead - grid).T.reshape(2, H, W))
        backward.append((behind - grid).T.reshape(2, H, W))
    return torch.stack(forward).float(), torch.stack(backward).float()


@pytest.mark.parametrize("scene", sorted(SCENES))
def test_chained_flow_on_known_scenes(scene):
    forward, backward = flows_of(scene)
    forward, backward = forward.double(), backward.double()     # float64 inputs are not copied: still untouched
    before = forward.clone(), backward.clone()
    coords, valid = trajectories_from_flow(forward, backward)
    assert torch.equal(before[0], forward) and torch.equal(before[1], backward)
    want = expected(scene, pixel_grid())
    assert coords.shape == (F, H * W, 2)
    torch.testing.assert_close(coords.double()[valid], want[valid], atol=1e-4, rtol=0)
    # a point is lost for good once it leaves the frame (chained flow cannot find it again)
    lost = torch.cumprod(inside(want).to(torch.int64), 0).bool()
    assert torch.equal(valid, lost)
    assert (coords[~valid] == 0).all()
    strided, ok = trajectories_from_flow(forward, backward, stride=4)
    assert strided.shape == (F, 6 * 8, 2)
    keep = pixel_grid().reshape(H, W, 2)[::4, ::4].reshape(-1, 2)
    torch.testing.assert_close(strided.double()[ok], expected(scene, keep)[ok], atol=1e-4, rtol=0)


def test_chained_flow_marks_points_an_occluder_covers():
    # A static wall; an 6×6 square moves right 2 px per frame over it. The wall points the square
    # covers at frame t+1 fail the forward–backward test (forward 0, backward -2 px) and stay lost.
    forward = torch.zeros(F - 1, 2, H, W)
    backward = torch.zeros(F - 1, 2, H, W)
    for t in range(F - 1):
        forward[t, 0, 9:15, 4 + 2 * t:10 + 2 * t] = 2.0
        backward[t, 0, 9:15, 6 + 2 * t:12 + 2 * t] = -2.0
    coords, valid = trajectories_from_flow(forward, backward)
    grid = pixel_grid()
    square = (grid[:, 1] >= 9) & (grid[:, 1] < 15) & (grid[:, 0] >= 4) & (grid[:, 0] < 10)
    assert valid[:, square].all()                                   # the square is tracked
    torch.testing.assert_close(coords[-1, square].double(), grid[square] + torch.tensor([8.0, 0], dtype=torch.float64))
    rows = (grid[:, 1] >= 9) & (grid[:, 1] < 15)
    for t in range(1, F):   # wall points ever covered by the square up to frame t are invalid, the rest valid
        covered = rows & ~square & (grid[:, 0] >= 4) & (grid[:, 0] < 10 + 2 * t)
        assert torch.equal(valid[t, ~square], ~covered[~square]), t
    with pytest.raises(ValueError, match=r"backward must have forward's shape"):
        trajectories_from_flow(forward, backward[:2])
    with pytest.raises(ValueError, match=r"forward must have shape \[f-1, 2, H, W\]"):
        trajectories_from_flow(forward.permute(0, 2, 3, 1), backward.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        trajectories_from_flow(forward, backward, stride=0)


# ---------------------------------------------------------------------------------------------
# video camera control: tracks + camera-induced flow with per-frame depth


def object_tracks(n=40, seed=0):
    """Tracks of points that move down 0.5 px per frame in the input video, all visible."""
    start = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)).double() * torch.tensor(
        [W - 8.0, H - 8.0], dtype=torch.float64) + 4.0
    return torch.stack([start + torch.tensor([0.0, 0.5 * t], dtype=torch.float64) for t in range(F)])


@pytest.mark.parametrize("scene", sorted(SCENES))
def test_merged_tracks_on_known_scenes(scene):
    tracks = object_tracks()
    depths = torch.full((F, H, W), 2.0)
    coords, valid = merge_tracks_with_camera(tracks.float(), None, depths, K, camera(scene))
    # the camera flow is sampled at the track's pixel (rounded): the known motion of that pixel, added
    pixel = torch.floor(tracks + 0.5)
    want = tracks + torch.stack([SCENES[scene](t)[1](pixel[t]) - pixel[t] for t in range(F)])
    camera_keeps = inside(torch.stack([SCENES[scene](t)[1](pixel[t]) for t in range(F)]))
    assert torch.equal(valid, camera_keeps & inside(want)) and valid[0].all()
    torch.testing.assert_close(coords.double()[valid], want[valid], atol=1e-4, rtol=0)
    assert (coords[~valid] == 0).all()


def test_merged_tracks_use_each_frames_depth_and_its_occlusion():
    # Frame t's depth: a wall at 4 with a near square (depth 1) whose rows 8..15 sit at columns
    # 12 + t .. 19 + t (it moves right in the input video). The camera pans right: the square slides
    # left over the wall 4× faster, hiding wall tracks next to it; invisible tracks stay invalid.
    depths = torch.full((F, H, W), 4.0)
    for t in range(F):
        depths[t, 8:16, 12 + t:20 + t] = 1.0
    pose = torch.stack([torch.eye(4)] * F)
    pose[:, 0, 3] = -0.05 * torch.arange(F)          # near square: 2 px per frame, wall 0.5 px per frame
    square = torch.tensor([[15.0 + t, 11.0] for t in range(F)])            # a track on the square
    wall = torch.tensor([[10.0, 11.0]] * F)                                # a static wall point left of it
    free = torch.tensor([[10.0, 3.0]] * F)                                 # a wall point above it
    hidden = torch.tensor([[25.0, 20.0]] * F)                              # never visible in the input
    tracks = torch.stack([square, wall, free, hidden], 1)
    visibility = torch.tensor([[True, True, True, False]] * F)
    before = tracks.clone(), visibility.clone(), depths.clone()
    coords, valid = merge_tracks_with_camera(tracks, visibility, depths, K, pose)
    assert all(torch.equal(a, b) for a, b in zip(before, (tracks, visibility, depths)))   # inputs untouched
    torch.testing.assert_close(coords[:, 0], square - torch.tensor([2.0, 0]) * torch.arange(F)[:, None])
    torch.testing.assert_close(coords[:, 2], free - torch.tensor([0.5, 0]) * torch.arange(F)[:, None])
    assert valid[:, 0].all() and valid[:, 2].all() and not valid[:, 3].any()
    # the wall point at x 10 lands on 10 - 0.5 t; the square's left edge on 12 + t - 2 t = 12 - t
    wall_hidden = torch.tensor([10 - 0.5 * t >= 12 - t - 0.5 for t in range(F)])
    assert torch.equal(valid[:, 1], ~wall_hidden) and wall_hidden.any()
    with pytest.raises(ValueError, match="depths must hold one depth map per track frame"):
        merge_tracks_with_camera(tracks, visibility, depths[:2], K, pose)
    with pytest.raises(ValueError, match="poses must hold one pose per track frame"):
        merge_tracks_with_camera(tracks, visibility, depths, K, pose[:2])


def test_clamp_mode_and_the_package_exports():
    tracks = object_tracks()
    pose = camera("pan")
    pose[:, 0, 3] *= 10                                               # 10 px per frame: tracks leave the frame
    coords, valid = merge_tracks_with_camera(tracks.float(), None, torch.full((H, W), 2.0), K, pose)
    clamped, kept = merge_tracks_with_camera(tracks.float(), None, torch.full((H, W), 2.0), K, pose,
                                             out_of_frame="clamp")
    assert not valid[-1].all() and kept.all()
    assert (clamped[..., 0] >= 0).all() and torch.equal(clamped[valid], coords[valid])
    from lightmotion_fast.camera import trajectory_sources
    for name in ("CameraPath", "camera_preset", "depth_from_disparity", "trajectories_from_flow",
                 "merge_tracks_with_camera"):
        assert getattr(lm.camera, name) is getattr(trajectory_sources, name) and name in lm.camera.__all__
