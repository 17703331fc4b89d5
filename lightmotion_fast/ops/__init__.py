"""Public ops: input checks, torch.library custom ops (namespace `lightmotion`), autograd, dispatch.

OP_SAMPLES maps every custom op's name to a function giving sample arguments for a device; the test
suite runs torch.library.opcheck and torch.compile(fullgraph=True) over all of them, and fails for a
registered `lightmotion::` op that is missing here.
"""
from lightmotion_fast.ops import dual_cross_attention as _dual_cross_attention
from lightmotion_fast.ops import latent_permute as _latent_permute
from lightmotion_fast.ops import latent_resample as _latent_resample
from lightmotion_fast.ops import multi_lora as _multi_lora
from lightmotion_fast.ops import plucker as _plucker
from lightmotion_fast.ops import reference_attention as _reference_attention
from lightmotion_fast.ops import snr_reinject as _snr_reinject
from lightmotion_fast.ops import trajectory_attention as _trajectory_attention
from lightmotion_fast.ops import _common
from lightmotion_fast.ops._common import Backend, backend
from lightmotion_fast.ops.dual_cross_attention import dual_cross_attention
from lightmotion_fast.ops.latent_permute import latent_permute, latent_permute_affine
from lightmotion_fast.ops.latent_resample import build_fill_map, latent_edit, latent_resample
from lightmotion_fast.ops.multi_lora import multi_lora_linear
from lightmotion_fast.ops.plucker import plucker_embedding
from lightmotion_fast.ops.reference_attention import reference_attention
from lightmotion_fast.ops.snr_reinject import snr_noise, snr_reinject
from lightmotion_fast.ops.trajectory_attention import TrajectoryIndex, trajectory_attention

# custom op name -> (the op, a function of the device giving a list of argument tuples)
OP_SAMPLES = {
    # LightMotion
    "latent_permute": (_latent_permute.latent_permute_op, _latent_permute.sample_inputs),
    "latent_resample": (_latent_resample.latent_resample_op, _latent_resample.sample_inputs),
    "snr_reinject": (_snr_reinject.snr_reinject_op, _snr_reinject.sample_inputs),
    "snr_noise": (_snr_reinject.snr_noise_op, _snr_reinject.noise_sample_inputs),
    # Trajectory Attention
    "trajectory_attention": (_trajectory_attention.trajectory_attention_op, _trajectory_attention.sample_inputs),
    "trajectory_attention_backward": (_trajectory_attention.trajectory_attention_backward_op,
                                      _trajectory_attention.backward_sample_inputs),
    # LiON-LoRA
    "multi_lora_linear": (_multi_lora.multi_lora_linear_op, _multi_lora.sample_inputs),
    # MotionFlow
    "plucker_embedding": (_plucker.plucker_embedding_op, _plucker.sample_inputs),
    "dual_cross_attention": (_dual_cross_attention.dual_cross_attention_op, _dual_cross_attention.sample_inputs),
    "dual_cross_attention_backward": (_dual_cross_attention.dual_cross_attention_backward_op,
                                      _dual_cross_attention.backward_sample_inputs),
    "reference_attention": (_reference_attention.reference_attention_op, _reference_attention.sample_inputs),
    "reference_attention_backward": (_reference_attention.reference_attention_backward_op,
                                     _reference_attention.backward_sample_inputs),
}

_common.run_without_autocast(*(op for op, _ in OP_SAMPLES.values()))

__all__ = [
    "OP_SAMPLES", "Backend", "backend", "build_fill_map", "dual_cross_attention", "latent_edit", "latent_permute",
    "latent_permute_affine", "latent_resample", "multi_lora_linear", "plucker_embedding", "reference_attention",
    "snr_noise", "snr_reinject", "TrajectoryIndex", "trajectory_attention",
]
