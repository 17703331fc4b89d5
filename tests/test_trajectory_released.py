"""The `released` semantics of Trajectory Attention against a port of the released SDPA processor.

The released code (xizaoqu/TrajectoryAttention, models/my_svd_pipeline_clean.py) runs
`MotionVectorAttnProcessor2_0` on torch 2.x. `ReleasedSdpaPort` below re-implements that processor's
logic step by step, written independently of the library (no library function is used in it): a fresh
subset from the global generator on every call, float64 coordinates scaled and truncated, `.bool()`
visibility, advanced-indexing gather, projection per token, the attention reshaped with the dense batch
size (which puts two trajectories in one softmax), to_out per token and a Python loop of
index_put_(accumulate=True). With torch.manual_seed fixed before each forward, the patched tiny SVD UNet
(semantics="released") must give the port's output, through the reference and through the Triton kernel.
The grouped op is also held against the float64 reference, forward and backward.
"""
import pytest
import torch
import torch.nn.functional as F

import lightmotion_fast
from lightmotion_fast.camera.trajectories import TrajectoryTables
from lightmotion_fast.integrations.diffusers.trajectory import TrajectoryAttnProcessor, temporal_attentions
from lightmotion_fast.ops.trajectory_attention import TrajectoryIndex, trajectory_attention
from lightmotion_fast.reference.trajectory_attention import (
    released_group,
    released_level_indices,
    released_sample_count,
    released_selection,
    trajectory_attention_reference,
)
from lm_testing import random_official_weights
from tiny_models import svd_unet_inputs, tiny_svd_unet

FRAMES = 4
FRAME_SIZE = 64        # the tiny UNet's 8x8 latent times the VAE factor 8 (the released `origin_size`)


# ---------------------------------------------------------------------------------------------
# The oracle: a port of the released SDPA processor


class ReleasedSdpaPort:
    """attn1's own processor plus the released trajectory branch, computed as MotionVectorAttnProcessor2_0
    does. `branch` holds to_q, to_k, to_v, to_out (the branch's weights), `heads` its head count;
    `geometry` is filled by a UNet pre-hook with the batch and the latent size of the current call (the
    released block passes height and width of its level; the tiny UNet halves the latent per level)."""

    def __init__(self, base, branch, heads, trajectory, occ_mask, origin_size, geometry, sparsity_factor=4):
        self.base, self.branch, self.heads = base, branch, heads
        self.trajectory, self.occ_mask = trajectory, occ_mask          # [F, N, 2] float64, [F, N] any dtype
        self.origin_size, self.sparsity_factor = origin_size, sparsity_factor  # (W0, H0)
        self.geometry = geometry

    def level_size(self, rows):
        batch, height, width = self.geometry["batch"], *self.geometry["latent"]
        while batch * height * width != rows:
            height, width = (height + 1) // 2, (width + 1) // 2
        return height, width

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return out + self.released_branch(hidden_states, *self.level_size(hidden_states.shape[0]))

    def released_branch(self, hidden_states, height, width):
        w = self.branch
        batch_size = hidden_states.shape[0]      # b·H·W: the size the released attention reshapes with
        total, frames, channels = hidden_states.shape
        grid = hidden_states.reshape(total // (height * width), height, width, frames, channels)

        # The subset: arange(N) indexed by the first count entries of randperm(N) (global generator).
        count = int(width * height / self.sparsity_factor) * 8
        everything = torch.arange(self.trajectory.shape[1])
        chosen = everything[torch.randperm(self.trajectory.shape[1])[:count]]
        traj = self.trajectory[:, chosen]                              # a copy: scaled in place below
        traj[..., 0] *= width / self.origin_size[0]
        traj[..., 1] *= height / self.origin_size[1]
        visible = self.occ_mask[:, chosen].bool()
        xs = traj[..., 0].long().clamp(0, width - 1)
        ys = traj[..., 1].long().clamp(0, height - 1)
        n = traj.shape[1]
        frame_no = torch.arange(frames).unsqueeze(1).expand(frames, n)

        tokens = grid[:, ys, xs, frame_no, :] * visible[None, :, :, None]     # [b, F, n, c]
        tokens = tokens.permute(0, 2, 1, 3).reshape(-1, frames, channels)     # [(b n), F, c]
        query, key, value = w.to_q(tokens), w.to_k(tokens), w.to_v(tokens)
        head_dim = key.shape[-1] // self.heads
        # The released reshape: batch_size is b·H·W, not b·n, so each "sequence" holds n·F/(H·W) tokens.
        query, key, value = (t.view(batch_size, -1, self.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        attended = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        attended = attended.transpose(1, 2).reshape(batch_size, -1, self.heads * head_dim)
        attended = w.to_out[1](w.to_out[0](attended))

        images = total // (height * width)
        summed = torch.zeros(images, frames, height, width, channels, dtype=attended.dtype)
        hits = torch.zeros(images, frames, height, width, dtype=attended.dtype)
        attended = attended.reshape(images, -1, frames, channels)
        for f in range(frames):
            keep = visible[f]
            ys_f, xs_f = ys[f][keep], xs[f][keep]
            for bb in range(images):
                summed[bb, f].index_put_((ys_f, xs_f), attended[bb, keep, f], accumulate=True)
                hits[bb, f].index_put_((ys_f, xs_f), attended[bb, keep, f, 0] * 0 + 1, accumulate=True)
        landed = hits > 0
        summed[landed] /= hits[landed][..., None]
        return summed.permute(0, 2, 3, 1, 4).reshape(total, frames, channels)


def install_port(unet, trajectory, occ_mask, weights_from):
    """Replace attn1's processors by ports carrying the same branch weights as `weights_from` (the
    library's processors, in module order); returns a function that removes the pre-hook."""
    geometry = {}

    def record(module, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        geometry["batch"], geometry["latent"] = sample.shape[0], tuple(sample.shape[-2:])

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    for (_, attn), proc in zip(temporal_attentions(unet), weights_from):
        attn.set_processor(ReleasedSdpaPort(proc.base_processor, proc, proc.heads, trajectory, occ_mask,
                                            (FRAME_SIZE, FRAME_SIZE), geometry))
    return handle.remove


# ---------------------------------------------------------------------------------------------
# Helpers


def released_trajectories(n, seed=0):
    """float64 coordinates a little past every border (clamping), some just below pixel edges, and a
    float visibility with zeros,
    small non-zero values (visible to the released code, not to a > 0.5 test) and ones."""
    g = torch.Generator().manual_seed(seed)
    coords = (torch.rand(FRAMES, n, 2, generator=g, dtype=torch.float64) * (FRAME_SIZE + 6) - 3)
    # A third just below a multiple of 8 pixels: truncated in float64 they stay in the lower latent
    # pixel; in float32 those past 32 pixels round up to the next one.
    third = n // 3
    coords[:, :third] = (coords[:, :third] / 8).round() * 8 - 8e-7
    choice = torch.randint(0, 3, (FRAMES, n), generator=g)
    visibility = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)[choice]
    return coords, visibility


def batch_two(inputs):
    """The classifier-free-guidance batch of two the released pipeline runs."""
    g = torch.Generator().manual_seed(11)
    return {k: (torch.cat([v, torch.randn(v.shape, generator=g, dtype=v.dtype)]) if v.ndim else v)
            for k, v in inputs.items()}


def run_seeded(unet, inputs, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        out = unet(**inputs).sample
    return out, torch.randint(0, 2**62, (1,)).item()   # the generator's state after the call


# ---------------------------------------------------------------------------------------------
# The tiny SVD UNet against the port


@pytest.mark.parametrize("backend, n_traj", [("reference", 200), ("reference", 64), ("triton", 200)],
                         ids=["reference-two_per_softmax", "reference-one_then_two", "triton-two_per_softmax"])
def test_released_semantics_equals_port_of_released_processor(backend, n_traj):
    # 200 trajectories: both levels (8x8, 4x4) draw 2·H·W, so two trajectories share each softmax.
    # 64: level 0 keeps all 64 (permuted) and runs one per softmax, level 1 draws 32, two per softmax.
    # (The Triton kernel runs through the interpreter here: one UNet call, to keep the test short.)
    unet, inputs = tiny_svd_unet(), batch_two(svd_unet_inputs(FRAMES))
    base, _ = run_seeded(unet, inputs, 0)
    coords, visibility = released_trajectories(n_traj)
    lightmotion_fast.patch(unet, trajectories=coords, valid=visibility,
                           traj_weights=random_official_weights(unet, scale=0.3),
                           semantics="released")
    procs = [attn.processor for _, attn in temporal_attentions(unet)]
    with lightmotion_fast.backend(backend):
        ours, ours_after = run_seeded(unet, inputs, 5)
        if backend == "reference":
            ours_again, _ = run_seeded(unet, inputs, 5)
            other_seed, _ = run_seeded(unet, inputs, 6)
            torch.testing.assert_close(ours_again, ours, rtol=0, atol=0)
            assert (other_seed - ours).abs().max() > 1e-3   # the per-call draws come from the global generator
    remove_hook = install_port(unet, coords.clone(), visibility.clone(), procs)
    port, port_after = run_seeded(unet, inputs, 5)
    remove_hook()

    assert (port - base).abs().max() > 1e-1                 # the branch does something
    assert ours_after == port_after                         # as many draws as the released code makes
    torch.testing.assert_close(ours, port, rtol=1e-5, atol=1e-5)


def test_released_differs_from_per_trajectory_semantics():
    # Same weights, same trajectories (all visible, no clamping, 2·H·W of them at every level so both
    # semantics attend over the same pixels' tokens): only grouping and subset order may differ.
    unet, inputs = tiny_svd_unet(), batch_two(svd_unet_inputs(FRAMES))
    coords, _ = released_trajectories(200)
    weights = random_official_weights(unet, scale=0.3)
    outs = {}
    for semantics in ("per_trajectory", "released"):
        lightmotion_fast.patch(unet, trajectories=coords.float(), traj_weights=weights, semantics=semantics)
        with lightmotion_fast.backend("reference"):
            outs[semantics], _ = run_seeded(unet, inputs, 5)
        lightmotion_fast.unpatch(unet)
    assert (outs["released"] - outs["per_trajectory"]).abs().max() > 1e-2


def test_semantics_option_is_documented_and_checked():
    doc = lightmotion_fast.patch.__doc__                     # what help(patch) shows
    assert 'semantics: "per_trajectory" | "released" = "per_trajectory"' in doc
    unet = tiny_svd_unet()
    coords, visibility = released_trajectories(200)
    with pytest.raises(ValueError, match="semantics must be one of"):
        lightmotion_fast.patch(unet, trajectories=coords, semantics="xformers")
    lightmotion_fast.unpatch(unet)
    with pytest.raises(ValueError, match="semantics= without trajectories="):
        lightmotion_fast.patch(unet, semantics="released")
    lightmotion_fast.unpatch(unet)
    # implementation="official" recomputes the per-trajectory semantics only
    lightmotion_fast.patch(unet, trajectories=coords, valid=visibility, semantics="released")
    for _, attn in temporal_attentions(unet):
        attn.processor.implementation = "official"
    with pytest.raises(ValueError, match="implementation='official'"):
        run_seeded(unet, svd_unet_inputs(FRAMES), 0)
    lightmotion_fast.unpatch(unet)


def test_released_takes_trajectory_tables_and_missing_visibility():
    # A TrajectoryTables gives its coordinates (float32, exact in float64), validity and frame size;
    # valid=None means every point visible. Both must give what the raw float64 tensors give.
    unet, inputs = tiny_svd_unet(), batch_two(svd_unet_inputs(FRAMES))
    coords, _ = released_trajectories(200)
    coords = coords.float().double()
    weights = random_official_weights(unet, scale=0.3)
    outs = []
    for trajectories in (coords, TrajectoryTables(coords.float(), None, frame_size=(FRAME_SIZE, FRAME_SIZE),
                                                  latent_size=(8, 8), levels=2)):
        lightmotion_fast.patch(unet, trajectories=trajectories, traj_weights=weights, semantics="released")
        with lightmotion_fast.backend("reference"):
            outs.append(run_seeded(unet, inputs, 5)[0])
        lightmotion_fast.unpatch(unet)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_too_few_trajectories_for_whole_groups_is_a_clear_error():
    # 100 trajectories: level 0 (8x8) uses all 100, not a multiple of 64: the released code would split
    # trajectories between softmaxes (or fail); the library says so instead of computing something else.
    unet = tiny_svd_unet()
    coords, visibility = released_trajectories(100)
    lightmotion_fast.patch(unet, trajectories=coords, valid=visibility, semantics="released")
    with pytest.raises(ValueError, match="multiple of H·W"):
        run_seeded(unet, svd_unet_inputs(FRAMES), 0)
    lightmotion_fast.unpatch(unet)
    assert all(not isinstance(a.processor, TrajectoryAttnProcessor) for _, a in temporal_attentions(unet))


# ---------------------------------------------------------------------------------------------
# The released per-call tables


def test_released_tables_follow_the_released_arithmetic():
    assert released_sample_count((8, 8)) == 128 and released_sample_count((9, 16)) == 288
    assert released_sample_count((3, 5)) == 24                            # int(15 / 4) · 8
    torch.manual_seed(3)
    want = torch.randperm(500)[:128]
    torch.manual_seed(3)
    assert torch.equal(released_selection(500, (8, 8)), want)            # unsorted, global generator
    assert released_group(128, (8, 8)) == 2 and released_group(64, (8, 8)) == 1
    # float64, x·(W/W0) then truncation: 53·(8/64) is 6.625 -> 6; 0.999999999 is 0 in float64 but rounds
    # to 1 in float32 (the per-trajectory tables' arithmetic).
    coords = torch.tensor([[[53.0, 7.999999992], [-0.5, 63.9], [80.0, -7.0]]], dtype=torch.float64)
    idx = released_level_indices(coords, (64, 64), (8, 8))
    assert idx.tolist() == [[0 * 8 + 6, 7 * 8 + 0, 0 * 8 + 7]]
    assert float(torch.tensor(7.999999992, dtype=torch.float32) * (8 / 64)) == 1.0


# ---------------------------------------------------------------------------------------------
# The grouped op: kernel against the float64 reference, forward and backward


def independent_grouped_attention(q, k, v, idx, valid, group):
    """Per-group attention written directly (loops), no shared helper: gather, one softmax over the
    group's tokens, scatter-average. q, k, v [b s f h d] float64."""
    batch, n_pix, frames, heads, dim = q.shape
    n = idx.shape[1]
    total = torch.zeros_like(q)
    hits = torch.zeros(n_pix, frames, dtype=q.dtype)
    for f in range(frames):
        for j in range(n):
            if valid[f, j]:
                hits[idx[f, j], f] += 1
    for m in range(n // group):
        members = [(j, f) for j in range(m * group, (m + 1) * group) for f in range(frames)]
        rows = [[t[:, idx[f, j], f] * valid[f, j] for j, f in members] for t in (q, k, v)]
        qs, ks, vs = (torch.stack(r, dim=1) for r in rows)             # [b tokens h d]
        probs = torch.einsum("bthd,buhd->bhtu", qs, ks).div(dim ** 0.5).softmax(-1)
        out = torch.einsum("bhtu,buhd->bthd", probs, vs)
        for t, (j, f) in enumerate(members):
            if valid[f, j]:
                total[:, idx[f, j], f] += out[:, t] / hits[idx[f, j], f]
    return total


@pytest.mark.parametrize("group, mask_invalid, deterministic", [(2, False, True), (2, True, False), (3, False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grouped_kernel_matches_float64_reference(group, mask_invalid, deterministic, dtype, device, poisoned):
    g = torch.Generator().manual_seed(group)
    batch, n_pix, frames, heads, dim, n = 2, 12, 5, 2, 40, 12
    idx = torch.randint(0, n_pix, (frames, n), generator=g)
    valid = torch.rand(frames, n, generator=g) > 0.25
    q, k, v, dout = (torch.randn(batch, n_pix, frames, heads, dim, generator=g, dtype=torch.float64) for _ in range(4))
    if not mask_invalid:
        torch.testing.assert_close(trajectory_attention_reference(q, k, v, idx, valid, group=group),
                                   independent_grouped_attention(q, k, v, idx, valid, group))
    want = [t.clone().requires_grad_() for t in (q, k, v)]
    trajectory_attention_reference(*want, idx, valid, mask_invalid, group).backward(dout)
    got = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    index = TrajectoryIndex(idx.to(device), valid.to(device), n_pix)
    with lightmotion_fast.backend("triton"):
        out = trajectory_attention(*got, index, mask_invalid=mask_invalid, deterministic=deterministic, group=group)
        out.backward(dout.to(device, dtype))
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    want_out = trajectory_attention_reference(q, k, v, idx, valid, mask_invalid, group)
    for name, a, b in [("out", out, want_out)] + [(f"d{c}", x.grad, w.grad) for c, x, w in zip("qkv", got, want)]:
        assert torch.isfinite(a).all(), name
        scale = max(1.0, b.abs().max().item())
        assert (a.double().cpu() - b).abs().max().item() <= tol * scale, name


def test_group_arguments_are_checked():
    q = k = v = torch.randn(1, 6, 5, 1, 16)
    idx, valid = torch.randint(0, 6, (5, 9)), torch.ones(5, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match="must divide the number of trajectories"):
        trajectory_attention(q, k, v, idx, valid, group=2)
    with pytest.raises(ValueError, match="group must be a positive integer"):
        trajectory_attention(q, k, v, idx, valid, group=0)
    with pytest.raises(ValueError, match="tokens per softmax"):
        trajectory_attention(torch.randn(1, 6, 33, 1, 16), torch.randn(1, 6, 33, 1, 16), torch.randn(1, 6, 33, 1, 16),
                             torch.randint(0, 6, (33, 4)), torch.ones(33, 4, dtype=torch.bool), group=2)
