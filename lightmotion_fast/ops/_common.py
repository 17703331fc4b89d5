"""What every op shares: the choice of implementation and the input checks.

Implementation per call (DESIGN.md, "Choosing the implementation"):
  CUDA tensor                         -> Triton kernel
  CPU tensor, TRITON_INTERPRET=1      -> Triton kernel through Triton's interpreter
  CPU tensor, C++ op available        -> C++ op
  CPU tensor otherwise                -> PyTorch reference
LIGHTMOTION_BACKEND=reference|triton|cpp overrides the automatic choice, and so does the
`lightmotion_fast.backend(name)` context manager, which takes precedence over the variable.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import math
import os
import threading
from collections.abc import Iterator, Sequence

import torch

from lightmotion_fast import _ext


class Backend(str, enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    TRITON = "triton"
    CPP = "cpp"


_state = threading.local()


def _forced() -> Backend:
    name = getattr(_state, "backend", None) or os.environ.get("LIGHTMOTION_BACKEND", "auto")
    try:
        return Backend(name.lower())
    except ValueError:
        raise ValueError(
            f"LIGHTMOTION_BACKEND={name!r} is not one of {[b.value for b in Backend]}"
        ) from None


@contextlib.contextmanager
def backend(name: str | Backend) -> Iterator[None]:
    """Force an implementation inside a `with` block; the previous choice is restored on exit.

    >>> with lightmotion_fast.backend("reference"):
    ...     out, exposed = lightmotion_fast.latent_permute(z, camera)
    """
    chosen = Backend(name)
    previous = getattr(_state, "backend", None)
    _state.backend = chosen.value
    try:
        yield
    finally:
        _state.backend = previous


_AUTOCAST_LIB = None


def run_without_autocast(*ops) -> None:
    """Under torch.autocast, run each custom op as called: its floating inputs keep their dtypes and no
    matrix product inside it is autocast (the PyTorch implementations had computed fp32 calls in bf16,
    returned outputs their fake implementation does not declare and failed on mixed dtypes, while the
    Triton kernels ignore autocast). What autocast does to the tensors around the op is unchanged."""
    global _AUTOCAST_LIB
    if _AUTOCAST_LIB is None:
        _AUTOCAST_LIB = torch.library.Library("lightmotion", "IMPL")
    for op in ops:
        name = op._qualname.split("::")[-1]
        for key in ("AutocastCPU", "AutocastCUDA"):
            excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

            def kernel(*args, _op=op, _excluded=excluded, **kwargs):
                with torch._C._ExcludeDispatchKeyGuard(_excluded):
                    return _op._opoverload(*args, **kwargs)

            _AUTOCAST_LIB.impl(name, kernel, key)


def without_autocast(fn):
    """fn (an op's backward formula in Python) run with autocast off on CPU and CUDA: under a caller's
    autocast its products would otherwise run in bf16/fp16 on the op's fp32 tensors."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), _cuda_autocast_off():
            return fn(*args, **kwargs)
    return run


def _cuda_autocast_off():
    # torch.autocast("cuda", enabled=False) warns on a machine without CUDA; there is nothing to turn off
    return torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()


def tensor_version(t: torch.Tensor) -> int | None:
    """t's in-place version counter, or None for an inference tensor (made under
    `torch.inference_mode()`), which has none: a cache keyed on it cannot tell when such a tensor
    changes, so callers recompute instead of caching (or skip the check)."""
    if torch.compiler.is_compiling():   # Dynamo cannot trace is_inference(); it traces _version
        return t._version
    return None if t.is_inference() else t._version


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(device: torch.device, cpp_op: str | None = None) -> Backend:
    """The implementation an op should run for tensors on `device`.

    `cpp_op` names the op's C++ kernel in torch.ops.lightmotion_cpp, if it has one.
    """
    forced = _forced()
    has_cpp = cpp_op is not None and _ext.has_op(cpp_op)
    if forced is Backend.REFERENCE:
        return Backend.REFERENCE
    if forced is Backend.TRITON:
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"the Triton backend was forced for a tensor on {device}: set TRITON_INTERPRET=1 "
                "before triton is imported to run the kernels on the CPU through the interpreter"
            )
        return Backend.TRITON
    if forced is Backend.CPP:
        if device.type != "cpu":
            raise RuntimeError(f"the C++ backend was forced but the tensor is on {device}; C++ ops are CPU-only")
        if cpp_op is None:
            raise RuntimeError("the C++ backend was forced but this op has no C++ implementation (C++ ops: "
                               "latent_permute, build_fill_map); use 'reference' or 'triton'")
        if not has_cpp:
            raise RuntimeError(f"the C++ backend was forced but torch.ops.lightmotion_cpp has no {cpp_op!r} "
                               f"(extension loaded: {_ext.available()}; {_ext.load_error or 'op not provided'})")
        return Backend.CPP
    if device.type == "cuda" or triton_interpreting():
        return Backend.TRITON
    return Backend.CPP if has_cpp else Backend.REFERENCE


@functools.cache
def kernel_module(name: str):
    """Import lightmotion_fast.kernels.<name> on first use, so triton is imported only when a kernel
    actually runs (and after the caller had the chance to set TRITON_INTERPRET)."""
    return importlib.import_module(f"lightmotion_fast.kernels.{name}")


# ---------------------------------------------------------------------------------------------
# Input checks. Each raises ValueError/TypeError naming the argument, what it got and what was
# expected, so a user sees the problem at the call, not deep inside a kernel.

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Ops whose PyTorch path keeps float64 throughout (gradcheck) take it through the public function too.
FLOAT_DTYPES_AND_64 = (*FLOAT_DTYPES, torch.float64)


def check_tensor(name: str, t, *, ndim: int | Sequence[int] | None = None, dims: str | None = None,
                 dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.ndim not in allowed:
            want = f"[{dims}]" if dims else f"{' or '.join(map(str, allowed))} dimensions"
            raise ValueError(f"{name} must have shape {want} ({'/'.join(map(str, allowed))} dims), "
                             f"got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d).replace('torch.', '') for d in dtypes]}, "
                        f"got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def check_finite_number(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None elsewhere (interpreter, CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return None


def has_tma(device: torch.device) -> bool:
    """Hopper or newer (compute capability 9+): the copy engine's bulk tensor loads (TMA)."""
    capability = device_capability(device)
    return capability is not None and capability >= (9, 0)


def device_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; a small stand-in elsewhere (interpreter, CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
