"""The benchmark runner: ceilings, table, CSV with DESIGN.md's columns, plots, scenario loading."""
import csv

import pytest
import torch

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


def test_quick_run_writes_table_csv_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")     # time the CPU paths, as `bench` does on a CPU
    printed = []
    rows = runner.run(ops=["latent_permute"], quick=True, results_dir=tmp_path, device=torch.device("cpu"),
                      printer=printed.append)
    text = "\n".join(printed)
    assert "No CUDA device" in text and "copy bandwidth" in text
    providers = {r["provider"] for r in rows}
    assert {"lightmotion", "reference", "torch_gather", "grid_sample_nearest"} <= providers
    assert all(r["median_ms"] > 0 and r["gbps"] > 0 for r in rows)
    assert "x ref" in text                                      # speedups are reported
    csv_path = tmp_path / f"{runner.device_slug(torch.device('cpu'))}.csv"
    with csv_path.open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == runner.CSV_COLUMNS
        written = list(reader)
    assert len(written) == len(rows)
    assert (tmp_path / f"{runner.device_slug(torch.device('cpu'))}-latent_permute.png").stat().st_size > 1000


def test_time_fn_reports_ordered_quantiles():
    t = runner.time_fn(lambda: torch.randn(100, 100) @ torch.randn(100, 100), torch.device("cpu"), budget_s=0.05)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms
