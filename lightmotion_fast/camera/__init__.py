"""Camera motion parameters, index maps, trajectories, Plücker inputs and metrics (pure PyTorch)."""
from lightmotion_fast.camera.motion import CameraMotion
from lightmotion_fast.camera.trajectories import TrajectoryTables, trajectories_from_depth, trajectories_from_tracks

__all__ = ["CameraMotion", "TrajectoryTables", "trajectories_from_depth", "trajectories_from_tracks"]

from lightmotion_fast.camera.trajectory_sources import (  # noqa: E402
    CameraPath, camera_preset, depth_from_disparity, merge_tracks_with_camera, trajectories_from_flow)
__all__ += ["CameraPath", "camera_preset", "depth_from_disparity", "merge_tracks_with_camera",
            "trajectories_from_flow"]

from lightmotion_fast.camera.motion_estimate import (  # noqa: E402
    CameraMotionErrors, EstimatedMotion, camera_motion_errors, estimate_camera_motion, motion_report,
    requested_camera_motion)
__all__ += ["CameraMotionErrors", "EstimatedMotion", "camera_motion_errors", "estimate_camera_motion",
            "motion_report", "requested_camera_motion"]
