"""Plain-PyTorch references: the semantics of every op, written to be read. Imports nothing of the package."""
from lightmotion_fast.reference.latent_permute import latent_permute_reference, source_positions
from lightmotion_fast.reference.multi_lora import multi_lora_linear_reference

__all__ = ["latent_permute_reference", "multi_lora_linear_reference", "source_positions"]
