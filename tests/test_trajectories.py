"""Trajectories from depth + camera and from tracks; per-level tables (C++ against the Python references)."""
import math

import pytest
import torch

import lightmotion_fast
from lightmotion_fast.camera import trajectories as traj
from lightmotion_fast.camera.trajectories import (
    TrajectoryTables,
    level_sizes,
    level_tables_reference,
    trajectories_from_depth,
    trajectories_from_tracks,
    zbuffer_reference,
)
from lightmotion_fast.reference.trajectory_attention import incoming_csr, level_indices, subsample

K = torch.tensor([[40.0, 0.0, 16.0], [0.0, 40.0, 12.0], [0.0, 0.0, 1.0]])
HAS_CPP = lightmotion_fast.extension_available() and hasattr(torch.ops.lightmotion_cpp, "trajectory_zbuffer")


def translation(x=0.0, y=0.0, z=0.0):
    pose = torch.eye(4)
    pose[:3, 3] = torch.tensor([x, y, z])
    return pose


def test_identity_camera_gives_the_pixel_grid_all_valid():
    depth = torch.rand(24, 32) + 1.0
    coords, valid = trajectories_from_depth(depth, K, torch.eye(4).repeat(4, 1, 1))
    assert coords.shape == (4, 24 * 32, 2) and valid.shape == (4, 24 * 32)
    assert valid.all()
    ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(32.0), indexing="ij")
    grid = torch.stack([xs, ys], -1).reshape(-1, 2)
    torch.testing.assert_close(coords, grid.expand(4, -1, -1), atol=1e-4, rtol=0)


def test_point_behind_another_is_occluded():
    # Flat wall at depth 4 with a small near patch at depth 1. A sideways move makes the patch slide
    # over the wall: wall points landing under the patch are occluded, the patch stays visible.
    depth = torch.full((24, 32), 4.0)
    depth[10:14, 14:18] = 1.0
    poses = torch.stack([torch.eye(4), translation(x=0.1)])
    coords, valid = trajectories_from_depth(depth, K, poses)
    near = (depth.reshape(-1) == 1.0)
    assert valid[0].all()
    assert valid[1][near].all()
    landing = torch.floor(coords[1] + 0.5)
    inside = (landing[:, 0] >= 0) & (landing[:, 0] < 32) & (landing[:, 1] >= 0) & (landing[:, 1] < 24)
    hidden = ~valid[1] & ~near & inside
    assert hidden.sum() >= 4 * 3  # the patch moved 4 px over the wall, which moved 1 px: 3 columns hidden
    # every hidden wall point lands on a pixel that a near point also lands on
    patch_pixels = {tuple(p) for p in landing[near].tolist()}
    assert all(tuple(p) in patch_pixels for p in landing[hidden].tolist())


def test_points_behind_the_camera_and_outside_the_frame_are_invalid():
    depth = torch.full((24, 32), 2.0)
    coords, valid = trajectories_from_depth(depth, K, torch.stack([torch.eye(4), translation(z=-3.0), translation(x=1.0)]))
    assert not valid[1].any()          # camera moved 3 units forward past a wall 2 units away
    assert valid[2].any() and not valid[2].all()   # a sideways move pushes part of the view out
    out_of_frame = (coords[2][:, 0] < -0.5) | (coords[2][:, 0] >= 31.5)
    assert not valid[2][out_of_frame].any()


@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
def test_cpp_zbuffer_matches_reference():
    g = torch.Generator().manual_seed(0)
    uv = torch.rand(3, 500, 2, generator=g) * torch.tensor([34.0, 26.0]) - 1.0
    depth = torch.rand(3, 500, generator=g) + 0.5
    valid = torch.rand(3, 500, generator=g) > 0.1
    got = torch.ops.lightmotion_cpp.trajectory_zbuffer(uv, depth, valid, 24, 32, 1.03)
    want = zbuffer_reference(uv, depth, valid, 24, 32, 1.03)
    assert torch.equal(got, want)
    assert (valid & ~want).any()


@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
def test_cpp_level_tables_match_reference():
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(5, 300, 2, generator=g) * torch.tensor([64.0, 48.0])
    coords[0, :3] = torch.tensor([[-5.0, 60.0], [63.99, 47.99], [64.0, 0.0]])  # clamped at the borders
    valid = torch.rand(5, 300, generator=g) > 0.2
    selection = subsample(300, 77, torch.Generator().manual_seed(2))
    for size in ((6, 8), (3, 4), (5, 7)):
        got = torch.ops.lightmotion_cpp.trajectory_level_tables(coords, valid, selection, 48, 64, *size)
        want = level_tables_reference(coords, valid, selection, (48, 64), size)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_tables_for_every_level(monkeypatch):
    g = torch.Generator().manual_seed(3)
    coords = torch.rand(4, 2000, 2, generator=g) * torch.tensor([72.0, 40.0])
    valid = torch.rand(4, 2000, generator=g) > 0.1
    tables = TrajectoryTables(coords, valid, frame_size=(40, 72), latent_size=(5, 9), levels=4, seed=7)
    assert tables.sizes == level_sizes((5, 9), 4) == [(5, 9), (3, 5), (2, 3), (1, 2)]
    again = TrajectoryTables(coords, valid, frame_size=(40, 72), latent_size=(5, 9), levels=4, seed=7)
    monkeypatch.setattr(traj._ext, "has_op", lambda name: False)  # the Python fallback builds the same
    python = TrajectoryTables(coords, valid, frame_size=(40, 72), latent_size=(5, 9), levels=4, seed=7)
    for h, w in tables.sizes:
        level = tables.level(h * w)
        assert level.idx.shape == (4, min(2000, 2 * h * w))
        want = level_indices(coords[:, level.selection], (40, 72), (h, w))
        assert torch.equal(level.idx.long()[level.valid], want[level.valid])  # invalid points are zeroed
        rowptr, col = incoming_csr(level.idx, level.valid, h * w)
        assert torch.equal(level.rowptr.long(), rowptr) and torch.equal(level.col.long(), col)
        for other in (again, python):
            o = other.level(h * w)
            assert all(torch.equal(a, b) for a, b in zip((level.idx, level.valid, level.rowptr, level.col),
                                                         (o.idx, o.valid, o.rowptr, o.col)))
    assert tables.level(45) is tables.level(45)          # built once
    with pytest.raises(ValueError, match="no trajectory level has 44 latent pixels"):
        tables.level(44)


def test_resample_draws_afresh():
    coords = torch.rand(3, 500, 2) * 32
    tables = TrajectoryTables(coords, None, frame_size=(32, 32), latent_size=(4, 4), levels=1, resample=True)
    first, second = tables.level(16), tables.level(16)
    assert first.selection.shape == (32,) and not torch.equal(first.selection, second.selection)


def test_tracks_pass_through_and_bad_inputs_raise():
    tracks = torch.rand(1, 6, 10, 2) * 20
    vis = torch.rand(1, 6, 10) > 0.3
    coords, valid = trajectories_from_tracks(tracks, vis)
    assert coords.shape == (6, 10, 2) and torch.equal(valid, vis[0])
    assert torch.equal(coords[valid], tracks[0][vis[0]])
    nan_hidden = tracks[0].clone()
    nan_hidden[~vis[0]] = float("nan")
    assert torch.isfinite(trajectories_from_tracks(nan_hidden, vis[0])[0]).all()
    bad = tracks[0].clone()
    bad[vis[0].nonzero()[0][0], vis[0].nonzero()[0][1], 0] = float("nan")
    with pytest.raises(ValueError, match="tracks has 1 non-finite"):
        trajectories_from_tracks(bad, vis[0])
    with pytest.raises(ValueError, match=r"visibility must have shape \(6, 10\)"):
        trajectories_from_tracks(tracks[0], vis[0, :5])
    with pytest.raises(ValueError, match=r"tracks must have shape \[f n 2\]"):
        trajectories_from_tracks(tracks[0, :, :, :1], vis[0])
    with pytest.raises(ValueError, match="depth must be positive"):
        trajectories_from_depth(torch.zeros(4, 4), K, torch.eye(4)[None])
    with pytest.raises(ValueError, match="poses has 1 non-finite"):
        poses = torch.eye(4)[None].clone()
        poses[0, 0, 3] = float("nan")
        trajectories_from_depth(torch.ones(4, 4), K, poses)
    with pytest.raises(ValueError, match=r"K must have shape \[3, 3\]"):
        trajectories_from_depth(torch.ones(4, 4), torch.eye(4), torch.eye(4)[None])
    with pytest.raises(ValueError, match="latent_size"):
        TrajectoryTables(tracks[0], vis[0], frame_size=(20, 20), latent_size=(0, 3))


def test_degenerate_inputs_raise_errors_naming_the_argument():
    # issue 14 item 10: each of these was accepted silently or raised LinAlgError/IndexError/RuntimeError.
    K = torch.tensor([[10.0, 0, 4], [0, 10.0, 3], [0, 0, 1]])
    poses = torch.eye(4).repeat(3, 1, 1)
    depth = torch.full((6, 8), 2.0)
    with pytest.raises(ValueError, match="K must be invertible"):
        trajectories_from_depth(depth, torch.zeros(3, 3), poses)
    singular = poses.clone()
    singular[1, 1, 1] = 0.0
    singular[1, 1, 0] = 0.0
    with pytest.raises(ValueError, match=r"poses must be invertible.*\[1\]"):
        trajectories_from_depth(depth, K, singular)
    with pytest.raises(ValueError, match="depth must be a non-empty"):
        trajectories_from_depth(torch.ones(0, 8), K, poses)
    with pytest.raises(ValueError, match="poses must hold at least one frame"):
        trajectories_from_depth(depth, K, torch.zeros(0, 4, 4))
    for tolerance in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="tolerance must be"):
            trajectories_from_depth(depth, K, poses, tolerance=tolerance)
    with pytest.raises(TypeError, match="tracks must hold real"):
        trajectories_from_tracks(torch.zeros(3, 5, 2, dtype=torch.complex64))
    coords, valid = torch.rand(3, 10, 2) * 32, torch.ones(3, 10, dtype=torch.bool)
    for levels in (0, -3):
        with pytest.raises(ValueError, match="levels must be a positive"):
            TrajectoryTables(coords, valid, (32, 32), (4, 4), levels=levels)
    with pytest.raises(TypeError, match="levels must be an integer"):
        TrajectoryTables(coords, valid, (32, 32), (4, 4), levels=2.5)
    with pytest.raises(TypeError, match="frame_size must be"):
        TrajectoryTables(coords, valid, (32.7, 32), (4, 4))
    with pytest.raises(TypeError, match="latent_size must be"):
        TrajectoryTables(coords, valid, (32, 32), (4.0, 4))


def test_numpy_integers_are_accepted():
    import numpy as np
    coords, valid = torch.rand(3, 10, 2) * 32, torch.ones(3, 10, dtype=torch.bool)
    tables = TrajectoryTables(coords, valid, (np.int64(32), np.int32(32)), (np.int64(4), 4), levels=np.int64(2))
    plain = TrajectoryTables(coords, valid, (32, 32), (4, 4), levels=2)
    assert tables.sizes == plain.sizes == [(4, 4), (2, 2)]
    assert torch.equal(tables.level(16).idx, plain.level(16).idx)


# ---------------------------------------------------------------------------------------------
# Quad splatting and out-of-frame handling (issue 12 item 2)


def dolly_over_a_near_square():
    """A wall at depth 4 and a 16×16 square at depth 1; the camera moves 0.5 forward, so the square is
    magnified 2× (about the principal point) and the wall 8/7×: the square hides 473 wall points."""
    K = torch.tensor([[40.0, 0, 32], [0, 40.0, 24], [0, 0, 1]])
    depth = torch.full((48, 64), 4.0)
    depth[16:32, 24:40] = 1.0
    return depth, K, torch.stack([torch.eye(4), translation(z=-0.5)])


def test_quads_hide_what_a_magnified_surface_covers(monkeypatch):
    depth, K, poses = dolly_over_a_near_square()
    near = depth.reshape(-1) == 1.0
    kept = {}
    for splat in ("points", "quads"):
        coords, valid = trajectories_from_depth(depth, K, poses, splat=splat)
        c, lo, hi = coords[1], coords[1][near].amin(0), coords[1][near].amax(0)
        hidden = ~near & (c >= lo).all(1) & (c <= hi).all(1)          # wall points landing under the square
        around = ~near & ((c < lo - 1.5) | (c > hi + 1.5)).any(1)      # wall points clear of it
        assert int(hidden.sum()) == 473 and valid[1][near].all()
        kept[splat] = (valid[1][hidden].float().mean().item(), valid[1][around])
    # single points leave 3 of every 4 pixels of the 2× magnified square empty: ~80 % of the hidden wall
    # points stay valid; quads fill those holes: none does, and nothing clear of the square changes.
    assert 0.75 < kept["points"][0] < 0.85
    assert kept["quads"][0] == 0.0
    assert torch.equal(kept["points"][1], kept["quads"][1])
    if HAS_CPP:   # the Python fallback gives the same
        monkeypatch.setattr(traj._ext, "has_op", lambda name: False)
        assert torch.equal(trajectories_from_depth(depth, K, poses)[1], valid)


def zbuffers():
    yield zbuffer_reference
    if HAS_CPP:
        yield lambda uv, z, ok, h, w, scale, grid=None, edge=0.1: torch.ops.lightmotion_cpp.trajectory_zbuffer(
            uv, z, ok, h, w, scale, *(grid or (0, 0)), edge)


@pytest.mark.parametrize("zbuffer", list(zbuffers()), ids=["reference", "cpp"][:len(list(zbuffers()))])
def test_a_quad_covers_its_pixels_at_its_farthest_corner_unless_it_spans_a_depth_edge(zbuffer):
    # A 2×3 source grid spread 4× over a 9×13 frame: the left quad's corners are at depth 1, the right
    # quad spans a depth edge (1 and 4). Probes: p0 at depth 2 in the left quad, p1 at depth 6 and p2
    # at depth 3 in the right quad, p3 at depth 2 outside both.
    # A 4×4 source grid: rows 0-1 hold the 2×3 quads (column 3 and row 2 invalid, so no other quad is
    # complete), row 3 the probes.
    nan = float("nan")
    uv = torch.tensor([[0.0, 0.0], [4.0, 0.0], [8.0, 0.0], [nan, nan], [0.0, 4.0], [4.0, 4.0], [8.0, 4.0], [nan, nan]]
                      + [[nan, nan]] * 4 + [[2.0, 2.0], [6.0, 3.0], [5.0, 1.0], [11.0, 7.0]])[None]
    z = torch.tensor([[1.0, 1.0, 4.0, 1.0, 1.0, 1.0, 4.0, 1.0] + [1.0] * 4 + [2.0, 6.0, 3.0, 2.0]])
    ok = torch.ones(1, 16, dtype=torch.bool)
    ok[0, [3, 7, 8, 9, 10, 11]] = False
    probes = slice(12, 16)
    points = zbuffer(uv, z, ok, 9, 13, 1.03)
    edge = zbuffer(uv, z, ok, 9, 13, 1.03, (4, 4), 0.1)
    smear = zbuffer(uv, z, ok, 9, 13, 1.03, (4, 4), 10.0)
    assert points[0, probes].tolist() == [True, True, True, True]    # single points hide none of the probes
    assert edge[0, probes].tolist() == [False, True, True, True]     # the left quad hides p0; the edge quad is out
    assert smear[0, probes].tolist() == [False, False, True, True]   # splatted at its farthest corner (4): p1 only
    assert torch.equal(edge[0, :12], ok[0, :12]) and torch.equal(smear[0, :12], ok[0, :12])


@pytest.mark.parametrize("zbuffer", list(zbuffers()), ids=["reference", "cpp"][:len(list(zbuffers()))])
def test_quads_leave_no_hole_in_a_rotated_magnified_surface(zbuffer):
    # A 10×10 patch at depth 1, magnified 2.5× and turned 0.5 rad, over a 30×30 frame; every pixel
    # centre holds a probe at depth 5 (source grid rows 11.., after an invalid row). The probes inside
    # the patch's outline are hidden, the ones outside stay valid; single points leave most of the
    # inside visible.
    c, s = math.cos(0.5), math.sin(0.5)
    ys, xs = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    patch = torch.stack([xs - 4.5, ys - 4.5], -1).reshape(-1, 2) @ (2.5 * torch.tensor([[c, s], [-s, c]])) + 15.0
    py, px = torch.meshgrid(torch.arange(30.0), torch.arange(30.0), indexing="ij")
    probes = torch.stack([px, py], -1).reshape(-1, 2)
    uv = torch.cat([patch, torch.zeros(10, 2), probes])[None]
    z = torch.cat([torch.ones(100), torch.ones(10), torch.full((900,), 5.0)])[None]
    ok = torch.ones(1, 1010, dtype=torch.bool)
    ok[0, 100:110] = False
    # how far inside the outline each probe lies, in the patch's own frame (float64), away from its boundary
    local = (probes.double() - 15.0) @ torch.tensor([[c, -s], [s, c]], dtype=torch.float64) / 2.5
    inside_by = (4.5 - local.abs()).amin(1) * 2.5          # distance inside the outline, in pixels
    quads = zbuffer(uv, z, ok, 30, 30, 1.03, (101, 10), 0.1)[0, 110:]
    points = zbuffer(uv, z, ok, 30, 30, 1.03)[0, 110:]
    # (outside: beyond half a pixel's diagonal, where the patch's own single-point splats reach)
    assert not quads[inside_by > 1e-3].any() and quads[inside_by < -0.75].all()
    assert points[inside_by > 1e-3].float().mean() > 0.75


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
def test_cpp_quad_zbuffer_matches_reference_on_every_splat(seed):
    g = torch.Generator().manual_seed(seed)
    gh, gw, frames = 13, 17, 4
    ys, xs = torch.meshgrid(torch.arange(gh * 1.0), torch.arange(gw * 1.0), indexing="ij")
    grid = torch.stack([xs, ys], -1).reshape(-1, 2)
    # warped grids: magnified, rotated, folded (random jitter), partly out of frame
    scale = torch.tensor([2.0, 1.0, 0.7, 1.3])[:, None, None]
    angle = torch.tensor([0.0, 0.5, -1.0, 3.0])
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2)
    uv = (grid - 8.0) @ rot.transpose(1, 2) * scale + 8.0 + torch.randn(frames, gh * gw, 2, generator=g) * 0.6
    uv[1, :5] = torch.tensor([[3.5, 4.5], [3.5, 4.5], [3.5, 4.5], [1e7, 2.0], [-3e6, 1.0]])   # degenerate, huge
    uv = uv.to(torch.float32)
    depth = (torch.rand(frames, gh * gw, generator=g) * 0.3 + 1.0)
    depth[:, 40:60] += 3.0                                                      # depth edges
    valid = torch.rand(frames, gh * gw, generator=g) > 0.05
    uv[~valid] = float("nan")                                                   # never read
    for height, width in ((12, 16), (30, 21)):
        for grid_size, edge in (((0, 0), 0.1), ((gh, gw), 0.1), ((gh, gw), 0.0), ((gh, gw), 5.0)):
            got = torch.ops.lightmotion_cpp.trajectory_zbuffer(uv, depth, valid, height, width, 1.03, *grid_size, edge)
            want = zbuffer_reference(uv, depth, valid, height, width, 1.03, None if grid_size == (0, 0) else grid_size,
                                     edge)
            assert torch.equal(got, want), (height, width, grid_size, edge)
            assert (valid & ~want).any()


@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
def test_cpp_and_python_trajectories_agree_for_every_splat_and_camera(monkeypatch):
    depth = torch.rand(24, 32, generator=torch.Generator().manual_seed(4)) + 1.0
    depth[6:14, 10:20] = 0.6
    roll = torch.eye(4)
    roll[:2, :2] = torch.tensor([[0.96, -0.28], [0.28, 0.96]])
    cameras = torch.stack([torch.eye(4), translation(x=0.2), translation(z=-0.4), translation(y=0.1, z=0.3), roll])
    results = {}
    for use_cpp in (True, False):
        monkeypatch.setattr(traj._ext, "has_op", (lambda name: HAS_CPP) if use_cpp else (lambda name: False))
        for splat in ("quads", "points"):
            for out_of_frame in ("invalidate", "clamp"):
                results[use_cpp, splat, out_of_frame] = trajectories_from_depth(
                    depth, K, cameras, splat=splat, out_of_frame=out_of_frame)
    for key, (coords, valid) in results.items():
        other = results[(not key[0],) + key[1:]]
        assert torch.equal(coords, other[0]) and torch.equal(valid, other[1]), key


def test_out_of_frame_clamp_keeps_points_at_the_border():
    depth = torch.full((24, 32), 2.0)
    poses = torch.stack([torch.eye(4), translation(x=0.5), translation(z=-3.0)])
    coords, valid = trajectories_from_depth(depth, K, poses)
    clamped, kept = trajectories_from_depth(depth, K, poses, out_of_frame="clamp")
    out = (coords[1, :, 0] < -0.5) | (coords[1, :, 0] >= 31.5)   # content moved 10 px right: 10 columns left
    assert out.sum() == 10 * 24 and not valid[1][out].any()
    assert kept[1].all()                                        # official: kept, at the border
    assert torch.equal(clamped[1][out][:, 0], torch.full((240,), 31.0))
    assert torch.equal(clamped[1][~out], coords[1][~out])
    assert torch.equal(clamped[1][out][:, 1], coords[1][out][:, 1].clamp(0, 23))
    assert not kept[2].any()                                    # behind the camera: invalid in both modes
    with pytest.raises(ValueError, match="out_of_frame must be one of"):
        trajectories_from_depth(depth, K, poses, out_of_frame="keep")
    with pytest.raises(ValueError, match="splat must be one of"):
        trajectories_from_depth(depth, K, poses, splat="quad")
    with pytest.raises(ValueError, match="edge must be"):
        trajectories_from_depth(depth, K, poses, edge=-1.0)
