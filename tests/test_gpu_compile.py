"""Every Triton kernel the ops launch compiles for Hopper (sm_90), checked on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, which the rest of the suite uses on CPUs) accepts code that the
real compiler rejects, so tests/gpu_compile_check.py captures the launches the ops make (arguments,
specialisations, constexprs, num_warps / num_stages, every autotune config) with Triton *not* in
interpreter mode, and compiles them ahead of time for GPUTarget("cuda", 90, 32) down to a cubin.
It runs in a subprocess because this process already imported triton in interpreter mode.

By default a representative subset is compiled (per kernel and dtype the launch with the largest
tiles, plus every combination of the kernel's flags); LIGHTMOTION_COMPILE_ALL=1 compiles every
distinct launch (several minutes on 2 cores).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_compile_check.py")

# op -> the kernels its Triton path launches (forward and backward).
EXPECTED = {
    "latent_permute": ["_latent_permute_kernel"],
    "latent_resample": ["_latent_resample_kernel"],
    "snr_reinject": ["_snr_noise_kernel", "_snr_reinject_kernel"],
    "trajectory_attention": ["_csr_reduce_kernel", "_traj_attn_bwd_kernel", "_traj_attn_fwd_kernel"],
    "multi_lora": ["_multi_lora_expand_kernel", "_multi_lora_shrink_kernel", "_multi_lora_shrink_norm_kernel"],
    "plucker": ["_plucker_kernel"],
    "dual_cross_attention": ["_dual_bwd_dkdv_kernel", "_dual_bwd_dq_kernel", "_dual_cross_attention_fwd_kernel"],
    "reference_attention": ["_reference_attention_fwd_kernel"],
}
KERNELS = sorted({k for ks in EXPECTED.values() for k in ks})
# Kernels whose pointer arguments follow the op's dtype (snr_noise always writes float32).
DTYPE_FOLLOWING = [k for k in KERNELS if k != "_snr_noise_kernel"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")   # compile for real, not from an earlier run's cache
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=7200 if os.environ.get("LIGHTMOTION_COMPILE_ALL") == "1" else 1800)
    if not out.exists():
        pytest.fail(f"gpu_compile_check.py wrote no report (exit {proc.returncode}):\n"
                    f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    data = json.loads(out.read_text())
    data["returncode"], data["log"] = proc.returncode, proc.stdout[-20000:]
    return data


def test_the_check_can_fail(report):
    bad = report["selftest"]
    assert not bad["ok"], "a tl.dot with K = 8 compiled for sm_90: the check is not compiling for real"
    assert "K >= 16" in bad["error"]


def test_target_is_hopper(report):
    assert report["target"] == "GPUTarget(backend='cuda', arch=90, warp_size=32)"


def test_every_op_was_captured(report):
    assert report["capture_errors"] == [], "\n".join(e["error"] for e in report["capture_errors"])
    assert report["ops_launching"] == EXPECTED


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_for_sm90(report, kernel):
    results = [r for r in report["results"] if r["kernel"] == kernel]
    assert results, f"{kernel} was not compiled"
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(
        f"{r['kernel']} ({r['op']}, {r['dtype']}, warps={r['num_warps']}, stages={r['num_stages']}, "
        f"constexprs={r['constexprs']}):\n{r['error']}" for r in failed)
    assert all(r["has_cubin"] for r in results)
    if kernel in DTYPE_FOLLOWING:
        assert {r["dtype"] for r in results} == {"float32", "float16", "bfloat16"}


def test_script_exit_status(report):
    assert report["returncode"] == 0, report["log"]
