"""multi_lora_linear's backward on the Triton path: dx = g W + dz A_cat is one expand launch on
transposed operands (W as the base weight's transpose, A_catᵀ as the LoRA factor), equal to the
float64 reference for every normalisation; the backward runs on the backend the forward ran on."""
import pytest
import torch

import lightmotion_fast
from lightmotion_fast.ops import _common
from lightmotion_fast.ops.multi_lora import multi_lora_linear
from lightmotion_fast.reference.multi_lora import NORMS, multi_lora_linear_reference
from lm_testing import TensorOutputs
from test_multi_lora import assert_close_rel


def _inputs(m, d_in, d_out, ranks, dtype, device):
    g = torch.Generator().manual_seed(3)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype).requires_grad_()  # noqa: E731
    return (r(m, d_in), r(d_out, d_in, scale=0.2), r(d_out), [r(k, d_in, scale=0.3) for k in ranks],
            [r(d_out, k, scale=0.3) for k in ranks], [1.0, 0.7, 1.3][:len(ranks)])


def _count_expand(monkeypatch):
    kernel = _common.kernel_module("multi_lora")
    calls = []
    real = kernel.multi_lora_expand_launch
    monkeypatch.setattr(kernel, "multi_lora_expand_launch", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    return calls


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("ranks", [[8], [4, 16], [4, 8, 12]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_x_is_one_expand_launch_equal_to_reference(norm, ranks, dtype, device, monkeypatch):
    x, w, b, a, bb, scales = _inputs(21, 24, 40, ranks, dtype, device)
    calls = _count_expand(monkeypatch)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    dx = torch.autograd.grad(y, x, g)[0]   # outside the backend context: it follows the forward
    assert calls == [w.shape, w.T.shape]   # the forward's expand, then dx's over [W ; A_cat]
    f64 = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    xs = f64(x)
    ref = multi_lora_linear_reference(xs, f64(w), f64(b), [f64(t) for t in a], [f64(t) for t in bb], scales,
                                      norm=norm)
    want = torch.autograd.grad(ref, xs, g.double())[0]
    assert torch.isfinite(dx).all()
    assert_close_rel(dx, want, dtype, f"dx norm={norm} ranks={ranks}")


def test_reference_backend_backward_keeps_torch_gemms(device, monkeypatch):
    x, w, b, a, bb, scales = _inputs(9, 16, 24, [4, 8], torch.float32, device)
    calls = _count_expand(monkeypatch)
    with lightmotion_fast.backend("reference"):
        y = multi_lora_linear(x, w, b, a, bb, scales)
    y.sum().backward()
    assert calls == [] and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("norm", ["none", "weight"])
@pytest.mark.parametrize("separate", [False, True])
def test_16bit_backward_keeps_rank_space_tensors_in_the_input_dtype(norm, separate):
    """Without the `output` norms the backward's [M, R] tensors (z, g B_cat, dz) stay bf16: no fp32
    copy of any is made (each such round trip was a pass over M·R elements that gave back the same
    values)."""
    m, d, ranks = 40, 32, (8, 16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, d, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(d, d, generator=g).to(torch.bfloat16)
    lora_a = [torch.randn(r, d, generator=g).to(torch.bfloat16).requires_grad_() for r in ranks]
    lora_b = [torch.randn(d, r, generator=g).to(torch.bfloat16).requires_grad_() for r in ranks]
    y = multi_lora_linear(x, w, None, lora_a, lora_b, [1.0, 0.5], norm=norm, separate=separate)
    grad = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    with TensorOutputs() as outputs:
        y.backward(grad)
    rank_total = 32  # both ranks padded to the rank tile of 16
    assert outputs.of((m, rank_total))  # the check sees the [M, R] tensors
    assert not outputs.of((m, rank_total), torch.float32)
    want = [t.detach().double().requires_grad_() for t in (x, *lora_a, *lora_b)]
    multi_lora_linear_reference(want[0], w.double(), None, want[1:3], want[3:], [1.0, 0.5], norm=norm,
                                separate=separate).backward(grad.double())
    for got, ref in zip((x, *lora_a, *lora_b), want):
        assert_close_rel(got.grad, ref.grad, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_output_norm_backward_runs_its_rank_space_products_in_the_input_dtype(dtype):
    """The `output` norms' gradient through nᵢ has two products over all M tokens per LoRA, (z q) G and
    zᵀ(z q) with G = BᵀB (r × r): in 16-bit the PyTorch branch (the op's path where the kernels do not
    apply, e.g. ranks above 256) runs them as the input dtype's GEMM (tensor cores on a GPU), not an fp32
    one (FMA units), and so do G and B (zᵀ z q) (no matrix product of the backward is fp32); the
    gradients still hold against float64. (The Triton path forms z G in its dz kernel: see
    test_output_norm_backward_is_two_fused_passes_equal_to_reference.)"""
    m, d, ranks = 40, 32, (16, 16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(m, d, generator=g).to(dtype).requires_grad_()
    w = torch.randn(d, d, generator=g).to(dtype)
    lora_a = [torch.randn(r, d, generator=g).to(dtype).requires_grad_() for r in ranks]
    lora_b = [torch.randn(d, r, generator=g).to(dtype).requires_grad_() for r in ranks]
    with lightmotion_fast.backend("reference"):
        y = multi_lora_linear(x, w, None, lora_a, lora_b, [1.0, 0.5], norm="output")
    grad = torch.randn(y.shape, generator=g).to(dtype)
    with TensorOutputs() as outputs:
        y.backward(grad)
    products = [s for s in outputs.seen if s[0] in ("mm", "matmul", "addmm", "bmm")]
    assert [s for s in products if s[1] == (m, ranks[0])], products
    assert all(s[2] == dtype for s in products), products
    want = [t.detach().double().requires_grad_() for t in (x, *lora_a, *lora_b)]
    multi_lora_linear_reference(want[0], w.double(), None, want[1:3], want[3:], [1.0, 0.5],
                                norm="output").backward(grad.double())
    for got, ref in zip((x, *lora_a, *lora_b), want):
        assert_close_rel(got.grad, ref.grad, dtype, "output-norm gradient")


def _count_output_bwd(monkeypatch):
    kernel = _common.kernel_module("multi_lora")
    calls = []
    for name in ("multi_lora_output_bwd_scale_launch", "multi_lora_output_bwd_dz_launch"):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm,lead,separate", [("output_per_token", (21,), False), ("output", (21,), False),
                                                ("output", (3, 7), False), ("output", (3, 7), True)],
                         ids=["per_token", "output_2d", "per_sample", "per_sample_separate"])
def test_output_norm_backward_is_two_fused_passes_equal_to_reference(norm, lead, separate, dtype, device,
                                                                     monkeypatch, poisoned):
    """On the Triton path the `output` norms' [M, R] elementwise backward is two kernel passes (zs and the
    per-row sums, then dz and q z), with every buffer poisoned beforehand; every gradient (x, each Aᵢ,
    each Bᵢ) equals the float64 reference, per token, per sample and with separate outputs; in 16 bits no
    fp32 [M, R] tensor is made."""
    ranks = [4, 16, 12]
    m = 1
    for n in lead:
        m *= n
    x2, w, b, a, bb, scales = _inputs(m, 24, 40, ranks, dtype, device)
    x = x2.detach().reshape(*lead, 24).requires_grad_()
    calls = _count_output_bwd(monkeypatch)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm, separate=separate)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    with TensorOutputs() as outputs:
        got = torch.autograd.grad(y, [x, *a, *bb], grad)
    assert calls == ["multi_lora_output_bwd_scale_launch", "multi_lora_output_bwd_dz_launch"]
    if dtype != torch.float32:
        assert not outputs.of((m, 48), torch.float32), "an fp32 copy of an [M, R] tensor"  # R: 3 ranks padded to 16
        products = [s for s in outputs.seen if s[0] in ("mm", "matmul", "addmm", "bmm")]
        assert products and all(s[2] == dtype for s in products), products   # tensor cores only
    f64 = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    want_in = [f64(t) for t in (x, *a, *bb)]
    ref = multi_lora_linear_reference(want_in[0], f64(w), f64(b), want_in[1:4], want_in[4:], scales, norm=norm,
                                      separate=separate)
    want = torch.autograd.grad(ref, want_in, grad.double())
    for name, g_got, g_want in zip(["x", "A0", "A1", "A2", "B0", "B1", "B2"], got, want):
        assert torch.isfinite(g_got).all(), name
        assert_close_rel(g_got, g_want, dtype, f"d{name} norm={norm} lead={lead} separate={separate}")


@pytest.mark.parametrize("groups", [1, 3, 12])
def test_output_bwd_kernels_match_their_formulas(groups, device):
    """The two passes against their formulas on random data (outputs NaN-filled beforehand): zs = ρ z,
    psᵢ = Σ hbᵢ zᵢ per row, dz = ρ hb + q (zᵢ Gᵢ), zq = q z, with ρᵢ = α/(nᵢ+ε) and α = meanⱼ nⱼ of each
    row's group (M/groups consecutive rows); two LoRAs of padded rank 32 walked in 16-wide rank tiles, so
    the in-kernel zᵢ Gᵢ sums over two chunks into each of two column chunks (a random, non-symmetric Gᵢ:
    a transposed tile would show)."""
    kernel = _common.kernel_module("multi_lora")
    gen = torch.Generator().manual_seed(7)
    m, offsets, eps, tile = 36, [0, 32, 64], 1e-3, 16
    r = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    z, hb = (r(m, 64).to(torch.bfloat16) for _ in range(2))
    gram = r(64, 32).to(torch.bfloat16)
    norms, q = r(groups, 2).abs(), r(groups, 2)
    off = torch.tensor(offsets, dtype=torch.int32, device=device)
    zs, dz, zq = (torch.full_like(z, float("nan")) for _ in range(3))
    ps = torch.full((m, 2), float("nan"), device=device)
    kernel.multi_lora_output_bwd_scale_launch(z, hb, norms, off, eps, tile, zs, ps)
    kernel.multi_lora_output_bwd_dz_launch(z, hb, gram, norms, q, off, eps, tile, dz, zq)
    rows = torch.arange(m, device=device) // (m // groups)
    rho = (norms.mean(1, keepdim=True) / (norms + eps))[rows].repeat_interleave(32, dim=1)
    qr = q[rows].repeat_interleave(32, dim=1)
    zf, hf = z.double(), hb.double()
    gf = torch.cat([zf[:, lo:lo + 32] @ gram[lo:lo + 32].double() for lo in offsets[:-1]], dim=1)
    want_ps = (hf * zf).reshape(m, 2, 32).sum(-1)
    torch.testing.assert_close(ps.double(), want_ps, rtol=1e-5, atol=1e-4)
    for got, want in ((zs, zf * rho), (dz, hf * rho + gf * qr), (zq, zf * qr)):
        torch.testing.assert_close(got.double(), want.to(torch.bfloat16).double(), rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("frozen", ["all", "a1_only", "b_only"])
def test_frozen_loras_get_no_gradient_and_cost_no_token_long_product(norm, frozen, device):
    """Adapters that do not require gradients (training the base, the scaling tokens or one adapter of
    several) get None, and their token-long products are not run: no dA_cat = dzᵀ x ([R, d_in]) when no Aᵢ
    wants a gradient, no dB_cat' = gᵀ zs ([d_out, R]) when no Bᵢ (nor, for `weight`, an Aᵢ through the
    norms) does. What is asked for still equals the float64 reference."""
    ranks, (m, d_in, d_out) = [4, 16, 12], (15, 24, 40)
    x, w, b, a, bb, scales = _inputs(m, d_in, d_out, ranks, torch.float32, device)
    want_a = {"all": [False] * 3, "a1_only": [False, True, False], "b_only": [False] * 3}[frozen]
    want_b = {"all": [False] * 3, "a1_only": [False] * 3, "b_only": [True] * 3}[frozen]
    for t, need in zip([*a, *bb], want_a + want_b):
        t.requires_grad_(need)
    y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).to(device)
    leaves = [x, *(t for t in [*a, *bb] if t.requires_grad)]
    with TensorOutputs() as outputs:
        y.backward(grad)
    rank_total = 48
    assert bool(outputs.of((rank_total, d_in))) == any(want_a), "dA_cat = dzᵀ x"
    uses_db = any(want_b) or (norm == "weight" and any(want_a))
    assert bool(outputs.of((d_out, rank_total))) == uses_db, "dB_cat' = gᵀ zs"
    for t, need in zip([*a, *bb], want_a + want_b):
        assert (t.grad is not None) == need
    f64 = lambda t: t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    ref_in = [f64(t) for t in (x, *a, *bb)]
    ref = multi_lora_linear_reference(ref_in[0], w.detach().double(), b.detach().double(), ref_in[1:4], ref_in[4:],
                                      scales, norm=norm)
    ref.backward(grad.double())
    for got, want in zip(leaves, [t for t in ref_in if t.requires_grad]):
        assert_close_rel(got.grad, want.grad, torch.float32, f"norm={norm} frozen={frozen}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_weight_norm_backward_runs_its_products_in_the_input_dtype(dtype):
    """The `weight` norms' terms ∂N/∂Aᵢ ∝ (BᵢᵀBᵢ)Aᵢ and ∂N/∂Bᵢ ∝ Bᵢ(AᵢAᵢᵀ) are four r×d-long products per
    LoRA: in 16-bit the input dtype's GEMMs (tensor cores on a GPU) on the weights as they are, never fp32
    ones; the gradients hold against float64 (the norms' own gradient sums ⟨Bᵢ, dBᵢ⟩ stay fp32)."""
    m, d, ranks = 24, 32, (16, 8)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(m, d, generator=g).to(dtype).requires_grad_()
    w = torch.randn(d, d, generator=g).to(dtype)
    lora_a = [torch.randn(r, d, generator=g).to(dtype).requires_grad_() for r in ranks]
    lora_b = [(torch.randn(d, r, generator=g) * 0.5).to(dtype).requires_grad_() for r in ranks]
    y = multi_lora_linear(x, w, None, lora_a, lora_b, [1.0, 0.5], norm="weight", lora_scaling=[2.0, 0.5])
    grad = torch.randn(y.shape, generator=g).to(dtype)
    with TensorOutputs() as outputs:
        y.backward(grad)
    products = [s for s in outputs.seen if s[0] in ("mm", "matmul", "addmm", "bmm")]
    assert products and all(s[2] == dtype for s in products), products
    for r in ranks:
        assert outputs.of((r, r), dtype) and not outputs.of((r, r), torch.float32)    # the Grams
        assert not outputs.of((r, d), torch.float32)   # no fp32 copy of Aᵢ
    want = [t.detach().double().requires_grad_() for t in (x, *lora_a, *lora_b)]
    multi_lora_linear_reference(want[0], w.double(), None, want[1:3], want[3:], [1.0, 0.5], norm="weight",
                                lora_scaling=[2.0, 0.5]).backward(grad.double())
    for got, ref in zip((x, *lora_a, *lora_b), want):
        assert_close_rel(got.grad, ref.grad, dtype, "weight-norm gradient")
