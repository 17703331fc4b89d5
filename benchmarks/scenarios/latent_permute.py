"""latent_permute against the per-frame reference loop, one advanced-indexing gather, torch.take with
precomputed offsets, grid_sample, and (on a GPU) the gather with its index math compiled by
torch.compile (Inductor fuses the affine math, the gather and the masked fill into one kernel).

Bytes: what the op must move — kept pixels read (exposed ones are not), every output element
written, and the [f, h, w] bool mask written."""
import torch
import torch.nn.functional as F
from einops import rearrange

import lightmotion_fast as lm
from lightmotion_fast.bench.scenario import Case
from lightmotion_fast.reference.latent_permute import latent_permute_reference, source_positions

CAMERA = lm.CameraMotion(pan=(0.25, -0.125), zoom=0.16, rotate=-16)


def vectorised_gather(inv_affine, frames, height, width, device):
    """The best plain-PyTorch version: indices precomputed once, then one advanced-indexing gather
    over all frames and planes, and a masked fill of the exposed pixels."""
    src_y, src_x, kept = source_positions(inv_affine.cpu(), height, width)
    flat = torch.where(kept, src_y * width + src_x, 0).reshape(frames, height * width).to(device)
    frame_ix = torch.arange(frames, device=device)[:, None]
    exposed = (~kept).reshape(frames, height * width).to(device)

    def run(z):  # z: [b c f h w]
        planes = z.reshape(z.shape[0] * z.shape[1], frames, height * width)
        out = planes[:, frame_ix, flat].masked_fill_(exposed, 0)
        return out.reshape(z.shape)

    return run


def take_precomputed(inv_affine, z_shape, device):
    """torch.take with every output element's flat source offset precomputed (int64, as large as the
    latent), and the exposed elements zeroed by a precomputed mask."""
    b, c, frames, height, width = z_shape
    src_y, src_x, kept = source_positions(inv_affine.cpu(), height, width)
    frame_base = (torch.arange(frames) * height * width)[:, None, None]
    per_frame = torch.where(kept, frame_base + src_y * width + src_x, 0)
    planes = torch.arange(b * c)[:, None] * frames * height * width
    index = (planes + per_frame.reshape(1, -1)).reshape(z_shape).to(device)
    exposed = (~kept).to(device)

    def run(z):  # z: contiguous [b c f h w]
        return torch.take(z, index).masked_fill_(exposed, 0)

    return run


def compiled_gather(frames, height, width):
    """The index math, the gather and the fill written as plain PyTorch and compiled by Inductor."""
    def permute(z, inv):  # z: [b c f h w], inv: [f, 2, 3]
        y = torch.arange(height, device=z.device, dtype=torch.float32)[:, None]
        x = torch.arange(width, device=z.device, dtype=torch.float32)[None, :]
        a = inv.reshape(frames, 6)[:, :, None, None]
        sx = torch.floor(a[:, 0] * x + a[:, 1] * y + a[:, 2] + 0.5).long()
        sy = torch.floor(a[:, 3] * x + a[:, 4] * y + a[:, 5] + 0.5).long()
        kept = (sx >= 0) & (sx < width) & (sy >= 0) & (sy < height)
        flat = torch.where(kept, sy * width + sx, 0) + torch.arange(frames, device=z.device)[:, None, None] * height * width
        planes = z.reshape(z.shape[0], z.shape[1], -1)
        out = planes[:, :, flat.reshape(-1)].reshape(z.shape)
        return torch.where(kept, out, torch.zeros((), dtype=z.dtype, device=z.device)), ~kept

    return torch.compile(permute, fullgraph=True, dynamic=False)


def grid_sample_nearest(inv_affine, frames, height, width, batch, device, dtype):
    """torch.nn.functional.grid_sample, nearest mode, zero padding, on (b f) c h w frames."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    inv = inv_affine.cpu()
    sx = inv[:, 0, 0, None, None] * x + inv[:, 0, 1, None, None] * y + inv[:, 0, 2, None, None]
    sy = inv[:, 1, 0, None, None] * x + inv[:, 1, 1, None, None] * y + inv[:, 1, 2, None, None]
    grid = torch.stack([2 * sx / max(width - 1, 1) - 1, 2 * sy / max(height - 1, 1) - 1], dim=-1)
    grid = grid.repeat(batch, 1, 1, 1).to(device, dtype)

    def run(z):  # z: [b c f h w]
        frames_in = rearrange(z, "b c f h w -> (b f) c h w")
        out = F.grid_sample(frames_in, grid, mode="nearest", padding_mode="zeros", align_corners=True)
        return rearrange(out, "(b f) c h w -> b c f h w", b=batch)

    return run


def _case(label, shape, layout, device, dtype, quick, cpu=True):
    def setup():
        z = torch.randn(shape, device=device, dtype=dtype)
        zc = z if layout == "b c f h w" else z.transpose(1, 2)          # b c f h w view
        b, c, f, h, w = zc.shape
        inv = CAMERA.inverse_affines(f, h, w, device=device)
        gather = vectorised_gather(inv, f, h, w, device)
        gsample = grid_sample_nearest(inv, f, h, w, b, device, dtype)
        zcc = zc.contiguous()
        take = take_precomputed(inv, zcc.shape, device)
        providers = {
            "lightmotion": lambda: lm.latent_permute(z, CAMERA, layout=layout),
            "reference": lambda: latent_permute_reference(zc, inv),
            "torch_gather": lambda: gather(zc),
            "torch_take_offsets": lambda: take(zcc),
            "grid_sample_nearest": lambda: gsample(zc),
        }
        if device.type == "cuda":
            compiled = compiled_gather(f, h, w)
            providers["torch_compile_gather"] = lambda: compiled(zcc, inv)
            compiled(zcc, inv)  # compile outside the timing
        return providers

    return Case(op="latent_permute", shape=f"{label} {'x'.join(map(str, shape))}", setup=setup,
                dtype=str(dtype).replace("torch.", ""), bytes=permute_bytes(shape, layout, dtype), quick=quick,
                cpu=cpu, note="bytes: kept pixels read, all written, the mask written; torch_take_offsets also "
                "reads its int64 offsets (not counted)")


def permute_bytes(shape, layout, dtype) -> int:
    """Bytes the permutation must move: read the kept sources, write every output, write the mask."""
    b, c, f, h, w = shape if layout == "b c f h w" else (shape[0], shape[2], shape[1], shape[3], shape[4])
    _, _, kept = source_positions(CAMERA.inverse_affines(f, h, w), h, w)
    elem = torch.empty((), dtype=dtype).element_size()
    return int(kept.sum()) * b * c * elem + b * c * f * h * w * elem + f * h * w


def cases(device, quick):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    yield _case("AnimateDiff", (2, 4, 16, 64, 64), "b c f h w", device, dtype, quick=True)
    yield _case("SVD-xt", (2, 25, 4, 72, 128), "b f c h w", device, dtype, quick=True)
    # >= 256 MB: what the op does at full bandwidth.
    yield _case("bandwidth", (8, 16, 32, 128, 128), "b c f h w", device, torch.float32, quick=False)
