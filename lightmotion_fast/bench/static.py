"""Static sm_90 performance report: every Triton launch the ops make at the benchmark shapes, compiled
ahead of time for Hopper and read back from the compiler's output, without a GPU.

    python -m lightmotion_fast bench --static [--ops a b ...]
    python -m lightmotion_fast.bench.static [--ops a,b] [--cases REGEX] [--json PATH] [--no-write]

1. Capture. The benchmark scenarios (benchmarks/scenarios/*.py) are asked for their cases as on a CUDA
   device (so they pick the GPU dtypes and shapes). For every case the op is called through its public
   function the way the scenario's "lightmotion" provider calls it (both trajectory modes, backward too
   for "fwd+bwd" cases), on CPU tensors from `torch.empty` at the case's shape; the shape parameters
   are read from the case's `setup` closure, so the scenario stays the one source of the shapes.
   `JITFunction.run` is replaced by a recorder that binds the arguments exactly as Triton's launcher does
   for a CUDA target (same binder, same specialisation of integers and pointer alignment) and records
   the launch instead of running it (`install_gpu_view`); every autotune config is recorded.
   Nothing executes: outputs hold garbage, and no launch parameter depends on tensor values.
2. Compile. Each distinct launch is compiled once with `triton.compile(..., target=GPUTarget("cuda",
   90, 32))` down to a cubin (Triton's own cache, TRITON_CACHE_DIR, makes a rerun cheap), then analysed:
   `ptxas -v` (registers, spills), `metadata.shared`, the PTX (64-bit integer divisions) and the SASS
   from the bundled `cuobjdump -sass` (global loads/stores by width, cp.async = LDGSTS, TMA =
   UTMALDG/UBLKCP, wgmma = HGMMA vs mma.sync = HMMA, atomics, instruction counts). The analysis is
   cached next to Triton's cache, keyed by the kernel's hash.
3. Report. One row per (case, launch) with the case's roofline floor on H100 and H200 from its bytes and
   FLOPs, written to benchmarks/results/sm90-static.csv and rendered as sm90-static.md. With --ops or
   --cases the rows of the other cases already in the CSV are kept, so a partial run updates the report.

Occupancy follows the CUDA occupancy rules for sm_90: 65,536 registers per SM allocated per warp in
units of 256, at most 64 warps and 32 blocks per SM, 228 KiB of shared memory per SM with 1 KiB reserved
per block. tests/test_sm90_invariants.py holds the hot kernels' design invariants against these rows.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import autotuner as _autotuner
from triton.runtime import jit as _jit
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

TARGET = GPUTarget("cuda", 90, 32)
# Hopper's shared memory per block (227 KiB opt-in). Triton's launcher raises OutOfResources above it
# when the kernel is loaded; compilation itself succeeds.
SHARED_LIMIT = 232448
REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
ANALYSIS_VERSION = 1   # bump when `analyse` changes what it records (invalidates the analysis cache)

# sm_90 (H100 / H200) resources per SM, for the occupancy columns.
SM90 = dict(regs_per_sm=65536, reg_alloc_unit=256, max_warps=64, max_blocks=32,
            smem_per_sm=233472, smem_reserved_per_block=1024, sm_count=132)

# Ceilings: (bytes/s copy, bf16 dense FLOP/s). "measured" are the rates measured on the lent machines.
CEILINGS = {
    "h100": (3.0e12, 798e12),        # H100 SXM, measured copy bandwidth and bf16 GEMM
    "h100_peak": (3.35e12, 989e12),  # H100 SXM datasheet
    "h200": (4.3e12, 788e12),        # H200, measured
}
# Matrix products PyTorch runs in fp32 or fp64 do not use the 16-bit tensor-core rate: H100 and H200 (SXM)
# both do 67 TFLOP/s fp32 on the FMA units (TF32 products are off by default:
# torch.backends.cuda.matmul.allow_tf32) and 67 TFLOP/s fp64 on the tensor cores (datasheet; not measured).
WIDE_MATMUL_RATE = {"float32": 66.9e12, "float64": 66.9e12}


# ---------------------------------------------------------------------------------------------
# Capture: the launch path and the device queries answered as on a Hopper GPU


class Recorder:
    """Binds each launch like Triton's CUDA launcher and keeps (kernel, signature, constexprs, attrs,
    options, grid) together with `context` (op, case, dtype of the call in progress)."""

    def __init__(self):
        self.backend = make_backend(TARGET)
        self.binders = {}
        self.records = []
        self.context = {}
        self.torch_case = None      # the case label while an op's call is being captured
        self.torch_ops = []

    def record_torch(self, func, args, kwargs, out):
        entry = torch_entry(func, args, kwargs, out)
        if entry is not None:
            self.torch_ops.append(dict(entry, case=self.torch_case, op=self.context.get("op", "")))

    def record(self, fn, args, kwargs, grid=None):
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
        # The options JITFunction.run adds before binding (the set varies across Triton versions).
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(triton.knobs.compilation, name):
                kwargs[name] = getattr(triton.knobs.compilation, name)
        binder = self.binders.get(fn)
        if binder is None:
            binder = self.binders[fn] = _jit.create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        self.records.append(dict(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs, options=options,
                                 programs=_programs(grid, bound_args), **self.context))


def _programs(grid, bound_args):
    """Number of programs the launch would start (None when the grid cannot be evaluated)."""
    try:
        if callable(grid):
            grid = grid(bound_args)
        total = 1
        for g in tuple(grid):
            total *= int(g)
        return total
    except Exception:  # noqa: BLE001 - the grid is informative only
        return None


RECORDER = Recorder()


def _jit_run(self, *args, grid, warmup, **kwargs):
    RECORDER.record(self, args, kwargs, grid)
    return None


def _autotune_run(self, *args, **kwargs):
    # Every config, as the autotuner would benchmark them on the GPU.
    RECORDER.context["autotuned"] = True
    try:
        for config in self.configs:
            if config.pre_hook:   # e.g. TMA descriptors' boxes per config, as the autotuner sets them
                config.pre_hook({**dict(zip(self.arg_names, args)), **kwargs, **config.all_kwargs()})
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
    finally:
        RECORDER.context["autotuned"] = False


def install_gpu_view():
    """Patch the launch path and the host-side device queries to behave as on a Hopper GPU."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the sm_90 capture needs TRITON_INTERPRET unset (kernels must be JITFunctions)")
    _jit.JITFunction.run = _jit_run
    _autotuner.Autotuner.run = _autotune_run
    from lightmotion_fast.ops import _common
    _common.triton_interpreting = lambda: True          # take the Triton path for CPU tensors
    _common.device_sm_count = lambda device: 132        # an H100 SXM
    _common.device_capability = lambda device: (9, 0)
    traj = _common.kernel_module("trajectory_attention")
    traj._interpreting = lambda t: False
    traj._upcast = lambda t: False


# ---------------------------------------------------------------------------------------------
# Launch identity, compilation


def kernel_name(rec):
    return rec["fn"].fn.__name__


def launch_key(rec):
    opts = rec["options"]
    return (kernel_name(rec), repr(sorted(rec["signature"].items())), repr(sorted(rec["constexprs"].items())),
            repr(sorted(rec["attrs"].items())), opts.num_warps, opts.num_stages, opts.num_ctas)


def launch_id(rec):
    """A short stable id of a distinct launch (the CSV's join key)."""
    return hashlib.sha1(repr(launch_key(rec)).encode()).hexdigest()[:10]


def named_constexprs(rec):
    """{param name: value} for the constexprs (kernel constexpr params and ints specialised to 1)."""
    params = {p.num: p.name for p in rec["fn"].params}
    return {(params[k[0]] if len(k) == 1 else str(k)): (v if isinstance(v, (int, float, str, bool)) else repr(v))
            for k, v in rec["constexprs"].items()}


def kernel_constexprs(rec):
    """Only the kernel's declared tl.constexpr parameters (tiles and flags), as 'NAME=value' text."""
    params = {p.num: p for p in rec["fn"].params}
    items = [(params[k[0]].name, v) for k, v in rec["constexprs"].items()
             if len(k) == 1 and params[k[0]].is_constexpr]
    return ",".join(f"{n}={v}" for n, v in items)


def compile_launch(rec):
    """triton.compile for sm_90; returns (CompiledKernel or None, info dict)."""
    opts = rec["options"]
    info = dict(ok=True)
    src = ASTSource(fn=rec["fn"], signature=rec["signature"], constexprs=rec["constexprs"], attrs=rec["attrs"])
    try:
        ck = triton.compile(src, target=TARGET, options=opts.__dict__)
    except Exception as e:  # noqa: BLE001 - every failure is reported
        return None, dict(ok=False, error=f"{type(e).__name__}: {e}"[:4000])
    if not ck.asm.get("cubin"):
        info.update(ok=False, error="no cubin produced")
    elif ck.metadata.shared > SHARED_LIMIT:
        msg = f"OutOfResources: {ck.metadata.shared} bytes of shared memory, Hopper allows {SHARED_LIMIT}"
        if rec.get("autotuned"):
            info["warning"] = msg + " (autotune config: pruned at run time)"
        else:
            info.update(ok=False, error=msg)
    return ck, info


def _bin(name):
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def ptxas_stats(ptx):
    """ptxas -v on the PTX: registers, spill bytes, stack frame."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(TARGET.arch).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    text = res.stdout + res.stderr

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None

    return dict(registers=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack_frame=grab(r"(\d+) bytes stack frame"),
                ptxas_info=" | ".join(line.strip() for line in text.splitlines() if "ptxas info" in line))


def sass_text(cubin):
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([str(_bin("cuobjdump")), "-sass", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {res.stderr[-2000:]}")
    return res.stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _width(opcode):
    """Access width in bits from a load/store opcode's modifiers (LDG.E.128, STG.E.U16, LDG.E ...)."""
    mods = opcode.split(".")[1:]
    for m in mods:
        if m in ("128", "64"):
            return int(m)
        if m in ("U16", "S16"):
            return 16
        if m in ("U8", "S8"):
            return 8
    return 32


def sass_counts(sass):
    """Static SASS instruction counts: global accesses by width, async copies, MMA kind, atomics."""
    c = dict(ldg_128=0, ldg_64=0, ldg_32=0, ldg_16=0, ldg_8=0, stg_128=0, stg_64=0, stg_32=0, stg_16=0, stg_8=0,
             ldgsts=0, ldgsts_128=0, tma=0, hgmma=0, hmma=0, atomics=0, mufu=0, bar=0, calls=0, instructions=0,
             backward_branches=0)
    for m in _SASS_LINE.finditer(sass):
        addr, opcode, operands = int(m.group(1), 16), m.group(3), m.group(4)
        base = opcode.split(".")[0]
        if base == "NOP":
            continue
        c["instructions"] += 1
        if base in ("LDG", "STG"):
            c[f"{base.lower()}_{_width(opcode)}"] += 1
        elif base == "LDGSTS":
            c["ldgsts"] += 1
            c["ldgsts_128"] += _width(opcode) == 128
        elif base in ("UTMALDG", "UBLKCP", "UTMASTG", "UTMAREDG"):
            c["tma"] += 1
        elif base == "HGMMA":
            c["hgmma"] += 1
        elif base == "HMMA":
            c["hmma"] += 1
        elif base in ("RED", "REDG", "ATOM", "ATOMG"):
            c["atomics"] += 1
        elif base == "MUFU":
            c["mufu"] += 1
        elif base == "BAR":
            c["bar"] += 1
        elif base == "CALL":
            c["calls"] += 1
        elif base == "BRA":
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) <= addr:
                c["backward_branches"] += 1
    # A kernel ends with `EXIT; BRA <self>` (padding): not a loop.
    c["backward_branches"] = max(0, c["backward_branches"] - 1)
    return c


def ptx_div64(ptx):
    """64-bit integer divisions / remainders in the PTX (each becomes a ~70-instruction subroutine call)."""
    return len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx))


def _analysis_cache_dir():
    knobs = getattr(triton, "knobs", None)
    base = os.environ.get("TRITON_CACHE_DIR") or (knobs.cache.dir if knobs else Path.home() / ".triton" / "cache")
    path = Path(base) / "lightmotion_static"
    path.mkdir(parents=True, exist_ok=True)
    return path


def analyse(ck):
    """Registers, spills, shared memory and SASS/PTX counts of a compiled kernel (cached by its hash)."""
    cache = _analysis_cache_dir() / f"{ck.hash}-v{ANALYSIS_VERSION}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    ptx = ck.asm["ptx"]
    out = dict(shared=ck.metadata.shared, div64=ptx_div64(ptx), **ptxas_stats(ptx), **sass_counts(sass_text(
        ck.asm["cubin"])))
    cache.write_text(json.dumps(out))
    return out


def occupancy(registers, shared, warps):
    """(resident blocks, resident warps) per SM on sm_90 from registers/thread, shared bytes/block, warps."""
    if registers is None:
        return None, None
    per_warp = -(-registers * 32 // SM90["reg_alloc_unit"]) * SM90["reg_alloc_unit"]
    by_regs = (SM90["regs_per_sm"] // per_warp) // warps
    by_warps = SM90["max_warps"] // warps
    by_smem = SM90["smem_per_sm"] // (shared + SM90["smem_reserved_per_block"])
    blocks = min(by_regs, by_warps, by_smem, SM90["max_blocks"])
    return blocks, blocks * warps


# ---------------------------------------------------------------------------------------------
# The benchmark cases and the calls their "lightmotion" provider makes


class _CudaDevice:
    """What a scenario's `cases()` sees of the device: a CUDA one (nothing is allocated on it)."""
    type = "cuda"
    index = 0

    def __repr__(self):
        return "cuda:0 (static capture)"


class _CaseParams(dict):
    """A case's parameters; a missing one names the case and what its setup does close over."""

    def __init__(self, case):
        super().__init__(inspect.getclosurevars(case.setup).nonlocals)
        self.label = f"{case.op} | {case.shape}"

    def __missing__(self, key):
        raise KeyError(f"the static capture reads {key!r} from the setup closure of case '{self.label}', whose "
                       f"setup closes over {sorted(self)}: the scenario's setup must use it (or the capture must "
                       f"read another name)")


def _params(case):
    """The shape parameters a case's setup closes over (its `_case(...)` arguments, those it uses)."""
    return _CaseParams(case)


def _scenario(case):
    return case.setup.__globals__


def _empty(*shape, dtype, grad=False):
    return torch.empty(*shape, dtype=dtype).requires_grad_(grad)


def _maybe_backward(out, mode, inputs):
    """For a fwd+bwd case, the gradients of `inputs` (those that require them), returned rather than
    accumulated into `.grad`: a second call does the same work as the first, as in a training step after
    the optimiser's `zero_grad`."""
    if mode == "fwd+bwd":
        torch.autograd.grad(out, [t for t in inputs if t.requires_grad], torch.empty_like(out))


def _view_bcfhw(z, layout):
    return z if layout == "b c f h w" else z.transpose(1, 2)


def calls_latent_permute(case):
    import lightmotion_fast as lm
    p = _params(case)
    z = _empty(*p["shape"], dtype=p["dtype"])
    yield "", lambda: lm.latent_permute(z, _scenario(case)["CAMERA"], layout=p["layout"])


def calls_latent_resample(case):
    import lightmotion_fast as lm
    if case.mode == "build":   # the fill-map build runs on the CPU: no kernel
        return
    p, g = _params(case), _scenario(case)
    z = _empty(*p["shape"], dtype=p["dtype"])
    _, _, f, h, w = _view_bcfhw(z, p["layout"]).shape
    fill = lm.build_fill_map(g["CAMERA"], f, h, w, background=g["background_mask"](f, h, w), seed=0)
    yield "", lambda: lm.latent_resample(z, fill, layout=p["layout"])


def calls_snr_reinject(case):
    import lightmotion_fast as lm
    from lightmotion_fast.ops.snr_reinject import ddim_coefficients
    p = _params(case)
    x, eps = (_empty(*p["shape"], dtype=p["dtype"]) for _ in range(2))
    yield "", lambda: lm.snr_reinject(x, eps, ddim_coefficients(0.4, 0.55, 1.0), seed=0, offset=0)


def calls_plucker(case):
    import lightmotion_fast as lm
    p = _params(case)
    k, c2w = _scenario(case)["cameras"](p["batch"], p["frames"], p["height"], p["width"], torch.device("cpu"))
    yield "", lambda: lm.plucker_embedding(k, c2w, p["height"], p["width"], dtype=p["dtype"], validate=False)


def calls_multi_lora(case):
    import lightmotion_fast as lm
    p = _params(case)
    rows, d, ranks, dtype, train = p["rows"], p["d"], p["ranks"], p["dtype"], case.mode == "fwd+bwd"
    g = torch.Generator().manual_seed(0)
    # LoRA factors hold real values: the `weight` normalisation reads them on the host.
    lora_a = [(torch.randn(r, d, generator=g) * d ** -0.5).to(dtype).requires_grad_(train) for r in ranks]
    lora_b = [(torch.randn(d, r, generator=g) * r ** -0.5).to(dtype).requires_grad_(train) for r in ranks]
    x, w, b = _empty(*rows, d, dtype=dtype, grad=train), _empty(d, d, dtype=dtype), _empty(d, dtype=dtype)
    scales = [1.0, 0.5, 0.8][:len(ranks)]

    def call():
        if train:   # a training step, as the benchmark times it: the optimiser changed the LoRA weights, so
            for t in (*lora_a, *lora_b):   # the recorded call rebuilds the weight cache (its norms included)
                torch.autograd.graph.increment_version(t)
        _maybe_backward(lm.multi_lora_linear(x, w, b, lora_a, lora_b, scales, norm=p["norm"], separate=p["separate"]),
                        case.mode, [x, *lora_a, *lora_b])
    yield "", call


def calls_trajectory_attention(case):
    import lightmotion_fast as lm
    from lightmotion_fast.camera.trajectories import TrajectoryTables
    if "level_size" not in _params(case):   # the whole-UNet case: its launches are the per-level ones
        return
    p, g = _params(case), _scenario(case)
    (height, width), frames, heads, batch = p["level_size"], p["frames"], p["heads"], p["batch"]
    n_pix = height * width
    gen = torch.Generator().manual_seed(0)
    coords, valid = g["moving_points"](frames, 4 * n_pix, p["frame_size"], gen)
    level = TrajectoryTables(coords, valid, p["frame_size"], (height, width), levels=1, seed=0).level(n_pix)
    train = case.mode == "fwd+bwd"
    # The branch's projections give q/k/v as views of [(b s), f, (h d)]: contiguous [b s f h d].
    shape = (batch, n_pix, frames, heads, p["channels"] // heads)
    for variant in VARIANTS["trajectory_attention"]:
        def call(deterministic=(variant == "deterministic")):
            q, k, v = (_empty(*shape, dtype=p["dtype"], grad=train) for _ in range(3))
            # as the benchmark's provider calls it: with the level's TrajectoryIndex, built once
            out = lm.trajectory_attention(q, k, v, level.index, deterministic=deterministic)
            _maybe_backward(out, case.mode, [q, k, v])
        yield variant, call


def _heads_view(batch, tokens, heads, d, dtype, grad):
    """[b n (h d)] -> the [b h n d] view a diffusers processor hands to SDPA."""
    return _empty(batch, tokens, heads * d, dtype=dtype, grad=grad).view(batch, tokens, heads, d).transpose(1, 2)


def calls_dual_cross_attention(case):
    import lightmotion_fast as lm
    p = _params(case)
    train = case.mode == "fwd+bwd"
    frozen = (False, p["frozen_text"], p["frozen_text"], False, False)   # IP-Adapter training: text frozen
    view = [_heads_view(p["batch"], t, p["heads"], p["d"], p["dtype"], train and not f)
            for t, f in zip((p["n"], p["n_text"], p["n_text"], p["n_img"], p["n_img"]), frozen)]
    q, kt, vt, ki, vi = view
    yield "", lambda: _maybe_backward(lm.dual_cross_attention(q, [kt, ki], [vt, vi], [1.0, 0.6]), case.mode, view)


def calls_reference_attention(case):
    import lightmotion_fast as lm
    p = _params(case)
    train = case.mode == "fwd+bwd"
    q, k, v, kr, vr = (_heads_view(p["batch"], t, p["heads"], p["d"], p["dtype"], train)
                       for t in (p["n"], p["n"], p["n"], p["n_ref"], p["n_ref"]))
    yield "", lambda: _maybe_backward(lm.reference_attention(q, k, v, kr, vr), case.mode, [q, k, v, kr, vr])


# scenario file name -> the calls of one of its cases (scenarios without kernels are not listed).
CALLS = {
    "latent_permute": calls_latent_permute,
    "latent_resample": calls_latent_resample,
    "snr_reinject": calls_snr_reinject,
    "plucker": calls_plucker,
    "multi_lora": calls_multi_lora,
    "trajectory_attention": calls_trajectory_attention,
    "dual_cross_attention": calls_dual_cross_attention,
    "reference_attention": calls_reference_attention,
}


# Scenarios whose cases run the op more than one way (the benchmark's providers): the label's last field.
VARIANTS = {"trajectory_attention": ("deterministic", "atomic")}


def case_label(case, variant=""):
    """'op | shape | dtype | mode[ | variant]': what the CSV's `case` column and --cases match."""
    return " | ".join([case.op, case.shape, case.dtype, case.mode] + ([variant] if variant else []))


def benchmark_cases(ops=None):
    """(scenario name, Case) for every GPU benchmark case of the scenarios that launch kernels. The
    "small" cases exist for CPU timing (fp32 through the torch path) and are left out."""
    from lightmotion_fast.bench.runner import load_scenarios
    names = [o for o in (ops or CALLS) if o in CALLS]
    unknown = sorted(set(ops or ()) - set(CALLS))
    if unknown:
        raise ValueError(f"unknown --ops {unknown}; scenarios with kernels: {sorted(CALLS)}")
    out = []
    for name, cases in load_scenarios(names).items():
        for case in cases(_CudaDevice(), False):
            if not case.shape.startswith("small"):
                out.append((name, case))
    return out


class SkipMatmuls(TorchDispatchMode):
    """Matrix products that PyTorch itself computes around the kernels (a backward's dX = dY·W on the
    CPU, projections) return uninitialised outputs of the right shape, dtype and strides: their values
    are garbage anyway, only the kernel launches matter, and at the models' sizes they would take
    minutes on a CPU."""

    SKIP = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention_for_cpu_backward")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "lightmotion":
            # The library's own op: run its implementation with this mode active again, so that the PyTorch
            # work inside it (its output allocations, casts, the reductions around the kernels) is seen too.
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        if func._schema.name.split("::")[-1] not in self.SKIP or func._schema.is_mutable:
            out = func(*args, **kwargs)
        else:
            def meta(t):
                if isinstance(t, torch.Tensor):
                    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                return t

            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            out = func(*tree_map(meta, args), **tree_map(meta, kwargs))
            out = tree_map(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                           if isinstance(t, torch.Tensor) else t, out)
        if RECORDER.torch_case is not None:
            RECORDER.record_torch(func, args, kwargs, out)
        return out


# ---------------------------------------------------------------------------------------------
# PyTorch's own work inside an op's call (matrix products, copies, elementwise), by bytes and FLOPs

# ATen ops that move no data of their own: allocations and metadata. (Reads of a value by the host,
# `.item()`, `equal`, `is_nonzero`, are recorded: on a GPU each is a synchronisation.)
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
               "lift_fresh", "set_", "resize_", "is_same_size", "record_stream", "_has_compatible_shallow_copy_type"}
# In-place ops that overwrite their first argument without reading it.
_WRITE_ONLY = {"fill_", "zero_", "copy_", "normal_", "uniform_", "random_", "bernoulli_"}
# Factories that take only the shape, dtype and device of their tensor argument: they write, never read.
_LIKE_FACTORIES = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "rand_like",
                   "randn_like", "randint_like"}


def _tensors(tree):
    out = []
    tree_map(lambda t: out.append(t) if isinstance(t, torch.Tensor) else None, tree)
    return out


def _nbytes(t):
    return t.numel() * t.element_size()


def _is_view(func):
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _aliases(outs, ins) -> bool:
    storages = {t.untyped_storage().data_ptr() for t in ins if t.device.type != "meta"}
    return any(t.device.type == "meta" or t.untyped_storage().data_ptr() in storages for t in outs)


def _shape(t):
    return "x".join(str(s) for s in t.shape) or "scalar"


def _matmul_flops(name, args, out):
    """FLOPs of a matrix product (2 per multiply-add) or of CPU flash attention (forward 2 products,
    backward 5), else 0."""
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
        return 2 * out.numel() * a.shape[-1] if b.shape[-1] == out.shape[-1] else 0
    if name in ("matmul", "linear"):   # seen whole when called below autograd (inside an op's build)
        return 2 * out.numel() * args[0].shape[-1]
    if name == "linalg_qr":   # Householder QR of [..., m, n]: 2mn² − 2n³/3 (R only; Q doubles it)
        a = args[0]
        m, n = a.shape[-2], a.shape[-1]
        k = min(m, n)
        per = 2 * m * n * k - 2 * k ** 3 // 3
        return per * (a.numel() // (m * n) if m * n else 0)
    if name.startswith("_scaled_dot_product_flash_attention_for_cpu"):
        q, k = args[:2] if not name.endswith("_backward") else args[1:3]
        per_product = 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return per_product * (5 if name.endswith("_backward") else 2)
    return 0


def torch_entry(func, args, kwargs, out):
    """What one ATen op inside an op's call moves and computes: None for views and allocations. Bytes:
    every tensor argument read once and every output written once (an in-place op reads and writes its
    first argument; fills and copies only write it); FLOPs for matrix products and attention only."""
    name = func._schema.name.split("::")[-1]
    if name in _NO_TRAFFIC:
        return None
    ins = [] if name in _LIKE_FACTORIES else _tensors((args, kwargs))
    outs = _tensors(out)
    # A view, or an op that may return its input (`to`, arriving whole below autograd): moves nothing
    # when its outputs alias an input, else it made a copy.
    if _is_view(func) and (not outs or _aliases(outs, ins)):
        return None
    if func._schema.is_mutable:
        bound = {arg.name: kwargs.get(arg.name, args[i] if i < len(args) else None)
                 for i, arg in enumerate(func._schema.arguments)}
        written = {arg.name: bound[arg.name] for arg in func._schema.arguments
                   if isinstance(bound[arg.name], torch.Tensor) and arg.alias_info is not None
                   and arg.alias_info.is_write}
        outs = list(written.values()) or outs
        # an `out=` argument or a fill's target is written, not read
        unread = [t for n, t in written.items() if n == "out" or name in _WRITE_ONLY]
        ins = [t for t in ins if all(t is not w for w in unread)]
    nbytes = sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in outs)
    if nbytes == 0:
        return None
    flops = _matmul_flops(name, args, outs[0]) if outs else 0
    if flops:
        shapes = " @ ".join(_shape(t) for t in ins if t.dim() >= 2)
    else:
        shapes = " ".join(_shape(t) for t in ins) + " -> " + " ".join(_shape(t) for t in outs)
    dtype = str((outs or ins)[0].dtype).replace("torch.", "")
    return dict(aten=name, shapes=shapes, dtype=dtype, flops=flops, bytes=nbytes)


def capture(ops=None, cases_regex=None):
    """Record every launch of the selected benchmark cases. Returns (records, errors)."""
    import lightmotion_fast as lm
    install_gpu_view()
    pattern = re.compile(cases_regex) if cases_regex else None
    errors = []
    # The cases (their byte and FLOP counts, e.g. latent_permute's kept pixels through the camera's
    # inverse affines) are built before SkipMatmuls is active: inside it a matrix product is garbage.
    selected = benchmark_cases(ops)
    with lm.backend("triton"), SkipMatmuls():
        for name, case in selected:
            labels = [case_label(case, v) for v in VARIANTS.get(name, ("",))]
            if pattern and not any(pattern.search(label) for label in labels):
                continue   # skip building the inputs of cases that were not asked for
            try:
                calls = list(CALLS[name](case))
            except Exception:  # noqa: BLE001 - reported, the rest goes on
                errors.append(dict(case=case_label(case), error=traceback.format_exc(limit=8)))
                continue
            for variant, call in calls:
                label = case_label(case, variant)
                if pattern and not pattern.search(label):
                    continue
                RECORDER.context = dict(op=case.op, scenario=name, case=label, case_obj=case, autotuned=False)
                try:
                    # Twice: the first call builds what the op caches across calls (the multi-LoRA weight
                    # pack); PyTorch's work is recorded in the second, the steady state of a sampling loop.
                    call()
                    RECORDER.torch_case = label
                    call()
                except Exception:  # noqa: BLE001
                    errors.append(dict(case=label, error=traceback.format_exc(limit=8)))
                finally:
                    RECORDER.torch_case = None
    return RECORDER.records, errors


# ---------------------------------------------------------------------------------------------
# Rows


COLUMNS = [
    "case", "op", "kernel", "launch", "dtype", "mode", "constexprs", "autotune_config", "num_warps", "num_stages",
    "programs", "registers", "spill_stores", "spill_loads", "shared", "blocks_per_sm", "warps_per_sm", "waves",
    "ldg_128", "ldg_64", "ldg_32", "ldg_16", "ldg_8", "stg_128", "stg_64", "stg_32", "stg_16", "stg_8",
    "ldgsts", "ldgsts_128", "tma", "hgmma", "hmma", "atomics", "div64", "mufu", "bar", "calls", "instructions",
    "backward_branches", "instr_per_elem", "bytes", "flops",
    "floor_us_h100", "floor_us_h100_peak", "floor_us_h200", "bound", "ok", "error",
]


def floors(nbytes, flops, dtype=None):
    """Roofline floor (µs) per device from the case's bytes and FLOPs, and what binds on the H100. The
    FLOPs run at the 16-bit matmul rate unless `dtype` is float32 or float64 (WIDE_MATMUL_RATE)."""
    out = {}
    wide = WIDE_MATMUL_RATE.get(dtype)
    for dev, (bw, rate) in CEILINGS.items():
        t = max((nbytes or 0) / bw, (flops or 0) / (wide or rate))
        out[f"floor_us_{dev}"] = round(t * 1e6, 2) if (nbytes or flops) else ""
    bw, rate = CEILINGS["h100"]
    rate = wide or rate
    out["bound"] = "" if not (nbytes or flops) else (
        "memory" if (nbytes or 0) / bw >= (flops or 0) / rate else "compute")
    return out


def _instr_per_elem(rec, counts):
    """Static SASS instructions per element for the elementwise kernels (one BLOCK of elements per
    program, no tile loop): instructions x threads / BLOCK. Cold paths (libdevice's slow argument
    reduction, for one) are counted too, so this bounds the dynamic count from above."""
    consts = named_constexprs(rec)
    block = consts.get("BLOCK")
    if not isinstance(block, int) or consts.get("PLANES", 1) != 1 or any(
            k.startswith("BLOCK_") for k in consts):
        return ""
    return round(counts["instructions"] * 32 * rec["options"].num_warps / block, 1)


def build_rows(records, log=None):
    """Compile each distinct launch once and return one row per (case, launch)."""
    log = log or (lambda msg: print(msg, flush=True))
    by_key, results = {}, {}
    for rec in records:
        by_key.setdefault(launch_key(rec), rec)
    t0 = time.time()
    for i, (key, rec) in enumerate(by_key.items(), 1):
        t = time.time()
        ck, info = compile_launch(rec)
        if ck is not None and ck.asm.get("cubin"):
            try:
                info.update(analyse(ck))
            except Exception as e:  # noqa: BLE001
                info.update(ok=False, error=f"analysis: {type(e).__name__}: {e}"[:2000])
        results[key] = info
        log(f"[{i}/{len(by_key)} {time.time() - t0:6.0f}s] {'ok  ' if info['ok'] else 'FAIL'} "
            f"{time.time() - t:5.1f}s {kernel_name(rec):34s} {_dtype_of(rec):5s} "
            f"{kernel_constexprs(rec)} w={rec['options'].num_warps} s={rec['options'].num_stages} "
            f"regs={info.get('registers')} spill={info.get('spill_stores')}")
    rows, seen = [], set()
    for rec in records:
        key = launch_key(rec)
        if (rec["case"], key) in seen:
            continue
        seen.add((rec["case"], key))
        rows.append(_row(rec, results[key]))
    return rows


def _dtype_of(rec):
    ptrs = [v[1:] for v in rec["signature"].values() if isinstance(v, str) and v.startswith("*")]
    for t in ("bf16", "fp16", "fp32"):
        if t in ptrs:
            return t
    return ptrs[0] if ptrs else ""


def _row(rec, info):
    case = rec["case_obj"]
    opts = rec["options"]
    row = {c: "" for c in COLUMNS}
    row.update(case=rec["case"], op=rec["op"], kernel=kernel_name(rec), launch=launch_id(rec), dtype=_dtype_of(rec),
               mode=case.mode, constexprs=kernel_constexprs(rec), autotune_config=int(bool(rec.get("autotuned"))),
               num_warps=opts.num_warps, num_stages=opts.num_stages, programs=rec.get("programs") or "",
               bytes=case.bytes or "", flops=int(case.flops) if case.flops else "", ok=int(info["ok"]),
               error=info.get("error") or info.get("warning") or "")
    row.update(floors(case.bytes, case.flops))
    for c in COLUMNS:
        if c in info and c not in ("ok", "error"):
            row[c] = info[c]
    if info.get("registers") is not None:
        blocks, warps = occupancy(info["registers"], info["shared"], opts.num_warps)
        row.update(blocks_per_sm=blocks, warps_per_sm=warps)
        if rec.get("programs") and blocks:
            row["waves"] = round(rec["programs"] / (blocks * SM90["sm_count"]), 2)
        row["instr_per_elem"] = _instr_per_elem(rec, info)
    return row


# ---------------------------------------------------------------------------------------------
# CSV and Markdown


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(rows, path, columns=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def merge(old_rows, new_rows, covered=None):
    """The new rows replace every old row of the cases they cover (default: the cases of `new_rows`);
    other cases keep their old rows."""
    covered = {r["case"] for r in new_rows} if covered is None else set(covered)
    return [r for r in old_rows if r["case"] not in covered] + list(new_rows)


TORCH_COLUMNS = ["case", "op", "aten", "shapes", "dtype", "calls", "flops", "bytes",
                 "floor_us_h100", "floor_us_h100_peak", "floor_us_h200", "bound"]


def torch_rows(entries):
    """One row per (case, ATen op, shapes, dtype) of PyTorch's own work, with its calls, total FLOPs and
    bytes, and the roofline floor of those totals."""
    groups = {}
    for e in entries:
        g = groups.setdefault((e["case"], e["aten"], e["shapes"], e["dtype"]),
                              dict(case=e["case"], op=e["op"], aten=e["aten"], shapes=e["shapes"], dtype=e["dtype"],
                                   calls=0, flops=0, bytes=0))
        g["calls"] += 1
        g["flops"] += e["flops"]
        g["bytes"] += e["bytes"]
    for g in groups.values():
        g.update(floors(g["bytes"], g["flops"], g["dtype"]))
    return list(groups.values())


MD_HEADER = """# sm_90 static report: every Triton launch at the benchmark shapes (compiled, not run)

Generated by `python -m lightmotion_fast bench --static` ({versions}; no GPU involved). Regenerate after
changing a kernel or a scenario; `--ops a b` recompiles only those scenarios and keeps the other rows. Compiled
kernels and their analysis are cached in Triton's cache (TRITON_CACHE_DIR), so a rerun after a one-kernel
change recompiles only what changed. The raw numbers are in `sm90-static.csv` (one row per case and launch).

**How it is made.** Each benchmark case of `benchmarks/scenarios/*.py` (GPU dtypes and shapes; the CPU-only
"small" cases are left out) calls the op the way its `lightmotion` provider does, on `torch.empty` CPU tensors,
with Triton's launcher replaced by a recorder (same argument binding and specialisation as on a CUDA device;
every autotune config). Each distinct launch is compiled for `GPUTarget("cuda", 90, 32)` with the ptxas that
ships with Triton; registers and spills come from `ptxas -v`, shared memory from the compiled metadata, access
widths, async copies, MMA kind and atomics from the SASS (`cuobjdump -sass`), 64-bit divisions from the PTX.

**How to read it.**
- *regs / spill*: registers per thread, spill-store bytes per thread (0 wanted in every fp16/bf16 launch).
- *blocks(warps)/SM*: resident blocks and warps per SM from registers (65,536 per SM, allocated per warp in
  units of 256), shared memory (228 KiB per SM, 1 KiB reserved per block) and warps (64 per SM).
- *LDG/STG 128 / 64 / 32 / ≤16*: static counts of global load/store instructions by access width in bits.
  Contiguous fp16/bf16 tiles should move as 128-bit accesses; 16-bit ones are per-element scalar accesses.
  Gathers by a data-dependent index (latent_permute's source pixels, index tables) are scalar by nature.
- *cp.async (128)*: LDGSTS instructions (those 128 bits wide); *TMA*: UTMALDG/UBLKCP; *MMA*: HGMMA (wgmma,
  Hopper's warpgroup MMA) or HMMA (mma.sync; tiles under 64 rows cannot use wgmma); *atom*: RED/ATOM global
  atomics; *div64*: 64-bit integer divisions/remainders in the PTX (each a ~70-instruction subroutine);
  *instr*: static SASS instructions, and in brackets per element for the elementwise kernels
  (instructions × threads / BLOCK; cold paths included, so an upper bound on what runs).
- *programs*: the launch grid; *floor*: the case's roofline floor max(bytes / copy bandwidth, FLOPs / bf16
  matmul rate) in µs from the scenario's byte and FLOP counts, at the measured ceilings (H100 SXM 3.0 TB/s,
  798 TFLOP/s; H200 4.3 TB/s, 788 TFLOP/s) and at H100's peaks (3.35 TB/s, 989 TFLOP/s). One floor per case
  covers all its launches; a fwd+bwd case lists its forward launches again.
- The launch tables hold Triton launches only. PyTorch's own work inside an op's call (the multi-LoRA
  backward's GEMMs, casts, copies, reductions) is recorded op by op during the same capture and listed under
  "PyTorch work inside the ops" (`sm90-static-torch.csv`): per ATen op its operand shapes, calls, FLOPs
  (matrix products and attention only), bytes (every tensor argument read once, every output written once)
  and its own roofline floor (fp32 and fp64 products at 67 TFLOP/s, the datasheet's non-TF32 fp32 and
  fp64 rates of both GPUs, not the 16-bit rate); *PyTorch floor* in the cases table is their sum, a lower bound on the time
  PyTorch adds to the case (kernel launches and caching-allocator work not counted).
- Static counts are not timings; everything here is a prediction aid, to be confirmed on a GPU.

**Invariants.** `tests/test_sm90_invariants.py` (part of the default test run) recompiles the hot launches and
holds one declarative table of design invariants against these columns: no spills in fp16/bf16 launches;
contiguous tiles (attention Q/K/V/O, GEMM tiles, elementwise streams) moved by 128-bit accesses, never 2-byte
ones; K/V and GEMM tiles loaded asynchronously (cp.async or TMA); wgmma for the matrix kernels whose tiles allow
it; ≥ 2 resident blocks per SM for the attention forwards; snr_reinject ≤ 50 instructions per element;
latent_resample without 64-bit division; the multi-LoRA expand without 2-byte loads. A known miss is a
strict expected failure naming the issue that fixes it (none today: the last, the multi-LoRA expand's bias
row, now loads 128-bit); when a fix makes one pass, the run fails until its `known=` is deleted from the
table.
"""


def _kb(v):
    return "" if v in ("", None) else f"{int(v) / 1024:.0f}"


def _widths(row, kind):
    narrow = sum(int(row[f"{kind}_{w}"] or 0) for w in (16, 8))
    return f"{row[f'{kind}_128']}/{row[f'{kind}_64']}/{row[f'{kind}_32']}/{narrow}"


def _mma(row):
    parts = [f"HGMMA {row['hgmma']}" if int(row["hgmma"] or 0) else "",
             f"HMMA {row['hmma']}" if int(row["hmma"] or 0) else ""]
    return " + ".join(p for p in parts if p) or "—"


def _cell(text):
    return str(text).replace("|", "\\|")


def _compact(constexprs):
    """Tiles and flags that are set: 'BLOCK_M=128 D_PAD=64 ATOMIC'; False flags are left out."""
    out = []
    for item in filter(None, constexprs.split(",")):
        name, _, value = item.partition("=")
        if value == "False":
            continue
        out.append(name if value == "True" else item)
    return " ".join(out)


def _torch_floor(trs, device="h100"):
    return round(sum(float(t[f"floor_us_{device}"] or 0) for t in trs), 2) if trs else ""


def render_md(rows, versions, torch_work=()):
    lines = [MD_HEADER.format(versions=versions), "## Cases and roofline floors\n",
             "| case | bytes | FLOPs | floor H100 µs | floor H100 peak µs | floor H200 µs | bound | launches | "
             "PyTorch ops | PyTorch floor H100 µs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cases, torch_by_case = {}, {}
    for r in rows:
        cases.setdefault(r["case"], []).append(r)
    for t in torch_work:
        torch_by_case.setdefault(t["case"], []).append(t)
    for case, rs in cases.items():
        r, trs = rs[0], torch_by_case.get(case, [])
        flops = f"{float(r['flops']):.3g}" if r["flops"] else ""
        nbytes = f"{float(r['bytes']):.3g}" if r["bytes"] else ""
        lines.append(f"| {_cell(case)} | {nbytes} | {flops} | {r['floor_us_h100']} | {r['floor_us_h100_peak']} | "
                     f"{r['floor_us_h200']} | {r['bound']} | {len(rs)} | "
                     f"{sum(int(t['calls']) for t in trs)} | {_torch_floor(trs)} |")
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
    for op, rs in by_op.items():
        lines += [f"\n## {op}\n",
                  "| case | kernel | constexprs | warps/stages | programs | regs | spill B | smem KB | "
                  "blocks(warps)/SM | LDG 128/64/32/≤16 | STG 128/64/32/≤16 | cp.async (128) | TMA | MMA | atom | "
                  "div64 | instr (/elem) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            if r["ok"] == "0" and not r["registers"]:
                lines.append(f"| {_cell(r['case'])} | {r['kernel']} | {_compact(r['constexprs'])} | | | | | | | | | | "
                             f"| | | | FAILED: {_cell(r['error'][:200])} |")
                continue
            instr = f"{r['instructions']}" + (f" ({r['instr_per_elem']})" if r["instr_per_elem"] else "")
            tune = " (autotune cfg)" if r["autotune_config"] == "1" else ""
            lines.append(
                f"| {_cell(r['case'])} | {r['kernel']} | {_compact(r['constexprs'])}{tune} | "
                f"{r['num_warps']}/{r['num_stages']} | {r['programs']} | {r['registers']} | {r['spill_stores']} | "
                f"{_kb(r['shared'])} | {r['blocks_per_sm']} ({r['warps_per_sm']}) | {_widths(r, 'ldg')} | "
                f"{_widths(r, 'stg')} | {r['ldgsts']} ({r['ldgsts_128']}) | {r['tma']} | {_mma(r)} | "
                f"{r['atomics']} | {r['div64']} | {instr} |")
    lines += _render_torch(torch_work)
    return "\n".join(lines) + "\n"


def _render_torch(torch_work, min_us=0.5):
    """The PyTorch-work section: per case, its ATen ops whose floor is at least `min_us` (the rest summed
    in one line; all are in the CSV)."""
    if not torch_work:
        return []
    lines = ["\n## PyTorch work inside the ops\n",
             f"PyTorch's own ATen work inside each case's call, recorded during the capture (matrix products ran on "
             f"meta tensors). Ops whose floor is under {min_us} µs are summed in a last line per case; every op is "
             f"in `sm90-static-torch.csv`.\n",
             "| case | ATen op | operands | dtype | calls | GFLOP | MB | floor H100 µs | floor H200 µs | bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_case = {}
    for t in torch_work:
        by_case.setdefault(t["case"], []).append(t)
    for case, trs in by_case.items():
        trs = sorted(trs, key=lambda t: -float(t["floor_us_h100"] or 0))
        big = [t for t in trs if float(t["floor_us_h100"] or 0) >= min_us]
        small = trs[len(big):]
        for t in big:
            lines.append(f"| {_cell(case)} | {t['aten']} | {_cell(t['shapes'])} | {t['dtype']} | {t['calls']} | "
                         f"{float(t['flops'] or 0) / 1e9:.1f} | {float(t['bytes']) / 1e6:.1f} | "
                         f"{t['floor_us_h100']} | {t['floor_us_h200']} | {t['bound']} |")
        if small:
            lines.append(f"| {_cell(case)} | {len(small)} smaller ops | | | {sum(int(t['calls']) for t in small)} | "
                         f"{sum(float(t['flops'] or 0) for t in small) / 1e9:.1f} | "
                         f"{sum(float(t['bytes']) for t in small) / 1e6:.1f} | {_torch_floor(small)} | "
                         f"{_torch_floor(small, 'h200')} | |")
    return lines


def versions_text():
    return f"Triton {triton.__version__}, torch {torch.__version__}, target sm_90a"


# ---------------------------------------------------------------------------------------------
# On a GPU: what Triton compiled and the driver loaded in this process

LOADED_COLUMNS = ["kernel", "constexprs", "num_warps", "num_stages", "registers", "local_bytes", "shared",
                  "blocks_per_sm", "warps_per_sm"]


def library_jit_functions():
    """{name: JITFunction} of every `*_kernel` in lightmotion_fast.kernels (autotuner wrappers unwrapped)."""
    import importlib
    import pkgutil

    import lightmotion_fast.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(module).values():
            for _ in range(4):   # Autotuner(Heuristics(JITFunction)) nests a few levels
                if isinstance(obj, _jit.JITFunction) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if isinstance(obj, _jit.JITFunction) and obj.fn.__name__.endswith("_kernel"):
                found[obj.fn.__name__] = obj
    return found


def loaded_kernels(functions=None) -> list[dict]:
    """One row per compiled kernel in the JIT caches of `functions` ({name: JITFunction}; default the
    library's) that the driver has loaded (it ran at least once in this process): its constexprs and
    launch options, the registers per thread and local-memory bytes per thread (spills and stack) as the
    CUDA driver reports them, shared memory and the sm_90 occupancy they give. After a benchmark run on a
    GPU these are the static report's columns from the Triton and ptxas that really ran."""
    rows = []
    for name, fn in sorted((functions if functions is not None else library_jit_functions()).items()):
        params = {p.num: p for p in fn.params}
        for caches in list(getattr(fn, "device_caches", {}).values()):
            for compiled in list(caches[0].values()):
                if getattr(compiled, "module", None) is None:   # compiled but never loaded
                    continue
                meta = compiled.metadata
                consts = ",".join(f"{params[k[0]].name}={v}" for k, v in compiled.src.constexprs.items()
                                  if len(k) == 1 and params[k[0]].is_constexpr)
                blocks, warps = occupancy(compiled.n_regs, meta.shared, meta.num_warps)
                # n_spills is CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4 (Triton's driver counts 32-bit words)
                rows.append(dict(kernel=name, constexprs=consts, num_warps=meta.num_warps,
                                 num_stages=meta.num_stages, registers=compiled.n_regs,
                                 local_bytes=4 * compiled.n_spills, shared=meta.shared, blocks_per_sm=blocks,
                                 warps_per_sm=warps))
    return rows


def write_loaded_kernels(rows, path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOADED_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Command line


def run(ops=None, cases_regex=None, results_dir=RESULTS_DIR, json_path=None, write=True, log=None):
    """Capture, compile, analyse; write/merge the CSV and render the Markdown. Returns (rows, errors)."""
    log = log or (lambda msg: print(msg, flush=True))
    t0 = time.time()
    records, errors = capture(ops, cases_regex)
    log(f"captured {len(records)} launches ({len({launch_key(r) for r in records})} distinct) from "
        f"{len({r['case'] for r in records})} cases in {time.time() - t0:.1f}s")
    for err in errors:
        log(f"CAPTURE ERROR {err['case']}:\n{err['error']}")
    rows = build_rows(records, log=log)
    torch_work = torch_rows(RECORDER.torch_ops)
    if json_path:
        Path(json_path).write_text(json.dumps(dict(versions=versions_text(), triton=triton.__version__,
                                                   rows=rows, torch_work=torch_work, capture_errors=errors),
                                              indent=1, default=str))
    if write:
        csv_path = Path(results_dir) / "sm90-static.csv"
        torch_path = Path(results_dir) / "sm90-static-torch.csv"
        partial = bool(ops or cases_regex)
        all_rows = merge(read_csv(csv_path), rows) if partial and csv_path.exists() else rows
        covered = {r["case"] for r in rows} | {t["case"] for t in torch_work}
        all_torch = (merge(read_csv(torch_path), torch_work, covered) if partial and torch_path.exists()
                     else torch_work)
        all_rows, all_torch = ([{k: ("" if v is None else str(v)) for k, v in r.items()} for r in rs]
                               for rs in (all_rows, all_torch))
        write_csv(all_rows, csv_path)
        write_csv(all_torch, torch_path, TORCH_COLUMNS)
        (Path(results_dir) / "sm90-static.md").write_text(render_md(all_rows, versions_text(), all_torch))
        log(f"wrote {csv_path}, {torch_path.name} and sm90-static.md ({len(all_rows)} launch rows, "
            f"{len(all_torch)} PyTorch rows)")
    failed = [r for r in rows if not r["ok"]]
    log(f"{len(rows)} rows, {len(failed)} failed launches, {len(errors)} capture errors, {time.time() - t0:.0f}s")
    return rows, errors


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lightmotion_fast.bench.static",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=None, help="comma-separated scenario names (default: all with kernels)")
    parser.add_argument("--cases", default=None, help="regex over 'op | shape | dtype | mode[ | variant]'")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of sm90-static.{csv,md}")
    parser.add_argument("--json", default=None, help="also write the new rows and capture errors here")
    parser.add_argument("--no-write", action="store_true", help="do not touch the CSV / Markdown")
    args = parser.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o] if args.ops else None
    return static_main(ops, args.cases, args.results, args.json, not args.no_write)


def static_main(ops=None, cases_regex=None, results_dir=RESULTS_DIR, json_path=None, write=True):
    """Entry point shared by this module's CLI and `python -m lightmotion_fast bench --static`."""
    # Triton 3.9 warns when this is unset; 1 is its default (and 3.6's behaviour): the compiler may contract
    # a*b+c into FMAs, as a launch on the GPU does.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The kernels were (or would be) built for the interpreter: rerun in a clean interpreter.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "lightmotion_fast.bench.static", "--results", str(results_dir)]
        cmd += (["--ops", ",".join(ops)] if ops else []) + (["--cases", cases_regex] if cases_regex else [])
        cmd += (["--json", str(json_path)] if json_path else []) + ([] if write else ["--no-write"])
        return subprocess.run(cmd, env=env).returncode
    try:
        rows, errors = run(ops, cases_regex, results_dir, json_path, write)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if errors or any(not r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
