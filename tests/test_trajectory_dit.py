"""The trajectory branch in the 3D attention of tiny CogVideoX and Wan models (issue 12, item 5):
patch/unpatch exact, zero-init equality, fused == reference, the branch as the host attention along
static trajectories, trajectory frames per token frame or per video frame, one training step."""
import pytest
import torch

import lightmotion_fast
from lightmotion_fast.camera.trajectories import TrajectoryTables
from lightmotion_fast.integrations.diffusers.trajectory import PARAM_NAMES
from lightmotion_fast.integrations.diffusers.trajectory_dit import (
    DiTTrajectoryAttnProcessor,
    DiTTrajectoryState,
    dit_attentions,
)
from lightmotion_fast.training.trajectory import (
    TrajectoryBranchTrainer,
    branch_state_dict,
    flow_objective,
)
from tiny_models import cogvideox_inputs, tiny_cogvideox, tiny_wan, wan_inputs

# Both tiny models: 3 latent frames of 8x8, patch 2 -> a 3 x 4 x 4 token grid; pixels 64x64; 9 video frames.
TOKEN_FRAMES, GRID, PIXELS, VIDEO_FRAMES = 3, (4, 4), 64, 9
FAMILIES = {"cogvideox": (tiny_cogvideox, cogvideox_inputs), "wan": (tiny_wan, wan_inputs)}


def make(family):
    build, inputs = FAMILIES[family]
    return build(), inputs()


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def random_coords(frames=VIDEO_FRAMES, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, n, 2, generator=g) * PIXELS, torch.rand(frames, n, generator=g) > 0.2


def random_branch_weights(model, family, seed=1, scale=0.3):
    """The official list format: five tensors per branch, in module order."""
    g = torch.Generator().manual_seed(seed)
    weights = []
    for _, attn in dit_attentions(model, family):
        c = attn.to_q.in_features
        weights += [torch.randn(c, c, generator=g) * scale for _ in range(4)] + [torch.randn(c, generator=g) * scale]
    return weights


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_patch_is_exact_and_unpatch_restores(family):
    model, inputs = make(family)
    attns = dit_attentions(model, family)
    originals = [attn.processor for _, attn in attns]
    keys = set(model.state_dict())
    base = run(model, inputs)
    coords, valid = random_coords()
    lightmotion_fast.patch(model, trajectories=coords, valid=valid)
    procs = [attn.processor for _, attn in attns]
    assert len(procs) == 2 and all(isinstance(p, DiTTrajectoryAttnProcessor) for p in procs)
    assert all(p.base_processor is o for p, o in zip(procs, originals))
    for (_, attn), p in zip(attns, procs):   # Q, K, V inherited, output projection zero
        assert torch.equal(p.to_q.weight, attn.to_q.weight) and torch.equal(p.to_k.weight, attn.to_k.weight)
        assert torch.equal(p.to_v.weight, attn.to_v.weight)
        assert not p.to_out[0].weight.any() and not p.to_out[0].bias.any()
        assert p.host_norms == (attn.norm_q, attn.norm_k)
    assert lightmotion_fast.patch_state(model).installed == ["trajectory"]
    with lightmotion_fast.backend("triton"):
        assert torch.equal(run(model, inputs), base)
    lightmotion_fast.unpatch(model)
    assert [attn.processor for _, attn in attns] == originals
    assert "forward" not in model.__dict__ and set(model.state_dict()) == keys
    assert torch.equal(run(model, inputs), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_branch_equals_reference(family, poisoned):
    model, inputs = make(family)
    base = run(model, inputs)
    coords, valid = random_coords()
    lightmotion_fast.patch(model, trajectories=coords, valid=valid,
                           traj_weights=random_branch_weights(model, family))
    with lightmotion_fast.backend("triton"):
        fused = run(model, inputs)
    with lightmotion_fast.backend("reference"):
        reference = run(model, inputs)
    lightmotion_fast.unpatch(model)
    assert (fused - base).abs().max() > 1e-2   # the branch does something
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


def static_trajectories():
    """One trajectory through the centre of every patch, standing still: every token of the grid is
    visited by exactly one trajectory, so the branch is attention over each patch position's frames."""
    h, w = GRID
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centre = torch.stack([(xs.reshape(-1) + 0.5) * PIXELS / w, (ys.reshape(-1) + 0.5) * PIXELS / h], -1)
    return centre.expand(TOKEN_FRAMES, h * w, 2).clone()


def same_position_mask(text_tokens=0):
    """Attention mask over [text; video (t h w)] tokens: a video token sees the video tokens at its own
    patch position in every frame (text tokens see everything; their rows are not compared)."""
    h, w = GRID
    position = torch.arange(TOKEN_FRAMES * h * w) % (h * w)
    video = position[:, None] == position[None, :]
    total = text_tokens + video.shape[0]
    allowed = torch.ones(total, total, dtype=torch.bool)
    allowed[text_tokens:, :text_tokens] = False
    allowed[text_tokens:, text_tokens:] = video
    return allowed


def rotary_angles(tokens, dim, seed=3):
    """(cos, sin) [tokens, dim] of random angles, repeated per pair as diffusers' RoPE tables are."""
    angles = torch.rand(tokens, dim // 2, generator=torch.Generator().manual_seed(seed)) * 6.28
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_branch_along_static_trajectories_is_the_host_attention_restricted_to_them(family):
    # With attn1's own weights (its q/k/v biases set to zero, as the branch has none), the branch equals
    # attn1 masked to same-position tokens: the branch reads the normed tokens in (t h w) order and uses
    # the host's q/k norm and rotary embedding as attn1 does.
    model, _ = make(family)
    _, attn = dit_attentions(model, family)[0]
    with torch.no_grad():
        for layer in (attn.to_q, attn.to_k, attn.to_v):
            layer.bias.zero_()
    tokens = TOKEN_FRAMES * GRID[0] * GRID[1]
    channels = attn.to_q.in_features
    state = DiTTrajectoryState(static_trajectories())
    state.begin_tokens(1, (TOKEN_FRAMES, *GRID), (1, 2, 2), torch.device("cpu"))
    proc = DiTTrajectoryAttnProcessor.from_attention(attn, state)
    with torch.no_grad():
        proc.to_out[0].weight.copy_(attn.to_out[0].weight)
        proc.to_out[0].bias.copy_(attn.to_out[0].bias)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, tokens, channels, generator=g)
    cos, sin = rotary_angles(tokens, channels // attn.heads)
    with torch.no_grad(), lightmotion_fast.backend("reference"):
        if family == "wan":   # Wan's tables are [1, tokens, 1, d]
            rope = (cos[None, :, None], sin[None, :, None])
            host = attn.processor(attn, x, None, same_position_mask(), rope)
        else:                 # CogVideoX: joint attention with the text tokens first, additive mask
            text = torch.randn(1, 5, channels, generator=g)
            rope = (cos, sin)
            mask = torch.zeros(1, 5 + tokens, 5 + tokens).masked_fill(~same_position_mask(5), float("-inf"))
            host, _ = attn.processor(attn, x, text, mask, rope)
        branch = proc.branch(x, rope)
    torch.testing.assert_close(branch, host, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_trajectories_per_video_frame_read_one_frame_per_latent_frame(family):
    model, inputs = make(family)
    coords, valid = random_coords()
    weights = random_branch_weights(model, family)
    with lightmotion_fast.backend("reference"):
        with lightmotion_fast.patched(model, trajectories=coords, valid=valid, traj_weights=weights):
            per_video_frame = run(model, inputs)
        every_fourth = slice(0, VIDEO_FRAMES, 4)   # video frames 0, 4, 8 for latent frames 0, 1, 2
        with lightmotion_fast.patched(model, trajectories=coords[every_fourth], valid=valid[every_fourth],
                                      traj_weights=weights):
            per_token_frame = run(model, inputs)
        tables = TrajectoryTables(coords[every_fourth], valid[every_fourth], frame_size=(PIXELS, PIXELS),
                                  latent_size=GRID, levels=1)
        with lightmotion_fast.patched(model, trajectories=tables, traj_weights=weights):
            from_tables = run(model, inputs)
        with lightmotion_fast.patched(model, trajectories=coords[:5], traj_weights=weights):
            with pytest.raises(ValueError, match=r"must have 3 \(one per token frame\) or 9"):
                run(model, inputs)
        wrong = TrajectoryTables(coords[:3], valid[:3], frame_size=(PIXELS, PIXELS), latent_size=(2, 2), levels=1)
        with lightmotion_fast.patched(model, trajectories=wrong):
            with pytest.raises(ValueError, match=r"built for 3 frames of a \(2, 2\) grid"):
                run(model, inputs)
    assert torch.equal(per_video_frame, per_token_frame) and torch.equal(from_tables, per_token_frame)


def test_dit_processor_has_no_official_implementation():
    with pytest.raises(ValueError, match="implementation 'fused' only"):
        DiTTrajectoryAttnProcessor(16, 2, None, implementation="official")


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_changes_only_the_branch_and_fused_gradients_equal_reference(family, poisoned):
    model, inputs = make(family)
    coords, valid = random_coords()
    lightmotion_fast.patch(model, trajectories=coords, valid=valid,
                           traj_weights=random_branch_weights(model, family, scale=0.1))
    layout = "hidden_states"
    conditioning = {k: v for k, v in inputs.items() if k not in (layout, "timestep")}

    def predict(m, x, t):
        return m(hidden_states=x, timestep=t, **conditioning).sample

    latents = inputs[layout]
    trainer = TrajectoryBranchTrainer(model, flow_objective(), predict, lr=1e-2, max_grad_norm=1e3)
    with lightmotion_fast.backend("reference"):
        trainer.loss(latents, coords, valid, generator=torch.Generator().manual_seed(0)).backward()
    reference = [p.grad.clone() for p in trainer.params]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with lightmotion_fast.backend("triton"):
        trainer.step(latents, coords, valid, generator=torch.Generator().manual_seed(0))
    for p, ref in zip(trainer.params, reference):
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-5)
    after = model.state_dict()
    branch_keys = {k for k in after if ".processor." in k}
    assert len(branch_keys) == 2 * len(PARAM_NAMES)
    assert all(not torch.equal(after[k], before[k]) for k in branch_keys)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in branch_keys)
    assert set(branch_state_dict(model)) == {k.replace(".processor.", ".") for k in branch_keys}
    lightmotion_fast.unpatch(model)


def test_patched_wan_compiles_fullgraph_after_one_eager_call():
    # The tables for a token grid are built by the first (eager) call; later calls read nothing back on
    # the host, so the whole patched transformer is one graph.
    model, inputs = make("wan")
    coords, valid = random_coords()
    lightmotion_fast.patch(model, trajectories=coords, valid=valid, traj_weights=random_branch_weights(model, "wan"))
    torch._dynamo.reset()
    with lightmotion_fast.backend("reference"):
        eager = run(model, inputs)
        compiled = run(torch.compile(model, fullgraph=True, backend="aot_eager"), inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    lightmotion_fast.unpatch(model)
