"""CogVideoX: diffusers CogVideoXTransformer3DModel (joint text-video attention)."""
from lightmotion_fast.integrations.diffusers.registry import ModelAdapter, register_adapter

ADAPTER = register_adapter(ModelAdapter(
    name="cogvideox",
    model_class="CogVideoXTransformer3DModel",
    latent_layout="b f c h w",
    pipelines=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"),
    description="LoRA targets to_q, to_k, to_v, to_out.0 of every block's attn1; LightMotion's subject mask "
                "from the text part of attn1 (joint text-video attention), a latent frame = 4 video frames",
))
