"""`python -m lightmotion_fast bench`: device ceilings, every op's scenarios, one table, a CSV, plots.

Timings on CUDA come from CUDA events through triton.testing.do_bench (median of many runs after
warm-up); on a CPU the runner says so and times the CPU paths with a wall clock.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import importlib.util
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lightmotion_fast.bench.scenario import Case

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIO_DIR = REPO_ROOT / "benchmarks" / "scenarios"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CSV_COLUMNS = ["op", "provider", "mode", "shape", "median_ms", "p20_ms", "p80_ms", "gbps", "tflops",
               "pct_of_ceiling", "device", "torch", "triton", "commit", "date"]


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


@dataclass
class Ceilings:
    copy_gbps: float
    matmul_tflops: float


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-" + (platform.processor() or platform.machine())
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = "cpu-" + line.split(":", 1)[1]
                    break
        except OSError:
            pass
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


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


def measure_ceilings(device: torch.device) -> Ceilings:
    """The device's own limits: copy bandwidth (bytes read + written) and bf16 matmul rate."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)   # float32: 1 GiB on a GPU, 64 MiB on a CPU
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    copy_gbps = 2 * src.numel() * src.element_size() / (t.median_ms * 1e-3) / 1e9
    del src, dst
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, device)
    tflops = 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12
    return Ceilings(copy_gbps, tflops)


def load_scenarios(ops: Iterable[str] | None = None) -> dict[str, Callable]:
    """op file name -> its `cases(device, quick)` function, from benchmarks/scenarios/*.py."""
    if not SCENARIO_DIR.is_dir():
        raise FileNotFoundError(f"benchmark scenarios not found at {SCENARIO_DIR}: run the benchmark "
                                "from a source checkout (pip install -e .)")
    wanted = set(ops) if ops else None
    found: dict[str, Callable] = {}
    for path in sorted(SCENARIO_DIR.glob("*.py")):
        if path.stem.startswith("_") or (wanted is not None and path.stem not in wanted):
            continue
        spec = importlib.util.spec_from_file_location(f"lightmotion_bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[path.stem] = module.cases
    if wanted is not None and wanted - set(found):
        available = sorted(p.stem for p in SCENARIO_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ValueError(f"--ops names unknown scenario(s) {sorted(wanted - set(found))}; available: {available}")
    return found


def _git_commit() -> str:
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


def run(ops: list[str] | None = None, quick: bool = False, plot: bool = True,
        results_dir: Path = RESULTS_DIR, device: torch.device | None = None,
        printer: Callable[[str], None] = print) -> list[dict]:
    from tqdm import tqdm

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slug = device_slug(device)
    if device.type != "cuda":
        printer(f"No CUDA device: timing the CPU paths on {slug} (C++ ops where built, else the "
                "PyTorch reference). These are CPU figures, not GPU ones.")
    printer(f"Measuring the ceilings of {slug} ...")
    ceil = measure_ceilings(device)
    printer(f"  copy bandwidth {ceil.copy_gbps:,.1f} GB/s (read + write), bf16 matmul {ceil.matmul_tflops:,.2f} TFLOP/s")

    scenarios = load_scenarios(ops)
    cases: list[Case] = []
    for cases_fn in scenarios.values():
        for case in cases_fn(device, quick):
            if quick and not case.quick:
                continue
            if device.type != "cuda" and not case.cpu:
                continue
            cases.append(case)

    meta = dict(device=slug, torch=torch.__version__, triton=_triton_version(), commit=_git_commit(),
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    rows: list[dict] = []
    notes: list[str] = []
    for case in tqdm(cases, desc="scenarios", unit="case", file=sys.stderr):
        providers = case.setup()
        for name, fn in providers.items():
            if name in case.skip:
                continue
            try:
                t = time_fn(fn, device)
            except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
                notes.append(f"{case.op} {case.shape} {name}: failed ({type(exc).__name__}: {exc})")
                continue
            seconds = t.median_ms * 1e-3
            gbps = case.bytes / seconds / 1e9 if case.bytes else None
            tflops = case.flops / seconds / 1e12 if case.flops else None
            pct = (100 * gbps / ceil.copy_gbps if gbps is not None else
                   100 * tflops / ceil.matmul_tflops if tflops is not None else None)
            rows.append(dict(op=case.op, provider=name, mode=case.mode, shape=case.shape,
                             median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, gbps=gbps,
                             tflops=tflops, pct_of_ceiling=pct, dtype=case.dtype, **meta))
        if case.note:
            notes.append(f"{case.op} {case.shape}: {case.note}")
        del providers
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    printer(format_table(rows))
    for note in dict.fromkeys(notes):
        printer(f"  note: {note}")
    if rows:
        path = write_csv(rows, results_dir, slug)
        printer(f"Appended {len(rows)} rows to {path}")
        if plot:
            for p in draw_plots(rows, results_dir, slug):
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
        peers = {k: v for k, v in times.items() if k not in ("lightmotion", "reference")}
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
    lines = []
    for r in rows:
        key = (r["op"], r["shape"], r["mode"])
        lines.append([
            r["op"], r["shape"], r["mode"], r.get("dtype", ""), r["provider"], f"{r['median_ms']:.4f}",
            "" if r["gbps"] is None else f"{r['gbps']:.1f}",
            "" if r["tflops"] is None else f"{r['tflops']:.2f}",
            "" if r["pct_of_ceiling"] is None else f"{r['pct_of_ceiling']:.1f}",
            speed.get(key, "") if r["provider"] == "lightmotion" else "",
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*l) for l in lines])


def write_csv(rows: list[dict], results_dir: Path, slug: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{slug}.csv"
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                             for k in CSV_COLUMNS})
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
