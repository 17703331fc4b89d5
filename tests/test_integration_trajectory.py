"""Trajectory branch on small real-class SVD models: patch/unpatch, weights, fused == reference == official."""
import numpy as np
import pytest
import torch

import lightmotion_fast
from lightmotion_fast.camera.trajectories import TrajectoryTables
from lightmotion_fast.integrations.diffusers.trajectory import (
    PARAM_NAMES,
    TrajectoryAttnProcessor,
    temporal_attentions,
    trajectory_state_dict,
)
from lm_testing import random_official_weights
from tiny_models import svd_unet_inputs, tiny_svd_unet

FRAMES = 4


def coords_for(size, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(FRAMES, n, 2, generator=g) * size, torch.rand(FRAMES, n, generator=g) > 0.2


def run(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def test_zero_output_projection_leaves_unet_unchanged_and_unpatch_restores():
    unet, inputs = tiny_svd_unet(), svd_unet_inputs(FRAMES)
    originals = [attn.processor for _, attn in temporal_attentions(unet)]
    keys = set(unet.state_dict())
    base = run(unet, inputs)
    coords, valid = coords_for(64)
    lightmotion_fast.patch(unet, trajectories=coords, valid=valid)
    procs = [attn.processor for _, attn in temporal_attentions(unet)]
    assert len(procs) == 4 and all(isinstance(p, TrajectoryAttnProcessor) for p in procs)
    assert all(p.base_processor is o for p, o in zip(procs, originals))
    # Q, K, V copied from the temporal attention, output projection zero
    for (_, attn), p in zip(temporal_attentions(unet), procs):
        assert torch.equal(p.to_q.weight, attn.to_q.weight) and torch.equal(p.to_v.weight, attn.to_v.weight)
        assert not p.to_out[0].weight.any() and not p.to_out[0].bias.any()
    assert len(trajectory_state_dict(unet)) == 4 * len(PARAM_NAMES)
    with lightmotion_fast.backend("triton"):
        patched = run(unet, inputs)
    assert torch.equal(patched, base)
    lightmotion_fast.unpatch(unet)
    assert [attn.processor for _, attn in temporal_attentions(unet)] == originals
    assert "forward" not in unet.__dict__ and set(unet.state_dict()) == keys
    assert torch.equal(run(unet, inputs), base)


def test_fused_processor_equals_reference_and_official_computation():
    unet, inputs = tiny_svd_unet(), svd_unet_inputs(FRAMES)
    base = run(unet, inputs)
    coords, valid = coords_for(64)
    weights = random_official_weights(unet)
    lightmotion_fast.patch(unet, trajectories=coords, valid=valid, traj_weights=weights)
    with lightmotion_fast.backend("triton"):
        fused = run(unet, inputs)
    with lightmotion_fast.backend("reference"):
        reference = run(unet, inputs)
    for _, attn in temporal_attentions(unet):
        attn.processor.implementation = "official"
    official = run(unet, inputs)
    assert (fused - base).abs().max() > 1e-2  # the branch does something
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(official, reference, rtol=1e-4, atol=1e-4)
    lightmotion_fast.unpatch(unet)


def test_weights_from_state_dict_equal_official_list():
    unet = tiny_svd_unet()
    coords, _ = coords_for(64)
    weights = random_official_weights(unet, seed=3)
    lightmotion_fast.patch(unet, trajectories=coords, traj_weights=weights)
    sd = {k: v.clone() for k, v in trajectory_state_dict(unet).items()}
    assert torch.equal(list(sd.values())[3], weights[3])  # to_out.0.weight of the first branch
    full = {k: v.clone() for k, v in unet.state_dict().items() if ".processor." in k}
    lightmotion_fast.unpatch(unet)
    for source in (sd, full):
        lightmotion_fast.patch(unet, trajectories=coords, traj_weights=source)
        assert all(torch.equal(a, b) for a, b in zip(trajectory_state_dict(unet).values(), sd.values()))
        lightmotion_fast.unpatch(unet)


def test_bad_patch_inputs_raise():
    unet, inputs = tiny_svd_unet(), svd_unet_inputs(FRAMES)
    coords, valid = coords_for(64)
    with pytest.raises(ValueError, match="must hold 20 tensors"):
        lightmotion_fast.patch(unet, trajectories=coords, traj_weights=random_official_weights(unet)[:-1])
    assert not lightmotion_fast.integrations.diffusers.is_patched(unet)
    with pytest.raises(ValueError, match="valid= without trajectories="):
        lightmotion_fast.patch(unet, valid=valid)
    with pytest.raises(ValueError, match=r"visibility must have shape"):
        lightmotion_fast.patch(unet, trajectories=coords, valid=valid[:, :5])
    lightmotion_fast.patch(unet, trajectories=coords[:3], valid=valid[:3])
    with pytest.raises(ValueError, match="trajectories have 3 frames but the UNet is called with 4"):
        run(unet, inputs)
    lightmotion_fast.unpatch(unet)
    tables = TrajectoryTables(coords, valid, frame_size=(64, 64), latent_size=(4, 4))
    lightmotion_fast.patch(unet, trajectories=tables)
    with pytest.raises(ValueError, match=r"built for a \(4, 4\) latent"):
        run(unet, inputs)
    lightmotion_fast.unpatch(unet)
    # valid= beside tables would be silently ignored (the tables carry their own visibility)
    with pytest.raises(ValueError, match="valid= cannot be combined with trajectories=TrajectoryTables"):
        lightmotion_fast.patch(unet, trajectories=tables, valid=valid)
    assert not lightmotion_fast.is_patched(unet)


def tiny_svd_pipeline():
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(4)
    vae = AutoencoderKLTemporalDecoder(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                       block_out_channels=(32,), layers_per_block=1, latent_channels=4).eval()
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1, num_attention_heads=2,
        image_size=224, patch_size=56)).eval()
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", use_karras_sigmas=True,
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=tiny_svd_unet(), scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_svd_pipeline_patch_zero_branch_and_fused_equals_reference():
    from PIL import Image

    pipe = tiny_svd_pipeline()
    image = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8"))

    def frames():
        return pipe(image, height=16, width=16, num_frames=FRAMES, num_inference_steps=2, decode_chunk_size=FRAMES,
                    output_type="pt", motion_bucket_id=10, fps=6, noise_aug_strength=0.0,
                    generator=torch.Generator().manual_seed(0)).frames

    base = frames()
    coords, valid = coords_for(16, n=12)
    # The kernel path is compared below; here the processor plumbing (interpreted Triton is slow).
    with lightmotion_fast.patched(pipe, trajectories=coords, valid=valid), lightmotion_fast.backend("reference"):
        assert torch.equal(frames(), base)
    weights = random_official_weights(pipe.unet, seed=5)
    with lightmotion_fast.patched(pipe, trajectories=coords, valid=valid, traj_weights=weights):
        with lightmotion_fast.backend("triton"):
            fused = frames()
        with lightmotion_fast.backend("reference"):
            reference = frames()
    assert (fused - base).abs().max() > 1e-3
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(frames(), base)  # unpatched on leaving the block


def test_patched_unet_compiles_fullgraph_with_tables_built_before():
    # Tables given to patch (or built by an eager call) exist before the first compiled forward; the
    # processors then read no tensor values on the host, so the whole UNet is one graph.
    unet, inputs = tiny_svd_unet(), svd_unet_inputs(FRAMES)
    coords, valid = coords_for(64)
    tables = TrajectoryTables(coords, valid, frame_size=(64, 64), latent_size=(8, 8))
    lightmotion_fast.patch(unet, trajectories=tables, traj_weights=random_official_weights(unet))
    torch._dynamo.reset()
    with lightmotion_fast.backend("reference"):
        eager = run(unet, inputs)
        compiled = run(torch.compile(unet, fullgraph=True, backend="aot_eager"), inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    lightmotion_fast.unpatch(unet)


def test_tables_from_coords_cannot_be_built_inside_a_compiled_graph():
    unet, inputs = tiny_svd_unet(), svd_unet_inputs(FRAMES)
    coords, valid = coords_for(64)
    lightmotion_fast.patch(unet, trajectories=coords, valid=valid)
    torch._dynamo.reset()
    with lightmotion_fast.backend("reference"), pytest.raises(Exception, match="cannot be built inside a compiled"):
        run(torch.compile(unet, fullgraph=True, backend="aot_eager"), inputs)
    torch._dynamo.reset()
    with lightmotion_fast.backend("reference"):
        eager = run(unet, inputs)  # built here, eagerly, for this latent size
        torch.testing.assert_close(run(torch.compile(unet, fullgraph=True, backend="aot_eager"), inputs), eager,
                                   rtol=1e-5, atol=1e-5)
    lightmotion_fast.unpatch(unet)
