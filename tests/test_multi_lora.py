"""multi_lora_linear (specs/multi_lora.md): kernels against the float64 reference, forward and
backward, all four normalisations (per-sample `output` on inputs [b n d]), lora_scaling, separate outputs; the norms against their explicit definitions;
the weight cache (reuse, invalidation by in-place updates and by peft's hotswap, the byte bound);
the autotuning key and its behaviour under graph capture; CUDA-graph capture and replay (GPU);
gradcheck of the reference and of the op's hand-written backward; bad inputs.

Shapes are small and odd (M, d_in, d_out not multiples of any block) because on a CPU the kernels
run through Triton's interpreter.
"""
import warnings

import pytest
import torch
from lm_testing import ON_GPU, TensorOutputs

import lightmotion_fast
from lightmotion_fast.integrations.diffusers import lora as lora_feature
from lightmotion_fast.ops import _common
from lightmotion_fast.ops import multi_lora as ml
from lightmotion_fast.ops.multi_lora import multi_lora_linear, multi_lora_linear_op
from lightmotion_fast.reference.multi_lora import (
    multi_lora_linear_reference,
    output_delta_norms,
    weight_delta_norm,
)

# Relative to the largest output magnitude: z and y are rounded to the input dtype.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
NORMS = ("none", "weight", "output", "output_per_token")
SHAPES = [  # (M, d_in, d_out, ranks)
    (37, 40, 50, [4]),
    (29, 33, 47, [16, 8]),
    (21, 40, 35, [4, 32, 64]),
]


def make(m, d_in, d_out, ranks, dtype, device, bias=True, requires_grad=False):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(requires_grad)

    x = t(m, d_in)
    w = t(d_out, d_in, scale=max(d_in, 1) ** -0.5)
    b = t(d_out) if bias else None
    a = [t(r, d_in, scale=max(d_in, 1) ** -0.5) for r in ranks]
    bb = [t(d_out, r, scale=(0.5 + i) * r ** -0.5) for i, r in enumerate(ranks)]  # unequal norms
    scales = [1.0, 0.5, 2.0][: len(ranks)]
    return x, w, b, a, bb, scales


def f64(t):
    if t is None:
        return None
    if isinstance(t, (list, tuple)):
        return [f64(i) for i in t]
    return t.detach().double().requires_grad_(t.requires_grad)


def assert_close_rel(got, want, dtype, what=""):
    scale = want.abs().max().item() + 1e-12
    err = (got.double() - want).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{what}: max error {err:.3e} vs max |ref| {scale:.3e} ({dtype})"


# ---------------------------------------------------------------------------------------------
# forward

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-din{s[1]}-dout{s[2]}-r{'_'.join(map(str, s[3]))}")
def test_forward_matches_reference(shape, norm, dtype, device, poisoned):
    m, d_in, d_out, ranks = shape
    x, w, b, a, bb, scales = make(m, d_in, d_out, ranks, dtype, device)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
    ref = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), scales, norm=norm)
    assert y.shape == (m, d_out) and y.dtype == dtype
    assert_close_rel(y, ref, dtype, f"y norm={norm}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
def test_separate_outputs_match_reference(norm, dtype, device, poisoned):
    x, w, b, a, bb, scales = make(23, 40, 37, [8, 16, 4], dtype, device)
    x = x.reshape(1, 23, 40)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm, separate=True)
    ref = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), scales, norm=norm, separate=True)
    assert y.shape == (3, 1, 23, 37)
    assert_close_rel(y, ref, dtype, f"separate norm={norm}")
    # Each separate output carries only its own LoRA, with the coefficient normalised over all k.
    base = x.double() @ w.double().T + b.double()
    summed = base + (y.double() - base).sum(0)
    full = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), scales, norm=norm)
    assert_close_rel(summed, full, dtype, "sum of separate deltas")


@pytest.mark.parametrize("norm", ["none", "output"])
def test_rank_256_tiny_tokens(norm, device, poisoned):
    x, w, b, a, bb, scales = make(5, 24, 20, [256, 4], torch.float32, device)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
    ref = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), scales, norm=norm)
    assert_close_rel(y, ref, torch.float32, "r=256")


def test_strided_input_and_no_bias(device, poisoned):
    x, w, _, a, bb, scales = make(19, 70, 30, [8, 8], torch.float32, device)
    xs = x[:, ::2]  # d_in = 35, stride 2: the kernels take strides, no copy needed
    a = [t[:, :35].contiguous() for t in a]
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(xs, w[:, :35], None, a, bb, scales, norm="output")
    ref = multi_lora_linear_reference(f64(xs), f64(w[:, :35]), None, f64(a), f64(bb), scales, norm="output")
    assert_close_rel(y, ref, torch.float32, "strided")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("norm", NORMS)
def test_zero_input_features(norm, backend, device, poisoned):
    """d_in = 0 (x [..., 0]): every product is empty, so y is the bias on every token and the
    gradients are zero (were: a reshape error, '-1 is ambiguous')."""
    x, w, b, a, bb, scales = make(6, 0, 10, [4, 8], torch.float32, device, requires_grad=True)
    x3 = x.view(2, 3, 0)
    with lightmotion_fast.backend(backend):
        y = multi_lora_linear(x3, w, b, a, bb, scales, norm=norm)
        y.backward(torch.randn_like(y))
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y, b.detach().expand(2, 3, 10), atol=0, rtol=0)
    assert x.grad.shape == (6, 0) and w.grad.shape == (10, 0)
    for grad in [t.grad for t in bb]:
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("norm", NORMS)
def test_zero_tokens(norm, backend, device, poisoned):
    """M = 0 (x [0, d_in]): y is [0, d_out] and every gradient is zero, for every norm (`output_per_token`
    had no row groups at all: a reshape error on the torch path, a division by zero in the backward)."""
    x, w, b, a, bb, scales = make(0, 12, 10, [4, 8], torch.float32, device, requires_grad=True)
    with lightmotion_fast.backend(backend):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
        y.backward(torch.randn_like(y))
    assert y.shape == (0, 10) and x.grad.shape == (0, 12)
    for grad in [w.grad, b.grad, *(t.grad for t in a), *(t.grad for t in bb)]:
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=0, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
def test_strided_bias(norm, device, poisoned):
    """A bias view of stride 2 (and a stride-0 one): the expand kernels read the bias at unit stride, so the
    op hands them a contiguous copy (it silently read every other element of the storage)."""
    x, w, _, a, bb, scales = make(9, 24, 20, [4, 8], torch.float32, device)
    for bias in (torch.randn(40, device=device)[::2], torch.randn(1, device=device).expand(20)):
        with lightmotion_fast.backend("triton"):
            y = multi_lora_linear(x, w, bias, a, bb, scales, norm=norm)
        ref = multi_lora_linear_reference(f64(x), f64(w), f64(bias), f64(a), f64(bb), scales, norm=norm)
        assert_close_rel(y, ref, torch.float32, "strided bias")


def test_reference_backend_matches_reference(device):
    x, w, b, a, bb, scales = make(13, 20, 18, [4, 8], torch.float32, device)
    for norm in NORMS:
        with lightmotion_fast.backend("reference"):
            y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
        ref = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), scales, norm=norm)
        assert_close_rel(y, ref, torch.float32, f"torch path norm={norm}")


# ---------------------------------------------------------------------------------------------
# norms

def test_weight_scale_is_frobenius_norm_and_cached(device):
    _, _, _, a, bb, _ = make(3, 40, 50, [4, 16, 8], torch.float32, device)
    explicit = torch.stack([torch.linalg.matrix_norm(b.double() @ a_.double()) for a_, b in zip(a, bb)])
    torch.testing.assert_close(ml.weight_norms(a, bb).double(), explicit, rtol=1e-5, atol=0)
    for a_, b in zip(a, bb):
        torch.testing.assert_close(weight_delta_norm(a_.double(), b.double()),
                                   torch.linalg.matrix_norm(b.double() @ a_.double()))
    hits = ml._CACHE.hits
    ml.weight_norms(a, bb)
    assert ml._CACHE.hits == hits + 1
    with torch.no_grad():
        bb[1].mul_(3.0)  # in-place update bumps _version: the cache must notice
    torch.testing.assert_close(ml.weight_norms(a, bb)[1].double(), 3 * explicit[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_norms_are_explicit_per_token_norms(dtype, device, poisoned):
    x, w, b, a, bb, scales = make(27, 40, 50, [4, 16, 32], dtype, device)
    with lightmotion_fast.backend("triton"):
        _, z, norms = multi_lora_linear_op(x, w, b, a, bb, scales, "output_per_token", 1e-6, False, [1.0] * 3, 1)
    assert norms.shape == (27, 3) and norms.dtype == torch.float32
    for i, (a_, b_) in enumerate(zip(a, bb)):
        explicit = ((x.double() @ a_.double().T) @ b_.double().T).norm(dim=-1)
        assert_close_rel(norms[:, i], explicit, dtype, f"n_{i}")
        gram = output_delta_norms(x.double() @ a_.double().T, b_.double())
        torch.testing.assert_close(gram, explicit)


def test_zero_lora_b_gives_base_plus_others(device):
    """peft initialises B = 0: ‖BA‖ = 0 must not produce NaN in either normalisation."""
    x, w, b, a, bb, scales = make(11, 20, 18, [4, 4], torch.float32, device)
    x = x.reshape(1, 11, 20)  # one sample of 11 tokens
    bb[0] = torch.zeros_like(bb[0])
    for norm in ("weight", "output", "output_per_token"):
        with lightmotion_fast.backend("triton"):
            y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
        ref = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), scales, norm=norm)
        assert torch.isfinite(y).all()
        assert_close_rel(y, ref, torch.float32, norm)


# ---------------------------------------------------------------------------------------------
# the weight cache

def _fresh_pack(a, bb):
    return ml._CACHE.entries[ml._CACHE._key([*a, *bb])]


def test_rank_layout_pads_each_rank_to_the_tile(device):
    layout = ml.rank_layout((4, 32, 64))
    assert layout.rank_tile == 64 and layout.padded == (64, 64, 64) and layout.offsets == (0, 64, 128, 192)
    assert layout.spans() == [(0, 4), (64, 96), (128, 192)] and layout.norm_block == 64
    assert ml.rank_layout((8, 8)).padded == (16, 16) and ml.rank_layout((256, 16)).offsets == (0, 256, 320)
    # fp32 `output` above 64 ranks goes to cuBLAS (the IEEE FMA norm kernel would spill on sm_90).
    assert not ml._kernel_handles(torch.float32, "output", ml.rank_layout((256, 16)))
    assert ml._kernel_handles(torch.float32, "output", ml.rank_layout((64, 16)))
    assert ml._kernel_handles(torch.bfloat16, "output", ml.rank_layout((256, 16)))
    assert ml._kernel_handles(torch.float32, "none", ml.rank_layout((256,)))
    assert not ml._kernel_handles(torch.float64, "none", ml.rank_layout((4,)))
    x, w, b, a, bb, scales = make(7, 20, 18, [4, 8], torch.float32, device)
    with lightmotion_fast.backend("triton"):
        _, z, _ = multi_lora_linear_op(x, w, b, a, bb, scales, "none", 1e-6, False, [1.0, 1.0], 1)
    assert z.shape == (7, 32)  # two LoRAs of rank 4 and 8, each padded to 16
    torch.testing.assert_close(z[:, 4:16], torch.zeros(7, 12, device=device))
    torch.testing.assert_close(z[:, :4], x @ a[0].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_weight_cache_is_built_once_and_reused(norm, device):
    """A_cat and the folded B_cat are built on the first call and reused: no per-call concatenation."""
    x, w, b, a, bb, scales = make(9, 20, 18, [4, 8], torch.float32, device)
    with lightmotion_fast.backend("triton"):
        multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
        pack = _fresh_pack(a, bb)
        a_cat, b_cat = pack.data["a_cat"], pack.data["b_cat"][1]
        hits = ml._CACHE.hits
        multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
        assert ml._CACHE.hits == hits + 1
        assert pack.data["a_cat"] is a_cat and pack.data["b_cat"][1] is b_cat
        y = multi_lora_linear(x, w, b, a, bb, [0.25, 3.0], norm=norm)  # new scales: B_cat re-folded
    assert pack.data["b_cat"][1] is not b_cat and pack.data["a_cat"] is a_cat
    ref = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), [0.25, 3.0], norm=norm)
    assert_close_rel(y, ref, torch.float32, f"new scales norm={norm}")


@pytest.mark.parametrize("norm", NORMS)
def test_weight_cache_sees_in_place_updates(norm, device, poisoned):
    x, w, b, a, bb, scales = make(9, 20, 18, [4, 8], torch.float32, device)
    with lightmotion_fast.backend("triton"):
        multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
        with torch.no_grad():  # an optimizer step: in place, bumps the version counters
            a[1].mul_(-2.0)
            bb[0].add_(0.5)
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
    ref = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), scales, norm=norm)
    assert_close_rel(y, ref, torch.float32, f"after in-place update norm={norm}")


@pytest.mark.parametrize("norm", NORMS)
def test_peft_hotswap_invalidates_weight_cache(norm, device):
    """Issue 14 item 5: peft's hotswap (`load_lora_weights(..., hotswap=True)` in diffusers) writes the
    new adapter through `.data.copy_`, which leaves `_version` and the storage unchanged."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import hotswap  # diffusers looks the function up on this module at call time

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(24, 20)).to(device)
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multiple adapters in the model": intended
        for name in ("first", "second"):
            inject_adapter_in_model(cfg, model, adapter_name=name)
    layer = model[0]

    def run():
        a = [layer.lora_A[n].weight.detach() for n in ("first", "second")]
        b = [layer.lora_B[n].weight.detach() for n in ("first", "second")]
        w, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
        y = multi_lora_linear(x, w, bias, a, b, [1.0, 0.5], norm=norm)
        return y, multi_lora_linear_reference(f64(x), f64(w), f64(bias), f64(a), f64(b), [1.0, 0.5], norm=norm)

    x = torch.randn(11, 24, device=device)
    run()  # fills the cache with the first adapter's weights
    version = layer.lora_A["first"].weight._version
    new = {"0.lora_A.first.weight": torch.randn(8, 24, device=device),
           "0.lora_B.first.weight": 4 * torch.randn(20, 8, device=device)}
    hotswap.hotswap_adapter_from_state_dict(model, new, "first", cfg)
    assert torch.equal(layer.lora_A["first"].weight, new["0.lora_A.first.weight"])
    assert layer.lora_A["first"].weight._version == version  # what made the cache stale
    y, ref = run()
    assert_close_rel(y, ref, torch.float32, f"after hotswap norm={norm}")


def test_weight_cache_is_bounded_in_bytes_and_drops_freed_weights(device):
    old_limit = ml._CACHE.max_bytes
    try:
        ml.clear_weight_cache()
        x, w, b, a, bb, scales = make(5, 64, 48, [16, 16], torch.float32, device)
        multi_lora_linear(x, w, b, a, bb, scales)
        per_set = ml._CACHE.nbytes
        assert per_set >= (32 * 64 + 48 * 32) * 4  # A_cat and B_cat at least
        ml.set_weight_cache_limit(int(2.5 * per_set))
        sets = [make(5, 64, 48, [16, 16], torch.float32, device)[3:5] for _ in range(4)]
        for a_i, b_i in sets:
            multi_lora_linear(x, w, b, a_i, b_i, scales)
        assert ml._CACHE.nbytes <= 2.5 * per_set and len(ml._CACHE.entries) == 2
        assert ml._CACHE._key([*sets[-1][0], *sets[-1][1]]) in ml._CACHE.entries  # most recent kept
        del sets[-1], a_i, b_i  # freed weights: their entry goes at the next miss
        fresh = make(5, 64, 48, [16, 16], torch.float32, device)[3:5]
        multi_lora_linear(x, w, b, *fresh, scales)
        assert len(ml._CACHE.entries) == 2 and all(not p.expired() for p in ml._CACHE.entries.values())
        assert ml._CACHE._key([*sets[-1][0], *sets[-1][1]]) in ml._CACHE.entries  # evicted the freed, not it
        with pytest.raises(ValueError, match="max_bytes must be an int"):
            ml.set_weight_cache_limit(-1)
        ml.clear_weight_cache()
        assert ml._CACHE.nbytes == 0 and not ml._CACHE.entries
    finally:
        ml.set_weight_cache_limit(old_limit)


# ---------------------------------------------------------------------------------------------
# autotuning and graph capture

def test_autotune_key_buckets_m_and_capture_does_not_tune():
    kernel = _common.kernel_module("multi_lora")
    assert "M_BUCKET" in kernel.EXPAND_TUNING_KEY and "M" not in kernel.EXPAND_TUNING_KEY
    assert [kernel.m_bucket(m) for m in (1, 2, 3, 64, 65, 35552)] == [1, 2, 4, 64, 128, 65536]
    for family, configs in kernel._EXPAND_CONFIGS.items():
        assert kernel._EXPAND_TUNERS[family].keys == kernel.EXPAND_TUNING_KEY
        # No candidate that spills on sm_90: fp32 128x256 spilled 70 KB per thread; SEPARATE (two
        # accumulators) more than 64 accumulator values per thread.
        for c in configs:
            acc_per_thread = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
            assert family[0] == "16bit" or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128
            assert not family[1] or acc_per_thread <= 64
            # SAMPLE_COEF (per-sample `output`) scales z in registers: 16-bit 128x256, and 128x128 at 4
            # warps, spill there; with SEPARATE every 16-bit tile but 128x128 at 8 warps does.
            if family[0] == "16bit" and family[2:] == ("sample",):
                assert c.kwargs["BLOCK_N"] <= 128 and (c.kwargs["BLOCK_M"] < 128 or c.num_warps == 8)
                assert not family[1] or (c.kwargs["BLOCK_M"], c.num_warps) == (128, 8)
    assert {("16bit", s, "sample") for s in (False, True)} <= set(kernel._EXPAND_CONFIGS)
    key = ("test", 4096, 64, 64, 64, 2, True, False)
    family = ("16bit", False)
    fn, cfg = kernel.expand_launcher(torch.bfloat16, False, key, capturing=True)  # first call inside a capture
    assert fn is kernel._multi_lora_expand_kernel and cfg is kernel._EXPAND_CONFIGS[family][0]
    assert (family, key) not in kernel._TUNED
    fn, cfg = kernel.expand_launcher(torch.bfloat16, False, key, capturing=False)  # tunes outside a capture
    assert fn is kernel._EXPAND_TUNERS[family] and cfg is None
    fn, cfg = kernel.expand_launcher(torch.bfloat16, False, key, capturing=True)  # then the tuned config
    assert fn is kernel._EXPAND_TUNERS[family] and cfg is None


def test_unaligned_rows_take_their_own_expand_configs():
    """16-bit rows the compiler cannot prove 16-byte aligned (a width, row stride or base off a multiple
    of 16 elements / bytes) load as scalars and spilled in every regular tile on sm_90; they go to the
    'unaligned' families (at most 128 × 64 tiles, 32-deep K steps). fp32 families are unchanged."""
    kernel = _common.kernel_module("multi_lora")
    x = torch.empty(64, 320, dtype=torch.float16)
    w = torch.empty(320, 320, dtype=torch.float16)
    assert kernel.rows_aligned([x, w, w.t()], (320, 320))
    assert not kernel.rows_aligned([x[:, :24], w], (24, 320))          # d_in = 24
    assert not kernel.rows_aligned([torch.empty(64, 24, dtype=torch.float16)[:, :16]], (16, 320))  # row stride
    assert not kernel.rows_aligned([x[:, 1:17]], (16, 320))            # base 2 bytes off
    for separate in (False, True):
        for sample in (False, True):
            family = kernel._family(torch.bfloat16, separate, sample, aligned=False)
            assert family[-1] == "unaligned" and family[:-1] == kernel._family(torch.bfloat16, separate, sample)
            assert kernel._family(torch.float32, separate, sample, aligned=False) == \
                kernel._family(torch.float32, separate, sample)
            for c in kernel._EXPAND_CONFIGS[family]:
                assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 and c.kwargs["BLOCK_K"] == 32
            fn, cfg = kernel.expand_launcher(torch.float16, separate, ("unaligned-test", separate, sample), True,
                                             sample_coef=sample, aligned=False)
            assert cfg is kernel._EXPAND_CONFIGS[family][0]


requires_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: CUDA-graph capture and host-sync checks")


def _check_capture_replay_and_no_host_sync(x, x_new, w, b, a, bb, scales, norm, separate):
    """After a first call (cache built, tuned) a second runs with no host synchronisation; a call on an
    x of a new M bucket (not tuned yet) is captured in a CUDA graph, and its replay on new values holds."""
    multi_lora_linear(x, w, b, a, bb, scales, norm=norm, separate=separate)  # builds the cache, tunes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        multi_lora_linear(x, w, b, a, bb, scales, norm=norm, separate=separate)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            y_static = multi_lora_linear(x_new, w, b, a, bb, scales, norm=norm, separate=separate)
    torch.cuda.current_stream().wait_stream(stream)
    x_new.copy_(torch.randn_like(x_new))
    graph.replay()
    torch.cuda.synchronize()
    ref = multi_lora_linear_reference(f64(x_new), f64(w), f64(b), f64(a), f64(bb), scales, norm=norm,
                                      separate=separate)
    assert_close_rel(y_static, ref, torch.bfloat16, f"graph replay norm={norm} x {tuple(x_new.shape)}")


@requires_cuda
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("separate", [False, True])
def test_cuda_graph_capture_replay_and_no_host_sync(norm, separate):
    x, w, b, a, bb, scales = make(300, 128, 96, [16, 64], torch.bfloat16, "cuda")
    x_new = torch.randn(700, 128, device="cuda", dtype=torch.bfloat16)  # M bucket 1024: not tuned yet
    _check_capture_replay_and_no_host_sync(x, x_new, w, b, a, bb, scales, norm, separate)


@requires_cuda
@pytest.mark.parametrize("separate", [False, True])
def test_cuda_graph_capture_per_sample_output(separate):
    """`output` per sample (x [b, T, d]: three launches, the coefficient applied in the TMA expand on
    sm_90) captures and replays too."""
    x, w, b, a, bb, scales = make_samples(3, 100, 128, 96, [16, 64], torch.bfloat16, "cuda")
    x_new = torch.randn(7, 100, 128, device="cuda", dtype=torch.bfloat16)  # M bucket 1024: not tuned yet
    _check_capture_replay_and_no_host_sync(x, x_new, w, b, a, bb, scales, "output", separate)


# ---------------------------------------------------------------------------------------------
# backward

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("separate", [False, True])
def test_backward_matches_reference_fp32(norm, separate, device):
    x, w, b, a, bb, scales = make(21, 24, 30, [4, 8, 16], torch.float32, device, requires_grad=True)
    g = torch.randn((3, 21, 30) if separate else (21, 30), device=device)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm, separate=separate)
    grads = torch.autograd.grad(y, [x, w, b, *a, *bb], g)
    xs, ws, bs, as_, bbs = f64(x), f64(w), f64(b), f64(a), f64(bb)
    ref = multi_lora_linear_reference(xs, ws, bs, as_, bbs, scales, norm=norm, separate=separate)
    ref_grads = torch.autograd.grad(ref, [xs, ws, bs, *as_, *bbs], g.double())
    names = ["x", "weight", "bias"] + [f"lora_a[{i}]" for i in range(3)] + [f"lora_b[{i}]" for i in range(3)]
    for name, got, want in zip(names, grads, ref_grads):
        assert_close_rel(got, want, torch.float32, f"d{name} norm={norm}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["none", "output"])
def test_backward_half_precision(norm, dtype, device):
    x, w, b, a, bb, scales = make(19, 24, 26, [8, 16], dtype, device, requires_grad=True)
    g = torch.randn(19, 26, device=device).to(dtype)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
    grads = torch.autograd.grad(y, [x, *a, *bb], g)
    xs, as_, bbs = f64(x), f64(a), f64(bb)
    ref = multi_lora_linear_reference(xs, f64(w), f64(b), as_, bbs, scales, norm=norm)
    ref_grads = torch.autograd.grad(ref, [xs, *as_, *bbs], g.double())
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        # The backward works on z rounded to the input dtype: allow a few roundings more.
        assert_close_rel(got, want, dtype, f"grad norm={norm}")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("separate", [False, True])
def test_gradcheck_reference_float64(norm, separate):
    x, w, b, a, bb, scales = make(5, 6, 7, [2, 3], torch.float64, "cpu", requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, w, b, a0, a1, b0, b1: multi_lora_linear_reference(x, w, b, [a0, a1], [b0, b1], scales,
                                                                    norm=norm, separate=separate),
        (x, w, b, *a, *bb))


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_op_backward_float64(norm):
    """The op's hand-written backward (torch path keeps float64) against finite differences."""
    x, w, b, a, bb, scales = make(5, 6, 7, [2, 3], torch.float64, "cpu", requires_grad=True)

    def fn(x, w, b, a0, a1, b0, b1):
        ml.clear_weight_cache()  # gradcheck perturbs weights in place through views
        return multi_lora_linear_op(x, w, b, [a0, a1], [b0, b1], scales, norm, 1e-6, False, [1.0, 1.0], 1)[0]

    with lightmotion_fast.backend("reference"):
        torch.autograd.gradcheck(fn, (x, w, b, *a, *bb))


# ---------------------------------------------------------------------------------------------
# bad inputs

def _good(device):
    x, w, b, a, bb, scales = make(4, 8, 6, [2, 2], torch.float32, device)
    return dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb, scales=scales)


@pytest.mark.parametrize("change, error, match", [
    (lambda k: k.update(x=torch.randn(4, 9)), ValueError, "x must have shape"),
    (lambda k: k.update(x=torch.randint(0, 3, (4, 8))), TypeError, "x must have dtype"),
    (lambda k: k.update(weight=torch.randn(6, 8, dtype=torch.float16)), TypeError, "weight must have"),
    (lambda k: k.update(bias=torch.randn(5)), ValueError, "bias must have shape"),
    (lambda k: k.update(lora_a=k["lora_a"][:1]), ValueError, "same number"),
    (lambda k: k.update(lora_a=torch.randn(2, 8)), TypeError, "lora_a must be a list"),
    (lambda k: k.update(lora_a=[torch.randn(2, 7), k["lora_a"][1]]), ValueError, r"lora_a\[0\] must have shape"),
    (lambda k: k.update(lora_b=[torch.randn(6, 3), k["lora_b"][1]]), ValueError, r"lora_b\[0\] must have shape"),
    (lambda k: k.update(scales=[1.0]), ValueError, "one number per LoRA"),
    (lambda k: k.update(scales=[1.0, float("nan")]), ValueError, r"scales\[1\] must be finite"),
    (lambda k: k.update(norm="frobenius"), ValueError, "norm must be one of"),
    (lambda k: k.update(eps=-1.0), ValueError, "eps must be"),
])
def test_bad_inputs_raise(change, error, match, device):
    kwargs = dict(_good("cpu"), norm="none", eps=1e-6)
    change(kwargs)
    with pytest.raises(error, match=match):
        multi_lora_linear(**kwargs)


@pytest.mark.parametrize("norm", NORMS)
def test_public_function_takes_float64(norm, device):
    """float64 goes through the public function as it does through the custom op (issue 14 item 10):
    the PyTorch path keeps float64 throughout, equal to the reference."""
    x, w, b, a, bb, scales = make(9, 12, 10, [2, 3], torch.float64, device)
    got = lightmotion_fast.multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, multi_lora_linear_reference(x, w, b, a, bb, scales, norm=norm),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Issue 15 item 2: the norms of the *effective* updates (peft's lora_alpha / r inside), and the
# paper's per-sample `output` normalisation (x's first axis is the sample axis).

GAMMAS = [2.0, 0.5, 1.25]  # lora_alpha / r of three adapters: 4x apart between the first two


def make_samples(b, n, d_in, d_out, ranks, dtype, device, requires_grad=False):
    x, w, bias, a, bb, _ = make(b * n, d_in, d_out, ranks, dtype, device, requires_grad=requires_grad)
    x = x.detach().reshape(b, n, d_in).requires_grad_(requires_grad)
    scales = GAMMAS[: len(ranks)]  # adapter weight 1: sᵢ = γᵢ
    return x, w, bias, a, bb, scales


def test_weight_norm_includes_lora_alpha_over_r_through_peft(device):
    """Two adapters with the same BA, one trained with 4x the alpha/r of the other: after the `weight`
    normalisation their effective updates must have equal norms (before the fix they stayed 4x apart).
    The two adapters read disjoint halves of the input, so each one's update is seen on its own."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multiple adapters in the model": intended
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), model, adapter_name="strong")
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["0"]), model, adapter_name="weak")
    layer = model[0]
    layer.set_adapter(["strong", "weak"])
    a, b = torch.randn(4, 8, device=device), torch.randn(12, 4, device=device)
    with torch.no_grad():
        layer.lora_A["strong"].weight.zero_()[:, :8] = a   # reads x[:, :8]
        layer.lora_A["weak"].weight.zero_()[:, 8:] = a     # reads x[:, 8:], the same update otherwise
        layer.lora_B["strong"].weight.copy_(b)
        layer.lora_B["weak"].weight.copy_(b)
    x_strong = torch.cat([torch.randn(5, 8, device=device), torch.zeros(5, 8, device=device)], 1)
    x_weak = x_strong.roll(8, dims=1)
    with torch.no_grad():
        plain = [layer(x) - layer.base_layer(x) for x in (x_strong, x_weak)]
        fused = lora_feature._fused_forward(layer, "weight")  # what patch(..., lora_norm="weight") installs
        normed = [fused(layer.forward, x) - layer.base_layer(x) for x in (x_strong, x_weak)]
    assert plain[0].norm() / plain[1].norm() == pytest.approx(4.0, rel=1e-4)  # peft: 2 vs 0.5
    assert normed[0].norm() / normed[1].norm() == pytest.approx(1.0, rel=1e-4)
    # Each effective update has norm α = mean of the effective norms, (2 + 0.5)/2 ‖BA‖.
    want = 1.25 * plain[0].norm() / 2.0
    assert normed[0].norm() == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize("norm", ["weight", "output", "output_per_token"])
def test_normalised_effective_updates_have_equal_norms(norm, device, poisoned):
    """With adapter weights 1 (sᵢ = γᵢ) every normalised update ends with the same norm α: the mean
    of the effective norms ‖γᵢΔᵢ‖ (of the weights, per sample, or per token), float64 explicit."""
    x, w, b, a, bb, scales = make_samples(2, 9, 24, 20, [4, 8, 16], torch.float32, device)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm, separate=True, lora_scaling=GAMMAS)
    base = x.double() @ w.double().T + b.double()
    got = [y[i].double() - base for i in range(3)]                         # [b n d_out] each
    eff = [g * (x.double() @ a_.double().T) @ b_.double().T for g, a_, b_ in zip(GAMMAS, a, bb)]
    if norm == "weight":
        norms = torch.stack([g * torch.linalg.matrix_norm(b_.double() @ a_.double())
                             for g, a_, b_ in zip(GAMMAS, a, bb)])
        coef = norms.mean() / norms                                             # cᵢ = α/‖γᵢBᵢAᵢ‖
        for i in range(3):  # the update applied is cᵢγᵢBᵢAᵢ, of norm α for every i
            assert_close_rel(got[i], coef[i] * eff[i], torch.float32, f"update {i} weight")
            updated = coef[i] * GAMMAS[i] * torch.linalg.matrix_norm(bb[i].double() @ a[i].double())
            torch.testing.assert_close(updated, norms.mean())
        return
    dims = (1, 2) if norm == "output" else (2,)
    norms = torch.stack([e.norm(dim=dims, keepdim=True) for e in eff])        # [k b 1 1] or [k b n 1]
    alpha = norms.mean(0)
    for i in range(3):
        assert_close_rel(got[i].norm(dim=dims, keepdim=True), alpha, torch.float32, f"‖update {i}‖ {norm}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("separate", [False, True])
def test_output_per_sample_matches_reference(separate, dtype, device, poisoned):
    x, w, b, a, bb, scales = make_samples(3, 7, 40, 37, [8, 16, 4], dtype, device)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm="output", separate=separate, lora_scaling=GAMMAS)
        _, _, norms = multi_lora_linear_op(x.reshape(21, 40), w, b, a, bb, scales, "output", 1e-6, separate,
                                           GAMMAS, 3)
    ref = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), scales, norm="output",
                                      separate=separate, lora_scaling=GAMMAS)
    assert y.shape == ((3, 3, 7, 37) if separate else (3, 7, 37))
    assert_close_rel(y, ref, dtype, f"per-sample output separate={separate}")
    explicit = torch.stack([(g * (x.double() @ a_.double().T) @ b_.double().T).norm(dim=(1, 2))
                            for g, a_, b_ in zip(GAMMAS, a, bb)], dim=1)      # [b k]
    assert norms.shape == (3, 3)
    assert_close_rel(norms, explicit, dtype, "per-sample norms")
    # The per-sample reading is not the per-token one.
    per_token = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), scales,
                                            norm="output_per_token", separate=separate, lora_scaling=GAMMAS)
    assert (per_token - ref).abs().max() > 0.05 * ref.abs().max()


def test_output_on_2d_input_is_per_row(device):
    """x [b, d_in]: each row is its own sample, so `output` equals `output_per_token` there."""
    x, w, b, a, bb, scales = make(11, 20, 18, [4, 8], torch.float64, device)
    ys = [multi_lora_linear(x, w, b, a, bb, scales, norm=n) for n in ("output", "output_per_token")]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["weight", "output"])
@pytest.mark.parametrize("separate", [False, True])
def test_backward_per_sample_and_lora_scaling_match_reference(norm, separate, device):
    x, w, b, a, bb, scales = make_samples(3, 5, 24, 30, [4, 8, 16], torch.float32, device, requires_grad=True)
    g = torch.randn((3, 3, 5, 30) if separate else (3, 5, 30), device=device)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm, separate=separate, lora_scaling=GAMMAS)
    grads = torch.autograd.grad(y, [x, w, b, *a, *bb], g)
    xs, ws, bs, as_, bbs = f64(x), f64(w), f64(b), f64(a), f64(bb)
    ref = multi_lora_linear_reference(xs, ws, bs, as_, bbs, scales, norm=norm, separate=separate, lora_scaling=GAMMAS)
    ref_grads = torch.autograd.grad(ref, [xs, ws, bs, *as_, *bbs], g.double())
    names = ["x", "weight", "bias"] + [f"lora_a[{i}]" for i in range(3)] + [f"lora_b[{i}]" for i in range(3)]
    for name, got, want in zip(names, grads, ref_grads):
        assert_close_rel(got, want, torch.float32, f"d{name} norm={norm}")


@pytest.mark.parametrize("norm", ["weight", "output", "output_per_token"])
def test_gradcheck_per_sample_and_lora_scaling_float64(norm):
    """The reference and the op's hand-written backward through the per-sample norm (3 samples of 2
    tokens) and through γᵢ, against finite differences."""
    x, w, b, a, bb, scales = make(6, 5, 7, [2, 3], torch.float64, "cpu", requires_grad=True)
    gammas = [2.0, 0.5]

    def op(x, w, b, a0, a1, b0, b1):
        ml.clear_weight_cache()  # gradcheck perturbs weights in place through views
        return multi_lora_linear_op(x, w, b, [a0, a1], [b0, b1], scales, norm, 1e-6, False, gammas, 3)[0]

    def ref(x, w, b, a0, a1, b0, b1):
        return multi_lora_linear_reference(x.reshape(3, 2, 5), w, b, [a0, a1], [b0, b1], scales, norm=norm,
                                           lora_scaling=gammas)

    with lightmotion_fast.backend("reference"):
        torch.autograd.gradcheck(op, (x, w, b, *a, *bb))
    torch.autograd.gradcheck(ref, (x, w, b, *a, *bb))
    with lightmotion_fast.backend("reference"):
        torch.testing.assert_close(op(x, w, b, *a, *bb).reshape(3, 2, 7), ref(x, w, b, *a, *bb))


def test_bad_lora_scaling_and_samples_raise():
    kwargs = dict(_good("cpu"), norm="output")
    with pytest.raises(ValueError, match="lora_scaling must hold one number per LoRA"):
        multi_lora_linear(**kwargs, lora_scaling=[1.0])
    with pytest.raises(ValueError, match=r"lora_scaling\[0\] must be finite"):
        multi_lora_linear(**kwargs, lora_scaling=[float("inf"), 1.0])
    k = _good("cpu")
    with pytest.raises(ValueError, match="samples must be"):
        multi_lora_linear_op(k["x"], k["weight"], k["bias"], k["lora_a"], k["lora_b"], k["scales"], "output", 1e-6,
                             False, [1.0, 1.0], 3)


# ---------------------------------------------------------------------------------------------
# The TMA expand (Hopper): the interpreter runs it when the device query says sm_90.

@pytest.fixture
def hopper_expand(monkeypatch):
    """Device queries answer sm_90; the two expand kernels' launches are recorded."""
    from lm_testing import record_launches

    kernels = _common.kernel_module("multi_lora")
    monkeypatch.setattr(_common, "device_capability", lambda device: (9, 0))
    return record_launches(monkeypatch, kernels, "_multi_lora_expand_tma_kernel", "_multi_lora_expand_kernel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["none", "weight"])
@pytest.mark.parametrize("shape", [(19, 40, 24, [16, 8]), (33, 64, 48, [32]), (5, 8, 72, [4, 16, 8])],
                         ids=lambda s: f"M{s[0]}-din{s[1]}-dout{s[2]}")
def test_tma_expand_matches_reference(shape, norm, dtype, device, poisoned, hopper_expand):
    """On sm_90 the 16-bit single-output expand brings x, W, zs and B_cat in through TMA descriptors
    (zero-filled past M, d_out, d_in and R: d_in 40 and 8 are not multiples of the 32-wide K step);
    the output holds against float64, and the cp.async kernel is not launched."""
    m, d_in, d_out, ranks = shape
    x, w, b, a, bb, scales = make(m, d_in, d_out, ranks, dtype, device)
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, b, a, bb, scales, norm=norm)
    assert [name for name, _, _ in hopper_expand] == ["_multi_lora_expand_tma_kernel"]
    want = multi_lora_linear_reference(f64(x), f64(w), f64(b), f64(a), f64(bb), scales, norm=norm)
    assert_close_rel(y, want, dtype, f"TMA expand {norm}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm,separate", [("output", False), ("output", True), ("none", True), ("weight", True)])
@pytest.mark.parametrize("shape", [(3, 11, 40, 24, [16, 8, 32]), (2, 9, 64, 48, [32, 16])],
                         ids=lambda s: f"b{s[0]}-T{s[1]}-k{len(s[4])}")
def test_tma_expand_per_lora_matches_reference(shape, norm, separate, dtype, device, poisoned, hopper_expand):
    """The TMA expand's per-LoRA rank loop on sm_90: `output` per sample (the paper's reading, what a
    patched CogVideoX runs) scales each LoRA's z tiles by their rows' cᵢ(b) (SAMPLE_COEF; samples of 11
    and 9 tokens end inside a 16-row tile, so one tile holds rows of two samples), and SEPARATE (the
    LiON-LoRA fusion processor's q/k/v) writes one output per LoRA from the kept base tile; both hold
    against float64."""
    b, n, d_in, d_out, ranks = shape
    x, w, bias, a, bb, scales = make_samples(b, n, d_in, d_out, ranks, dtype, device)
    gammas = GAMMAS[: len(ranks)]
    with lightmotion_fast.backend("triton"):
        y = multi_lora_linear(x, w, bias, a, bb, scales, norm=norm, separate=separate, lora_scaling=gammas)
    assert [(name, kw["SEPARATE"], kw["SAMPLE_COEF"]) for name, _, kw in hopper_expand] == [
        ("_multi_lora_expand_tma_kernel", separate, norm == "output")]
    want = multi_lora_linear_reference(f64(x), f64(w), f64(bias), f64(a), f64(bb), scales, norm=norm,
                                       separate=separate, lora_scaling=gammas)
    assert y.shape == want.shape
    assert_close_rel(y, want, dtype, f"TMA expand, {norm}, separate={separate}")


def test_tma_expand_only_where_descriptors_address_the_operands(device, poisoned, hopper_expand):
    """fp32 and an x whose rows are not 16-byte strided keep the cp.async kernel; the backward's dx expand (g W + dz A_cat: the weight passed as Wᵀ, a
    transposed view) takes TMA with W's own storage walked as the [K, N] operand (W_KN); the
    gradients hold against float64."""
    x, w, b, a, bb, scales = make(12, 32, 24, [16], torch.float16, device, requires_grad=True)
    with lightmotion_fast.backend("triton"):
        multi_lora_linear(x.detach().float(), w.float(), b.float(), [t.detach().float() for t in a],
                          [t.detach().float() for t in bb], scales)
        wide = torch.randn(12, 36, device=device).to(torch.float16)[:, :32]   # rows 72 B apart
        multi_lora_linear(wide, w, b, a, bb, scales)
        assert [name for name, _, _ in hopper_expand] == ["_multi_lora_expand_kernel"] * 2
        hopper_expand.clear()
        y = multi_lora_linear(x, w, b, a, bb, scales)
        grads = torch.autograd.grad(y, [x, *a, *bb], torch.ones_like(y))
    assert [(name, kw["W_KN"]) for name, _, kw in hopper_expand] == [("_multi_lora_expand_tma_kernel", False),
                                                                      ("_multi_lora_expand_tma_kernel", True)]
    xs, as_, bbs = f64(x), f64(a), f64(bb)
    ref = multi_lora_linear_reference(xs, f64(w), f64(b), as_, bbs, scales)
    for got, want in zip(grads, torch.autograd.grad(ref, [xs, *as_, *bbs], torch.ones_like(ref))):
        assert_close_rel(got, want, torch.float16, "gradient after a TMA forward")


def test_rank_offsets_outlive_a_weight_update(device):
    """The device rank offsets depend on the ranks only: after an optimiser-style in-place update (which
    rebuilds the weight pack) the op reuses the same offsets tensor, so a training step makes no
    host-to-device copy."""
    x, w, b, a, bb, scales = make(9, 32, 24, [4, 16], torch.float32, device, requires_grad=True)
    layout = ml.rank_layout((4, 16))
    multi_lora_linear(x, w, b, a, bb, scales).sum().backward()
    first = ml._offsets(layout, x.device)
    pack = ml._CACHE.get(a, bb)
    with torch.no_grad():
        a[0].add_(0.01)   # an optimiser step
    assert ml._CACHE.get(a, bb) is not pack
    with TensorOutputs() as outputs:
        multi_lora_linear(x, w, b, a, bb, scales, norm="weight").sum().backward()
    assert ml._offsets(layout, x.device) is first
    made = [s for s in outputs.seen if s[1] == (3,) and s[2] == torch.int32 and s[0] != "set_"]  # set_: interpreter
    assert not made, made


@requires_cuda
@pytest.mark.parametrize("norm", NORMS)
def test_training_step_after_a_weight_update_has_no_host_sync(norm):
    """Forward and backward right after the LoRA weights changed in place (every cache entry rebuilt): no
    host synchronisation, host-to-device copies included."""
    x, w, b, a, bb, scales = make(300, 128, 96, [16, 64], torch.bfloat16, "cuda", requires_grad=True)
    multi_lora_linear(x, w, b, a, bb, scales, norm=norm).sum().backward()   # builds, tunes
    with torch.no_grad():
        for t in (*a, *bb):
            t.add_(0.01)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        multi_lora_linear(x, w, b, a, bb, scales, norm=norm).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
