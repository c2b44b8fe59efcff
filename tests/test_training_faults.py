"""A training run's output at the edges (one process, the tiny model): deleted, truncated or
foreign checkpoints, two runs on one output_dir, a diverging run, killed writes' leftovers, file
modes, config types, a finished run started again, a tampered index, and export."""

import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from janus_fast import cli
from janus_fast.checkpoint import CheckpointError, atomic_write_text
from janus_fast.models.janus_pro import JanusPro
from janus_fast.training import TrainConfig, Trainer
from janus_fast.training.checkpoints import read_metadata, validate
from janus_fast.training.export import export_release
from janus_fast.training.loader import DatasetChangedError
from janus_fast.training.resume import find_resume
from janus_fast.training.rundir import RunLock
from janus_fast.training.trainer import NonFiniteError
from tests.training_helpers import config, losses, make_data, metrics

STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 3-step run, a checkpoint after every step (all kept), written under umask 022."""
    out = tmp_path_factory.mktemp("finished") / "run"
    mask = os.umask(0o022)
    try:
        with Trainer(config(data, out, steps=STEPS, save_every=1, keep_checkpoints=STEPS)) as trainer:
            trainer.fit()
    finally:
        os.umask(mask)
    return out


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def config_file(data, out, **overrides) -> Path:
    cfg = dataclasses.asdict(config(data, out, **{"steps": STEPS, "save_every": 1, "keep_checkpoints": STEPS,
                                                  **overrides}))
    file = Path(out).parent / f"{Path(out).name}.json"
    file.write_text(json.dumps(cfg))
    return file


def train_cli(data, out, capsys, *extra, **overrides) -> tuple[int, str]:
    """`janus-fast train` on a config for `out`: (exit status, stderr)."""
    file = config_file(data, out, **overrides)
    capsys.readouterr()
    try:
        cli.main(["train", "--config", str(file), *extra])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def ckpt(run: Path, step: int) -> Path:
    return run / f"checkpoint-{step:07d}"


# --------------------------------------------------------------------------- deleted / truncated


def test_latest_missing_resumes_from_the_newest_valid_checkpoint(run):
    (run / "latest").unlink()
    resume = find_resume(run)
    assert resume.path == ckpt(run, 3) and resume.state["step"] == 3
    assert resume.notes == ["latest is missing, resuming from the newest valid checkpoint checkpoint-0000003"]


def test_newest_checkpoint_deleted_resumes_from_the_one_before(data, run, finished):
    """Step 3 is trained again from checkpoint 2, to the same loss; checkpoints 1 and 2 and the
    history of steps 1-2 stay as they were."""
    before = metrics(finished)
    shutil.rmtree(ckpt(run, 3))
    kept = {p.name: p.stat().st_mtime_ns for p in ckpt(run, 1).iterdir()}
    with Trainer(config(data, run, steps=STEPS, save_every=1, keep_checkpoints=STEPS)) as trainer:
        assert trainer.step == 2
        assert metrics(run) == before[:2]
        history = trainer.fit()
    assert losses(history) == losses(before)
    assert losses(metrics(run)) == losses(before)
    assert {p.name: p.stat().st_mtime_ns for p in ckpt(run, 1).iterdir()} == kept
    assert (run / "latest").read_text() == "checkpoint-0000003"


@pytest.mark.parametrize("damage", ["shard", "state", "index"])
def test_truncated_checkpoint_falls_back_with_a_warning(run, damage):
    name = {"shard": "__0_0.distcp", "state": "trainer_state.json", "index": ".metadata"}[damage]
    file = ckpt(run, 3) / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    resume = find_resume(run)
    assert resume.path == ckpt(run, 2)
    assert resume.notes[0].startswith(f"skipping checkpoint-0000003: {file}")
    assert "latest names 'checkpoint-0000003'" in resume.notes[1]


def test_no_loadable_checkpoint_is_refused_naming_the_file(data, run, capsys):
    """Every checkpoint truncated: one line naming the files, nothing overwritten."""
    for step in (1, 2, 3):
        shard = ckpt(run, step) / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
    history = (run / "metrics.jsonl").read_bytes()
    status, err = train_cli(data, run, capsys)
    assert status == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"janus-fast train: error: {run} has no loadable checkpoint to resume from")
    assert f"{ckpt(run, 3) / '__0_0.distcp'} is truncated" in line
    assert (run / "metrics.jsonl").read_bytes() == history


def test_history_without_checkpoints_is_not_restarted_over(data, run, capsys):
    for step in (1, 2, 3):
        shutil.rmtree(ckpt(run, step))
    history = (run / "metrics.jsonl").read_bytes()
    status, err = train_cli(data, run, capsys)
    assert status == 2 and "holds latest and metrics.jsonl but no checkpoint" in err
    assert (run / "metrics.jsonl").read_bytes() == history


# --------------------------------------------------------------------------- another run's checkpoint


@pytest.mark.parametrize("change, words", [
    (dict(grad_accum=2), "the micro-batches per optimizer step (processes x grad_accum) differ "
                         "(checkpoint 1, this run 2); on 1 processes that is grad_accum 1"),
    (dict(stage=2), "the trained parameters (stage, stage1_gen_embed)"),
    (dict(model="tampered"), "the model (its config) differ "
                             "(language_config: hidden_size: checkpoint 128, this run 64)"),
])
def test_checkpoint_of_another_run_is_refused_before_anything_loads(data, run, change, words, monkeypatch):
    if change.get("model") == "tampered":  # the checkpoint claims a wider model
        state_file = ckpt(run, 3) / "trainer_state.json"
        state = json.loads(state_file.read_text())
        state["model_config"]["language_config"]["hidden_size"] *= 2
        state_file.write_text(json.dumps(state))
        change = {}
    monkeypatch.setattr("janus_fast.training.trainer.load_model", None)  # nothing loads before the refusal
    with pytest.raises(CheckpointError, match="belongs to another run") as e:
        Trainer(config(data, run, steps=STEPS + 1, **change))
    assert words in str(e.value)
    RunLock(run).acquire().release()  # the refusing run let go of the output_dir


@pytest.mark.parametrize("change, words", [
    ("row_tokens", "row_tokens 600 -> 700"),
    ("data", "train.jsonl: contents"),
])
def test_changed_dataset_under_a_resumed_run_is_refused(data, run, change, words, tmp_path):
    other = data
    if change == "data":  # the same file name, one sample fewer
        other = tmp_path / "other" / Path(data).name
        shutil.copytree(Path(data).parent, other.parent, ignore=shutil.ignore_patterns("vq_cache"))
        other.write_text("".join(Path(data).read_text().splitlines(keepends=True)[1:]))
    overrides = {"row_tokens": 700} if change == "row_tokens" else {}
    with pytest.raises(DatasetChangedError, match="dataset or packing settings changed") as e:
        Trainer(config(other, run, steps=STEPS + 1, **overrides))
    assert words in str(e.value)


def test_changed_hyperparameters_are_announced(data, run, capsys):
    with Trainer(config(data, run, steps=STEPS + 1, lr=1e-3, save_every=1, keep_checkpoints=STEPS)) as trainer:
        assert trainer.step == STEPS and trainer.model is not None
    err = capsys.readouterr().err
    assert "note: lr changed from 0.003 to 0.001" in err and "note: steps changed from 3 to 4" in err


# --------------------------------------------------------------------------- one live run per output_dir


def test_second_run_on_the_same_output_dir_is_refused(data, run, capsys):
    with RunLock(run).acquire():
        status, err = train_cli(data, run, capsys, "--steps", str(STEPS + 1))
    assert status == 2
    assert f"janus-fast train: error: {run} is in use by another training run (pid {os.getpid()} on " in err
    RunLock(run).acquire().release()  # released with its holder


def test_lock_is_released_when_its_process_is_killed(tmp_path):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: takes the lock, says so, waits to be killed
        try:
            held = RunLock(tmp_path).acquire()
            os.write(write, b"held")
            time.sleep(600)
            held.release()
        finally:
            os._exit(1)
    try:
        assert os.read(read, 4) == b"held"
        with pytest.raises(OSError, match=f"in use by another training run \\(pid {pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    RunLock(tmp_path).acquire().release()


def test_lock_goes_with_its_process_not_with_forked_workers(tmp_path):
    """A trainer that forked a loader worker is killed: the worker, still alive, does not keep the
    output_dir locked."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the trainer
        try:
            held = RunLock(tmp_path).acquire()
            worker = os.fork()
            if worker == 0:
                time.sleep(600)
                os._exit(0)
            os.write(write, str(worker).encode().ljust(16))
            time.sleep(600)
            held.release()
        finally:
            os._exit(1)
    worker = int(os.read(read, 16))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    try:
        os.kill(worker, 0)  # still alive
        RunLock(tmp_path).acquire().release()
    finally:
        os.kill(worker, signal.SIGKILL)


# --------------------------------------------------------------------------- divergence


def test_diverging_run_stops_naming_the_step(data, tmp_path, capsys):
    """lr 1e30: step 1 is finite (its weights are saved), step 2's loss is NaN: exit status 2
    naming the step, `latest` still on step 1, metrics.jsonl strict JSON with null."""
    out = tmp_path / "run"
    status, err = train_cli(data, out, capsys, lr=1e30, warmup_steps=0)
    assert status == 2
    assert re.fullmatch(r"janus-fast train: error: step 2: the loss is nan and the gradient norm is nan \(lr \S+\): "
                        r"training diverged and stopped \(set skip_nonfinite_steps to skip such steps\); the last "
                        r"checkpoint is step 1", err.strip().splitlines()[-1])
    assert (out / "latest").read_text() == "checkpoint-0000001"
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] is None and rows[1]["grad_norm"] is None


def test_nonfinite_steps_skipped_up_to_the_bound(data, tmp_path, capsys):
    """skip_nonfinite_steps 1: step 2 is skipped (no update, recorded), step 3 stops the run."""
    out = tmp_path / "run"
    status, err = train_cli(data, out, capsys, lr=1e30, warmup_steps=0, steps=5, skip_nonfinite_steps=1)
    assert status == 2
    assert "step 2: the loss is nan and the gradient norm is nan: update skipped (1 of 1 in a row allowed)" in err
    assert "step 3: the loss is nan and the gradient norm is nan (lr" in err
    assert "(2 steps in a row, more than skip_nonfinite_steps=1)" in err
    rows = metrics(out)
    assert [(r["step"], r.get("skipped", False)) for r in rows] == [(1, False), (2, True), (3, True)]
    # a skipped step leaves the weights as they were: checkpoint 2, saved after the skip, is finite
    assert (out / "latest").read_text() == "checkpoint-0000002"


def test_nonfinite_weights_are_never_saved(data, run):
    with Trainer(config(data, run, steps=STEPS + 1)) as trainer:
        with torch.no_grad():
            trainer.params[0].view(-1)[0] = float("inf")
        with pytest.raises(NonFiniteError, match="step 3: the weights are not finite; not saving them"):
            trainer.save()
    assert (run / "latest").read_text() == "checkpoint-0000003"
    assert not list(run.glob(".checkpoint-*"))


# --------------------------------------------------------------------------- leftovers, modes, re-runs


def test_leftovers_of_killed_writes_are_removed_at_the_next_start(data, run, capsys):
    (run / ".checkpoint-0000004.staging").mkdir()
    (run / ".checkpoint-0000004.staging" / "__0_0.distcp").write_bytes(b"half")
    (run / ".checkpoint-0000002.tmp-abc123").mkdir()  # janus_fast <= 0.2's staging name
    (run / ".metrics.jsonl.k2j3h4g5.jsonl").write_text("{")
    (run / ".latest.a1b2c3d4").write_text("check")
    (run / "notes.txt").write_text("mine")
    with Trainer(config(data, run, steps=STEPS)) as trainer:
        assert trainer.step == STEPS
    assert "removed what interrupted writes left in" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".") or not p.name.startswith("checkpoint-")) == \
        [".train.lock", "latest", "loss_curve.png", "metrics.jsonl", "notes.txt"]


def test_file_modes_follow_the_umask(finished, tmp_path):
    """Under umask 022: files 0644, folders 0755 (metrics.jsonl, latest, loss_curve.png, the lock,
    every checkpoint file and folder); atomic_write follows any umask."""
    modes = {p.relative_to(finished): p.stat().st_mode & 0o777 for p in [finished, *finished.rglob("*")]}
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o755 if (finished / p).is_dir() else 0o644)}
    assert not wrong
    assert {Path("metrics.jsonl"), Path("latest"), Path("loss_curve.png"), Path(".train.lock"),
            Path("checkpoint-0000003/.metadata"), Path("checkpoint-0000003/__0_0.distcp")} <= set(modes)
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            atomic_write_text(tmp_path / f"f{mask}", "x")
        finally:
            os.umask(old)
        assert (tmp_path / f"f{mask}").stat().st_mode & 0o777 == mode


def test_finished_run_started_again_says_it_is_complete(data, run, capsys):
    history = (run / "metrics.jsonl").read_bytes()
    status, err = train_cli(data, run, capsys)
    assert status == 0
    assert err.strip() == f"the run in {run} is already complete (step 3 of 3); raise steps to train further, " \
                          "or choose a new output_dir"
    assert (run / "metrics.jsonl").read_bytes() == history
    assert (run / "latest").read_text() == "checkpoint-0000003"


# --------------------------------------------------------------------------- config types


@pytest.mark.parametrize("key, value, rule", [
    ("steps", 2.5, "steps must be an integer >= 1 (got 2.5)"),
    ("steps", 0, "steps must be an integer >= 1 (got 0)"),
    ("weight_decay", -5, "weight_decay must be a finite number >= 0 (got -5)"),
    ("stage", True, "stage must be one of 1, 2, 3 (got true)"),
    ("image_loss_weight", -1, "image_loss_weight must be a finite number >= 0 (got -1)"),
    ("row_tokens", "1024", "row_tokens must be an integer in [1, 1048576] (got \"1024\")"),
    ("lr", float("nan"), "lr must be a finite number > 0 (got nan)"),
    ("betas", [0.9], "betas must be two numbers in [0, 1), e.g. [0.9, 0.95] (got [0.9])"),
    ("activation_checkpointing", "yes", 'activation_checkpointing must be one of "selective", "full", "none" (or true/false: "full"/"none") (got "yes")'),
    ("seed", -1, "seed must be an integer in [0, 4294967295] (got -1)"),
    ("model", "random:huge", "model must be a release directory or random:tiny|1b|7b (got \"random:huge\")"),
    ("collective_timeout", 0, "collective_timeout must be a finite number > 0 (got 0)"),
    ("skip_nonfinite_steps", -1, "skip_nonfinite_steps must be an integer >= 0 (got -1)"),
])
def test_config_fields_are_checked_by_type_and_range(data, tmp_path, key, value, rule):
    with pytest.raises(ValueError) as e:
        config(data, tmp_path, **{key: value})
    assert str(e.value) == f"invalid training config: {rule}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rule is about a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(data, tmp_path, capsys):
    file = config_file(data, tmp_path / "run")
    cfg = json.loads(file.read_text())
    file.write_text(json.dumps({**cfg, "device": "cuda", "stage": True}))
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(file)])
    assert capsys.readouterr().err == (
        "janus-fast train: error: invalid training config: stage must be one of 1, 2, 3 (got true); device is "
        "'cuda' but no CUDA GPU is available here (use \"cpu\", or leave it unset) (got \"cuda\")\n")


def test_config_from_file_checks_before_loading(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"data": "nowhere.jsonl", "output_dir": "out", "steps": 2.5}))
    with pytest.raises(ValueError, match=r"^invalid training config: steps must be an integer >= 1 \(got 2.5\)$"):
        TrainConfig.from_file(file)


# --------------------------------------------------------------------------- reading and exporting


def test_checkpoint_index_runs_no_code_and_stays_inside(run):
    """The index is unpickled through an allow-list, and its shard names must be plain names."""
    index = ckpt(run, 3) / ".metadata"
    metadata = read_metadata(ckpt(run, 3))
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first] = dataclasses.replace(metadata.storage_data[first], relative_path="../x.distcp")
    index.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"names a shard outside the checkpoint: '\.\./x\.distcp'"):
        validate(ckpt(run, 3))

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    index.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"not a readable checkpoint index \(UnpicklingError: posix.system is "
                                              r"not part of a checkpoint index\)"):
        validate(ckpt(run, 3))
    assert not (Path.cwd() / "pwned").exists()


def test_export_streams_one_weight_file_at_a_time(finished, tmp_path):
    """A release directory from the run, read in groups of at most max_shard_size (a tensor
    larger than that alone), equal to the one-file export and loadable by from_pretrained."""
    limit = 500_000
    groups = []
    export_release(finished, tmp_path / "sharded", max_shard_size=limit, on_shard=groups.append)
    export_release(finished, tmp_path / "whole")
    sharded = JanusPro.from_pretrained(tmp_path / "sharded", dtype=None, device="cpu")
    whole = JanusPro.from_pretrained(tmp_path / "whole", dtype=None, device="cpu")
    sizes = {k: v.nbytes for k, v in whole.state_dict().items()}
    assert len(groups) == len(list((tmp_path / "sharded").glob("model-*.safetensors"))) >= 2
    assert all(len(g) == 1 or sum(sizes[k] for k in g) <= limit for g in groups)
    assert sorted(k for g in groups for k in g) == sorted(sizes)
    for (name, x), y in zip(sharded.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(x, y), name
    assert sharded.processor is not None


def test_export_casts_and_refuses_damage_in_one_line(finished, run, tmp_path, capsys):
    cli.main(["export", str(ckpt(run, 2)), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert JanusPro.from_pretrained(tmp_path / "bf16", dtype=None, device="cpu").dtype == torch.bfloat16
    shard = ckpt(run, 3) / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:10])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["export", str(ckpt(run, 3)), "--out", str(tmp_path / "bad")])
    assert capsys.readouterr().err == f"janus-fast export: error: {shard} is truncated: 10 bytes, the index needs " \
                                      f"{(ckpt(finished, 3) / '__0_0.distcp').stat().st_size}\n"
