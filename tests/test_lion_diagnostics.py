"""LiON-LoRA diagnostic (issue 15 item 3): per-layer update and output norms and the cosine similarity
of the adapters' outputs, on the tiny CogVideoX with peft adapters of known construction."""
import pytest
import torch
from tiny_models import add_random_lora, cogvideox_inputs, tiny_cogvideox

from lightmotion_fast.diagnostics import lion_diagnostics
from lightmotion_fast.diagnostics.lion import layer_stats

pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # several adapters: intended


def lora_layers(model):
    from peft.tuners.lora.layer import Linear

    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def two_adapters(alpha_second=4):
    """'first' random; 'second' added with rank 4 and lora_alpha=alpha_second, its weights set by the test."""
    model = add_random_lora(tiny_cogvideox(), rank=4, seed=1, name="first")
    model.add_adapter(LoraConfig(r=4, lora_alpha=alpha_second, target_modules=TARGETS), adapter_name="second")
    model.set_adapters(["first", "second"])
    return model


def test_scaled_copy_gives_norm_ratio_and_cosine_one():
    """'second' = 'first' with B scaled by 3 and lora_alpha/r doubled: its update and every output are
    6x the first's (the effective norm includes lora_alpha/r) and point the same way (cosine 1)."""
    model = two_adapters(alpha_second=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A["second"].weight.copy_(layer.lora_A["first"].weight)
            layer.lora_B["second"].weight.copy_(3 * layer.lora_B["first"].weight)
    report = lion_diagnostics(model, cogvideox_inputs())
    assert len(report.layers) == 8 and report.adapters == ("first", "second")  # 2 blocks x 4 projections
    for layer in report.layers:
        assert layer.weight_norms[1] / layer.weight_norms[0] == pytest.approx(6.0, rel=1e-6)
        for per_sample in layer.output_norms:
            assert per_sample[0] > 0 and per_sample[1] / per_sample[0] == pytest.approx(6.0, rel=1e-6)
        assert layer.mean_cosine()[0][1] == pytest.approx(1.0, abs=1e-6)
        assert layer.mean_cosine()[0][0] == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_outputs_give_cosine_zero():
    """'first' writes only the first half of each layer's output channels, 'second' only the second
    half: their outputs are orthogonal in every layer and sample whatever the input."""
    model = two_adapters()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            half = layer.out_features // 2
            layer.lora_A["second"].weight.copy_(torch.randn(layer.lora_A["second"].weight.shape, generator=g))
            b_second = torch.randn(layer.lora_B["second"].weight.shape, generator=g)
            b_second[:half] = 0
            layer.lora_B["second"].weight.copy_(b_second)
            layer.lora_B["first"].weight[half:] = 0
    inputs = cogvideox_inputs()
    inputs = {k: torch.cat([v, 2 * v]) if k != "timestep" else torch.cat([v, v]) for k, v in inputs.items()}
    report = lion_diagnostics(model, inputs)
    for layer in report.layers:
        assert len(layer.cosine) == 2  # two samples
        for per_sample in layer.cosine:
            assert per_sample[0][1] == pytest.approx(0.0, abs=1e-12)
            assert per_sample[1][0] == pytest.approx(0.0, abs=1e-12)
        assert min(min(s) for s in layer.output_norms) > 0


def test_values_equal_explicit_float64():
    """One layer's statistics against their definitions, on the input that layer saw."""
    model = add_random_lora(two_adapters(alpha_second=2), rank=4, seed=3, name="third")
    model.set_adapters(["first", "second", "third"])
    layers = lora_layers(model)
    name = "transformer_blocks.1.attn1.to_v"
    seen = []
    handle = layers[name].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    inputs = cogvideox_inputs()
    inputs = {k: torch.cat([v, -v]) if k != "timestep" else torch.cat([v, v]) for k, v in inputs.items()}
    report = lion_diagnostics(model, inputs, adapters=["second", "first"])
    handle.remove()
    stats = [s for s in report.layers if s.name == name]
    assert len(stats) == 1 and stats[0].adapters == ("second", "first") and len(seen) == 1
    layer, x = layers[name], seen[0].double()
    gammas = {"second": 2 / 4, "first": 1.0}  # lora_alpha / r
    outs, weights = [], []
    for a in ("second", "first"):
        la, lb = layer.lora_A[a].weight.double(), layer.lora_B[a].weight.double()
        weights.append(gammas[a] * torch.linalg.matrix_norm(lb @ la))
        outs.append(gammas[a] * (x @ la.T) @ lb.T)                                 # [b t d_out]
    torch.testing.assert_close(torch.tensor(stats[0].weight_norms, dtype=torch.float64), torch.stack(weights))
    for b in range(2):
        want = torch.stack([o[b].norm() for o in outs])
        torch.testing.assert_close(torch.tensor(stats[0].output_norms[b], dtype=torch.float64), want)
        cos = (outs[0][b] * outs[1][b]).sum() / (want[0] * want[1])
        assert stats[0].cosine[b][0][1] == pytest.approx(cos.item(), abs=1e-12)
    assert stats[0] == layer_stats(name, layer, seen[0], ["second", "first"])


def test_table_and_plot_written(tmp_path):
    model = two_adapters()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["second"].weight.copy_(torch.randn(layer.lora_B["second"].weight.shape, generator=g))
    report = lion_diagnostics(model, cogvideox_inputs())
    table = report.table()
    lines = table.splitlines()
    assert len(lines) == 1 + len(report.layers)
    assert "cos first·second" in lines[0] and "‖ΔW‖ first" in lines[0] and "‖ΔWx‖ second" in lines[0]
    assert lines[1].startswith("transformer_blocks.0.attn1.to_q")
    path = report.plot(tmp_path / "plots" / "lion.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="no peft LoRA layer"):
        lion_diagnostics(tiny_cogvideox(), cogvideox_inputs())
    model = two_adapters()
    with pytest.raises(ValueError, match=r"adapters \['zoom'\] are not loaded"):
        lion_diagnostics(model, cogvideox_inputs(), adapters=["first", "zoom"])
    with pytest.raises(ValueError, match="must be a list"):
        lion_diagnostics(model, cogvideox_inputs(), adapters="first")
