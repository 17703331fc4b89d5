"""dual_cross_attention against IPAdapterAttnProcessor2_0's attention part: two SDPA calls (text with
its mask, image-prompt tokens), each output reshaped to [b n (h d)], scaled and added, exactly as the
processor does; at AnimateDiff/SD1.5 shapes (16 frames × 2 CFG) and SDXL shapes."""
import torch
import torch.nn.functional as F

import lightmotion_fast as lm
from lightmotion_fast.bench.scenario import Case
from lightmotion_fast.reference.dual_cross_attention import dual_cross_attention_reference

NOTE = ("ip_adapter_sdpa: IPAdapterAttnProcessor2_0's attention part, F.scaled_dot_product_attention for the text "
        "tokens and for the image tokens, each transposed to [b n (h d)], then out + scale·ip (as diffusers does)")


def ip_adapter_sdpa(q, k_text, v_text, k_img, v_img, scale, mask=None):
    b, h, n, d = q.shape
    out = F.scaled_dot_product_attention(q, k_text, v_text, attn_mask=mask).transpose(1, 2).reshape(b, n, h * d)
    ip = F.scaled_dot_product_attention(q, k_img, v_img).transpose(1, 2).reshape(b, n, h * d)
    return out + scale * ip


def sdpa_backend(device, dtype, heads, d, train, attn_mask=False):
    """The backend F.scaled_dot_product_attention picks on this machine for [b heads n d] inputs
    (FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION, MATH, ...), recorded in the case note so a
    result says which peer it beat. Asked with small inputs of the case's dtype, head dim, mask and
    grad mode (the choice does not depend on the lengths)."""
    try:
        from torch.nn.attention import SDPBackend
        q = torch.randn(1, heads, 8, d, device=device, dtype=dtype).requires_grad_(train)
        mask = torch.zeros(1, 1, 1, 8, device=device, dtype=dtype) if attn_mask else None
        return SDPBackend(torch._fused_sdp_choice(q, q, q, attn_mask=mask)).name
    except Exception as e:  # noqa: BLE001 - a private API; the benchmark must still run without it
        return f"unknown ({type(e).__name__})"


def _kernels(module="dual_cross_attention"):
    from lightmotion_fast.ops import _common

    return _common.kernel_module(module)


def ablated(fn, choice, value, module="dual_cross_attention"):
    """fn with a kernels' design choice `choice` (a function of kernels/<module>.py that answers whether
    to use it) answering `value` for the call: an ablation provider ("lightmotion/...",
    bench/scenario.py), so a GPU run times each choice against its absence."""
    kernels = _kernels(module)

    def call():
        saved = getattr(kernels, choice)
        setattr(kernels, choice, lambda *args: value)
        try:
            return fn()
        finally:
            setattr(kernels, choice, saved)
    return call


def _heads(x, heads):
    """[b n (h d)] -> the [b h n d] view a diffusers processor hands to SDPA."""
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2)


def _case(label, batch, n, heads, d, n_text, n_img, device, dtype, mode="fwd", quick=True, cpu=False,
          frozen_text=False):
    """frozen_text: IP-Adapter training as its authors run it (the U-Net frozen, to_k_ip / to_v_ip trained):
    the text keys and values need no gradient, so ours skips their dk/dv pass (SDPA computes them anyway)."""
    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        train = mode == "fwd+bwd"

        def proj(tokens, grad=True):
            x = torch.randn(batch, tokens, heads * d, generator=g, device=device, dtype=dtype)
            return x.requires_grad_(train and grad)

        xs = [proj(t, grad=not (frozen_text and 0 < i < 3)) for i, t in enumerate((n, n_text, n_text, n_img, n_img))]
        q, kt, vt, ki, vi = (_heads(x, heads) for x in xs)
        grad = torch.randn(batch, n, heads * d, device=device, dtype=dtype) if train else None

        def run(fn):
            if not train:
                return fn
            return lambda: fn().backward(grad)

        ours = run(lambda: lm.dual_cross_attention(q, [kt, ki], [vt, vi], [1.0, 0.6]).transpose(1, 2).reshape(
            batch, n, heads * d))
        providers = {
            "lightmotion": ours,
            "reference": run(lambda: dual_cross_attention_reference(q, [kt, ki], [vt, vi], [1.0, 0.6]).transpose(
                1, 2).reshape(batch, n, heads * d)),
            "ip_adapter_sdpa": run(lambda: ip_adapter_sdpa(q, kt, vt, ki, vi, 0.6)),
        }
        if device.type == "cuda" and d <= 128:
            # the online-softmax forward and the two-walk dq (key tiles streamed from L2 for every query
            # tile) instead of the resident-keys kernels (keys loaded once per program, query tiles pipelined)
            providers["lightmotion/streamed_keys"] = ablated(ours, "_resident_keys", False)
        if not train and device.type == "cuda" and _kernels()._dual_fwd_four_warps(d, dtype, 2):
            # the forward's 32 x 256 tiles at 8 warps (one block per SM under Triton 3.6) instead of 4 (two)
            providers["lightmotion/fwd_8_warps"] = ablated(ours, "_dual_fwd_four_warps", False)
        if train and d == 80 and device.type == "cuda":
            # dk/dv on 32-key tiles at 8 warps (half mma.sync, 1 block/SM) instead of 64-key wgmma tiles
            providers["lightmotion/dkdv_32_keys"] = ablated(ours, "_dkdv_wgmma_80", False)
        if train and d <= 64 and device.type == "cuda":
            # one dq launch per key/value set, chained through an fp32 partial sum (4 blocks/SM at 8x40)
            # instead of one launch summing both sets' dQ in registers (3 blocks/SM, 12 fewer bytes a dq element)
            providers["lightmotion/dq_launch_per_set"] = ablated(ours, "_dq_sets_per_launch", 1)
        return providers

    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = elem * batch * heads * d * (2 * n + 2 * (n_text + n_img))
    # 2 products forward (S, PV), 5 backward (S again, dP, dV, dQ, dK); a frozen condition skips dV and dK
    flops = 4.0 * batch * heads * n * d * (n_text + n_img if mode == "fwd" else
                                           (2.5 if frozen_text else 3.5) * n_text + 3.5 * n_img)
    backend = sdpa_backend(device, dtype, heads, d, mode == "fwd+bwd")
    suffix = " text frozen" if frozen_text else ""
    return Case(op="dual_cross_attention", shape=f"{label} b={batch} n={n} {heads}x{d} keys={n_text}+{n_img}{suffix}",
                setup=setup, mode=mode, dtype=str(dtype).replace("torch.", ""), bytes=nbytes, flops=flops,
                quick=quick, cpu=cpu, note=f"{NOTE}; SDPA backend here: {backend}")


def cases(device, quick):
    dtype = torch.float16
    batch = 16 * 2  # AnimateDiff: 16 frames, classifier-free guidance
    for n, d in ((4096, 40), (1024, 80), (256, 160)):
        for n_img in (4, 16):
            yield _case(f"SD1.5/AnimateDiff {int(n ** 0.5)}x{int(n ** 0.5)}", batch, n, 8, d, 77, n_img, device,
                        dtype, quick=(n_img == 4 or n == 4096))
    # SDXL at 1024x1024 (128x128 latent): 64x64 level 10 heads, 32x32 level 20 heads, head dim 64.
    for n, heads in ((4096, 10), (1024, 20)):
        yield _case("SDXL", 2, n, heads, 64, 77, 4, device, dtype, quick=False)
    # fwd+bwd (training) at the three SD1.5 levels and SDXL's 64x64 level (issue 10's targets).
    for n, d, n_img in ((4096, 40, 4), (4096, 40, 16), (1024, 80, 4), (256, 160, 4)):
        yield _case(f"SD1.5/AnimateDiff {int(n ** 0.5)}x{int(n ** 0.5)}", batch, n, 8, d, 77, n_img, device, dtype,
                    mode="fwd+bwd", quick=False)
    yield _case("SDXL", 2, 4096, 10, 64, 77, 4, device, dtype, mode="fwd+bwd", quick=False)
    # IP-Adapter training (frozen U-Net: no gradient for the text keys and values)
    yield _case("SD1.5/AnimateDiff 64x64", batch, 4096, 8, 40, 77, 4, device, dtype, mode="fwd+bwd", quick=False,
                frozen_text=True)
    yield _case("small", 2, 256, 4, 40, 77, 4, device, torch.float32, cpu=True)
    yield _case("small", 2, 256, 4, 40, 77, 4, device, torch.float32, mode="fwd+bwd", cpu=True)
