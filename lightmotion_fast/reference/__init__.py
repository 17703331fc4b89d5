"""Plain-PyTorch references: the semantics of every op, written to be read. Imports nothing of the package."""
from lightmotion_fast.reference.latent_permute import latent_permute_reference, source_positions

__all__ = ["latent_permute_reference", "source_positions"]
