"""The hot kernels' sm_90 design invariants at their benchmark shapes, checked without a GPU.

A subprocess runs the static report's capture and compile (lightmotion_fast/bench/static.py) for the cases
that INVARIANTS names, with Triton not in interpreter mode, and the tests below hold each invariant against the
compiler's output: ptxas registers/spills, occupancy, SASS access widths, async copies, MMA kind, 64-bit
divisions, instructions per element. Compiled kernels are cached in Triton's cache (TRITON_CACHE_DIR), so only
launches whose kernel source or options changed are recompiled (a cold run compiles ~35 launches: a few
minutes on 2 cores).

INVARIANTS is the one table to edit. A row names a kernel, the benchmark cases it is checked at (a regex over
the report's case label 'op | shape | dtype | mode[ | variant]'), the check, and `known`: the open issue whose
work fixes a known miss. A row with `known` is a strict expected failure: when the fix lands, the test XPASSes,
which fails the run with the message "... XPASS means fixed: delete known=... from this INVARIANTS row". Never
loosen a check to make a row pass; add a row for a new kernel or shape.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STATIC_CSV = REPO / "benchmarks" / "results" / "sm90-static.csv"


def _n(row, *cols):
    return sum(int(row[c] or 0) for c in cols)


# check name -> (predicate over one report row, what it requires)
CHECKS = {
    "no spills": (lambda r: _n(r, "spill_stores", "spill_loads") == 0, "0 spill bytes (ptxas -v)"),
    "128-bit loads": (lambda r: _n(r, "ldg_16") == 0 and _n(r, "ldg_128", "ldgsts_128", "tma") >= 1,
                      "no 2-byte element loads (LDG.U16), at least one 128-bit load / cp.async / TMA"),
    "128-bit stores": (lambda r: _n(r, "stg_16") == 0 and _n(r, "stg_128") >= 1,
                       "no 2-byte element stores (STG.U16), at least one STG.128"),
    "no 2-byte loads": (lambda r: _n(r, "ldg_16") == 0, "no 2-byte element loads (LDG.U16) anywhere"),
    "async loads": (lambda r: _n(r, "ldgsts", "tma") >= 1, "tiles loaded with cp.async (LDGSTS) or TMA"),
    "TMA loads": (lambda r: _n(r, "tma") >= 1, "tiles loaded by TMA (UTMALDG)"),
    "wgmma": (lambda r: _n(r, "hgmma") >= 1 and _n(r, "hmma") == 0, "HGMMA (wgmma) only, no HMMA (mma.sync)"),
    ">=2 blocks/SM": (lambda r: _n(r, "blocks_per_sm") >= 2, "at least 2 resident blocks per SM"),
    "<=50 instr/elem": (lambda r: r["instr_per_elem"] not in ("", None) and float(r["instr_per_elem"]) <= 50,
                        "at most 50 static SASS instructions per element"),
    "no div64": (lambda r: _n(r, "div64") == 0, "no 64-bit integer division/remainder in the PTX"),
}

# Known misses (none today): what the fixing issue must do. The text is the xfail reason pytest prints,
# ending in _FLIP.
_FLIP = " XPASS means fixed: delete known=... from this INVARIANTS row."


@dataclass(frozen=True)
class Invariant:
    kernel: str       # kernel name (exact)
    cases: str        # regex over the case label 'op | shape | dtype | mode[ | variant]'
    check: str        # a key of CHECKS
    known: str = ""   # "" = must hold today; else the issue text of a known miss (strict xfail)


I = Invariant
# Case label patterns (benchmarks/scenarios/*.py at their GPU dtypes).
_ELEM16 = r"\| (AnimateDiff|SVD-xt) .*\| float16 \|"
_SNR_FP16 = r"snr_reinject \| AnimateDiff .*\| float16 \|"
_SNR_FP32 = r"snr_reinject \| bandwidth .*\| float32 \|"
_PLUCKER = r"plucker_embedding \| SVD 1x25x576x1024 \| float16"
_LORA = r"multi_lora_linear \| CogVideoX-5B M=35552 d=3072 k=3 r=256 norm=none \| bfloat16 \| fwd$"
_LORA_SAMPLE = r"multi_lora_linear \| CogVideoX-5B M=35552 d=3072 k=3 r=256 norm=output per sample x2( separate)? \| bfloat16 \| fwd$"
_LORA_SAMPLE_BWD = r"multi_lora_linear \| CogVideoX-5B M=35552 d=3072 k=3 r=256 norm=output per sample x2 \| bfloat16 \| fwd\+bwd$"
_LORA_BWD = r"multi_lora_linear \| CogVideoX-5B M=35552 d=3072 k=3 r=256 norm=none \| bfloat16 \| fwd\+bwd$"
_LORA_WEIGHT_BWD = r"multi_lora_linear \| CogVideoX-5B M=35552 d=3072 k=3 r=256 norm=weight \| bfloat16 \| fwd\+bwd$"
_DUAL_D40 = r"dual_cross_attention \| SD1.5/AnimateDiff 64x64 .* keys=77\+4 \| float16 \| fwd$"
_DUAL_D40_BWD = r"dual_cross_attention \| SD1.5/AnimateDiff 64x64 .* keys=77\+4 \| float16 \| fwd\+bwd$"
_DUAL_RESIDENT = (r"dual_cross_attention \| (SD1.5/AnimateDiff (64x64|32x32) .* keys=77\+(4|16)|SDXL b=2 n=\d+ "
                  r"\d+x64 keys=77\+4) \| float16 \| fwd$")
_DUAL_WIDE = r"dual_cross_attention \| SD1.5/AnimateDiff 16x16 .* keys=77\+(4|16) \| float16 \| fwd$"
_REF_D40 = r"reference_attention \| SD1.5/AnimateDiff 64x64 .*\| float16 \| fwd$"
_REF_ALIGNED = r"reference_attention \| SD1.5/AnimateDiff (32x32|16x16) .*\| float16 \| fwd$"
_REF_WGMMA = r"reference_attention \| SD1.5/AnimateDiff 32x32 .*\| float16 \| fwd$"
_TRAJ = r"trajectory_attention \| SVD-xt L0 .*\| float16 \| fwd\+bwd \|"
# The trajectory kernels run 32-frame tiles (25 frames padded): below wgmma's 64 rows, mma.sync is the design.

INVARIANTS = [
    # --- elementwise streams: contiguous tensors move as 128-bit accesses; no spills
    I("_latent_permute_kernel", "latent_permute " + _ELEM16, "no spills"),
    I("_latent_permute_kernel", "latent_permute " + _ELEM16, "128-bit stores"),   # loads gather: scalar by design
    I("_latent_resample_kernel", "latent_resample " + _ELEM16, "no spills"),
    I("_latent_resample_kernel", "latent_resample " + _ELEM16, "128-bit stores"),
    I("_latent_resample_kernel", "latent_resample " + _ELEM16, "no div64"),
    I("_snr_reinject_kernel", _SNR_FP16, "no spills"),
    I("_snr_reinject_kernel", _SNR_FP16, "128-bit loads"),
    I("_snr_reinject_kernel", _SNR_FP16, "128-bit stores"),
    I("_snr_reinject_kernel", _SNR_FP16, "<=50 instr/elem"),
    I("_snr_reinject_kernel", _SNR_FP32, "<=50 instr/elem"),
    I("_plucker_kernel", _PLUCKER, "no spills"),
    I("_plucker_kernel", _PLUCKER, "128-bit stores"),
    # --- multi-LoRA GEMMs (CogVideoX-5B, every autotune config)
    I("_multi_lora_shrink_kernel", _LORA, "no spills"),
    I("_multi_lora_shrink_kernel", _LORA, "async loads"),
    I("_multi_lora_shrink_kernel", _LORA, "wgmma"),
    I("_multi_lora_shrink_kernel", _LORA, "128-bit stores"),
    # the forward's expand on sm_90: every operand tile by TMA
    I("_multi_lora_expand_tma_kernel", _LORA, "no spills"),
    I("_multi_lora_expand_tma_kernel", _LORA, "TMA loads"),
    I("_multi_lora_expand_tma_kernel", _LORA, "wgmma"),
    I("_multi_lora_expand_tma_kernel", _LORA, "128-bit stores"),
    I("_multi_lora_expand_tma_kernel", _LORA, "no 2-byte loads"),   # bias row
    # `output` per sample (the paper's reading): z tiles scaled by cᵢ(b) between shared memory and wgmma;
    # with `separate` (the LiON-LoRA fusion processor's q/k/v) one output per LoRA from the kept base tile
    I("_multi_lora_expand_tma_kernel", _LORA_SAMPLE, "no spills"),
    I("_multi_lora_expand_tma_kernel", _LORA_SAMPLE, "TMA loads"),
    I("_multi_lora_expand_tma_kernel", _LORA_SAMPLE, "wgmma"),
    I("_multi_lora_expand_tma_kernel", _LORA_SAMPLE, "no 2-byte loads"),
    # the backward's dx = g W + dz A_cat: the same kernel walking W's storage as its [K, N] operand
    I("_multi_lora_expand_tma_kernel", _LORA_BWD, "no spills"),
    I("_multi_lora_expand_tma_kernel", _LORA_BWD, "TMA loads"),
    I("_multi_lora_expand_tma_kernel", _LORA_BWD, "wgmma"),
    I("_multi_lora_expand_tma_kernel", _LORA_BWD, "128-bit stores"),
    # the `output` norms' backward passes over the [M, R] tensors: 16-byte accesses, no spills
    I("_multi_lora_output_bwd_scale_kernel", _LORA_SAMPLE_BWD, "no spills"),
    I("_multi_lora_output_bwd_scale_kernel", _LORA_SAMPLE_BWD, "128-bit loads"),
    I("_multi_lora_output_bwd_scale_kernel", _LORA_SAMPLE_BWD, "128-bit stores"),
    I("_multi_lora_output_bwd_dz_kernel", _LORA_SAMPLE_BWD, "no spills"),
    I("_multi_lora_output_bwd_dz_kernel", _LORA_SAMPLE_BWD, "128-bit loads"),
    I("_multi_lora_output_bwd_dz_kernel", _LORA_SAMPLE_BWD, "128-bit stores"),
    # (the cp.async expand no longer runs at these shapes on sm_90; the compile checks still compile
    # every launch of it, spill-free under Triton 3.6 and 3.9)
    # --- dual cross-attention forward: 77 + 4 keys at heads up to 128 wide keep the keys resident (d=40 at
    # SD1.5 64x64, d=80 at 32x32, SDXL's d=64); 160-wide heads (16x16) run the online-softmax kernel on
    # 32-query tiles, below wgmma's 64 rows per warpgroup, so mma.sync there is the design.
    I("_dual_cross_attention_fwd_resident_kernel", _DUAL_D40, "128-bit stores"),
    I("_dual_cross_attention_fwd_resident_kernel", _DUAL_RESIDENT, "no spills"),
    I("_dual_cross_attention_fwd_resident_kernel", _DUAL_RESIDENT, "128-bit loads"),
    I("_dual_cross_attention_fwd_resident_kernel", _DUAL_RESIDENT, "async loads"),
    I("_dual_cross_attention_fwd_resident_kernel", _DUAL_RESIDENT, ">=2 blocks/SM"),
    I("_dual_cross_attention_fwd_resident_kernel", _DUAL_RESIDENT, "wgmma"),
    I("_dual_cross_attention_fwd_kernel", _DUAL_WIDE, "no spills"),
    I("_dual_cross_attention_fwd_kernel", _DUAL_WIDE, "128-bit loads"),
    I("_dual_cross_attention_fwd_kernel", _DUAL_WIDE, "async loads"),
    I("_dual_cross_attention_fwd_kernel", _DUAL_WIDE, ">=2 blocks/SM"),
    # dq with the keys resident (short key lists), as the forward
    I("_dual_bwd_dq_resident_kernel", _DUAL_D40_BWD, "no spills"),
    I("_dual_bwd_dq_resident_kernel", _DUAL_D40_BWD, "128-bit loads"),
    I("_dual_bwd_dq_resident_kernel", _DUAL_D40_BWD, "async loads"),
    I("_dual_bwd_dq_resident_kernel", _DUAL_D40_BWD, ">=2 blocks/SM"),
    I("_dual_bwd_dq_resident_kernel", _DUAL_D40_BWD, "wgmma"),
    I("_dual_bwd_dkdv_kernel", _DUAL_D40_BWD, "no spills"),
    I("_dual_bwd_dkdv_kernel", _DUAL_D40_BWD, "128-bit loads"),
    I("_dual_bwd_dkdv_kernel", _DUAL_D40_BWD, "wgmma"),
    # --- reference attention (forward)
    I("_reference_attention_fwd_tma_kernel", _REF_D40, "no spills"),
    I("_reference_attention_fwd_tma_kernel", _REF_D40, "128-bit loads"),
    I("_reference_attention_fwd_tma_kernel", _REF_D40, "128-bit stores"),
    I("_reference_attention_fwd_tma_kernel", _REF_D40, "async loads"),
    I("_reference_attention_fwd_tma_kernel", _REF_D40 + "|" + _REF_ALIGNED, "TMA loads"),
    I("_reference_attention_fwd_tma_kernel", _REF_D40, ">=2 blocks/SM"),
    I("_reference_attention_fwd_tma_kernel", _REF_D40, "wgmma"),
    I("_reference_attention_fwd_tma_kernel", _REF_ALIGNED, "no spills"),
    I("_reference_attention_fwd_tma_kernel", _REF_ALIGNED, "128-bit loads"),
    I("_reference_attention_fwd_tma_kernel", _REF_ALIGNED, "async loads"),
    # d=160 runs 32-query tiles for two resident blocks per SM: below wgmma's 64 rows, so mma.sync there is
    # the design (that level is memory bound: 126 MB, a 42 µs floor on H100; sm90 review 3.7).
    I("_reference_attention_fwd_tma_kernel", _REF_WGMMA, "wgmma"),
    I("_reference_attention_fwd_tma_kernel", _REF_ALIGNED, ">=2 blocks/SM"),
    # --- trajectory attention, SVD-xt L0 (both modes)
    I("_traj_attn_fwd_kernel", _TRAJ, "no spills"),
    I("_traj_attn_fwd_kernel", _TRAJ, "128-bit loads"),
    I("_traj_attn_fwd_kernel", _TRAJ + " deterministic", "128-bit stores"),   # atomic mode adds with REDG
    I("_traj_attn_fwd_kernel", _TRAJ, "async loads"),
    I("_traj_attn_fwd_kernel", _TRAJ, ">=2 blocks/SM"),
    I("_csr_reduce_kernel", _TRAJ, "no spills"),
    I("_csr_reduce_kernel", _TRAJ, "128-bit loads"),
    I("_traj_attn_bwd_kernel", _TRAJ, "no spills"),
    I("_traj_attn_bwd_kernel", _TRAJ, "128-bit loads"),
    I("_traj_attn_bwd_kernel", _TRAJ + " deterministic", "128-bit stores"),
    I("_traj_attn_bwd_kernel", _TRAJ, ">=2 blocks/SM"),
    I("_traj_attn_bwd_kernel", _TRAJ, "async loads"),
]


# Cases captured for test_pytorch_work_inside_the_ops_is_recorded only (their launches are those of others).
_TORCH_ONLY_CASES = [_LORA_WEIGHT_BWD]


def _case_regex():
    return "|".join(f"(?:{p})" for p in sorted({inv.cases for inv in INVARIANTS} | set(_TORCH_ONLY_CASES)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "lightmotion_fast.bench.static", "--cases", _case_regex(),
                           "--no-write", "--json", str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=3600)
    if not out.exists():
        pytest.fail(f"the static capture wrote nothing (exit {proc.returncode}):\n{proc.stdout[-6000:]}\n"
                    f"{proc.stderr[-6000:]}")
    data = json.loads(out.read_text())
    assert data["capture_errors"] == [], "\n".join(e["case"] + "\n" + e["error"] for e in data["capture_errors"])
    return data


@pytest.fixture(scope="module")
def rows(report):
    return [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in report["rows"]]


def test_pytorch_work_inside_the_ops_is_recorded(report):
    """The capture's second call (the steady state) records PyTorch's own work inside the ops: the multi-LoRA
    backward's three token-long GEMMs, never the library's own ops (their kernels are the launch rows), and
    nothing of size for the trajectory core, whose index tables are built once in a TrajectoryIndex."""
    work = report["torch_work"]
    # no value read by the host in a steady-state call (each would be a GPU synchronisation)
    assert not [t for t in work if t["aten"] in ("_local_scalar_dense", "equal", "is_nonzero")]
    assert not [t for t in work if t["aten"] in ("multi_lora_linear", "trajectory_attention", "dual_cross_attention",
                                                  "reference_attention")]
    lora = [t for t in work if re.search(_LORA_BWD, t["case"])]
    mms = sorted((t["shapes"], t["flops"]) for t in lora if t["aten"] == "mm")
    m, d, r = 35552, 3072, 768
    assert mms == sorted([(f"{m}x{d} @ {d}x{r}", 2 * m * d * r), (f"{d}x{m} @ {m}x{r}", 2 * m * d * r),
                          (f"{r}x{m} @ {m}x{d}", 2 * m * d * r)]), mms
    traj = [t for t in work if re.search(_TRAJ + " deterministic", t["case"])]
    assert all(t["bytes"] < 1e6 for t in traj), traj
    # the `output` norms' backward: its [M, R] elementwise work is in the two Triton passes, so no PyTorch op
    # but a matrix product moves as much as one [M, R] bf16 tensor (55 MB)
    sample = [t for t in work if re.search(_LORA_SAMPLE_BWD, t["case"])]
    assert sample and not [t for t in sample if t["aten"] != "mm" and t["bytes"] >= m * r * 2], sample
    # the norms' own matrix products (Grams, their r×d- and M-long products) in bf16, on the tensor cores: no
    # fp32 product (67 TFLOP/s on the FMA units) in either normalisation's backward. The fwd+bwd cases are
    # training steps (the LoRA weights updated before the call), so the forward's rebuild of the weight norms
    # is there too: its fp32 Grams AᵢAᵢᵀ and BᵢᵀBᵢ (r × r, once per update) are the only fp32 products.
    weight = [t for t in work if re.search(_LORA_WEIGHT_BWD, t["case"])]
    products = [t for t in sample + weight if t["aten"] in ("mm", "addmm", "bmm", "baddbmm", "matmul")]
    assert len({t["shapes"] for t in weight if t["aten"] == "mm"}) > 3, weight   # the norms' products are there
    wide = [t for t in products if t["dtype"] != "bfloat16"]
    assert [(t["case"], t["shapes"], t["calls"]) for t in wide] == [(weight[0]["case"], "256x3072 @ 3072x256", 6)], \
        wide


def test_every_hot_launch_compiled(rows):
    failed = [r for r in rows if r["ok"] != "1"]
    assert not failed, "\n".join(f"{r['kernel']} {r['case']}: {r['error']}" for r in failed)


def _params():
    for i, inv in enumerate(INVARIANTS):
        marks = [pytest.mark.xfail(strict=True, reason=inv.known)] if inv.known else []
        yield pytest.param(inv, id=f"row{i:02d}-{inv.kernel.strip('_')}-{inv.check}", marks=marks)


@pytest.mark.parametrize("inv", list(_params()))
def test_invariant(rows, inv):
    matching = [r for r in rows if r["kernel"] == inv.kernel and re.search(inv.cases, r["case"])]
    assert matching, f"no launch of {inv.kernel} at cases /{inv.cases}/: a renamed kernel or scenario? fix the row"
    predicate, wanted = CHECKS[inv.check]
    broken = [r for r in matching if not predicate(r)]
    assert not broken, f"{inv.kernel}: {inv.check} ({wanted}) fails at:\n" + "\n".join(
        f"  {r['case']} [{r['constexprs']} w={r['num_warps']} s={r['num_stages']}]: regs={r['registers']} "
        f"spill={r['spill_stores']} blocks/SM={r['blocks_per_sm']} LDG128/16={r['ldg_128']}/{r['ldg_16']} "
        f"STG128/16={r['stg_128']}/{r['stg_16']} LDGSTS={r['ldgsts']} TMA={r['tma']} HGMMA/HMMA={r['hgmma']}/"
        f"{r['hmma']} div64={r['div64']} instr/elem={r['instr_per_elem']}" for r in broken)


def test_every_check_named_in_the_table_exists():
    assert {inv.check for inv in INVARIANTS} <= set(CHECKS)
    assert len(set(INVARIANTS)) == len(INVARIANTS), "duplicate rows"


# --- the committed report and the model behind its columns (no compile)

def test_committed_report_covers_every_benchmark_case():
    from lightmotion_fast.bench import static
    with open(STATIC_CSV, newline="") as f:
        reported = {r["case"] for r in csv.DictReader(f)}
    wanted = set()
    for name, case in static.benchmark_cases():
        if case.mode == "build" or "UNet step" in case.shape:   # no kernel launch of its own
            continue
        variants = ("deterministic", "atomic") if name == "trajectory_attention" else ("",)
        wanted |= {static.case_label(case, v) for v in variants}
    missing = sorted(wanted - reported)
    assert not missing, "regenerate with `python -m lightmotion_fast bench --static`; missing:\n" + "\n".join(missing)


def test_committed_report_counts_the_scenarios_bytes_and_flops():
    """Each case's bytes and FLOPs in the report are its scenario's (the capture once built the cases
    inside its matmul-skipping mode, where a camera's inverse affines came out as garbage: latent_permute's
    kept-pixel bytes changed from one regeneration to the next)."""
    from lightmotion_fast.bench import static
    with open(STATIC_CSV, newline="") as f:
        reported = {r["case"]: (r["bytes"], r["flops"]) for r in csv.DictReader(f)}
    checked = 0
    for name, case in static.benchmark_cases():
        variants = ("deterministic", "atomic") if name == "trajectory_attention" else ("",)
        for label in (static.case_label(case, v) for v in variants):
            if label in reported:
                nbytes, flops = reported[label]
                assert nbytes == str(case.bytes or ""), (label, nbytes, case.bytes)
                assert flops == (str(int(case.flops)) if case.flops else ""), (label, flops, case.flops)
                checked += 1
    assert checked > 100


def test_occupancy_model_matches_the_cuda_rules():
    from lightmotion_fast.bench.static import occupancy
    # registers: 153 regs x 8 warps -> 5,120 regs per warp -> 12 warps -> 1 block; 123 regs -> 2 blocks
    assert occupancy(153, 20 * 1024, 8) == (1, 8)
    assert occupancy(123, 20 * 1024, 8) == (2, 16)
    assert occupancy(36, 0, 4) == (12, 48)
    # warps: 32 regs x 4 warps would allow 16 blocks, 64 warps per SM allow 16
    assert occupancy(32, 0, 4) == (16, 64)
    # shared memory: 120 KiB per block leaves room for one (228 KiB per SM, 1 KiB reserved per block)
    assert occupancy(64, 120 * 1024, 4) == (1, 4)
    assert occupancy(64, 96 * 1024, 4) == (2, 8)


def test_sass_counts_read_widths_and_units():
    from lightmotion_fast.bench.static import sass_counts
    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P6 LDG.E.128 R24, desc[UR8][R34.64] ;
        /*0020*/                   LDG.E.U16 R2, desc[UR8][R2.64] ;
        /*0030*/                   LDG.E.CONSTANT R2, desc[UR8][R2.64] ;
        /*0040*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR8][R2.64] ;
        /*0050*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;
        /*0060*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0070*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R4 ;
        /*0080*/                   REDUX.MAX R3, R2 ;
        /*0090*/                   STG.E.128 desc[UR8][R2.64], R4 ;
        /*00a0*/               @P0 BRA 0x10 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0 ;
        /*00d0*/                   NOP;
    """
    c = sass_counts(sass)
    assert (c["ldg_128"], c["ldg_16"], c["ldg_32"], c["stg_128"]) == (1, 1, 1, 1)
    assert (c["ldgsts"], c["ldgsts_128"], c["hgmma"], c["hmma"], c["atomics"]) == (1, 1, 1, 1, 1)
    assert c["backward_branches"] == 1 and c["instructions"] == 13


def test_torch_entries_count_bytes_and_flops_and_skip_views():
    import torch

    from lightmotion_fast.bench import static
    recorder = static.RECORDER
    saved = recorder.torch_case, list(recorder.torch_ops)
    recorder.torch_case, recorder.torch_ops[:] = "case", []
    try:
        a, b = torch.empty(64, 32, dtype=torch.bfloat16), torch.empty(32, 16, dtype=torch.bfloat16)
        with static.SkipMatmuls():
            c = a @ b                       # mm on meta tensors: 2·64·32·16 FLOPs, reads a and b, writes c
            d = c.float()                   # _to_copy: reads 2 B, writes 4 B per element
            d.view(-1).t()                  # views move nothing
            d.zero_()                       # a fill writes only
            a.new_zeros((4, 4))             # a factory reads only its argument's metadata
            torch.empty(1000)               # an allocation moves nothing
            e = torch.empty(64, 16)
            torch.mm(d, torch.empty(16, 16), out=e)   # an out= argument is written, not read
            e[0, 0].item()                  # a host read (a synchronisation on a GPU) is recorded
            with torch._C._AutoDispatchBelowAutograd():
                a.to(torch.bfloat16)        # below autograd `to` arrives whole: returning a, it moves nothing,
                a.to(torch.float32)         # converting, it is a copy (reads 2 B, writes 4 B an element)
                torch.matmul(a, b)          # and so does matmul
        entries = list(recorder.torch_ops)
    finally:
        recorder.torch_case, recorder.torch_ops[:] = saved[0], saved[1]
    assert [e["aten"] for e in entries][:6] == ["mm", "_to_copy", "zero_", "new_zeros", "mm", "_local_scalar_dense"], \
        entries
    matmul = entries.pop()
    assert matmul["aten"] in ("matmul", "mm") and matmul["flops"] == 2 * 64 * 32 * 16, matmul
    to = entries.pop()
    assert to["aten"] in ("to", "_to_copy") and to["bytes"] == 64 * 32 * (2 + 4), to
    assert entries.pop()["bytes"] == 4
    out_mm = entries.pop()
    assert out_mm["shapes"] == "64x16 @ 16x16" and out_mm["bytes"] == 4 * (64 * 16 + 16 * 16 + 64 * 16)
    by_op = {e["aten"]: e for e in entries}
    assert (by_op["mm"]["flops"], by_op["mm"]["bytes"]) == (2 * 64 * 32 * 16, 2 * (64 * 32 + 32 * 16 + 64 * 16))
    assert by_op["mm"]["shapes"] == "64x32 @ 32x16"
    assert (by_op["_to_copy"]["flops"], by_op["_to_copy"]["bytes"]) == (0, 64 * 16 * (2 + 4))
    assert by_op["zero_"]["bytes"] == 64 * 16 * 4
    assert by_op["new_zeros"]["bytes"] == 4 * 4 * 2
    rows = static.torch_rows(entries + entries)
    mm = next(r for r in rows if r["aten"] == "mm")
    assert mm["calls"] == 2 and mm["flops"] == 4 * 64 * 32 * 16 and mm["bound"] == "memory"


def test_qr_flops_are_counted():
    """The `output` norms' cache build factors each Bᵢ by QR: 2mn² − 2n³/3 FLOPs for R of an m × n matrix."""
    import torch

    from lightmotion_fast.bench import static
    a = torch.randn(64, 16)
    assert static._matmul_flops("linalg_qr", (a, "r"), None) == 2 * 64 * 16 * 16 - 2 * 16 ** 3 // 3


def test_wide_matrix_products_are_floored_at_the_fma_rate():
    """An fp32 product's FLOPs count at 67 TFLOP/s (no TF32 by default), a 16-bit one's at the tensor-core rate."""
    from lightmotion_fast.bench import static
    flops = 67e9   # 1 ms at the fp32 rate, ~84 µs at H100's measured bf16 rate
    assert static.floors(0, flops, "float32")["floor_us_h100"] == round(flops / 66.9e12 * 1e6, 2)
    assert static.floors(0, flops, "float32")["bound"] == "compute"
    assert static.floors(0, flops, "bfloat16")["floor_us_h100"] == round(flops / 798e12 * 1e6, 2)
    assert static.floors(0, flops)["floor_us_h200"] == round(flops / 788e12 * 1e6, 2)
    # bytes that bind at the 16-bit rate can be outrun by the same FLOPs in fp32
    assert static.floors(3e7, 3e9)["bound"] == "memory" and static.floors(3e7, 3e9, "float32")["bound"] == "compute"


def test_partial_regeneration_keeps_the_other_cases():
    from lightmotion_fast.bench.static import merge
    old = [dict(case="a", kernel="k1", launch="1"), dict(case="a", kernel="k2", launch="2"),
           dict(case="b", kernel="k1", launch="3")]
    new = [dict(case="a", kernel="k1", launch="4")]
    assert merge(old, new) == [dict(case="b", kernel="k1", launch="3"), dict(case="a", kernel="k1", launch="4")]


def test_bench_static_flag():
    from lightmotion_fast.cli import build_parser
    args = build_parser().parse_args(["bench", "--static", "--ops", "snr_reinject", "plucker"])
    assert args.static and args.ops == ["snr_reinject", "plucker"]
    assert not build_parser().parse_args(["bench"]).static


def test_each_check_rejects_what_it_names():
    """Each check passes a row that meets every design rule and fails on the one field it is about."""
    good = dict(spill_stores="0", spill_loads="0", ldg_16="0", ldg_128="2", ldgsts="8", ldgsts_128="8", tma="4",
                stg_16="0", stg_128="1", hgmma="4", hmma="0", blocks_per_sm="2", instr_per_elem="40", div64="0")
    breaks = {"no spills": dict(spill_stores="8"), "128-bit loads": dict(ldg_16="56"),
              "128-bit stores": dict(stg_16="32", stg_128="0"), "no 2-byte loads": dict(ldg_16="1"),
              "async loads": dict(ldgsts="0", ldgsts_128="0", tma="0"), "TMA loads": dict(tma="0"),
              "wgmma": dict(hmma="32"),
              ">=2 blocks/SM": dict(blocks_per_sm="1"), "<=50 instr/elem": dict(instr_per_elem="224"),
              "no div64": dict(div64="16")}
    assert set(breaks) == set(CHECKS)
    for name, (predicate, _) in CHECKS.items():
        assert predicate(good), name
        assert not predicate({**good, **breaks[name]}), name
