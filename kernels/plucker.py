"""Triton kernel for Plücker ray embeddings (specs/motionflow.md).

One launch, one pass over the output. A program owns BLOCK pixels of one (batch, frame): it loads
that frame's intrinsics and pose as scalars, forms M = R · K⁻¹ and the camera centre t in registers
(K⁻¹ analytically, the relative pose as the inverse of frame 0 times frame f), then for each
pixel computes d = normalize(M · [u + .5, v + .5, 1]), the moment t × d, and stores the six channels.
Nothing but the output touches memory, so the kernel runs at the store bandwidth. The output is
addressed through strides: [b f 6 h w] and [b 6 f h w] are the same kernel. Arithmetic is in float32,
or in float64 when the poses are float64 (as in the reference).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _load3x3(ptr, s_r, s_c, ACC: tl.constexpr):
    a00 = tl.load(ptr).to(ACC)
    a01 = tl.load(ptr + s_c).to(ACC)
    a02 = tl.load(ptr + 2 * s_c).to(ACC)
    a10 = tl.load(ptr + s_r).to(ACC)
    a11 = tl.load(ptr + s_r + s_c).to(ACC)
    a12 = tl.load(ptr + s_r + 2 * s_c).to(ACC)
    a20 = tl.load(ptr + 2 * s_r).to(ACC)
    a21 = tl.load(ptr + 2 * s_r + s_c).to(ACC)
    a22 = tl.load(ptr + 2 * s_r + 2 * s_c).to(ACC)
    return a00, a01, a02, a10, a11, a12, a20, a21, a22


@triton.jit
def _inv3x3(a00, a01, a02, a10, a11, a12, a20, a21, a22):
    """The inverse of a 3×3 matrix given as nine scalars (row-major), by cofactors."""
    c00 = a11 * a22 - a12 * a21
    c01 = a12 * a20 - a10 * a22
    c02 = a10 * a21 - a11 * a20
    inv_det = 1.0 / (a00 * c00 + a01 * c01 + a02 * c02)
    return (c00 * inv_det, (a02 * a21 - a01 * a22) * inv_det, (a01 * a12 - a02 * a11) * inv_det,
            c01 * inv_det, (a00 * a22 - a02 * a20) * inv_det, (a02 * a10 - a00 * a12) * inv_det,
            c02 * inv_det, (a01 * a20 - a00 * a21) * inv_det, (a00 * a11 - a01 * a10) * inv_det)


@triton.jit
def _plucker_kernel(
    k_ptr, pose_ptr, out_ptr,
    frames, height, width,
    sk_b, sk_f, sk_r, sk_c,
    sp_b, sp_f, sp_r, sp_c,
    so_b, so_f, so_c, so_h, so_w,
    K_IS_VECTOR: tl.constexpr, RELATIVE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    pid_hw = tl.program_id(0)
    bf = tl.program_id(1)
    b = (bf // frames).to(tl.int64)
    f = (bf % frames).to(tl.int64)

    # K⁻¹ as nine scalars.
    kp = k_ptr + b * sk_b + f * sk_f
    if K_IS_VECTOR:
        fx = tl.load(kp).to(ACC)
        fy = tl.load(kp + sk_c).to(ACC)
        cx = tl.load(kp + 2 * sk_c).to(ACC)
        cy = tl.load(kp + 3 * sk_c).to(ACC)
        i00 = 1.0 / fx
        i11 = 1.0 / fy
        i02 = -cx * i00
        i12 = -cy * i11
        i01 = 0.0
        i10 = 0.0
        i20 = 0.0
        i21 = 0.0
        i22 = 1.0
    else:
        k00, k01, k02, k10, k11, k12, k20, k21, k22 = _load3x3(kp, sk_r, sk_c, ACC)
        i00, i01, i02, i10, i11, i12, i20, i21, i22 = _inv3x3(k00, k01, k02, k10, k11, k12, k20, k21, k22)

    # Pose [R | t], relative to frame 0 if asked: c2w_0⁻¹ c2w_f = [R0⁻¹ R_f | R0⁻¹ (t_f − t0)]. R0⁻¹ is the
    # true inverse (as the reference's), not R0ᵀ: the two differ for the slightly non-orthonormal poses
    # that validation accepts (|RᵀR − I| ≤ 1e-3).
    pp = pose_ptr + b * sp_b + f * sp_f
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = _load3x3(pp, sp_r, sp_c, ACC)
    tx = tl.load(pp + 3 * sp_c).to(ACC)
    ty = tl.load(pp + sp_r + 3 * sp_c).to(ACC)
    tz = tl.load(pp + 2 * sp_r + 3 * sp_c).to(ACC)
    if RELATIVE:
        p0 = pose_ptr + b * sp_b
        q00, q01, q02, q10, q11, q12, q20, q21, q22 = _inv3x3(*_load3x3(p0, sp_r, sp_c, ACC))
        dx0 = tx - tl.load(p0 + 3 * sp_c).to(ACC)
        dy0 = ty - tl.load(p0 + sp_r + 3 * sp_c).to(ACC)
        dz0 = tz - tl.load(p0 + 2 * sp_r + 3 * sp_c).to(ACC)
        tx = q00 * dx0 + q01 * dy0 + q02 * dz0
        ty = q10 * dx0 + q11 * dy0 + q12 * dz0
        tz = q20 * dx0 + q21 * dy0 + q22 * dz0
        n00 = q00 * r00 + q01 * r10 + q02 * r20
        n01 = q00 * r01 + q01 * r11 + q02 * r21
        n02 = q00 * r02 + q01 * r12 + q02 * r22
        n10 = q10 * r00 + q11 * r10 + q12 * r20
        n11 = q10 * r01 + q11 * r11 + q12 * r21
        n12 = q10 * r02 + q11 * r12 + q12 * r22
        n20 = q20 * r00 + q21 * r10 + q22 * r20
        n21 = q20 * r01 + q21 * r11 + q22 * r21
        n22 = q20 * r02 + q21 * r12 + q22 * r22
        r00, r01, r02, r10, r11, r12, r20, r21, r22 = n00, n01, n02, n10, n11, n12, n20, n21, n22

    # M = R · K⁻¹
    m00 = r00 * i00 + r01 * i10 + r02 * i20
    m01 = r00 * i01 + r01 * i11 + r02 * i21
    m02 = r00 * i02 + r01 * i12 + r02 * i22
    m10 = r10 * i00 + r11 * i10 + r12 * i20
    m11 = r10 * i01 + r11 * i11 + r12 * i21
    m12 = r10 * i02 + r11 * i12 + r12 * i22
    m20 = r20 * i00 + r21 * i10 + r22 * i20
    m21 = r20 * i01 + r21 * i11 + r22 * i21
    m22 = r20 * i02 + r21 * i12 + r22 * i22

    offs = pid_hw * BLOCK + tl.arange(0, BLOCK)
    inside = offs < height * width
    v = offs // width
    u = offs - v * width
    x = u.to(ACC) + 0.5
    y = v.to(ACC) + 0.5
    dx = m00 * x + m01 * y + m02
    dy = m10 * x + m11 * y + m12
    dz = m20 * x + m21 * y + m22
    inv_norm = 1.0 / tl.sqrt(dx * dx + dy * dy + dz * dz)
    dx = dx * inv_norm
    dy = dy * inv_norm
    dz = dz * inv_norm

    dst = out_ptr + b * so_b + f * so_f + v.to(tl.int64) * so_h + u.to(tl.int64) * so_w
    out_ty = out_ptr.dtype.element_ty
    tl.store(dst, (ty * dz - tz * dy).to(out_ty), mask=inside)
    tl.store(dst + so_c, (tz * dx - tx * dz).to(out_ty), mask=inside)
    tl.store(dst + 2 * so_c, (tx * dy - ty * dx).to(out_ty), mask=inside)
    tl.store(dst + 3 * so_c, dx.to(out_ty), mask=inside)
    tl.store(dst + 4 * so_c, dy.to(out_ty), mask=inside)
    tl.store(dst + 5 * so_c, dz.to(out_ty), mask=inside)


def plucker_launch(intrinsics: torch.Tensor, c2w: torch.Tensor, out: torch.Tensor, relative: bool) -> None:
    """intrinsics: [b f 4] or [b f 3 3]; c2w: [b f 4 4]; out: a [b f 6 h w] view (any strides).
    Writes out, computing in float64 when c2w is float64, else in float32."""
    batch, frames = c2w.shape[:2]
    height, width = out.shape[3], out.shape[4]
    hw = height * width
    block = min(1024, triton.next_power_of_2(hw))
    k_is_vector = intrinsics.ndim == 3
    if k_is_vector:
        sk = (intrinsics.stride(0), intrinsics.stride(1), 0, intrinsics.stride(2))
    else:
        sk = intrinsics.stride()
    grid = (triton.cdiv(hw, block), batch * frames)
    _plucker_kernel[grid](
        intrinsics, c2w, out,
        frames, height, width,
        *sk, *c2w.stride(), *out.stride(),
        K_IS_VECTOR=k_is_vector, RELATIVE=relative, BLOCK=block,
        ACC=tl.float64 if c2w.dtype == torch.float64 else tl.float32,
        num_warps=4 if block >= 512 else 2,
    )
