"""What a benchmark scenario file (benchmarks/scenarios/<op>.py) provides to the runner.

A scenario file defines `cases(device: torch.device, quick: bool) -> Iterable[Case]`. The runner
calls each case's `setup()` only when it is about to time it (so inputs for one shape at a time live
in memory), then times every provider it returns.

Provider names: "lightmotion" is ours, "reference" is the library's PyTorch reference, a name starting
with "lightmotion/" is ours in another configuration: an ablation (one design choice switched off, e.g.
"lightmotion/no_pv_lag") or another mode ("lightmotion/atomic"), timed and shown, never counted as a
peer; any other name is a peer (e.g. "peft_loop", "sdpa_concat", "grid_sample_nearest").
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Provider = Callable[[], object]


@dataclass
class Case:
    op: str                                  # op name, e.g. "latent_permute"
    shape: str                               # label shown in the table, e.g. "AnimateDiff 2x4x16x64x64"
    setup: Callable[[], dict[str, Provider]]  # builds inputs; returns provider name -> zero-arg callable
    mode: str = "fwd"                        # "fwd" or "fwd+bwd"
    dtype: str = "fp32"
    bytes: int | None = None                 # least bytes the op must move (GB/s, % of copy bandwidth)
    flops: float | None = None               # useful FLOPs (TFLOP/s, % of the matmul rate)
    quick: bool = True                       # part of `bench --quick`
    cpu: bool = True                         # worth timing on a CPU
    note: str = ""                           # shown under the table (e.g. what a peer cannot do)
    skip: set[str] = field(default_factory=set)  # providers to leave out on this device


ABLATION_PREFIX = "lightmotion/"


def sibling(path: str, name: str):
    """The scenario file `name`.py in the folder of `path` (a scenario's __file__), loaded as the runner
    loads scenarios: by path, not as a package."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"lightmotion_bench_{name}", Path(path).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_peer(provider: str) -> bool:
    """A provider that is neither ours, nor the reference, nor an ablation of ours."""
    return provider not in ("lightmotion", "reference") and not provider.startswith(ABLATION_PREFIX)
