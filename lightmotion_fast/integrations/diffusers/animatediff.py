"""AnimateDiff: SD1.5 U-Net with motion modules (diffusers UNetMotionModel)."""
from lightmotion_fast.integrations.diffusers.registry import ModelAdapter, register_adapter

ADAPTER = register_adapter(ModelAdapter(
    name="animatediff",
    model_class="UNetMotionModel",
    latent_layout="b c f h w",
    pipelines=("AnimateDiffPipeline", "AnimateDiffVideoToVideoPipeline"),
    description="text cross-attention in attn2 of the spatial transformer blocks; motion modules "
                "attend over frames",
))
