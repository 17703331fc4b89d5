"""Every `lightmotion::` custom op passes torch.library.opcheck and traces under
torch.compile(fullgraph=True). Ops register their sample inputs in lightmotion_fast.ops.OP_SAMPLES."""
import pytest
import torch

import lightmotion_fast  # noqa: F401  (registers the ops)
from lightmotion_fast.ops import OP_SAMPLES
from lm_testing import flatten_tensors


def _registered_ops():
    import lightmotion_fast.integrations.diffusers  # noqa: F401  (features may register ops too)

    return sorted(name for name in dir(torch.ops.lightmotion) if not name.startswith("_") and
                  isinstance(getattr(torch.ops.lightmotion, name), torch._ops.OpOverloadPacket))


def test_every_registered_op_has_samples():
    missing = [name for name in _registered_ops() if name not in OP_SAMPLES]
    assert not missing, f"ops without sample inputs in lightmotion_fast.ops.OP_SAMPLES: {missing}"
    assert "latent_permute" in _registered_ops()


_flatten = flatten_tensors


def _clone_args(args):
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


@pytest.mark.parametrize("name", sorted(OP_SAMPLES))
def test_opcheck(name, device):
    op, samples = OP_SAMPLES[name]
    for args in samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", sorted(OP_SAMPLES))
def test_torch_compile_fullgraph(name, device):
    op, samples = OP_SAMPLES[name]
    args = samples(device)[0]
    torch._dynamo.reset()
    # On the CPU the inductor backend would spend most of the suite's time compiling C++; aot_eager
    # still traces the whole graph (fullgraph=True fails on any graph break) through the fake kernels.
    compiled = torch.compile(op, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    expected = op(*_clone_args(args))
    got = compiled(*_clone_args(args))
    for e, g in zip(_flatten(expected), _flatten(got), strict=True):
        assert e.shape == g.shape and e.dtype == g.dtype
        torch.testing.assert_close(g, e, equal_nan=True)
