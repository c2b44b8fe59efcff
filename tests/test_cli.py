"""The `janus-fast` command: demo, generate and chat, run in-process on the CPU; arguments are
checked before anything loads, and errors the user can fix print one line."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from janus_fast import cli
from janus_fast.models import JanusPro

from .tiny_janus import tiny_model

ROOT = Path(__file__).resolve().parent.parent


def run(argv, capsys):
    """(exit status, stdout, stderr) of `janus-fast argv`."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_keeps_its_checkpoint_and_the_printed_commands_work(tmp_path, capsys):
    keep = tmp_path / "random ckpt"  # a space: the printed commands must quote it
    code, out, err = run(["demo", "--out", str(tmp_path / "demo"), "--n", "2", "--max-new-tokens", "3",
                          "--device", "cpu", "--keep", str(keep)], capsys)
    assert code == 0, err
    assert "RANDOM weights" in out and "[4/4] answer" in out and "images/s" in out
    assert "16/16 tokens" in err  # the progress bar
    grid = Image.open(tmp_path / "demo" / "grid.png")
    assert grid.size == (128, 64) and len(list((tmp_path / "demo").glob("img_*.png"))) == 2
    assert (keep / "config.json").is_file() and (keep / "tokenizer.json").is_file()
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("janus-fast ")][-2:]
    assert commands[0].startswith("janus-fast generate") and commands[1].startswith("janus-fast chat")
    for command in commands:
        argv = shlex.split(command)[1:] + ["--device", "cpu"]
        if argv[0] == "generate":
            argv[argv.index("--n") + 1] = "1"
        else:
            argv = argv[:1] + ["--max-new-tokens", "2"] + argv[1:]
        code, out2, err2 = run(argv, capsys)
        assert code == 0, (command, err2)
    assert (tmp_path / "demo" / "more" / "img_000.png").is_file()


def test_demo_without_keep_says_how_to_keep(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(JanusPro, "generate_images", lambda self, *a, **k: tiny_images(1))
    monkeypatch.setattr(JanusPro, "answer", lambda self, *a, **k: "x")
    code, out, err = run(["demo", "--out", str(tmp_path), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "--keep DIR" in out and not list(tmp_path.glob("janus-pro-random"))


def test_the_quickstart_demo_runs_again_on_the_directory_it_kept(tmp_path, capsys, monkeypatch):
    # `janus-fast demo --keep DIR` twice (the Quickstart re-run) replaces the checkpoint it kept;
    # a directory holding anything else is still refused, untouched.
    monkeypatch.setattr(JanusPro, "generate_images", lambda self, *a, **k: tiny_images(1))
    monkeypatch.setattr(JanusPro, "answer", lambda self, *a, **k: "x")
    keep = tmp_path / "janus-pro-random"
    demo = ["demo", "--out", str(tmp_path / "out"), "--device", "cpu", "--keep", str(keep)]
    assert run(demo, capsys)[0] == 0
    code, out, err = run(demo, capsys)
    assert code == 0, err
    assert "replacing the one an earlier demo kept there" in out and (keep / "config.json").is_file()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, out, err = run(demo[:-1] + [str(other)], capsys)
    assert code != 0 and "must be a new or empty directory" in err and sorted(other.iterdir()) == [other / "notes.txt"]


def test_the_quickstart_checkpoint_is_ignored_by_git():
    import re
    import shutil
    import subprocess

    readme = (ROOT / "README.md").read_text().split("## Quickstart")[1].split("```")[1]
    keep = re.search(r"--keep (\S+)", readme).group(1)
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "check-ignore", "-q", f"{keep}/config.json"], cwd=ROOT).returncode == 0


def tiny_images(n):
    import torch

    return torch.zeros(n, 64, 64, 3, dtype=torch.uint8)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("release")
    tiny_model().save_pretrained(path)
    return path


def test_generate_writes_pngs_and_grid_with_clean_paths(release, tmp_path, capsys):
    out = tmp_path / "images"
    code, stdout, err = run(["generate", "--model", str(release), "--prompt", "a fox", "--n", "3", "--seed", "1",
                             "--out", str(out) + "/", "--device", "cpu"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "img_000.png", "img_001.png", "img_002.png"]
    assert Image.open(out / "img_000.png").size == (64, 64)
    assert "3 images" in stdout and f"wrote {out}/img_*.png and {out}/grid.png" in stdout and "//" not in stdout


def test_chat_prints_the_answer(release, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 30), (1, 2, 3)).save(image)
    code, out, err = run(["chat", "--model", str(release), "--image", str(image), "--max-new-tokens", "4",
                          "--device", "cpu", "what is it?"], capsys)
    want = tiny_model().answer(str(image), "what is it?", max_new_tokens=4)
    assert code == 0 and out == want + "\n"
    assert "answering [" in err and "4/4 tokens" in err  # the progress bar, on finished steps


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model fails the test: the argument checks must come first."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(JanusPro, "from_pretrained", classmethod(loaded))


def one_line_error(code, out, err, *fragments):
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_bad_paths_fail_before_loading_with_one_line(release, tmp_path, capsys, no_loading):
    a_file = tmp_path / "taken.png"
    Image.new("RGB", (4, 4)).save(a_file)
    gen = ["generate", "--model", str(release), "--prompt", "x", "--device", "cpu", "--out"]
    one_line_error(*run(gen + [str(a_file)], capsys), f"--out {a_file} is an existing file")
    one_line_error(*run(gen + [str(a_file / "sub")], capsys), f"--out {a_file / 'sub'} cannot be written")
    chat = ["chat", "--model", str(release), "--device", "cpu", "q", "--image"]
    one_line_error(*run(chat + [str(tmp_path / "missing.jpg")], capsys), f"image file {tmp_path / 'missing.jpg'} not found")
    (tmp_path / "fake.jpg").write_text("not an image")
    one_line_error(*run(chat + [str(tmp_path / "fake.jpg")], capsys), f"cannot read image file {tmp_path / 'fake.jpg'}")
    model_args = ["chat", "--image", str(a_file), "q", "--model"]
    one_line_error(*run(model_args + [str(tmp_path / "nope")], capsys), "no such directory")
    one_line_error(*run(model_args + [str(a_file)], capsys), "is a file")
    one_line_error(*run(model_args + [str(tmp_path)], capsys), "has no config.json")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((release / "config.json").read_text())
    one_line_error(*run(model_args + [str(partial)], capsys), "no weights in")
    one_line_error(*run(["generate", "--model", str(release), "--prompt", "x", "--out", str(tmp_path / "o"),
                         "--device", "cuda:0" if not __import__("torch").cuda.is_available() else "nonsense"], capsys),
                   "--device")


def test_a_batch_that_cannot_fit_fails_before_loading(release, tmp_path, capsys, no_loading, monkeypatch):
    from janus_fast.engine import memory

    weights = memory.weight_bytes(tiny_model())  # (float32 on the CPU)
    monkeypatch.setattr(memory, "free_bytes", lambda device, buckets=None: weights + 10_000)  # as a full GPU
    one_line_error(*run(["generate", "--model", str(release), "--prompt", "x", "--n", "64", "--out",
                         str(tmp_path / "o"), "--device", "cpu"], capsys), "--n 64 does not fit cpu", "lower --n")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(cli.UsageError, match="no such directory"):
        cli.main(["--debug", "chat", "--model", str(tmp_path / "nope"), "--image", "x.png", "q"])
    with pytest.raises(cli.UsageError, match="no such directory"):
        cli.main(["chat", "--debug", "--model", str(tmp_path / "nope"), "--image", "x.png", "q"])


def test_bad_numbers_are_usage_errors(release, tmp_path, capsys):
    for flag, value in (("--n", "0"), ("--cfg", "nan"), ("--temperature", "-1")):
        code, _, err = run(["generate", "--model", str(release), "--prompt", "x", "--out", str(tmp_path),
                            flag, value], capsys)
        assert code == 2 and f"argument {flag}" in err


def test_help_shows_defaults():
    result = subprocess.run([sys.executable, "-m", "janus_fast.cli", "generate", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for default in ("(default: 16)", "(default: 5.0)", "(default: 1.0)", "(default: 0)", "(default: cuda if available)"):
        assert default in text, default
    top = cli.parser().format_help()
    assert "demo" in top and "generate" in top and "chat" in top
