"""Constants and helpers shared by the tests: `from lm_testing import DEVICE, TOLERANCES, poison_empty`.

(Not in conftest.py: with benchmarks/conftest.py also on the path, `from conftest import ...` is ambiguous.)
"""
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# (dtype, atol, rtol) for outputs that go through arithmetic; gathers compare exactly.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def poison_empty(monkeypatch):
    """For the rest of the test, torch.empty / empty_like / Tensor.new_empty return buffers filled with
    NaN (floating point) or the largest value (integer, bool True), so an output element that a kernel
    never writes fails the comparison instead of passing as a lucky zero."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point() or t.is_complex():
            return t.fill_(float("nan"))
        if t.dtype == torch.bool:
            return t.fill_(True)
        return t.fill_(torch.iinfo(t.dtype).max)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(real_new_empty(self, *a, **k)))
