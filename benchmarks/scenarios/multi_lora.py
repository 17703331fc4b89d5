"""multi_lora_linear (LiON-LoRA) against peft's multi-adapter loop, diffusers' fuse_lora-style merged
weights, and a vLLM-style shrink/expand design, at CogVideoX-5B/2B attention-projection shapes.

FLOPs are the useful matmul FLOPs (base + LoRA), so "% of ceiling" is the distance from the floor
set by the device's measured bf16 matmul rate.
"""
import torch
import torch.nn.functional as F

import lightmotion_fast as lm
from lightmotion_fast.bench.scenario import Case, sibling
from lightmotion_fast.ops import _common
from lightmotion_fast.reference.multi_lora import multi_lora_linear_reference

M_COGVIDEOX = 2 * (13 * 30 * 45 + 226)  # 49 frames 480x720 + text, x2 for CFG: 35,552 tokens
NOTE_MERGED = ("fuse_lora_merged: W + sum s_i B_i A_i merged once (diffusers fuse_lora); fastest, but adapter "
               "weights can't change per call without re-merging, no per-token (output) normalisation, "
               "and LoRA weights can't be trained through it")
NOTE_VLLM = ("vllm_shrink_expand: base GEMM, then one shrink GEMM over A_cat (adapter scales folded in once) "
             "and one expand GEMM over B_cat added into y (cuBLAS via torch.matmul; the two-launch LoRA design "
             "of vLLM/punica)")


ablated = sibling(__file__, "dual_cross_attention").ablated


def flops(m, d_in, d_out, ranks, mode):
    fwd = 2 * m * d_in * d_out + sum(2 * m * r * (d_in + d_out) for r in ranks)
    if mode == "fwd":
        return fwd
    # W frozen: dx through W, and per LoRA h = g B, dB, dA, dx through A.
    bwd = 2 * m * d_out * d_in + sum(2 * m * r * (2 * d_out + 2 * d_in) for r in ranks)
    return fwd + bwd


def peft_loop(x, w, b, lora_a, lora_b, scales):
    """peft lora.Linear.forward (dropout off): base layer, then + lora_B(lora_A(x)) * scaling per adapter."""
    y = F.linear(x, w, b)
    for a, bb, s in zip(lora_a, lora_b, scales):
        y = y + F.linear(F.linear(x, a), bb) * s
    return y


def vllm_shrink_expand(x, w, b, a_cat, b_cat):
    """a_cat carries the adapter scales (folded in once, as a serving stack would), so z stays in the
    input dtype: no fp32 scale pass over [M, R]."""
    y = F.linear(x, w, b)
    z = x @ a_cat.T                    # shrink (all LoRAs)
    return y.addmm_(z, b_cat.T) if not y.requires_grad else torch.addmm(y, z, b_cat.T)


def _case(label, m, d, ranks, device, dtype, mode, norm="none", quick=True, cpu=False, samples=None,
          separate=False):
    """samples: x as [samples, m / samples, d] (`output` is then per sample, the paper's reading and what a
    patched model's [batch, tokens, d] activations get); else x is [m, d] (`output` per row). separate:
    one output per LoRA (the LiON-LoRA fusion processor's q/k/v projections; forward only)."""
    k = len(ranks)
    rows = (samples, m // samples) if samples else (m,)

    def setup():
        g = torch.Generator(device=device).manual_seed(0)

        def rnd(*shape, scale=1.0, grad=False):
            t = (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
            return t.requires_grad_(grad)

        train = mode == "fwd+bwd"
        x = rnd(*rows, d, grad=train)
        w, b = rnd(d, d, scale=d ** -0.5), rnd(d)
        lora_a = [rnd(r, d, scale=d ** -0.5, grad=train) for r in ranks]
        lora_b = [rnd(d, r, scale=r ** -0.5, grad=train) for r in ranks]
        scales = [1.0, 0.5, 0.8][:k]
        with torch.no_grad():
            merged = w + sum(s * (bb.float() @ a.float()) for a, bb, s in zip(lora_a, lora_b, scales)).to(dtype)
            a_cat = torch.cat([(a.detach().float() * s).to(dtype) for a, s in zip(lora_a, scales)])
            b_cat = torch.cat([bb.detach() for bb in lora_b], dim=1)
        a_cat.requires_grad_(train)
        b_cat.requires_grad_(train)
        grad = rnd(*rows, d) if train else None

        def fwd_bwd(fn):
            if not train:
                return fn

            def run():
                y = fn()
                y.backward(grad)
            return run

        def training_step(fn):
            """fwd+bwd as a training step runs it: the optimiser changed the LoRA weights since the last call,
            so our weight cache (A_cat, B_cat, norms) is rebuilt inside the timed call. increment_version
            marks them changed without device work; the peers keep no cache."""
            if not train:
                return fn

            def run():
                for t in (*lora_a, *lora_b):
                    torch.autograd.graph.increment_version(t)
                fn()
            return run

        providers = {
            "lightmotion": training_step(fwd_bwd(lambda: lm.multi_lora_linear(x, w, b, lora_a, lora_b, scales,
                                                                              norm=norm, separate=separate))),
            "reference": fwd_bwd(lambda: multi_lora_linear_reference(x, w, b, lora_a, lora_b, scales, norm=norm,
                                                                     separate=separate)),
        }
        if norm == "none":
            providers["peft_loop"] = fwd_bwd(lambda: peft_loop(x, w, b, lora_a, lora_b, scales))
            providers["vllm_shrink_expand"] = fwd_bwd(lambda: vllm_shrink_expand(x, w, b, a_cat, b_cat))
            if not train:
                providers["fuse_lora_merged"] = lambda: F.linear(x, merged, b)
        if k == 3 and (norm == "none" or samples or separate) and _common.has_tma(x.device):
            # the expands (forward, and the backward's dx) on cp.async instead of TMA
            providers["lightmotion/no_tma"] = ablated(providers["lightmotion"], "_tma_expand", False, "multi_lora")
        return providers

    elem = torch.empty((), dtype=dtype).element_size()
    rank = sum(ranks)
    outputs = k if separate else 1
    nbytes = elem * ((1 + outputs) * m * d + d * d + 2 * rank * d + m * rank)
    note = NOTE_MERGED + "; " + NOTE_VLLM if norm == "none" else "peers have no normalised multi-LoRA"
    per_sample = (f" per sample x{samples}" if samples else "") + (" separate" if separate else "")
    return Case(op="multi_lora_linear", shape=f"{label} M={m} d={d} k={k} r={ranks[0]} norm={norm}{per_sample}",
                setup=setup, mode=mode, dtype=str(dtype).replace("torch.", ""), bytes=nbytes,
                flops=flops(m, d, d, ranks, mode), quick=quick, cpu=cpu, note=note)


def cases(device, quick):
    dtype = torch.bfloat16
    for mode in ("fwd", "fwd+bwd"):
        for k in (1, 2, 3):
            yield _case("CogVideoX-5B", M_COGVIDEOX, 3072, [256] * k, device, dtype, mode, quick=(k == 3))
        for norm in ("weight", "output"):
            yield _case("CogVideoX-5B", M_COGVIDEOX, 3072, [256] * 3, device, dtype, mode, norm=norm,
                        quick=(norm == "output" and mode == "fwd"))
        # `output` per sample: two samples (CFG) of 17,776 tokens, the shape a patched CogVideoX gives the layer
        yield _case("CogVideoX-5B", M_COGVIDEOX, 3072, [256] * 3, device, dtype, mode, norm="output",
                    quick=(mode == "fwd"), samples=2)
        yield _case("CogVideoX-2B", M_COGVIDEOX, 1920, [256] * 3, device, dtype, mode, quick=False)
    # the LiON-LoRA fusion processor's q/k/v: one output per LoRA, per-sample `output` (forward only)
    yield _case("CogVideoX-5B", M_COGVIDEOX, 3072, [256] * 3, device, dtype, "fwd", norm="output", quick=False,
                samples=2, separate=True)
    # Small enough for a CPU (our op takes its torch path there).
    cpu_dtype = torch.float32
    for mode in ("fwd", "fwd+bwd"):
        for norm in ("none", "output"):
            yield _case("small", 512, 256, [16] * 3, device, cpu_dtype, mode, norm=norm, quick=True, cpu=True)
