"""plucker_embedding: Triton kernel (interpreter on CPU) against the float64 reference, known answers,
both layouts and both intrinsics forms, and the input checks."""
import math

import pytest
import torch

import lightmotion_fast
from lightmotion_fast.reference.plucker import plucker_embedding_reference
from tests.conftest import TOLERANCES


def random_rotations(n: int, generator=None) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, dtype=torch.float64, generator=generator))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.linalg.det(q)
    q[:, :, 0] *= det.unsqueeze(-1)  # proper rotations (det +1)
    return q


def random_cameras(batch, frames, height, width, matrix_k=False):
    pose = torch.eye(4, dtype=torch.float64).repeat(batch, frames, 1, 1)
    pose[:, :, :3, :3] = random_rotations(batch * frames).reshape(batch, frames, 3, 3)
    pose[:, :, :3, 3] = torch.randn(batch, frames, 3, dtype=torch.float64) * 2
    k = torch.stack([torch.rand(batch, frames, dtype=torch.float64) * width + width,
                     torch.rand(batch, frames, dtype=torch.float64) * height + height,
                     torch.full((batch, frames), width / 2, dtype=torch.float64) + 0.3,
                     torch.full((batch, frames), height / 2, dtype=torch.float64) - 0.2], -1)
    if matrix_k:
        km = torch.zeros(batch, frames, 3, 3, dtype=torch.float64)
        km[..., 0, 0], km[..., 1, 1], km[..., 0, 2], km[..., 1, 2], km[..., 2, 2] = k[..., 0], k[..., 1], k[..., 2], k[..., 3], 1
        km[..., 0, 1] = 0.7  # a little skew: the general 3x3 inverse is exercised
        k = km
    return k, pose


@pytest.mark.parametrize("batch,frames,height,width", [(1, 1, 1, 1), (3, 2, 5, 7), (2, 3, 9, 4), (3, 3, 6, 33)])
@pytest.mark.parametrize("matrix_k", [False, True])
@pytest.mark.parametrize("relative", [False, True])
def test_kernel_matches_float64_reference(device, poisoned, batch, frames, height, width, matrix_k, relative):
    k, pose = random_cameras(batch, frames, height, width, matrix_k)
    want = plucker_embedding_reference(k, pose, height, width, relative=relative)
    with lightmotion_fast.backend("triton"):
        got = lightmotion_fast.plucker_embedding(k.float().to(device), pose.float().to(device), height, width,
                                                 relative=relative)
    assert got.shape == (batch, frames, 6, height, width) and got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-5 * (1 + want.abs().amax().item()), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_channels_first(device, poisoned, dtype):
    k, pose = random_cameras(2, 3, 5, 6)
    want = plucker_embedding_reference(k, pose, 5, 6, channels_first=True)
    with lightmotion_fast.backend("triton"):
        got = lightmotion_fast.plucker_embedding(k.to(device, dtype), pose.to(device, dtype), 5, 6,
                                                 channels_first=True, validate=dtype == torch.float32)
    assert got.shape == (2, 6, 3, 5, 6) and got.dtype == dtype
    # Low-precision inputs already round the pose, so the bound follows the input precision.
    atol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}[dtype]
    torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=TOLERANCES[dtype][1] * 4)


def test_output_dtype_argument(device, poisoned):
    k, pose = random_cameras(1, 2, 4, 4)
    with lightmotion_fast.backend("triton"):
        got = lightmotion_fast.plucker_embedding(k.float().to(device), pose.float().to(device), 4, 4,
                                                 dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double().cpu(), plucker_embedding_reference(k, pose, 4, 4), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_identity_camera_at_principal_point(device, poisoned, impl):
    # Principal point at the centre of pixel (2, 1): that pixel's ray is the optical axis.
    k = torch.tensor([[[50.0, 60.0, 2.5, 1.5]]], device=device)
    pose = torch.eye(4, device=device)[None, None]
    with lightmotion_fast.backend(impl):
        rays = lightmotion_fast.plucker_embedding(k, pose, 3, 5)
    assert torch.allclose(rays[0, 0, 3:, 1, 2].cpu(), torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    assert torch.equal(rays[0, 0, :3].cpu(), torch.zeros(3, 3, 5))  # camera at the origin: zero moment
    # x grows to the right, y downwards (OpenCV): pixel (4, 2) looks right and down.
    assert rays[0, 0, 3, 1, 4] > 0 and rays[0, 0, 4, 2, 2] > 0
    norms = rays[0, 0, 3:].norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_translated_camera_moment_is_t_cross_d(device, poisoned, impl):
    # B = F = 3: a cross product over the first axis of size 3 would mix batches or frames here.
    k, pose = random_cameras(3, 3, 4, 5)
    pose = pose.float().to(device)
    with lightmotion_fast.backend(impl):
        rays = lightmotion_fast.plucker_embedding(k.float().to(device), pose, 4, 5)
    t = pose[:, :, :3, 3]
    d = rays[:, :, 3:]
    expected = torch.stack([t[:, :, 1, None, None] * d[:, :, 2] - t[:, :, 2, None, None] * d[:, :, 1],
                            t[:, :, 2, None, None] * d[:, :, 0] - t[:, :, 0, None, None] * d[:, :, 2],
                            t[:, :, 0, None, None] * d[:, :, 1] - t[:, :, 1, None, None] * d[:, :, 0]], 2)
    torch.testing.assert_close(rays[:, :, :3], expected, atol=1e-5, rtol=1e-5)
    # The moment is orthogonal to the direction, and each frame differs from the others.
    assert (rays[:, :, :3] * d).sum(2).abs().max() < 1e-5
    assert not torch.allclose(rays[0, 0], rays[0, 1]) and not torch.allclose(rays[0, 0], rays[1, 0])


def test_relative_first_frame_is_identity(device, poisoned):
    k, pose = random_cameras(2, 3, 4, 4)
    with lightmotion_fast.backend("triton"):
        rays = lightmotion_fast.plucker_embedding(k.float().to(device), pose.float().to(device), 4, 4, relative=True)
    first = plucker_embedding_reference(k[:, :1], torch.eye(4, dtype=torch.float64).expand(2, 1, 4, 4), 4, 4)
    torch.testing.assert_close(rays[:, :1].double().cpu(), first, atol=1e-5, rtol=1e-5)
    # Moving every camera by one rigid transform leaves the relative embedding unchanged.
    g = torch.eye(4, dtype=torch.float64)
    g[:3, :3] = random_rotations(1)[0]
    g[:3, 3] = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    with lightmotion_fast.backend("triton"):
        moved = lightmotion_fast.plucker_embedding(k.float().to(device), (g @ pose).float().to(device), 4, 4,
                                                   relative=True)
    torch.testing.assert_close(moved, rays, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_relative_uses_the_true_inverse_of_frame_0(device, poisoned, impl):
    """Validation accepts poses a little off orthonormal (here frame 0's rotation scaled by 1.0003):
    relative=True then multiplies by c2w_0⁻¹, not by the rigid inverse [R0ᵀ | −R0ᵀt0] (the kernel used
    that and differed from the reference by 6e-3 in float64)."""
    k, pose = random_cameras(2, 3, 4, 5)
    pose[:, 0, :3, :3] *= 1.0003
    want = plucker_embedding_reference(k, pose, 4, 5, relative=True)
    with lightmotion_fast.backend(impl):
        got = lightmotion_fast.plucker_embedding(k.to(device), pose.to(device), 4, 5, relative=True)
    torch.testing.assert_close(got.cpu(), want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_rigid_poses_pass_validation(dtype):
    """A rotation rounded to bfloat16 is off orthonormal by ~4e-3: the check allows twice the dtype's
    epsilon there (it had rejected every bf16 camera that is not axis-aligned); a real shear still fails."""
    k, pose = random_cameras(1, 3, 4, 4)
    rays = lightmotion_fast.plucker_embedding(k.to(dtype), pose.to(dtype), 4, 4)
    assert rays.dtype == dtype and torch.isfinite(rays).all()
    sheared = pose.clone()
    sheared[0, 1, 0, 1] += 0.05
    with pytest.raises(ValueError, match="not a rigid camera-to-world pose"):
        lightmotion_fast.plucker_embedding(k.to(dtype), sheared.to(dtype), 4, 4)


def test_gradients_to_the_cameras_through_the_reference(device):
    """A pose or K that requires grad is differentiated (float64 gradcheck), relative and absolute; the
    same call without grad runs the kernel and gives the same values."""
    k, pose = random_cameras(1, 2, 3, 4)
    k, pose = k.to(device), pose.to(device)
    for relative in (False, True):
        fn = lambda kk, pp: lightmotion_fast.plucker_embedding(kk, pp, 3, 4, relative=relative, validate=False)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (k.clone().requires_grad_(), pose.clone().requires_grad_()))
        differentiable = fn(k, pose.clone().requires_grad_())
        assert differentiable.requires_grad
        with torch.no_grad():
            torch.testing.assert_close(differentiable.detach(), fn(k, pose), atol=1e-12, rtol=1e-12)


def test_strided_inputs(device, poisoned):
    k, pose = random_cameras(2, 4, 3, 5, matrix_k=True)
    want = plucker_embedding_reference(k[:, ::2], pose[:, ::2], 3, 5, relative=True)
    with lightmotion_fast.backend("triton"):
        got = lightmotion_fast.plucker_embedding(k.float().to(device)[:, ::2], pose.float().to(device)[:, ::2],
                                                 3, 5, relative=True)
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=1e-4)


def test_bad_inputs():
    k, pose = random_cameras(1, 2, 4, 4)
    k, pose = k.float(), pose.float()
    embed = lightmotion_fast.plucker_embedding
    with pytest.raises(ValueError, match="c2w"):
        embed(k, pose[..., :3, :], 4, 4)
    with pytest.raises(ValueError, match="intrinsics"):
        embed(k[:, :1], pose, 4, 4)
    with pytest.raises(ValueError, match="intrinsics"):
        embed(k[..., :3], pose, 4, 4)
    with pytest.raises(ValueError, match="height"):
        embed(k, pose, 0, 4)
    with pytest.raises(TypeError, match="c2w"):
        embed(k, pose.to(torch.int32), 4, 4)
    singular = k.clone()
    singular[0, 1, 0] = 0
    with pytest.raises(ValueError, match="singular"):
        embed(singular, pose, 4, 4)
    singular33 = torch.zeros(1, 2, 3, 3)
    singular33[..., 0, 0] = 1
    with pytest.raises(ValueError, match="singular"):
        embed(singular33, pose, 4, 4)
    scaled = pose.clone()
    scaled[0, 0, :3, :3] *= 1.1
    with pytest.raises(ValueError, match="rigid"):
        embed(k, scaled, 4, 4)
    mirrored = pose.clone()
    mirrored[0, 1, :3, 0] *= -1
    with pytest.raises(ValueError, match="rigid"):
        embed(k, mirrored, 4, 4)
    projective = pose.clone()
    projective[0, 0, 3, 2] = 0.5
    with pytest.raises(ValueError, match="rigid"):
        embed(k, projective, 4, 4)
    nan_pose = pose.clone()
    nan_pose[0, 1, 0, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        embed(k, nan_pose, 4, 4)
    nan_k = k.clone()
    nan_k[0, 0, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        embed(nan_k, pose, 4, 4)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("matrix_k", [False, True])
def test_float64_cameras_compute_in_float64(device, poisoned, impl, matrix_k):
    """Poses from files and numpy are float64: the public function takes them (it used to raise a
    TypeError although the op supports them) and both paths keep float64 precision."""
    k, pose = random_cameras(2, 3, 5, 7, matrix_k)
    want = plucker_embedding_reference(k, pose, 5, 7, relative=True)
    with lightmotion_fast.backend(impl):
        got = lightmotion_fast.plucker_embedding(k.to(device), pose.to(device), 5, 7, relative=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), want, atol=1e-12, rtol=1e-12)
    with lightmotion_fast.backend(impl):
        half = lightmotion_fast.plucker_embedding(k.to(device), pose.to(device), 5, 7, dtype=torch.float16)
    assert half.dtype == torch.float16


def test_integer_types_for_height_and_width():
    np = pytest.importorskip("numpy")
    k, pose = random_cameras(1, 2, 4, 6)
    with lightmotion_fast.backend("reference"):
        got = lightmotion_fast.plucker_embedding(k.float(), pose.float(), np.int64(4), np.int32(6))
    assert got.shape == (1, 2, 6, 4, 6)
    for bad in (4.0, True, "4", -1):
        with pytest.raises(ValueError, match="height"):
            lightmotion_fast.plucker_embedding(k.float(), pose.float(), bad, 6)


def test_default_validation_skips_meta_tensors_and_checks_eager_values():
    """validate=None: eager calls on real tensors are checked; meta tensors (shape propagation) have no
    values to check and pass through, where validate=True used to fail reading them."""
    k, pose = random_cameras(1, 2, 4, 4)
    meta = lightmotion_fast.plucker_embedding(k.float().to("meta"), pose.float().to("meta"), 4, 4)
    assert meta.device.type == "meta" and meta.shape == (1, 2, 6, 4, 4)
    singular = k.float().clone()
    singular[0, 0, 1] = 0
    with pytest.raises(ValueError, match="intrinsics of batch 0, frame 0 are singular"):
        lightmotion_fast.plucker_embedding(singular, pose.float(), 4, 4)
    with lightmotion_fast.backend("reference"):
        out = lightmotion_fast.plucker_embedding(singular, pose.float(), 4, 4, validate=False)
    assert not torch.isfinite(out).all()  # unchecked, as asked
    with pytest.raises(TypeError, match="validate"):
        lightmotion_fast.plucker_embedding(k.float(), pose.float(), 4, 4, validate="yes")


def test_singular_pose_names_c2w():
    k, pose = random_cameras(1, 3, 4, 4)
    pose = pose.clone()
    pose[0, 2, :3, :3] = 0  # a singular c2w: no rotation at all
    with pytest.raises(ValueError, match="c2w of batch 0, frame 2 is not a rigid"):
        lightmotion_fast.plucker_embedding(k, pose, 4, 4, relative=True)
