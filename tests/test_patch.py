"""patch / unpatch / patched: adapter registry, idempotence, exact restore, clear errors."""
import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.integrations import diffusers as lmd
from lightmotion_fast.integrations.diffusers import registry

import tiny_models as tiny

MODELS = {
    "animatediff": (tiny.tiny_unet_motion, tiny.unet_motion_inputs),
    "svd": (tiny.tiny_svd_unet, tiny.svd_unet_inputs),
    "cogvideox": (tiny.tiny_cogvideox, tiny.cogvideox_inputs),
    "wan": (tiny.tiny_wan, tiny.wan_inputs),
    "unet2d": (tiny.tiny_unet2d, tiny.unet2d_inputs),
}


class _Marker(torch.nn.Module):
    """Stand-in processor used by the probe feature: scales the original processor's output by 2."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, temb=None,
                 image_rotary_emb=None):
        # diffusers' Attention passes only the keyword arguments a processor's signature names;
        # WanAttention passes its rotary embedding positionally (it lands in args).
        extra = {k: v for k, v in dict(temb=temb, image_rotary_emb=image_rotary_emb).items() if v is not None}
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **extra)
        return tuple(2 * o for o in out) if isinstance(out, tuple) else 2 * out


@pytest.fixture
def probe_feature():
    """A feature that changes every attention processor, one forward, and a plain attribute, so that
    the undo log is exercised on real diffusers modules whatever other features are registered."""
    def install(ctx):
        for module in ctx.model.modules():
            if hasattr(module, "set_processor") and hasattr(module, "processor"):
                ctx.set_processor(module, _Marker(module.processor))
        ctx.wrap_forward(ctx.model, lambda original, *a, **k: original(*a, **k))
        ctx.set_attr(ctx.model, "lightmotion_probe", ctx.options.get("probe_value", 1))

    feature = registry.register_feature(registry.Feature("probe", install, options=("probe_value",)))
    yield feature
    registry.FEATURES.remove(feature)


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}


@pytest.mark.parametrize("family", list(MODELS))
def test_adapter_found_for_each_family(family):
    build, _ = MODELS[family]
    assert registry.find_adapter(build()).name == family


@pytest.mark.parametrize("family", list(MODELS))
@torch.no_grad()
def test_patch_then_unpatch_restores_exactly(family, probe_feature):
    build, inputs = MODELS[family]
    model = build()
    before_out = model(**inputs()).sample
    before_procs = _processors(model)
    assert before_procs, "the tiny model should have attention modules"

    lm.patch(model, probe_value=3)
    assert lmd.is_patched(model) and "probe" in lmd.patch_state(model).installed
    assert all(isinstance(p, _Marker) for p in _processors(model).values())
    assert model.lightmotion_probe == 3 and "forward" in model.__dict__
    patched_out = model(**inputs()).sample
    assert not torch.equal(patched_out, before_out)          # the probe really changed the model

    lm.unpatch(model)
    after = _processors(model)
    assert after.keys() == before_procs.keys() and all(after[k] is before_procs[k] for k in after)
    assert "forward" not in model.__dict__ and not hasattr(model, "lightmotion_probe")
    assert not lmd.is_patched(model)
    assert torch.equal(model(**inputs()).sample, before_out)  # bit-identical


@torch.no_grad()
def test_patch_is_idempotent_and_repatches_on_new_options(probe_feature):
    model = tiny.tiny_unet2d()
    original = _processors(model)
    lm.patch(model, probe_value=1)
    state = lmd.patch_state(model)
    lm.patch(model, probe_value=1)
    assert lmd.patch_state(model) is state                    # nothing installed twice
    assert all(isinstance(p.inner, type(original[k])) and not isinstance(p.inner, _Marker)
               for k, p in _processors(model).items())
    lm.patch(model, probe_value=2)                            # other options: old patch taken back first
    assert model.lightmotion_probe == 2
    assert all(not isinstance(p.inner, _Marker) for p in _processors(model).values())
    lm.unpatch(model)
    lm.unpatch(model)                                         # unpatching twice is harmless
    assert all(_processors(model)[k] is original[k] for k in original)


def test_patched_context_restores_after_exception(probe_feature):
    model = tiny.tiny_unet2d()
    original = _processors(model)
    with pytest.raises(RuntimeError, match="boom"):
        with lm.patched(model, probe_value=5):
            assert model.lightmotion_probe == 5
            raise RuntimeError("boom")
    assert not lmd.is_patched(model) and all(_processors(model)[k] is original[k] for k in original)


def test_failed_install_leaves_model_untouched(probe_feature):
    def broken(ctx):
        ctx.set_attr(ctx.model, "half_done", True)
        raise RuntimeError("feature failed")

    feature = registry.register_feature(registry.Feature("broken", broken))
    try:
        model = tiny.tiny_unet2d()
        original = _processors(model)
        with pytest.raises(RuntimeError, match="feature failed"):
            lm.patch(model)
        assert not hasattr(model, "half_done") and not lmd.is_patched(model)
        assert all(_processors(model)[k] is original[k] for k in original)
    finally:
        registry.FEATURES.remove(feature)


@torch.no_grad()
def test_animatediff_pipeline_patch_unpatch_bit_identical(probe_feature):
    pipe = tiny.tiny_animatediff_pipeline()
    assert type(pipe.unet).__name__ == "UNetMotionModel"
    reference = pipe(**tiny.animatediff_inputs()).frames
    scheduler = pipe.scheduler
    lm.patch(pipe, probe_value=1)
    assert lmd.patch_state(pipe).adapter.name == "animatediff"
    assert not torch.equal(pipe(**tiny.animatediff_inputs()).frames, reference)
    lm.unpatch(pipe)
    assert pipe.scheduler is scheduler
    assert torch.equal(pipe(**tiny.animatediff_inputs()).frames, reference)


@torch.no_grad()
def test_registered_features_restore_exactly():
    """With only the library's own features (whatever is registered), patch -> unpatch on a real
    AnimateDiff pipeline gives back the same processors, scheduler and bit-identical frames."""
    pipe = tiny.tiny_animatediff_pipeline()
    reference = pipe(**tiny.animatediff_inputs()).frames
    procs, scheduler = _processors(pipe.unet), pipe.scheduler
    with pytest.warns(UserWarning, match="installed nothing"):   # a plain pipeline: nothing applies
        with lm.patched(pipe):
            assert not lmd.is_patched(pipe)
    assert pipe.scheduler is scheduler and all(_processors(pipe.unet)[k] is procs[k] for k in procs)
    assert torch.equal(pipe(**tiny.animatediff_inputs()).frames, reference)


def test_unsupported_pipeline_lists_supported():
    class FakePipe:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no adapter for Linear") as err:
        lm.patch(FakePipe())
    for supported in ("UNetMotionModel", "UNetSpatioTemporalConditionModel", "CogVideoXTransformer3DModel",
                      "UNet2DConditionModel", "AnimateDiffPipeline", "StableVideoDiffusionPipeline"):
        assert supported in str(err.value)
    with pytest.raises(ValueError, match="must be a diffusers pipeline"):
        lm.patch(object())


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['warp_speed'\]"):
        lm.patch(tiny.tiny_unet2d(), warp_speed=9)
