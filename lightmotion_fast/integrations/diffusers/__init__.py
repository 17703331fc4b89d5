"""diffusers integration: `patch(pipe)`, `unpatch(pipe)`, `patched(pipe)`.

Importing this package registers the model-family adapters and the patch features. Each feature
lives in its own module and is listed in FEATURE_MODULES (order is the install order).
"""
import importlib

from lightmotion_fast.integrations.diffusers import animatediff, cogvideox, svd, unet2d, wan  # noqa: F401  (adapters)
from lightmotion_fast.integrations.diffusers.registry import (
    ADAPTERS,
    FEATURES,
    Feature,
    ModelAdapter,
    PatchContext,
    is_patched,
    patch,
    patch_state,
    patched,
    register_adapter,
    register_feature,
    unpatch,
)

FEATURE_MODULES: list[str] = [
    "lightmotion",
    "lora",
    "lion_tokens",
    "ip_adapter",
    "trajectory",
]

for _name in FEATURE_MODULES:
    importlib.import_module(f"lightmotion_fast.integrations.diffusers.{_name}")

from lightmotion_fast.integrations.diffusers.lion_tokens import lion_state, set_lion_scales  # noqa: E402

__all__ = [
    "ADAPTERS", "FEATURES", "Feature", "ModelAdapter", "PatchContext", "is_patched", "patch",
    "patch_state", "patched", "register_adapter", "register_feature", "unpatch", "lion_state", "set_lion_scales",
]
