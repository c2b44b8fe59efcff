"""The training loop on the CPU with the tiny model: the stages' freezing recipes, exact resume,
bf16 autocast, the `train` command (the loss falls, the checkpoint loads), and FSDP2 over two
gloo processes matching one process."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.make_dataset import make_dataset
from janus_fast import cli
from janus_fast.models.janus_pro import JanusPro
from janus_fast.training import TrainConfig, Trainer
from janus_fast.training.config import is_trained
from tests.helpers import FULL

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return make_dataset(root, n_text=2, n_understanding=2, n_generation=2, image_size=64, seed=5)


def config(data, out, **overrides) -> TrainConfig:
    base = dict(data=str(data), output_dir=str(out), model="random:tiny", steps=4, row_tokens=600, rows_per_batch=1,
                grad_accum=1, lr=3e-3, warmup_steps=1, mixed_precision="fp32", activation_checkpointing="selective",
                uncond_prob=0.5, progress=False, vq_cache_dir=str(Path(data).parent / "vq_cache"), seed=0)
    base.update(overrides)
    return TrainConfig(**base)


def losses(history):
    return [(r["loss"], r["text_loss"], r["image_loss"]) for r in history]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_freezing_recipes(data, tmp_path, stage):
    trainer = Trainer(config(data, tmp_path, stage=stage, steps=1, warmup_steps=0))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    trained = {n for n, _ in trainer.model.named_parameters() if is_trained(n, stage)}
    assert changed <= trained, f"frozen parameters changed: {sorted(changed - trained)[:5]}"
    groups = {1: ("aligner.", "gen_aligner.", "gen_head."),
              2: ("language_model.", "gen_embed.", "aligner.", "gen_aligner.", "gen_head."),
              3: ("language_model.", "vision_model.", "aligner.", "gen_head.")}[stage]
    for prefix in groups:
        assert any(n.startswith(prefix) for n in changed), f"stage {stage} did not train {prefix}"
    assert not any(n.startswith("gen_vision_model.") for n in changed)
    assert stage == 3 or not any(n.startswith("vision_model.") for n in changed)


def test_exact_resume(data, tmp_path):
    """Interrupted after 1 of 2 steps (with gradient accumulation) and resumed from the checkpoint:
    the same losses, bit for bit, and the same final weights, as an uninterrupted run."""
    whole = Trainer(config(data, tmp_path / "whole", steps=2, grad_accum=2)).fit()
    first = Trainer(config(data, tmp_path / "split", steps=2, grad_accum=2)).fit(max_steps=1)
    assert len(first) == 1
    resumed = Trainer(config(data, tmp_path / "split", steps=2, grad_accum=2))
    assert resumed.step == 1
    assert losses(resumed.fit()) == losses(whole)
    a = JanusPro.from_pretrained(tmp_path / "whole" / "checkpoint-0000002", dtype=None, device="cpu")
    b = JanusPro.from_pretrained(tmp_path / "split" / "checkpoint-0000002", dtype=None, device="cpu")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.processor is not None


def test_bf16_autocast_keeps_fp32_masters(data, tmp_path):
    trainer = Trainer(config(data, tmp_path, mixed_precision="bf16", steps=1, activation_checkpointing="none"))
    record = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(record[k])) for k in ("loss", "text_loss", "image_loss"))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_train_command(data, tmp_path):
    cfg = dataclasses.asdict(config(data, tmp_path / "run", steps=4, save_every=2))
    cfg.pop("progress")
    file = tmp_path / "train.json"
    file.write_text(json.dumps(cfg))
    cli.main(["train", "--config", str(file)])
    out = tmp_path / "run"
    history = metrics(out)
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "latest").read_text() == "checkpoint-0000004"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000002", "checkpoint-0000004"]
    assert not list(out.glob(".*"))  # no temporary leftovers
    model = JanusPro.from_pretrained(out / "checkpoint-0000004", dtype=None, device="cpu")
    assert model.dtype == torch.float32 and model.processor is not None


def test_example_config_reads_the_example_dataset():
    cfg = TrainConfig.from_file(REPO / "examples" / "train_tiny.json")
    assert Path(cfg.data) == REPO / "examples" / "data" / "train.jsonl"  # where make_dataset.py writes
    assert cfg.model == "random:tiny" and cfg.mixed_precision == "fp32"


def test_bad_config(tmp_path, data, capsys):
    file = tmp_path / "bad.json"
    file.write_text(json.dumps({"data": str(data), "output_dir": str(tmp_path), "stepz": 3}))
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(file)])
    assert "janus-fast train: error: unknown training config keys ['stepz']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stage"):
        config(data, tmp_path, stage=4)
    with pytest.raises(ValueError, match="grad_accum"):
        config(data, tmp_path, grad_accum=0)


def torchrun_train(cfg: TrainConfig, file: Path, *extra: str) -> None:
    """`janus-fast train` under torchrun with 2 CPU processes (gloo)."""
    d = dataclasses.asdict(cfg)
    file.write_text(json.dumps(d))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # Its own process group, so a hang is ended with the workers torchrun started.
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "janus_fast.cli", "train", "--config", str(file), *extra],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        output, _ = run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        output, _ = run.communicate()
    assert run.returncode == 0, output[-8000:]  # the workers' tracebacks come before torchrun's summary


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(a, b):
    assert len(a) == len(b)
    for x, y in zip(losses(a), losses(b)):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)


def test_fsdp2_two_gloo_processes_match_one(data, tmp_path):
    """torchrun, 2 CPU processes, gloo, fully_shard per decoder layer: each rank runs 1 of the 2
    micro-batches of a step; one process accumulating both must give the same losses."""
    single = Trainer(config(data, tmp_path / "single", steps=2, grad_accum=2)).fit()
    torchrun_train(config(data, tmp_path / "fsdp", steps=2, grad_accum=1), tmp_path / "fsdp.json")
    assert_same_losses(metrics(tmp_path / "fsdp"), single)
    a = JanusPro.from_pretrained(tmp_path / "fsdp" / "checkpoint-0000002", dtype=None, device="cpu")
    b = JanusPro.from_pretrained(tmp_path / "single" / "checkpoint-0000002", dtype=None, device="cpu")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not FULL, reason="full tier (JANUS_FAST_FULL_TESTS=1): two more torchrun launches")
def test_fsdp2_resume(data, tmp_path):
    """An FSDP2 run stopped after step 1 and restarted reads the sharded checkpoint back and goes
    on as one process accumulating both ranks' micro-batches would."""
    single = Trainer(config(data, tmp_path / "single", steps=3, grad_accum=2)).fit()
    cfg = config(data, tmp_path / "fsdp", steps=3, grad_accum=1)
    torchrun_train(cfg, tmp_path / "fsdp.json", "--steps", "1")
    torchrun_train(cfg, tmp_path / "fsdp.json")
    assert_same_losses(metrics(tmp_path / "fsdp"), single)


def test_interrupted_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    trainer = Trainer(config(data, tmp_path, steps=3))
    trainer.fit(max_steps=1)
    trainer.train_step()
    from janus_fast.training import checkpoints

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "write_weights", disk_full)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert (tmp_path / "latest").read_text() == "checkpoint-0000001"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".", "checkpoint-"))] == ["checkpoint-0000001"]
    assert Trainer(config(data, tmp_path, steps=3)).step == 1


def test_benchmark_multitask_batch_runs_on_the_tiny_model():
    """The GPU benchmark's synthetic packed batch, at a small size through the tiny model."""
    from benchmarks.bench_training import synthetic_multitask_batch
    from janus_fast.models.random_model import random_model

    model = random_model("tiny")
    proc = model.processor
    batch = synthetic_multitask_batch(model.config, proc.image_id, proc.pad_id, rows=2, row_tokens=512)
    assert 900 < batch.num_tokens <= 1024 and len(batch.inputs["und_image_positions"]) > 0  # no pads
    out = model(**batch.inputs)
    assert out.num_text_targets > 0 and out.num_image_targets > 0 and torch.isfinite(out.loss)
