"""lightmotion_fast: fused kernels for camera- and motion-controlled video diffusion.

    import lightmotion_fast
    lightmotion_fast.patch(pipe)                 # accelerate what a diffusers pipeline already runs
    with lightmotion_fast.patched(pipe): ...     # scoped; unpatch(pipe) restores the original exactly

    out, exposed = lightmotion_fast.latent_permute(z, lightmotion_fast.CameraMotion(pan=(0.25, 0)))
"""
from lightmotion_fast import _ext
from lightmotion_fast.camera import CameraMotion
from lightmotion_fast.camera.trajectories import TrajectoryTables, trajectories_from_depth, trajectories_from_tracks
from lightmotion_fast.ops import (
    Backend,
    backend,
    build_fill_map,
    dual_cross_attention,
    latent_edit,
    latent_permute,
    latent_permute_affine,
    latent_resample,
    multi_lora_linear,
    plucker_embedding,
    reference_attention,
    snr_noise,
    snr_reinject,
    trajectory_attention,
)

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
    # dispatch
    "Backend", "backend", "extension_available",
    # diffusers integration
    "patch", "patched", "unpatch",
    # LightMotion
    "CameraMotion", "build_fill_map", "latent_edit", "latent_permute", "latent_permute_affine",
    "latent_resample", "snr_noise", "snr_reinject",
    # Trajectory Attention
    "TrajectoryTables", "trajectories_from_depth", "trajectories_from_tracks", "trajectory_attention",
    # LiON-LoRA
    "multi_lora_linear",
    # MotionFlow
    "dual_cross_attention", "plucker_embedding", "reference_attention",
]
