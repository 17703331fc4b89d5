"""Training a LiON-LoRA (a LoRA and its scaling-token embedding) on the fused forward and backward
(issue 15, item 4): the loss falls on a tiny CogVideoX, the gradients equal peft + diffusers' own
processors (lion_reference.py), and the scale <-> data recipe."""
import copy

import pytest
import torch
import torch.nn.functional as F

import lightmotion_fast
from lion_reference import cogvideox, cogvideox_call, embeddings, reference_forward, with_adapters
from lightmotion_fast.integrations.diffusers import is_patched
from lightmotion_fast.training.lion import (
    LionLoraTrainer,
    clip_frame_indices,
    sample_clip,
    scale_range,
)

pytest.importorskip("peft")


def scheduler(kind="v_prediction"):
    from diffusers import CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler

    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler()
    return CogVideoXDDIMScheduler(prediction_type=kind)


def batch(rope: bool):
    """Two clips of the tiny model's latent size with their own S."""
    one = cogvideox_call(rope)
    g = torch.Generator().manual_seed(21)
    latents = torch.randn((2, *one["hidden_states"].shape[1:]), generator=g)
    text = torch.randn(2, *one["encoder_hidden_states"].shape[1:], generator=g)
    extra = {"image_rotary_emb": one["image_rotary_emb"]} if rope else {}
    return latents, text, torch.tensor([0.3, 0.9]), extra


@pytest.mark.parametrize("rope", [False, True])
def test_gradients_equal_peft_and_reference(rope):
    """Fused forward + backward (multi_lora_linear's autograd, kernels under the interpreter) against
    peft's LoRA forward and diffusers' processor with the tokens appended by hooks, in plain autograd."""
    model = with_adapters(cogvideox(rope), ("pan",))
    twin = copy.deepcopy(model)
    emb = embeddings(names=("pan",))["pan"]
    twin_emb = copy.deepcopy(emb)
    latents, text, scales, extra = batch(rope)
    t = torch.tensor([100, 700])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))

    trainer = LionLoraTrainer(model, "pan", scheduler=scheduler(), embedding=emb)
    loss = trainer.loss(latents, text, scales, timesteps=t, noise=noise, **extra)
    loss.backward()

    for p in twin.parameters():
        p.requires_grad_(False)
    trained = [p for n, p in twin.named_parameters() if "lora_" in n]
    for p in trained:
        p.requires_grad_(True)
    sched = scheduler()
    noisy, target = sched.add_noise(latents, noise, t), sched.get_velocity(latents, noise, t)
    pred = reference_forward(twin, dict(hidden_states=noisy, encoder_hidden_states=text, timestep=t, **extra),
                             {"pan": scales}, {"pan": twin_emb}, wan=False, grad=True)
    want_loss = F.mse_loss(pred, target)
    want_loss.backward()

    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    got = dict(model.named_parameters())
    names = [n for n, _ in twin.named_parameters() if "lora_" in n]
    assert len(names) == 2 * 4 * 2  # A and B of to_q/k/v/out in two blocks
    for name in names:
        want = dict(twin.named_parameters())[name].grad
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got[name].grad, want, atol=1e-5, rtol=1e-4, msg=name)
    for (name, p), q in zip(emb.named_parameters(), twin_emb.parameters()):
        assert q.grad.abs().max() > 0
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    # only the adapter and the embedding train
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_loss_falls(kind):
    with lightmotion_fast.backend("reference"):
        model = with_adapters(cogvideox(False), ("pan",))
        trainer = LionLoraTrainer(model, "pan", scheduler=scheduler(kind), s_min=0.1, lr=1e-1)
        latents, text, scales, extra = batch(False)
        fixed = dict(timesteps=torch.tensor([300, 600]),
                     noise=torch.randn(latents.shape, generator=torch.Generator().manual_seed(4)))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = [trainer.step(latents, text, scales, **fixed) for _ in range(6)]
    assert losses[-1] < 0.9 * losses[0] and losses[1] < losses[0], losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(p.grad is not None for p in trainer.embedding.parameters())
    trainer.close()
    assert not is_patched(model)


def test_loss_falls_on_wan():
    import tiny_models as tiny

    with lightmotion_fast.backend("reference"):
        model = with_adapters(tiny.tiny_wan(), ("pan",))
        trainer = LionLoraTrainer(model, "pan", scheduler=scheduler("flow"), s_min=0.1, lr=1e-1)
        one = tiny.wan_inputs()
        g = torch.Generator().manual_seed(22)
        latents = torch.randn((2, *one["hidden_states"].shape[1:]), generator=g)
        text = torch.randn(2, *one["encoder_hidden_states"].shape[1:], generator=g)
        fixed = dict(timesteps=torch.tensor([300, 600]), noise=torch.randn(latents.shape, generator=g))
        losses = [trainer.step(latents, text, torch.tensor([0.3, 0.9]), **fixed) for _ in range(6)]
    assert losses[-1] < 0.9 * losses[0] and losses[1] < losses[0], losses
    assert all(p.grad is not None for p in trainer.embedding.parameters())


def test_wan_pipelines_own_scheduler_trains_as_flow_matching():
    """Wan ships UniPC on flow sigmas (prediction_type 'flow_prediction'), which the README's example passes
    as pipe.scheduler: the same flow-matching objective as FlowMatchEulerDiscreteScheduler (was refused)."""
    import tiny_models as tiny

    model = with_adapters(tiny.tiny_wan(), ("pan",))
    unipc = LionLoraTrainer(model, "pan", scheduler=tiny.wan_scheduler())
    assert unipc.prediction == "flow"
    latents, noise, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([250, 750])
    got = unipc.noisy_and_target(latents, noise, t)
    unipc.close()
    euler = LionLoraTrainer(model, "pan", scheduler=scheduler("flow"))
    want = euler.noisy_and_target(latents, noise, t)
    euler.close()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_loss_falls_with_gradient_checkpointing():
    """Checkpointed blocks recompute the forward in backward; the token layout must still be found."""
    with lightmotion_fast.backend("reference"):
        model = with_adapters(cogvideox(True), ("pan",))
        model.enable_gradient_checkpointing()
        trainer = LionLoraTrainer(model, "pan", scheduler=scheduler(), s_min=0.1, lr=1e-1)
        latents, text, scales, extra = batch(True)
        fixed = dict(timesteps=torch.tensor([300, 600]),
                     noise=torch.randn(latents.shape, generator=torch.Generator().manual_seed(4)), **extra)
        losses = [trainer.step(latents, text, scales, **fixed) for _ in range(4)]
    assert losses[-1] < losses[0], losses


def test_trainer_rejects_bad_setups():
    from peft import LoraConfig

    model = with_adapters(cogvideox(False), ("pan",))
    with pytest.raises(ValueError, match="no LoRA weights"):
        LionLoraTrainer(model, "orbit", scheduler=scheduler())
    with pytest.raises(ValueError, match="prediction_type"):
        LionLoraTrainer(model, "pan", scheduler=scheduler("sample"))
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=["to_q", "to_k", "to_v"]),
                      adapter_name="drop")
    with pytest.raises(ValueError, match="lora_dropout"):
        LionLoraTrainer(model, "drop", scheduler=scheduler())
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"]), adapter_name="kv")
    with pytest.raises(ValueError, match="no LoRA on the self-attentions' to_q"):   # was a bare StopIteration
        LionLoraTrainer(model, "kv", scheduler=scheduler())
    assert not is_patched(model)


def test_scale_data_recipe():
    """Paper §3.4: S = 1 spans the whole 600-frame path, s_min = 49/600 is 49 consecutive frames."""
    assert scale_range(600) == (49 / 600, 1.0)
    assert scale_range(240)[0] == 49 / 240
    torch.testing.assert_close(clip_frame_indices(600, 49 / 600), torch.arange(49))
    full = clip_frame_indices(600, 1.0)
    assert full[0] == 0 and full[-1] == 599 and len(full) == 49 and (full.diff() > 0).all()
    half = clip_frame_indices(600, 0.5)
    assert half[-1] == 299 and len(half) == 49
    s, idx = sample_clip(600, generator=torch.Generator().manual_seed(0))
    assert 49 / 600 <= s <= 1 and torch.equal(idx, clip_frame_indices(600, s))
    with pytest.raises(ValueError, match=r"\[s_min, 1\]"):
        clip_frame_indices(600, 0.05)
    with pytest.raises(ValueError, match="clip_frames"):
        scale_range(20, 49)


def test_close_gives_the_model_back_in_its_mode_and_scales_are_checked():
    model = with_adapters(cogvideox(False), ("pan",)).eval()
    trainer = LionLoraTrainer(model, "pan", scheduler=scheduler())
    latents, text, _, kwargs = batch(False)
    with lightmotion_fast.backend("reference"):
        with pytest.raises(ValueError, match="scales must be one number or one S per clip"):
            trainer.loss(latents, text, torch.tensor([0.3, 0.5, 0.9]), **kwargs)
        trainer.step(latents, text, 0.5, **kwargs)
    assert model.training
    trainer.close()
    assert not model.training and not is_patched(model)
