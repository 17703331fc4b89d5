"""patch(pipe) routes peft LoRA Linear layers through multi_lora_linear (specs/multi_lora.md,
"Integration"), on a small real-class CogVideoXTransformer3DModel with three adapters: added through
peft, and loaded through diffusers' load_lora_weights (CogVideoXPipeline) from saved state dicts."""
import pytest
import torch

import lightmotion_fast
from lightmotion_fast.integrations.diffusers import is_patched, patch_state
from lightmotion_fast.integrations.diffusers import lora as lora_feature
from lightmotion_fast.reference.multi_lora import multi_lora_linear_reference

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTERS = {"pan": 4, "orbit": 8, "zoom": 4}  # name -> rank
TOL = dict(atol=2e-5, rtol=2e-5)


def tiny_cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(4)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    ).eval()


def inputs():
    g = torch.Generator().manual_seed(9)
    return dict(hidden_states=torch.randn(1, 2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 16, generator=g), timestep=torch.tensor([5]))


@pytest.fixture
def op_calls(monkeypatch):
    """Records the LoRA count of every call the feature makes to the fused op."""
    calls = []
    real = lora_feature.multi_lora_linear

    def spy(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_feature, "multi_lora_linear", spy)
    return calls


def randomise_lora(model, seed):
    """peft initialises B to zero; give every LoRA weight random values so each adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def with_peft_adapters():
    model = tiny_cogvideox()
    for name, rank in ADAPTERS.items():
        model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS), adapter_name=name)
    randomise_lora(model, 0)
    model.set_adapters(list(ADAPTERS), weights=[1.0, 0.5, 0.8])
    return model


def run(model):
    with torch.no_grad():
        return model(**inputs(), return_dict=False)[0]


def reference_forward(model, norm):
    """The model with every LoRA Linear replaced by the float64 reference of the op."""
    saved = {}
    for module in model.modules():
        if isinstance(module, LoraLinear):
            names = [n for n in module.active_adapters if n in module.lora_A]

            def fwd(x, module=module, names=names):
                base = module.base_layer
                y = multi_lora_linear_reference(
                    x.double(), base.weight.double(), base.bias.double(),
                    [module.lora_A[n].weight.double() for n in names],
                    [module.lora_B[n].weight.double() for n in names],
                    [module.scaling[n] for n in names], norm=norm)
                return y.to(x.dtype)

            saved[module] = fwd
            module.forward = fwd
    try:
        return run(model)
    finally:
        for module in saved:
            del module.forward


def test_patch_none_equals_peft_and_unpatch_restores(op_calls):
    model = with_peft_adapters()
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 4 and all(len(m.active_adapters) == 3 for m in layers)
    expected = run(model)
    lightmotion_fast.patch(model)
    assert "multi_lora" in patch_state(model).installed
    got = run(model)
    assert op_calls == [3] * 4  # every LoRA layer, all three adapters in one call
    torch.testing.assert_close(got, expected, **TOL)
    lightmotion_fast.unpatch(model)
    assert all("forward" not in m.__dict__ for m in layers)  # peft's class forward again
    torch.testing.assert_close(run(model), expected, atol=0, rtol=0)


def test_set_adapters_and_weights_after_patching_are_honoured(op_calls):
    model = with_peft_adapters()
    with lightmotion_fast.patched(model):
        model.set_adapters(["orbit", "zoom"], weights=[0.3, 1.7])
        got = run(model)
        assert op_calls == [2] * 4
        model.disable_adapters()
        got_disabled = run(model)
        assert op_calls == [2] * 4  # disabled adapters: peft's forward (base layer only)
        model.enable_adapters()
    model.set_adapters(["orbit", "zoom"], weights=[0.3, 1.7])
    torch.testing.assert_close(got, run(model), **TOL)
    model.disable_adapters()
    torch.testing.assert_close(got_disabled, run(model), atol=0, rtol=0)


@pytest.mark.parametrize("norm", ["weight", "output"])
def test_normalised_patch_equals_reference(norm, op_calls):
    model = with_peft_adapters()
    expected = reference_forward(model, norm)
    plain = run(model)
    with lightmotion_fast.patched(model, lora_norm=norm):
        got = run(model)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert op_calls == [3] * 4
    assert (got - plain).abs().max() > 1e-3  # the normalisation changes the output


def test_bad_lora_norm_raises():
    model = with_peft_adapters()
    with pytest.raises(ValueError, match="lora_norm must be one of"):
        lightmotion_fast.patch(model, lora_norm="frobenius")
    assert not is_patched(model)


def test_pipeline_load_lora_weights(tmp_path, op_calls):
    """Three LoRAs saved to disk and loaded through CogVideoXPipeline.load_lora_weights."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from peft.utils import get_peft_model_state_dict

    source = with_peft_adapters()
    for name in ADAPTERS:
        CogVideoXPipeline.save_lora_weights(tmp_path / name, get_peft_model_state_dict(source, adapter_name=name))

    torch.manual_seed(5)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tiny_cogvideox(),
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    for name in ADAPTERS:
        pipe.load_lora_weights(tmp_path / name, adapter_name=name)
    pipe.set_adapters(list(ADAPTERS), adapter_weights=[1.0, 0.5, 0.8])

    def call():
        g = torch.Generator().manual_seed(3)
        emb = torch.randn(1, 8, 16, generator=g)
        return pipe(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb), num_frames=5, height=16,
                    width=16, num_inference_steps=2, guidance_scale=2.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames

    expected = call()
    layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 4 and all(len(m.active_adapters) == 3 for m in layers)
    with lightmotion_fast.patched(pipe):
        got = call()
    assert op_calls and set(op_calls) == {3}
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
