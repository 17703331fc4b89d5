"""`python -m lightmotion_fast bench`: device ceilings, every op's scenarios, one table, a CSV, plots.

Timings on CUDA come from CUDA events through triton.testing.do_bench (median of many runs after
warm-up); on a CPU the runner says so and times the CPU paths with a wall clock.

Where results go: `--out DIR`, else $LIGHTMOTION_BENCH_DIR, else the user's cache folder
($XDG_CACHE_HOME or ~/.cache, then lightmotion_fast/bench), never the source tree. Committed results
live in benchmarks/results/ (COMMITTED_DIR) and are copied there by hand.

Honesty checks made here for every run: the ceilings are measured on buffers several times the
last-level cache; a percentage of a ceiling above 100 gets a note saying why it cannot be trusted;
a timing whose p20-p80 spread exceeds SPREAD_FLAG of its median is flagged (the machine was busy);
the device column names the CPU or GPU model exactly; attention providers record which
scaled_dot_product_attention backend PyTorch picked (read from a profiler pass, so scenario files
need nothing).
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import os
import pkgutil
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightmotion_fast.bench.scenario import Case, is_peer

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIO_DIR = REPO_ROOT / "benchmarks" / "scenarios"     # the source checkout's scenarios
SCENARIO_PACKAGE = "lightmotion_fast.scenarios"            # the same files, as shipped in the wheel
COMMITTED_DIR = REPO_ROOT / "benchmarks" / "results"
CSV_COLUMNS = ["op", "provider", "mode", "shape", "median_ms", "p20_ms", "p80_ms", "gbps", "tflops",
               "pct_of_ceiling", "device", "torch", "triton", "commit", "date", "dtype", "spread_pct",
               "sdpa_backend"]
SPREAD_FLAG = 0.25      # (p80 - p20) / median above this: the timing is flagged as taken under load
ATTENTION_OPS = re.compile(r"attention")


def default_results_dir() -> Path:
    """Where `bench` writes when no --out is given: outside the source tree, in the user's cache."""
    if os.environ.get("LIGHTMOTION_BENCH_DIR"):
        return Path(os.environ["LIGHTMOTION_BENCH_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(cache).expanduser() / "lightmotion_fast" / "bench"


RESULTS_DIR = default_results_dir()


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float

    @property
    def spread(self) -> float:
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else 0.0


@dataclass
class Ceilings:
    copy_gbps: float
    matmul_tflops: float
    launch_ms: float | None = None      # an empty kernel's launch (CUDA only)
    buffer_mb: float = 0.0              # size of each copy buffer (several times the last-level cache)
    cache_mb: float = 0.0               # the last-level cache it was sized against


@dataclass
class BenchReport:
    """Everything one run produced: the rows (one per case x provider), the ceilings and the notes."""
    rows: list[dict]
    ceilings: Ceilings
    device: str                         # exact model name
    slug: str                           # file-name form
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # cases left out when the deadline came

    def to_json(self) -> str:
        return json.dumps(dict(rows=self.rows, ceilings=asdict(self.ceilings), device=self.device,
                               slug=self.slug, notes=self.notes, skipped=self.skipped), indent=1)


# ---------------------------------------------------------------------------------------------
# The device


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The exact model: the GPU's name and memory, or the CPU's model string with its family/model/
    stepping numbers (some virtual machines report only "AMD EPYC") and its logical CPU count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB, {props.multi_processor_count} SMs, "
                f"sm_{props.major}{props.minor})")
    info = _cpuinfo()
    ids = ", ".join(f"{k.split()[-1] if k != 'cpu family' else 'family'} {info[k]}"
                    for k in ("cpu family", "model", "stepping") if k in info)
    return f"{_cpu_model()} ({ids + ', ' if ids else ''}{os.cpu_count()} logical CPUs)"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: the GPU's name, or cpu-<model name>."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-" + _cpu_model()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 on a GPU; the largest CPU cache sysfs lists on a CPU (0 when unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=0)


# ---------------------------------------------------------------------------------------------
# Timing and ceilings


def time_fn(fn: Callable[[], object], device: torch.device, budget_s: float = 0.4) -> Timing:
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)
    fn()  # warm-up (allocations, lazy imports)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < budget_s and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return Timing(statistics.median(samples), qs[1], qs[7])


def _empty_launch_ms(device: torch.device) -> float | None:
    """Median time of a Triton kernel that does nothing (the launch-bound floor), CUDA only."""
    if device.type != "cuda":
        return None
    try:
        x = torch.empty(1, device=device)
        return time_fn(lambda: _empty_kernel()[(1,)](x, 1), device).median_ms
    except Exception as exc:  # the launch floor is a convenience: the other ceilings stand without it
        print(f"  (empty-launch ceiling not measured: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _empty_kernel():
    import triton

    @triton.jit
    def empty_kernel(x_ptr, n):
        pass

    return empty_kernel


def measure_ceilings(device: torch.device) -> Ceilings:
    """The device's own limits: copy bandwidth (bytes read + written) on buffers of at least eight times
    the last-level cache (so the copy streams from memory, not cache), the bf16 matmul rate, and on
    CUDA an empty kernel's launch time."""
    cache = last_level_cache_bytes(device)
    floor = (1 << 30) if device.type == "cuda" else (64 << 20)
    nbytes = max(floor, 8 * cache)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    copy_gbps = 2 * src.numel() * src.element_size() / (t.median_ms * 1e-3) / 1e9
    del src, dst
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, device)
    tflops = 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12
    del a, b
    return Ceilings(copy_gbps, tflops, _empty_launch_ms(device), nbytes / 2 ** 20, cache / 2 ** 20)


# ---------------------------------------------------------------------------------------------
# Scenarios


def _scenario_modules_from_package() -> dict[str, object] | None:
    """The scenarios as the installed package ships them (lightmotion_fast.scenarios), or None."""
    try:
        pkg = importlib.import_module(SCENARIO_PACKAGE)
    except ImportError:
        return None
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    return {name: f"{SCENARIO_PACKAGE}.{name}" for name in names} or None


def _scenario_modules_from_dir(directory: Path) -> dict[str, object]:
    if not directory.is_dir():
        raise FileNotFoundError(f"benchmark scenarios not found: no package {SCENARIO_PACKAGE} and no folder "
                                f"{directory} (set LIGHTMOTION_SCENARIO_DIR to benchmarks/scenarios)")
    return {p.stem: p for p in sorted(directory.glob("*.py")) if not p.stem.startswith("_")}


def scenario_sources() -> dict[str, object]:
    """op file name -> where its scenario lives: LIGHTMOTION_SCENARIO_DIR if set, else the installed
    package lightmotion_fast.scenarios (a wheel), else the source checkout's benchmarks/scenarios."""
    if os.environ.get("LIGHTMOTION_SCENARIO_DIR"):
        return _scenario_modules_from_dir(Path(os.environ["LIGHTMOTION_SCENARIO_DIR"]))
    return _scenario_modules_from_package() or _scenario_modules_from_dir(SCENARIO_DIR)


def _import_scenario(name: str, source) -> object:
    if isinstance(source, str):
        return importlib.import_module(source)
    spec = importlib.util.spec_from_file_location(f"lightmotion_bench_{name}", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_scenarios(ops: Iterable[str] | None = None) -> dict[str, Callable]:
    """op file name -> its `cases(device, quick)` function."""
    sources = scenario_sources()
    wanted = set(ops) if ops else None
    if wanted is not None and wanted - set(sources):
        raise ValueError(f"--ops names unknown scenario(s) {sorted(wanted - set(sources))}; "
                         f"available: {sorted(sources)}")
    return {name: _import_scenario(name, src).cases for name, src in sources.items()
            if wanted is None or name in wanted}


# ---------------------------------------------------------------------------------------------
# Run metadata


def _git_commit() -> str:
    """The commit benchmarked: $LIGHTMOTION_COMMIT if set (a copy of the tree without .git), else git."""
    if os.environ.get("LIGHTMOTION_COMMIT"):
        return os.environ["LIGHTMOTION_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


_SDPA_BACKENDS = (("cudnn_attention", "cudnn"), ("flash_attention_for_cpu", "flash (cpu)"),
                  ("flash_attention", "flash"), ("efficient_attention", "efficient"),
                  ("attention_math", "math"), ("fmha", "efficient"), ("flash_fwd", "flash"), ("cudnn", "cudnn"))


def sdpa_backends(fn: Callable[[], object]) -> str:
    """Which scaled_dot_product_attention backend(s) one call of `fn` ran, read from the profiler's op
    and kernel names ("" when it ran no SDPA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    return backends_from_names(names)


def backends_from_names(names: Iterable[str]) -> str:
    found = []
    for name in names:
        low = name.lower()
        if "scaled_dot_product" not in low and "fmha" not in low and "flash" not in low and "cudnn" not in low:
            continue
        for pattern, backend in _SDPA_BACKENDS:
            if pattern in low:
                found.append(backend)
                break
    return "+".join(sorted(set(found)))


# ---------------------------------------------------------------------------------------------
# The run


def _cases(scenarios: dict[str, Callable], device: torch.device, quick: bool) -> list[Case]:
    cases: list[Case] = []
    for cases_fn in scenarios.values():
        for case in cases_fn(device, quick):
            if (quick and not case.quick) or (device.type != "cuda" and not case.cpu):
                continue
            cases.append(case)
    # The quick cases (every op's main shapes) first, so a run cut short by its deadline still has
    # every op; the stable sort keeps each op's own order.
    return sorted(cases, key=lambda c: not c.quick)


def pct_of_roofline(nbytes: int | None, flops: float | None, median_ms: float, ceil: Ceilings) -> float | None:
    """100 x the roofline floor over the measured time. The floor is the larger of the least bytes over
    the copy bandwidth and the useful FLOPs over the bf16 matmul rate (METHOD: whichever binds)."""
    floors = []
    if nbytes:
        floors.append(nbytes / (ceil.copy_gbps * 1e9))
    if flops:
        floors.append(flops / (ceil.matmul_tflops * 1e12))
    return 100 * max(floors) / (median_ms * 1e-3) if floors else None


def _row(case: Case, name: str, t: Timing, ceil: Ceilings, meta: dict, backend: str) -> dict:
    seconds = t.median_ms * 1e-3
    gbps = case.bytes / seconds / 1e9 if case.bytes else None
    tflops = case.flops / seconds / 1e12 if case.flops else None
    pct = pct_of_roofline(case.bytes, case.flops, t.median_ms, ceil)
    return dict(op=case.op, provider=name, mode=case.mode, shape=case.shape, median_ms=t.median_ms,
                p20_ms=t.p20_ms, p80_ms=t.p80_ms, gbps=gbps, tflops=tflops, pct_of_ceiling=pct,
                dtype=case.dtype, spread_pct=100 * t.spread, sdpa_backend=backend, **meta)


def honesty_notes(rows: list[dict]) -> list[str]:
    """Notes on what a reader must not take at face value: % of ceiling above 100, timings under load."""
    notes = []
    for r in rows:
        where = f"{r['op']} {r['shape']} {r['mode']} {r['provider']}"
        if r.get("pct_of_ceiling") is not None and r["pct_of_ceiling"] > 100:
            notes.append(f"{where}: {r['pct_of_ceiling']:.0f} % of the ceiling is above 100 %: its inputs stay "
                         "in cache between repeats, the case counts more bytes/FLOPs than it must move, or "
                         "it computes in a faster format than the bf16 matmul ceiling; not a roofline figure")
    noisy = [r for r in rows if (r.get("spread_pct") or 0) > 100 * SPREAD_FLAG]
    if noisy:
        notes.append(f"{len(noisy)} of {len(rows)} timings spread more than {100 * SPREAD_FLAG:.0f} % "
                     "(p20-p80 over the median): the machine was probably under load; rerun before "
                     "trusting them (" + ", ".join(f"{r['op']}/{r['provider']}" for r in noisy[:6])
                     + (", ..." if len(noisy) > 6 else "") + ")")
    return notes


def _load_note(device: torch.device) -> str | None:
    if device.type == "cuda" or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        return (f"load average {load:.1f} on {cpus} logical CPUs before the run: other work shares this "
                "machine, so CPU timings are inflated")
    return None


def bench(ops: list[str] | None = None, quick: bool = False, device: torch.device | None = None,
          printer: Callable[[str], None] = print, deadline: float | None = None,
          progress: bool = True, checkpoint: Callable[[BenchReport], None] | None = None) -> BenchReport:
    """Measure the ceilings, then time every provider of every case. `deadline` (time.monotonic()):
    cases not started by then are listed in `skipped`, not timed. `checkpoint` receives the report so
    far after every case (so a run killed mid-way still leaves its rows)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slug, name = device_slug(device), device_name(device)
    notes: list[str] = []
    if device.type != "cuda":
        printer(f"No CUDA device: timing the CPU paths on {name} (C++ ops where built, else the "
                "PyTorch reference). These are CPU figures, not GPU ones.")
    if (load := _load_note(device)) is not None:
        printer(f"  warning: {load}")
        notes.append(load)
    printer(f"Measuring the ceilings of {name} ...")
    ceil = measure_ceilings(device)
    launch = f", empty launch {ceil.launch_ms * 1e3:.1f} us" if ceil.launch_ms else ""
    printer(f"  copy bandwidth {ceil.copy_gbps:,.1f} GB/s (read + write, {ceil.buffer_mb:,.0f} MiB buffers, "
            f"last-level cache {ceil.cache_mb:,.0f} MiB), bf16 matmul {ceil.matmul_tflops:,.2f} TFLOP/s{launch}")

    cases = _cases(load_scenarios(ops), device, quick)
    meta = dict(device=name, torch=torch.__version__, triton=_triton_version(), commit=_git_commit(),
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    rows: list[dict] = []
    skipped: list[str] = []
    for i, case in enumerate(cases):
        label = f"{case.op} {case.shape} {case.mode}"
        if deadline is not None and time.monotonic() > deadline:
            skipped.append(label)
            continue
        if progress:
            printer(f"  [{i + 1}/{len(cases)}] {label}")
        try:
            providers = case.setup()
        except Exception as exc:  # a case that cannot be built here is reported, not fatal
            notes.append(f"{label}: setup failed ({type(exc).__name__}: {exc})")
            continue
        for pname, fn in providers.items():
            if pname in case.skip:
                continue
            try:
                t = time_fn(fn, device)
            except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
                notes.append(f"{label} {pname}: failed ({type(exc).__name__}: {exc})")
                continue
            backend = ""
            if ATTENTION_OPS.search(case.op):
                try:
                    backend = sdpa_backends(fn)
                except Exception as exc:  # the timing stands without the backend's name
                    notes.append(f"{label} {pname}: SDPA backend not read ({type(exc).__name__}: {exc})")
            rows.append(_row(case, pname, t, ceil, meta, backend))
        if case.note:
            notes.append(f"{case.op} {case.shape}: {case.note}")
        del providers
        if checkpoint is not None:
            checkpoint(BenchReport(rows, ceil, name, slug, list(dict.fromkeys(notes)), skipped))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if skipped:
        notes.append(f"{len(skipped)} case(s) not timed: the time budget ran out")
    notes.extend(honesty_notes(rows))
    return BenchReport(rows, ceil, name, slug, list(dict.fromkeys(notes)), skipped)


def run(ops: list[str] | None = None, quick: bool = False, plot: bool = True,
        results_dir: Path | None = None, device: torch.device | None = None,
        printer: Callable[[str], None] = print) -> list[dict]:
    """`bench`, then the table, the CSV (appended) and one plot per op in `results_dir` (default:
    default_results_dir(), outside the source tree)."""
    results_dir = Path(results_dir) if results_dir is not None else default_results_dir()
    report = bench(ops, quick, device, printer)
    rows = report.rows
    printer(format_table(rows))
    for note in report.notes:
        printer(f"  note: {note}")
    if rows:
        path = write_csv(rows, results_dir, report.slug)
        printer(f"Appended {len(rows)} rows to {path}")
        if plot:
            for p in draw_plots(rows, results_dir, report.slug):
                printer(f"Plot: {p}")
    return rows


def _speedups(rows: list[dict]) -> dict[tuple, str]:
    """For each of our rows: speedup over the reference and over the fastest peer of the same case."""
    by_case: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault((r["op"], r["shape"], r["mode"]), {})[r["provider"]] = r["median_ms"]
    out = {}
    for key, times in by_case.items():
        if "lightmotion" not in times:
            continue
        ours = times["lightmotion"]
        parts = []
        if "reference" in times:
            parts.append(f"{times['reference'] / ours:.1f}x ref")
        peers = {k: v for k, v in times.items() if is_peer(k)}
        if peers:
            best = min(peers, key=peers.get)
            parts.append(f"{peers[best] / ours:.2f}x {best}")
        out[key] = ", ".join(parts)
    return out


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no benchmark rows)"
    speed = _speedups(rows)
    header = ["op", "shape", "mode", "dtype", "provider", "median ms", "GB/s", "TFLOP/s", "% ceil", "speedup"]
    with_sdpa = any(r.get("sdpa_backend") for r in rows)
    if with_sdpa:
        header.append("SDPA")
    lines = []
    for r in rows:
        key = (r["op"], r["shape"], r["mode"])
        lines.append([
            r["op"], r["shape"], r["mode"], r.get("dtype", ""), r["provider"], f"{r['median_ms']:.4f}",
            "" if r["gbps"] is None else f"{r['gbps']:.1f}",
            "" if r["tflops"] is None else f"{r['tflops']:.2f}",
            "" if r["pct_of_ceiling"] is None else f"{r['pct_of_ceiling']:.1f}",
            speed.get(key, "") if r["provider"] == "lightmotion" else "",
        ] + ([r.get("sdpa_backend") or ""] if with_sdpa else []))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*l) for l in lines])


def _csv_value(v) -> str:
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))


def write_csv(rows: list[dict], results_dir: Path, slug: str) -> Path:
    """Append rows to results_dir/<slug>.csv; a file written with older columns is rewritten with
    today's (its old rows keep their values, new columns empty)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{slug}.csv"
    old: list[dict] = []
    if path.exists():
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != CSV_COLUMNS:
                old = list(reader)
                path.unlink()
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in old:
            writer.writerow({k: r.get(k) or "" for k in CSV_COLUMNS})
        for r in rows:
            writer.writerow({k: _csv_value(r.get(k)) for k in CSV_COLUMNS})
    return path


def draw_plots(rows: list[dict], results_dir: Path, slug: str) -> list[Path]:
    """One bar chart per op: median time of every provider at every benchmarked shape (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys(f"{r['shape']}\n{r['mode']}" for r in op_rows))
        providers = list(dict.fromkeys(r["provider"] for r in op_rows))
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(cases)), 4.2))
        width = 0.8 / len(providers)
        for i, prov in enumerate(providers):
            xs, ys = [], []
            for j, c in enumerate(cases):
                match = [r for r in op_rows if r["provider"] == prov and f"{r['shape']}\n{r['mode']}" == c]
                if match:
                    xs.append(j + i * width)
                    ys.append(match[0]["median_ms"])
            ax.bar(xs, ys, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms, log)")
        ax.set_title(f"{op} on {slug}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = results_dir / f"{slug}-{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
