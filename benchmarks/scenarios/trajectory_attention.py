"""The trajectory attention core (q, k, v given -> gather, attend, scatter-average; op
trajectory_attention_core) and the whole branch of one SVD temporal block (x [(b h w), f, c] -> branch
output, projections and to_out included; op trajectory_attention), at the four
SVD-xt levels (25 frames, 576×1024, batch 2 with CFG, N_s = 2·h·w), forward and forward+backward,
against the spec's peers (specs/trajectory_attention.md, "Peers"); plus one full SVD-xt-sized UNet
step (random weights) with all 16 branches, patched against unpatched. Every provider computes the
same thing: projections, trajectory attention, scatter-average, to_out with its bias where landed.
"""
import torch
import torch.nn.functional as F
from einops import rearrange

import lightmotion_fast as lm
from lightmotion_fast.bench.scenario import Case
from lightmotion_fast.camera.trajectories import TrajectoryTables
from lightmotion_fast.reference.trajectory_attention import (
    num_samples,
    official_positions,
    official_scatter_average,
    official_trajectory_branch,
    subsample,
    trajectory_attention_reference,
)

NOTE = ("official: the official processor's computation (per-call subsampling and index tables, "
        "advanced-indexing gather, attention per trajectory, to_out per token, Python loop of "
        "index_put_(accumulate=True) over batch and frames); sdpa_index_add: precomputed indices, "
        "dense projection, gather, F.scaled_dot_product_attention on [b·n, h, f, d], index_add_ "
        "scatter-average; flex: FlexAttention (compiled) over the packed gathered tokens with a "
        "block-diagonal mask, then index_add_; lightmotion/atomic: ours in the one-launch atomic mode")

NOTE_CORE = ("attention core only: q, k, v given [b s f h d] (projections and to_out excluded): gather -> "
             "attend -> scatter-average. official: per-call subsampling and latent positions, advanced-indexing "
             "gather, SDPA per trajectory, Python loop of index_put_(accumulate=True); sdpa_index_add: precomputed "
             "indices, gather, SDPA on [b·n, h, f, d], index_add_; flex: FlexAttention (compiled) with a "
             "block-diagonal mask, then index_add_; lightmotion takes the level's TrajectoryIndex (checked once)")

SVD_XT_LEVELS = ((72, 128, 320, 5), (36, 64, 640, 10), (18, 32, 1280, 20), (9, 16, 1280, 20))


def moving_points(frames, n, frame_size, generator):
    """Trajectories with camera-like motion (a start point and a per-trajectory drift), ~10% invalid."""
    h0, w0 = frame_size
    start = torch.rand(n, 2, generator=generator) * torch.tensor([w0, h0])
    drift = (torch.rand(n, 2, generator=generator) - 0.5) * 8.0 + torch.tensor([3.0, 1.0])
    coords = start + torch.arange(frames, dtype=torch.float32)[:, None, None] * drift
    inside = (coords[..., 0] >= 0) & (coords[..., 0] < w0) & (coords[..., 1] >= 0) & (coords[..., 1] < h0)
    return coords, inside & (torch.rand(frames, n, generator=generator) > 0.1)


def _gather(x, idx):
    """x [b s f h d], idx [f n] -> [b n f h d] (no validity)."""
    frames = idx.shape[0]
    flat = rearrange(x, "b s f h d -> b (s f) h d")
    rows = idx.long() * frames + torch.arange(frames, device=x.device)[:, None]
    return rearrange(flat[:, rows.reshape(-1)], "b (f n) h d -> b n f h d", f=frames)


def _scatter_average(o, level, n_pix):
    """o [b n f h d] -> [b s f h d]: index_add_ sums and counts over the valid tokens."""
    batch, n, frames, heads, dim = o.shape
    ok = level.valid.reshape(-1)
    rows = (level.idx.long() + torch.arange(frames, device=o.device)[:, None] * n_pix).reshape(-1)[ok]
    tokens = rearrange(o, "b n f h d -> (f n) b (h d)")[ok]
    total = o.new_zeros(frames * n_pix, batch, heads * dim).index_add_(0, rows, tokens)
    count = torch.zeros(frames * n_pix, device=o.device, dtype=o.dtype).index_add_(0, rows, torch.ones_like(rows, dtype=o.dtype))
    out = total / count.clamp(min=1)[:, None, None]
    return rearrange(out, "(f s) b (h d) -> b s f h d", f=frames, h=heads)


def project(x, weights, batch, heads):
    """x [(b s), f, c] -> q, k, v [b s f h d] (dense projections, no bias)."""
    return tuple(rearrange(x @ w.t(), "(b s) f (h d) -> b s f h d", b=batch, h=heads) for w in weights[:3])


def to_out(o, level, weights):
    """o [b s f h d] -> [(b s), f, c]: to_out per pixel, its bias where a token landed."""
    w_o, b_o = weights[3], weights[4]
    landed = rearrange(level.landed, "f s -> 1 s f 1").to(o.dtype)
    return rearrange(rearrange(o, "b s f h d -> b s f (h d)") @ w_o.t() + landed * b_o, "b s f c -> (b s) f c")


# Cores: q, k, v [b s f h d] given -> [b s f h d] (gather, attend, scatter-average; no projections)


def sdpa_index_add_core(q, k, v, level):
    """The best plain-PyTorch core: precomputed indices, gather, SDPA on [b·n, h, f, d], index_add_."""
    valid = rearrange(level.valid, "f n -> 1 n f 1 1").to(q.dtype)
    qt, kt, vt = (_gather(t, level.idx) * valid for t in (q, k, v))
    o = F.scaled_dot_product_attention(*(rearrange(t, "b n f h d -> (b n) h f d") for t in (qt, kt, vt)))
    return _scatter_average(rearrange(o, "(b n) h f d -> b n f h d", b=q.shape[0]), level, q.shape[1])


def flex_core_factory(level, batch, frames, device):
    """FlexAttention over [1, h, (b n f), d] with a block-diagonal (same trajectory) mask; None if absent."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    total = batch * level.idx.shape[1] * frames

    def same_trajectory(b, h, q_idx, kv_idx):
        return (q_idx // frames) == (kv_idx // frames)

    block_mask = create_block_mask(same_trajectory, None, None, total, total, device=device)
    attend = torch.compile(flex_attention)

    def core(q, k, v):
        valid = rearrange(level.valid, "f n -> 1 n f 1 1").to(q.dtype)
        qt, kt, vt = (rearrange(_gather(t, level.idx) * valid, "b n f h d -> 1 h (b n f) d") for t in (q, k, v))
        o = rearrange(attend(qt, kt, vt, block_mask=block_mask), "1 h (b n f) d -> b n f h d", b=batch, f=frames)
        return _scatter_average(o, level, q.shape[1])

    return core


def official_core(q, k, v, coords, valid, frame_size, level_size, generator, ratio=2.0):
    """The official processor's attention part on given q, k, v: per-call subsampling and latent
    positions, advanced-indexing gather, attention per trajectory, Python loop of index_put_
    (accumulate) over batch and frames."""
    batch, n_pix, frames, heads, dim = q.shape
    height, width = level_size
    selection = subsample(coords.shape[1], num_samples(coords.shape[1], level_size, ratio), generator)
    ys, xs, vis = official_positions(coords, valid, selection, frame_size, level_size)
    frame_no = torch.arange(frames, device=q.device)[:, None]

    def gather(t):
        grid = rearrange(t, "b (y x) f h d -> b y x f h d", y=height)
        return rearrange(grid[:, ys, xs, frame_no] * vis[None, :, :, None, None].to(t.dtype),
                         "b f n h d -> (b n) h f d")

    o = rearrange(F.scaled_dot_product_attention(gather(q), gather(k), gather(v)), "(b n) h f d -> b f n (h d)",
                  b=batch)
    return rearrange(official_scatter_average(o, ys, xs, vis, level_size), "b f y x (h d) -> b (y x) f h d", h=heads)


def lightmotion_core(q, k, v, level, deterministic=True):
    return lm.trajectory_attention(q, k, v, level.index, deterministic=deterministic)


def reference_core(q, k, v, level):
    return trajectory_attention_reference(q, k, v, level.idx.long(), level.valid)


# Branches: x [(b s), f, c] -> [(b s), f, c] (projections, core, to_out with its bias where landed)


def sdpa_index_add_branch(x, level, weights, batch, heads):
    return to_out(sdpa_index_add_core(*project(x, weights, batch, heads), level), level, weights)


def flex_branch_factory(level, batch, frames, heads, device):
    core = flex_core_factory(level, batch, frames, device)
    if core is None:
        return None
    return lambda x, weights: to_out(core(*project(x, weights, batch, heads)), level, weights)


def lightmotion_branch(x, level, weights, batch, heads, deterministic=True):
    return to_out(lightmotion_core(*project(x, weights, batch, heads), level, deterministic), level, weights)


def reference_branch(x, level, weights, batch, heads):
    return to_out(reference_core(*project(x, weights, batch, heads), level), level, weights)


def branch_providers(x, tables, level, weights, batch, heads, device, with_flex=True, with_official=True):
    frames = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    providers = {
        "lightmotion": lambda: lightmotion_branch(x, level, weights, batch, heads),
        "lightmotion/atomic": lambda: lightmotion_branch(x, level, weights, batch, heads, deterministic=False),
        "reference": lambda: reference_branch(x, level, weights, batch, heads),
        "sdpa_index_add": lambda: sdpa_index_add_branch(x, level, weights, batch, heads),
    }
    if with_official:
        coords, valid = tables.coords.to(device), tables.valid.to(device)
        providers["official"] = lambda: official_trajectory_branch(
            x, coords, valid, tables.frame_size, level.size, batch, *weights, heads, generator=gen)
    if with_flex and device.type == "cuda":
        flex = flex_branch_factory(level, batch, frames, heads, device)
        if flex is not None:
            providers["flex"] = lambda: flex(x, weights)
    return providers


def core_providers(q, k, v, tables, level, device, with_flex=True, with_official=True):
    batch, _, frames, _, _ = q.shape
    gen = torch.Generator().manual_seed(1)
    providers = {
        "lightmotion": lambda: lightmotion_core(q, k, v, level),
        "lightmotion/atomic": lambda: lightmotion_core(q, k, v, level, deterministic=False),
        "reference": lambda: reference_core(q, k, v, level),
        "sdpa_index_add": lambda: sdpa_index_add_core(q, k, v, level),
    }
    if with_official:
        coords, valid = tables.coords.to(device), tables.valid.to(device)
        providers["official"] = lambda: official_core(q, k, v, coords, valid, tables.frame_size, level.size, gen)
    if with_flex and device.type == "cuda":
        flex = flex_core_factory(level, batch, frames, device)
        if flex is not None:
            providers["flex"] = lambda: flex(q, k, v)
    return providers


def _case(label, level_size, channels, heads, frames, batch, device, dtype, mode="fwd", quick=True, cpu=False,
          frame_size=(576, 1024), part="branch"):
    """part="core": q, k, v given (gather -> attend -> scatter-average, op trajectory_attention_core);
    "branch": x given (projections and to_out included, op trajectory_attention)."""
    height, width = level_size
    n_pix = height * width

    def setup():
        g = torch.Generator().manual_seed(0)
        n_traj = 4 * n_pix
        coords, valid = moving_points(frames, n_traj, frame_size, g)
        tables = TrajectoryTables(coords, valid, frame_size, level_size, levels=1, seed=0)
        level = tables.level(n_pix, device)
        train = mode == "fwd+bwd"
        if part == "core":
            qkv = [(torch.randn(batch, n_pix, frames, heads, channels // heads, generator=g) * 0.5)
                   .to(device, dtype).requires_grad_(train) for _ in range(3)]
            providers = core_providers(*qkv, tables, level, device)
            grad_shape = qkv[0].shape
        else:
            x = (torch.randn(batch * n_pix, frames, channels, generator=g) * 0.5).to(device, dtype).requires_grad_(train)
            weights = [(torch.randn(channels, channels, generator=g) / channels ** 0.5).to(device, dtype)
                       for _ in range(4)]
            weights.append(torch.randn(channels, generator=g).to(device, dtype) * 0.1)
            providers = branch_providers(x, tables, level, weights, batch, heads, device)
            grad_shape = x.shape
        if not train:
            return providers
        grad = torch.randn(grad_shape, generator=g).to(device, dtype)
        return {name: (lambda fn=fn: fn().backward(grad)) for name, fn in providers.items()}

    elem = torch.empty((), dtype=dtype).element_size()
    n_s = min(4 * n_pix, 2 * n_pix)
    dense = batch * n_pix * frames * channels
    gathered = 3 * batch * n_s * frames * channels
    attention_flops = 4.0 * batch * n_s * frames * frames * channels
    if part == "core":
        # least traffic: q/k/v each gathered once per token, the output written once
        nbytes = elem * (dense + gathered)
        flops = attention_flops
    else:
        # least traffic: x read once, the branch output written once, q/k/v each gathered once per token
        nbytes = elem * (2 * dense + gathered)
        flops = 8.0 * dense * channels + attention_flops
    scale = 2 if mode == "fwd+bwd" else 1
    op = "trajectory_attention_core" if part == "core" else "trajectory_attention"
    return Case(op=op, shape=f"{label} b={batch} f={frames} {height}x{width} {heads}x{channels // heads}",
                setup=setup, mode=mode, dtype=str(dtype).replace("torch.", ""), bytes=nbytes * scale,
                flops=flops * (3.0 if mode == "fwd+bwd" else 1.0), quick=quick, cpu=cpu,
                note=NOTE_CORE if part == "core" else NOTE)


def _unet_step_case(device, dtype):
    def setup():
        from diffusers import UNetSpatioTemporalConditionModel

        torch.manual_seed(0)
        unet = UNetSpatioTemporalConditionModel().to(device, dtype).eval()  # the SVD(-xt) config, random weights
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(2, 25, 8, 72, 128, generator=g).to(device, dtype)
        cond = dict(timestep=torch.tensor(500.0, device=device),
                    encoder_hidden_states=torch.randn(2, 1, 1024, generator=g).to(device, dtype),
                    added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * 2, device=device, dtype=dtype))
        coords, valid = moving_points(25, 4 * 72 * 128, (576, 1024), g)
        tables = TrajectoryTables(coords, valid, (576, 1024), (72, 128), levels=4, seed=0)
        patched_unet = UNetSpatioTemporalConditionModel().to(device, dtype).eval()
        patched_unet.load_state_dict(unet.state_dict())
        g2 = torch.Generator().manual_seed(1)
        from lightmotion_fast.integrations.diffusers.trajectory import temporal_attentions

        weights = []
        for _, attn in temporal_attentions(patched_unet):
            c = attn.to_q.in_features
            weights += [(torch.randn(c, c, generator=g2) / c ** 0.5).to(dtype) for _ in range(4)]
            weights.append(torch.zeros(c, dtype=dtype))
        lm.patch(patched_unet, trajectories=tables, traj_weights=weights)

        def step(model):
            with torch.no_grad():
                return model(sample, **cond).sample

        return {"unpatched": lambda: step(unet), "lightmotion": lambda: step(patched_unet)}

    return Case(op="trajectory_attention_unet", shape="SVD-xt UNet step b=2 f=25 72x128, 16 branches",
                setup=setup, mode="fwd", dtype=str(dtype).replace("torch.", ""), quick=False, cpu=False,
                note="lightmotion: the same UNet with all 16 trajectory branches (target ≤ 1.2× unpatched)")


def cases(device, quick):
    for dtype in (torch.float16, torch.bfloat16):
        for i, (h, w, c, heads) in enumerate(SVD_XT_LEVELS):
            for part in ("core", "branch"):
                for mode in ("fwd", "fwd+bwd"):
                    yield _case(f"SVD-xt L{i}", (h, w), c, heads, 25, 2, device, dtype, mode=mode,
                                quick=(i == 0 and dtype == torch.float16), part=part)
    yield _unet_step_case(device, torch.float16)
    for part in ("core", "branch"):
        for mode in ("fwd", "fwd+bwd"):
            yield _case("small", (12, 16), 64, 2, 8, 2, device, torch.float32, mode=mode, cpu=True,
                        frame_size=(96, 128), part=part)
