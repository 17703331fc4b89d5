"""Camera motion parameters, index maps, trajectories, Plücker inputs and metrics (pure PyTorch)."""
from lightmotion_fast.camera.motion import CameraMotion
from lightmotion_fast.camera.trajectories import TrajectoryTables, trajectories_from_depth, trajectories_from_tracks

__all__ = ["CameraMotion", "TrajectoryTables", "trajectories_from_depth", "trajectories_from_tracks"]
