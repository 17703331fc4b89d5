"""Ahead-of-time compile check of every Triton kernel the library launches, for Hopper, without a GPU.

Run as a script (tests/test_gpu_compile.py does, in a subprocess):

    python tests/gpu_compile_check.py [--all] [--ops a,b] [--stats] [--json PATH] [--shard I/N]

1. Capture. Triton must NOT be in interpreter mode here (TRITON_INTERPRET unset), so the kernels are
   real JITFunctions. `JITFunction.run` is replaced by a recorder that binds the launch's arguments
   exactly as Triton's launcher does for a CUDA target (same binder, same specialisation of ints and
   pointer alignment, same option parsing: num_warps, num_stages, ...) and records
   (kernel, signature, constexprs, attrs, options) instead of running anything; `Autotuner.run`
   records every config. The ops are then called through their public functions on small CPU tensors
   in fp32/fp16/bf16 with the Triton backend forced (model-sized head dims, ranks, frame counts
   where cheap: nothing executes, so only host-side work grows with the shapes). Host-side choices that depend on the device are
   answered as on a GPU: `_common.triton_interpreting` (so the Triton path is taken on CPU tensors),
   `_common.device_sm_count` (132, an H100), and `trajectory_attention._interpreting/_upcast`.
   Kernels do not run, so outputs hold garbage; no launch parameter depends on tensor values.
2. Compile. Each distinct recorded launch goes through `triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 90, 32))`: TTIR -> TTGIR -> LLVM IR -> PTX -> cubin (bundled ptxas).
   Without --all a representative subset is compiled: per kernel and pointer-dtype signature the
   launch with the largest tiles (BLOCK_*/D_PAD, then stages), then one launch for every further
   combination of the kernel's own non-tile constexprs (HAS_MASK, ATOMIC, SEPARATE, NUM_COND, ...).
   --all (or LIGHTMOTION_COMPILE_ALL=1) compiles every distinct launch (tens of minutes on 2 cores).
   A launch fails if compilation raises, produces no cubin, or needs more shared memory than
   Hopper's 227 KiB per block (the launcher would raise OutOfResources; for autotune configs this is
   a warning, the autotuner prunes them). --stats runs `ptxas -v` on each PTX: registers, spills.
   A self-test first compiles a kernel the interpreter accepts but the compiler must reject.

The production Triton (3.6) can be checked with the same script by putting a `pip install --target`
copy of it first on PYTHONPATH (TRITON_CACHE_DIR separate from the default one).

Exit status 0 when everything compiled, 1 otherwise; the JSON report lists every launch and error.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("gpu_compile_check must run with TRITON_INTERPRET unset (kernels must be JITFunctions)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.compiler import make_backend  # noqa: E402

from lightmotion_fast.bench import static  # noqa: E402

TARGET = static.TARGET
SHARED_LIMIT = static.SHARED_LIMIT
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------------
# Capture


# The recorder, the GPU view of the host-side queries, ptxas -v and the launch identity live in
# lightmotion_fast/bench/static.py, which also uses them for the sm_90 report at the benchmark shapes.
RECORDER = static.RECORDER
install_gpu_view = static.install_gpu_view


# ---------------------------------------------------------------------------------------------
# Representative calls of every op's Triton path (shapes from the specs' models where cheap: the
# kernels do not run, so only host-side work scales with the shapes).


def _randn(*shape, dtype=torch.float32, grad=False):
    t = torch.randn(*shape).to(dtype)
    return t.requires_grad_() if grad else t


def calls_latent_permute(dtype):
    import lightmotion_fast as lm
    from lightmotion_fast.camera import CameraMotion
    cam = CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)
    yield lambda: lm.latent_permute(_randn(1, 3, 5, 9, 11, dtype=dtype), cam)
    yield lambda: lm.latent_permute(_randn(2, 16, 4, 40, 64, dtype=dtype), cam, layout="b f c h w")
    yield lambda: lm.latent_permute(_randn(1, 4, 16, 64, 64, dtype=dtype), cam)


def calls_latent_resample(dtype):
    import lightmotion_fast as lm
    from lightmotion_fast.camera import CameraMotion
    cam = CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)
    yield lambda: lm.latent_resample(_randn(1, 3, 5, 9, 11, dtype=dtype), lm.build_fill_map(cam, 5, 9, 11, seed=3))
    yield lambda: lm.latent_resample(_randn(2, 16, 4, 40, 64, dtype=dtype),
                                     lm.build_fill_map(cam, 16, 40, 64, seed=4), layout="b f c h w")


def calls_snr_reinject(dtype):
    import lightmotion_fast as lm
    from lightmotion_fast.ops.snr_reinject import ddim_coefficients
    c = ddim_coefficients(0.4, 0.55, 1.0)
    x = _randn(1, 4, 4, 5, 7, dtype=dtype)
    region = torch.rand(4, 5, 7) > 0.5
    yield lambda: lm.snr_reinject(x, _randn(*x.shape, dtype=dtype), c, seed=3)
    yield lambda: lm.snr_reinject(x, None, c, seed=2**33, offset=7, region=region)
    yield lambda: lm.snr_reinject(x, x.clone(), c, seed=5, offset=100, region=region)
    yield lambda: lm.snr_noise(x, seed=1)
    yield lambda: lm.snr_noise(x, seed=2**35, offset=2**33)


def calls_trajectory_attention(dtype):
    import lightmotion_fast as lm
    gen = torch.Generator().manual_seed(0)
    # (batch, pixels, frames, heads, dim), group: tiny, SVD-xt (14 frames, 64-wide heads), 25 frames, wide
    # heads; then the released semantics (two trajectories per softmax) at 14 and 25 frames: 28 and 50 rows.
    for (b, s, f, h, d, n), group in (((1, 12, 5, 2, 16, 20), 1), ((1, 64, 14, 5, 64, 80), 1),
                                      ((1, 32, 25, 2, 40, 40), 1), ((1, 16, 8, 1, 128, 16), 1),
                                      ((1, 64, 14, 5, 64, 128), 2), ((1, 64, 25, 5, 64, 128), 2)):
        for mask_invalid, deterministic in ((False, True), (True, False)):
            def call(b=b, s=s, f=f, h=h, d=d, n=n, group=group, mask_invalid=mask_invalid,
                     deterministic=deterministic):
                idx = torch.randint(0, s, (f, n), generator=gen)
                valid = torch.rand(f, n, generator=gen) > 0.25
                q, k, v = (_randn(b, s, f, h, d, dtype=dtype, grad=True) for _ in range(3))
                out = lm.trajectory_attention(q, k, v, idx, valid, mask_invalid=mask_invalid,
                                              deterministic=deterministic, group=group)
                out.backward(torch.randn_like(out))
            yield call


def calls_multi_lora(dtype):
    import lightmotion_fast as lm

    def lora(ranks, d_in, d_out):
        return ([_randn(r, d_in, dtype=dtype) for r in ranks], [_randn(d_out, r, dtype=dtype) for r in ranks])

    for (m, d_in, d_out, ranks) in ((18, 24, 20, (4, 8)), (64, 320, 320, (16, 64, 128)), (32, 64, 96, (256,))):
        x, w, bias = _randn(m, d_in, dtype=dtype), _randn(d_out, d_in, dtype=dtype), _randn(d_out, dtype=dtype)
        a, bb = lora(ranks, d_in, d_out)
        for norm in ("none", "weight", "output", "output_per_token"):
            for separate in (False, True):
                # `output` is per sample along x's first axis: two samples of m/2 tokens (not one per row).
                xs = x.reshape(2, m // 2, d_in) if norm == "output" else x
                yield (lambda x=xs, w=w, bias=bias, a=a, bb=bb, norm=norm, separate=separate:
                       lm.multi_lora_linear(x, w, bias if norm != "weight" else None, a, bb,
                                            [1.0] * len(a), norm=norm, separate=separate))

        def train(x=x, w=w, bias=bias, ranks=ranks, d_in=d_in, d_out=d_out, norm="none"):
            # the backward's launches: dx = g W + dz A_cat (the expand on Wᵀ: TMA walks W as [K, N]), and
            # for the `output` norms the two passes over the [M, R] tensors
            a, bb = lora(ranks, d_in, d_out)
            xs = x.reshape(2, m // 2, d_in) if norm == "output" else x
            leaves = [xs.clone().requires_grad_()] + [t.requires_grad_() for t in a + bb]
            y = lm.multi_lora_linear(leaves[0], w, bias, leaves[1:len(a) + 1], leaves[len(a) + 1:], [1.0] * len(a),
                                     norm=norm)
            y.backward(torch.ones_like(y))
        for norm in ("none", "output", "output_per_token"):
            yield lambda norm=norm, train=train: train(norm=norm)


def calls_plucker(dtype):
    import lightmotion_fast as lm
    k = torch.tensor([40.0, 44.0, 6.0, 5.0]).expand(2, 3, 4).contiguous()
    k33 = torch.tensor([[40.0, 0.0, 6.0], [0.0, 44.0, 5.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3, 3).contiguous()
    pose = torch.eye(4).repeat(2, 3, 1, 1)
    pose[:, :, :3, 3] = torch.randn(2, 3, 3)
    for intr in (k, k33):
        for relative in (False, True):
            yield lambda intr=intr, relative=relative: lm.plucker_embedding(
                intr, pose, 9, 11, relative=relative, dtype=dtype)
    yield lambda: lm.plucker_embedding(k.to(dtype), pose.to(dtype), 64, 96, channels_first=True)


def calls_dual_cross_attention(dtype):
    import lightmotion_fast as lm
    # head dims: 40 (SD1.5 / AnimateDiff), 64, 80, 96, 128, 160 (padded), 256; conditions: 2 (text + image) and 5
    # (chained). Up to 128 keys per condition at heads up to 128 wide the 16-bit forward keeps the keys resident;
    # (200, 4) keys and the wider heads take the online-softmax forward.
    for (b, h, n, d, lens, mask_kind) in ((2, 3, 19, 40, (13, 4), "float"), (1, 2, 256, 64, (77, 4), "bool"),
                                          (1, 2, 64, 80, (77, 16), None), (1, 2, 64, 80, (77, 16), "bool"),
                                          (1, 1, 200, 128, (77, 4), None), (1, 1, 64, 128, (128, 128), None),
                                          (1, 1, 40, 96, (5, 5, 3, 3, 2), "float"), (1, 2, 70, 40, (200, 4), "bool"),
                                          (1, 1, 40, 160, (5, 5, 3, 3, 2), "float"), (1, 1, 24, 256, (9, 4), "bool")):
        def call(b=b, h=h, n=n, d=d, lens=lens, mask_kind=mask_kind):
            q = _randn(b, h, n, d, dtype=dtype, grad=True)
            keys = [_randn(b, h, m, d, dtype=dtype, grad=True) for m in lens]
            values = [_randn(b, h, m, d, dtype=dtype, grad=True) for m in lens]
            mask = None
            if mask_kind == "float":
                mask = torch.randn(b, 1, 1, lens[0]).to(dtype)
            elif mask_kind == "bool":
                mask = torch.rand(b, 1, n, lens[0]) > 0.2
            out = lm.dual_cross_attention(q, keys, values, [1.0] + [0.5] * (len(lens) - 1), mask=mask)
            out.backward(torch.randn_like(out))
        yield call


def calls_reference_attention(dtype):
    import lightmotion_fast as lm
    # Forward and backward (Δ, dq and dk/dv launches per source).
    for (b, h, n, n_ref, d) in ((2, 2, 21, 17, 40), (1, 2, 256, 256, 64), (1, 1, 64, 64, 128), (1, 3, 5, 9, 16),
                                (1, 1, 32, 32, 256), (1, 2, 40, 24, 160)):
        def call(b=b, h=h, n=n, n_ref=n_ref, d=d):
            out = lm.reference_attention(*(_randn(b, h, m, d, dtype=dtype, grad=True) for m in (n, n, n, n_ref, n_ref)))
            out.backward(torch.randn_like(out))
        yield call
    # A reference bank broadcast over the batch (stride 0) has no TMA descriptor: the cp.async forward
    # (also every GPU before sm_90) runs in 16 bits too.
    for d in (40, 64):
        yield lambda d=d: lm.reference_attention(*(_randn(2, 2, 48, d, dtype=dtype) for _ in range(3)),
                                                 *(_randn(1, 2, 24, d, dtype=dtype).expand(2, -1, -1, -1)
                                                   for _ in range(2)))


OPS = {
    "latent_permute": calls_latent_permute,
    "latent_resample": calls_latent_resample,
    "snr_reinject": calls_snr_reinject,
    "trajectory_attention": calls_trajectory_attention,
    "multi_lora": calls_multi_lora,
    "plucker": calls_plucker,
    "dual_cross_attention": calls_dual_cross_attention,
    "reference_attention": calls_reference_attention,
}


def capture(ops):
    import lightmotion_fast as lm
    install_gpu_view()
    errors = []
    torch.manual_seed(0)  # launches do not depend on values, but --shard wants the same capture in every shard
    with lm.backend("triton"):
        for op in ops:
            for dtype in DTYPES:
                RECORDER.context = dict(op=op, dtype=str(dtype).replace("torch.", ""), autotuned=False)
                for i, call in enumerate(OPS[op](dtype)):
                    try:
                        call()
                    except Exception:
                        errors.append(dict(op=op, dtype=RECORDER.context["dtype"], call=i,
                                           error=traceback.format_exc(limit=6)))
    return RECORDER.records, errors


# ---------------------------------------------------------------------------------------------
# Selection and compilation

_TILE_KNOBS = re.compile(r"^(BLOCK|D_PAD|D$|NORM_CHUNK|PLANES|TRAJ_PER_PROG|GROUP)")


_name = static.kernel_name
_key = static.launch_key


def _dtype_sig(rec):
    return tuple(sorted((k, v) for k, v in rec["signature"].items() if v.startswith("*")))


def _tile_volume(rec):
    """(register-tile volume, stages): tiles first, so a launch that takes fewer stages for its larger
    tiles (fp32 64-row trajectory sequences: 1 stage) is still the one chosen."""
    names = {p.num: p.name for p in rec["fn"].params}
    volume = 1
    for path, v in rec["constexprs"].items():
        if len(path) == 1 and names[path[0]].startswith(("BLOCK", "D_PAD")) and isinstance(v, int):
            volume *= v
    return volume, rec["options"].num_stages


def _flags(rec):
    """The kernel's own non-tile constexpr parameters (not Triton's ==1 specialisation of ints)."""
    params = {p.num: p for p in rec["fn"].params}
    return tuple(sorted((params[p[0]].name, repr(v)) for p, v in rec["constexprs"].items()
                        if len(p) == 1 and params[p[0]].is_constexpr and not _TILE_KNOBS.match(params[p[0]].name)))


def select(records, compile_all):
    """Distinct launches. Without compile_all: per kernel and pointer dtypes, the launch with the
    largest tiles (most registers / shared memory); then one launch for each further combination of
    the kernel's non-tile constexprs (flags such as HAS_MASK, ATOMIC, SEPARATE, and the constant
    specialisations of integer arguments) not covered yet."""
    distinct = {}
    for rec in records:
        distinct.setdefault(_key(rec), rec)
    if compile_all:
        return list(distinct.values())
    largest = {}
    for rec in distinct.values():
        group = (_name(rec), _dtype_sig(rec))
        if group not in largest or _tile_volume(rec) > _tile_volume(largest[group]):
            largest[group] = rec
    chosen = list(largest.values())
    seen = {(_name(r), _flags(r)) for r in chosen}
    for rec in distinct.values():
        if (_name(rec), _flags(rec)) not in seen:
            seen.add((_name(rec), _flags(rec)))
            chosen.append(rec)
    return chosen


_ptxas_stats = static.ptxas_stats
_named_constexprs = static.named_constexprs


def compile_one(rec, stats=False):
    opts = rec["options"]
    out = dict(kernel=_name(rec), op=rec["op"], dtype=rec["dtype"], autotuned=rec["autotuned"],
               signature=rec["signature"], constexprs=_named_constexprs(rec),
               num_warps=opts.num_warps, num_stages=opts.num_stages)
    t0 = time.time()
    ck, info = static.compile_launch(rec)
    out.update(info)
    if ck is not None:
        out.update(shared=ck.metadata.shared, has_cubin=bool(ck.asm.get("cubin")))
        out["ptx_local"] = ".local" in ck.asm["ptx"]
        if stats:
            out.update(_ptxas_stats(ck.asm["ptx"]))
    out["seconds"] = round(time.time() - t0, 2)
    return out


@triton.jit
def _selftest_bad_dot_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
    # tl.dot needs every dimension >= 16 when compiled (the interpreter accepts this).
    r = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
    tl.store(out_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, a))


def selftest():
    """The check must be able to fail: a kernel the interpreter runs but the compiler rejects."""
    rec = dict(fn=_selftest_bad_dot_kernel, signature={"a_ptr": "*fp16", "out_ptr": "*fp32", "BLOCK": "constexpr"},
               constexprs={(2,): 8}, attrs={}, options=make_backend(TARGET).parse_options({"num_warps": 4}),
               op="selftest", dtype="float16", autotuned=False)
    return compile_one(rec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", default=os.environ.get("LIGHTMOTION_COMPILE_ALL") == "1")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--stats", action="store_true", help="ptxas -v registers / spills per kernel")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--list", action="store_true", help="capture and select only; compile nothing")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="compile only every N-th selected launch from the I-th (run N of these side by side "
                             "on N cores; the capture and selection are deterministic, so the shards partition it)")
    args = parser.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; known: {sorted(OPS)}")
    shard, n_shards = (int(v) for v in args.shard.split("/"))
    if not 0 <= shard < n_shards:
        parser.error(f"--shard I/N needs 0 <= I < N, got {args.shard}")

    t0 = time.time()
    bad = selftest()
    print(f"self-test: a tl.dot with 8-wide tiles {'is rejected (good)' if not bad['ok'] else 'COMPILED (bad)'}: "
          f"{bad.get('error', '').strip().splitlines()[-1] if not bad['ok'] else ''}", flush=True)
    records, capture_errors = capture(ops)
    selected = select(records, args.all)
    chosen = selected[shard::n_shards]
    print(f"captured {len(records)} launches ({len({_key(r) for r in records})} distinct) in "
          f"{time.time() - t0:.1f}s; compiling {len(chosen)} for sm_90"
          + (f" (shard {shard} of {n_shards})" if n_shards > 1 else ""), flush=True)
    if args.list:
        for rec in chosen:
            print(f"     {_name(rec):34s} {rec['dtype']:8s} tiles={_tile_volume(rec)} flags={_flags(rec)}")
    results = []
    for rec in ([] if args.list else chosen):
        res = compile_one(rec, stats=args.stats)
        results.append(res)
        extra = ""
        if args.stats and res["ok"]:
            extra = f" regs={res['registers']} spill={res['spill_stores']}/{res['spill_loads']}"
        print(f"{'ok  ' if res['ok'] else 'FAIL'} {res['seconds']:6.2f}s {res['kernel']:34s} {res['dtype']:8s} "
              f"warps={res['num_warps']} stages={res['num_stages']}{extra}", flush=True)
        if not res["ok"]:
            print("     " + res["error"].replace("\n", "\n     "), flush=True)
    for err in capture_errors:
        print(f"CAPTURE ERROR {err['op']} {err['dtype']} call {err['call']}:\n{err['error']}", flush=True)
    kernels = sorted({_name(r) for r in records})
    report = dict(target=repr(TARGET), triton=triton.__version__, torch=torch.__version__, selftest=bad,
                  shard=[shard, n_shards], selection=[static.launch_id(r) for r in selected],
                  kernels=kernels, capture_errors=capture_errors, results=results,
                  ops_launching={op: sorted({_name(r) for r in records if r["op"] == op}) for op in ops})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} compiled, {len(capture_errors)} capture errors, "
          f"{time.time() - t0:.1f}s total")
    for r in results:
        if r.get("warning"):
            print(f"warning: {r['kernel']} {r['dtype']}: {r['warning']}")
    return 1 if failed or capture_errors or bad["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
