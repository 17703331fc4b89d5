"""Stable Video Diffusion: diffusers UNetSpatioTemporalConditionModel."""
from lightmotion_fast.integrations.diffusers.registry import ModelAdapter, register_adapter

ADAPTER = register_adapter(ModelAdapter(
    name="svd",
    model_class="UNetSpatioTemporalConditionModel",
    latent_layout="b f c h w",
    pipelines=("StableVideoDiffusionPipeline",),
    description="temporal self-attention in attn1 of every TemporalBasicTransformerBlock; "
                "cross-attention has a single image token",
))
