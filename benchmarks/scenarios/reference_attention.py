"""reference_attention (queries from m, keys/values from m and the reference bank p) against
F.scaled_dot_product_attention over the materialised concatenation [m; p] (the concat included,
as a pipeline must build it every call), at AnimateDiff/SD1.5 self-attention shapes."""
import torch
import torch.nn.functional as F

import lightmotion_fast as lm
from lightmotion_fast.bench.scenario import Case, sibling
from lightmotion_fast.reference.reference_attention import reference_attention_reference


_dual = sibling(__file__, "dual_cross_attention")
sdpa_backend, ablated = _dual.sdpa_backend, _dual.ablated

NOTE = "sdpa_concat: torch.cat of the keys and of the values of m and p, then F.scaled_dot_product_attention"


def _case(label, batch, n, n_ref, heads, d, device, dtype, mode="fwd", quick=True, cpu=False):
    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        train = mode == "fwd+bwd"

        def heads_view(tokens):
            x = torch.randn(batch, tokens, heads * d, generator=g, device=device, dtype=dtype).requires_grad_(train)
            return x.view(batch, tokens, heads, d).transpose(1, 2)

        q, k, v = (heads_view(n) for _ in range(3))
        kr, vr = (heads_view(n_ref) for _ in range(2))
        grad = torch.randn(batch, heads, n, d, device=device, dtype=dtype) if train else None

        def run(fn):
            return fn if not train else (lambda: fn().backward(grad))

        ours = run(lambda: lm.reference_attention(q, k, v, kr, vr))
        providers = {
            "lightmotion": ours,
            "reference": run(lambda: reference_attention_reference(q, k, v, kr, vr)),
            "sdpa_concat": run(lambda: F.scaled_dot_product_attention(q, torch.cat([k, kr], 2), torch.cat([v, vr], 2))),
        }
        if device.type == "cuda" and dtype != torch.float32:
            if d <= 128:  # the TMA forward without P V one tile behind the scores (Hopper)
                providers["lightmotion/no_pv_lag"] = ablated(ours, "_reference_lag_pv", False)
            if train and d == 80:
                providers["lightmotion/dkdv_32_keys"] = ablated(ours, "_dkdv_wgmma_80", False)
            if train and d <= 64:  # a dq launch per source, chained, instead of both in one
                providers["lightmotion/dq_launch_per_set"] = ablated(ours, "_dq_sets_per_launch", 1)
        return providers

    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = elem * batch * heads * d * (4 * n + 2 * n_ref)
    flops = 4.0 * batch * heads * n * (n + n_ref) * d * (3.5 if mode == "fwd+bwd" else 1.0)
    backend = sdpa_backend(device, dtype, heads, d, mode == "fwd+bwd")
    return Case(op="reference_attention", shape=f"{label} b={batch} n={n}+{n_ref} {heads}x{d}", setup=setup,
                mode=mode, dtype=str(dtype).replace("torch.", ""), bytes=nbytes, flops=flops, quick=quick,
                cpu=cpu, note=f"{NOTE}; SDPA backend here: {backend}")


def cases(device, quick):
    dtype = torch.float16
    batch = 16 * 2
    for n, d in ((4096, 40), (1024, 80), (256, 160)):
        yield _case(f"SD1.5/AnimateDiff {int(n ** 0.5)}x{int(n ** 0.5)}", batch, n, n, 8, d, device, dtype,
                    quick=(n != 256))
    for n, d in ((4096, 40), (1024, 80), (256, 160)):
        yield _case(f"SD1.5/AnimateDiff {int(n ** 0.5)}x{int(n ** 0.5)}", batch, n, n, 8, d, device, dtype,
                    mode="fwd+bwd", quick=False)
    yield _case("small", 2, 128, 128, 4, 40, device, torch.float32, mode="fwd+bwd", cpu=True)
    yield _case("small", 2, 128, 128, 4, 40, device, torch.float32, cpu=True)
