"""Wan 2.x: diffusers WanTransformer3DModel (self-attention over video tokens with 3D RoPE, then
cross-attention to the text; `WanAttention` modules with `WanAttnProcessor`)."""
from lightmotion_fast.integrations.diffusers.registry import ModelAdapter, register_adapter

ADAPTER = register_adapter(ModelAdapter(
    name="wan",
    model_class="WanTransformer3DModel",
    latent_layout="b c f h w",
    pipelines=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
    description="LoRA targets to_q, to_k, to_v, to_out.0 of every block's attn1 (video self-attention); "
                "LightMotion's subject mask from the text cross-attention attn2, a latent frame = 4 video frames",
))
