"""Image U-Nets (SD1.5, SDXL): diffusers UNet2DConditionModel, e.g. with IP-Adapter processors."""
from lightmotion_fast.integrations.diffusers.registry import ModelAdapter, register_adapter

ADAPTER = register_adapter(ModelAdapter(
    name="unet2d",
    model_class="UNet2DConditionModel",
    latent_layout="b c h w",
    pipelines=("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
    description="image U-Net; IP-Adapter processors on attn2",
))
