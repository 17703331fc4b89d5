"""`./dev.sh gpu` without a GPU: the dry run's plan, report.md from fake rows (targets met/missed),
the sanitizer and JUnit readers, the wheel-requirement walk, and the smoke script through the
Triton interpreter (the script compute-sanitizer runs on a GPU)."""
import csv
import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from lightmotion_fast.bench import gpu, smoke, targets

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run_output():
    proc = subprocess.run(["bash", str(REPO / "dev.sh"), "gpu", "--dry-run", "--out", "/nonexistent/gpu_report"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dry_run_names_every_phase_with_its_budget(dry_run_output):
    budgets = dict(re.findall(r"== phase (\w+) \(budget (\d+) s\)", dry_run_output))
    assert list(budgets) == [name for name, _, _ in gpu.PHASES]
    assert sum(int(b) for b in budgets.values()) <= 570          # the device tool's limit is 600 s a command
    assert not Path("/nonexistent/gpu_report").exists()          # a dry run writes nothing


def test_dry_run_shows_the_exact_commands(dry_run_output):
    out = dry_run_output
    assert "pip install -q --no-index --no-deps --no-build-isolation" in out and "--target" in out
    assert "LIGHTMOTION_NO_EXT=1" in out                           # the fallback without the extension
    assert "-m pytest" in out and "--junitxml=/nonexistent/gpu_report/junit.xml" in out
    assert "--tool memcheck" in out and "--tool racecheck" in out and "lightmotion_fast.bench.smoke" in out
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in out
    assert "--bench-worker" in out and "--quick" not in out.split("phase bench")[1].split("phase report")[0]
    assert "PYTHONSAFEPATH=1" in out and "PYTHONUNBUFFERED=1" in out


def test_wheels_never_replace_torch_or_triton(tmp_path, monkeypatch):
    wheel_dir = tmp_path / ".whl"
    wheel_dir.mkdir()
    for name in ("torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl", "triton-3.9.0-cp312-cp312-x.whl",
                 "nvidia_cudnn_cu13-9.0-py3-none-any.whl", "diffusers-0.42.1-py3-none-any.whl"):
        (wheel_dir / name).write_bytes(b"")
    monkeypatch.setattr(gpu, "REPO", tmp_path)
    ctx = gpu.Context(out=tmp_path / "out", python="python3", quick=False, only=set(), bench_ops=None,
                      dry_run=True, deadline=0)
    (step,) = gpu.plan_wheels(ctx)
    installed = [Path(a).name for a in step.argv if a.endswith(".whl")]
    assert installed == ["diffusers-0.42.1-py3-none-any.whl"]
    assert {"--no-index", "--no-deps", "--target"} <= set(step.argv)


def _rows():
    """Fake benchmark rows: dual attention 1.6x faster forward (target 1.5x: met), 1.1x fwd+bwd (1.2x:
    missed), latent_permute at 90 % of the copy ceiling (85 %: met), snr_reinject at 80 % (90 %: missed)."""
    def row(op, provider, mode, shape, ms, pct=None, dtype="float16", sdpa=""):
        return dict(op=op, provider=provider, mode=mode, shape=shape, median_ms=ms, p20_ms=ms, p80_ms=ms,
                    gbps=None, tflops=None, pct_of_ceiling=pct, dtype=dtype, spread_pct=1.0, sdpa_backend=sdpa)

    dual = "SD1.5/AnimateDiff 64x64 b=32 n=4096 8x40 keys=77+4"
    return [
        row("dual_cross_attention", "lightmotion", "fwd", dual, 1.0, 40.0),
        row("dual_cross_attention", "reference", "fwd", dual, 5.0),
        row("dual_cross_attention", "ip_adapter_sdpa", "fwd", dual, 1.6, sdpa="flash"),
        row("dual_cross_attention", "lightmotion", "fwd+bwd", dual, 2.0),
        row("dual_cross_attention", "ip_adapter_sdpa", "fwd+bwd", dual, 2.2, sdpa="efficient"),
        row("latent_permute", "lightmotion", "fwd", "bandwidth 8x16x32x128x128", 0.2, 90.0, "float32"),
        row("latent_permute", "torch_gather", "fwd", "bandwidth 8x16x32x128x128", 0.5, None, "float32"),
        row("snr_reinject", "lightmotion", "fwd", "bandwidth 8x16x32x128x128", 0.3, 80.0, "float32"),
    ]


def test_targets_are_judged_met_missed_or_not_measured():
    by = {}
    for v in targets.evaluate(_rows(), launch_ms=0.004):
        by.setdefault((v.target.op, v.target.mode, v.target.kind, v.target.other), []).append(v)
    (fwd,) = [v for v in by[("dual_cross_attention", "fwd", "speedup", "ip_adapter_sdpa")] if v.shape]
    assert fwd.status == "met" and fwd.achieved == pytest.approx(1.6)
    (bwd,) = [v for v in by[("dual_cross_attention", "fwd+bwd", "speedup", "ip_adapter_sdpa")] if v.shape]
    assert bwd.status == "missed" and bwd.achieved == pytest.approx(1.1)
    assert [v.status for v in by[("latent_permute", "fwd", "ceiling", "")]] == ["met"]
    assert [v.status for v in by[("snr_reinject", "fwd", "ceiling", "")]] == ["missed"]
    assert all(v.status == "not measured" for v in by[("reference_attention", "fwd", "speedup", "sdpa_concat")])


def test_launch_and_at_most_targets():
    rows = [dict(op="o", provider="lightmotion", mode="fwd", shape="AnimateDiff 1", median_ms=0.009, dtype=""),
            dict(op="o", provider="unpatched", mode="fwd", shape="AnimateDiff 1", median_ms=0.008, dtype="")]
    launch = targets.Target("o", "fwd", "AnimateDiff", "launch", 2)
    at_most = targets.Target("o", "fwd", "AnimateDiff", "at_most", 1.2, "unpatched")
    (v1,) = targets.evaluate(rows, launch_ms=0.004, targets=[launch])
    (v2,) = targets.evaluate(rows, launch_ms=0.005, targets=[launch])
    (v3,) = targets.evaluate(rows, targets=[at_most])
    (v4,) = targets.evaluate(rows, launch_ms=None, targets=[launch])
    assert (v1.status, v2.status, v3.status, v4.status) == ("missed", "met", "met", "not measured")


def test_every_target_names_a_known_op_and_kind():
    known_ops = {"latent_permute", "latent_resample", "snr_reinject", "plucker_embedding", "dual_cross_attention",
                 "reference_attention", "trajectory_attention", "trajectory_attention_core",
                 "trajectory_attention_unet", "multi_lora_linear"}
    for t in targets.TARGETS:
        assert t.op in known_ops and t.kind in {"speedup", "at_most", "ceiling", "launch"} and t.source
        assert (t.kind in {"speedup", "at_most"}) == bool(t.other)
        re.compile(t.shape)


def test_report_md_from_rows(tmp_path):
    bench = dict(rows=_rows(), ceilings=dict(copy_gbps=3000.0, matmul_tflops=790.0, launch_ms=0.004,
                                             buffer_mb=1024, cache_mb=50),
                 device="NVIDIA H100 80GB HBM3", notes=["a note"], skipped=["x y fwd"])
    phases = [gpu.Phase("tests", 140, "", dict(status="failed", seconds=100, junit=dict(
        tests=10, failures=1, errors=0, skipped=1, passed=8, failed=["tests/test_a.py::test_b"])))]
    report = gpu.build_report(bench, phases, dict(device="NVIDIA H100 80GB HBM3", commit="abc", date="d",
                                                  torch="2.11", triton="3.6", python="3.12", seconds=500, budget=560))
    assert "# GPU evidence: NVIDIA H100 80GB HBM3" in report
    assert "8 passed, 1 failed, 0 errors, 1 skipped of 10" in report and "tests/test_a.py::test_b" in report
    assert "copy 3,000 GB/s" in report and "790.0 TFLOP/s" in report
    assert "### dual_cross_attention" in report and "### latent_permute" in report
    dual = next(line for line in report.splitlines() if line.startswith("| SD1.5/AnimateDiff 64x64") and "| fwd |" in line)
    cells = [c.strip() for c in dual.split("|")]
    assert "1.0000" in cells and "1.6000" in cells and "5.0000" in cells       # ours, the peer, the reference
    assert "1.60x (ip_adapter_sdpa)" in cells and "40.0" in cells            # ratio to the best peer, % ceiling
    assert "ip_adapter_sdpa: flash" in dual and "**met**" in dual
    bwd = next(line for line in report.splitlines() if line.startswith("| SD1.5/AnimateDiff 64x64") and "fwd+bwd" in line)
    assert "**missed**" in bwd and "ip_adapter_sdpa: efficient" in bwd
    assert re.search(r"\d+ met, \d+ missed, \d+ not measured", report)
    assert "a note" in report and "x y fwd" in report


def test_sanitizer_verdicts():
    assert gpu.sanitizer_verdict(0, "========= ERROR SUMMARY: 0 errors") == "clean"
    assert gpu.sanitizer_verdict(99, "========= Invalid __global__ read\n========= ERROR SUMMARY: 3 errors") == "errors found"
    assert gpu.sanitizer_verdict(1, "========= Error: Device not supported\n") == "refused"
    assert gpu.sanitizer_verdict(1, "smoke: 1 failure(s)\n========= ERROR SUMMARY: 0 errors") == "smoke failed"
    assert gpu.sanitizer_verdict(None, "") == "timeout"


def test_junit_summary(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite name="s" tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_x" name="test_a"/>'
                   '<testcase classname="tests.test_x" name="test_b"><failure message="m"/></testcase>'
                   '<testcase classname="tests.test_x" name="test_c"><skipped/></testcase></testsuite></testsuites>')
    s = gpu.junit_summary(xml)
    assert (s["tests"], s["passed"], s["failures"], s["skipped"]) == (3, 1, 1, 1)
    assert s["failed"] == ["tests.test_x::test_b"]
    assert gpu.junit_summary(tmp_path / "missing.xml") == {}


def test_wheel_requirements_skip_extras_and_foreign_markers(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo-1.0.dist-info/METADATA", "\n".join([
            "Name: demo", "Requires-Dist: filelock", "Requires-Dist: importlib_metadata>=4",
            'Requires-Dist: pytest ; extra == "test"', 'Requires-Dist: old-thing ; python_version < "3.8"']))
    reqs = gpu.wheel_requirements(wheel)
    assert "filelock" in reqs and "importlib_metadata" in reqs and "pytest" not in reqs
    pytest.importorskip("packaging")    # markers are evaluated only where `packaging` is importable
    assert "old-thing" not in reqs


def test_gpu_machines_lack_what_the_wheels_bring():
    assert "diffusers" in gpu.WHEELS_NEEDED and "diffusers" not in gpu.GPU_HAS
    assert {"torch", "triton", "peft", "einops", "transformers", "pytest-benchmark"} <= gpu.GPU_HAS


def test_smoke_launches_every_kernel_through_the_interpreter(capsys):
    """The sanitizer's smoke script, on the CPU: every op at odd shapes matches its reference and every
    `*_kernel` of lightmotion_fast.kernels was launched."""
    assert smoke.main([]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "smoke: OK" in out
    expected = smoke.library_kernels() - smoke.device_gated(torch.device("cpu"), [torch.float32])
    assert expected <= smoke.launched and len(smoke.launched) >= 14


def test_smoke_flags_a_wrong_result(monkeypatch, capsys):
    """A kernel that writes wrong values is caught (the comparison can fail)."""
    import lightmotion_fast as lm

    real = lm.plucker_embedding

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        return out + 1 if lm.ops._common._forced().value == "triton" else out

    monkeypatch.setattr(lm, "plucker_embedding", broken)
    assert smoke.main(["--ops", "plucker"]) == 1
    assert "FAIL plucker" in capsys.readouterr().out


def test_bench_json_round_trip(tmp_path):
    """What the bench worker writes (BenchReport.to_json) is what build_report reads."""
    from lightmotion_fast.bench import runner

    rep = runner.BenchReport(_rows(), runner.Ceilings(100.0, 1.0), "cpu X", "cpu-x", ["n"], [])
    data = json.loads(rep.to_json())
    assert data["ceilings"]["copy_gbps"] == 100.0 and len(data["rows"]) == len(_rows())
    assert "### snr_reinject" in gpu.build_report(data, [], {})


def test_out_folder_is_emptied_only_when_it_is_an_earlier_report(tmp_path):
    assert gpu.is_report_folder(tmp_path)                              # empty
    (tmp_path / "notes.txt").write_text("mine")
    assert not gpu.is_report_folder(tmp_path)                          # someone's folder
    (tmp_path / "console.log").write_text("")
    assert gpu.is_report_folder(tmp_path)                              # an earlier run's
    assert not gpu.is_report_folder(gpu.REPO) and not gpu.is_report_folder(gpu.REPO.parent)
    proc = subprocess.run(["bash", str(REPO / "dev.sh"), "gpu", "--out", str(REPO / "tests")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not an earlier report folder" in proc.stderr
    assert (REPO / "tests" / "conftest.py").exists()


def test_bench_worker_writes_json_csv_plots_and_the_report_reads_them(tmp_path, monkeypatch):
    """The bench phase's worker on the CPU (ceilings stubbed to keep it short): bench.json, the CSV with
    the results schema, one plot per op, and a report.md built from them."""
    from lightmotion_fast.bench import runner

    monkeypatch.setenv("TRITON_INTERPRET", "0")     # time the CPU paths, as `bench` does on a CPU
    monkeypatch.setattr(runner, "measure_ceilings", lambda device: runner.Ceilings(10.0, 0.5, None, 64, 8))
    assert gpu.bench_worker(tmp_path, seconds=120, quick=True, ops=["plucker"]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {r["provider"] for r in data["rows"]} == {"lightmotion", "reference", "cameractrl_ray_condition"}
    csv_path = tmp_path / f"{data['slug']}.csv"
    assert csv_path.read_text().splitlines()[0] == ",".join(runner.CSV_COLUMNS)
    assert (tmp_path / "plots" / f"{data['slug']}-plucker_embedding.png").stat().st_size > 1000
    report = gpu.build_report(data, [], dict(device=data["device"]))
    assert "### plucker_embedding" in report and "cameractrl_ray_condition ms" in report
    # the kernels as compiled on the machine: none on a CPU (interpreted), but the table is written
    assert (tmp_path / gpu.LOADED_CSV).read_text().splitlines() == [
        "kernel,constexprs,num_warps,num_stages,registers,local_bytes,shared,blocks_per_sm,warps_per_sm"]


def _fake_jit(loaded_regs: int):
    """A JITFunction stand-in with one loaded and one never-loaded compiled kernel in its cache."""
    from types import SimpleNamespace as NS

    params = [NS(num=0, name="x_ptr", is_constexpr=False), NS(num=1, name="n", is_constexpr=False),
              NS(num=2, name="BLOCK", is_constexpr=True), NS(num=3, name="MASKED", is_constexpr=True)]
    # n_spills as Triton's driver counts it: local-memory bytes / 4
    loaded = NS(module=object(), n_regs=loaded_regs, n_spills=4, src=NS(constexprs={(1,): 1, (2,): 64, (3,): True}),
                metadata=NS(shared=49152, num_warps=8, num_stages=3))
    never_run = NS(module=None, src=NS(constexprs={(2,): 128}), metadata=NS(shared=0, num_warps=4, num_stages=2))
    return NS(params=params, device_caches={0: ({"a": loaded, "b": never_run}, {}, None, None, None)})


def test_loaded_kernels_reads_the_jit_caches(tmp_path):
    """The bench worker's table of kernels as compiled on the GPU: only kernels the driver loaded, their
    declared constexprs (not Triton's ==1 integer specialisation), the driver's registers and local bytes,
    and occupancy: 168 registers × 256 threads = 43,008 of 65,536 leaves one block per SM."""
    from lightmotion_fast.bench import static

    rows = static.loaded_kernels({"_toy_kernel": _fake_jit(168)})
    assert rows == [dict(kernel="_toy_kernel", constexprs="BLOCK=64,MASKED=True", num_warps=8, num_stages=3,
                         registers=168, local_bytes=16, shared=49152, blocks_per_sm=1, warps_per_sm=8)]
    static.write_loaded_kernels(rows, tmp_path / gpu.LOADED_CSV)
    text = "\n".join(gpu.loaded_section(list(csv.DictReader((tmp_path / gpu.LOADED_CSV).open()))))
    assert "1 kernels compiled and loaded" in text and "1 use local memory, 1 fit one block per SM" in text
    assert text.count("| _toy_kernel | BLOCK=64,MASKED=True | 8 | 3 | 168 | 16 | 49152 | 1 |") == 2
    assert "blocks/SM" in gpu.build_report(None, [], {}, static.loaded_kernels({"_toy_kernel": _fake_jit(96)}))
    assert "## Kernels as compiled here" not in gpu.build_report(None, [], {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: kernels compiled and loaded by the driver")
def test_loaded_kernels_after_a_launch_on_the_gpu():
    """On the GPU machine: after one op call, the table holds its kernel with the driver's figures."""
    import lightmotion_fast
    from lightmotion_fast.bench import static

    from lightmotion_fast.reference.snr_reinject import StepCoefficients

    x = torch.randn(1, 3, 5, 7, 9, device="cuda", dtype=torch.float16)
    with lightmotion_fast.backend("triton"):
        lightmotion_fast.snr_reinject(x, x, StepCoefficients(0.9, 0.1, 0.3, 1.0, 0.0), seed=3)
    torch.cuda.synchronize()
    rows = [r for r in static.loaded_kernels() if r["kernel"] == "_snr_reinject_kernel"]
    assert rows and all(r["registers"] > 0 and r["blocks_per_sm"] >= 1 for r in rows), rows


def test_ablation_section_says_what_each_choice_buys():
    """report.md's Ablations: per "lightmotion/<choice>" row, without / with per case and the geometric
    mean per choice with its verdict; rows without our time or without a median are left out."""
    def row(provider, ms, shape="8x80", mode="fwd+bwd"):
        return dict(op="reference_attention", shape=shape, mode=mode, dtype="fp16", provider=provider, median_ms=ms)
    rows = [row("lightmotion", 1.0), row("lightmotion/no_pv_lag", 1.21), row("sdpa_concat", 1.5),
            row("lightmotion", 2.0, "8x40"), row("lightmotion/no_pv_lag", 2.0 * 1.1, "8x40"),
            row("lightmotion", 1.0, "8x160"), row("lightmotion/dkdv_32_keys", 0.5, "8x160"),
            row("lightmotion/dkdv_32_keys", 3.0, "no ours here"), row("lightmotion/dq_launch_per_set", None)]
    text = "\n".join(gpu.ablation_section(rows))
    assert "| lightmotion/no_pv_lag | reference_attention | 8x80 | fwd+bwd | fp16 | 1.0000 | 1.2100 | 1.21x |" in text
    assert "`lightmotion/no_pv_lag`: geometric mean 1.15x over 2 case(s), range 1.10-1.21x: the choice pays" in text
    assert "`lightmotion/dkdv_32_keys`: geometric mean 0.50x over 1 case(s), range 0.50-0.50x: the choice costs" in text
    assert "no ours here" not in text and "dq_launch_per_set" not in text and "sdpa_concat" not in text
    assert gpu.ablation_section([row("lightmotion", 1.0), row("sdpa_concat", 1.5)]) == []
    assert "## Ablations" in gpu.build_report(dict(rows=rows), [], {})
