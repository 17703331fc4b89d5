"""LightMotion's correction schedule as the paper draws it (edit at T0, ordinary denoising to T1,
re-noise x_T1 -> x_T2, denoising to the end) in tiny AnimateDiff (DDIM) and SVD (Euler/Karras)
pipelines, the immediate re-noise option, schedule errors, and the subject mask from words."""
import json
import math

import pytest
import torch

import lightmotion_fast as lm
from lightmotion_fast.integrations.diffusers import lightmotion as lmi
from lightmotion_fast.reference.snr_reinject import philox_randn
from test_lightmotion_sampler import svd_inputs, tiny_svd_pipeline
from tiny_models import animatediff_inputs, animatediff_v2v_inputs, tiny_animatediff_pipeline, tiny_animatediff_v2v_pipeline

CAM = lm.CameraMotion(pan=(0.25, -0.1), zoom=0.1)


@pytest.fixture(scope="module")
def pipe():
    return tiny_animatediff_pipeline()


def snr_noise_reference(x, seed, offset):
    """The correction noise from the NumPy Philox reference, shaped like x (row-major)."""
    return philox_randn(seed, offset, x.numel()).reshape(x.shape).to(x.dtype)


def _unet_timesteps(pipe, call):
    """Run `call()` and return the timesteps the UNet was called with, in order."""
    seen = []

    def hook(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(int(torch.as_tensor(t).reshape(-1)[0]))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def test_default_timeline_visits_t0_t1_t2_in_order_ddim(pipe):
    """10 steps, the defaults T0 = 0.2, T1 = 0.4, T2 = 0.3: the edit after step 2, ordinary steps 2, 3,
    the jump from the level after step 3 (T1 = 4) back to the level before step 3 (T2 = 3), steps 3..9."""
    steps = 10
    with lm.patched(pipe, camera=CAM):
        seen = _unet_timesteps(pipe, lambda: pipe(**animatediff_inputs(steps=steps)))
        state = lmi.sampler_state(pipe)
        sch = pipe.scheduler
        full = [int(t) for t in lmi.patch_state(pipe).data["lightmotion"].full]
    record = state.record
    assert seen == [full[i] for i in [0, 1, 2, 3] + list(range(3, steps))]
    assert record["edit_index"] == 1 and record["renoise_index"] == 3 and record["rewind_to"] == 3
    # the jump is the closed form with ᾱ of the level after step T1-1 (timestep full[T1]) and of T2
    x = record["pre_renoise"]
    ratio = float(sch.alphas_cumprod[full[3]]) / float(sch.alphas_cumprod[full[4]])
    noise = snr_noise_reference(x, 0, 3 * x.numel())
    torch.testing.assert_close(record["renoised"], math.sqrt(ratio) * x + math.sqrt(1 - ratio) * noise,
                               atol=1e-5, rtol=1e-5)
    implied = (record["renoised"] - math.sqrt(ratio) * x) / math.sqrt(1 - ratio)
    assert abs(float(implied.mean())) < 0.1 and abs(float(implied.std()) - 1) < 0.1
    assert not torch.equal(record["pre_edit"], record["post_edit"])   # the edit really happened at T0


@torch.no_grad()
def test_explicit_step_counts_and_immediate_renoise(pipe):
    steps = 6
    with lm.patched(pipe, camera=CAM, edit_step=1, denoise_until=4, renoise_to=2):
        seen = _unet_timesteps(pipe, lambda: pipe(**animatediff_inputs(steps=steps)))
        full = [int(t) for t in lmi.patch_state(pipe).data["lightmotion"].full]
    assert seen == [full[i] for i in (0, 1, 2, 3, 2, 3, 4, 5)]
    # today's immediate re-noise: T1 = T0, T2 = T0 - correction_steps
    with lm.patched(pipe, camera=CAM, edit_step=3, correction="renoise_immediate", correction_steps=2):
        seen = _unet_timesteps(pipe, lambda: pipe(**animatediff_inputs(steps=steps)))
        record = lmi.sampler_state(pipe).record
    assert seen == [full[i] for i in (0, 1, 2, 1, 2, 3, 4, 5)]
    assert record["edit_index"] == 2 and record["renoise_index"] == 2 and record["rewind_to"] == 1
    # stochastic: the schedule is untouched
    with lm.patched(pipe, camera=CAM, edit_step=1, correction="stochastic", correction_steps=2):
        seen = _unet_timesteps(pipe, lambda: pipe(**animatediff_inputs(steps=steps)))
        assert "renoised" not in lmi.sampler_state(pipe).record
    assert seen == full


@torch.no_grad()
def test_default_timeline_euler_karras_svd():
    svd = tiny_svd_pipeline()
    sigmas_seen, record = [], None
    with lm.patched(svd, camera=CAM, edit_step=1, denoise_until=3, renoise_to=2):
        sch = svd.scheduler
        real_scale = sch.scale_model_input

        def scale(sample, t):
            sigmas_seen.append(float(sch.sigmas[sch.step_index or 0]))
            return real_scale(sample, t)

        sch.scale_model_input = scale
        try:
            out = svd(**svd_inputs()).frames
        finally:
            del sch.scale_model_input
        record = lmi.sampler_state(svd).record
        sigmas = sch.sigmas
    assert torch.isfinite(out).all()
    assert sigmas_seen == [float(sigmas[i]) for i in (0, 1, 2, 2, 3)]
    x = record["pre_renoise"]
    up = math.sqrt(float(sigmas[2]) ** 2 - float(sigmas[3]) ** 2)
    torch.testing.assert_close(record["renoised"], x + up * snr_noise_reference(x, 0, 2 * x.numel()),
                               atol=1e-4, rtol=1e-5)


def test_schedule_errors(pipe):
    with pytest.raises(ValueError, match=r"denoise_until \(T1\) must come after edit_step"):
        lm.patch(pipe, camera=CAM, edit_step=3, denoise_until=2)
    with pytest.raises(ValueError, match=r"renoise_to \(T2\).*noisier"):
        lm.patch(pipe, camera=CAM, denoise_until=0.4, renoise_to=0.5)
    with pytest.raises(ValueError, match="denoise_until applies to correction='renoise'"):
        lm.patch(pipe, camera=CAM, correction="stochastic", denoise_until=3)
    with pytest.raises(ValueError, match="correction_steps applies"):
        lm.patch(pipe, camera=CAM, correction_steps=2)
    with pytest.raises(ValueError, match="renoise_to"):
        lm.patch(pipe, camera=CAM, renoise_to=-1)
    assert not lm.is_patched(pipe)
    # mixed units are checked when the call's number of steps is known
    with lm.patched(pipe, camera=CAM, edit_step=0.5, denoise_until=2):
        with pytest.raises(ValueError, match=r"denoise_until \(T1\) must come after edit_step \(T0\)"):
            pipe(**animatediff_inputs(steps=4))
    with lm.patched(pipe, camera=CAM, denoise_until=9):
        with pytest.raises(ValueError, match="denoise_until.*past the schedule"):
            pipe(**animatediff_inputs(steps=4))
    with lm.patched(pipe, camera=CAM, edit_step=1, denoise_until=3, renoise_to=0.9):
        pipe(**animatediff_inputs(steps=4))   # a fraction of T2 is kept below T1 (0.9 * 4 -> 2)
        assert lmi.sampler_state(pipe).record["rewind_to"] == 2


def test_default_renoise_on_partial_video_to_video_is_a_clear_error():
    v2v = tiny_animatediff_v2v_pipeline()
    with lm.patched(v2v, camera=CAM):
        with pytest.raises(ValueError, match="correction='renoise'.*part-way.*stochastic"):
            v2v(**animatediff_v2v_inputs(strength=0.5))


# -- the subject mask from words --------------------------------------------------------------------------

def tiny_clip_tokenizer(tmp_path):
    """A real CLIPTokenizer with a tiny vocabulary: letters, and merges that split 'corgi' into the
    sub-word pieces 'cor' + 'gi</w>'."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters] + [
        "co", "cor", "gi</w>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc o\nco r\ng i</w>\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)


def test_subject_words_resolve_to_every_subword_token(tmp_path):
    tok = tiny_clip_tokenizer(tmp_path)
    prompt = "a Corgi chases a corgi"
    tokens = tok.convert_ids_to_tokens(tok(prompt).input_ids)
    want = tuple(i for i, t in enumerate(tokens) if t in ("cor", "gi</w>"))
    assert len(want) == 4                                             # two occurrences, two pieces each
    assert lmi.subject_token_positions(tok, prompt, "corgi") == want
    assert lmi.subject_token_positions(tok, prompt, ["CORGI"]) == want
    a = tuple(i for i, t in enumerate(tokens) if t == "a</w>")
    assert lmi.subject_token_positions(tok, prompt, ["corgi", "a"]) == tuple(sorted(want + a))
    with pytest.raises(ValueError, match=r"subject word 'cat' is not in the prompt.*cor"):
        lmi.subject_token_positions(tok, prompt, ["corgi", "cat"])


@torch.no_grad()
def test_subject_in_a_pipeline_call(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = tiny_animatediff_pipeline()
    tok = tiny_clip_tokenizer(tmp_path)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    pipe.register_modules(tokenizer=tok, text_encoder=encoder)
    call = dict(prompt="a corgi on grass", num_frames=2, height=16, width=16, num_inference_steps=2,
                output_type="pt", generator=torch.Generator().manual_seed(0))
    tokens = tok.convert_ids_to_tokens(tok(call["prompt"]).input_ids)
    with lm.patched(pipe, camera=CAM, subject="Corgi", correction=None, edit_step=1):
        pipe(**call)
        state = lmi.sampler_state(pipe)
        assert [tokens[i] for i in state.subject_positions] == ["cor", "gi</w>"]
        assert state.record["background_source"] == "cross-attention"
        with pytest.raises(ValueError, match=r"subject word 'Corgi' is not in the prompt 'a cat'"):
            pipe(**{**call, "prompt": "a cat"})   # named at call time, before any UNet step
        with pytest.raises(ValueError, match="subject.*prompt_embeds"):
            pipe(**animatediff_inputs(frames=2, steps=2))
    with lm.patched(pipe, camera=CAM, subject="corgi", subject_tokens=[1], correction=None, edit_step=1):
        pipe(**call)
        assert lmi.sampler_state(pipe).subject_positions is None      # explicit tokens win


def test_subject_errors(pipe):
    with pytest.raises(ValueError, match="subject"):
        lm.patch(pipe, camera=CAM, subject="")
    with pytest.raises(TypeError, match="subject"):
        lm.patch(pipe, camera=CAM, subject=3)
    with pytest.raises(ValueError, match="subject=.*tokenizer"):
        lm.patch(pipe, camera=CAM, subject="corgi")                   # the tiny pipe has no tokenizer
    assert not lm.is_patched(pipe)
    with pytest.raises(ValueError, match="subject=.*animatediff"):
        lm.patch(tiny_svd_pipeline(), camera=CAM, subject="corgi")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@torch.no_grad()
def test_immediate_renoise_is_one_launch_equal_to_edit_then_jump(pipe, monkeypatch, backend):
    """'renoise_immediate' re-noises in the step that edits: the sampler runs the gather and the jump
    as one latent_resample(renoise=...) launch (no snr_reinject call), and its output is bit-identical
    to the two-launch composition, edit then snr_reinject with the same seed and offset. The un-noised
    edit is not computed unless the record is read, and then equals the plain edit."""
    from lightmotion_fast.ops.latent_resample import latent_resample
    from lightmotion_fast.ops.snr_reinject import snr_reinject

    calls = []
    monkeypatch.setattr(lmi, "snr_reinject", lambda *a, **k: calls.append(1) or snr_reinject(*a, **k))
    steps = 6
    with lm.backend(backend), lm.patched(pipe, camera=CAM, edit_step=3, correction="renoise_immediate",
                                         correction_steps=2):
        pipe(**animatediff_inputs(steps=steps))
        sampler = lmi.patch_state(pipe).data["lightmotion"]
        record = lmi.sampler_state(pipe).record
        assert calls == []
        assert isinstance(record.raw("post_edit"), lmi._Lazy) and record.raw("pre_renoise") is record.raw("post_edit")
        pre, fill, index = record["pre_edit"], record["fill_map"], record["renoise_index"]
        edited = latent_resample(pre, fill, "b c f h w")
        two_launches = snr_reinject(edited, None, sampler._jump(index), 0, 2 * pre.numel(), None, "b c f h w")
        assert torch.equal(record["renoised"], two_launches)
        assert torch.equal(record["post_edit"], edited) and record["pre_renoise"] is record["post_edit"]
