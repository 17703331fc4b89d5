"""Command line: `python -m lightmotion_fast demo|bench|preview|eval-camera`.

A user's mistake (a bad flag or value, a missing or unreadable image, an output folder that cannot be
made, a missing optional dependency) ends in one line on stderr and exit status 2, like argparse's own
errors; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line, without a traceback."""


# --- argument types: argparse turns their ValueError/ArgumentTypeError into a one-line usage error ---

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _camera_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pan", type=finite_float, nargs=2, default=(0.25, -0.125), metavar=("X", "Y"),
                   help="pan totals as fractions of width and height (x > 0: camera pans right)")
    p.add_argument("--zoom", type=finite_float, default=0.16,
                   help="relative scale change at the last frame (> 0: zoom in; > -1)")
    p.add_argument("--rotate", type=finite_float, default=-16.0, help="camera roll in degrees (counter-clockwise > 0)")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="video frames (default 16; 4 with demo --trajectory)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightmotion_fast",
                                     description="lightmotion_fast: fused kernels for camera-controlled video diffusion")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: camera-path preview, kernel-vs-reference check, timings")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the GIF and PNGs")
    demo.add_argument("--model", type=Path, default=None, help="local diffusers checkpoint (AnimateDiff or SVD) for the LightMotion sampler")
    _camera_args(demo)
    demo.add_argument("--trajectory", action="store_true",
                      help="instead: Trajectory Attention end to end on a small SVD pipeline (depth + camera "
                           "preset -> trajectories -> branch training -> frames, and a picture of the trajectories)")
    demo.add_argument("--preset", default="orbit_horizontal",
                      choices=("orbit_horizontal", "orbit_vertical", "zoom_in", "zoom_out"),
                      help="camera preset for --trajectory")

    preview = sub.add_parser("preview", help="only the camera-path preview (GIF + source-index map PNG)")
    preview.add_argument("--out", type=Path, default=Path("demo_out"))
    preview.add_argument("--image", type=Path, default=None, help="an image file instead of the generated test image")
    preview.add_argument("--max-size", type=positive_int, default=256, metavar="PIXELS",
                         help="shrink --image so that its longer side is at most this (default 256: a "
                              "working size like a latent's, seconds and a small GIF even for a photo)")
    preview.add_argument("--full-size", action="store_true", help="keep --image at its full resolution")
    _camera_args(preview)

    bench = sub.add_parser("bench", help="benchmark every op against its reference and peers")
    bench.add_argument("--ops", nargs="+", default=None, help="scenario names (benchmarks/scenarios/*.py)")
    bench.add_argument("--quick", action="store_true", help="only the cases marked quick")
    bench.add_argument("--out", "--results", dest="results", type=Path, default=None, metavar="DIR",
                       help="folder for the CSV and plots (default: $LIGHTMOTION_BENCH_DIR or "
                            "~/.cache/lightmotion_fast/bench, outside the source tree; with --static, "
                            "benchmarks/results of the checkout)")
    bench.add_argument("--no-plot", action="store_true")
    bench.add_argument("--static", action="store_true",
                       help="no timing: compile every launch at the benchmark shapes for sm_90 and write "
                            "sm90-static.{csv,md} (registers, spills, occupancy, SASS counts, roofline floors)")
    _eval_camera_parser(sub)
    return parser


def _eval_camera_parser(sub) -> None:
    ev = sub.add_parser("eval-camera",
                        help="camera-control errors of a generated video's poses against the ground truth",
                        description="RotErr, TransErr, CamMC (CamI2V's relative and absolute protocols), ATE and RPE "
                                    "of GEN's camera poses against GT's, and a PNG of both trajectories. Pose files: "
                                    "RealEstate10K text (.txt: timestamp fx fy cx cy 0 0 and the 3x4 w2c matrix per "
                                    "line) or c2w arrays [f, 4, 4] (.npy, .pt).")
    ev.add_argument("generated", type=Path, metavar="GEN", help="poses estimated from the generated video")
    ev.add_argument("ground_truth", type=Path, metavar="GT", help="ground-truth poses (same number of frames)")
    ev.add_argument("--plot", type=Path, default=Path("trajectory.png"), metavar="PNG",
                    help="where to write the trajectory plot (default trajectory.png)")
    ev.add_argument("--no-plot", action="store_true", help="only print the table")
    ev.add_argument("--align", action="store_true",
                    help="draw GEN after the Sim(3) alignment onto GT that ATE uses")


# --- the checks that need more than one flag's text, done before any work starts ---

def camera_from_args(args):
    import lightmotion_fast as lm

    try:
        return lm.CameraMotion(pan=tuple(args.pan), zoom=args.zoom, rotate=args.rotate)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc).replace("CameraMotion ", "--")) from None


def output_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot create the folder ({exc.strerror or exc})") from None
    return path


def require(*modules: str, extra: str) -> None:
    """Fail with one line naming the pip extra when an optional dependency is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"this command needs {', '.join(missing)}: pip install 'lightmotion_fast[{extra}]'")


# --- the commands ---

def run_bench(args) -> int:
    if args.static:
        from lightmotion_fast.bench import static

        return static.static_main(ops=args.ops, results_dir=args.results or static.RESULTS_DIR)
    from lightmotion_fast.bench import runner

    # Argument mistakes before any measuring (the ceilings alone take ~20 s): unknown ops, an --out
    # that cannot be a folder (the results were lost at the end of the run).
    unknown = sorted(set(args.ops or ()) - set(runner.scenario_sources()))
    if unknown:
        raise UsageError(f"--ops: unknown scenario(s) {unknown}; available: {sorted(runner.scenario_sources())}")
    results_dir = output_dir(args.results) if args.results is not None else runner.RESULTS_DIR
    runner.run(ops=args.ops, quick=args.quick, plot=not args.no_plot, results_dir=results_dir)
    return 0


def run_preview(args) -> int:
    require("PIL", "matplotlib", extra="demo")
    from lightmotion_fast import demo

    camera = camera_from_args(args)
    image = None
    if args.image is not None:
        try:
            image = demo.load_image(args.image, max_size=None if args.full_size else args.max_size)
        except OSError as exc:  # missing, unreadable, or not an image (PIL's UnidentifiedImageError)
            raise UsageError(f"--image {args.image}: {exc.strerror or exc}") from None
    demo.camera_preview(output_dir(args.out), camera, frames=args.frames or 16, image=image)
    return 0


def run_demo(args) -> int:
    require("PIL", "matplotlib", "diffusers", "transformers", extra="demo")
    from lightmotion_fast import demo

    if args.trajectory:
        if args.model is not None:
            raise UsageError("--model applies to the LightMotion demo, not to --trajectory")
        from lightmotion_fast.demo_trajectory import run_trajectory_demo

        return 0 if run_trajectory_demo(output_dir(args.out), frames=args.frames or 4, preset=args.preset)["ok"] else 1
    args.frames = args.frames or 16
    camera = camera_from_args(args)
    if args.model is not None and not args.model.is_dir():
        raise UsageError(f"--model {args.model}: not a folder (a local diffusers checkpoint is expected)")
    output_dir(args.out)
    return demo.main(args, camera=camera)


# What each metric sums or averages, printed beside its unit.
_EVAL_NOTES = {"RotErr": "sum over frames", "TransErr": "sum over frames", "CamMC": "sum over frames",
               "ATE": "RMSE after Sim(3) alignment", "RPE_trans": "RMSE over steps", "RPE_rot": "mean over steps"}


def _load_pose_file(path: Path, label: str):
    from lightmotion_fast.camera import pose_io

    if not path.is_file():
        raise UsageError(f"{label} {path}: no such file")
    try:
        return pose_io.load_poses(path)
    except (OSError, ValueError, RuntimeError) as exc:  # unreadable, malformed, or not a tensor file
        raise UsageError(f"{label}: {exc}") from None


def run_eval_camera(args) -> int:
    from lightmotion_fast.camera import metrics

    gen = _load_pose_file(args.generated, "GEN").c2w
    gt = _load_pose_file(args.ground_truth, "GT").c2w
    if gen.shape != gt.shape:
        raise UsageError(f"GEN has {gen.shape[0]} frames and GT {gt.shape[0]}: the poses must be frame for frame")
    if not args.no_plot:
        require("matplotlib", extra="demo")
    try:
        columns = {p: metrics.trajectory_errors(gen, gt, normalize=p).as_dict() for p in ("relative", "absolute")}
    except ValueError as exc:  # a singular pose or NaN in a file
        raise UsageError(str(exc)) from None
    print(f"camera errors of {args.generated} against {args.ground_truth} ({gt.shape[0]} frames, poses relative "
          "to frame 0; relative: each path scaled by its own extent, absolute: both by GT's)")
    print(f"{'metric':<10} {'relative':>12} {'absolute':>12}  unit")
    for name in columns["relative"]:
        unit = ", ".join(u for u in (metrics.UNITS[name], _EVAL_NOTES[name]) if u)
        print(f"{name:<10} {columns['relative'][name].item():>12.6f} {columns['absolute'][name].item():>12.6f}  {unit}")
    if not args.no_plot:
        try:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            title = f"{args.generated.name} vs {args.ground_truth.name}"
            path = metrics.plot_trajectories(gen, gt, args.plot, title=title, align=args.align)
        except OSError as exc:
            raise UsageError(f"--plot {args.plot}: cannot write ({exc.strerror or exc})") from None
        print(f"trajectory plot: {path}")
    return 0


COMMANDS = {"demo": run_demo, "preview": run_preview, "bench": run_bench, "eval-camera": run_eval_camera}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
