"""latent_permute: Triton kernel (interpreter on CPU), C++ op and reference agree; conventions; checks."""
import math

import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.reference.latent_permute import latent_permute_reference, source_positions

CAMERAS = {
    "combo": lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16),
    "pan": lm.CameraMotion(pan=(0.3, 0.0)),
    "zoom_out": lm.CameraMotion(zoom=-0.3, rotate=30),
}
SHAPES = [(1, 3, 5, 17, 23), (2, 4, 3, 8, 8), (1, 1, 2, 1, 7), (3, 2, 4, 6, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _expected(z, cam, layout):
    f, h, w = (z.shape[2], z.shape[3], z.shape[4]) if layout == "b c f h w" else (z.shape[1], z.shape[3], z.shape[4])
    return latent_permute_reference(z.cpu().double(), cam.inverse_affines(f, h, w), layout)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cam", list(CAMERAS), ids=str)
def test_triton_matches_reference(shape, dtype, cam, device, poisoned):
    z = torch.randn(shape, device=device).to(dtype)
    with lm.backend("triton"):
        out, exposed = lm.latent_permute(z, CAMERAS[cam])
    ref, ref_exposed = _expected(z, CAMERAS[cam], "b c f h w")
    # A gather moves values unchanged: exact equality with the float64 reference cast back.
    assert out.dtype == dtype and out.shape == z.shape
    assert torch.equal(out.cpu(), ref.to(dtype))
    assert torch.equal(exposed.cpu(), ref_exposed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frames_first_layout_and_strided_views(dtype, device, poisoned):
    cam = CAMERAS["combo"]
    base = torch.randn(2, 5, 3, 9, 11, device=device).to(dtype)          # b f c h w
    with lm.backend("triton"):
        out, exposed = lm.latent_permute(base, cam, layout="b f c h w")
    ref, ref_exposed = _expected(base, cam, "b f c h w")
    assert torch.equal(out.cpu(), ref.to(dtype)) and torch.equal(exposed.cpu(), ref_exposed)
    # The same data seen as a b c f h w view (no copy): the kernel follows the strides.
    view = base.transpose(1, 2)
    assert not view.is_contiguous()
    with lm.backend("triton"):
        out_v, _ = lm.latent_permute(view, cam)
    assert torch.equal(out_v.cpu(), ref.transpose(1, 2).to(dtype))


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_paths_match_reference(impl, dtype, poisoned):
    if impl == "cpp" and not lm.extension_available():
        pytest.fail("the C++ extension is not built: run the README's install (pip install --no-build-isolation -e .)")
    z = torch.randn(2, 3, 5, 17, 23).to(dtype)
    for layout, zz in (("b c f h w", z), ("b f c h w", z.transpose(1, 2))):
        with lm.backend(impl):
            out, exposed = lm.latent_permute(zz, CAMERAS["combo"], layout=layout)
        ref, ref_exposed = _expected(zz, CAMERAS["combo"], layout)
        assert torch.equal(out, ref.to(dtype)) and torch.equal(exposed, ref_exposed)


def test_input_is_not_modified(device):
    z = torch.randn(1, 2, 4, 8, 8, device=device)
    before = z.clone()
    lm.latent_permute(z, CAMERAS["combo"])
    assert torch.equal(z, before)


# --- conventions ------------------------------------------------------------------------------

def _blob(h=33, w=33, y=16, x=16):
    """A latent that is 0 everywhere except a single 1 at (y, x), in every frame."""
    z = torch.zeros(1, 1, 5, h, w)
    z[..., y, x] = 1.0
    return z


def _where(plane):
    ys, xs = torch.nonzero(plane, as_tuple=True)
    return ys.float().mean().item(), xs.float().mean().item()


def test_frame_zero_is_identity(device):
    z = torch.randn(2, 3, 6, 9, 10, device=device)
    out, exposed = lm.latent_permute(z, CAMERAS["combo"])
    assert torch.equal(out[:, :, 0], z[:, :, 0])
    assert not exposed[0].any()


def test_pan_right_moves_content_left():
    out, exposed = lm.latent_permute(_blob(), lm.CameraMotion(pan=(0.25, 0.0)))
    y0, x0 = _where(out[0, 0, 0])
    y4, x4 = _where(out[0, 0, 4])
    assert x4 < x0 and y4 == y0
    # The right edge is uncovered: the camera now sees past the old right border.
    assert exposed[4, :, -1].all() and not exposed[4, :, 0].any()
    out_down, _ = lm.latent_permute(_blob(), lm.CameraMotion(pan=(0.0, 0.25)))
    assert _where(out_down[0, 0, 4])[0] < y0          # pan (tilt) down moves content up


def test_zoom_in_magnifies_about_centre():
    z = torch.zeros(1, 1, 5, 33, 33)
    z[..., 16, 20] = 1.0                                # a point 4 px right of the centre
    out, exposed = lm.latent_permute(z, lm.CameraMotion(zoom=1.0))  # scale 2 at the last frame
    ys, xs = torch.nonzero(out[0, 0, 4], as_tuple=True)
    assert set(ys.tolist()) <= {15, 16, 17} and xs.float().mean().item() == pytest.approx(16 + 8, abs=1.0)
    assert out[0, 0, 4, 16, 16] == 0 and not exposed[4].any()   # zoom in never uncovers anything
    _, exposed_out = lm.latent_permute(z, lm.CameraMotion(zoom=-0.5))
    assert exposed_out[4, 0, 0] and exposed_out[4, -1, -1] and not exposed_out[4, 16, 16]


def test_rotation_direction():
    # Counter-clockwise camera roll: content turns clockwise on a y-down screen, so a point right of
    # the centre moves down.
    z = torch.zeros(1, 1, 5, 33, 33)
    z[..., 16, 26] = 1.0
    out, _ = lm.latent_permute(z, lm.CameraMotion(rotate=90))
    y, x = _where(out[0, 0, 4])
    assert (y, x) == (pytest.approx(26, abs=0.5), pytest.approx(16, abs=0.5))


def test_exposed_mask_is_exact():
    h, w, cam = 17, 23, CAMERAS["combo"]
    inv = cam.inverse_affines(5, h, w).double()
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    sx = inv[:, 0, 0, None, None] * x + inv[:, 0, 1, None, None] * y + inv[:, 0, 2, None, None]
    sy = inv[:, 1, 0, None, None] * x + inv[:, 1, 1, None, None] * y + inv[:, 1, 2, None, None]
    # Away from rounding ties, the float64 computation decides the same way.
    ix, iy = torch.floor(sx + 0.5), torch.floor(sy + 0.5)
    expected = (ix < 0) | (ix >= w) | (iy < 0) | (iy >= h)
    _, exposed = lm.latent_permute(torch.randn(1, 1, 5, h, w), cam)
    assert torch.equal(exposed, expected)
    assert exposed.any() and not exposed.all()
    z = torch.randn(1, 2, 5, h, w)
    out, exposed = lm.latent_permute(z, cam)
    assert (out[:, :, exposed] == 0).all()


def test_schedule_fractions():
    sched = torch.tensor([[0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5], [1, 1, 1, 1]], dtype=torch.float64)
    cam = lm.CameraMotion(pan=(0.2, 0.1), zoom=0.3, rotate=10, schedule=sched)
    linear = lm.CameraMotion(pan=(0.2, 0.1), zoom=0.3, rotate=10)
    assert torch.allclose(cam.affines(3, 8, 8), linear.affines(3, 8, 8))
    eased = lm.CameraMotion(pan=(0.2, 0.0), schedule=torch.tensor([[0, 0, 0, 0], [0.1, 0, 0, 0], [1, 0, 0, 0.0]]))
    assert eased.affines(3, 8, 10)[1, 0, 2].item() == pytest.approx(-0.1 * 0.2 * 10)


def test_affine_inverse_is_consistent():
    cam = CAMERAS["combo"]
    fwd = cam.affines(7, 20, 30)
    inv = cam.inverse_affines(7, 20, 30).double()
    p = torch.tensor([3.0, 11.0, 1.0], dtype=torch.float64)
    for f in range(7):
        src = inv[f] @ p
        back = fwd[f] @ torch.cat([src, torch.ones(1, dtype=torch.float64)])
        assert torch.allclose(back, p[:2], atol=1e-4)
    assert torch.allclose(fwd[0], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64))
    assert math.isclose(torch.linalg.det(fwd[-1, :, :2]).item(), 1.16 ** 2, rel_tol=1e-9)


def test_source_positions_match_kernel_index_choice():
    src_y, src_x, kept = source_positions(CAMERAS["pan"].inverse_affines(5, 6, 10), 6, 10)
    assert kept[0].all() and torch.equal(src_x[0], torch.arange(10).expand(6, 10))


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, err, match", [
    (torch.randn(2, 4, 8, 8), ValueError, r"z must have shape \[b c f h w\]"),
    (torch.randint(0, 5, (1, 2, 3, 4, 4)), TypeError, "z must have dtype"),
    ("not a tensor", TypeError, "z must be a torch.Tensor"),
])
def test_bad_latents(bad, err, match):
    with pytest.raises(err, match=match):
        lm.latent_permute(bad, CAMERAS["pan"])


def test_bad_layout_and_camera():
    with pytest.raises(ValueError, match="layout must be one of"):
        lm.latent_permute(torch.randn(1, 2, 3, 4, 4), CAMERAS["pan"], layout="bcfhw")
    with pytest.raises(TypeError, match="camera must be a lightmotion_fast.CameraMotion"):
        lm.latent_permute(torch.randn(1, 2, 3, 4, 4), {"pan": 1})


@pytest.mark.parametrize("kwargs, match", [
    (dict(pan=(float("nan"), 0)), r"pan\[0\] must be finite"),
    (dict(zoom=float("inf")), "zoom must be finite"),
    (dict(rotate=float("-inf")), "rotate must be finite"),
    (dict(zoom=-1.5), "non-positive scale"),
    (dict(pan=(1, 2, 3)), r"pan must be \(x, y\)"),
    (dict(schedule=torch.zeros(4, 3)), r"schedule must have shape \[F, 4\]"),
    (dict(schedule=torch.full((4, 4), float("nan"))), "schedule must be finite"),
])
def test_bad_camera_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lm.CameraMotion(**kwargs)


def test_schedule_frame_mismatch():
    cam = lm.CameraMotion(pan=(0.1, 0), schedule=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="schedule has 4 frames but the latent has 6"):
        lm.latent_permute(torch.randn(1, 2, 6, 8, 8), cam)


def test_schedule_changed_in_place_is_an_error_not_a_stale_result():
    """The camera keeps its own copy of the schedule and caches the transforms made from it: changing that
    copy in place afterwards is refused (it had silently kept the old motion), on a cached size and on a
    new one alike; the user's tensor is the user's to change."""
    user = torch.linspace(0, 1, 4)[:, None].expand(4, 4).contiguous()
    cam = lm.CameraMotion(pan=(0.25, 0), schedule=user)
    z = torch.randn(1, 2, 4, 8, 8)
    before, _ = lm.latent_permute(z, cam)
    user.zero_()                                  # the caller's tensor: the camera does not see it
    again, _ = lm.latent_permute(z, cam)
    torch.testing.assert_close(again, before, rtol=0, atol=0)
    cam.schedule.zero_()
    for size in ((8, 8), (4, 4)):
        with pytest.raises(RuntimeError, match="schedule was modified in place"):
            lm.latent_permute(torch.randn(1, 2, 4, *size), cam)
    with pytest.raises(RuntimeError, match="schedule was modified in place"):
        cam.inverse_affines(4, 8, 8)


def test_scheduled_camera_compiles_fullgraph():
    """The schedule check is a host check: skipped while torch.compile traces (not a graph break)."""
    cam = lm.CameraMotion(pan=(0.25, 0), schedule=torch.linspace(0, 1, 3)[:, None].expand(3, 4))
    z = torch.randn(1, 2, 3, 4, 8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: lm.latent_permute(t, cam)[0], fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(z), lm.latent_permute(z, cam)[0])


def test_affine_entry_point_checks(device):
    z = torch.randn(1, 2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match=r"inv_affine must have shape \[3, 2, 3\]"):
        lm.latent_permute_affine(z, torch.zeros(4, 2, 3, device=device))
    with pytest.raises(TypeError, match="inv_affine must have dtype"):
        lm.latent_permute_affine(z, torch.zeros(3, 2, 3, dtype=torch.float64, device=device))
    inv = CAMERAS["combo"].inverse_affines(3, 4, 4, device=device)
    assert torch.equal(lm.latent_permute_affine(z, inv)[0], lm.latent_permute(z, CAMERAS["combo"])[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and host-sync checks need a GPU")
def test_cuda_graph_capture_and_no_host_sync():
    z = torch.randn(2, 4, 16, 64, 64, device="cuda", dtype=torch.float16)
    cam = CAMERAS["combo"]
    out, exposed = lm.latent_permute(z, cam)          # first call caches the matrices on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")           # any host synchronisation now raises
    try:
        lm.latent_permute(z, cam)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        lm.latent_permute(z, cam)                     # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            g_out, g_exposed = lm.latent_permute(z, cam)
    z.copy_(torch.randn_like(z))
    graph.replay()
    torch.cuda.synchronize()
    ref, ref_exposed = lm.latent_permute(z, cam)
    assert torch.equal(g_out, ref) and torch.equal(g_exposed, ref_exposed)


# --- edge inputs (issue 14 items 8 and 10) ------------------------------------------------------

@pytest.mark.parametrize("impl", ["triton", "cpp", "reference"])
def test_empty_batch_still_gets_its_mask(impl, device, poisoned):
    z = torch.randn(0, 2, 3, 8, 8, device="cpu" if impl == "cpp" else device)  # C++: CPU tensors
    with lm.backend(impl):
        out, exposed = lm.latent_permute(z, CAMERAS["combo"])
    _, ref_exposed = _expected(z, CAMERAS["combo"], "b c f h w")
    assert out.shape == z.shape and torch.equal(exposed.cpu(), ref_exposed)


@pytest.mark.parametrize("shape", [(1, 2, 3, 0, 8), (1, 2, 3, 8, 0), (2, 0, 3, 5, 4)], ids=str)
def test_empty_frames_and_channels(shape, device):
    z = torch.randn(shape, device=device)
    for impl in ("triton", "reference"):
        with lm.backend(impl):
            out, exposed = lm.latent_permute(z, CAMERAS["combo"])
        assert out.shape == z.shape and exposed.shape == (3,) + shape[3:]
        assert torch.equal(exposed.cpu(), _expected(z, CAMERAS["combo"], "b c f h w")[1])


@pytest.mark.parametrize("impl", ["triton", "cpp", "reference"])
@pytest.mark.parametrize("layout", ["b c f h w", "b f c h w"])
def test_a_clip_of_no_frames_is_empty_like_an_empty_batch(impl, layout, device):
    shape = (1, 2, 0, 5, 4) if layout == "b c f h w" else (1, 0, 2, 5, 4)
    z = torch.randn(shape, device="cpu" if impl == "cpp" else device)
    with lm.backend(impl):
        out, exposed = lm.latent_permute(z, CAMERAS["combo"], layout)
    assert out.shape == z.shape and exposed.shape == (0, 5, 4) and exposed.dtype == torch.bool


def test_inverse_affines_hands_out_a_copy(device):
    cam = lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)
    z = torch.randn(1, 2, 3, 8, 8, device=device)
    before, before_exposed = lm.latent_permute(z, cam)
    mine = cam.inverse_affines(3, 8, 8, device=device)
    mine += 100                                   # the caller's tensor, not the camera's cache
    again, again_exposed = lm.latent_permute(z, cam)
    assert torch.equal(again, before) and torch.equal(again_exposed, before_exposed)
    assert not torch.equal(cam.inverse_affines(3, 8, 8, device=device), mine)


def test_numpy_integers_are_sizes_and_floats_are_not():
    import numpy as np

    cam = CAMERAS["combo"]
    assert torch.equal(cam.inverse_affines(np.int64(3), np.int32(8), np.int16(9)), cam.inverse_affines(3, 8, 9))
    for bad_name, args in (("height", (3, 8.0, 9)), ("frames", (3.0, 8, 9)), ("width", (3, 8, 9.5))):
        with pytest.raises(TypeError, match=f"{bad_name} must be an int"):
            cam.inverse_affines(*args)
    with pytest.raises(ValueError, match="frames must be an int >= 1"):
        cam.inverse_affines(0, 8, 9)


@pytest.mark.parametrize("impl", ["triton", "cpp", "reference"])
def test_float64_latents(impl, device, poisoned):
    z = torch.randn(2, 3, 4, 9, 11, device="cpu" if impl == "cpp" else device, dtype=torch.float64)
    with lm.backend(impl):
        out, exposed = lm.latent_permute(z, CAMERAS["combo"])
    ref, ref_exposed = _expected(z, CAMERAS["combo"], "b c f h w")
    assert out.dtype == torch.float64 and torch.equal(out.cpu(), ref) and torch.equal(exposed.cpu(), ref_exposed)


# --- bit-exact source indices at the real sizes (issue 11 item 4) ----------------------------------

# Every camera the benchmarks use (benchmarks/scenarios/latent_permute.py, latent_resample.py) and the tests'.
BENCH_CAMERAS = {
    "bench_combo": lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16),
    "bench_pan": lm.CameraMotion(pan=(0.25, 0.0)),
    **CAMERAS,
}
REAL_SIZES = {"AnimateDiff": (16, 64, 64), "SVD-xt": (25, 72, 128), "large": (32, 128, 128)}


def _kernel_positions(inv, height, width, contract: str | None = None):
    """The kernel's float32 op sequence for the source pixel, in NumPy: products rounded, then
    (a0·x + a1·y) + a2, then floor(s + 0.5). contract="x"/"y" models an FMA contraction of that
    product into the first sum (what ptxas emits when fp fusion is on)."""
    import numpy as np

    a = inv.numpy().astype(np.float32).reshape(-1, 6)[:, :, None, None]
    y, x = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")

    def coord(c0, c1, c2):
        if contract is None:
            s = (c0 * x).astype(np.float32) + (c1 * y).astype(np.float32)
        elif contract == "x":   # fma(c0, x, c1*y): one rounding of the exact c0*x + round(c1*y)
            s = (c0.astype(np.float64) * x + (c1 * y).astype(np.float32)).astype(np.float32)
        else:                   # fma(c1, y, c0*x)
            s = (c1.astype(np.float64) * y + (c0 * x).astype(np.float32)).astype(np.float32)
        s = (s + c2).astype(np.float32)
        return np.floor((s + np.float32(0.5)).astype(np.float32)).astype(np.int64)

    sx, sy = coord(a[:, 0], a[:, 1], a[:, 2]), coord(a[:, 3], a[:, 4], a[:, 5])
    return torch.from_numpy(sy), torch.from_numpy(sx)


@pytest.mark.parametrize("size", list(REAL_SIZES), ids=str)
def test_kernel_index_math_equals_reference_at_real_sizes(size):
    """Without FP contraction (the kernel is launched with enable_fp_fusion=False, the C++ op is
    built without FMA), the kernel's op sequence picks the reference's source for every pixel of
    every frame, for every benchmark camera. The contracted sequence does not, which is why the
    kernel must not be contracted."""
    frames, height, width = REAL_SIZES[size]
    contracted_differs = 0
    for name, cam in BENCH_CAMERAS.items():
        inv = cam.inverse_affines(frames, height, width)
        ref_y, ref_x, _ = source_positions(inv, height, width)
        sy, sx = _kernel_positions(inv, height, width)
        assert torch.equal(sy, ref_y) and torch.equal(sx, ref_x), name
        for order in ("x", "y"):
            cy, cx = _kernel_positions(inv, height, width, contract=order)
            contracted_differs += int(((cy != ref_y) | (cx != ref_x)).sum())
    if size != "AnimateDiff":
        assert contracted_differs > 0, "the contracted formula should differ somewhere at this size"


def test_kernel_compiles_without_fma_in_the_index_math():
    """sm_90 AOT compile (subprocess: this process runs Triton's interpreter): the PTX of the
    permutation kernel holds no fused multiply-add."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import gpu_compile_check as g, triton, torch, lightmotion_fast as lm\n"
        "from triton.compiler import ASTSource\n"
        "g.install_gpu_view()\n"
        "with lm.backend('triton'):\n"
        "    lm.latent_permute(torch.randn(1, 2, 3, 9, 11, dtype=torch.float16), lm.CameraMotion(zoom=0.2, rotate=5))\n"
        "rec = g.RECORDER.records[-1]\n"
        "src = ASTSource(fn=rec['fn'], signature=rec['signature'], constexprs=rec['constexprs'], attrs=rec['attrs'])\n"
        "ptx = triton.compile(src, target=g.TARGET, options=rec['options'].__dict__).asm['ptx']\n"
        "print('FMA', ptx.count('fma.rn.f32'), 'MUL', ptx.count('mul.f32') + ptx.count('mul.rn.f32'))\n"
    ) % str(Path(__file__).parent)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = res.stdout.split()
    assert counts[0] == "FMA" and int(counts[1]) == 0, res.stdout
    assert int(counts[3]) >= 4, "the products are still there, as separate multiplies"


def test_compiles_fullgraph_through_the_public_function():
    cam = lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)
    z = torch.randn(1, 2, 3, 6, 8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda z: lm.latent_permute(z, cam), fullgraph=True, backend="aot_eager")
    (out, exposed), (ref, ref_exposed) = compiled(z), lm.latent_permute(z, cam)
    assert torch.equal(out, ref) and torch.equal(exposed, ref_exposed)
