"""Packaging: what a user gets from `pip install` and from the sdist.

- Building where torch is missing never yields a wheel without the C++ extension silently: the
  in-tree build backend requires the invoking environment's torch, pinned, or stops with advice;
  setup.py's build_ext fails with the same advice; LIGHTMOTION_NO_EXT=1 is the only way to a wheel
  without the extension.
- The sdist holds what the tests and benchmarks need; the wheel carries kernels and scenarios inside
  the package; runtime dependencies are only what runs (triton only where it has wheels).
- The CPU path imports and runs without triton.
(The full isolated `pip wheel .` with the extension compiled takes minutes: it is checked by hand and
reported, not run here.)
"""
import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_backend"))
import lightmotion_build  # noqa: E402

# Run a snippet with `import <name>` failing, as on a machine where that package is not installed.
BLOCK_IMPORT = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {name!r} or name.startswith({name!r} + "."):
            raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, _Block())
"""


def _run(code: str, *args: str, cwd=ROOT, env_update=None, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LIGHTMOTION_NO_EXT")}
    env.update(env_update or {})
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _source_copy(tmp_path: Path) -> Path:
    """The source tree without build products, so builds don't write into the checkout."""
    dst = tmp_path / "src"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                            "*.so", ".pytest_cache", "demo_out", ".benchmarks"))
    return dst


# --- the build backend's torch requirement -----------------------------------------------------------

def test_backend_adds_nothing_where_torch_is_importable_or_no_extension_is_wanted(monkeypatch):
    monkeypatch.delenv("LIGHTMOTION_NO_EXT", raising=False)
    assert lightmotion_build.torch_requirements() == []          # torch is importable here
    monkeypatch.setenv("LIGHTMOTION_NO_EXT", "1")
    monkeypatch.setattr(lightmotion_build.importlib.util, "find_spec", lambda name: None)
    assert lightmotion_build.torch_requirements() == []


def test_isolated_build_requires_the_invoking_torch_pinned(monkeypatch):
    """In an isolated build environment torch is not importable: the backend pins the torch of the
    interpreter running pip (found with the build environment's path settings removed)."""
    import torch

    monkeypatch.delenv("LIGHTMOTION_NO_EXT", raising=False)
    monkeypatch.delenv("LIGHTMOTION_BUILD_TORCH", raising=False)
    assert lightmotion_build._invoking_torch_version() == torch.__version__
    monkeypatch.setattr(lightmotion_build.importlib.util, "find_spec", lambda name: None)
    assert lightmotion_build.torch_requirements() == [f"torch=={torch.__version__}", "ninja"]
    monkeypatch.setenv("LIGHTMOTION_BUILD_TORCH", "torch==2.9.1")
    assert lightmotion_build.torch_requirements() == ["torch==2.9.1", "ninja"]


def test_isolated_build_without_any_torch_fails_loudly(monkeypatch):
    monkeypatch.delenv("LIGHTMOTION_NO_EXT", raising=False)
    monkeypatch.delenv("LIGHTMOTION_BUILD_TORCH", raising=False)
    monkeypatch.setattr(lightmotion_build.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(lightmotion_build, "_invoking_torch_version", lambda: None)
    with pytest.raises(RuntimeError, match="torch is needed to build the C\\+\\+ extension") as info:
        lightmotion_build.get_requires_for_build_wheel()
    assert "--no-build-isolation" in str(info.value) and "LIGHTMOTION_NO_EXT=1" in str(info.value)


def test_setup_build_ext_without_torch_fails_instead_of_skipping(tmp_path):
    src = _source_copy(tmp_path)
    run_setup = BLOCK_IMPORT.format(name="torch") + (
        "import runpy; sys.argv = ['setup.py', 'build_ext', '--build-lib', 'out', '--build-temp', 'tmp']; "
        "runpy.run_path('setup.py', run_name='__main__')")
    result = _run(run_setup, cwd=src)
    assert result.returncode != 0
    assert "torch is not importable, so the C++ extension lightmotion_fast._C cannot be built" in result.stderr
    assert not list(src.rglob("_C*.so"))
    no_ext = _run(run_setup, cwd=src, env_update={"LIGHTMOTION_NO_EXT": "1"})
    assert no_ext.returncode == 0, no_ext.stderr


# --- what the sdist and the wheel hold ---------------------------------------------------------------

def _build(src: Path, hook: str, out: Path) -> Path:
    code = (f"import sys; sys.path.insert(0, 'build_backend'); import lightmotion_build as b; "
            f"print(b.{hook}({str(out)!r}))")
    result = _run(code, cwd=src, env_update={"LIGHTMOTION_NO_EXT": "1"} if hook == "build_wheel" else None)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdist")
    return _build(_source_copy(tmp), "build_sdist", tmp / "dist")


def test_sdist_holds_what_the_tests_and_benchmarks_need(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = ["LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "dev.sh",
              "build_backend/lightmotion_build.py", "tests/conftest.py", "tests/tiny_models.py",
              "tests/lm_testing.py", "tests/gpu_compile_check.py", "tests/test_packaging.py",
              "benchmarks/conftest.py", "benchmarks/scenarios/latent_permute.py", "kernels/plucker.py",
              "csrc/module.cpp", "lightmotion_fast/cli.py"]
    assert not [w for w in wanted if w not in names]
    for tree in ("tests", "benchmarks", "kernels", "csrc"):
        on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / tree).rglob("*")
                   if p.is_file() and p.suffix in (".py", ".cpp", ".cu", ".h") and "__pycache__" not in p.parts}
        assert on_disk <= names, sorted(on_disk - names)
    assert not [n for n in names if n.startswith("benchmarks/results/") or n.endswith((".so", ".pyc"))]


def test_dependencies_are_what_runs(sdist):
    with tarfile.open(sdist) as tar:
        pkg_info = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        meta = email.parser.Parser().parsestr(tar.extractfile(pkg_info).read().decode())
    requires = meta.get_all("Requires-Dist")
    runtime = [r for r in requires if "extra ==" not in r]
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in runtime}
    assert names == {"torch", "triton", "einops", "numpy"}, runtime
    triton = next(r for r in runtime if r.startswith("triton"))
    assert 'sys_platform == "linux"' in triton and "x86_64" in triton and "aarch64" in triton

    def extra(name):
        return {r.split(";")[0].split(">")[0].strip().lower() for r in requires if f'extra == "{name}"' in r}

    assert {"matplotlib", "pytest-benchmark"} <= extra("bench")
    assert {"diffusers"} <= extra("diffusers")
    assert {"peft", "transformers"} <= extra("lora")
    assert {"diffusers", "peft", "transformers", "matplotlib", "pillow", "pytest", "pytest-benchmark"} <= extra("test")
    assert not [r for r in requires if r.lower().startswith("ninja")]  # a build tool, not a dependency


def test_wheel_carries_kernels_and_scenarios_inside_the_package(tmp_path):
    wheel = _build(_source_copy(tmp_path), "build_wheel", tmp_path / "whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for stem in ("latent_permute", "plucker", "trajectory_attention"):
        assert f"lightmotion_fast/scenarios/{stem}.py" in names
        assert f"lightmotion_fast/kernels/{stem}.py" in names
    assert not [n for n in names if n.split("/")[0] in ("kernels", "benchmarks", "tests", "build_backend")]


# --- running without triton --------------------------------------------------------------------------

def test_cpu_path_imports_and_runs_without_triton():
    code = BLOCK_IMPORT.format(name="triton") + """
import torch
import lightmotion_fast as lm
z = torch.randn(1, 2, 3, 6, 8)
out, exposed = lm.latent_permute(z, lm.CameraMotion(pan=(0.25, 0.0)))
fill = lm.build_fill_map(lm.CameraMotion(pan=(0.25, 0.0)), 3, 6, 8, seed=0)
lm.latent_resample(z, fill)
k = torch.tensor([8.0, 8.0, 4.0, 3.0]).expand(1, 3, 4)
lm.plucker_embedding(k, torch.eye(4).expand(1, 3, 4, 4), 6, 8)
q = torch.randn(1, 2, 5, 8)
lm.reference_attention(q, q, q, q, q)
assert "triton" not in sys.modules
print("ok without triton")
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok without triton" in result.stdout


def test_missing_extension_warning_says_not_built_without_the_circular_import_text(tmp_path):
    """A package without _C (a LIGHTMOTION_NO_EXT=1 wheel) warns clearly, and the ops still run."""
    code = BLOCK_IMPORT.format(name="lightmotion_fast._C") + """
import importlib.util, warnings
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "lightmotion_fast._C" else _find_spec(name, *a)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lightmotion_fast as lm
messages = [str(w.message) for w in caught if "lightmotion_fast" in str(w.message)]
print(messages)
assert len(messages) == 1 and "has no C++ extension" in messages[0], messages
assert "circular import" not in messages[0] and "--no-build-isolation" in messages[0]
assert not lm.extension_available()
import torch
lm.latent_permute(torch.randn(1, 1, 2, 4, 4), lm.CameraMotion(pan=(0.25, 0.0)))
"""
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_repository_root_on_the_path_does_not_shadow_another_kernels_package(tmp_path):
    """From the repository root (`python -m lightmotion_fast demo`, `python -m pytest`) the top-level
    kernels/ directory is importable as `kernels`, the import name of Hugging Face's package that
    transformers ≥ 5 imports at start-up; where another `kernels` is installed, that one is what
    `import kernels` gives, and lightmotion_fast.kernels is still ours."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'the other package'\n")
    code = "import kernels, lightmotion_fast.kernels as ours; print(kernels.CUDAProperties, '|', ours.__name__)"
    result = _run(code, env_update={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "the other package | lightmotion_fast.kernels"
    # The import that failed before (transformers 5 with its `kernels` dependency): the video pipelines'
    # text encoders come through it.
    result = _run("import transformers.modeling_utils, diffusers; "
                  "from diffusers import AnimateDiffPipeline; print('imported')")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported" in result.stdout
