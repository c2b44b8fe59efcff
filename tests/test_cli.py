"""The `janus-fast` command: demo, generate and chat, run in-process on the CPU."""

import subprocess
import sys

import pytest
from PIL import Image

from janus_fast import cli

from .tiny_janus import tiny_model


def test_demo_runs_end_to_end(tmp_path, capsys):
    cli.main(["demo", "--out", str(tmp_path), "--n", "2", "--max-new-tokens", "3", "--device", "cpu"])
    out = capsys.readouterr()
    assert "RANDOM weights" in out.out and "janus-fast generate --model" in out.out
    assert "[4/4] answer" in out.out and "images/s" in out.out
    assert "16/16 tokens" in out.err  # the progress bar
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (128, 64) and len(list(tmp_path.glob("img_*.png"))) == 2


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("release")
    tiny_model().save_pretrained(path)
    return path


def test_generate_writes_pngs_and_grid(release, tmp_path, capsys):
    out = tmp_path / "images"
    cli.main(["generate", "--model", str(release), "--prompt", "a fox", "--n", "3", "--seed", "1", "--out", str(out),
              "--device", "cpu"])
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "img_000.png", "img_001.png", "img_002.png"]
    assert Image.open(out / "img_000.png").size == (64, 64)
    assert "3 images" in capsys.readouterr().out


def test_chat_prints_the_answer(release, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 30), (1, 2, 3)).save(image)
    cli.main(["chat", "--model", str(release), "--image", str(image), "--max-new-tokens", "4", "--device", "cpu",
              "what is it?"])
    want = tiny_model().answer(str(image), "what is it?", max_new_tokens=4)
    assert capsys.readouterr().out == want + "\n"


def test_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "x", "--out", str(tmp_path)])  # --model is required
    with pytest.raises(FileNotFoundError, match="not found"):
        cli.main(["chat", "--model", str(tmp_path / "missing"), "--image", "x.png", "q"])


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "janus_fast.cli", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "demo" in result.stdout and "generate" in result.stdout
