"""Microbenchmarks of the trajectory branch at small sizes: `pytest benchmarks/ --benchmark-enable`.
On a CPU the "triton" rows run through the interpreter (correctness smoke runs, not speed)."""
import pytest
import torch

import lightmotion_fast as lm
from benchmarks.scenarios.trajectory_attention import (
    lightmotion_branch,
    lightmotion_core,
    moving_points,
    official_core,
    project,
    reference_branch,
    reference_core,
    sdpa_index_add_branch,
    sdpa_index_add_core,
)
from lightmotion_fast.camera.trajectories import TrajectoryTables
from lightmotion_fast.reference.trajectory_attention import official_trajectory_branch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(batch=2, size=(6, 8), frames=5, channels=64, heads=2):
    g = torch.Generator().manual_seed(0)
    n_pix = size[0] * size[1]
    coords, valid = moving_points(frames, 3 * n_pix, (size[0] * 8, size[1] * 8), g)
    tables = TrajectoryTables(coords, valid, (size[0] * 8, size[1] * 8), size, levels=1, seed=0)
    x = torch.randn(batch * n_pix, frames, channels, generator=g).to(DEVICE)
    weights = [(torch.randn(channels, channels, generator=g) / channels ** 0.5).to(DEVICE) for _ in range(4)]
    weights.append(torch.randn(channels, generator=g).to(DEVICE))
    return x, tables, tables.level(n_pix, DEVICE), weights, batch, heads


@pytest.mark.parametrize("impl", ["triton", "triton_atomic", "reference", "sdpa_index_add", "official"])
def test_trajectory_branch_small(benchmark, impl):
    x, tables, level, weights, batch, heads = _inputs()
    if impl.startswith("triton"):
        with lm.backend("triton"):
            out = benchmark(lightmotion_branch, x, level, weights, batch, heads, impl == "triton")
    elif impl == "reference":
        out = benchmark(reference_branch, x, level, weights, batch, heads)
    elif impl == "sdpa_index_add":
        out = benchmark(sdpa_index_add_branch, x, level, weights, batch, heads)
    else:  # the official computation, on the same trajectory selection so the result can be checked
        out = benchmark(official_trajectory_branch, x, tables.coords.to(DEVICE), tables.valid.to(DEVICE),
                        tables.frame_size, level.size, batch, *weights, heads, selection=level.selection)
    want = reference_branch(x.double(), level, [w.double() for w in weights], batch, heads)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "triton_atomic", "reference", "sdpa_index_add", "official"])
def test_trajectory_core_small(benchmark, impl):
    """The attention core alone (q, k, v given), every peer against the float64 reference."""
    x, tables, level, weights, batch, heads = _inputs()
    q, k, v = project(x, weights, batch, heads)
    if impl.startswith("triton"):
        with lm.backend("triton"):
            out = benchmark(lightmotion_core, q, k, v, level, impl == "triton")
    elif impl == "reference":
        out = benchmark(reference_core, q, k, v, level)
    elif impl == "sdpa_index_add":
        out = benchmark(sdpa_index_add_core, q, k, v, level)
    else:  # per-call subsampling from the generator the tables used (seed 0): the same selection
        out = benchmark(lambda: official_core(q, k, v, tables.coords.to(DEVICE), tables.valid.to(DEVICE),
                                              tables.frame_size, level.size, torch.Generator().manual_seed(0)))
    want = reference_core(q.double(), k.double(), v.double(), level)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
