"""Shared test setup.

Without CUDA, Triton kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET must
be set before triton is first imported, which is why it happens here, at the top of conftest.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lm_testing import DEVICE, ON_GPU, TOLERANCES, poison_empty  # noqa: E402,F401


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned(monkeypatch):
    """Every output buffer allocated during the test starts poisoned (see poison_empty)."""
    poison_empty(monkeypatch)
