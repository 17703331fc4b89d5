"""torch.compile(fullgraph=True) through every public op function, not only through the custom ops.

A public function that reads tensor values back on the host (a range or NaN check with `.item()`,
`bool(t.any())`, `.tolist()`) cannot be traced into one graph; these tests compile each one on small
CPU inputs with the PyTorch reference implementation and compare against the eager call.
(aot_eager: Dynamo's whole-graph capture plus AOT autograd, without inductor's slow C++ codegen;
the ops run through their registered fake kernels during tracing either way.)
"""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.ops.snr_reinject import ddim_coefficients


def _generator():
    return torch.Generator().manual_seed(0)


def _latent_permute():
    z = torch.randn(1, 3, 4, 6, 7, generator=_generator())
    cam = lm.CameraMotion(pan=(0.25, -0.1), zoom=0.1, rotate=5.0)
    return (lambda z: lm.latent_permute(z, cam)), (z,)


def _latent_permute_affine():
    z = torch.randn(1, 3, 4, 6, 7, generator=_generator())
    inv = lm.CameraMotion(pan=(0.2, 0.1)).inverse_affines(4, 6, 7).clone()
    return (lambda z, inv: lm.latent_permute_affine(z, inv)), (z, inv)


def _latent_resample():
    z = torch.randn(1, 3, 4, 6, 7, generator=_generator())
    fill = lm.build_fill_map(lm.CameraMotion(pan=(0.25, 0.0)), 4, 6, 7, seed=0)
    return (lambda z, fill: lm.latent_resample(z, fill)), (z, fill)


def _snr_reinject():
    g = _generator()
    x, m = torch.randn(1, 2, 3, 4, 5, generator=g), torch.randn(1, 2, 3, 4, 5, generator=g)
    coeffs = ddim_coefficients(0.4, 0.55, 1.0)
    return (lambda x, m: lm.snr_reinject(x, m, coeffs, seed=3, offset=10)), (x, m)


def _snr_noise():
    like = torch.empty(2, 3, 5)
    return (lambda like: lm.snr_noise(like, seed=1, offset=2)), (like,)


def _trajectory_attention():
    g = _generator()
    frames, pixels, n = 3, 12, 10
    q, k, v = (torch.randn(1, pixels, frames, 2, 8, generator=g) for _ in range(3))
    idx = torch.randint(0, pixels, (frames, n), generator=g)
    valid = torch.rand(frames, n, generator=g) > 0.2
    return (lambda q, k, v, idx, valid: lm.trajectory_attention(q, k, v, idx, valid)), (q, k, v, idx, valid)


def _multi_lora_linear(norm):
    def case():
        g = _generator()
        x, w, b = torch.randn(2, 5, 16, generator=g), torch.randn(12, 16, generator=g), torch.randn(12, generator=g)
        a = [torch.randn(4, 16, generator=g), torch.randn(2, 16, generator=g)]
        up = [torch.randn(12, 4, generator=g), torch.randn(12, 2, generator=g)]
        return (lambda x, a0, a1, b0, b1: lm.multi_lora_linear(x, w, b, [a0, a1], [b0, b1], [1.0, 0.5], norm=norm)), (
            x, *a, *up)
    return case


def _plucker_embedding():
    k = torch.tensor([40.0, 44.0, 6.0, 5.0]).expand(2, 3, 4).contiguous()
    pose = torch.eye(4).repeat(2, 3, 1, 1)
    pose[:, :, :3, 3] = torch.randn(2, 3, 3, generator=_generator())
    return (lambda k, pose: lm.plucker_embedding(k, pose, 5, 7, relative=True)), (k, pose)


def _dual_cross_attention():
    g = _generator()
    q = torch.randn(1, 2, 5, 8, generator=g)
    keys = [torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)]
    values = [torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)]
    mask = torch.rand(1, 1, 5, 6, generator=g) > 0.3
    return (lambda q, k0, k1, v0, v1, mask: lm.dual_cross_attention(q, [k0, k1], [v0, v1], scales=[1.0, 0.6],
                                                                    mask=mask)), (q, *keys, *values, mask)


def _reference_attention():
    g = _generator()
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    k_ref, v_ref = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(2))
    return (lambda *t: lm.reference_attention(*t)), (q, k, v, k_ref, v_ref)


CASES = {
    "latent_permute": _latent_permute,
    "latent_permute_affine": _latent_permute_affine,
    "latent_resample": _latent_resample,
    "snr_reinject": _snr_reinject,
    "snr_noise": _snr_noise,
    "trajectory_attention": _trajectory_attention,
    "multi_lora_linear_none": _multi_lora_linear("none"),
    "multi_lora_linear_weight": _multi_lora_linear("weight"),
    "multi_lora_linear_output": _multi_lora_linear("output"),
    "plucker_embedding": _plucker_embedding,
    "dual_cross_attention": _dual_cross_attention,
    "reference_attention": _reference_attention,
}


def _assert_same(got, want):
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)


# Every op with the PyTorch reference; the ops with a C++ kernel (latent_permute) with it as well.
PARAMS = [(name, "reference") for name in sorted(CASES)] + [(name, "cpp") for name in ("latent_permute",
                                                                                      "latent_permute_affine")]


@pytest.mark.parametrize("name,impl", PARAMS)
def test_public_op_compiles_fullgraph(name, impl):
    if impl == "cpp" and not lm.extension_available():
        pytest.fail("the C++ extension is not loaded: build it (pip install --no-build-isolation -e .)")
    fn, args = CASES[name]()
    torch._dynamo.reset()
    with lm.backend(impl):
        want = fn(*args)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    _assert_same(got, want)


def test_plucker_validate_true_is_refused_inside_compile():
    """validate=True is a host read-back: inside a compiled graph it is an error, not a silent skip."""
    fn, args = _plucker_embedding()
    torch._dynamo.reset()
    compiled = torch.compile(lambda k, p: lm.plucker_embedding(k, p, 5, 7, validate=True), fullgraph=True,
                             backend="aot_eager")
    with lm.backend("reference"), pytest.raises(Exception, match="validate=True reads the cameras back"):
        compiled(*args)
