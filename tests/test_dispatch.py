"""Choosing the implementation, the backend override, and the extension's load-or-warn behaviour."""
import os
import subprocess
import sys

import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast import _ext
from lightmotion_fast.ops._common import Backend, select_backend

CPU = torch.device("cpu")


def test_auto_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("LIGHTMOTION_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(CPU, cpp_op="latent_permute_out") is Backend.TRITON
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    expected = Backend.CPP if _ext.available() else Backend.REFERENCE
    assert select_backend(CPU, cpp_op="latent_permute_out") is expected
    assert select_backend(CPU, cpp_op=None) is Backend.REFERENCE
    assert select_backend(CPU, cpp_op="no_such_op") is Backend.REFERENCE


def test_auto_choice_on_cuda_device_object():
    assert select_backend(torch.device("cuda"), cpp_op="latent_permute_out") is Backend.TRITON


def test_environment_override(monkeypatch):
    monkeypatch.setenv("LIGHTMOTION_BACKEND", "reference")
    assert select_backend(torch.device("cuda")) is Backend.REFERENCE
    monkeypatch.setenv("LIGHTMOTION_BACKEND", "Triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend(CPU)
    monkeypatch.setenv("LIGHTMOTION_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LIGHTMOTION_BACKEND='fastest' is not one of"):
        select_backend(CPU)


def test_context_manager_wins_and_restores(monkeypatch):
    monkeypatch.setenv("LIGHTMOTION_BACKEND", "triton")
    with lm.backend("reference"):
        assert select_backend(torch.device("cuda")) is Backend.REFERENCE
        with lm.backend("triton"):
            assert select_backend(torch.device("cuda")) is Backend.TRITON
        assert select_backend(torch.device("cuda")) is Backend.REFERENCE
    assert select_backend(torch.device("cuda")) is Backend.TRITON
    with pytest.raises(ValueError):
        with lm.backend("nope"):
            pass


def test_forced_cpp_on_cuda_is_an_error():
    with lm.backend("cpp"), pytest.raises(RuntimeError, match=r"C\+\+ backend was forced"):
        select_backend(torch.device("cuda"), cpp_op="latent_permute_out")


def test_extension_is_built_here():
    """The README's install builds lightmotion_fast._C; a silent fall-back would hide a broken build."""
    if os.environ.get("LIGHTMOTION_NO_EXT") == "1":
        pytest.fail("this test checks the default install; unset LIGHTMOTION_NO_EXT")
    assert _ext.available(), f"C++ extension not loaded: {_ext.load_error}"
    assert _ext.has_op("latent_permute_out")
    assert _ext._C.torch_version() == torch.__version__.split("+")[0]


def _run(code: str, **env):
    full_env = {**os.environ, **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_missing_extension_is_a_warning_not_an_error():
    code = ("import sys; sys.modules['lightmotion_fast._C'] = None\n"   # makes `from . import _C` fail
            "import torch, lightmotion_fast as lm\n"
            "z = torch.randn(1, 2, 3, 5, 6)\n"
            "out, exposed = lm.latent_permute(z, lm.CameraMotion(pan=(0.2, 0)))\n"
            "print('available', lm.extension_available(), tuple(out.shape))")
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "available False (1, 2, 3, 5, 6)" in result.stdout
    assert "could not be loaded" in result.stderr and "pip install --no-build-isolation -e ." in result.stderr


def test_extension_switch_off():
    result = _run("import lightmotion_fast as lm; print(lm.extension_available())", LIGHTMOTION_NO_EXT="1")
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_forcing_cpp_on_an_op_without_a_cpp_version_says_so():
    q = torch.randn(1, 1, 4, 8)
    with lm.backend("cpp"), pytest.raises(RuntimeError, match="this op has no C\\+\\+ implementation"):
        lm.dual_cross_attention(q, [q], [q])
