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
import os

import pytest
from lm_testing import run_compile_check, spilling_launches


# op -> the kernels its Triton path launches (forward and backward).
EXPECTED = {
    "latent_permute": ["_latent_permute_kernel"],
    "latent_resample": ["_latent_resample_kernel"],
    "snr_reinject": ["_snr_noise_kernel", "_snr_reinject_kernel"],
    "trajectory_attention": ["_csr_reduce_kernel", "_traj_attn_bwd_kernel", "_traj_attn_fwd_kernel"],
    "multi_lora": ["_multi_lora_expand_kernel", "_multi_lora_expand_tma_kernel", "_multi_lora_output_bwd_dz_kernel",
                   "_multi_lora_output_bwd_scale_kernel", "_multi_lora_sample_norm_kernel",
                   "_multi_lora_shrink_kernel", "_multi_lora_shrink_norm_kernel"],
    "plucker": ["_plucker_kernel"],
    "dual_cross_attention": ["_dual_bwd_dkdv_kernel", "_dual_bwd_dq_kernel", "_dual_bwd_dq_resident_kernel",
                             "_dual_cross_attention_fwd_kernel", "_dual_cross_attention_fwd_resident_kernel"],
    "reference_attention": ["_dual_bwd_dkdv_kernel", "_dual_bwd_dq_kernel", "_reference_attention_fwd_kernel",
                            "_reference_attention_fwd_tma_kernel", "_row_dot_kernel"],
}
KERNELS = sorted({k for ks in EXPECTED.values() for k in ks})
# Kernels whose pointer arguments follow the op's dtype (snr_noise always writes float32).
# Kernels whose pointer dtypes follow the op's input dtype. Not: the noise generator (writes float32) and
# the per-sample norm reduce (reads and writes float32 norms whatever x's dtype).
DTYPE_FOLLOWING = [k for k in KERNELS if k not in ("_snr_noise_kernel", "_multi_lora_sample_norm_kernel")]
SIXTEEN_BIT_ONLY = ("_reference_attention_fwd_tma_kernel", "_multi_lora_expand_tma_kernel",
                    "_dual_cross_attention_fwd_resident_kernel", "_dual_bwd_dq_resident_kernel")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    timeout = 7200 if os.environ.get("LIGHTMOTION_COMPILE_ALL") == "1" else 1800
    return run_compile_check(tmp_path_factory.mktemp("gpu_compile"), timeout=timeout)


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
        # the TMA forward is the 16-bit path on Hopper; fp32 keeps the FMA-dot kernel
        assert {r["dtype"] for r in results} == ({"float16", "bfloat16"} if kernel in SIXTEEN_BIT_ONLY
                                                 else {"float32", "float16", "bfloat16"})


def test_no_launch_spills(report):
    """ptxas -v: no launch of the subset keeps values in local memory (the static report holds the
    benchmark shapes to the same, tests/test_sm90_invariants.py)."""
    assert all(r.get("registers") for r in report["results"]), "ptxas -v statistics missing"
    assert not spilling_launches(report), spilling_launches(report)


def test_script_exit_status(report):
    assert report["returncode"] == 0, report["log"]
