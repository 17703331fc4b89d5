"""Camera motion parameters, index maps, trajectories, Plücker inputs and metrics (pure PyTorch)."""
from lightmotion_fast.camera.motion import CameraMotion

__all__ = ["CameraMotion"]
