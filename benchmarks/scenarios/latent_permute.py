"""latent_permute against the per-frame reference loop, one advanced-indexing gather, and grid_sample."""
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
        return {
            "lightmotion": lambda: lm.latent_permute(z, CAMERA, layout=layout),
            "reference": lambda: latent_permute_reference(zc, inv),
            "torch_gather": lambda: gather(zc),
            "grid_sample_nearest": lambda: gsample(zc),
        }

    numel = 1
    for s in shape:
        numel *= s
    elem = torch.empty((), dtype=dtype).element_size()
    return Case(op="latent_permute", shape=f"{label} {'x'.join(map(str, shape))}", setup=setup,
                dtype=str(dtype).replace("torch.", ""), bytes=2 * numel * elem, quick=quick, cpu=cpu)


def cases(device, quick):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    yield _case("AnimateDiff", (2, 4, 16, 64, 64), "b c f h w", device, dtype, quick=True)
    yield _case("SVD-xt", (2, 25, 4, 72, 128), "b f c h w", device, dtype, quick=True)
    # >= 256 MB: what the op does at full bandwidth.
    yield _case("bandwidth", (8, 16, 32, 128, 128), "b c f h w", device, torch.float32, quick=False)
