"""plucker_embedding against CameraCtrl's `ray_condition` (PyTorch over [B, V, H·W]), and on a GPU the
same function compiled by torch.compile (Inductor fuses the ray math and the cast into one kernel), at
AnimateDiff 16×256×384 and SVD 25×576×1024. The floor is the output written once at copy bandwidth: `bytes` is
the output alone, so "% of ceiling" is the fraction of the device's copy bandwidth achieved."""
import torch

import lightmotion_fast as lm
from lightmotion_fast.bench.scenario import Case
from lightmotion_fast.reference.plucker import plucker_embedding_reference

NOTE = ("cameractrl_ray_condition: CameraCtrl-style PyTorch rays on [B, V, H·W] (cross product over the xyz "
        "axis), permuted to [B, V, 6, H, W] and cast to the output dtype like ours; lightmotion runs with "
        "validate=False (the camera checks read values back to the host); torch_compile_ray_condition: the "
        "same function through torch.compile (fullgraph, static shapes), compiled outside the timing")


def cameractrl_ray_condition(intrinsics, c2w, height, width, dtype):
    """Written here in the style of CameraCtrl's ray_condition: K [B, V, 4], c2w [B, V, 4, 4]."""
    batch, views = intrinsics.shape[:2]
    j, i = torch.meshgrid(torch.linspace(0, height - 1, height, device=c2w.device, dtype=c2w.dtype),
                          torch.linspace(0, width - 1, width, device=c2w.device, dtype=c2w.dtype), indexing="ij")
    i = i.reshape(1, 1, height * width).expand(batch, views, -1) + 0.5
    j = j.reshape(1, 1, height * width).expand(batch, views, -1) + 0.5
    fx, fy, cx, cy = intrinsics.chunk(4, dim=-1)
    zs = torch.ones_like(i)
    xs = (i - cx) / fx * zs
    ys = (j - cy) / fy * zs
    directions = torch.stack((xs, ys, zs), dim=-1)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    rays_d = directions @ c2w[..., :3, :3].transpose(-1, -2)
    rays_o = c2w[..., :3, 3][:, :, None].expand_as(rays_d)
    rays_dxo = torch.linalg.cross(rays_o, rays_d, dim=-1)
    plucker = torch.cat([rays_dxo, rays_d], dim=-1).reshape(batch, views, height, width, 6)
    return plucker.permute(0, 1, 4, 2, 3).contiguous().to(dtype)


def cameras(batch, frames, height, width, device):
    g = torch.Generator().manual_seed(0)
    angles = torch.rand(batch, frames, generator=g) * 0.5
    c2w = torch.eye(4).repeat(batch, frames, 1, 1)
    c2w[..., 0, 0], c2w[..., 0, 2] = torch.cos(angles), torch.sin(angles)
    c2w[..., 2, 0], c2w[..., 2, 2] = -torch.sin(angles), torch.cos(angles)
    c2w[..., :3, 3] = torch.randn(batch, frames, 3, generator=g)
    k = torch.tensor([0.9 * width, 0.9 * width, width / 2, height / 2]).repeat(batch, frames, 1)
    return k.to(device), c2w.to(device)


def _case(label, batch, frames, height, width, device, dtype, quick=True, cpu=False):
    def setup():
        k, c2w = cameras(batch, frames, height, width, device)
        providers = {
            "lightmotion": lambda: lm.plucker_embedding(k, c2w, height, width, dtype=dtype, validate=False),
            "reference": lambda: plucker_embedding_reference(k, c2w, height, width, dtype=dtype),
            "cameractrl_ray_condition": lambda: cameractrl_ray_condition(k, c2w, height, width, dtype),
        }
        if device.type == "cuda":
            compiled = torch.compile(cameractrl_ray_condition, fullgraph=True, dynamic=False)
            compiled(k, c2w, height, width, dtype)  # compile outside the timing
            providers["torch_compile_ray_condition"] = lambda: compiled(k, c2w, height, width, dtype)
        return providers

    elem = torch.empty((), dtype=dtype).element_size()
    return Case(op="plucker_embedding", shape=f"{label} {batch}x{frames}x{height}x{width}", setup=setup,
                dtype=str(dtype).replace("torch.", ""), bytes=batch * frames * 6 * height * width * elem,
                quick=quick, cpu=cpu, note=NOTE)


def cases(device, quick):
    yield _case("AnimateDiff", 1, 16, 256, 384, device, torch.float16)
    yield _case("SVD", 1, 25, 576, 1024, device, torch.float16)
    yield _case("SVD bf16", 1, 25, 576, 1024, device, torch.bfloat16, quick=False)
    yield _case("AnimateDiff x2", 2, 16, 256, 384, device, torch.float16, quick=False)
    yield _case("small", 1, 4, 32, 48, device, torch.float32, cpu=True)
