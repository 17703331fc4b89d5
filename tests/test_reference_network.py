"""MotionFlow's reference network end to end on tiny models: an SD1.5-style UNet2DConditionModel as
the reference network writes its spatial self-attention inputs, AnimateDiff's UNetMotionModel reads
them through the fused reference_attention, in one call. The float64 comparison runs the Triton
kernel (the interpreter on CPU, seconds per launch); the structural tests run the op's PyTorch path."""
import pytest
import torch
from einops import rearrange

import lightmotion_fast as lm
import lightmotion_fast.integrations.diffusers.ip_adapter as ip
from lightmotion_fast.integrations.diffusers.ip_adapter import ReferenceAttnProcessor
from lightmotion_fast.integrations.diffusers.reference_net import ReferenceNet, pair_reference_layers
from lightmotion_fast.reference.reference_attention import width_concat_attention
from tiny_models import tiny_unet2d, tiny_unet_motion

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention  # noqa: E402

FRAMES = 4
SPATIAL_ATTN1 = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                 "mid_block.attentions.0.transformer_blocks.0.attn1",
                 "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                 "up_blocks.1.attentions.1.transformer_blocks.0.attn1"]


def reference_inputs(batch=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(reference_latents=torch.randn(batch, 4, 8, 8, generator=g),
                reference_encoder_hidden_states=torch.randn(batch, 7, 32, generator=g))


def video_inputs(videos=1, frames=FRAMES, seed=13):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(videos, 4, frames, 8, 8, generator=g), timestep=torch.tensor(10),
                encoder_hidden_states=torch.randn(videos * frames, 7, 32, generator=g))


def record_attn1_inputs(unet):
    """Forward pre-hooks of our own (independent of the writer): {attn1 name: hidden states in}."""
    seen, handles = {}, []
    for name, m in unet.named_modules():
        if name in SPATIAL_ATTN1:
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0])))
    return seen, handles


class WidthConcatProcessor:
    """Plain PyTorch, the paper's formulation (MotionFlow §3.5): the layer's feature map m and the
    reference map p [c h w] side by side along the width, self-attention, the left half kept."""

    def __init__(self, bank):
        self.bank = bank

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        batch, n, c = hidden_states.shape
        side = int(round(n ** 0.5))
        p = self.bank
        per_row = batch // p.shape[0]
        p = torch.stack([p[i // per_row] for i in range(batch)])  # row i: its video's reference
        to_map = lambda t: rearrange(t, "b (hh w) c -> b c hh w", hh=side)  # noqa: E731
        out = width_concat_attention(to_map(hidden_states), to_map(p), attn.to_q, attn.to_k, attn.to_v, attn.heads)
        out = attn.to_out[1](attn.to_out[0](rearrange(out, "b h n d -> b n (h d)")))
        return out / attn.rescale_output_factor


def plain_video_forward(reference_unet, video_unet, ref, vid):
    """Reference forward with our own hooks, then the video U-Net with WidthConcatProcessor on each
    spatial attn1 (a deep copy: the caller's U-Nets stay as they are)."""
    import copy

    reference_unet, video_unet = copy.deepcopy(reference_unet), copy.deepcopy(video_unet)
    seen, _ = record_attn1_inputs(reference_unet)
    reference_unet(ref["reference_latents"], vid["timestep"], ref["reference_encoder_hidden_states"])
    for name, m in video_unet.named_modules():
        if name in SPATIAL_ATTN1:
            m.set_processor(WidthConcatProcessor(seen[name]))
    return video_unet(**vid).sample, seen


def test_bank_round_trips_through_the_fused_op_and_equals_width_concatenation_in_float64():
    reference_unet, video_unet = tiny_unet2d(), tiny_unet_motion()
    ref, vid = reference_inputs(), video_inputs(frames=2)
    with torch.no_grad():
        want, want_bank = plain_video_forward(reference_unet.double(), video_unet.double(),
                                              {k: v.double() for k, v in ref.items()},
                                              {k: v.double() if v.is_floating_point() else v for k, v in vid.items()})
        reference_unet, video_unet = reference_unet.float(), video_unet.float()
        plain = video_unet(**vid).sample
        net = ReferenceNet(reference_unet, video_unet)
        bank = net.capture(ref["reference_latents"], vid["timestep"], ref["reference_encoder_hidden_states"])
        assert sorted(bank) == sorted(SPATIAL_ATTN1)
        for name in SPATIAL_ATTN1:  # the writer holds exactly what entered the reference attn1
            torch.testing.assert_close(bank[name].double(), want_bank[name], atol=1e-5, rtol=1e-5)
        calls = []
        real = ip.reference_attention
        ip.reference_attention = lambda *a, **k: calls.append(a[3].shape) or real(*a, **k)
        try:
            got = net(**vid, **ref).sample
        finally:
            ip.reference_attention = real
    # Every spatial self-attention went through the fused op with the bank as its extra keys.
    assert len(calls) == 4 and {s[0] for s in calls} == {2}
    assert net.bank.features is None  # cleared after the call
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the reference changed the video


def test_only_spatial_self_attention_gets_readers_and_remove_restores_exactly():
    reference_unet, video_unet = tiny_unet2d(), tiny_unet_motion()
    ref, vid = reference_inputs(), video_inputs()
    procs = {(id(unet), name): m.processor for unet in (reference_unet, video_unet)
             for name, m in unet.named_modules() if isinstance(m, Attention)}
    ref_procs = {n: m.processor for n, m in reference_unet.named_modules() if isinstance(m, Attention)}
    keys = (list(reference_unet.state_dict()), list(video_unet.state_dict()))
    with torch.no_grad(), lm.backend("reference"):
        before = video_unet(**vid).sample, reference_unet(ref["reference_latents"], 10,
                                                          ref["reference_encoder_hidden_states"]).sample
        net = ReferenceNet(reference_unet, video_unet)
        kinds = {}
        for name, m in video_unet.named_modules():
            if isinstance(m, Attention):
                kind = "temporal" if "motion_modules" in name else "spatial-" + name[-5:]
                readers = kinds.setdefault(kind, [0, 0])
                readers[0] += 1
                readers[1] += isinstance(m.processor, ReferenceAttnProcessor)
        # 4 spatial attn1 and 4 spatial attn2; 7 motion modules × 2 temporal self-attentions.
        assert kinds == {"spatial-attn1": [4, 4], "spatial-attn2": [4, 0], "temporal": [14, 0]}
        assert sorted(net.readers) == sorted(SPATIAL_ATTN1)
        # The reference U-Net keeps its processors (writers are hooks), and gets a hook per attn1.
        assert all(m.processor is ref_procs[n] for n, m in reference_unet.named_modules() if isinstance(m, Attention))
        hooked = [n for n, m in reference_unet.named_modules() if m._forward_pre_hooks]
        assert sorted(hooked) == sorted(SPATIAL_ATTN1)
        net(**vid, **reference_inputs())
        net.remove()
        after = video_unet(**vid).sample, reference_unet(ref["reference_latents"], 10,
                                                         ref["reference_encoder_hidden_states"]).sample
    for unet in (reference_unet, video_unet):
        for name, m in unet.named_modules():
            if isinstance(m, Attention):
                assert m.processor is procs[id(unet), name], name
            assert not m._forward_pre_hooks, name
    assert (list(reference_unet.state_dict()), list(video_unet.state_dict())) == keys
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_one_reference_per_video_equals_the_reference_repeated_per_frame():
    """r = number of videos: every frame of video i attends to reference i (AnimateDiff's (b f) batch)."""
    net = ReferenceNet(tiny_unet2d(), tiny_unet_motion())
    vid = video_inputs(videos=2, frames=2)
    ref = reference_inputs(batch=2)
    per_frame = {k: v.repeat_interleave(2, dim=0) for k, v in ref.items()}
    with torch.no_grad(), lm.backend("reference"):
        per_video = net(**vid, **ref).sample
        repeated = net(**vid, **per_frame).sample
        swapped = net(**vid, **{k: v.flip(0) for k, v in ref.items()}).sample
        torch.testing.assert_close(per_video, repeated, atol=1e-5, rtol=1e-5)
        assert (swapped - per_video).abs().max() > 1e-4
        with pytest.raises(ValueError, match="has batch 3; the layer's attention batch is 4"):
            net(**vid, **reference_inputs(batch=3))
    assert net.bank.features is None  # cleared after the failed call too


def test_gradients_reach_the_reference_network():
    reference_unet, video_unet = tiny_unet2d(), tiny_unet_motion()
    net = ReferenceNet(reference_unet, video_unet)
    with lm.backend("reference"):
        net(**video_inputs(frames=2), **reference_inputs()).sample.square().mean().backward()
    # Layers before a written attn1 learn through the bank; the reference U-Net's own output does
    # not enter the loss, so its output conv gets no gradient at all.
    feeding = [reference_unet.conv_in.weight, reference_unet.down_blocks[0].resnets[0].conv1.weight,
               reference_unet.mid_block.resnets[0].conv1.weight, reference_unet.time_embedding.linear_1.weight]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in feeding)
    assert reference_unet.conv_out.weight.grad is None


def test_gradient_checkpointing_in_the_video_unet_is_a_clear_error():
    """The bank is cleared when the video U-Net returns, so checkpointed blocks would recompute their
    readers without it in the backward (torch's CheckpointError, 52 vs 45 saved tensors): refused up front
    while grad is on; under no_grad the call runs."""
    reference_unet, video_unet = tiny_unet2d(), tiny_unet_motion()
    video_unet.enable_gradient_checkpointing()
    net = ReferenceNet(reference_unet, video_unet).train()
    with lm.backend("reference"):
        with pytest.raises(NotImplementedError, match="disable_gradient_checkpointing"):
            net(**video_inputs(frames=2), **reference_inputs())
        with torch.no_grad():
            net(**video_inputs(frames=2), **reference_inputs())


def test_mismatched_networks_are_a_clear_error():
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=4,
        attention_head_dim=4)
    video_unet = tiny_unet_motion()
    with pytest.raises(ValueError, match=r"reference layers without a video layer: \['down_blocks.1.attentions.0"):
        ReferenceNet(other, video_unet)
    with pytest.raises(ValueError, match="differ in width"):
        pair_reference_layers(tiny_unet2d(), video_unet, layer_map={
            SPATIAL_ATTN1[0]: SPATIAL_ATTN1[1], SPATIAL_ATTN1[1]: SPATIAL_ATTN1[0],
            SPATIAL_ATTN1[2]: SPATIAL_ATTN1[2], SPATIAL_ATTN1[3]: SPATIAL_ATTN1[3]})
    with pytest.raises(ValueError, match="video layers without a reference layer"):
        pair_reference_layers(tiny_unet2d(), video_unet, layer_map={name: "nope" for name in SPATIAL_ATTN1})
    # Nothing was installed by the failed constructions.
    assert not any(isinstance(m.processor, ReferenceAttnProcessor)
                   for m in video_unet.modules() if isinstance(m, Attention))


def test_a_reader_without_its_entry_in_an_active_bank_raises():
    net = ReferenceNet(tiny_unet2d(), tiny_unet_motion())
    net.bank.features = {}
    with torch.no_grad(), lm.backend("reference"), \
            pytest.raises(ValueError, match="wrote no features for layer 'down_blocks.0"):
        net.video_unet(**video_inputs(frames=2))
    net.bank.clear()
    with torch.no_grad(), lm.backend("reference"):  # inactive bank: the video U-Net alone runs plain self-attention
        net.video_unet(**video_inputs(frames=2))


def test_motionflow_end_to_end_camera_encoder_reference_net_and_video_unet():
    """The README's MotionFlow example on tiny models: Plücker maps -> camera encoder -> per-level
    tokens in the reference U-Net's cross-attention -> bank -> the video U-Net's reference attention.
    At initialisation the camera changes nothing (zero-initialised join); one training step's
    gradient reaches the encoder's output projections through the bank."""
    from lightmotion_fast.integrations.diffusers.camera_encoder import CameraEncoder
    from lightmotion_fast.integrations.diffusers.ip_adapter import install_camera_token_processors

    frames = 2
    reference_unet, video_unet = tiny_unet2d(), tiny_unet_motion()
    install_camera_token_processors(reference_unet, camera_dim=(6, 10), zero_init=False)
    encoder = CameraEncoder(channels=(8, 16), token_dims=(6, 10), downscale=2, groups=4, heads=2)
    net = ReferenceNet(reference_unet, video_unet)
    c2w = torch.eye(4).repeat(1, frames, 1, 1)
    c2w[0, :, 0, 3] = torch.linspace(0, 0.3, frames)
    k = torch.tensor([20.0, 20.0, 8.0, 8.0]).expand(1, frames, 4)
    rays = lm.plucker_embedding(k, c2w, 16, 16, relative=True)       # [1, f, 6, 16, 16]
    vid = video_inputs(frames=frames)
    ref = {k: v.repeat_interleave(frames, 0) for k, v in reference_inputs().items()}  # per-frame maps
    with lm.backend("reference"):
        with torch.no_grad():
            no_camera = net(**vid, **ref).sample
        tokens = encoder(rays)
        assert [tuple(t.shape) for t in tokens] == [(frames, 64, 6), (frames, 16, 10)]
        out = net(**vid, **ref, reference_cross_attention_kwargs={"camera_tokens": tokens}).sample
        torch.testing.assert_close(out, no_camera, rtol=0, atol=1e-6)
        out.square().mean().backward()
    assert all(encoder.to_tokens[i].weight.grad.abs().max() > 0 for i in range(2))
    net.remove()


def test_attached_runs_the_reference_network_at_every_step_of_a_pipeline():
    """`with net.attached(...)`: AnimateDiffPipeline's loop calls the video U-Net as usual; before each
    call the reference U-Net runs at that step's timestep, and what the U-Net returns equals a direct
    `net(...)` call on the same inputs. Outside the block (and after remove()) the pipeline is plain."""
    from tiny_models import animatediff_inputs, tiny_animatediff_pipeline

    pipe = tiny_animatediff_pipeline()
    frames, steps = 2, 2
    with torch.no_grad(), lm.backend("reference"):
        plain = pipe(**animatediff_inputs(frames=frames, steps=steps)).frames
        net = ReferenceNet(tiny_unet2d(), pipe.unet)
        g = torch.Generator().manual_seed(4)
        ref_latents = torch.randn(1, 4, 16, 16, generator=g)
        ref_tokens = torch.randn(1, 7, 32, generator=g)
        doubled = torch.cat([ref_latents, ref_latents]), torch.cat([ref_tokens, ref_tokens])  # CFG batch
        timesteps, calls = [], []
        net.reference_unet.register_forward_pre_hook(lambda m, args: timesteps.append(int(args[1])))
        pipe.unet.register_forward_hook(
            lambda m, args, kwargs, out: calls.append((args, kwargs, out.sample)), with_kwargs=True)
        with net.attached(*doubled):
            guided = pipe(**animatediff_inputs(frames=frames, steps=steps)).frames
        assert net.bank.features is None
        assert timesteps == [int(t) for t in pipe.scheduler.timesteps] and len(calls) == steps
        args, kwargs, out = calls[0]
        direct = net(*args, **kwargs, reference_latents=doubled[0], reference_encoder_hidden_states=doubled[1]).sample
        torch.testing.assert_close(direct, out, rtol=0, atol=0)
        assert (guided - plain).abs().max() > 1e-4
        net.remove()
        again = pipe(**animatediff_inputs(frames=frames, steps=steps)).frames
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
