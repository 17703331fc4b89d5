"""`./dev.sh gpu`: all the GPU evidence in one call of at most ten minutes, written into one folder.

    ./dev.sh gpu [--out DIR] [--bundle DIR] [--dry-run] [--quick] [--only tests,sanitizer,bench]
                 [--budget SECONDS] [--bench-ops op,...]
    ./dev.sh wheels            (on a networked machine, beforehand: the wheels the GPU machine lacks)

Phases, each with a time budget, each failing on its own (a failed phase never stops the next):
  env        python, torch, triton, the GPU, the commit
  wheels     install the wheels carried in .whl/ into a private folder put first on PYTHONPATH
             (pip --target --no-index --no-deps; torch, triton and CUDA wheels are refused, so the
             machine's own stack is never touched)
  build      pip install --target of this tree (builds the C++ extension for the machine's torch);
             if the extension does not build, the package is installed without it and a warning says so
  tests      the whole test suite on CUDA (the CPU-only AOT compile checks excepted), JUnit XML
  sanitizer  compute-sanitizer memcheck over lightmotion_fast.bench.smoke (every kernel at odd edge
             shapes), then racecheck over the kernels with shared memory or atomics; a machine that
             refuses the sanitizer is reported as such
  bench      the ceilings, then every op and scenario in full (--quick: the quick cases), CSV rows,
             one plot per op, the SDPA backend of every attention provider; then every kernel the bench
             compiled, as this machine's Triton and ptxas built it (registers and local memory per
             thread from the driver, occupancy): loaded_kernels.csv
  report     report.md: per op our time, each peer's, the ratio, % of ceiling, the target met/missed,
             the compiled kernels that use local memory or fit one block per SM;
             gpu_report.tar.gz of the whole folder; --bundle DIR copies at most 8 files there (for the
             device tool's $OUT)

Unused time of a phase goes to the bench. Progress lines name the phase, so a run that was cut off
still tells what it reached. This file runs as a plain script under any python3 (no package import
until the package is installed), which is what dev.sh does: it must work with the GPU machine's
system python (3.12, torch 2.11, triton 3.6), without a virtualenv.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("LIGHTMOTION_GPU_WORK", "/tmp/lightmotion_gpu"))   # private installs, caches
WHEEL_SITE = WORK / "wheels-site"
PKG_SITE = WORK / "package-site"
DEFAULT_BUDGET_S = 560
LOADED_CSV = "loaded_kernels.csv"   # the bench worker's kernels as compiled on the machine (static.loaded_kernels)
# Packages the GPU machines already have (../.library/device/KINDS.md, "Python packages already there",
# read 2026-11-17). `./dev.sh wheels` downloads what the project needs beyond these.
GPU_HAS = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
WHEELS_NEEDED = ["diffusers"]          # what the project imports that the GPU machines lack
NEVER_CARRY = re.compile(r"^(torch|triton|nvidia[-_].*|cuda[-_].*)$")
# Test files that run the CPU-side ahead-of-time sm_90 compiles (they name the compile check's script or
# the static report's module): CI runs them; on the GPU machine they would only cost minutes of CPU.
AOT_MARKS = ("gpu_compile_check", "lightmotion_fast.bench.static")


def cpu_only_tests() -> list[Path]:
    return sorted(p for p in (REPO / "tests").glob("test_*.py")
                  if any(mark in p.read_text(errors="replace") for mark in AOT_MARKS))
RACECHECK_OPS = "trajectory_attention,multi_lora,dual_cross_attention,reference_attention"  # smem / atomics


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------
# Output: everything printed also goes to <out>/console.log


class Console:
    def __init__(self):
        self.file = None

    def open(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", buffering=1)

    def __call__(self, line: str = ""):
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")


say = Console()


# ---------------------------------------------------------------------------------------------
# Plan


@dataclass
class Step:
    """One command of a phase. `optional`: its failure does not fail the phase (a fallback follows)."""
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log: str = ""                 # file name under <out>/logs
    note: str = ""

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + " ".join(shlex.quote(a) for a in self.argv)


@dataclass
class Phase:
    name: str
    budget_s: float
    what: str
    result: dict = field(default_factory=dict)   # status, seconds, details


@dataclass
class Context:
    out: Path
    python: str
    quick: bool
    only: set[str]
    bench_ops: list[str] | None
    dry_run: bool
    deadline: float
    commit: str = "unknown"
    phases: dict[str, Phase] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The environment of every Python step: the private installs first, the tree's own folder not."""
        path = [str(PKG_SITE), str(WHEEL_SITE)]
        if os.environ.get("PYTHONPATH"):
            path.append(os.environ["PYTHONPATH"])
        return {
            "PYTHONPATH": os.pathsep.join(path),
            "PYTHONSAFEPATH": "1",              # never import the uninstalled source tree from the cwd
            "PYTHONUNBUFFERED": "1",
            "TRITON_CACHE_DIR": str(WORK / "triton-cache"),
            "LIGHTMOTION_SCENARIO_DIR": str(REPO / "benchmarks" / "scenarios"),
            "LIGHTMOTION_COMMIT": self.commit,
            "MPLBACKEND": "Agg",
        }


PHASES = [
    ("env", 20, "python, torch, triton, GPU, commit"),
    ("wheels", 30, "install .whl/*.whl into a private --target folder (never torch/triton)"),
    ("build", 120, "pip install --target of this tree: the C++ extension for this torch"),
    ("tests", 120, "the test suite on CUDA, JUnit XML"),
    ("sanitizer", 150, "the smoke script, then compute-sanitizer memcheck + racecheck over it"),
    ("bench", 110, "ceilings, then every op and scenario; CSV, plots"),
    ("report", 10, "report.md, gpu_report.tar.gz"),
]
OPTIONAL_PHASES = {"tests", "sanitizer", "bench"}


def plan_wheels(ctx: Context) -> list[Step]:
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    refused = [w for w in wheels if NEVER_CARRY.match(_norm(w.name.split("-")[0]))]
    wheels = [w for w in wheels if w not in refused]
    for w in refused:
        say(f"[wheels] refusing {w.name}: the machine's own torch/triton/CUDA stack is never replaced")
    if not wheels:
        return []
    return [Step([ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                  "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(WHEEL_SITE)]
                 + [str(w) for w in wheels], log="wheels.log")]


def plan_build(ctx: Context) -> list[Step]:
    pip = [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
           "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(PKG_SITE), str(REPO)]
    cuda_env = {"MAX_JOBS": str(os.cpu_count() or 8), "TORCH_CUDA_ARCH_LIST": "9.0"}
    check = [ctx.python, "-c", "import lightmotion_fast, lightmotion_fast._ext as e; "
             "print('lightmotion_fast from', lightmotion_fast.__file__); "
             "print('C++ extension:', 'loaded' if e.available() else 'missing: ' + str(e.load_error))"]
    return [Step(pip, cuda_env, "build.log"),
            Step(pip, {"LIGHTMOTION_NO_EXT": "1"}, "build-noext.log", note="fallback: without the C++ extension"),
            Step(check, log="build-check.log")]


def plan_tests(ctx: Context) -> list[Step]:
    argv = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
            f"--junitxml={ctx.out / 'junit.xml'}", "-o", "junit_suite_name=lightmotion_fast_gpu",
            "--rootdir", str(REPO), "-c", str(REPO / "pyproject.toml")]
    for path in cpu_only_tests():
        argv += ["--ignore", str(path)]
    if importlib.util.find_spec("xdist") is not None:
        argv += ["-n", "8"]           # kernel compiles dominate: spread them over the CPU cores
    if importlib.util.find_spec("pytest_timeout") is not None:
        argv += ["--timeout", "120"]
    argv += [str(REPO / "tests"), str(REPO / "benchmarks")]
    return [Step(argv, log="tests.log")]


def sanitizer_binary() -> str | None:
    found = shutil.which("compute-sanitizer")
    for candidate in ([found] if found else []) + ["/usr/local/cuda/bin/compute-sanitizer",
                                                   "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]:
        if candidate and Path(candidate).exists():
            return candidate
    return None


def plan_sanitizer(ctx: Context) -> list[Step]:
    tool = sanitizer_binary() or "compute-sanitizer"
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}   # each tensor its own allocation: no OOB hidden in a pool
    smoke = [ctx.python, "-m", "lightmotion_fast.bench.smoke"]
    # First without the sanitizer: checks every kernel against its reference and fills the Triton
    # cache, so the sanitized runs spend their time running kernels, not compiling them.
    steps = [Step(smoke + ["--dtypes", "float32,float16"], log="smoke.log"),
             Step([tool, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "100",
                   "--log-file", str(ctx.out / "memcheck.log")] + smoke + ["--dtypes", "float32,float16"],
                  env, "memcheck-console.log")]
    if not ctx.quick:
        steps.append(Step([tool, "--tool", "racecheck", "--racecheck-report", "analysis", "--error-exitcode", "99",
                           "--print-limit", "100", "--log-file", str(ctx.out / "racecheck.log")]
                          + smoke + ["--ops", RACECHECK_OPS, "--dtypes", "float16"], env, "racecheck-console.log"))
    return steps


def plan_bench(ctx: Context, seconds: float) -> list[Step]:
    argv = [ctx.python, "-m", "lightmotion_fast.bench.gpu", "--bench-worker", "--out", str(ctx.out),
            "--worker-seconds", f"{seconds:.0f}"]
    if ctx.quick:
        argv.append("--quick")
    if ctx.bench_ops:
        argv += ["--bench-ops", ",".join(ctx.bench_ops)]
    return [Step(argv, log="bench.log")]


# ---------------------------------------------------------------------------------------------
# Running a step within a deadline, streaming its output with the phase's name


def run_step(ctx: Context, phase: str, step: Step, deadline: float) -> tuple[int | None, str]:
    """Run one step; returns (exit status, or None when stopped at the deadline; the output's tail)."""
    env = {**os.environ, **ctx.env(), **step.env}
    log_path = ctx.out / "logs" / (step.log or f"{phase}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    say(f"[{phase}] $ {step.shell()}")
    try:
        proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        return 127, f"could not start: {exc}"

    def pump():
        with log_path.open("w") as fh:
            for line in proc.stdout:
                fh.write(line)
                tail.append(line)
                del tail[:-200]
                if not line.startswith("USDT:"):       # the profiler's start/stop chatter stays in the log
                    say(f"[{phase}] {line.rstrip()}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        say(f"[{phase}] budget reached: interrupting (pytest still writes its JUnit XML on an interrupt)")
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        rc = None
    reader.join(timeout=5)
    return rc, "".join(tail[-60:])


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)        # the group this step started (start_new_session)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------
# Phases


ENV_CODE = ("import sys; print('python', sys.version.split()[0], sys.executable); "
            "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
            "'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'); "
            "import triton; print('triton', triton.__version__)")


def plan_env(ctx: Context) -> list[Step]:
    steps = [Step([ctx.python, "-c", ENV_CODE], log="env.log")]
    if shutil.which("nvidia-smi"):
        steps.append(Step(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,"
                           "temperature.gpu,utilization.gpu", "--format=csv"], log="nvidia-smi.log"))
    return steps


def phase_env(ctx: Context, deadline: float) -> dict:
    steps = plan_env(ctx)
    rc, tail = run_step(ctx, "env", steps[0], deadline)
    for step in steps[1:]:
        run_step(ctx, "env", step, deadline)
    return dict(status="ok" if rc == 0 else "failed", detail=tail.strip())


def phase_wheels(ctx: Context, deadline: float) -> dict:
    steps = plan_wheels(ctx)
    if not steps:
        return dict(status="skipped", detail="no wheels in .whl/ (run ./dev.sh wheels on a networked machine and "
                                              "carry .whl): tests that need diffusers will fail")
    shutil.rmtree(WHEEL_SITE, ignore_errors=True)
    rc, tail = run_step(ctx, "wheels", steps[0], deadline)
    return dict(status="ok" if rc == 0 else "failed", detail=tail.strip()[-2000:])


def phase_build(ctx: Context, deadline: float) -> dict:
    full, noext, check = plan_build(ctx)
    shutil.rmtree(PKG_SITE, ignore_errors=True)
    # the full build may take three quarters of the budget: the fallback needs the rest
    rc, tail = run_step(ctx, "build", full, time.monotonic() + 0.75 * (deadline - time.monotonic()))
    status, detail = "ok", "C++ extension built for this torch"
    if rc != 0:
        why = "ran out of its time" if rc is None else f"failed (exit {rc})"
        say(f"[build] WARNING: the C++ extension build {why}; installing without it (CPU fast paths lost)")
        shutil.rmtree(PKG_SITE, ignore_errors=True)
        rc2, tail2 = run_step(ctx, "build", noext, deadline)
        status = "warning" if rc2 == 0 else "failed"
        detail = (f"extension build {why} (logs/build.log); "
                  + ("installed without it" if rc2 == 0 else "the install without it failed too (logs/build-noext.log)"))
    rc3, tail3 = run_step(ctx, "build", check, max(deadline, time.monotonic() + 30))
    if rc3 != 0:
        status = "failed"
    return dict(status=status, detail=detail + "; " + " ".join(tail3.split())[-300:])


def junit_summary(path: Path) -> dict:
    """Counts and failed test ids from a JUnit XML file (empty dict when missing or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["failed"] = failed
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def phase_tests(ctx: Context, deadline: float) -> dict:
    rc, tail = run_step(ctx, "tests", plan_tests(ctx)[0], deadline)
    summary = junit_summary(ctx.out / "junit.xml")
    status = "ok" if rc == 0 else ("timeout" if rc is None else "failed")
    return dict(status=status, detail=tail.strip()[-1500:], junit=summary)


def sanitizer_verdict(rc: int | None, log: str) -> str:
    """clean | errors found | refused (the machine would not run it) | smoke failed | timeout | failed."""
    if rc is None:
        return "timeout"
    if re.search(r"Device not supported|not supported on this|Unable to|error 999|Target application .* failed "
                 r"to start|could not be found", log, re.I) and "ERROR SUMMARY" not in log:
        return "refused"
    m = re.search(r"ERROR SUMMARY: (\d+) error", log)
    if rc == 99 or (m and int(m.group(1)) > 0):
        return "errors found"
    if rc == 0:
        return "clean"
    return "smoke failed" if m else "failed"


def phase_sanitizer(ctx: Context, deadline: float) -> dict:
    steps = plan_sanitizer(ctx)
    rc, tail = run_step(ctx, "sanitizer", steps[0], time.monotonic() + 0.45 * (deadline - time.monotonic()))
    results = {"smoke (no sanitizer)": dict(verdict="clean" if rc == 0 else ("timeout" if rc is None else "failed"),
                                            exit=rc, summary=" ".join(tail.split()[-12:]))}
    if sanitizer_binary() is None:
        results["memcheck"] = dict(verdict="missing", exit=None,
                                   summary="compute-sanitizer is not on this machine (PATH, /usr/local/cuda/bin)")
        return dict(status="missing", tools=results)
    sanitized = steps[1:]
    for i, step in enumerate(sanitized):
        tool = step.argv[step.argv.index("--tool") + 1]
        # memcheck gets two thirds of what is left when racecheck follows
        share = deadline if i == len(sanitized) - 1 else time.monotonic() + (deadline - time.monotonic()) * 2 / 3
        rc, tail = run_step(ctx, "sanitizer", step, share)
        log_path = ctx.out / f"{tool}.log"
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        summary = re.findall(r"ERROR SUMMARY: .*|RACECHECK SUMMARY: .*", log)
        results[tool] = dict(verdict=sanitizer_verdict(rc, log + tail), exit=rc,
                             summary=summary[-1] if summary else " ".join(tail.split())[-300:])
    worst = "ok" if all(r["verdict"] == "clean" for r in results.values()) else "failed"
    return dict(status=worst, tools=results)


def phase_bench(ctx: Context, deadline: float) -> dict:
    seconds = max(10.0, deadline - time.monotonic())
    rc, tail = run_step(ctx, "bench", plan_bench(ctx, seconds - 15)[0], deadline)
    data = ctx.out / "bench.json"
    status = "ok" if rc == 0 and data.exists() else ("timeout" if rc is None else "failed")
    if data.exists():
        bench = json.loads(data.read_text())
        detail = f"{len(bench['rows'])} timings, {len(bench['skipped'])} case(s) left out for time"
    else:
        detail = "no bench.json (logs/bench.log): " + " ".join(tail.split())[-600:]
    return dict(status=status, detail=detail)


# ---------------------------------------------------------------------------------------------
# The bench worker (runs as `python -m lightmotion_fast.bench.gpu --bench-worker`, package installed)


def bench_worker(out: Path, seconds: float, quick: bool, ops: list[str] | None) -> int:
    from lightmotion_fast.bench import runner

    deadline = time.monotonic() + seconds

    def checkpoint(report):
        (out / "bench.json").write_text(report.to_json())

    out.mkdir(parents=True, exist_ok=True)
    report = runner.bench(ops=ops, quick=quick, deadline=deadline, checkpoint=checkpoint,
                          printer=lambda s: print(s, flush=True))
    checkpoint(report)
    try:   # the kernels as this machine's Triton and ptxas compiled them (the static report's columns)
        from lightmotion_fast.bench import static
        loaded = static.loaded_kernels()
        static.write_loaded_kernels(loaded, out / LOADED_CSV)
        print(f"{len(loaded)} compiled kernels loaded: {out / LOADED_CSV}", flush=True)
    except Exception as exc:  # evidence about the timings, never a reason to lose them
        print(f"loaded-kernel table failed: {type(exc).__name__}: {exc}", flush=True)
    print(runner.format_table(report.rows), flush=True)
    if report.rows:
        runner.write_csv(report.rows, out, report.slug)
        try:
            (out / "plots").mkdir(exist_ok=True)
            runner.draw_plots(report.rows, out / "plots", report.slug)
        except Exception as exc:  # plots are a convenience; the CSV and report carry the numbers
            print(f"plots failed: {type(exc).__name__}: {exc}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# report.md


def _sibling_module(name: str):
    """bench/<name>.py loaded by path (no package import: this must work before the package is installed)."""
    spec = importlib.util.spec_from_file_location(f"lightmotion_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _targets_module():
    return _sibling_module("targets")


def _fmt(v, spec=".3f") -> str:
    return "" if v is None or v == "" else format(v, spec)


def op_tables(rows: list[dict], verdicts: list) -> list[str]:
    """One markdown table per op: ours, each peer, best peer / ours, % of ceiling, SDPA backends, target."""
    is_peer = _sibling_module("scenario").is_peer
    lines: list[str] = []
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["op"], r["shape"], r["mode"], r.get("dtype", "")), {})[r["provider"]] = r
    for op in dict.fromkeys(r["op"] for r in rows):
        cases = [(k, v) for k, v in by_case.items() if k[0] == op]
        peers = list(dict.fromkeys(p for _, provs in cases for p in provs if p != "lightmotion"))
        lines += [f"### {op}", "",
                  "| shape | mode | dtype | ours ms | " + " | ".join(f"{p} ms" for p in peers)
                  + " | best peer / ours | % of ceiling | SDPA | target |",
                  "|---|---|---|---:|" + "---:|" * len(peers) + "---:|---:|---|---|"]
        for (op_, shape, mode, dtype), provs in cases:
            ours = provs.get("lightmotion")
            # Ours in other configurations ("lightmotion/...") are shown, never the best peer.
            peer_times = {p: provs[p]["median_ms"] for p in peers if p in provs and is_peer(p)}
            ratio = ""
            if ours and peer_times:
                best = min(peer_times, key=peer_times.get)
                ratio = f"{peer_times[best] / ours['median_ms']:.2f}x ({best})"
            sdpa = sorted({f"{p}: {r['sdpa_backend']}" for p, r in provs.items() if r.get("sdpa_backend")})
            judged = [v for v in verdicts if v.target.op == op_ and v.shape == shape and v.target.mode == mode
                      and v.dtype == dtype]
            target = "; ".join(f"{v.target.describe()}: **{v.status}** ({v.detail})" for v in judged)
            cells = [shape, mode, dtype, _fmt(ours and ours["median_ms"], ".4f")]
            cells += [_fmt(provs[p]["median_ms"], ".4f") if p in provs else "" for p in peers]
            cells += [ratio, _fmt(ours and ours.get("pct_of_ceiling"), ".1f"), ", ".join(sdpa), target]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    return lines


def ablation_section(rows: list[dict]) -> list[str]:
    """Each design choice that a "lightmotion/<choice>" row times without: per case, ours and the row's
    median and what the choice buys (row / ours: above 1 it pays, below 1 it costs), then per choice the
    geometric mean over its cases: the table a session with a GPU reads to keep or drop each choice."""
    prefix = _sibling_module("scenario").ABLATION_PREFIX
    ours = {(r["op"], r["shape"], r["mode"], r.get("dtype", "")): r["median_ms"] for r in rows
            if r["provider"] == "lightmotion" and r.get("median_ms")}
    found: dict[str, list[tuple]] = {}
    for r in rows:
        key = (r["op"], r["shape"], r["mode"], r.get("dtype", ""))
        if r["provider"].startswith(prefix) and r.get("median_ms") and key in ours:
            found.setdefault(r["provider"], []).append((*key, ours[key], r["median_ms"]))
    if not found:
        return []
    out = ["## Ablations", "",
           "Ours against ours with one design choice switched off (or in another mode); "
           "without / with > 1: the choice pays.", "",
           "| row | op | shape | mode | dtype | with ms | without ms | without / with |",
           "|---|---|---|---|---|---:|---:|---:|"]
    summary = []
    for provider, cases in found.items():
        for op, shape, mode, dtype, with_ms, without_ms in cases:
            out.append(f"| {provider} | {op} | {shape} | {mode} | {dtype} | {with_ms:.4f} | {without_ms:.4f} | "
                       f"{without_ms / with_ms:.2f}x |")
        ratios = [without / with_ for *_, with_, without in cases]
        mean = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        verdict = "pays" if mean > 1.02 else "costs" if mean < 0.98 else "within 2 %"
        summary.append(f"- `{provider}`: geometric mean {mean:.2f}x over {len(cases)} case(s), range "
                       f"{min(ratios):.2f}-{max(ratios):.2f}x: the choice {verdict}")
    return out + [""] + summary + [""]


def loaded_section(rows: list[dict]) -> list[str]:
    """report.md's account of the kernels as compiled on the GPU machine (bench worker's LOADED_CSV):
    the ones with local memory (spills or stack) and the ones with one resident block per SM."""
    def listing(picked):
        return [f"| {r['kernel']} | {r['constexprs']} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
                f"{r['local_bytes']} | {r['shared']} | {r['blocks_per_sm']} |" for r in picked[:30]]

    head = ["| kernel | constexprs | warps | stages | registers | local B | shared B | blocks/SM |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    local = [r for r in rows if int(r["local_bytes"] or 0) > 0]
    single = [r for r in rows if str(r["blocks_per_sm"]) == "1"]
    out = ["## Kernels as compiled here", "",
           f"{len(rows)} kernels compiled and loaded by the bench ({LOADED_CSV}: registers and local memory "
           f"per thread as the driver reports them, occupancy by the sm_90 rules); {len(local)} use local "
           f"memory, {len(single)} fit one block per SM.", ""]
    if local:
        out += ["Local memory (spills or stack):", ""] + head + listing(local) + [""]
    if single:
        out += ["One block per SM:", ""] + head + listing(single) + [""]
    return out


def build_report(bench: dict | None, phases: list[Phase], meta: dict, loaded: list[dict] | None = None) -> str:
    """report.md from the bench data (runner.BenchReport.to_json()), the phase results, run metadata and
    the loaded-kernel rows (None: none recorded)."""
    targets = _targets_module()
    rows = (bench or {}).get("rows", [])
    ceil = (bench or {}).get("ceilings", {})
    verdicts = targets.evaluate(rows, launch_ms=ceil.get("launch_ms"))
    out = [f"# GPU evidence: {meta.get('device', 'unknown device')}", "",
           f"- date {meta.get('date')}, commit {meta.get('commit')}, torch {meta.get('torch')}, "
           f"triton {meta.get('triton')}, python {meta.get('python')}",
           f"- total {meta.get('seconds', 0):.0f} s of a {meta.get('budget', 0):.0f} s budget", "",
           "## Phases", "", "| phase | budget s | used s | status | detail |", "|---|---:|---:|---|---|"]
    for p in phases:
        detail = p.result.get("detail", "")
        if p.name == "tests" and p.result.get("junit"):
            j = p.result["junit"]
            detail = (f"{j['passed']} passed, {j['failures']} failed, {j['errors']} errors, "
                      f"{j['skipped']} skipped of {j['tests']}")
        if p.name == "sanitizer" and p.result.get("tools"):
            detail = "; ".join(f"{t}: {r['verdict']} ({r['summary']})" for t, r in p.result["tools"].items())
        detail = " ".join(str(detail).split())[:300].replace("|", "/")
        out.append(f"| {p.name} | {p.budget_s:.0f} | {_fmt(p.result.get('seconds'), '.0f')} | "
                   f"{p.result.get('status', 'not run')} | {detail} |")
    tests = next((p.result.get("junit") for p in phases if p.name == "tests"), None)
    if tests and tests.get("failed"):
        out += ["", "Failed tests:", ""] + [f"- `{t}`" for t in tests["failed"][:40]]
    if ceil:
        launch = f", empty launch {ceil['launch_ms'] * 1e3:.1f} us" if ceil.get("launch_ms") else ""
        out += ["", "## Ceilings", "",
                f"copy {ceil['copy_gbps']:,.0f} GB/s (read + write, {ceil.get('buffer_mb', 0):,.0f} MiB buffers, "
                f"last-level cache {ceil.get('cache_mb', 0):,.0f} MiB), bf16 matmul {ceil['matmul_tflops']:,.1f} "
                f"TFLOP/s{launch}. % of ceiling = the roofline floor (the larger of the case's least bytes over "
                "the copy figure and its FLOPs over the matmul figure) over the measured time."]
    out += ["", "## Targets", "", "| op | mode | shape | target | achieved | status | source |",
            "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        out.append(f"| {v.target.op} | {v.target.mode} | {v.shape or v.target.shape} {v.dtype} | "
                   f"{v.target.describe()} | {v.detail} | **{v.status}** | {v.target.source} |")
    counts = {s: sum(v.status == s for v in verdicts) for s in ("met", "missed", "not measured")}
    out += ["", f"{counts['met']} met, {counts['missed']} missed, {counts['not measured']} not measured.", ""]
    if rows:
        out += ["## Per op", ""] + op_tables(rows, verdicts) + ablation_section(rows)
    notes = (bench or {}).get("notes", [])
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    skipped = (bench or {}).get("skipped", [])
    if skipped:
        out += ["## Cases not timed (budget)", ""] + [f"- {s}" for s in skipped] + [""]
    if loaded is not None:
        out += loaded_section(loaded)
    return "\n".join(out) + "\n"


def phase_report(ctx: Context, deadline: float, meta: dict) -> dict:
    data = ctx.out / "bench.json"
    bench = json.loads(data.read_text()) if data.exists() else None
    if bench and bench.get("device"):
        meta["device"] = bench["device"]
    table = ctx.out / LOADED_CSV
    loaded = list(csv.DictReader(table.open(newline=""))) if table.exists() else None
    report = build_report(bench, list(ctx.phases.values()), meta, loaded)
    (ctx.out / "report.md").write_text(report)
    (ctx.out / "phases.json").write_text(json.dumps({p.name: p.result for p in ctx.phases.values()}, indent=1,
                                                    default=str))
    return dict(status="ok", detail=str(ctx.out / "report.md"))


def bundle(out: Path, dest: Path | None) -> list[Path]:
    """gpu_report.tar.gz of the whole folder; with dest, at most 8 plain files copied there."""
    archive = out.parent / f"{out.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    shutil.copy2(archive, out / "gpu_report.tar.gz")
    archive.unlink()
    copied = []
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        timings = sorted(p for p in out.glob("*.csv") if p.name != LOADED_CSV)[:1]
        picks = [out / "report.md", out / "gpu_report.tar.gz", out / "junit.xml", out / "console.log",
                 out / "memcheck.log", out / "racecheck.log", *timings, out / LOADED_CSV]
        for p in picks[:8]:
            if p.exists():
                shutil.copy2(p, dest / p.name)
                copied.append(dest / p.name)
    return copied


# ---------------------------------------------------------------------------------------------
# ./dev.sh wheels: what the GPU machines lack, as CPython 3.12 manylinux x86_64 wheels in .whl/

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
GPU_MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def wheel_requirements(wheel: Path) -> list[str]:
    """The names a wheel requires on the GPU machine (Requires-Dist without extras, markers evaluated
    for CPython 3.12 on Linux x86_64 where `packaging` is available)."""
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    names = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        marker = req.split(";", 1)[1].strip() if ";" in req else ""
        if "extra" in marker:
            continue
        if marker:
            try:
                from packaging.markers import Marker

                if not Marker(marker).evaluate(GPU_MARKER_ENV):
                    continue
            except ImportError:
                pass
        names.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    return names


def download_wheels(dest: Path, python: str = sys.executable) -> int:
    """Download WHEELS_NEEDED and every requirement they pull in that the GPU machines lack (GPU_HAS),
    --no-deps, each at the version this environment has installed (the one the tests ran with)."""
    from importlib import metadata

    dest.mkdir(parents=True, exist_ok=True)
    queue, seen, failed = list(WHEELS_NEEDED), set(), []
    while queue:
        name = queue.pop(0)
        key = _norm(name)
        if key in seen or key in GPU_HAS or NEVER_CARRY.match(key):
            continue
        seen.add(key)
        try:
            spec = f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            spec = name
        for old in dest.glob("*.whl"):        # one version of each: two stop the whole install
            if _norm(old.name.split("-")[0]) == key:
                old.unlink()
        cmd = [python, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        say(f"[wheels] {spec}")
        if subprocess.run(cmd + [spec]).returncode != 0:
            failed.append(spec)
            continue
        wheel = next((w for w in dest.glob("*.whl") if _norm(w.name.split("-")[0]) == key), None)
        if wheel is not None:
            queue += wheel_requirements(wheel)
    (dest / "COMMIT").write_text(_commit() + "\n")
    say(f"[wheels] {dest}: " + ", ".join(sorted(w.name for w in dest.glob("*.whl"))))
    if failed:
        say(f"[wheels] FAILED to download: {failed}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Main


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            return sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = REPO / ".whl" / "COMMIT"      # written by ./dev.sh wheels: the tree travels without .git
    return stamp.read_text().strip() + " (per .whl/COMMIT)" if stamp.exists() else "unknown"


def is_report_folder(path: Path) -> bool:
    """Safe to empty: an empty folder or one an earlier run wrote (console.log at its top), never the
    repository or a folder holding it."""
    if path == REPO or path in REPO.parents:
        return False
    return not any(path.iterdir()) or (path / "console.log").exists()


def _budgets(total: float) -> dict[str, float]:
    scale = min(1.0, total / sum(b for _, b, _ in PHASES))
    return {name: b * scale for name, b, _ in PHASES}


def dry_run(ctx: Context, budgets: dict[str, float]) -> int:
    say(f"./dev.sh gpu --dry-run: {len(PHASES)} phases within {sum(budgets.values()):.0f} s "
        f"(unused time goes to the bench); output folder {ctx.out}")
    say(f"python {ctx.python}; private installs under {WORK}; environment of every step:")
    for k, v in sorted(ctx.env().items()):
        say(f"    {k}={v}")
    plans = {
        "env": plan_env(ctx),
        "wheels": plan_wheels(ctx),
        "build": plan_build(ctx),
        "tests": plan_tests(ctx),
        "sanitizer": plan_sanitizer(ctx),
        "bench": plan_bench(ctx, budgets["bench"] - 15),
        "report": [],
    }
    for name, _, what in PHASES:
        skipped = name in OPTIONAL_PHASES and ctx.only and name not in ctx.only
        say(f"\n== phase {name} (budget {budgets[name]:.0f} s){' [not selected]' if skipped else ''}: {what}")
        if name == "wheels" and not plans[name]:
            say("   (no .whl/*.whl here: nothing to install; ./dev.sh wheels downloads them)")
        if name == "sanitizer" and sanitizer_binary() is None:
            say("   (compute-sanitizer not found on this machine: the phase will report it missing)")
        if name == "tests":
            say("   (ignored: the CPU-side AOT compile checks, which CI runs: "
                + ", ".join(p.name for p in cpu_only_tests()) + ")")
        for step in plans[name]:
            say(f"   $ {step.shell()}" + (f"    # {step.note}" if step.note else ""))
        if name == "report":
            say(f"   writes {ctx.out}/report.md, junit.xml, memcheck.log, racecheck.log, <device>.csv, "
                f"{LOADED_CSV}, plots/, bench.json, console.log, logs/, gpu_report.tar.gz")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev.sh gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu_report", help="report folder (default gpu_report/)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="also copy report.md, the tarball, the CSV, JUnit and logs here (e.g. \"$OUT\")")
    parser.add_argument("--dry-run", action="store_true", help="print every phase, its budget and its commands")
    parser.add_argument("--quick", action="store_true", help="bench only the quick cases; no racecheck")
    parser.add_argument("--only", default="", help="run only these of tests,sanitizer,bench (env, wheels, build "
                                                   "and report always run)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="total seconds (default %(default)s)")
    parser.add_argument("--bench-ops", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--wheels", action="store_true", help="download the wheels the GPU machines lack into .whl/")
    parser.add_argument("--bench-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-seconds", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ops = [o for o in args.bench_ops.split(",") if o] or None
    if args.bench_worker:
        return bench_worker(args.out, args.worker_seconds, args.quick, ops)
    if args.wheels:
        return download_wheels(REPO / ".whl")

    only = {o for o in args.only.split(",") if o}
    if only - OPTIONAL_PHASES:
        parser.error(f"--only takes {sorted(OPTIONAL_PHASES)}, not {sorted(only - OPTIONAL_PHASES)}")
    start = time.monotonic()
    out = args.out.resolve()
    ctx = Context(out=out, python=sys.executable, quick=args.quick, only=only, bench_ops=ops, dry_run=args.dry_run,
                  deadline=start + args.budget, commit=_commit())
    budgets = _budgets(args.budget)
    if args.dry_run:
        return dry_run(ctx, budgets)

    if out.exists():
        if not is_report_folder(out):
            parser.error(f"--out {out} exists and is not an earlier report folder: choose another (it is emptied)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    say.open(out / "console.log")
    WORK.mkdir(parents=True, exist_ok=True)
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), commit=ctx.commit,
                python=sys.version.split()[0], budget=args.budget)
    runners = dict(env=phase_env, wheels=phase_wheels, build=phase_build, tests=phase_tests,
                   sanitizer=phase_sanitizer, bench=phase_bench)
    names = [n for n, _, _ in PHASES]
    for i, (name, _, what) in enumerate(PHASES):
        phase = ctx.phases[name] = Phase(name, budgets[name], what)
        if name in OPTIONAL_PHASES and only and name not in only:
            phase.result = dict(status="not selected")
            continue
        # The bench takes whatever the earlier phases left; every phase stops in time for the report.
        later = sum(budgets[n] for n in names[i + 1:] if n == "report")
        if name == "bench":
            phase.budget_s = max(10.0, ctx.deadline - later - time.monotonic())
        deadline = min(time.monotonic() + phase.budget_s, ctx.deadline - later)
        elapsed = time.monotonic() - start
        say(f"\n=== [{elapsed:5.0f} s] phase {name}: budget {phase.budget_s:.0f} s: {what}")
        t0 = time.monotonic()
        try:
            if name == "report":
                meta["seconds"] = time.monotonic() - start
                phase.result = phase_report(ctx, deadline, meta)
            else:
                phase.result = runners[name](ctx, deadline)
        except Exception as exc:  # a phase never stops the next one
            phase.result = dict(status="failed", detail=f"{type(exc).__name__}: {exc}")
        phase.result["seconds"] = time.monotonic() - t0
        if name == "env" and phase.result.get("detail"):
            m = re.search(r"torch (\S+).*\ntriton (\S+)", phase.result["detail"], re.S)
            if m:
                meta["torch"], meta["triton"] = m.group(1), m.group(2)
        say(f"=== phase {name}: {phase.result['status']} in {phase.result['seconds']:.0f} s")
    # the report's phase table needs the report's own time, so write it once more (cheap)
    phase_report(ctx, ctx.deadline, meta)
    copied = bundle(out, args.bundle)
    say(f"\nDone in {time.monotonic() - start:.0f} s: {out}/report.md"
        + (f"; copied {len(copied)} files to {args.bundle}" if copied else ""))
    say("\n" + "\n".join(f"  {p.name:<10} {p.result.get('status', '')}" for p in ctx.phases.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
