"""LiON-LoRA scaling tokens and the CogVideoX per-LoRA attention fusion processor
(specs/multi_lora.md, "Scaling tokens and per-LoRA attention fusion")."""
import math

import pytest
import torch

import lightmotion_fast
from lightmotion_fast.integrations.diffusers.lion_lora import (
    LionLoraFusionProcessor,
    ScalingTokenEmbedding,
    append_scaling_tokens,
    fourier_embedding,
    lion_lora_fusion_reference,
)

pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

ADAPTERS = {"pan": 4, "orbit": 8, "zoom": 4}
ALPHAS = {"pan": 8, "orbit": 4, "zoom": 4}  # lora_alpha/r = 2, 0.5, 1: the normalisations must see them


def attn_with_adapters():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(4)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    ).eval()
    for name, rank in ADAPTERS.items():
        model.add_adapter(LoraConfig(r=rank, lora_alpha=ALPHAS[name], target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                          adapter_name=name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.set_adapters(list(ADAPTERS), weights=[1.0, 0.6, 0.9])
    return model.transformer_blocks[0].attn1


def test_fourier_embedding_values():
    s = torch.tensor([0.25, 1.0])
    gamma = fourier_embedding(s, 3)
    assert gamma.shape == (2, 6)
    j = torch.arange(3)
    torch.testing.assert_close(gamma[0], torch.cat([torch.sin(2.0**j * math.pi * 0.25), torch.cos(2.0**j * math.pi * 0.25)]))


def test_scaling_tokens_per_lora_linear():
    emb = ScalingTokenEmbedding(num_loras=3, dim=16, num_frequencies=4, s_min=0.1)
    s = torch.tensor([1.0, 0.5, 0.25])
    tokens = emb(s)
    assert tokens.shape == (3, 16)
    gamma = fourier_embedding(s, 4)
    for i in range(3):
        torch.testing.assert_close(tokens[i], emb.proj[i](gamma[i]))
    assert emb(s[None].expand(2, 3)).shape == (2, 3, 16)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([1.0, 0.05, 0.5]), r"\[s_min, 1\]"),
    (torch.tensor([1.0, 1.5, 0.5]), r"\[s_min, 1\]"),
    (torch.tensor([1.0, 0.5]), "one scale per LoRA"),
])
def test_scaling_tokens_bad_inputs(bad, match):
    emb = ScalingTokenEmbedding(num_loras=3, dim=8, s_min=0.1)
    with pytest.raises(ValueError, match=match):
        emb(bad)


def _inputs(attn, n=12, text=8, rope=False, batch=1):
    g = torch.Generator().manual_seed(1)
    d = attn.to_q.base_layer.in_features
    emb = ScalingTokenEmbedding(num_loras=3, dim=d)
    with torch.no_grad():
        tokens = emb(torch.tensor([1.0, 0.5, 0.75]))
    hidden = append_scaling_tokens(torch.randn(batch, n, d, generator=g), tokens)
    enc = torch.randn(batch, text, d, generator=g)
    rot = None
    if rope:
        head_dim = d // attn.heads
        angles = torch.randn(n, head_dim, generator=g)
        rot = (angles.cos(), angles.sin())
    return hidden, enc, rot


@pytest.mark.parametrize("norm", ["none", "weight", "output"])
@pytest.mark.parametrize("rope", [False, True])
def test_fusion_processor_equals_reference_loop(norm, rope, poisoned):
    attn = attn_with_adapters()
    hidden, enc, rot = _inputs(attn, rope=rope, batch=2)  # two samples: `output` is per sample
    with torch.no_grad():
        want_h, want_e = lion_lora_fusion_reference(attn, hidden, enc, list(ADAPTERS), norm=norm, image_rotary_emb=rot)
        with lightmotion_fast.backend("triton"):
            got_h, got_e = LionLoraFusionProcessor(list(ADAPTERS), norm=norm)(attn, hidden, enc, image_rotary_emb=rot,
                                                                                    num_scaling_tokens=3)
    assert got_h.shape == hidden.shape and got_e.shape == enc.shape
    torch.testing.assert_close(got_h, want_h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_e, want_e, atol=1e-4, rtol=1e-4)


def test_fusion_processor_batches_attention_once(monkeypatch):
    attn = attn_with_adapters()
    hidden, enc, _ = _inputs(attn)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(q.shape[0]) or real(q, *a, **k))
    with torch.no_grad():
        LionLoraFusionProcessor(list(ADAPTERS))(attn, hidden, enc, num_scaling_tokens=3)
    assert calls == [3]  # one call, the three branches on the batch axis


def test_fusion_processor_token_count_mismatch():
    attn = attn_with_adapters()
    hidden, enc, rot = _inputs(attn, rope=True)
    with pytest.raises(ValueError, match="num_scaling_tokens must equal the number of adapters"):
        LionLoraFusionProcessor(list(ADAPTERS))(attn, hidden, enc, image_rotary_emb=rot, num_scaling_tokens=2)
    with pytest.raises(ValueError, match=r"\['zoom'\] are active in peft but not among the LiON-fused"):
        LionLoraFusionProcessor(["pan", "orbit"])(attn, hidden, enc, image_rotary_emb=rot, num_scaling_tokens=2)
    with pytest.raises(ValueError, match="not loaded"):
        LionLoraFusionProcessor(["pan", "orbit", "tilt"])(attn, hidden, enc, image_rotary_emb=rot,
                                                            num_scaling_tokens=3)
    with pytest.raises(ValueError, match="norm must be one of"):
        LionLoraFusionProcessor(list(ADAPTERS), norm="output_per_token")
    with pytest.raises(ValueError, match="tokens must have shape"):
        append_scaling_tokens(hidden, torch.randn(3, 5))


def test_fusion_processor_output_norm_is_per_sample():
    """Each sample is normalised on its own: a sample's result does not depend on the others in the
    batch (a batch-wide or per-token norm would change it), and `output` differs from `weight`."""
    attn = attn_with_adapters()
    hidden, enc, rot = _inputs(attn, rope=True, batch=2)
    hidden2 = hidden.clone()
    hidden2[1, :12] *= 5.0  # the second sample only, video tokens 5x larger
    proc = LionLoraFusionProcessor(list(ADAPTERS), norm="output")
    with torch.no_grad():
        h1, e1 = proc(attn, hidden, enc, image_rotary_emb=rot, num_scaling_tokens=len(ADAPTERS))
        h2, e2 = proc(attn, hidden2, enc, image_rotary_emb=rot, num_scaling_tokens=len(ADAPTERS))
        hw, _ = LionLoraFusionProcessor(list(ADAPTERS), norm="weight")(attn, hidden, enc, image_rotary_emb=rot,
                                                                                num_scaling_tokens=len(ADAPTERS))
    torch.testing.assert_close(h2[0], h1[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e2[0], e1[0], atol=1e-5, rtol=1e-5)
    assert (h2[1] - h1[1]).abs().max() > 1e-2
    assert (hw - h1).abs().max() > 1e-3


def _peft_layers(attn):
    return [attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]]


@pytest.mark.parametrize("switch, match", [
    ("merge", "merged into the base weight"),
    ("disable", "disabled"),
    ("subset", r"not active in peft"),
])
def test_fusion_processor_refuses_peft_states_it_would_ignore(switch, match):
    """peft's live switches (merge, disable, set_adapters with a subset) change what the model
    computes; the fusion reads the adapters' weights itself, so without this check it would fuse a
    merged adapter twice or switch a disabled one back on, silently. Each raises a clear error."""
    attn = attn_with_adapters()
    hidden, enc, _ = _inputs(attn)
    proc = LionLoraFusionProcessor(list(ADAPTERS))
    for layer in _peft_layers(attn):
        if switch == "merge":
            layer.merge(adapter_names=list(ADAPTERS))
        elif switch == "disable":
            layer.enable_adapters(False)
        else:
            layer.set_adapter(["pan", "orbit"])
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        proc(attn, hidden, enc, num_scaling_tokens=3)
    for layer in _peft_layers(attn):   # back to the state the fusion was built for: it runs again
        if switch == "merge":
            layer.unmerge()
        elif switch == "disable":
            layer.enable_adapters(True)
        else:
            layer.set_adapter(list(ADAPTERS))
    with torch.no_grad():
        got, _ = proc(attn, hidden, enc, num_scaling_tokens=3)
    assert torch.isfinite(got).all()
