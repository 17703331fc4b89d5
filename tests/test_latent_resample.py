"""latent_resample: fill-map semantics (background rows/columns, alignment, fallbacks), C++ builder ==
reference builder, fused gather (Triton through the interpreter on CPU) == reference, checks."""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.kernels._grid import plane_tiling
from lightmotion_fast.ops.latent_resample import SOURCE_OFFSETS, build_fill_map_affine, decode_source_offsets
from lightmotion_fast.ops.snr_reinject import StepCoefficients, renoise_coefficients, renoise_sigma_coefficients
from lightmotion_fast.reference.latent_resample import (
    alignment_affines,
    FILL_AXES,
    build_fill_map_reference,
    decode_fill_map,
    latent_resample_reference,
)
from lm_testing import TOLERANCES

CAMERAS = {
    "combo": lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16),
    "pan": lm.CameraMotion(pan=(0.3, 0.0)),
    "tilt": lm.CameraMotion(pan=(0.05, -0.4)),
    "zoom_out": lm.CameraMotion(zoom=-0.3, rotate=30),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _background(frames, height, width, p=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, height, width, generator=g) < p


def _require_cpp():
    if not lm.extension_available() or not hasattr(torch.ops.lightmotion_cpp, "build_fill_map"):
        pytest.fail("the C++ extension is not built: pip install --no-build-isolation -e .")


@pytest.mark.parametrize("shape", [(1, 3, 5, 17, 23), (2, 4, 3, 8, 8), (1, 1, 2, 1, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kept_positions_equal_latent_permute(shape, dtype, device, poisoned):
    cam = CAMERAS["combo"]
    z = torch.randn(shape, device=device).to(dtype)
    bg = _background(*shape[2:])
    with lm.backend("triton"):
        out, fill = lm.latent_edit(z, cam, background=bg, seed=5)
        permuted, exposed = lm.latent_permute(z, cam)
    kept = ~exposed
    assert out.dtype == dtype and out.shape == z.shape
    assert torch.equal(out[:, :, kept].cpu(), permuted[:, :, kept].cpu())
    # Every position is written (the output was poisoned) and equals the reference gather exactly.
    assert torch.equal(out.cpu(), latent_resample_reference(z.cpu().double(), fill.cpu()).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frames_first_layout_and_strided_views(dtype, device, poisoned):
    cam = CAMERAS["combo"]
    base = torch.randn(2, 5, 3, 9, 11, device=device).to(dtype)  # b f c h w (SVD)
    fill = lm.build_fill_map(cam, 5, 9, 11, background=_background(5, 9, 11), seed=1, device=device)
    with lm.backend("triton"):
        out = lm.latent_resample(base, fill, layout="b f c h w")
        out_view = lm.latent_resample(base.transpose(1, 2), fill)  # the same data as a b c f h w view
    ref = latent_resample_reference(base.cpu().double(), fill.cpu(), layout="b f c h w").to(dtype)
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(out_view.cpu(), ref.transpose(1, 2))


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_cpu_paths_match(impl, poisoned):
    z = torch.randn(2, 3, 4, 7, 9)
    fill = lm.build_fill_map(CAMERAS["pan"], 4, 7, 9, seed=2)
    with lm.backend("reference"):
        out = lm.latent_resample(z, fill)
    assert torch.equal(out, latent_resample_reference(z, fill))


def _along_column(inv_f, height, width, axis):
    """bool [h, w]: the test's own statement of which axis each exposed pixel is filled along: its source
    left the frame by dx columns / dy rows; per strip, the column wins iff dy/h > dx/w."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    sx = torch.floor(inv_f[0, 0] * x.float() + inv_f[0, 1] * y.float() + inv_f[0, 2] + 0.5).long()
    sy = torch.floor(inv_f[1, 0] * x.float() + inv_f[1, 1] * y.float() + inv_f[1, 2] + 0.5).long()
    dx = torch.where(sx < 0, -sx, torch.where(sx >= width, sx - width + 1, 0))
    dy = torch.where(sy < 0, -sy, torch.where(sy >= height, sy - height + 1, 0))
    if axis != "strip":
        return torch.full((height, width), axis == "column")
    return dy.double() / height > dx.double() / width


def _check_semantics(cam, frames, height, width, bg, fill, axis):
    inv = cam.inverse_affines(frames, height, width)
    align = alignment_affines(inv)
    src_f, src_y, src_x = decode_fill_map(fill, height, width)
    _, exposed = lm.latent_permute(torch.zeros(1, 1, frames, height, width), cam)
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    counts = {"aligned": 0, "fresh": 0, "row": 0, "column": 0}
    for f in range(frames):
        along_column = _along_column(inv[f], height, width, axis)
        qx = torch.floor(align[f, 0, 0] * x.float() + align[f, 0, 1] * y.float() + align[f, 0, 2] + 0.5).long()
        qy = torch.floor(align[f, 1, 0] * x.float() + align[f, 1, 1] * y.float() + align[f, 1, 2] + 0.5).long()
        for yy, xx in torch.nonzero(exposed[f]).tolist():
            q = (int(qy[yy, xx]), int(qx[yy, xx]))
            if f > 0 and 0 <= q[0] < height and 0 <= q[1] < width and exposed[f - 1, q[0], q[1]]:
                assert fill[f, yy, xx] == fill[f - 1, q[0], q[1]], (f, yy, xx)
                counts["aligned"] += 1
                continue
            counts["fresh"] += 1
            sf, sy, sx = int(src_f[f, yy, xx]), int(src_y[f, yy, xx]), int(src_x[f, yy, xx])
            assert sf == f, "a fresh fill comes from the same frame's original latent"
            by_column = bool(along_column[yy, xx])
            counts["column" if by_column else "row"] += 1
            line = bg[f, :, xx] if by_column else bg[f, yy]
            if line.any():
                assert (sx == xx) if by_column else (sy == yy), "fill must come from the same row/column"
                assert bg[f, sy, sx], "fill must come from a background pixel"
            elif bg[f].any():
                assert bg[f, sy, sx], "row without background: fill from another background pixel of the frame"
    return counts


@pytest.mark.parametrize("axis", FILL_AXES)
@pytest.mark.parametrize("cam", ["combo", "pan", "tilt"])
def test_fill_semantics(cam, axis):
    frames, height, width = 6, 12, 14
    camera = CAMERAS[cam]
    bg = _background(frames, height, width, p=0.5, seed=3)
    bg[2, 4] = False          # a row with no background at all
    bg[3, :, 0] = False       # a column with no background
    fill = lm.build_fill_map(camera, frames, height, width, background=bg, seed=11, axis=axis)
    counts = _check_semantics(camera, frames, height, width, bg, fill, axis)
    assert counts["fresh"] > 0 and counts["aligned"] > 0  # both branches were exercised
    if axis == "strip" and cam == "pan":
        assert counts["column"] == 0, "a horizontal pan exposes columns only: every fill runs along its row"


def test_diagonal_pan_fills_each_strip_along_its_own_axis():
    """The paper's resampling figure: in one diagonal pan the exposed columns are filled from their rows and
    the exposed rows from their columns (issue 13 item 2); one axis for the whole clip cannot do both."""
    camera = lm.CameraMotion(pan=(0.4, 0.3))   # content moves left and up: right columns, bottom rows exposed
    frames, height, width = 4, 10, 12
    bg = _background(frames, height, width, p=0.5, seed=2)
    for impl in ("reference", "cpp"):
        if impl == "cpp":
            _require_cpp()
        with lm.backend(impl):
            fill = lm.build_fill_map(camera, frames, height, width, background=bg, seed=5)
        counts = _check_semantics(camera, frames, height, width, bg, fill, "strip")
        assert counts["row"] > 0 and counts["column"] > 0, counts
        src_f, src_y, src_x = decode_fill_map(fill, height, width)
        inv = camera.inverse_affines(frames, height, width)
        f = 1   # first moved frame: everything exposed is fresh
        along_column = _along_column(inv[f], height, width, "strip")
        _, exposed = lm.latent_permute(torch.zeros(1, 1, frames, height, width), camera)
        y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        right_strip = exposed[f] & ~along_column          # exposed columns at the right edge
        bottom_strip = exposed[f] & along_column          # exposed rows at the bottom
        assert (x[right_strip] >= width - 3).all() and (y[bottom_strip] >= height - 3).all()
        with_row_bg = right_strip & bg[f].any(dim=1)[:, None]
        with_col_bg = bottom_strip & bg[f].any(dim=0)[None, :]
        assert with_row_bg.any() and with_col_bg.any()
        assert torch.equal(src_y[f][with_row_bg], y[with_row_bg]), "exposed columns take their fill from their row"
        assert torch.equal(src_x[f][with_col_bg], x[with_col_bg]), "exposed rows take their fill from their column"


def test_alignment_carries_the_same_token(device):
    cam = CAMERAS["pan"]
    z = torch.randn(1, 2, 5, 8, 10, device=device)
    with lm.backend("triton"):
        out, fill = lm.latent_edit(z, cam, seed=4)
    _, exposed = lm.latent_permute(z, cam)
    # A pure horizontal pan by 3 latent px/frame: the strip exposed at frame f-1 sits 3 px further
    # left at frame f and must hold exactly the same values.
    shift = round(0.3 * 10 / 4)
    for f in range(1, 5):
        for col in torch.nonzero(exposed[f - 1, 0]).flatten().tolist():
            if col - shift >= 0 and exposed[f, 0, col - shift]:
                assert torch.equal(out[:, :, f, :, col - shift], out[:, :, f - 1, :, col])


@pytest.mark.parametrize("axis", FILL_AXES)
@pytest.mark.parametrize("cam", ["combo", "zoom_out", "tilt"])
def test_cpp_builder_equals_reference(cam, axis):
    _require_cpp()
    frames, height, width = 5, 11, 13
    inv = CAMERAS[cam].inverse_affines(frames, height, width)
    bg = _background(frames, height, width, p=0.4, seed=9)
    bg[1] = False          # a frame with no background
    bg[2, 3] = False
    for seed in (0, 7, 2**40 + 3):
        ref = build_fill_map_reference(inv, bg, seed, axis)
        with lm.backend("cpp"):
            cpp = build_fill_map_affine(inv, bg, height, width, seed, axis)
        assert cpp.dtype == torch.int32 and torch.equal(cpp, ref)
    with lm.backend("cpp"):
        other = build_fill_map_affine(inv, bg, height, width, 8, axis)
    assert not torch.equal(other, ref), "a different seed draws different fills"


def test_fallbacks():
    cam = lm.CameraMotion(pan=(0.5, 0.0))  # 2 latent px per frame: frame 2 has 2 aligned + 2 fresh columns
    frames, height, width = 3, 6, 8
    bg = torch.zeros(frames, height, width, dtype=torch.bool)
    bg[1, 5, 2] = True        # frame 1: a single background pixel, in the last row
    # frame 0 is never exposed; frames 1-2: rows without background; frame 2 has none at all
    for impl in ("reference", "cpp"):
        if impl == "cpp":
            _require_cpp()
        with lm.backend(impl):
            fill = lm.build_fill_map(cam, frames, height, width, background=bg, seed=3)
        src_f, src_y, src_x = decode_fill_map(fill, height, width)
        _, exposed = lm.latent_permute(torch.zeros(1, 1, frames, height, width), cam)
        e1 = exposed[1]
        assert e1.any()
        assert (src_f[1][e1] == 1).all() and (src_y[1][e1] == 5).all() and (src_x[1][e1] == 2).all()
        fresh2 = exposed[2].clone()
        fresh2[:, : width - 2] = False  # the newly exposed strip at the right edge
        assert fresh2.sum() == 2 * height and exposed[2].sum() == 4 * height
        assert (src_f[2][fresh2] == 2).all()
        # frame without background: any pixel of the frame, drawn (not all the same)
        picks = set(zip(src_y[2][fresh2].tolist(), src_x[2][fresh2].tolist()))
        assert len(picks) > 1


def test_seed_and_generator_determinism():
    cam = CAMERAS["combo"]
    a = lm.build_fill_map(cam, 4, 9, 9, seed=123)
    b = lm.build_fill_map(cam, 4, 9, 9, seed=123)
    c = lm.build_fill_map(cam, 4, 9, 9, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(lm.build_fill_map(cam, 4, 9, 9, generator=g1), lm.build_fill_map(cam, 4, 9, 9, generator=g2))


def test_draws_are_spread_over_the_row():
    cam = lm.CameraMotion(pan=(0.5, 0.0))
    fill = lm.build_fill_map(cam, 2, 4, 32, seed=0)   # everything background
    _, _, src_x = decode_fill_map(fill, 4, 32)
    _, exposed = lm.latent_permute(torch.zeros(1, 1, 2, 4, 32), cam)
    chosen = src_x[1][exposed[1]]
    assert chosen.unique().numel() > 16  # 64 draws among 32 columns: a broken RNG repeats itself


def test_bad_inputs():
    cam = CAMERAS["pan"]
    z = torch.randn(1, 2, 3, 4, 5)
    fill = lm.build_fill_map(cam, 3, 4, 5)
    with pytest.raises(TypeError, match="fill_map"):
        lm.latent_resample(z, fill.long())
    with pytest.raises(ValueError, match="fill_map"):
        lm.latent_resample(z, fill[:2])
    with pytest.raises(ValueError, match="fill_map"):
        lm.latent_resample(z, fill + 60)
    with pytest.raises(ValueError, match="z"):
        lm.latent_resample(z[0], fill)
    with pytest.raises(ValueError, match="background"):
        lm.build_fill_map(cam, 3, 4, 5, background=torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="background"):
        lm.build_fill_map(cam, 3, 4, 5, background=torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="seed"):
        lm.build_fill_map(cam, 3, 4, 5, seed=-1)
    with pytest.raises(TypeError, match="camera"):
        lm.build_fill_map("pan", 3, 4, 5)
    with pytest.raises(ValueError, match="axis"):
        lm.build_fill_map(cam, 3, 4, 5, axis="diagonal")


# --- the fused edit: decoded offsets, planes per program, renoise in the same pass (issue 11 item 3) ---

@pytest.mark.parametrize("shape, layout", [((2, 3, 4, 8, 12), "b c f h w"), ((1, 5, 2, 9, 11), "b f c h w"),
                                           ((2, 2, 3, 17, 23), "b c f h w")], ids=str)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("offset", [0, 6, 1024, 2**63 - 8, 2**63 - 3])   # near 2⁶³: the stream index must not overflow
def test_renoise_in_the_same_pass_equals_resample_then_snr(shape, layout, dtype, offset, device, poisoned):
    z = torch.randn(shape, device=device).to(dtype)
    frames = shape[2] if layout == "b c f h w" else shape[1]
    fill = lm.build_fill_map(CAMERAS["combo"], frames, shape[3], shape[4], background=_background(frames, *shape[3:]),
                             seed=2, device=device)
    coeffs = renoise_coefficients(0.6, 0.35)
    with lm.backend("triton"):
        fused = lm.latent_resample(z, fill, layout, renoise=coeffs, seed=7, offset=offset)
        edited = lm.latent_resample(z, fill, layout)
        two_pass = lm.snr_reinject(edited, None, coeffs, seed=7, offset=offset, layout=layout)
    with lm.backend("reference"):
        ref = lm.latent_resample(z.cpu(), fill.cpu(), layout, renoise=coeffs, seed=7, offset=offset)
    assert fused.dtype == dtype and fused.shape == z.shape
    atol, rtol = TOLERANCES.get(dtype, (1e-6, 1e-6))
    torch.testing.assert_close(fused, two_pass, atol=atol, rtol=rtol)
    torch.testing.assert_close(fused.cpu(), ref, atol=atol, rtol=rtol)
    assert not torch.allclose(fused.cpu().double(), coeffs.cx * edited.cpu().double())  # noise was added


def test_renoise_checks():
    z = torch.randn(1, 2, 3, 4, 5)
    fill = lm.build_fill_map(CAMERAS["pan"], 3, 4, 5)
    with pytest.raises(ValueError, match="renoise.cm must be 0"):
        lm.latent_resample(z, fill, renoise=StepCoefficients(1.0, 0.5, 0.1, 1.0, 0.0))
    with pytest.raises(TypeError, match="renoise must be a StepCoefficients"):
        lm.latent_resample(z, fill, renoise=(1.0, 0.5))
    with pytest.raises(ValueError, match="seed"):
        lm.latent_resample(z, fill, renoise=renoise_sigma_coefficients(1.0, 2.0), seed=-1)


def test_fill_map_is_decoded_once_and_again_after_a_change(device):
    z = torch.randn(1, 2, 3, 6, 8, device=device)
    fill = lm.build_fill_map(CAMERAS["pan"], 3, 6, 8, seed=1, device=device)
    SOURCE_OFFSETS.clear()
    with lm.backend("triton"):
        first = lm.latent_resample(z, fill)
        lm.latent_resample(z, fill)
        assert len(SOURCE_OFFSETS._entries) == 1            # decoded once, for z's strides
        lm.latent_resample(z.transpose(3, 4).contiguous().transpose(3, 4), fill)
        assert len(SOURCE_OFFSETS._entries) == 2            # other strides: another decoding
        fill[0, 0, 0] = 5                                   # in place: the version counter moves
        changed = lm.latent_resample(z, fill)
    assert torch.equal(changed.cpu(), latent_resample_reference(z.cpu(), fill.cpu()))
    assert not torch.equal(changed, first)


def test_decoded_offsets_follow_the_strides():
    fill = lm.build_fill_map(CAMERAS["combo"], 3, 5, 7, seed=4)
    src_f, src_y, src_x = decode_fill_map(fill, 5, 7)
    off = decode_source_offsets(fill, 3, 5, 7, (1000, 30, 2))
    assert off.dtype == torch.int32 and torch.equal(off.long(), src_f * 1000 + src_y * 30 + src_x * 2)
    assert decode_source_offsets(fill, 3, 5, 7, (2**31, 30, 2)).dtype == torch.int64


def test_map_changes_the_version_counter_misses_need_clear_caches():
    """The decoded offsets follow in-place changes made through PyTorch; a write through `.data` is not
    seen (PyTorch does not count it) until `lightmotion_fast.clear_caches()`, as the docs say."""
    z = torch.randn(1, 2, 3, 4, 8)
    fill = lm.build_fill_map(CAMERAS["pan"], 3, 4, 8, seed=0)
    with lm.backend("triton"):
        lm.latent_resample(z, fill)
        fill.copy_(fill.flip(0, 1, 2))                        # counted: re-decoded
        torch.testing.assert_close(lm.latent_resample(z, fill), latent_resample_reference(z, fill), rtol=0, atol=0)
        fill.data.copy_(fill.data.flip(0, 1, 2))              # not counted
        stale = lm.latent_resample(z, fill)
        lm.clear_caches()
        fresh = lm.latent_resample(z, fill)
    want = latent_resample_reference(z, fill)
    assert not torch.equal(stale, want)
    torch.testing.assert_close(fresh, want, rtol=0, atol=0)


@pytest.mark.parametrize("label, hw, frames, planes, vec, at_least", [
    ("AnimateDiff fp16", 64 * 64, 16, 8, 8, 8),
    ("SVD-xt fp16", 72 * 128, 25, 8, 8, 8),
    ("bandwidth fp32", 128 * 128, 32, 256, 4, 8),
])
def test_several_planes_per_program_at_real_shapes(label, hw, frames, planes, vec, at_least):
    block, per_program, num_warps = plane_tiling(hw, frames, planes, 132, vec)
    programs = -(-hw // block) * frames * -(-planes // per_program)
    assert per_program >= at_least and programs >= 132, (block, per_program, programs)
    assert block % vec == 0 and block >= 32 * vec * num_warps // 4


def test_compiles_fullgraph_through_the_public_function():
    z = torch.randn(1, 2, 3, 6, 8)
    fill = lm.build_fill_map(CAMERAS["combo"], 3, 6, 8, seed=1)
    coeffs = renoise_coefficients(0.6, 0.4)

    def edit(z, fill):
        return lm.latent_resample(z, fill), lm.latent_resample(z, fill, renoise=coeffs, seed=3, offset=8)

    torch._dynamo.reset()
    compiled = torch.compile(edit, fullgraph=True, backend="aot_eager")
    got, expected = compiled(z, fill), edit(z, fill)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_validate_reads_the_map(device):
    z = torch.randn(1, 2, 3, 4, 5, device=device)
    fill = lm.build_fill_map(CAMERAS["pan"], 3, 4, 5, device=device)
    with pytest.raises(ValueError, match="fill_map entries"):
        lm.latent_resample(z, fill - 1, validate=True)


def test_numpy_integer_sizes_and_seeds_float_sizes_rejected():
    import numpy as np

    cam = CAMERAS["combo"]
    a = lm.build_fill_map(cam, np.int64(3), np.int32(8), 8, seed=np.int64(1))
    assert torch.equal(a, lm.build_fill_map(cam, 3, 8, 8, seed=1))
    with pytest.raises(TypeError, match="height must be an int"):
        lm.build_fill_map(cam, 3, 8.0, 8)
    with pytest.raises(ValueError, match="frames must be an int >= 1"):
        lm.build_fill_map(cam, 0, 8, 8)


def test_float64_latents(device, poisoned):
    z = torch.randn(1, 2, 3, 6, 8, device=device, dtype=torch.float64)
    fill = lm.build_fill_map(CAMERAS["combo"], 3, 6, 8, seed=1, device=device)
    with lm.backend("triton"):
        out = lm.latent_resample(z, fill)
    assert out.dtype == torch.float64 and torch.equal(out.cpu(), latent_resample_reference(z.cpu(), fill.cpu()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and host-sync checks need a GPU")
def test_fused_edit_is_one_launch_without_host_sync_and_graph_capturable():
    z = torch.randn(2, 25, 4, 72, 128, device="cuda", dtype=torch.float16)     # SVD-xt, b f c h w
    fill = lm.build_fill_map(CAMERAS["combo"], 25, 72, 128, seed=0, device="cuda")
    coeffs = renoise_sigma_coefficients(2.0, 3.5)

    def edit():
        return lm.latent_resample(z, fill, "b f c h w", renoise=coeffs, seed=1, offset=0)

    edit()                                          # decodes the map once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")         # any host synchronisation now raises
    try:
        edit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        edit()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len({e.name for e in kernels}) == 1 and len(kernels) == 1, [e.name for e in kernels]
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        edit()
        with torch.cuda.graph(graph, stream=stream):
            g_out = edit()
    z.copy_(torch.randn_like(z))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_out, edit())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the clamp applies to maps on a GPU")
def test_gpu_map_out_of_range_never_reads_outside():
    z = torch.randn(1, 2, 3, 4, 5, device="cuda")
    fill = lm.build_fill_map(CAMERAS["pan"], 3, 4, 5, device="cuda")
    bad = fill.clone()
    bad[0, 0, 0], bad[1, 2, 3] = -7, 10**6
    out = lm.latent_resample(z, bad)
    assert torch.equal(out, latent_resample_reference(z, bad.clamp(0, 3 * 4 * 5 - 1)))


def test_decodings_go_with_their_map():
    z = torch.randn(1, 2, 3, 6, 8)
    SOURCE_OFFSETS.clear()
    with lm.backend("triton"):
        for seed in range(3):
            lm.latent_resample(z, lm.build_fill_map(CAMERAS["pan"], 3, 6, 8, seed=seed))
    # each map died after its call: only the last decoding can still be held
    assert len(SOURCE_OFFSETS._entries) == 1
