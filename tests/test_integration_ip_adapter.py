"""IP-Adapter drop-in and MotionFlow processors on small real diffusers models with random weights."""
import copy
import logging

import pytest
import torch

import lightmotion_fast
from lightmotion_fast.integrations.diffusers import ip_adapter
from lightmotion_fast.integrations.diffusers.ip_adapter import (
    FusedIPAdapterAttnProcessor,
    install_camera_token_processors,
    install_reference_processors,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0  # noqa: E402
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection  # noqa: E402

CROSS_DIM, IMAGE_EMBED_DIM = 32, 24


def install_ip_adapters(unet, num_tokens=(4, 16), scales=(0.7, 0.4)):
    """What diffusers' load_ip_adapter does, with random weights instead of a checkpoint."""
    procs = {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor") and "motion_modules" not in name:
            block = name.split(".")[0]
            if block == "mid_block":
                hidden = unet.config.block_out_channels[-1]
            elif block == "up_blocks":
                hidden = list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])]
            else:
                hidden = unet.config.block_out_channels[int(name.split(".")[1])]
            p = IPAdapterAttnProcessor2_0(hidden, CROSS_DIM, num_tokens=list(num_tokens), scale=list(scales))
            for layer in (*p.to_k_ip, *p.to_v_ip):
                torch.nn.init.normal_(layer.weight, std=0.2)
            procs[name] = p
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(cross_attention_dim=CROSS_DIM, image_embed_dim=IMAGE_EMBED_DIM, num_image_text_embeds=n)
         for n in num_tokens])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    return unet


def tiny_unet(**kw):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, norm_num_groups=16, **kw)
    return unet.eval()


def unet_inputs(batch=2, num_tokens=(4, 16)):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 7, CROSS_DIM, generator=g)
    image_embeds = [torch.randn(batch, 1, IMAGE_EMBED_DIM, generator=g) for _ in num_tokens]
    return sample, text, image_embeds


@pytest.mark.parametrize("with_mask", [False, True])
def test_patch_equals_ip_adapter_processor_on_unet(with_mask, monkeypatch):
    unet = install_ip_adapters(tiny_unet())
    sample, text, image_embeds = unet_inputs()
    kwargs = {}
    if with_mask:  # diffusers' key-padding mask on the text tokens (padding at the end of sample 1)
        mask = torch.ones(2, 7)
        mask[1, 5:] = 0
        kwargs["encoder_attention_mask"] = mask
    with torch.no_grad():
        want = unet(sample, 10, text, added_cond_kwargs={"image_embeds": image_embeds}, **kwargs).sample
        originals = dict(unet.attn_processors)
        lightmotion_fast.patch(unet)
        calls = []
        real = ip_adapter.dual_cross_attention
        monkeypatch.setattr(ip_adapter, "dual_cross_attention", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
        fused = [p for p in unet.attn_processors.values() if isinstance(p, FusedIPAdapterAttnProcessor)]
        assert len(fused) == sum(isinstance(p, IPAdapterAttnProcessor2_0) for p in originals.values()) > 0
        with lightmotion_fast.backend("triton"):
            got = unet(sample, 10, text, added_cond_kwargs={"image_embeds": image_embeds}, **kwargs).sample
        lightmotion_fast.unpatch(unet)
    assert all(unet.attn_processors[k] is v for k, v in originals.items())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert calls and all(n == 3 for n in calls)  # text + two adapters in each fused launch
    for p in originals.values():  # the image prompts do matter: without them the output differs
        if isinstance(p, IPAdapterAttnProcessor2_0):
            p.scale = [0.0, 0.0]
    with torch.no_grad():
        without_ip = unet(sample, 10, text, added_cond_kwargs={"image_embeds": image_embeds}, **kwargs).sample
    assert (without_ip - want).abs().max() > 1e-3


def test_set_ip_adapter_scale_while_patched_and_zero_scale():
    unet = install_ip_adapters(tiny_unet())
    sample, text, image_embeds = unet_inputs()
    lightmotion_fast.patch(unet)
    fused = next(p for p in unet.attn_processors.values() if isinstance(p, FusedIPAdapterAttnProcessor))
    # diffusers' set_ip_adapter_scale writes processor.scale[i] in place: it must reach the original.
    for p in unet.attn_processors.values():
        if isinstance(p, IPAdapterAttnProcessor2_0):
            p.scale[0], p.scale[1] = 0.0, 1.3
    assert fused.original.scale == [0.0, 1.3]
    with torch.no_grad(), lightmotion_fast.backend("triton"):
        got = unet(sample, 3, text, added_cond_kwargs={"image_embeds": image_embeds}).sample
    lightmotion_fast.unpatch(unet)
    with torch.no_grad():
        want = unet(sample, 3, text, added_cond_kwargs={"image_embeds": image_embeds}).sample
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_regional_ip_adapter_masks_match():
    from diffusers.image_processor import IPAdapterMaskProcessor

    unet = install_ip_adapters(tiny_unet(), num_tokens=(4,), scales=(0.8,))
    sample, text, _ = unet_inputs(num_tokens=(4,))
    g = torch.Generator().manual_seed(5)
    image_embeds = [torch.randn(2, 2, IMAGE_EMBED_DIM, generator=g)]      # two images for the one adapter
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, :, :8] = 1
    masks[1, :, :, 8:] = 1
    ip_masks = [IPAdapterMaskProcessor().preprocess(masks, height=16, width=16).reshape(1, 2, 16, 16)]
    call = dict(added_cond_kwargs={"image_embeds": image_embeds}, cross_attention_kwargs={"ip_adapter_masks": ip_masks})
    with torch.no_grad():
        want = unet(sample, 5, text, **call).sample
        with lightmotion_fast.patched(unet), lightmotion_fast.backend("triton"):
            got = unet(sample, 5, text, **call).sample
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_camera_token_processor():
    unet = tiny_unet()
    sample, text, _ = unet_inputs()
    with torch.no_grad():
        plain = unet(sample, 4, text).sample
        procs = install_camera_token_processors(unet, camera_dim=12, scale=0.5)
        assert procs and all(n.endswith("attn2") for n in procs)
        cam = torch.randn(2, 6, 12)
        # Zero-initialised camera projections: the model is unchanged until they are trained.
        with lightmotion_fast.backend("reference"):  # (the processor logic; the kernel runs below)
            zero_init = unet(sample, 4, text, cross_attention_kwargs={"camera_tokens": cam}).sample
        torch.testing.assert_close(zero_init, plain, atol=2e-5, rtol=1e-4)
        for p in procs.values():
            torch.nn.init.normal_(p.to_k_cam.weight, std=0.3)
            torch.nn.init.normal_(p.to_v_cam.weight, std=0.3)
        with lightmotion_fast.backend("triton"):
            got = unet(sample, 4, text, cross_attention_kwargs={"camera_tokens": cam}).sample
            no_cam = unet(sample, 4, text).sample
        # Against the same model computed with two SDPA calls: an IP-Adapter processor holding the
        # camera projections is the same formula with camera tokens as "image" tokens.
        ref = copy.deepcopy(unet)
        for name, attn in ref.named_modules():
            if name in procs:
                cp = procs[name]
                ip = IPAdapterAttnProcessor2_0(cp.hidden_size, 12, num_tokens=(6,), scale=0.5)
                ip.to_k_ip[0].weight.copy_(cp.to_k_cam.weight)
                ip.to_v_ip[0].weight.copy_(cp.to_v_cam.weight)
                attn.set_processor(ip)
        want = ref(sample, 4, (text, [cam])).sample
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(no_cam, plain, atol=2e-5, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3


def test_reference_processor_equals_width_concatenation():
    unet = tiny_unet()
    procs = install_reference_processors(unet)
    name, attn = next((n, m) for n, m in unet.named_modules() if n in procs)
    x = torch.randn(2, 12, attn.query_dim)      # tokens of m
    bank = torch.randn(2, 9, attn.query_dim)    # tokens of the reference map p
    with torch.no_grad(), lightmotion_fast.backend("triton"):
        got = attn(x, reference_bank={name: bank})
        plain = attn(x)
        attn.set_processor(AttnProcessor2_0())
        # Self-attention over [m; p], keeping m's outputs: the paper's concatenation.
        want = attn(torch.cat([x, bank], 1))[:, :12]
        torch.testing.assert_close(plain, attn(x), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_per_call_kwargs_do_not_warn_on_other_layers():
    """The layers without our processors (self-attention for camera tokens, cross-attention for the
    reference bank) ignore `camera_tokens` / `reference_bank`, as intended: diffusers' "not expected"
    warning, one line per layer per call, is silenced for exactly these keys, and still logged for
    any other unexpected key."""
    logger = logging.getLogger("diffusers.models.attention_processor")
    records = _Records()
    logger.addHandler(records)
    before = list(logger.filters)
    try:
        logger.filters = [f for f in before if not isinstance(f, ip_adapter._PerCallKwargsFilter)]
        unet = tiny_unet()
        sample, text, _ = unet_inputs()
        cam = torch.randn(2, 6, 12)
        with torch.no_grad(), lightmotion_fast.backend("reference"):
            # Before any installer ran, diffusers warns (the test would pass vacuously otherwise).
            unet(sample, 4, text, cross_attention_kwargs={"camera_tokens": cam})
            assert any("camera_tokens" in m for m in records.messages)
            records.messages.clear()
            cams = install_camera_token_processors(unet, camera_dim=12)
            refs = install_reference_processors(unet)
            name = next(iter(refs))
            bank = {name: torch.randn(2, 9, unet.get_submodule(name).query_dim)}
            unet(sample, 4, text, cross_attention_kwargs={"camera_tokens": cam, "reference_bank": bank})
            assert records.messages == []
            unet(sample, 4, text, cross_attention_kwargs={"camera_tokens": cam, "camera_token": cam})
        assert len(records.messages) == len(cams) + len(refs)  # every layer warns about the typo
        assert all("camera_token'" in m for m in records.messages)
        install_camera_token_processors(unet, camera_dim=12)  # installed once, however often called
        assert sum(isinstance(f, ip_adapter._PerCallKwargsFilter) for f in logger.filters) == 1
        # Another U-Net without our processors: its layers would silently drop the tokens, so diffusers'
        # line is not silenced there (the filter had been global).
        records.messages.clear()
        with torch.no_grad(), lightmotion_fast.backend("reference"):
            tiny_unet()(sample, 4, text, cross_attention_kwargs={"camera_tokens": cam})
        assert records.messages and all("camera_tokens" in m for m in records.messages)
    finally:
        logger.removeHandler(records)
        logger.filters = before


def test_patch_animatediff_pipeline_with_ip_adapter_equals_unpatched():
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNetMotionModel

    unet2d = tiny_unet()
    torch.manual_seed(1)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=16,
                            motion_num_attention_heads=2, motion_max_seq_length=8)
    unet = install_ip_adapters(UNetMotionModel.from_unet2d(unet2d, adapter), num_tokens=(4,), scales=(0.8,)).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=adapter,
                               scheduler=DDIMScheduler(), feature_extractor=None, image_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    call = dict(prompt_embeds=torch.randn(1, 7, CROSS_DIM, generator=g),
                negative_prompt_embeds=torch.randn(1, 7, CROSS_DIM, generator=g),
                ip_adapter_image_embeds=[torch.randn(2, 1, IMAGE_EMBED_DIM, generator=g)],  # (negative, positive)
                num_frames=4, height=16, width=16, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    with torch.no_grad():
        want = pipe(**call, generator=torch.Generator().manual_seed(3)).frames
        lightmotion_fast.patch(pipe)
        assert "ip_adapter" in lightmotion_fast.integrations.diffusers.patch_state(pipe).installed
        fused = [p for p in pipe.unet.attn_processors.values() if isinstance(p, FusedIPAdapterAttnProcessor)]
        assert len(fused) == sum(1 for n in pipe.unet.attn_processors if n.endswith("attn2.processor")
                                 and "motion_modules" not in n) > 0
        with lightmotion_fast.backend("triton"):
            got = pipe(**call, generator=torch.Generator().manual_seed(3)).frames
        lightmotion_fast.unpatch(pipe)
    assert not any(isinstance(p, FusedIPAdapterAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
