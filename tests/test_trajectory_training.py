"""Training the trajectory branch on the tiny SVD UNet (issue 12, item 4): the loss falls under the
fused forward+backward, its gradients equal the reference op's and the official computation's,
checkpoints round-trip in the official list format and as a state dict, the objectives' targets."""
import pytest
import torch

import lightmotion_fast
from lightmotion_fast.integrations.diffusers.trajectory import PARAM_NAMES, temporal_attentions, trajectory_state_dict
from lightmotion_fast.training.trajectory import (
    TrajectoryBranchTrainer,
    branch_parameters,
    branch_processors,
    branch_state_dict,
    branch_weight_list,
    ddpm_objective,
    edm_v_objective,
    flow_objective,
    load_branch,
    load_branch_file,
    save_branch,
    set_trajectories,
)
from lm_testing import random_official_weights
from tiny_models import svd_unet_inputs, tiny_svd_unet

FRAMES = 4


def clip(seed=0, n=12):
    """Latents [1 f 4 8 8] of a 64x64 clip and trajectories [f, n, 2] with visibility."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(FRAMES, n, 2, generator=g) * 64
    return torch.randn(1, FRAMES, 4, 8, 8, generator=g), coords, torch.rand(FRAMES, n, generator=g) > 0.2


def svd_predict():
    """The SVD UNet's call with the image latents concatenated and the other conditioning bound."""
    inputs = svd_unet_inputs(FRAMES)
    image_latents = inputs["sample"][:, :, 4:]

    def predict(unet, x, t):
        return unet(torch.cat([x, image_latents], 2), t, inputs["encoder_hidden_states"],
                    inputs["added_time_ids"]).sample
    return predict


def grads_of_loss(trainer, latents, coords, valid):
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.loss(latents, coords, valid, generator=torch.Generator().manual_seed(0)).backward()
    grads = [p.grad.clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def test_loss_falls_and_fused_gradients_equal_reference_and_official(poisoned):
    unet = tiny_svd_unet()
    latents, coords, valid = clip()
    lightmotion_fast.patch(unet, trajectories=coords, valid=valid,
                           traj_weights=random_official_weights(unet, scale=0.1))
    trainer = TrajectoryBranchTrainer(unet, edm_v_objective(), svd_predict(), lr=3e-3, max_grad_norm=1e3)
    frozen = [p for p in unet.parameters() if not any(p is q for q in trainer.params)]
    assert len(trainer.params) == 4 * len(PARAM_NAMES) and frozen and not any(p.requires_grad for p in frozen)

    with lightmotion_fast.backend("reference"):
        reference = grads_of_loss(trainer, latents, coords, valid)
        for _, proc in branch_processors(unet):
            proc.implementation = "official"   # gather, per-token to_out, index_put_ loop; plain autograd
        official = grads_of_loss(trainer, latents, coords, valid)
        for _, proc in branch_processors(unet):
            proc.implementation = "fused"
    losses = []
    with lightmotion_fast.backend("triton"):
        for step in range(3):   # the same clip, noise and noise level each step: the loss must fall
            losses.append(trainer.step(latents, coords, valid, generator=torch.Generator().manual_seed(0)))
            if step == 0:
                fused = [p.grad.clone() for p in trainer.params]
    for f, r, o in zip(fused, reference, official):
        assert r.abs().max() > 0
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-6)
    assert losses[2] < losses[1] < losses[0], losses

    # Resuming: branch weights and optimizer state carry over to a fresh patched UNet.
    other = tiny_svd_unet()
    lightmotion_fast.patch(other, trajectories=coords, valid=valid)
    resumed = TrajectoryBranchTrainer(other, edm_v_objective(), svd_predict(), lr=3e-3)
    resumed.load_state_dict(trainer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(branch_parameters(other), trainer.params))
    exp_avg = [resumed.optimizer.state[p]["exp_avg"] for p in resumed.params]
    assert all(torch.equal(a, trainer.optimizer.state[p]["exp_avg"]) for a, p in zip(exp_avg, trainer.params))


def test_state_dict_is_a_snapshot_that_rolls_back_the_optimizer_too():
    """A checkpoint taken, then more steps, then loaded: the branch weights and the optimizer's moments
    and step count are the checkpoint's again (the optimizer state had been kept by reference, so the
    later steps changed the checkpoint under it)."""
    unet = tiny_svd_unet()
    latents, coords, valid = clip()
    lightmotion_fast.patch(unet, trajectories=coords, valid=valid,
                           traj_weights=random_official_weights(unet, scale=0.1))
    trainer = TrajectoryBranchTrainer(unet, edm_v_objective(), svd_predict(), lr=3e-3)
    with lightmotion_fast.backend("reference"):
        trainer.step(latents, coords, valid, generator=torch.Generator().manual_seed(0))
        ckpt = trainer.state_dict()
        moments = [trainer.optimizer.state[p]["exp_avg"].clone() for p in trainer.params]
        weights = [p.detach().clone() for p in trainer.params]
        for seed in (1, 2):
            trainer.step(latents, coords, valid, generator=torch.Generator().manual_seed(seed))
        trainer.load_state_dict(ckpt)
    assert all(torch.equal(p, w) for p, w in zip(trainer.params, weights))
    assert all(torch.equal(trainer.optimizer.state[p]["exp_avg"], m) for p, m in zip(trainer.params, moments))
    assert all(float(trainer.optimizer.state[p]["step"]) == 1 for p in trainer.params)


@pytest.mark.parametrize("fmt", ["official", "state_dict"])
def test_checkpoint_round_trip(tmp_path, fmt):
    unet = tiny_svd_unet()
    _, coords, valid = clip()
    weights = random_official_weights(unet, seed=7, scale=0.1)
    lightmotion_fast.patch(unet, trajectories=coords, valid=valid, traj_weights=weights)
    saved = branch_state_dict(unet)
    names = [name for name, _ in temporal_attentions(unet)]
    # The official list: five tensors per branch in module order, as patch(traj_weights=[...]) reads it.
    assert list(saved) == [f"{n}.{p}" for n in names for p in PARAM_NAMES]
    assert all(torch.equal(a, b) for a, b in zip(branch_weight_list(unet), weights))
    assert all(torch.equal(saved[k], v) for k, v in trajectory_state_dict(unet).items())
    path = tmp_path / f"branch_{fmt}.pt"
    save_branch(unet, path, format=fmt)
    loaded = load_branch_file(path)
    assert isinstance(loaded, list if fmt == "official" else dict)

    fresh = tiny_svd_unet()
    lightmotion_fast.patch(fresh, trajectories=coords, valid=valid, traj_weights=loaded)
    assert all(torch.equal(a, b) for a, b in zip(branch_state_dict(fresh).values(), saved.values()))
    lightmotion_fast.patch(fresh, trajectories=coords, valid=valid)   # re-patched: zero-initialised again
    assert not branch_state_dict(fresh)[f"{names[0]}.to_out.0.weight"].any()
    load_branch(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(branch_state_dict(fresh).values(), saved.values()))
    with pytest.raises(ValueError, match="format must be"):
        save_branch(unet, tmp_path / "x.pt", format="safetensors")


def test_set_trajectories_and_unpatched_model_errors():
    unet = tiny_svd_unet()
    with pytest.raises(ValueError, match="no trajectory branch: patch it first"):
        TrajectoryBranchTrainer(unet, edm_v_objective(), svd_predict())
    _, coords, valid = clip()
    lightmotion_fast.patch(unet, trajectories=coords, valid=valid)
    state = branch_processors(unet)[0][1].state
    _, other, other_valid = clip(seed=3, n=5)
    set_trajectories(unet, other, other_valid)
    assert branch_processors(unet)[-1][1].state is state
    assert torch.equal(state.valid, other_valid) and state.tables is None
    assert torch.equal(state.coords[other_valid], other[other_valid])   # (invisible points are zeroed)
    with pytest.raises(ValueError, match="visibility must have shape"):
        set_trajectories(unet, other, other_valid[:, :2])


def test_objectives_targets_denoise_exactly():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 5, 5, generator=g), torch.randn(3, 2, 4, 5, 5, generator=g)

    # EDM / v: the UNet output equal to the target denoises to x0 through diffusers' Euler scheduler.
    model_input, timestep, target = edm_v_objective()(x0, noise, torch.Generator().manual_seed(1))
    sigma = torch.exp(4 * timestep).reshape(-1, 1, 1, 1, 1)
    noisy = model_input * (sigma**2 + 1).sqrt()
    torch.testing.assert_close(noisy, x0 + sigma * noise)
    denoised = target * (-sigma / (sigma**2 + 1).sqrt()) + noisy / (sigma**2 + 1)
    torch.testing.assert_close(denoised, x0, rtol=1e-4, atol=1e-4)

    # Flow matching: x_σ = (1 − σ) x0 + σ ε, and x_σ − σ·target = x0.
    noisy, timestep, target = flow_objective()(x0, noise, torch.Generator().manual_seed(2))
    sigma = (timestep / 1000).reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(noisy - sigma * target, x0)

    # DDPM v-prediction (CogVideoX's scheduler): √ᾱ x_t − √(1−ᾱ) v = x0.
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction")
    noisy, t, target = ddpm_objective(scheduler)(x0, noise, torch.Generator().manual_seed(3))
    alpha = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1).to(x0.dtype)
    torch.testing.assert_close(alpha.sqrt() * noisy - (1 - alpha).sqrt() * target, x0, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        ddpm_objective(CogVideoXDDIMScheduler(prediction_type="sample"))


def test_gradient_clipping_bounds_the_step():
    unet = tiny_svd_unet()
    latents, coords, valid = clip()
    lightmotion_fast.patch(unet, trajectories=coords, valid=valid,
                           traj_weights=random_official_weights(unet, scale=0.1))
    trainer = TrajectoryBranchTrainer(unet, edm_v_objective(), svd_predict(), max_grad_norm=1e-4,
                                      optimizer=None, lr=1e-3)
    with lightmotion_fast.backend("reference"):
        trainer.step(latents, coords, valid, generator=torch.Generator().manual_seed(0))
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trainer.params]))
    assert trainer.last_grad_norm > 1e-3 and float(clipped) <= 1e-4 * 1.001
