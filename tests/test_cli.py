"""The command line: demo (the main job) and preview write what they promise."""
import os
import subprocess
import sys

from PIL import Image

from lightmotion_fast.cli import build_parser


def test_demo_writes_preview_and_checks_kernels(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "lightmotion_fast", "demo", "--out", str(tmp_path), "--frames", "6"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all paths agree with the reference" in result.stdout
    assert "Triton kernel" in result.stdout and "matches the reference" in result.stdout
    gif = Image.open(tmp_path / "camera_path.gif")
    assert gif.n_frames == 6
    assert Image.open(tmp_path / "source_index_map.png").size[0] > 100


def test_preview_on_a_user_image(tmp_path):
    img_path = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img_path)
    result = subprocess.run([sys.executable, "-m", "lightmotion_fast", "preview", "--image", str(img_path),
                             "--out", str(tmp_path / "o"), "--frames", "3", "--pan", "0.5", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    gif = Image.open(tmp_path / "o" / "camera_path.gif")
    assert gif.n_frames == 3 and gif.size == (40, 30)
    gif.seek(2)
    right_edge = gif.convert("RGB").getpixel((39, 15))
    assert right_edge == (0, 0, 0)            # panned right by half the width: the right side is exposed


def test_parser_knows_the_commands():
    parser = build_parser()
    assert parser.parse_args(["bench", "--quick", "--ops", "latent_permute"]).quick
    assert parser.parse_args(["demo"]).command == "demo"
