"""The training loop on the CPU with the tiny model: the stages' freezing recipes, exact resume,
bf16 autocast, the `train` command (the loss falls, the exported checkpoint loads), and saves
interrupted at each stage. (torchrun: test_training_distributed.py; faults: test_training_faults.py.)"""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from janus_fast import cli
from janus_fast.training import TrainConfig, Trainer
from janus_fast.training.config import is_trained
from tests.training_helpers import REPO, config, exported, losses, make_data, metrics

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("train_data"))


@pytest.mark.parametrize("stage, gen_embed", [(1, False), (1, True), (2, False), (3, False)])
def test_freezing_recipes(data, tmp_path, stage, gen_embed):
    with Trainer(config(data, tmp_path, stage=stage, stage1_gen_embed=gen_embed, steps=1, warmup_steps=0)) as trainer:
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train_step()
        changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    trained = {n for n in before if is_trained(n, stage, gen_embed)}
    assert changed <= trained, f"frozen parameters changed: {sorted(changed - trained)[:5]}"
    groups = {1: ("aligner.", "gen_aligner.", "gen_head."),
              2: ("language_model.", "gen_embed.", "aligner.", "gen_aligner.", "gen_head."),
              3: ("language_model.", "vision_model.", "aligner.", "gen_head.")}[stage]
    for prefix in groups:
        assert any(n.startswith(prefix) for n in changed), f"stage {stage} did not train {prefix}"
    # stage 1 trains gen_embed only when asked (the report does not say)
    assert stage != 1 or any(n.startswith("gen_embed.") for n in changed) == gen_embed
    assert not any(n.startswith("gen_vision_model.") for n in changed)
    assert stage == 3 or not any(n.startswith("vision_model.") for n in changed)


def test_exact_resume(data, tmp_path):
    """Interrupted after 1 of 2 steps (with gradient accumulation) and resumed from the checkpoint:
    the same losses, bit for bit, and the same final weights, as an uninterrupted run."""
    with Trainer(config(data, tmp_path / "whole", steps=2, grad_accum=2)) as trainer:
        whole = trainer.fit()
    with Trainer(config(data, tmp_path / "split", steps=2, grad_accum=2)) as trainer:
        assert len(trainer.fit(max_steps=1)) == 1
    with Trainer(config(data, tmp_path / "split", steps=2, grad_accum=2)) as resumed:
        assert resumed.step == 1
        assert losses(resumed.fit()) == losses(whole)
    a = exported(tmp_path / "whole", tmp_path / "whole_release")
    b = exported(tmp_path / "split", tmp_path / "split_release")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.processor is not None


def test_bf16_autocast_keeps_fp32_masters(data, tmp_path):
    with Trainer(config(data, tmp_path, mixed_precision="bf16", steps=1, activation_checkpointing="none")) as trainer:
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
    assert [p.name for p in out.glob(".*")] == [".train.lock"]  # no temporary leftovers
    model = exported(out, tmp_path / "release")
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


def test_interrupted_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    """Saves of step 2 stopped while the shards are written, at the rename that commits them, and
    before `latest` moves: each time the next start would remove the staging folder and resume
    from the newest whole checkpoint (step 1, then step 2 once renamed into place), and does."""
    from janus_fast.training import checkpoints
    from janus_fast.training.resume import find_resume
    from janus_fast.training.rundir import clean_leftovers

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a kill leaves behind: nothing after this point runs

    def partial_shards(state, storage_writer, **kwargs):
        (Path(storage_writer.path) / "__0_0.distcp").write_bytes(b"half a shard")
        killed()

    rename = os.rename

    def commit(src, dst):  # DCP renames its index into place with os.rename too
        return killed() if Path(dst).name.startswith("checkpoint-") else rename(src, dst)

    with Trainer(config(data, tmp_path, steps=3)) as trainer:
        trainer.fit(max_steps=1)
        trainer.train_step()
        for target, resumed in (((checkpoints.dcp, "save", partial_shards), 1), ((checkpoints.os, "rename", commit), 1),
                                ((checkpoints, "atomic_write_text", killed), 2)):
            with monkeypatch.context() as m:
                m.setattr(*target)
                with pytest.raises(KeyboardInterrupt):
                    trainer.save()
            assert (tmp_path / "latest").read_text() == "checkpoint-0000001"
            assert clean_leftovers(tmp_path) == ([".checkpoint-0000002.staging"] if resumed == 1 else [])
            assert find_resume(tmp_path).state["step"] == resumed
    with Trainer(config(data, tmp_path, steps=3)) as trainer:
        assert trainer.step == 2
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint-" in p.name) == \
        ["checkpoint-0000001", "checkpoint-0000002"]


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
