"""Small diffusers models of the real classes, from configs with random weights (no downloads).

Shared by the integration tests. Seeds are fixed, so two calls build identical weights.
"""
from __future__ import annotations

import torch


def tiny_unet2d(cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=4,
    ).eval()


def tiny_motion_adapter():
    from diffusers import MotionAdapter

    torch.manual_seed(1)
    return MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4,
                         motion_num_attention_heads=2, motion_max_seq_length=32)


def tiny_unet_motion():
    from diffusers import UNetMotionModel

    return UNetMotionModel.from_unet2d(tiny_unet2d(), tiny_motion_adapter()).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4).eval()


def tiny_animatediff_pipeline():
    """AnimateDiffPipeline without tokenizer or text encoder: call it with prompt_embeds."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              steps_offset=1)
    pipe = AnimateDiffPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_unet2d(),
                               motion_adapter=tiny_motion_adapter(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def animatediff_inputs(frames: int = 4, seed: int = 0, steps: int = 2):
    g = torch.Generator().manual_seed(123)
    return dict(prompt_embeds=torch.randn(1, 7, 32, generator=g), negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
                num_frames=frames, height=16, width=16, num_inference_steps=steps, guidance_scale=7.5,
                output_type="pt", generator=torch.Generator().manual_seed(seed))


def tiny_svd_unet():
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(3)
    return UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=16, num_attention_heads=(2, 4), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, num_frames=4,
    ).eval()


def svd_unet_inputs(frames: int = 4):
    g = torch.Generator().manual_seed(7)
    return dict(sample=torch.randn(1, frames, 8, 8, 8, generator=g), timestep=torch.tensor(10.0),
                encoder_hidden_states=torch.randn(1, 1, 16, generator=g), added_time_ids=torch.randn(1, 3, generator=g))


def tiny_cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(4)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    ).eval()


def cogvideox_inputs():
    g = torch.Generator().manual_seed(9)
    return dict(hidden_states=torch.randn(1, 3, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
                timestep=torch.tensor([5]))


def tiny_wan():
    """A two-block WanTransformer3DModel (2 heads x 8, text width 16) with random weights."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(5)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()


def wan_inputs(frames: int = 3):
    """Latent "b c f h w" (Wan's layout), 8 text tokens."""
    g = torch.Generator().manual_seed(10)
    return dict(hidden_states=torch.randn(1, 4, frames, 8, 8, generator=g), timestep=torch.tensor([5]),
                encoder_hidden_states=torch.randn(1, 8, 16, generator=g))


def unet2d_inputs():
    g = torch.Generator().manual_seed(11)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor(10),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g))


def unet_motion_inputs(frames: int = 4):
    g = torch.Generator().manual_seed(13)
    return dict(sample=torch.randn(1, 4, frames, 8, 8, generator=g), timestep=torch.tensor(10),
                encoder_hidden_states=torch.randn(frames, 7, 32, generator=g))


def tiny_animatediff_v2v_pipeline(scheduler=None):
    """AnimateDiffVideoToVideoPipeline from the same tiny parts (call it with prompt_embeds)."""
    from diffusers import AnimateDiffVideoToVideoPipeline, DDIMScheduler

    scheduler = scheduler or DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                           clip_sample=False, steps_offset=1)
    pipe = AnimateDiffVideoToVideoPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_unet2d(),
                                           motion_adapter=tiny_motion_adapter(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def animatediff_v2v_inputs(frames: int = 2, steps: int = 4, strength: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(321)
    video = torch.rand(1, frames, 3, 16, 16, generator=g)
    return dict(video=video, prompt_embeds=torch.randn(1, 7, 32, generator=g),
                negative_prompt_embeds=torch.randn(1, 7, 32, generator=g), height=16, width=16,
                num_inference_steps=steps, strength=strength, guidance_scale=7.5, output_type="pt",
                generator=torch.Generator().manual_seed(seed))


def add_random_lora(model, rank: int = 4, seed: int = 0, name: str = "default"):
    """A peft LoRA adapter on every attention projection, with random (non-zero) A and B."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                      adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# -- DiT video pipelines (CogVideoX, Wan) with a tiny T5 tokenizer and text encoder ---------------------------

TINY_T5_WORDS = ("a", "corgi", "runs", "on", "grass", "the", "beach", "cat", "sleeps", "dog", "in", "snow")


def tiny_t5_tokenizer(max_length: int = 16):
    """A T5-style fast tokenizer built in memory (no download): whole words of TINY_T5_WORDS as
    '▁word' pieces after a Metaspace split, '</s>' appended, '<pad>' = 0, '<unk>' for anything else."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{"\u2581" + w: i + 3 for i, w in enumerate(TINY_T5_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_t5_encoder(width: int = 16, umt5: bool = False):
    """A one-layer T5 (CogVideoX) or UMT5 (Wan) encoder of `width` with random weights."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(6)
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=3 + len(TINY_T5_WORDS), d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return model_cls(config).eval()


def cogvideox_scheduler():
    """CogVideoX's own scheduler as CogVideoX-5B ships it: CogVideoXDDIMScheduler (v-prediction, trailing
    spacing, zero terminal SNR, SNR shift 3)."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing",
                                  rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0)


def wan_scheduler():
    """Wan's own scheduler as Wan 2.1 ships it: UniPC multistep on flow sigmas (flow prediction, shift 3)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                   num_train_timesteps=1000)


def tiny_cogvideox_pipeline(image_to_video: bool = False):
    """CogVideoXPipeline (or CogVideoXImageToVideoPipeline) with a 3-block AutoencoderKLCogVideoX (4x spatial,
    4x temporal), a two-block transformer (2 heads x 8; x 16 with the RoPE of the I2V model), text width 16, 16 text tokens, and
    CogVideoX's own CogVideoXDDIMScheduler."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXImageToVideoPipeline, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    torch.manual_seed(7)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8), down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, temporal_compression_ratio=4).eval()
    torch.manual_seed(8)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16 if image_to_video else 8, in_channels=8 if image_to_video else 4,
        out_channels=4,
        time_embed_dim=4, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
        use_rotary_positional_embeddings=image_to_video, use_learned_positional_embeddings=False,
    ).eval()
    cls = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
    pipe = cls(tokenizer=tiny_t5_tokenizer(16), text_encoder=tiny_t5_encoder(16), vae=vae, transformer=transformer,
               scheduler=cogvideox_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cogvideox_pipeline_inputs(steps: int = 5, seed: int = 0, image_to_video: bool = False, **overrides):
    """9 video frames (3 latent frames) at 32 x 32 (8 x 8 latent, 4 x 4 tokens per frame); latents out."""
    call = dict(prompt="a corgi runs on the beach", negative_prompt="", num_frames=9, height=32, width=32,
                num_inference_steps=steps, guidance_scale=6.0, max_sequence_length=16, output_type="latent",
                generator=torch.Generator().manual_seed(seed))
    if image_to_video:
        call["image"] = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(31))
    return {**call, **overrides}


def tiny_wan_pipeline(image_to_video: bool = False, text_tokens: int = 16):
    """WanPipeline (or WanImageToVideoPipeline, Wan 2.2 style: no image encoder, the first frame's latent
    concatenated on channels) with a tiny AutoencoderKLWan (8x spatial, 4x temporal, 4 latent channels),
    a two-block transformer (2 heads x 8, text width 16) and Wan's own UniPC flow scheduler."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    torch.manual_seed(9)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    torch.manual_seed(10)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12 if image_to_video else 4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()
    parts = dict(tokenizer=tiny_t5_tokenizer(text_tokens), text_encoder=tiny_t5_encoder(16, umt5=True), vae=vae,
                 transformer=transformer, scheduler=wan_scheduler())
    pipe = (WanImageToVideoPipeline(image_encoder=None, image_processor=None, **parts) if image_to_video
            else WanPipeline(**parts))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_pipeline_inputs(steps: int = 5, seed: int = 0, image_to_video: bool = False, **overrides):
    """9 video frames (3 latent frames) at 64 x 64 (8 x 8 latent, 4 x 4 tokens per frame); latents out.
    Image-to-video takes prompt embeddings: WanImageToVideoPipeline's prompt cleaning needs `ftfy`."""
    call = dict(prompt="a corgi runs on the beach", negative_prompt="", num_frames=9, height=64, width=64,
                num_inference_steps=steps, guidance_scale=5.0, max_sequence_length=16, output_type="latent",
                generator=torch.Generator().manual_seed(seed))
    if image_to_video:
        g = torch.Generator().manual_seed(32)
        call.update(image=torch.rand(1, 3, 64, 64, generator=g), prompt=None, negative_prompt=None,
                    prompt_embeds=torch.randn(1, 16, 16, generator=g), negative_prompt_embeds=torch.randn(1, 16, 16, generator=g))
    return {**call, **overrides}
