"""The benchmark runner: ceilings, table, CSV with DESIGN.md's columns, plots, scenario loading."""
import csv
import os
import subprocess
import sys

import pytest
import torch

import lightmotion_fast
from lightmotion_fast.bench import runner
from lightmotion_fast.bench.scenario import Case


def test_every_scenario_file_loads_and_yields_cases():
    scenarios = runner.load_scenarios()
    assert "latent_permute" in scenarios
    for name, cases_fn in scenarios.items():
        cases = list(cases_fn(torch.device("cuda"), False))     # building cases allocates nothing
        assert cases and all(isinstance(c, Case) for c in cases), name
        assert any(c.cpu for c in cases_fn(torch.device("cpu"), False)), f"{name}: nothing to time on a CPU"


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match="unknown scenario"):
        runner.load_scenarios(["no_such_op"])


def test_quick_run_writes_table_csv_and_plot(tmp_path):
    """`python -m lightmotion_fast bench --quick` on a CPU, in its own process as a user runs it: with
    TRITON_INTERPRET=0 it times the CPU paths, and its torch.compile peers then compile with Triton's
    interpreter off, which leaves Triton's own @jit library functions (tl.randint4x, ...) unusable by
    interpreted kernels for the rest of the process: run in this one, it broke later interpreter tests."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-m", "lightmotion_fast", "bench", "--quick", "--ops", "latent_permute",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    assert "No CUDA device" in text and "copy bandwidth" in text
    assert "x ref" in text                                      # speedups are reported
    csv_path = tmp_path / f"{runner.device_slug(torch.device('cpu'))}.csv"
    with csv_path.open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == runner.CSV_COLUMNS
        rows = list(reader)
    providers = {r["provider"] for r in rows}
    assert {"lightmotion", "reference", "torch_gather", "grid_sample_nearest"} <= providers
    assert all(float(r["median_ms"]) > 0 and float(r["gbps"]) > 0 for r in rows)
    assert (tmp_path / f"{runner.device_slug(torch.device('cpu'))}-latent_permute.png").stat().st_size > 1000


def test_time_fn_reports_ordered_quantiles():
    t = runner.time_fn(lambda: torch.randn(100, 100) @ torch.randn(100, 100), torch.device("cpu"), budget_s=0.05)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms


def test_results_go_outside_the_source_tree_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("LIGHTMOTION_BENCH_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert runner.default_results_dir() == tmp_path / "cache" / "lightmotion_fast" / "bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert runner.REPO_ROOT not in runner.default_results_dir().parents
    monkeypatch.setenv("LIGHTMOTION_BENCH_DIR", str(tmp_path / "mine"))
    assert runner.default_results_dir() == tmp_path / "mine"


def test_scenarios_load_from_the_installed_package(monkeypatch, tmp_path):
    """An installed wheel ships the scenarios as lightmotion_fast.scenarios: the runner imports them from there."""
    import sys
    import types

    (tmp_path / "fake_op.py").write_text("def cases(device, quick):\n    return []\n")
    (tmp_path / "_private.py").write_text("")
    pkg = types.ModuleType(runner.SCENARIO_PACKAGE)
    pkg.__path__ = [str(tmp_path)]
    monkeypatch.setitem(sys.modules, runner.SCENARIO_PACKAGE, pkg)
    monkeypatch.delenv("LIGHTMOTION_SCENARIO_DIR", raising=False)
    found = runner.load_scenarios()
    assert list(found) == ["fake_op"]
    assert found["fake_op"].__module__ == f"{runner.SCENARIO_PACKAGE}.fake_op"
    monkeypatch.setenv("LIGHTMOTION_SCENARIO_DIR", str(runner.SCENARIO_DIR))     # the override wins
    assert "latent_permute" in runner.load_scenarios()


def test_percent_of_roofline_takes_the_binding_floor():
    ceil = runner.Ceilings(copy_gbps=1000.0, matmul_tflops=100.0)
    # 1 GB at 1000 GB/s takes 1 ms, 5e10 FLOPs at 100 TFLOP/s 0.5 ms: the bytes bind; 2 ms measured is 50 %
    assert runner.pct_of_roofline(10 ** 9, 5e10, 2.0, ceil) == pytest.approx(50.0)
    assert runner.pct_of_roofline(None, 2e11, 4.0, ceil) == pytest.approx(50.0)
    assert runner.pct_of_roofline(None, None, 1.0, ceil) is None


def test_honesty_notes_flag_impossible_percentages_and_noisy_timings():
    rows = [dict(op="a", shape="s", mode="fwd", provider="lightmotion", pct_of_ceiling=130.0, spread_pct=5.0),
            dict(op="b", shape="s", mode="fwd", provider="lightmotion", pct_of_ceiling=50.0, spread_pct=60.0),
            dict(op="c", shape="s", mode="fwd", provider="reference", pct_of_ceiling=None, spread_pct=1.0)]
    notes = runner.honesty_notes(rows)
    assert any("a s fwd lightmotion: 130 %" in n and "above 100 %" in n for n in notes)
    assert any("1 of 3 timings spread" in n and "b/lightmotion" in n for n in notes)
    assert len(notes) == 2


def test_sdpa_backend_is_read_from_the_profiler():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 16, 8)
    assert runner.sdpa_backends(lambda: F.scaled_dot_product_attention(q, q, q)) != ""

    def math_only():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, q, q)

    assert runner.sdpa_backends(math_only) == "math"
    assert runner.sdpa_backends(lambda: q @ q.transpose(-1, -2)) == ""
    assert runner.backends_from_names(["aten::_scaled_dot_product_flash_attention",
                                       "void pytorch_flash::flash_fwd_kernel<...>"]) == "flash"
    assert runner.backends_from_names(["aten::_scaled_dot_product_cudnn_attention",
                                       "aten::_efficient_attention_forward",
                                       "aten::_scaled_dot_product_efficient_attention"]) == "cudnn+efficient"


def test_csv_with_older_columns_is_rewritten(tmp_path):
    old = tmp_path / "dev.csv"
    old.write_text("op,provider,mode,shape,median_ms\nx,lightmotion,fwd,s,1.5\n")
    row = dict(op="y", provider="reference", mode="fwd", shape="t", median_ms=2.0, p20_ms=1.0, p80_ms=3.0,
               gbps=None, tflops=None, pct_of_ceiling=None, device="d", torch="t", triton="tr", commit="c",
               date="now", dtype="float32", spread_pct=100.0, sdpa_backend="math")
    runner.write_csv([row], tmp_path, "dev")
    with old.open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == runner.CSV_COLUMNS
        written = list(reader)
    assert [(r["op"], r["median_ms"]) for r in written] == [("x", "1.5"), ("y", "2")]
    assert written[1]["sdpa_backend"] == "math" and written[0]["sdpa_backend"] == ""


def test_device_name_is_exact_on_a_cpu():
    name = runner.device_name(torch.device("cpu"))
    assert runner._cpu_model() in name and "logical CPUs" in name


def test_ceilings_stream_from_memory_and_the_deadline_leaves_cases_out(monkeypatch):
    monkeypatch.setattr(runner, "last_level_cache_bytes", lambda device: 16 << 20)
    monkeypatch.setattr(runner, "time_fn", lambda fn, device, budget_s=0.4: runner.Timing(1.0, 0.9, 1.1))
    ceil = runner.measure_ceilings(torch.device("cpu"))
    assert ceil.buffer_mb >= 8 * 16 and ceil.cache_mb == 16 and ceil.launch_ms is None
    report = runner.bench(ops=["latent_permute"], quick=True, device=torch.device("cpu"), printer=lambda s: None,
                          deadline=0.0)
    assert report.rows == [] and report.skipped and any("not timed" in n for n in report.notes)


def test_ablations_are_shown_but_never_the_best_peer():
    """"lightmotion/..." providers time ours with one design choice switched off: they are rows of the
    table, never the peer a speedup is quoted against (runner and GPU report alike)."""
    from lightmotion_fast.bench import gpu
    from lightmotion_fast.bench.scenario import is_peer

    assert is_peer("sdpa_concat") and not is_peer("lightmotion") and not is_peer("reference")
    assert not is_peer("lightmotion/no_pv_lag")
    rows = [dict(op="reference_attention", shape="s", mode="fwd", dtype="float16", provider=p, median_ms=ms)
            for p, ms in (("lightmotion", 2.0), ("lightmotion/no_pv_lag", 1.0), ("sdpa_concat", 3.0))]
    assert runner._speedups(rows)[("reference_attention", "s", "fwd")] == "1.50x sdpa_concat"
    table = "\n".join(gpu.op_tables(rows, []))
    assert "lightmotion/no_pv_lag ms" in table and "1.50x (sdpa_concat)" in table


def test_ablated_provider_switches_the_choice_for_its_call_only():
    """The attention scenarios' ablation wrapper: the kernels' choice function answers the ablated value
    inside the call and is restored after it (also when the call raises)."""
    from lightmotion_fast.ops import _common

    kernels = _common.kernel_module("dual_cross_attention")
    ablated = runner.load_scenarios(["dual_cross_attention"])["dual_cross_attention"].__globals__["ablated"]
    original = kernels._reference_lag_pv
    assert ablated(lambda: kernels._reference_lag_pv(64), "_reference_lag_pv", False)() is False
    assert kernels._reference_lag_pv is original and original(64) is True

    def boom():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        ablated(boom, "_dkdv_wgmma_80", False)()
    assert kernels._dkdv_wgmma_80(80, torch.float16) is True


def test_multi_lora_no_tma_ablation_runs_the_cp_async_expand(monkeypatch):
    """On an sm_90 device the multi-LoRA case (k = 3, norm none) carries "lightmotion/no_tma": the same
    call with the forward's expand on the cp.async kernel instead of the TMA one."""
    from lm_testing import record_launches
    from lightmotion_fast.ops import _common

    kernels = _common.kernel_module("multi_lora")
    monkeypatch.setattr(_common, "device_capability", lambda device: (9, 0))
    launches = record_launches(monkeypatch, kernels, "_multi_lora_expand_tma_kernel", "_multi_lora_expand_kernel")
    case = runner.load_scenarios(["multi_lora"])["multi_lora"].__globals__["_case"](
        "tiny", 24, 32, [16] * 3, torch.device("cpu"), torch.float16, "fwd")
    with lightmotion_fast.backend("triton"):
        providers = case.setup()
        assert "lightmotion/no_tma" in providers
        providers["lightmotion"]()
        providers["lightmotion/no_tma"]()
    assert [name for name, _, _ in launches] == ["_multi_lora_expand_tma_kernel", "_multi_lora_expand_kernel"]
    assert kernels._tma_expand.__name__ == "_tma_expand"   # restored after the ablated call
