"""What users do to patched pipelines (issue 14 items 1, 3, 4, 6, 7, 9, 10, 11, 15), on tiny real-class
diffusers models with random weights: other pipelines of a family, copies, saving, patching twice,
changes made while patched, options that don't apply, bad LightMotion inputs, torch.compile, help()."""
import copy
import io
import json
import os

import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.integrations import diffusers as lmd
from lightmotion_fast.integrations.diffusers import lightmotion as lmi
from lightmotion_fast.integrations.diffusers import registry

import tiny_models as tiny

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402

IDENTITY = lm.CameraMotion()
CAM = lm.CameraMotion(pan=(0.25, 0.0))


def _wrapped_lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLinear) and "forward" in vars(m)]


def _lora_unet():
    return tiny.add_random_lora(tiny.tiny_unet2d())


@pytest.fixture(scope="module")
def pipe():
    return tiny.tiny_animatediff_pipeline()


# -- 1: the sampler follows the timesteps the pipeline runs --------------------------------------------

@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@torch.no_grad()
def test_video_to_video_strength_below_one_identity_camera_changes_nothing(scheduler):
    """Identity camera, η = 0: the edit is the identity and the correction is the plain deterministic
    step, so the patched video equals the unpatched one only if the correction's coefficients are
    those of the timesteps the pipeline really runs (strength 0.5 starts half-way into the schedule)."""
    from diffusers import EulerDiscreteScheduler

    sched = None
    if scheduler == "euler":
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1)
    v2v = tiny.tiny_animatediff_v2v_pipeline(sched)
    base = v2v(**tiny.animatediff_v2v_inputs(strength=0.5)).frames
    with lm.patched(v2v, camera=IDENTITY, eta=0.0, edit_step=1, correction="stochastic", correction_steps=1):
        out = v2v(**tiny.animatediff_v2v_inputs(strength=0.5)).frames
        record = lmi.sampler_state(v2v).record
    assert record["edit_index"] == 2           # 4 steps at strength 0.5: the run is steps 2, 3
    torch.testing.assert_close(out, base, atol=1e-5, rtol=0)


def test_renoise_with_a_partial_schedule_is_a_clear_error():
    v2v = tiny.tiny_animatediff_v2v_pipeline()
    with lm.patched(v2v, camera=CAM, correction="renoise", edit_step=1):
        with pytest.raises(ValueError, match="renoise.*stochastic"):
            v2v(**tiny.animatediff_v2v_inputs(strength=0.5))


# -- 3: copies come out unpatched -------------------------------------------------------------------------

@torch.no_grad()
def test_deepcopy_of_a_patched_model_is_independent_and_unpatched():
    unet = _lora_unet()
    x = tiny.unet2d_inputs()
    reference = unet(**x).sample
    lm.patch(unet)
    clone = copy.deepcopy(unet)
    assert lm.is_patched(unet) and not lm.is_patched(clone)
    assert not _wrapped_lora_layers(clone) and len(_wrapped_lora_layers(unet)) > 0
    for name, p in clone.named_parameters():       # the copy runs its own weights
        if "lora_B" in name:
            p.zero_()
    without_lora = clone(**x).sample
    unet.disable_adapters()
    base = unet(**x).sample
    unet.enable_adapters()
    torch.testing.assert_close(without_lora, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(unet(**x).sample, reference, atol=1e-5, rtol=1e-5)
    lm.unpatch(clone)                               # harmless, and leaves the original alone
    assert lm.is_patched(unet) and len(_wrapped_lora_layers(unet)) > 0
    lm.unpatch(unet)
    assert not lm.is_patched(unet) and not _wrapped_lora_layers(unet)


@torch.no_grad()
def test_pickle_of_a_patched_model_loads_unpatched():
    unet = lm.patch(_lora_unet())
    buffer = io.BytesIO()
    torch.save(unet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert lm.is_patched(unet) and not lm.is_patched(loaded) and not _wrapped_lora_layers(loaded)
    x = tiny.unet2d_inputs()
    torch.testing.assert_close(loaded(**x).sample, unet(**x).sample, atol=1e-5, rtol=1e-5)


def test_deepcopy_of_a_lightmotion_patched_pipeline(pipe):
    scheduler = pipe.scheduler
    with lm.patched(pipe, camera=CAM):
        clone = copy.deepcopy(pipe)                 # used to recurse forever
        shallow = copy.copy(pipe.scheduler)
        assert lm.is_patched(pipe) and not lm.is_patched(clone)
        assert lmi.sampler_state(pipe) is not None and lmi.sampler_state(clone) is None
        for s in (clone.scheduler, shallow):
            assert type(s) is type(scheduler) and not {"step", "set_timesteps"} & set(vars(s))
        assert "step" in vars(pipe.scheduler)       # the original is still patched
        assert not any(isinstance(p, lmi._CrossAttentionCapture) for p in clone.unet.attn_processors.values())
    assert not {"step", "set_timesteps"} & set(vars(scheduler))


# -- 4: saving writes what the unpatched object writes ---------------------------------------------------

def _tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_save_pretrained_of_patched_pipeline_and_model_equals_unpatched(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "plain")
    with lm.patched(pipe, camera=CAM):
        pipe.save_pretrained(tmp_path / "patched")
        assert lm.is_patched(pipe)                  # saving does not unpatch
    plain, patched = _tree(tmp_path / "plain"), _tree(tmp_path / "patched")
    assert plain.keys() == patched.keys() and all(plain[k] == patched[k] for k in plain)
    index = json.loads(patched["model_index.json"])
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    from diffusers import AnimateDiffPipeline

    reloaded = AnimateDiffPipeline.from_pretrained(tmp_path / "patched", text_encoder=None, tokenizer=None)
    assert type(reloaded.scheduler) is type(pipe.scheduler)

    unet = _lora_unet()
    unet.save_pretrained(tmp_path / "unet_plain")
    with lm.patched(unet, lora_norm="weight"):
        unet.save_pretrained(tmp_path / "unet_patched")
    assert _tree(tmp_path / "unet_plain") == _tree(tmp_path / "unet_patched")


# -- 6: one patch per model, exact unpatch in every order ------------------------------------------------

@pytest.mark.parametrize("order", ["pipe_first", "unet_first"])
def test_pipe_and_unet_handles_share_one_patch(order):
    model = _lora_unet()

    class Pipe:   # a pipeline-like holder: what find_model sees
        unet = model

    holder = Pipe()
    lm.patch(holder, lora_norm="weight")
    assert lm.is_patched(model) and lm.patch_state(model).options == {"lora_norm": "weight"}
    lm.patch(model)                                     # other options through the other handle: replaces
    assert lm.patch_state(holder).options == {} and lm.patch_state(holder).pipe is model
    handles = (holder, model) if order == "pipe_first" else (model, holder)
    lm.unpatch(handles[0])
    assert not lm.is_patched(holder) and not lm.is_patched(model) and not _wrapped_lora_layers(model)
    lm.unpatch(handles[1])                              # nothing left: harmless
    assert not _wrapped_lora_layers(model)


def test_nested_patched_suspends_and_restores_the_outer_patch():
    model = _lora_unet()
    with lm.patched(model, lora_norm="weight"):
        outer = lm.patch_state(model)
        outer_forwards = {id(m): m.forward for m in _wrapped_lora_layers(model)}
        with lm.patched(model, lora_norm="output"):
            assert lm.patch_state(model).options == {"lora_norm": "output"}
        assert lm.patch_state(model) is outer           # the outer patch is back, with its own objects
        assert {id(m): m.forward for m in _wrapped_lora_layers(model)} == outer_forwards
        with lm.patched(model, lora_norm="weight"):     # same options: changes nothing
            assert lm.patch_state(model) is outer
        assert lm.patch_state(model) is outer
    assert not lm.is_patched(model) and not _wrapped_lora_layers(model)


# -- 7: unpatch takes back only what patch installed -----------------------------------------------------

def test_user_changes_while_patched_survive_unpatch(pipe):
    from diffusers import AnimateDiffVideoToVideoPipeline, DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    original = pipe.scheduler
    lm.patch(pipe, camera=CAM)
    derived = AnimateDiffVideoToVideoPipeline.from_pipe(pipe)
    assert tuple(derived.config.scheduler) == ("diffusers", "DDIMScheduler")
    users = DDIMScheduler.from_config(original.config, timestep_spacing="trailing")
    pipe.scheduler = users
    with pytest.warns(UserWarning, match="scheduler was replaced"):   # camera control is not silently gone
        pipe(**tiny.animatediff_inputs(frames=2, steps=2))
    processor = AttnProcessor2_0()
    pipe.unet.set_attn_processor(processor)
    lm.unpatch(pipe)
    assert pipe.scheduler is users and all(p is processor for p in pipe.unet.attn_processors.values())
    assert not {"step", "set_timesteps", "scale_model_input"} & set(vars(original))
    assert derived.scheduler is original and not lm.is_patched(derived)
    pipe.scheduler = original
    pipe.unet.set_default_attn_processor()


def test_forward_wrapped_again_by_the_user_passes_through_after_unpatch():
    model = _lora_unet()
    x = tiny.unet2d_inputs()
    with torch.no_grad():
        reference = model(**x).sample
    lm.patch(model, lora_norm="weight")
    layer = _wrapped_lora_layers(model)[0]
    ours = layer.forward
    layer.forward = lambda *a, **k: ours(*a, **k)      # a user hook on top of ours
    lm.unpatch(model)
    assert "forward" in vars(layer)                     # the user's hook stays ...
    with torch.no_grad():
        torch.testing.assert_close(model(**x).sample, reference, atol=1e-6, rtol=0)   # ... and ours is inert


# -- 9: options that do nothing are errors; patches that install nothing warn -----------------------------

def test_option_for_another_family_is_an_error(pipe):
    with pytest.raises(ValueError, match=r"camera=.*animatediff, cogvideox, svd, wan.*UNet2DConditionModel"):
        lm.patch(tiny.tiny_unet2d(), camera=CAM)
    with pytest.raises(ValueError, match=r"trajectories=.*svd.*UNetMotionModel"):
        lm.patch(pipe, trajectories=torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match=r"without camera="):
        lm.patch(pipe, edit_step=2)
    assert not lm.is_patched(pipe)


def test_patch_that_installs_nothing_warns_and_leaves_unpatched(pipe):
    with pytest.warns(UserWarning, match="installed nothing"):
        lm.patch(pipe)
    assert not lm.is_patched(pipe) and lm.patch_state(pipe) is None


def test_patch_accepts_a_compiled_model():
    model = _lora_unet()
    compiled = torch.compile(model)
    lm.patch(compiled)
    assert lm.is_patched(compiled) and lm.is_patched(model) and _wrapped_lora_layers(model)
    lm.unpatch(compiled)
    assert not _wrapped_lora_layers(model)


# -- 10: LightMotion inputs -------------------------------------------------------------------------------

def test_subject_tokens_checked(pipe):
    with pytest.raises(TypeError, match="subject_tokens.*word 'dog'"):
        lm.patch(pipe, camera=CAM, subject_tokens=["dog"])
    with pytest.raises(TypeError, match="subject_tokens"):
        lm.patch(pipe, camera=CAM, subject_tokens=5)
    with pytest.raises(ValueError, match="subject_tokens"):
        lm.patch(pipe, camera=CAM, subject_tokens=[-3])
    import numpy as np

    with lm.patched(pipe, camera=CAM, subject_tokens=[np.int64(1), 999], correction=None):
        with pytest.raises(ValueError, match=r"subject_tokens must be token positions < 7"):
            pipe(**tiny.animatediff_inputs(frames=2, steps=2))


def test_edit_step_past_the_schedule_and_inverse_scheduler(pipe):
    from diffusers import DDIMInverseScheduler

    with lm.patched(pipe, camera=CAM, edit_step=1000, correction=None):
        with pytest.raises(ValueError, match="edit_step=1000 is past the schedule"):
            pipe(**tiny.animatediff_inputs(frames=2, steps=2))
    original = pipe.scheduler
    pipe.scheduler = DDIMInverseScheduler.from_config(original.config)
    try:
        with pytest.raises(ValueError, match="inversion scheduler"):
            lm.patch(pipe, camera=CAM, correction=None)
    finally:
        pipe.scheduler = original


def test_wrong_mask_shape_fails_before_the_first_unet_step(pipe):
    calls = []
    lm.patch(pipe, camera=CAM, mask=torch.ones(3, 5, 5, dtype=torch.bool), edit_step=1)
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"mask must have shape \[2, 16, 16\]"):
            pipe(**tiny.animatediff_inputs(frames=2, steps=2))
    finally:
        lm.unpatch(pipe)
        pipe.unet._forward_pre_hooks.clear()
    assert calls == []


# -- 11: pure-module patches compile fullgraph ------------------------------------------------------------

@pytest.mark.parametrize("norm", ["none", "weight"])
def test_lora_patched_unet_compiles_fullgraph(norm):
    torch._dynamo.reset()
    model = lm.patch(_lora_unet(), lora_norm=norm)
    x = tiny.unet2d_inputs()
    with torch.no_grad():
        eager = model(**x).sample
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**x).sample
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_ip_adapter_patched_unet_compiles_fullgraph():
    from test_integration_ip_adapter import install_ip_adapters, tiny_unet, unet_inputs

    torch._dynamo.reset()
    unet = lm.patch(install_ip_adapters(tiny_unet()))
    assert "ip_adapter" in lm.patch_state(unet).installed
    sample, text, image_embeds = unet_inputs()

    def run(model):
        return model(sample, 10, encoder_hidden_states=text,
                     added_cond_kwargs={"image_embeds": image_embeds}).sample

    with torch.no_grad():
        eager = run(unet)
        compiled = run(torch.compile(unet, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_lightmotion_capture_on_the_unet_compiles_fullgraph():
    """LightMotion's model-side patch (the cross-attention capture) traces whole, and records the same maps."""
    torch._dynamo.reset()
    pipe = tiny.tiny_animatediff_pipeline()
    lm.patch(pipe, camera=CAM)
    x = tiny.unet_motion_inputs(frames=2)
    x["encoder_hidden_states"] = x["encoder_hidden_states"][:2]
    state = lmi.sampler_state(pipe)
    state.capturing = True
    with torch.no_grad():
        eager = pipe.unet(**x).sample
        eager_maps = {k: v[0].clone() for k, v in state.maps.items()}
        state.maps.clear()
        compiled = torch.compile(pipe.unet, fullgraph=True, backend="aot_eager")(**x).sample
    lm.unpatch(pipe)
    assert eager_maps and eager_maps.keys() == state.maps.keys()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for k in eager_maps:
        torch.testing.assert_close(state.maps[k][0], eager_maps[k], atol=1e-6, rtol=1e-5)


# -- 15: help, exports, py.typed -------------------------------------------------------------------------

def test_help_lists_every_option_with_family():
    doc = lm.patch.__doc__
    for feature in registry.FEATURES:
        assert f"[{feature.name}] applies to" in doc
        for opt in feature.options:
            if isinstance(opt, registry.Option):
                assert f"{opt.name}: {opt.type} = {opt.default}" in doc
            else:
                assert opt in doc
    assert "applies to animatediff, svd" in doc and lm.is_patched is lmd.is_patched
    assert lm.patch_state is lmd.patch_state and "is_patched" in lm.__all__
    assert os.path.exists(os.path.join(os.path.dirname(lm.__file__), "py.typed"))


def test_readme_ops_snippet_runs_as_written():
    """The README's "ops underneath" block, run as written (on the test device instead of "cuda": on a
    GPU machine that is a CUDA latent, where the fill map must be built on the latent's device)."""
    from lm_testing import DEVICE

    readme = open(os.path.join(os.path.dirname(os.path.dirname(lm.__file__)), "README.md")).read()
    block = readme.split("The ops underneath:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "device=z.device" in block
    scope = {"torch": torch, "lm": lm}
    exec(block.replace('device="cuda"', f'device="{DEVICE}"'), scope)
    assert scope["edited"].shape == scope["z"].shape and scope["x_prev"].device == scope["z"].device


def test_lightmotion_capture_keeps_module_processors_in_the_model():
    """`camera=` wraps the text-attention processors to capture the subject mask. Around processors that
    are modules (camera-token, IP-Adapter) the wrapper shares their parameters, buffers and children:
    while patched the U-Net's parameters(), state_dict() (the same keys and tensors) and .to() still
    reach them (a plain wrapper made diffusers drop them from the model), and unpatch gives them back."""
    from lightmotion_fast.integrations.diffusers.ip_adapter import install_camera_token_processors

    pipe = tiny.tiny_animatediff_pipeline()
    procs = install_camera_token_processors(pipe.unet, camera_dim=6, zero_init=False)
    proc = next(iter(procs.values()))
    params = [id(p) for p in pipe.unet.parameters()]
    state = pipe.unet.state_dict()
    lm.patch(pipe, camera=CAM)
    assert [id(p) for p in pipe.unet.parameters()] == params
    patched_state = pipe.unet.state_dict()
    assert list(patched_state) == list(state) and all(patched_state[k] is not None for k in state)
    assert any(p is proc.to_k_cam.weight for p in pipe.unet.parameters())
    pipe.unet.to(torch.float64)
    assert proc.to_k_cam.weight.dtype == torch.float64
    lm.unpatch(pipe)
    assert [type(p) for p in pipe.unet.attn_processors.values()].count(type(proc)) == len(procs)
    assert proc.to_k_cam.weight.dtype == torch.float64 and len(pipe.unet.state_dict()) == len(state)


def test_repatching_with_a_changed_options_container_applies_the_change():
    """patch keeps its own copy of container options: the same list changed by the caller and passed
    again is a new option value (it had compared equal to itself and changed nothing)."""
    pipe = tiny.tiny_animatediff_pipeline()
    tokens = [1, 2]
    lm.patch(pipe, camera=CAM, subject_tokens=tokens)
    tokens.append(3)
    assert list(lm.patch_state(pipe).options["subject_tokens"]) == [1, 2]
    lm.patch(pipe, camera=CAM, subject_tokens=tokens)
    assert list(lm.patch_state(pipe).options["subject_tokens"]) == [1, 2, 3]
    lm.patch(pipe, camera=CAM, subject_tokens=[1, 2, 3])     # equal values: kept as is
    assert list(lm.patch_state(pipe).options["subject_tokens"]) == [1, 2, 3]
    lm.unpatch(pipe)
