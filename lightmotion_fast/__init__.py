"""lightmotion_fast: fused kernels for camera- and motion-controlled video diffusion.

    import lightmotion_fast
    lightmotion_fast.patch(pipe)                 # accelerate what a diffusers pipeline already runs
    with lightmotion_fast.patched(pipe): ...     # scoped; unpatch(pipe) restores the original exactly

    out, exposed = lightmotion_fast.latent_permute(z, lightmotion_fast.CameraMotion(pan=(0.25, 0)))
"""
from lightmotion_fast import _ext
from lightmotion_fast.camera import CameraMotion
from lightmotion_fast.ops import Backend, backend, latent_permute, latent_permute_affine
from lightmotion_fast.ops.latent_resample import build_fill_map, latent_edit, latent_resample
from lightmotion_fast.ops.snr_reinject import snr_noise, snr_reinject
from lightmotion_fast.ops.multi_lora import multi_lora_linear
from lightmotion_fast.ops.dual_cross_attention import dual_cross_attention
from lightmotion_fast.ops.plucker import plucker_embedding
from lightmotion_fast.ops.reference_attention import reference_attention
from lightmotion_fast.ops.trajectory_attention import trajectory_attention
from lightmotion_fast.camera.trajectories import TrajectoryTables, trajectories_from_depth, trajectories_from_tracks

__version__ = "0.1.0"


def patch(pipe, **options):
    """Swap lightmotion_fast's fused paths into a diffusers pipeline (or model). See
    lightmotion_fast.integrations.diffusers.patch."""
    from lightmotion_fast.integrations.diffusers import patch as _patch

    return _patch(pipe, **options)


def unpatch(pipe):
    """Restore exactly the processors, forwards and scheduler that `patch` replaced."""
    from lightmotion_fast.integrations.diffusers import unpatch as _unpatch

    return _unpatch(pipe)


def patched(pipe, **options):
    """Context manager: `patch` on entry, `unpatch` on exit."""
    from lightmotion_fast.integrations.diffusers import patched as _patched

    return _patched(pipe, **options)


def extension_available() -> bool:
    """True when the compiled C++ extension lightmotion_fast._C is loaded."""
    return _ext.available()


__all__ = [
    "trajectory_attention",
    "TrajectoryTables",
    "trajectories_from_depth",
    "trajectories_from_tracks",
    "Backend",
    "CameraMotion",
    "backend",
    "dual_cross_attention",
    "extension_available",
    "latent_permute",
    "latent_permute_affine",
    "build_fill_map",
    "latent_edit",
    "latent_resample",
    "snr_noise",
    "snr_reinject",
    "multi_lora_linear",
    "patch",
    "patched",
    "plucker_embedding",
    "reference_attention",
    "unpatch",
]
