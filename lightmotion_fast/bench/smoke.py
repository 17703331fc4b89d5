"""Launch every Triton kernel of the library once at odd edge shapes: the script compute-sanitizer runs.

    python -m lightmotion_fast.bench.smoke [--ops latent_permute,...] [--dtypes float32,float16]

Each op runs through its public function with the Triton backend forced, forward and (where the op is
differentiable) backward, at shapes that are not multiples of any tile (1, 3, 5, 7, ... elements,
head dims 40 and 80, single-row batches, strided views), and is compared with the PyTorch reference
(relative error per dtype; a NaN fails). On a CUDA device the kernels run compiled; on a CPU they
run through Triton's interpreter (TRITON_INTERPRET=1 is set here before triton is imported), which
is how the test suite runs this file.

Every launch is recorded by wrapping Triton's launch entry points, and the run fails if a kernel
defined in lightmotion_fast.kernels (a `*_kernel` JIT function) was never launched, so a new kernel
cannot slip past the sanitizer unnoticed. Exit status 0 when every op matched its reference and every
kernel launched. Under compute-sanitizer set PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that each tensor
is its own allocation and an out-of-bounds access is not hidden inside a cached block.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
from collections.abc import Callable, Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOLERANCE = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}   # relative L2 error
launched: set[str] = set()


# ---------------------------------------------------------------------------------------------
# Launch recording


def _kernel_name(obj) -> str | None:
    """The Python name of a JIT/interpreted/autotuned Triton kernel object (None for anything else)."""
    for _ in range(4):   # Autotuner(Heuristics(JITFunction)) nests at most a few levels
        fn = getattr(obj, "fn", None)
        if fn is None:
            return None
        if callable(fn) and hasattr(fn, "__code__"):
            return fn.__name__
        obj = fn
    return None


def _record_launches() -> None:
    """Wrap the classes' `run` (what `kernel[grid](...)` and autotuners call) to note each kernel."""
    from triton.runtime import jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    for cls in classes:
        if getattr(cls.run, "_smoke_recording", False):
            continue
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            name = _kernel_name(self)
            if name:
                launched.add(name)
            return _original(self, *args, **kwargs)

        run._smoke_recording = True
        cls.run = run


def library_kernels() -> set[str]:
    """Every `*_kernel` Triton function defined in lightmotion_fast.kernels."""
    import lightmotion_fast.kernels as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for attr, obj in vars(module).items():
            name = _kernel_name(obj)
            if name and name.endswith("_kernel") and attr == name:
                names.add(name)
    return names


# ---------------------------------------------------------------------------------------------
# The calls: each yields (label, run) where run(backend) returns the tensors to compare.


def _rand(*shape, dtype, device, gen, grad=False):
    t = torch.randn(*shape, generator=gen, device="cpu").to(device=device, dtype=dtype)
    return t.requires_grad_() if grad else t


def _forward_backward(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run fn, back-propagate a fixed random gradient, return [out, *grads] (grads reset for the next run)."""
    out = fn()
    g = torch.Generator(device="cpu").manual_seed(7)
    out.backward(torch.randn(out.shape, generator=g).to(out))
    grads = []
    for x in inputs:
        grads.append(x.grad.detach().clone())
        x.grad = None
    return [out.detach()] + grads


def calls_latent_permute(dtype, device, gen):
    import lightmotion_fast as lm

    cam = lm.CameraMotion(pan=(0.31, -0.17), zoom=0.13, rotate=-11)
    z = _rand(1, 3, 5, 7, 9, dtype=dtype, device=device, gen=gen)
    yield "b c f h w 1x3x5x7x9", lambda: list(lm.latent_permute(z, cam))
    zs = _rand(2, 5, 3, 11, 13, dtype=dtype, device=device, gen=gen).transpose(3, 4)   # strided view
    yield "b f c h w strided 2x5x3x13x11", lambda: list(lm.latent_permute(zs, cam, layout="b f c h w"))


def calls_latent_resample(dtype, device, gen):
    import lightmotion_fast as lm

    cam = lm.CameraMotion(pan=(0.31, -0.17), zoom=0.13, rotate=-11)
    z = _rand(1, 3, 5, 7, 9, dtype=dtype, device=device, gen=gen)
    fill = lm.build_fill_map(cam, 5, 7, 9, seed=3)
    yield "b c f h w 1x3x5x7x9", lambda: [lm.latent_resample(z, fill)]
    zs = _rand(2, 5, 3, 11, 13, dtype=dtype, device=device, gen=gen)
    fill2 = lm.build_fill_map(cam, 5, 11, 13, seed=4)
    yield "b f c h w 2x5x3x11x13", lambda: [lm.latent_resample(zs, fill2, layout="b f c h w")]


def calls_snr_reinject(dtype, device, gen):
    import lightmotion_fast as lm
    from lightmotion_fast.ops.snr_reinject import ddim_coefficients

    c = ddim_coefficients(0.4, 0.55, 1.0)
    x = _rand(1, 3, 5, 7, 9, dtype=dtype, device=device, gen=gen)
    m = _rand(1, 3, 5, 7, 9, dtype=dtype, device=device, gen=gen)
    region = (torch.rand(5, 7, 9, generator=gen) > 0.5).to(device)
    yield "1x3x5x7x9", lambda: [lm.snr_reinject(x, m, c, seed=3, offset=11)]
    yield "region, no model output", lambda: [lm.snr_reinject(x, None, c, seed=2 ** 33, offset=7, region=region)]
    yield "snr_noise", lambda: [lm.snr_noise(x, seed=5, offset=2 ** 33)]


def calls_trajectory_attention(dtype, device, gen):
    import lightmotion_fast as lm

    b, s, f, h, d, n = 1, 7 * 5, 5, 3, 40, 23
    idx = torch.randint(0, s, (f, n), generator=gen).to(device)
    valid = (torch.rand(f, n, generator=gen) > 0.25).to(device)
    qkv = [_rand(b, s, f, h, d, dtype=dtype, device=device, gen=gen, grad=True) for _ in range(3)]
    for mask_invalid, deterministic in ((False, True), (True, False)):
        yield (f"1x35x5x3x40 mask_invalid={mask_invalid} deterministic={deterministic}",
               lambda mi=mask_invalid, det=deterministic: _forward_backward(
                   lambda: lm.trajectory_attention(*qkv, idx, valid, mask_invalid=mi, deterministic=det), qkv))


def calls_multi_lora(dtype, device, gen):
    import lightmotion_fast as lm

    m, d_in, d_out, ranks = 19, 40, 24, (3, 8)
    x = _rand(m, d_in, dtype=dtype, device=device, gen=gen, grad=True)
    w = _rand(d_out, d_in, dtype=dtype, device=device, gen=gen)
    bias = _rand(d_out, dtype=dtype, device=device, gen=gen)
    a = [(0.3 * _rand(r, d_in, dtype=dtype, device=device, gen=gen)).requires_grad_() for r in ranks]
    bb = [(0.3 * _rand(d_out, r, dtype=dtype, device=device, gen=gen)).requires_grad_() for r in ranks]
    for norm in ("none", "weight", "output"):
        yield (f"M={m} d={d_in}->{d_out} r={ranks} norm={norm}",
               lambda norm=norm: _forward_backward(
                   lambda: lm.multi_lora_linear(x, w, bias, a, bb, [1.0, 0.6], norm=norm), [x] + a + bb))
    # norm="output" on [samples, tokens, d]: the per-sample norm (its own reduce kernel), odd token count.
    xs = _rand(2, 7, d_in, dtype=dtype, device=device, gen=gen, grad=True)
    yield (f"2x7 d={d_in}->{d_out} r={ranks} norm=output per sample",
           lambda: _forward_backward(
               lambda: lm.multi_lora_linear(xs, w, bias, a, bb, [1.0, 0.6], norm="output"), [xs] + a + bb))


def calls_plucker(dtype, device, gen):
    import lightmotion_fast as lm

    k = torch.tensor([40.0, 44.0, 6.0, 5.0], device=device).expand(2, 3, 4).contiguous()
    pose = torch.eye(4, device=device).repeat(2, 3, 1, 1)
    pose[:, :, :3, 3] = torch.randn(2, 3, 3, generator=gen).to(device)
    yield "2x3x9x11", lambda: [lm.plucker_embedding(k, pose, 9, 11, dtype=dtype)]
    yield "relative channels_first 2x3x7x5", lambda: [lm.plucker_embedding(k, pose, 7, 5, relative=True,
                                                                           dtype=dtype, channels_first=True)]


def calls_dual_cross_attention(dtype, device, gen):
    import lightmotion_fast as lm

    # The third: enough queries that the dk/dv walk splits over programs and the last split of each key
    # tile adds the others' fp32 partials (an atomic count; under the sanitizer's memcheck and racecheck).
    for (b, h, n, d, lens, masked) in ((2, 3, 19, 40, (13, 5), True), (1, 2, 33, 80, (7, 3, 2), False),
                                       (1, 1, 520, 40, (13, 5), False)):
        q = _rand(b, h, n, d, dtype=dtype, device=device, gen=gen, grad=True)
        keys = [_rand(b, h, m, d, dtype=dtype, device=device, gen=gen, grad=True) for m in lens]
        values = [_rand(b, h, m, d, dtype=dtype, device=device, gen=gen, grad=True) for m in lens]
        mask = (torch.rand(b, 1, n, lens[0], generator=gen) > 0.2).to(device) if masked else None
        scales = [1.0] + [0.5] * (len(lens) - 1)
        yield (f"{b}x{h}x{n}x{d} keys={lens} mask={masked}",
               lambda q=q, keys=keys, values=values, mask=mask, scales=scales: _forward_backward(
                   lambda: lm.dual_cross_attention(q, keys, values, scales, mask=mask), [q] + keys + values))


def calls_reference_attention(dtype, device, gen):
    import lightmotion_fast as lm

    for (b, h, n, n_ref, d) in ((2, 3, 21, 17, 40), (1, 1, 9, 5, 80)):
        qkv = [_rand(b, h, m, d, dtype=dtype, device=device, gen=gen, grad=True) for m in (n, n, n, n_ref, n_ref)]
        yield (f"{b}x{h} n={n}+{n_ref} d={d}",
               lambda qkv=qkv: _forward_backward(lambda: lm.reference_attention(*qkv), qkv))


OPS: dict[str, Callable[..., Iterator]] = {
    "latent_permute": calls_latent_permute,
    "latent_resample": calls_latent_resample,
    "snr_reinject": calls_snr_reinject,
    "trajectory_attention": calls_trajectory_attention,
    "multi_lora": calls_multi_lora,
    "plucker": calls_plucker,
    "dual_cross_attention": calls_dual_cross_attention,
    "reference_attention": calls_reference_attention,
}


# ---------------------------------------------------------------------------------------------
# Checking


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got - want‖ / ‖want‖ in float64 (inf when shapes differ or got holds a NaN that want lacks)."""
    if got.shape != want.shape:
        return float("inf")
    g, w = got.double().cpu(), want.double().cpu()
    if torch.isnan(g).ne(torch.isnan(w)).any():
        return float("inf")
    g, w = torch.nan_to_num(g), torch.nan_to_num(w)
    if not g.is_floating_point():
        return 0.0 if torch.equal(g, w) else float("inf")
    return ((g - w).norm() / w.norm().clamp_min(1e-12)).item()


def run_smoke(ops: list[str], dtypes: list[torch.dtype], device: torch.device,
              printer: Callable[[str], None] = print) -> list[str]:
    """Run every call with the Triton backend and the reference; return the failures (empty: all good)."""
    import lightmotion_fast as lm

    _record_launches()
    failures = []
    for op in ops:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            for label, call in OPS[op](dtype, device, gen):
                t0 = time.perf_counter()
                try:
                    with lm.backend("triton"):
                        got = call()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    with lm.backend("reference"):
                        want = call()
                except Exception as exc:  # every call is tried; the report lists what raised
                    failures.append(f"{op} {dtype} {label}: {type(exc).__name__}: {exc}")
                    printer(f"  FAIL {op} {str(dtype)[6:]} {label}: {type(exc).__name__}: {exc}")
                    continue
                errors = [relative_error(g, w) for g, w in zip(got, want)]
                worst = max(errors)
                ok = worst <= TOLERANCE[dtype]
                if not ok:
                    failures.append(f"{op} {dtype} {label}: relative error {worst:.3g} > {TOLERANCE[dtype]:g}")
                printer(f"  {'ok  ' if ok else 'FAIL'} {op} {str(dtype)[6:]} {label}: max rel err {worst:.2e} "
                        f"({time.perf_counter() - t0:.1f} s)")
    return failures


def device_gated(device: torch.device, dtypes: list[torch.dtype]) -> set[str]:
    """Kernels this device and these dtypes never launch, so the smoke does not expect them: the TMA
    kernels (the reference forward, the multi-LoRA expand) run only on sm_90+ with 16-bit inputs
    (tests/test_reference_attention.py and tests/test_multi_lora.py run them through the interpreter by
    answering the device query as sm_90), the dual attention's resident-keys kernels only with 16-bit
    inputs (tests/test_dual_cross_attention.py runs them through the interpreter in fp16 and bf16)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    sixteen_bit = any(d in (torch.float16, torch.bfloat16) for d in dtypes)
    tma = {"_reference_attention_fwd_tma_kernel", "_multi_lora_expand_tma_kernel"}
    resident = {"_dual_cross_attention_fwd_resident_kernel", "_dual_bwd_dq_resident_kernel"}
    gated = set() if sixteen_bit else resident
    return gated if capability and capability >= (9, 0) and sixteen_bit else gated | tma


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated, from: " + ", ".join(OPS))
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated torch dtypes (default: float32,float16,bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {sorted(OPS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = "float32,float16,bfloat16" if device.type == "cuda" else "float32"
    dtypes = [getattr(torch, name) for name in (args.dtypes or default).split(",")]
    mode = "compiled" if device.type == "cuda" else "Triton interpreter"
    print(f"smoke: {len(ops)} op(s) on {device} ({mode}), dtypes {[str(d)[6:] for d in dtypes]}", flush=True)
    failures = run_smoke(ops, dtypes, device)
    if set(ops) == set(OPS):
        missing = sorted(library_kernels() - launched - device_gated(device, dtypes))
        print(f"kernels launched: {len(launched)}: {', '.join(sorted(launched))}")
        if missing:
            failures.append(f"kernels never launched by the smoke calls: {missing} (add a call for them here)")
    for f in failures:
        print(f"FAILED: {f}")
    print("smoke: OK" if not failures else f"smoke: {len(failures)} failure(s)", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
