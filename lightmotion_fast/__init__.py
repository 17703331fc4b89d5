"""lightmotion_fast: fused kernels for camera- and motion-controlled video diffusion.

    import lightmotion_fast
    lightmotion_fast.patch(pipe)                 # accelerate what a diffusers pipeline already runs
    with lightmotion_fast.patched(pipe): ...     # scoped; unpatch(pipe) restores the original exactly

    out, exposed = lightmotion_fast.latent_permute(z, lightmotion_fast.CameraMotion(pan=(0.25, 0)))
"""
from lightmotion_fast import _ext
from lightmotion_fast.camera import CameraMotion
from lightmotion_fast.camera.trajectories import TrajectoryTables, trajectories_from_depth, trajectories_from_tracks
from lightmotion_fast.camera.trajectory_sources import (
    camera_preset,
    depth_from_disparity,
    merge_tracks_with_camera,
    trajectories_from_flow,
)
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
    TrajectoryIndex,
    trajectory_attention,
)

__version__ = "0.1.0"


_PATCH_API = ("patch", "patched", "unpatch", "is_patched", "patch_state")


def __getattr__(name):
    """The patch API lives in lightmotion_fast.integrations.diffusers (imported on first use, so that
    `import lightmotion_fast` stays light); help(lightmotion_fast.patch) lists every option."""
    if name in _PATCH_API:
        from lightmotion_fast.integrations import diffusers as _diffusers

        value = getattr(_diffusers, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightmotion_fast' has no attribute {name!r}")


def extension_available() -> bool:
    """True when the compiled C++ extension lightmotion_fast._C is loaded."""
    return _ext.available()


def clear_caches() -> None:
    """Drop what the ops derived from user tensors and keep between calls: the multi-LoRA weight packs
    (concatenated, padded, scaled LoRA weights) and the fill maps' decoded source offsets.

    Both rebuild by themselves when a tensor is changed through PyTorch (its version counter) or freed.
    Writes PyTorch does not see, through `.data`, a NumPy view (`t.numpy()[...] = ...`) or DLPack, are
    not noticed: call this after them."""
    from lightmotion_fast.ops.latent_resample import SOURCE_OFFSETS
    from lightmotion_fast.ops.multi_lora import clear_weight_cache

    clear_weight_cache()
    SOURCE_OFFSETS.clear()


__all__ = [
    # dispatch
    "Backend", "backend", "clear_caches", "extension_available",
    # diffusers integration
    "patch", "patched", "unpatch", "is_patched", "patch_state",
    # LightMotion
    "CameraMotion", "build_fill_map", "latent_edit", "latent_permute", "latent_permute_affine",
    "latent_resample", "snr_noise", "snr_reinject",
    # Trajectory Attention
    "TrajectoryIndex", "TrajectoryTables", "trajectories_from_depth", "trajectories_from_tracks", "trajectory_attention",
    "camera_preset", "depth_from_disparity", "merge_tracks_with_camera", "trajectories_from_flow",
    # LiON-LoRA
    "multi_lora_linear",
    # MotionFlow
    "dual_cross_attention", "plucker_embedding", "reference_attention",
]
