"""Every speed target the project has set, in one table, and how a benchmark run is judged against it.

Sources: the specs (../shared/specs/*.md: the floors), the sm_90 review's summary table
(../shared/reviews/sm90-review.md), and issues 9-11 (attention, multi-LoRA and streaming kernels at
the hardware's limit). A target names the op, the mode and a regular expression over the benchmark
row's `shape` label, so it follows the scenario files without being written into them.

Kinds of target ("ours" is the provider "lightmotion"):
  speedup     other's time / ours >= value      (other: a peer or "reference")
  at_most     ours / other's time <= value      (e.g. a patched UNet step vs the unpatched one)
  ceiling     ours' % of the measured ceiling >= value (copy bandwidth or bf16 matmul: the row's
              bytes or FLOPs decide which; "<= 1.15x the floor" is a ceiling target of 100 / 1.15 %)
  launch      ours <= value x an empty kernel's launch time (the runner's launch ceiling)

A target with no matching rows is reported as "not measured", never as met.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

OURS = "lightmotion"


@dataclass(frozen=True)
class Target:
    op: str
    mode: str
    shape: str          # regular expression searched in the row's shape label
    kind: str           # "speedup" | "at_most" | "ceiling" | "launch"
    value: float
    other: str = ""     # the provider compared with (speedup / at_most)
    source: str = ""
    dtype: str = ""     # "" = any

    def describe(self) -> str:
        if self.kind == "speedup":
            return f">= {self.value:g}x {self.other}"
        if self.kind == "at_most":
            return f"<= {self.value:g}x {self.other}"
        if self.kind == "ceiling":
            return f">= {self.value:g} % of ceiling"
        return f"<= {self.value:g}x empty launch"


@dataclass
class Verdict:
    target: Target
    shape: str          # the matched row's shape ("" when nothing matched)
    dtype: str
    achieved: float | None
    met: bool | None    # None: not measured
    detail: str

    @property
    def status(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "missed")


_SD15_64 = r"SD1\.5/AnimateDiff 64x64 .*8x40"
_SVD_L0 = r"SVD-xt L0\b"
_COG5B_K3 = r"CogVideoX-5B M=35552 d=3072 k=3 r=256 norm=none"

TARGETS: list[Target] = [
    # LightMotion latent edit (specs/lightmotion.md floor; issue 11 item 3; sm90-review summary).
    Target("latent_permute", "fwd", r"^bandwidth ", "ceiling", 85, source="specs/lightmotion.md, sm90-review"),
    Target("latent_resample", "fwd", r"^bandwidth ", "ceiling", 85, source="issue 11.3"),
    Target("latent_resample", "fwd", r"^(AnimateDiff|SVD-xt) ", "launch", 2, source="issue 11.3"),
    Target("latent_resample", "fwd", r"^(AnimateDiff|SVD-xt) ", "speedup", 10, "reference",
           source="sm90-review (earlier target, 'at risk')"),
    Target("snr_reinject", "fwd", r"^bandwidth ", "ceiling", 90, source="issue 11.2"),
    # MotionFlow (specs/motionflow.md floors; sm90-review; issue 10).
    Target("plucker_embedding", "fwd", r"^SVD 1x25x576x1024", "ceiling", 80, source="specs/motionflow.md, sm90-review"),
    Target("plucker_embedding", "fwd", r"^SVD 1x25x576x1024", "speedup", 10, "cameractrl_ray_condition",
           source="sm90-review"),
    Target("dual_cross_attention", "fwd", _SD15_64 + r" keys=77\+(4|16)$", "speedup", 1.5, "ip_adapter_sdpa",
           source="issue 10.3"),
    Target("dual_cross_attention", "fwd+bwd", _SD15_64 + r" keys=77\+(4|16)$", "speedup", 1.2, "ip_adapter_sdpa",
           source="issue 10.3"),
    Target("dual_cross_attention", "fwd", r"SD1\.5/AnimateDiff (32x32 .*8x80|16x16 .*8x160)", "speedup", 2,
           "ip_adapter_sdpa", source="issue 10.3"),
    Target("dual_cross_attention", "fwd", r"^SDXL .*n=4096 10x64", "speedup", 2, "ip_adapter_sdpa",
           source="issue 10.3"),
    Target("reference_attention", "fwd", r"SD1\.5/AnimateDiff", "speedup", 1.2, "sdpa_concat", source="issue 10.2"),
    Target("reference_attention", "fwd+bwd", r"SD1\.5/AnimateDiff", "speedup", 1.2, "sdpa_concat",
           source="issue 10.2"),
    # Trajectory attention at SVD-xt's 72x128 level (issue 10.4): the whole branch (projections included)
    # in `trajectory_attention`, the attention core alone in `trajectory_attention_core` where a scenario
    # reports it.
    Target("trajectory_attention", "fwd", _SVD_L0, "speedup", 3, "sdpa_index_add", source="issue 10.4"),
    Target("trajectory_attention", "fwd+bwd", _SVD_L0, "speedup", 3, "sdpa_index_add", source="issue 10.4"),
    Target("trajectory_attention_core", "fwd", _SVD_L0, "speedup", 20, "official", source="issue 10.4"),
    Target("trajectory_attention_core", "fwd", _SVD_L0, "speedup", 3, "sdpa_index_add", source="issue 10.4"),
    Target("trajectory_attention_core", "fwd", _SVD_L0, "speedup", 1, "flex", source="issue 10.4"),
    Target("trajectory_attention_unet", "fwd", r"SVD-xt UNet step", "at_most", 1.2, "unpatched",
           source="specs/trajectory_attention.md (scenario note), sm90-review"),
    # LiON-LoRA multi-LoRA GEMM (specs/multi_lora.md floor; issue 11.1).
    Target("multi_lora_linear", "fwd", _COG5B_K3, "ceiling", round(100 / 1.15, 1), source="issue 11 (<= 1.15x floor)"),
    Target("multi_lora_linear", "fwd", _COG5B_K3, "speedup", 1.4, "peft_loop", source="issue 11"),
    Target("multi_lora_linear", "fwd", _COG5B_K3, "speedup", 1.0, "vllm_shrink_expand", source="issue 11"),
]


def _matches(t: Target, row: dict) -> bool:
    return (row["op"] == t.op and row["mode"] == t.mode and re.search(t.shape, row["shape"]) is not None
            and (not t.dtype or row.get("dtype", "") == t.dtype))


def evaluate(rows: list[dict], launch_ms: float | None = None,
             targets: list[Target] | None = None) -> list[Verdict]:
    """One verdict per (target, matching case of ours); a target without a matching row of ours gets one
    "not measured" verdict. `rows` are the runner's rows (op, provider, mode, shape, dtype, median_ms,
    pct_of_ceiling)."""
    verdicts: list[Verdict] = []
    for t in TARGETS if targets is None else targets:
        ours = [r for r in rows if r["provider"] == OURS and _matches(t, r)]
        if not ours:
            verdicts.append(Verdict(t, "", "", None, None, "no benchmark row of ours matches"))
            continue
        for r in ours:
            verdicts.append(_judge(t, r, rows, launch_ms))
    return verdicts


def _judge(t: Target, ours: dict, rows: list[dict], launch_ms: float | None) -> Verdict:
    def verdict(achieved, met, detail):
        return Verdict(t, ours["shape"], ours.get("dtype", ""), achieved, met, detail)

    if t.kind == "ceiling":
        pct = ours.get("pct_of_ceiling")
        if pct is None:
            return verdict(None, None, "the case has no byte or FLOP count")
        return verdict(pct, pct >= t.value, f"{pct:.1f} % of ceiling")
    if t.kind == "launch":
        if not launch_ms:
            return verdict(None, None, "no empty-launch time was measured")
        ratio = ours["median_ms"] / launch_ms
        return verdict(ratio, ratio <= t.value, f"{ratio:.2f}x an empty launch ({launch_ms * 1e3:.1f} us)")
    other = [r for r in rows if r["provider"] == t.other and r["op"] == ours["op"] and r["mode"] == ours["mode"]
             and r["shape"] == ours["shape"] and r.get("dtype", "") == ours.get("dtype", "")]
    if not other:
        return verdict(None, None, f"no {t.other} row at this shape")
    if t.kind == "speedup":
        ratio = other[0]["median_ms"] / ours["median_ms"]
        return verdict(ratio, ratio >= t.value, f"{ratio:.2f}x {t.other}")
    if t.kind == "at_most":
        ratio = ours["median_ms"] / other[0]["median_ms"]
        return verdict(ratio, ratio <= t.value, f"{ratio:.2f}x {t.other}'s time")
    raise ValueError(f"unknown target kind {t.kind!r}")
