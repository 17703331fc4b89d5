"""Constants and helpers shared by the tests: `from lm_testing import DEVICE, TOLERANCES, poison_empty`.

(Not in conftest.py: with benchmarks/conftest.py also on the path, `from conftest import ...` is ambiguous.)
"""
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# (dtype, atol, rtol) for outputs that go through arithmetic; gathers compare exactly.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def flatten_tensors(x) -> list:
    """The tensors of a (nested) op output, in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in flatten_tensors(item)]
    return []


def poison_empty(monkeypatch):
    """For the rest of the test, torch.empty / empty_like / Tensor.new_empty return buffers filled with
    NaN (floating point) or the largest value (integer, bool True), so an output element that a kernel
    never writes fails the comparison instead of passing as a lucky zero."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point() or t.is_complex():
            return t.fill_(float("nan"))
        if t.dtype == torch.bool:
            return t.fill_(True)
        return t.fill_(torch.iinfo(t.dtype).max)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(real_new_empty(self, *a, **k)))


def record_launches(monkeypatch, module, *names) -> list:
    """For the rest of the test, each launch `module.<name>[grid](...)` of the named Triton kernels
    still runs and appends (name, its positional arguments, its keyword arguments) to the returned
    list."""
    launches = []

    class Recording:
        def __init__(self, name):
            self.name, self.real = name, getattr(module, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, args, kwargs))
                return self.real[grid](*args, **kwargs)
            return launch

    for name in names:
        monkeypatch.setattr(module, name, Recording(name))
    return launches


class TensorOutputs:
    """Context manager: every tensor an ATen op returns inside it, as (op name, shape, dtype) in `seen`
    (Triton launches are not ATen ops: only what torch allocates or computes shows)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in (out if isinstance(out, (tuple, list)) else [out]):
                    if isinstance(t, torch.Tensor):
                        outer.seen.append((str(func.overloadpacket.__name__), tuple(t.shape), t.dtype))
                return out

        self.seen = []
        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def of(self, shape, dtype=None) -> list:
        """The recorded outputs of this shape (and dtype)."""
        return [s for s in self.seen if s[1] == tuple(shape) and (dtype is None or s[2] == dtype)]


def run_compile_check(tmp, pythonpath: str = "", timeout: float = 1800, jobs: int | None = None) -> dict:
    """Run tests/gpu_compile_check.py (default subset, with ptxas -v statistics) with Triton out of
    interpreter mode and a fresh TRITON_CACHE_DIR under `tmp` (compile for real, not from an earlier
    run's cache); `pythonpath` goes first on PYTHONPATH (another Triton). The launches are split over
    `jobs` subprocesses run side by side (`--shard`; default: one per core, at most 2, or
    LIGHTMOTION_COMPILE_JOBS), whose reports are merged. Returns the JSON report plus "returncode"
    and "log"."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pytest

    script = Path(__file__).with_name("gpu_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath] + [p for p in [env.get("PYTHONPATH", "")] if p])
    env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if jobs is None:
        jobs = int(os.environ.get("LIGHTMOTION_COMPILE_JOBS", min(2, os.cpu_count() or 1)))
    outs = [Path(tmp) / f"report-{i}.json" for i in range(jobs)]
    procs = [subprocess.Popen([sys.executable, str(script), "--stats", "--json", str(out), "--shard", f"{i}/{jobs}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, out in enumerate(outs)]
    logs, deadline = [], time.monotonic() + timeout
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for proc in procs:
            proc.kill()
    reports = []
    for proc, out, (stdout, stderr) in zip(procs, outs, logs):
        if not out.exists():
            pytest.fail(f"gpu_compile_check.py wrote no report (exit {proc.returncode}):\n"
                        f"{stdout[-6000:]}\n{stderr[-6000:]}")
        reports.append(json.loads(out.read_text()))
    data = reports[0]
    assert all(r["selection"] == data["selection"] for r in reports), "the shards captured different launches"
    data["results"] = [res for r in reports for res in r["results"]]
    data["returncode"] = max(proc.returncode for proc in procs)
    data["log"] = "\n".join(stdout[-20000 // jobs:] for stdout, _ in logs)
    return data


def spilling_launches(report: dict) -> str:
    """The launches of a compile-check report that ptxas spilled to local memory, one line each ("" if none)."""
    return "\n".join(
        f"{r['kernel']} ({r['op']}, {r['dtype']}, warps={r['num_warps']}, stages={r['num_stages']}): "
        f"{r['registers']} registers, {r['spill_stores']} B spill stores; {r['constexprs']}"
        for r in report["results"] if r.get("spill_stores") or r.get("spill_loads"))


def random_official_weights(unet, seed: int = 1, scale: float = 0.2) -> list:
    """Random trajectory-branch weights of an SVD UNet in the official list format: per temporal attn1,
    to_q, to_k, to_v, to_out.0 weights [c, c] and to_out.0 bias [c], normal times `scale`."""
    from lightmotion_fast.integrations.diffusers.trajectory import temporal_attentions

    g = torch.Generator().manual_seed(seed)
    weights = []
    for _, attn in temporal_attentions(unet):
        c = attn.to_q.in_features
        weights += [torch.randn(c, c, generator=g) * scale for _ in range(4)] + [torch.randn(c, generator=g) * scale]
    return weights
