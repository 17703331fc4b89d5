"""Command line: `python -m lightmotion_fast demo|bench|preview`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _camera_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pan", type=float, nargs=2, default=(0.25, -0.125), metavar=("X", "Y"),
                   help="pan totals as fractions of width and height (x > 0: camera pans right)")
    p.add_argument("--zoom", type=float, default=0.16, help="relative scale change at the last frame (> 0: zoom in)")
    p.add_argument("--rotate", type=float, default=-16.0, help="camera roll in degrees (counter-clockwise > 0)")
    p.add_argument("--frames", type=int, default=16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightmotion_fast",
                                     description="lightmotion_fast: fused kernels for camera-controlled video diffusion")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: camera-path preview, kernel-vs-reference check, timings")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the GIF and PNGs")
    demo.add_argument("--model", type=Path, default=None, help="local diffusers checkpoint (AnimateDiff or SVD) for the LightMotion sampler")
    _camera_args(demo)

    preview = sub.add_parser("preview", help="only the camera-path preview (GIF + source-index map PNG)")
    preview.add_argument("--out", type=Path, default=Path("demo_out"))
    preview.add_argument("--image", type=Path, default=None, help="an image file instead of the generated test image")
    _camera_args(preview)

    bench = sub.add_parser("bench", help="benchmark every op against its reference and peers")
    bench.add_argument("--ops", nargs="+", default=None, help="scenario names (benchmarks/scenarios/*.py)")
    bench.add_argument("--quick", action="store_true", help="only the cases marked quick")
    bench.add_argument("--no-plot", action="store_true")
    bench.add_argument("--results", type=Path, default=None, help="folder for the CSV and plots")
    bench.add_argument("--static", action="store_true",
                       help="no timing: compile every launch at the benchmark shapes for sm_90 and write "
                            "sm90-static.{csv,md} (registers, spills, occupancy, SASS counts, roofline floors)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.static:
        from lightmotion_fast.bench import static

        return static.static_main(ops=args.ops, results_dir=args.results or static.RESULTS_DIR)
    if args.command == "bench":
        from lightmotion_fast.bench import runner

        runner.run(ops=args.ops, quick=args.quick, plot=not args.no_plot,
                   results_dir=args.results or runner.RESULTS_DIR)
        return 0
    from lightmotion_fast import demo

    if args.command == "preview":
        demo.camera_preview(args.out, demo.camera_from_args(args), frames=args.frames, image=args.image)
        return 0
    return demo.main(args)


if __name__ == "__main__":
    sys.exit(main())
