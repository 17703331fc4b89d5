"""LiON-LoRA scaling tokens inside the model's forward: patch(pipe, lion={...}) on CogVideoX (with and
without RoPE) and Wan (issue 15, items 1 and 5; specs/multi_lora.md, corrections of 2026-11-22).
The reference for a whole forward (lion_reference.py) is built from diffusers' and peft's own pieces.
"""
import pytest
import torch

import lightmotion_fast
import tiny_models as tiny
from lion_reference import RANKS, cogvideox, cogvideox_call, embeddings, reference_forward, with_adapters
from lightmotion_fast.integrations.diffusers import is_patched, lion_state, set_lion_scales
from lightmotion_fast.integrations.diffusers.lion_lora import (
    LionLoraFusionProcessor,
    LionLoraWanProcessor,
    ScalingTokenEmbedding,
    append_scaling_tokens,
)

pytest.importorskip("peft")

SCALES = {"pan": 0.5, "orbit": 1.0}
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(autouse=True)
def torch_path(request):
    """The wiring is under test here, not the kernels (test_multi_lora.py, test_lion_lora.py): the
    PyTorch path keeps this file fast; test_triton_backend_matches_reference runs the kernels once."""
    if "triton" in request.node.name:
        yield
        return
    with lightmotion_fast.backend("reference"):
        yield


def run(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)[0]


# -- CogVideoX -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapters", [("pan",), ("pan", "orbit")])
@pytest.mark.parametrize("rope", [False, True])
def test_cogvideox_forward_appends_routes_and_strips(rope, adapters):
    model = with_adapters(cogvideox(rope), adapters)
    embs, scales = embeddings(names=adapters), {a: SCALES[a] for a in adapters}
    inputs = cogvideox_call(rope)
    plain = run(model, inputs)
    want = reference_forward(model, inputs, scales, embs, wan=False)
    lightmotion_fast.patch(model, lion=scales, lion_embeddings=embs)
    got = run(model, inputs)
    assert got.shape == plain.shape
    torch.testing.assert_close(got, want, **TOL)
    assert (got - plain).abs().max() > 1e-3  # the tokens and the fusion change the output
    assert lion_state(model).layout is None  # nothing left behind after the forward


def test_cogvideox_scales_change_between_calls_without_repatching():
    model = with_adapters(cogvideox(False))
    embs = embeddings()
    inputs = cogvideox_call(False)
    new = {"pan": 0.2, "orbit": 1.0}
    want = reference_forward(model, inputs, new, embs, wan=False)
    lightmotion_fast.patch(model, lion=SCALES, lion_embeddings=embs)
    first = run(model, inputs)
    processors = dict(model.attn_processors)
    set_lion_scales(model, {"pan": 0.2})
    second = run(model, inputs)
    assert all(model.attn_processors[k] is v for k, v in processors.items())  # same patch, same processors
    torch.testing.assert_close(second, want, **TOL)
    assert (first - second).abs().max() > 1e-4
    # patch() with the scales now in force changes nothing; the old ones re-patch
    lightmotion_fast.patch(model, lion=new, lion_embeddings=embs)
    assert all(model.attn_processors[k] is v for k, v in processors.items())


def test_cogvideox_scales_per_call_through_attention_kwargs():
    model = with_adapters(cogvideox(True))
    embs = embeddings()
    inputs = cogvideox_call(True)
    want = reference_forward(model, inputs, {"pan": 0.3, "orbit": 1.0}, embs, wan=False)
    lightmotion_fast.patch(model, lion=SCALES, lion_embeddings=embs)
    kwargs = {"lion_scales": {"pan": 0.3}}
    got = run(model, inputs, attention_kwargs=kwargs)
    torch.testing.assert_close(got, want, **TOL)
    assert kwargs == {"lion_scales": {"pan": 0.3}}       # the caller's dict is not changed
    assert lion_state(model).scales["pan"].item() == 0.5  # the patch's scale stays


def test_per_sample_scales():
    """A batch of two samples with their own S equals each sample run alone."""
    model = with_adapters(cogvideox(False))
    lightmotion_fast.patch(model, lion=SCALES, lion_embeddings=embeddings())
    one = cogvideox_call(False)
    two = {k: (torch.cat([v, v]) if k != "timestep" else v.expand(2)) for k, v in one.items()}
    got = run(model, two, attention_kwargs={"lion_scales": {"pan": torch.tensor([0.5, 0.2])}})
    torch.testing.assert_close(got[:1], run(model, one), **TOL)
    torch.testing.assert_close(got[1:], run(model, one, attention_kwargs={"lion_scales": {"pan": 0.2}}), **TOL)
    with pytest.raises(ValueError, match="batch has 1"):
        run(model, one, attention_kwargs={"lion_scales": {"pan": torch.tensor([0.5, 0.2])}})


def test_triton_backend_matches_reference():
    model = with_adapters(cogvideox(True))
    embs = embeddings()
    inputs = cogvideox_call(True)
    want = reference_forward(model, inputs, SCALES, embs, wan=False)
    lightmotion_fast.patch(model, lion=SCALES, lion_embeddings=embs)
    with lightmotion_fast.backend("triton"):
        got = run(model, inputs)
    torch.testing.assert_close(got, want, **TOL)


def test_unpatch_restores_the_model():
    model = with_adapters(cogvideox(False))
    inputs = cogvideox_call(False)
    plain = run(model, inputs)
    processors = dict(model.attn_processors)
    lightmotion_fast.patch(model, lion=SCALES, lion_embeddings=embeddings())
    lightmotion_fast.unpatch(model)
    assert not is_patched(model)
    assert all(model.attn_processors[k] is v for k, v in processors.items())
    torch.testing.assert_close(run(model, inputs), plain, atol=0, rtol=0)


# -- no tokens: a clear error, never a silent misuse ---------------------------------------------------

def test_processor_without_tokens_raises_on_a_model_without_rope():
    """The issue's case: the fusion processor set by hand on a CogVideoX-2B-style model (no RoPE to give
    the count away) used to take the last k video tokens for scaling tokens."""
    model = with_adapters(cogvideox(False))
    model.set_attn_processor(LionLoraFusionProcessor(list(RANKS)))
    with pytest.raises(ValueError, match="found no scaling tokens"):
        run(model, cogvideox_call(False))


def test_processor_direct_call_needs_the_token_count():
    model = with_adapters(cogvideox(False))
    attn = model.transformer_blocks[0].attn1
    hidden = torch.randn(1, 12, 16)
    text = torch.randn(1, 8, 16)
    proc = LionLoraFusionProcessor(list(RANKS))
    with torch.no_grad():
        with pytest.raises(ValueError, match="found no scaling tokens"):
            proc(attn, hidden, text)
        with pytest.raises(ValueError, match="num_scaling_tokens must equal"):
            proc(attn, hidden, text, num_scaling_tokens=3)
        tokens = embeddings()["pan"](torch.tensor([0.5]))
        h, e = proc(attn, append_scaling_tokens(hidden, torch.cat([tokens, tokens])), text, num_scaling_tokens=2)
    assert h.shape == (1, 14, 16) and e.shape == text.shape


def test_installed_processor_outside_the_forward_raises():
    model = with_adapters(cogvideox(False))
    lightmotion_fast.patch(model, lion=SCALES, lion_embeddings=embeddings())
    attn = model.transformer_blocks[0].attn1
    with torch.no_grad(), pytest.raises(ValueError, match="found no scaling tokens"):
        attn(torch.randn(1, 14, 16), torch.randn(1, 8, 16))


@pytest.mark.parametrize("options, error, match", [
    (dict(lion={"pan": 0.5}), ValueError, "no scaling-token embedding"),
    (dict(lion={"tilt": 0.5}, lion_embeddings={"tilt": None}), ValueError, "not loaded"),
    (dict(lion={"pan": 1.5}, lion_embeddings="E"), TypeError, "lion_embeddings must be a dict"),
    (dict(lion={"pan": 1.5}, lion_embeddings="W"), ValueError, r"\[s_min, 1\]"),
    (dict(lion={"pan": 0.5}, lion_embeddings="narrow"), ValueError, "width 8"),
    (dict(lion={"pan": 0.5}, lion_embeddings={"pan": torch.nn.Linear(8, 16)}), TypeError, "num_loras=1"),
    (dict(lion=[0.5]), ValueError, "non-empty dict"),
    (dict(lion_embeddings={}), ValueError, "needs lion="),
])
def test_bad_options(options, error, match):
    model = with_adapters(cogvideox(False))
    emb = options.get("lion_embeddings")
    if emb == "E":
        options["lion_embeddings"] = [embeddings()["pan"]]
    elif emb == "W":
        options["lion_embeddings"] = embeddings()
    elif emb == "narrow":
        options["lion_embeddings"] = {"pan": ScalingTokenEmbedding(1, 8)}
    with pytest.raises(error, match=match):
        lightmotion_fast.patch(model, **options)
    assert not is_patched(model)


def test_adapter_missing_on_a_projection():
    from peft import LoraConfig

    model = cogvideox(False)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]), adapter_name="pan")
    with pytest.raises(ValueError, match=r"block 0's attn1\.to_out\.0"):
        lightmotion_fast.patch(model, lion={"pan": 0.5}, lion_embeddings=embeddings(names=("pan",)))
    assert not is_patched(model)


def test_lion_option_rejected_on_other_families():
    with pytest.raises(ValueError, match="applies to the cogvideox, wan model families"):
        lightmotion_fast.patch(tiny.tiny_unet2d(), lion=SCALES)


def test_set_scales_errors():
    model = with_adapters(cogvideox(False))
    with pytest.raises(ValueError, match="not patched with lion"):
        set_lion_scales(model, {"pan": 0.5})
    lightmotion_fast.patch(model, lion=SCALES, lion_embeddings=embeddings())
    with pytest.raises(ValueError, match="does not fuse"):
        set_lion_scales(model, {"zoom": 0.5})
    with pytest.raises(ValueError, match=r"\[s_min, 1\]"):
        set_lion_scales(model, {"pan": 0.01})


# -- Wan -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapters", [("pan",), ("pan", "orbit")])
def test_wan_forward_appends_routes_and_strips(adapters):
    model = with_adapters(tiny.tiny_wan(), adapters)
    embs, scales = embeddings(names=adapters), {a: SCALES[a] for a in adapters}
    inputs = tiny.wan_inputs()
    plain = run(model, inputs)
    want = reference_forward(model, inputs, scales, embs, wan=True)
    lightmotion_fast.patch(model, lion=scales, lion_embeddings=embs)
    assert all(isinstance(b.attn1.processor, LionLoraWanProcessor) for b in model.blocks)
    got = run(model, inputs)
    assert got.shape == plain.shape
    torch.testing.assert_close(got, want, **TOL)
    assert (got - plain).abs().max() > 1e-3
    set_lion_scales(model, {"pan": 0.2})
    assert (run(model, inputs) - got).abs().max() > 1e-4
    lightmotion_fast.unpatch(model)
    torch.testing.assert_close(run(model, inputs), plain, atol=0, rtol=0)


def test_wan_per_token_timesteps_not_supported():
    model = with_adapters(tiny.tiny_wan())
    lightmotion_fast.patch(model, lion=SCALES, lion_embeddings=embeddings())
    inputs = tiny.wan_inputs()
    inputs["timestep"] = torch.full((1, 48), 5)
    with pytest.raises(NotImplementedError, match="per-token timesteps"):
        run(model, inputs)


# -- a pipeline end to end -----------------------------------------------------------------------------

def test_cogvideox_pipeline_end_to_end():
    """The README's use: LoRAs through peft, patch(pipe, lion=...), pipe(...), scales changed between calls."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(5)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=with_adapters(cogvideox(False)),
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def call(**kwargs):
        emb = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(3))
        return pipe(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb), num_frames=5, height=16,
                    width=16, num_inference_steps=2, guidance_scale=2.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kwargs).frames

    plain = call()
    lightmotion_fast.patch(pipe, lion=SCALES, lion_embeddings=embeddings())
    first = call()
    set_lion_scales(pipe, {"orbit": 0.4})
    second = call()
    third = call(attention_kwargs={"lion_scales": {"orbit": 1.0}})
    assert first.shape == plain.shape and torch.isfinite(second).all()
    assert (first - plain).abs().max() > 1e-4 and (second - first).abs().max() > 1e-5
    torch.testing.assert_close(third, first, **TOL)


def test_camera_and_lion_on_cogvideox_refuse_to_drop_the_subject_capture():
    """CogVideoX's attn1 is its text attention too: camera= captures the subject mask there, and lion=
    replaces that processor outright. Together (without a mask) the capture would silently be lost and
    the edit would treat the whole frame as background: a clear error instead, nothing left patched.
    With a given background mask nothing is captured, and both install."""
    pipe = tiny.tiny_cogvideox_pipeline()
    for seed, (name, r) in enumerate([("pan", 4), ("orbit", 8)]):
        tiny.add_random_lora(pipe.transformer, r, seed, name)
    pipe.transformer.set_adapters(["pan", "orbit"])
    cam = lightmotion_fast.CameraMotion(pan=(0.25, 0.0))
    with pytest.raises(ValueError, match="give the background mask="):
        lightmotion_fast.patch(pipe, camera=cam, lion=SCALES, lion_embeddings=embeddings())
    assert not is_patched(pipe)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    lightmotion_fast.patch(pipe, camera=cam, mask=mask, lion=SCALES, lion_embeddings=embeddings())
    assert {"lightmotion", "lion"} <= set(lightmotion_fast.patch_state(pipe).installed)
    lightmotion_fast.unpatch(pipe)


def test_fusion_refuses_what_it_would_silently_leave_out():
    """The fusion reads the named adapters' weights itself: another adapter active in peft on the same
    projections, or LoRA dropout while training, would silently be left out (the output ignored a third
    adapter; dropout was off). Both are clear errors; eval mode and set_adapters to the fused ones run."""
    from peft import LoraConfig

    model = with_adapters(cogvideox(False))
    lightmotion_fast.patch(model, lion=SCALES, lion_embeddings=embeddings())
    inputs = cogvideox_call(False)
    tiny.add_random_lora(model, 2, 9, "style")
    model.set_adapters(["pan", "orbit", "style"])
    with pytest.raises(ValueError, match=r"\['style'\] are active in peft but not among the LiON-fused"):
        run(model, inputs)
    model.set_adapters(["pan", "orbit"])
    run(model, inputs)
    lightmotion_fast.unpatch(model)

    model = cogvideox(False)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, lora_dropout=0.5,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="pan")
    lightmotion_fast.patch(model, lion={"pan": 0.5}, lion_embeddings=embeddings(names=("pan",)))
    model.train()
    with pytest.raises(NotImplementedError, match="LoRA dropout in training mode"):
        run(model, inputs)
    model.eval()
    run(model, inputs)
