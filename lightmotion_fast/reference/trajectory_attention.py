"""Reference trajectory attention (specs/trajectory_attention.md, "The operation").

Shapes (einops names): b batch, s = h·w latent pixels of one UNet level, f frames, n trajectories,
h attention heads (`heads` below, not the latent height), d head dim.

Trajectory n visits, at frame f, the latent pixel idx[f, n] (flat y·W + x) when valid[f, n].

    1. gather    Q[b, n, f] = q[b, idx[f, n], f] if valid[f, n] else 0      (same for K and V)
    2. attend    O[b, n] = softmax(Q Kᵀ / √d) V over the f frames of trajectory n. Invalid frames are
                 zero vectors and still count in the softmax (mask_invalid=False, as the official
                 code does); mask_invalid=True removes them as keys.
    3. average   out[b, p, f] = mean of O[b, n, f] over the valid tokens (f, n) with idx[f, n] = p;
                 0 where no valid token lands.
    4. to_out    (in the processor) applied per pixel, its bias only where a token landed: the same as
                 the official order (to_out per token, then averaging), since averaging is linear.

`group` = G > 1 generalises step 2: trajectories G·m … G·m + G − 1 (consecutive in idx's order) share
one softmax over their G·f tokens, token j·f + t being frame t of trajectory G·m + j. G = 1 is the
per-trajectory attention above (the paper's definition and the official xformers processor).

The `released` semantics (helpers at the end of this file) is what the released code computes on
torch 2.x with its SDPA processor (`MotionVectorAttnProcessor2_0`): on every call it draws a fresh
random subset of int(H·W/4)·8 trajectories from the global generator, in permutation order; scales the
coordinates in float64 as x·(W/W0) and truncates; counts any non-zero visibility as visible; and,
because it reshapes with the batch size of the dense input (b·H·W) instead of the token count, each
softmax runs over N·f/(H·W) consecutive tokens: G = N/(H·W) trajectories (2 when N = 2·H·W).

This file also builds the index tables in Python (per-level idx, subsampling, per-pixel CSR of
incoming tokens) — the C++ builder in csrc/trajectories.cpp must match these exactly — and holds
`official_trajectory_branch`, a readable re-implementation of the official processor's computation
(per-call subsampling, advanced-indexing gather, per-token to_out, a Python loop of index_put_),
which the benchmarks use as a peer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

# ---------------------------------------------------------------------------------------------
# Index building


def level_indices(coords: torch.Tensor, frame_size: tuple[int, int], level_size: tuple[int, int]) -> torch.Tensor:
    """Flat latent pixel of every trajectory point at one UNet level.

    coords: [f, n, 2] (x, y) in pixels of the original frame (H0, W0) = frame_size.
    level_size: (H, W). Returns idx [f, n] int64 with
    idx = clamp(floor(y·H/H0), 0, H−1)·W + clamp(floor(x·W/W0), 0, W−1).
    The arithmetic is float32 (x·W first, then / W0), as in the C++ builder.
    """
    height0, width0 = frame_size
    height, width = level_size
    c = coords.to(torch.float32)
    xs = torch.floor(c[..., 0] * float(width) / float(width0)).clamp(0, width - 1).to(torch.int64)
    ys = torch.floor(c[..., 1] * float(height) / float(height0)).clamp(0, height - 1).to(torch.int64)
    return ys * width + xs


def num_samples(num_trajectories: int, level_size: tuple[int, int], ratio: float) -> int:
    """N_s = min(N, ratio·H·W): how many trajectories one level keeps."""
    return int(min(num_trajectories, int(ratio * level_size[0] * level_size[1])))


def subsample(num_trajectories: int, keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`keep` distinct trajectory numbers drawn uniformly from a generator, in ascending order
    (ascending keeps the frame-0 gathers nearly sequential in memory). int64 on the CPU."""
    if keep >= num_trajectories:
        return torch.arange(num_trajectories, dtype=torch.int64)
    perm = torch.randperm(num_trajectories, generator=generator, dtype=torch.int64)
    return perm[:keep].sort().values


def incoming_csr(idx: torch.Tensor, valid: torch.Tensor, hw: int,
                 padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel lists of the valid tokens landing on it: a CSR table over the f·s rows (f, p).

    idx, valid: [f, n]. Returns rowptr [f·s + 1] and col [nnz] (int64): the tokens landing on pixel p
    of frame f are trajectories col[rowptr[f·s + p] : rowptr[f·s + p + 1]], in ascending order.
    The same table serves the backward pass: the tokens that *read* position (f, p) are the ones
    that land on it. padded=True returns col with all f·n entries (the invalid tokens after the
    nnz listed ones, never referenced by rowptr): every shape is then known without reading idx or
    valid, which `torch.compile(fullgraph=True)` needs.
    """
    frames, n = idx.shape
    total = frames * hw
    rows = torch.arange(frames, dtype=torch.int64, device=idx.device)[:, None] * hw + idx.to(torch.int64)
    rows = torch.where(valid, rows, total).reshape(-1)   # invalid tokens go to a row past the end
    cols = torch.arange(n, dtype=torch.int64, device=idx.device).expand(frames, n).reshape(-1)
    order = torch.argsort(rows * n + cols)                # distinct keys: row-major, ascending n
    counts = torch.zeros(total + 1, dtype=torch.int64, device=idx.device).scatter_add_(
        0, rows, torch.ones_like(rows))
    rowptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts[:total], 0)])
    col = cols[order]
    return rowptr, (col if padded else col[: int(rowptr[-1])])


def landed(idx: torch.Tensor, valid: torch.Tensor, hw: int) -> torch.Tensor:
    """[f, s] bool: pixels at least one valid token lands on (where to_out's bias applies)."""
    frames = idx.shape[0]
    hit = torch.zeros(frames, hw, dtype=torch.bool, device=idx.device)
    for f in range(frames):
        hit[f, idx[f][valid[f]].to(torch.int64)] = True
    return hit


# ---------------------------------------------------------------------------------------------
# The operation


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x: [b s f h d] -> [b n f h d]; x[b, idx[f, n], f] where valid[f, n], else 0."""
    frames = idx.shape[0]
    per_frame = [x[:, idx[f].to(torch.int64), f] for f in range(frames)]  # each [b n h d]
    tokens = torch.stack(per_frame, dim=2)
    return tokens * rearrange(valid, "f n -> 1 n f 1 1").to(tokens.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
           mask_invalid: bool = False) -> torch.Tensor:
    """Per-trajectory attention over frames. q, k, v: [b n f h d]; valid [f, n]. Returns [b n f h d]."""
    return torch.einsum("bnhfg,bnghd->bnfhd", attention_probs(q, k, valid, mask_invalid), v)


def attention_probs(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, mask_invalid: bool) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) over the frames of each trajectory: [b n h f g] (query frame f, key frame g)."""
    scores = torch.einsum("bnfhd,bnghd->bnhfg", q, k) * (1.0 / math.sqrt(q.shape[-1]))
    if mask_invalid:
        key_ok = rearrange(valid, "g n -> 1 n 1 1 g")
        scores = scores.masked_fill(~key_ok, float("-inf"))
        # A trajectory with no valid frame at all has no valid query either; keep its rows finite.
        scores = torch.where(key_ok.any(-1, keepdim=True), scores, torch.zeros_like(scores))
    return scores.softmax(dim=-1)


def scatter_average(tokens: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, hw: int) -> torch.Tensor:
    """tokens: [b n f h d] -> [b s f h d]: mean of the valid tokens landing on each pixel, 0 elsewhere."""
    batch, n, frames, heads, dim = tokens.shape
    out = tokens.new_zeros(batch, hw, frames, heads, dim)
    for f in range(frames):
        keep = valid[f]
        target = idx[f][keep].to(torch.int64)
        total = out[:, :, f].index_add(1, target, tokens[:, keep, f])
        count = torch.zeros(hw, dtype=tokens.dtype, device=tokens.device).index_add(
            0, target, torch.ones_like(target, dtype=tokens.dtype))
        out[:, :, f] = total / count.clamp(min=1).reshape(1, hw, 1, 1)
    return out


def group_tokens(tokens: torch.Tensor, group: int) -> torch.Tensor:
    """[b (m G) f h d] -> [b m (G f) h d]: G consecutive trajectories as one sequence of G·f tokens."""
    return rearrange(tokens, "b (m j) f h d -> b m (j f) h d", j=group)


def ungroup_tokens(tokens: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of `group_tokens`: [b m (G f) h d] -> [b (m G) f h d]."""
    return rearrange(tokens, "b m (j f) h d -> b (m j) f h d", j=group)


def group_valid(valid: torch.Tensor, group: int) -> torch.Tensor:
    """[f (m G)] -> [(G f) m]: the validity of the grouped tokens, laid out as `group_tokens` does."""
    return rearrange(valid, "f (m j) -> (j f) m", j=group)


def check_group(group: int, num_trajectories: int) -> None:
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int (trajectories per softmax), got {group!r}")
    if num_trajectories % group:
        raise ValueError(f"group={group} must divide the number of trajectories n = {num_trajectories} "
                         "(idx [f, n]): every softmax spans exactly `group` trajectories")


def trajectory_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                                   valid: torch.Tensor, mask_invalid: bool = False, group: int = 1) -> torch.Tensor:
    """q, k, v: [b s f h d] (projected densely: to_q/k/v have no bias, so projecting before the gather
    is exact); idx [f, n] in [0, s); valid [f, n] bool; group G (dividing n): trajectories per softmax.
    Returns [b s f h d] in q's dtype, computed in float32 (float64 inputs stay float64)."""
    check_group(group, idx.shape[1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qt, kt, vt = (gather_tokens(t.to(compute), idx, valid) for t in (q, k, v))
    if group == 1:
        tokens = attend(qt, kt, vt, valid, mask_invalid)
    else:
        grouped = (group_tokens(t, group) for t in (qt, kt, vt))
        tokens = ungroup_tokens(attend(*grouped, group_valid(valid, group), mask_invalid), group)
    return scatter_average(tokens, idx, valid, q.shape[1]).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# The official processor's computation, re-implemented readably (a benchmark peer)


def official_positions(coords: torch.Tensor, valid: torch.Tensor, selection: torch.Tensor,
                       frame_size: tuple[int, int], level_size: tuple[int, int]):
    """The official code's latent positions of the selected trajectories: (ys, xs) [f, n] int64,
    floor(coordinate · level / frame) in float32, clamped into the level; and their visibility [f, n]."""
    height, width = level_size
    selection = selection.to(coords.device)
    traj = coords[:, selection].to(torch.float32)
    xs = torch.floor(traj[..., 0] * float(width) / float(frame_size[1])).clamp(0, width - 1).long()
    ys = torch.floor(traj[..., 1] * float(height) / float(frame_size[0])).clamp(0, height - 1).long()
    return ys, xs, valid[:, selection]


def official_scatter_average(o: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, vis: torch.Tensor,
                             level_size: tuple[int, int]) -> torch.Tensor:
    """The official per-pixel average: o [b f n c] -> [b f y x c] by a Python loop of
    index_put_(accumulate=True) over batch and frames (visible tokens only; pixels nothing reaches: 0)."""
    batch, frames, _, channels = o.shape
    height, width = level_size
    total = o.new_zeros(batch, frames, height, width, channels)
    count = o.new_zeros(batch, frames, height, width, 1)
    for b in range(batch):
        for f in range(frames):
            keep = vis[f]
            where = (ys[f][keep], xs[f][keep])
            total[b, f].index_put_(where, o[b, f][keep], accumulate=True)
            count[b, f].index_put_(where, torch.ones_like(o[b, f][keep][:, :1]), accumulate=True)
    return total / count.clamp(min=1)


def official_trajectory_branch(x: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                               frame_size: tuple[int, int], level_size: tuple[int, int], batch: int,
                               w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
                               w_out: torch.Tensor, b_out: torch.Tensor, heads: int, ratio: float = 2.0,
                               generator: torch.Generator | None = None, mask_invalid: bool = False,
                               selection: torch.Tensor | None = None) -> torch.Tensor:
    """The trajectory branch the way the official processor computes it, on every call.

    x: [(b H W), f, c] (attn1's normalised input); coords [f, N, 2] (x, y) in frame pixels; valid
    [f, N]. Subsamples the trajectories afresh (or takes `selection`), computes their latent
    positions, gathers the hidden states with advanced indexing, projects and attends per trajectory,
    applies to_out per token, then averages per pixel with a Python loop of index_put_(accumulate=True)
    over batch and frames. Returns [(b H W), f, c].
    """
    height, width = level_size
    frames = x.shape[1]
    if selection is None:
        selection = subsample(coords.shape[1], num_samples(coords.shape[1], level_size, ratio), generator)
    ys, xs, vis = official_positions(coords, valid, selection, frame_size, level_size)

    grid = rearrange(x, "(b y x) f c -> b y x f c", b=batch, y=height, x=width)
    frame_no = torch.arange(frames, device=x.device)[:, None]
    tokens = grid[:, ys, xs, frame_no] * vis[None, :, :, None].to(x.dtype)  # [b f n c]
    tokens = rearrange(tokens, "b f n c -> (b n) f c")

    def split(t):
        return rearrange(t, "m f (h d) -> m h f d", h=heads)

    q, k, v = split(tokens @ w_q.t()), split(tokens @ w_k.t()), split(tokens @ w_v.t())
    mask = None
    if mask_invalid:
        key_ok = rearrange(vis, "f n -> n 1 1 f").repeat(batch, 1, 1, 1)
        mask = key_ok | ~key_ok.any(-1, keepdim=True)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o = rearrange(o, "m h f d -> m f (h d)") @ w_out.t() + b_out
    o = rearrange(o, "(b n) f c -> b f n c", b=batch)

    out = official_scatter_average(o, ys, xs, vis, level_size)
    return rearrange(out, "b f y x c -> (b y x) f c")


def trajectory_attention_backward_reference(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                            idx: torch.Tensor, valid: torch.Tensor,
                                            mask_invalid: bool = False,
                                            group: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `trajectory_attention_reference` w.r.t. q, k, v, written out (the kernels follow
    these formulas): dO of a token is dout at its pixel divided by the pixel's count; per trajectory
    (per group of `group` trajectories) dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K/√d,
    dK = dSᵀ Q/√d; each token's gradient is added back at the dense position it was gathered from.
    All [b s f h d]."""
    check_group(group, idx.shape[1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_pix = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    qt, kt, vt = (gather_tokens(t.to(compute), idx, valid) for t in (q, k, v))
    rowptr, _ = incoming_csr(idx, valid, n_pix)
    counts = rowptr[1:] - rowptr[:-1]
    frame_rows = torch.arange(idx.shape[0], device=idx.device)[:, None] * n_pix
    per_token = counts[frame_rows + idx.to(torch.int64)].clamp(min=1).to(compute)  # [f n]
    dot = gather_tokens(dout.to(compute), idx, valid) / rearrange(per_token, "f n -> 1 n f 1 1")
    if group > 1:  # a group of trajectories is one sequence: the formulas below run on it unchanged
        qt, kt, vt, dot = (group_tokens(t, group) for t in (qt, kt, vt, dot))
        valid_seq = group_valid(valid, group)
    else:
        valid_seq = valid

    probs = attention_probs(qt, kt, valid_seq, mask_invalid)
    o = torch.einsum("bnhfg,bnghd->bnfhd", probs, vt)
    dv_t = torch.einsum("bnhfg,bnfhd->bnghd", probs, dot)
    dp = torch.einsum("bnfhd,bnghd->bnhfg", dot, vt)
    delta = rearrange((dot * o).sum(-1), "b n f h -> b n h f 1")
    ds = probs * (dp - delta)
    dq_t = torch.einsum("bnhfg,bnghd->bnfhd", ds, kt) * scale
    dk_t = torch.einsum("bnhfg,bnfhd->bnghd", ds, qt) * scale

    def scatter_add(tokens):
        if group > 1:
            tokens = ungroup_tokens(tokens, group)
        dense = tokens.new_zeros(q.shape)
        for f in range(idx.shape[0]):
            keep = valid[f]
            dense[:, :, f] = dense[:, :, f].index_add(1, idx[f][keep].to(torch.int64), tokens[:, keep, f])
        return dense.to(q.dtype)

    return scatter_add(dq_t), scatter_add(dk_t), scatter_add(dv_t)


# ---------------------------------------------------------------------------------------------
# The released code's per-call tables (the `released` semantics, see the module docstring)

RELEASED_SPARSITY = 4   # the released processor's sparsity_factor ...
RELEASED_FACTOR = 8     # ... and the factor its sample count is multiplied by


def released_sample_count(level_size: tuple[int, int]) -> int:
    """int(H·W/4)·8: how many trajectories the released processor draws at a level (2·H·W when 4 | H·W)."""
    height, width = level_size
    return int(width * height / RELEASED_SPARSITY) * RELEASED_FACTOR


def released_selection(num_trajectories: int, level_size: tuple[int, int]) -> torch.Tensor:
    """The released processor's draw: torch.randperm(N)[:count] from the *global* CPU generator, one draw
    per call, kept in permutation order (the order decides which trajectories share a softmax).
    Fewer than `count` trajectories: all of them, permuted. [n_s] int64 on the CPU."""
    return torch.randperm(num_trajectories)[: released_sample_count(level_size)]


def released_level_indices(coords: torch.Tensor, frame_size: tuple[int, int],
                           level_size: tuple[int, int]) -> torch.Tensor:
    """Flat latent pixel [f, n] (int64) as the released code computes it: coords [f, n, 2] (x, y) in
    float64 times the Python float W/W0 (H/H0), truncated toward zero (`.long()`), then clamped.
    (Truncation and floor differ only in (−1, 0), which the clamp maps to 0 either way.)"""
    height0, width0 = frame_size
    height, width = level_size
    c = coords.to(torch.float64)
    xs = (c[..., 0] * (width / width0)).long().clamp(0, width - 1)
    ys = (c[..., 1] * (height / height0)).long().clamp(0, height - 1)
    return ys * width + xs


def released_visible(visibility: torch.Tensor) -> torch.Tensor:
    """The released code's `.bool()`: any non-zero visibility (NaN included) counts as visible."""
    return visibility.detach().cpu() != 0


def released_group(num_selected: int, level_size: tuple[int, int]) -> int:
    """Trajectories per softmax in the released code: its attention reshapes the [b·n, f] tokens with
    the dense batch size b·H·W, so each softmax spans n·f/(H·W) consecutive tokens, i.e. n/(H·W)
    whole trajectories. Where H·W does not divide n the released code either fails (n·f/(H·W) not an
    integer) or splits trajectories between softmaxes; neither is reproduced: ValueError."""
    height, width = level_size
    n_pix = height * width
    if num_selected == 0 or num_selected % n_pix:
        raise ValueError(
            f"the released semantics needs the number of trajectories used at a {height}x{width} level "
            f"({num_selected}: min(given, int(H·W/4)·8)) to be a positive multiple of H·W = {n_pix}; "
            "give at least 2·H·W trajectories at a level where 4 divides H·W (SVD's levels all qualify)")
    return num_selected // n_pix
