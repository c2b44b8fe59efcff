"""save_pretrained never loses data: it keeps files and folders it did not write, refuses a
directory that is not a checkpoint, writes through symlinks, follows the umask, and a save
killed with SIGKILL at any point leaves the old or the new checkpoint, with no temporary data
outliving the next successful save."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from janus_fast import checkpoint
from janus_fast.checkpoint import CheckpointError
from janus_fast.models import JanusPro
from janus_fast.processor import JanusProcessor

from .helpers import FULL
from .tiny_janus import tiny_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models():
    return {seed: tiny_model(seed=seed) for seed in (0, 1, 2)}


def weights_of(path) -> dict:
    return JanusPro.from_pretrained(path, dtype=None, device="cpu").state_dict()


def same(state, model) -> bool:
    ref = model.state_dict()
    return state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def ours(path) -> list:
    return sorted(n for n in os.listdir(path) if n.startswith(".janus_fast"))


def user_files(root: Path):
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "x.txt").write_text("keep me")
    (root / "NOTES.md").write_text("mine")
    (root / ".hidden").write_text("also mine")


def check_user_files(root: Path):
    assert (root / "notes" / "x.txt").read_text() == "keep me"
    assert (root / "NOTES.md").read_text() == "mine" and (root / ".hidden").read_text() == "also mine"


def test_save_keeps_files_and_folders_it_did_not_write(tmp_path, models):
    target = tmp_path / "ck"
    models[0].save_pretrained(target)
    user_files(target)
    models[1].save_pretrained(target)
    check_user_files(target)
    assert same(weights_of(target), models[1]) and ours(target) == []


def test_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, models):
    user_files(tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing to save into .*not empty .*NOTES.md"):
        models[0].save_pretrained(tmp_path)
    check_user_files(tmp_path)
    assert ours(tmp_path) == [] and not (tmp_path / "config.json").exists()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="holds no Janus-Pro checkpoint"):
        models[0].save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "bert"}
    with pytest.raises(CheckpointError, match="it is a file"):
        models[0].save_pretrained(tmp_path / "NOTES.md")
    empty = tmp_path / "empty"
    empty.mkdir()
    models[0].save_pretrained(empty)  # an empty directory is fine
    assert same(weights_of(empty), models[0])


def test_writes_through_symlinks(tmp_path, models):
    real = tmp_path / "real"
    link = tmp_path / "link"
    models[0].save_pretrained(real)
    link.symlink_to(real, target_is_directory=True)
    models[1].save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert same(weights_of(real), models[1])
    dangling = tmp_path / "new-link"
    dangling.symlink_to(tmp_path / "not-yet")
    models[2].save_pretrained(dangling)
    assert dangling.is_symlink() and same(weights_of(tmp_path / "not-yet"), models[2])


def test_stale_weight_files_are_replaced(tmp_path, models):
    models[0].save_pretrained(tmp_path / "ck", max_shard_size="1MB")
    shards = sorted(p.name for p in (tmp_path / "ck").glob("model-*.safetensors"))
    assert len(shards) > 1
    models[1].save_pretrained(tmp_path / "ck")
    names = set(os.listdir(tmp_path / "ck"))
    assert "model.safetensors" in names and not names & {*shards, "model.safetensors.index.json"}
    assert same(weights_of(tmp_path / "ck"), models[1])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_modes_follow_the_umask(tmp_path, models, umask):
    old = os.umask(umask)
    try:
        models[0].save_pretrained(tmp_path / "a" / "ck")
    finally:
        os.umask(old)
    ck = tmp_path / "a" / "ck"
    assert (ck.stat().st_mode & 0o777) == 0o777 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in ck.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes


# --------------------------------------------------------------------------- SIGKILL

KILLER = r"""
import os, signal, sys
from janus_fast import checkpoint
from tests.tiny_janus import tiny_model

path, kill_at = sys.argv[1], sys.argv[2]
model = tiny_model(seed=1)
ops, commit = [0], [None]

def counted(fn):
    def run(*args, **kwargs):
        ops[0] += 1
        if str(ops[0]) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if fn is real_replace and str(args[1]).endswith(checkpoint.JOURNAL_NAME):
            commit[0] = ops[0]
        return fn(*args, **kwargs)
    return run

real_replace = os.replace
for name in ("replace", "unlink", "rmdir", "mkdir", "fsync", "chmod", "open"):
    setattr(os, name, counted(getattr(os, name)))
if kill_at == "torn":  # killed while the weights are half written
    write = checkpoint.write_weights
    def torn(state, directory, **kwargs):
        names = write(state, directory, **kwargs)
        f = directory / names[0]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.write_weights = torn
model.save_pretrained(path)
print(ops[0], commit[0])
"""


def run_killer(path, kill_at) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", KILLER, str(path), str(kill_at)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


@pytest.fixture(scope="module")
def op_counts(tmp_path_factory, models):
    """(number of file-system operations of one save over an old checkpoint, the commit's index)."""
    path = tmp_path_factory.mktemp("count") / "ck"
    models[0].save_pretrained(path)
    result = run_killer(path, "none")
    assert result.returncode == 0, result.stderr
    total, commit = map(int, result.stdout.split())
    assert 1 < commit < total
    return total, commit


def kill_points(total: int, commit: int) -> list:
    if FULL:
        return ["torn", *range(1, total + 1)]
    return ["torn", commit, commit + 1, commit + 4, total]


def test_sigkill_at_any_point_leaves_old_or_new(tmp_path, models, op_counts):
    total, commit = op_counts
    outcomes = {}
    for point in kill_points(total, commit):
        target = tmp_path / f"ck-{point}"
        models[0].save_pretrained(target)
        user_files(target)
        result = run_killer(target, point)
        assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stderr[-2000:])
        if point != "torn" and point > commit:  # the processor alone finishes a committed save too
            JanusProcessor.from_pretrained(target)
            assert not (target / checkpoint.JOURNAL_NAME).exists()
        state = weights_of(target)  # the load finishes a committed save
        old, new = same(state, models[0]), same(state, models[1])
        assert old or new, f"killed at {point}: neither the old nor the new checkpoint"
        outcomes[point] = "new" if new else "old"
        assert JanusPro.from_pretrained(target, device="cpu").processor is not None
        check_user_files(target)
        models[2].save_pretrained(target)  # the next save leaves no temporary data behind
        assert ours(target) == [] and same(weights_of(target), models[2])
        check_user_files(target)
    assert outcomes["torn"] == "old" and outcomes[commit] == "old" and outcomes[commit + 1] == "new"


def test_interrupted_commit_that_cannot_be_finished_names_the_staging_directory(tmp_path, models, op_counts,
                                                                                monkeypatch):
    total, commit = op_counts
    target = tmp_path / "ck"
    models[0].save_pretrained(target)
    assert run_killer(target, commit + 1).returncode == -signal.SIGKILL
    staging = [n for n in ours(target) if n.startswith(checkpoint.STAGING_PREFIX)]
    assert len(staging) == 1

    def read_only(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.os, "replace", read_only)
    with pytest.raises(CheckpointError, match=f"interrupted after its commit point.*{staging[0]}"):
        JanusPro.from_pretrained(target, device="cpu")
    monkeypatch.undo()
    assert same(weights_of(target), models[1])


def test_load_errors_name_files_and_earlier_interrupted_saves(tmp_path, models):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file: a checkpoint is a directory"):
        JanusPro.from_pretrained(tmp_path / "file", device="cpu")
    held = tmp_path / ".ck.old-abc123" / "ckpt"  # what janus_fast 0.1.0 left when killed between its renames
    models[0].save_pretrained(held)
    with pytest.raises(FileNotFoundError, match=f"interrupted save left a checkpoint in {held}"):
        JanusPro.from_pretrained(tmp_path / "ck", device="cpu")


def test_a_crafted_journal_moves_and_deletes_nothing(tmp_path, models):
    """A downloaded directory's journal is data: names outside the checkpoint are refused."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    target = tmp_path / "ck"
    models[0].save_pretrained(target)
    for journal in ({"staging": "../victim", "files": [], "stale": []},
                    {"staging": ".janus_fast-save-x", "files": ["../victim/precious.txt"], "stale": []},
                    {"staging": ".janus_fast-save-x", "files": [], "stale": ["../victim/precious.txt"]},
                    {"staging": ".janus_fast-save-x", "files": [], "stale": ["NOTES.md"]}):
        (target / checkpoint.JOURNAL_NAME).write_text(json.dumps(journal))
        with pytest.raises(CheckpointError, match="is damaged"):
            JanusPro.from_pretrained(target, device="cpu")
        assert (victim / "precious.txt").read_text() == "keep"


def test_a_folder_where_a_checkpoint_file_goes_is_refused_before_the_commit(tmp_path, models):
    target = tmp_path / "ck"
    models[0].save_pretrained(target)
    (target / "model.safetensors").unlink()
    (target / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"\['model.safetensors'\] are folders"):
        models[1].save_pretrained(target)
    assert ours(target) == [] and (target / "model.safetensors").is_dir()
