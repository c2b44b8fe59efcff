"""FSDP2 under torchrun with CPU processes (gloo): runs killed with kill -9 and resumed on 2
processes, on 1, and a 1-process checkpoint resumed on 2, each giving the losses of one
uninterrupted process (world x grad_accum constant); every rank writes its own shards; a rank
that dies or stalls ends the run with an error naming it within a stated time; gradients stay
sharded under accumulation."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from janus_fast.training import Trainer
from janus_fast.training.checkpoints import read_metadata
from janus_fast.training.resume import find_resume
from tests.helpers import FULL
from tests.training_helpers import (REPO, Torchrun, assert_same_losses, assert_same_weights, config, exported,
                                    latest_is, make_data, metrics)

STEPS = 3
# A constant learning rate (the schedule would depend on `steps`): a killed run is set up for 50
# steps, so that it is surely still running when killed, wherever the kill lands, and finished
# one step after the checkpoint it resumes from.
CONSTANT_LR = dict(warmup_steps=0, min_lr_ratio=1.0)
WORKERS = dict(loader_workers=1)  # the torchrun runs load in a worker process, the in-process ones in a thread
full_tier = pytest.mark.skipif(not FULL, reason="full tier (JANUS_FAST_FULL_TESTS=1): more torchrun launches")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """`reference(steps)`: one uninterrupted process accumulating the 2 micro-batches that 2 ranks
    share, `steps` long (runs are shared)."""
    runs = {}

    def run(steps: int = STEPS) -> Path:
        if steps not in runs:
            out = tmp_path_factory.mktemp("reference") / "run"
            with Trainer(config(data, out, steps=steps, grad_accum=2, **CONSTANT_LR)) as trainer:
                trainer.fit()
            runs[steps] = out
        return runs[steps]

    return run


def killed_mid_run(data, out, tmp_path) -> int:
    """A 2-process run (a checkpoint after every step) killed with kill -9 once a step is saved;
    returns the step it resumes from (wherever the kill landed)."""
    run = Torchrun(config(data, out, steps=50, save_every=1, **CONSTANT_LR, **WORKERS), tmp_path / "fsdp.json")
    run.wait_for(latest_is(out, 1), interval=0.02)
    run.kill()
    run.wait()
    return find_resume(out).state["step"]


def test_killed_two_process_run_resumes_on_one(data, reference, tmp_path):
    """kill -9 mid-run on 2 ranks, finished by 1 process with grad_accum 2: every step's losses
    and the final weights are the uninterrupted run's; both ranks wrote model and optimizer shards."""
    out = tmp_path / "fsdp"
    step = killed_mid_run(data, out, tmp_path)
    by_file = {}
    for index, info in read_metadata(find_resume(out).path).storage_data.items():
        by_file.setdefault(info.relative_path, set()).add(index.fqn.split(".")[0])
    assert by_file == {"__0_0.distcp": {"model", "optim"}, "__1_0.distcp": {"model", "optim"}}
    with Trainer(config(data, out, steps=step + 1, grad_accum=2, **CONSTANT_LR)) as trainer:
        assert trainer.step == step
        trainer.fit()
    expected = reference(step + 1)
    assert_same_losses(metrics(out), metrics(expected))  # steps 1..step on 2 processes, the last on 1
    assert_same_weights(exported(out, tmp_path / "a"), exported(expected, tmp_path / "b"))


@full_tier
def test_killed_two_process_run_resumes_on_two(data, reference, tmp_path):
    out = tmp_path / "fsdp"
    step = killed_mid_run(data, out, tmp_path)
    Torchrun(config(data, out, steps=step + 1, save_every=1, **CONSTANT_LR), tmp_path / "again.json").succeed()
    expected = reference(step + 1)
    assert_same_losses(metrics(out), metrics(expected))
    assert_same_weights(exported(out, tmp_path / "a"), exported(expected, tmp_path / "b"))


@full_tier
def test_one_process_checkpoint_resumes_on_two(data, reference, tmp_path):
    out = tmp_path / "run"
    with Trainer(config(data, out, steps=STEPS, grad_accum=2, **CONSTANT_LR)) as trainer:
        trainer.fit(max_steps=1)
    output = Torchrun(config(data, out, steps=STEPS, **CONSTANT_LR), tmp_path / "fsdp.json").succeed()
    assert "resharding: the checkpoint was written by 1 processes, this run has 2" in output
    assert_same_losses(metrics(out), metrics(reference()))
    assert_same_weights(exported(out, tmp_path / "a"), exported(reference(), tmp_path / "b"))


@full_tier
def test_fsdp2_policies_keep_the_losses(data, reference, tmp_path):
    """Deferred reduction, parameters kept from forward to backward, CPU offload of the shards
    and optimizer state (on a CPU run the offload moves nothing: this checks the code path)."""
    out = tmp_path / "run"
    cfg = config(data, out, steps=2, defer_grad_reduce=True, reshard_after_forward=False, cpu_offload=True,
                 **CONSTANT_LR)
    Torchrun(cfg, tmp_path / "fsdp.json").succeed()
    assert_same_losses(metrics(out), metrics(reference())[:2])


@full_tier
def test_a_rank_that_dies_ends_the_run_naming_it(data, tmp_path):
    out = tmp_path / "run"
    run = Torchrun(config(data, out, steps=50, save_every=1), tmp_path / "fsdp.json")
    run.wait_for(latest_is(out, 1))
    os.kill(run.worker(1), signal.SIGKILL)
    start = time.monotonic()
    rc, output = run.wait(timeout=120)
    assert rc != 0 and time.monotonic() - start < 60
    assert "rank      : 1" in output and "Signal 9 (SIGKILL)" in output, output[-4000:]
    assert (out / "latest").is_file()  # and what was saved stays loadable
    assert Trainer(config(data, out, steps=50, grad_accum=2)).step >= 1


@full_tier
def test_a_stalled_rank_fails_the_collective_after_the_timeout(data, tmp_path):
    """Rank 1 stopped (SIGSTOP): rank 0's next collective fails after collective_timeout (5 s)
    with one line naming it, and torchrun ends the job."""
    out = tmp_path / "run"
    run = Torchrun(config(data, out, steps=50, save_every=1, collective_timeout=5), tmp_path / "fsdp.json")
    run.wait_for(latest_is(out, 1))
    stalled = run.worker(1)
    os.kill(stalled, signal.SIGSTOP)
    start = time.monotonic()
    try:
        rc, output = run.wait(timeout=120)
    finally:
        run.kill()
    assert rc != 0 and time.monotonic() - start < 120  # 5 s, then torchrun's 30 s SIGTERM grace
    assert "janus-fast train: error: rank 0: a collective failed (" in output, output[-4000:]
    assert "another rank died or stalled (collective_timeout 5 s)" in output


def gradient_bytes(tmp_path, data, defer: bool) -> dict:
    """Gradient bytes each rank holds between the micro-batches of a step (2 ranks, grad_accum 2);
    the two workers are started directly (torchrun's environment, without its agent)."""
    cfg = config(data, tmp_path / f"run{defer}", steps=1, grad_accum=2, defer_grad_reduce=defer)
    file, result = tmp_path / f"c{defer}.json", tmp_path / f"memory{defer}.json"
    file.write_text(json.dumps(cfg.to_dict()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    workers = [subprocess.Popen([sys.executable, "-m", "tests.training_memory", str(file), str(result)], cwd=REPO,
                                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        assert [w.wait(timeout=300) for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.kill()
    return json.loads(result.read_text())


def test_gradients_stay_sharded_under_accumulation(data, tmp_path):
    """After micro-batch 1 of 2, each rank holds only its fp32 shard of the accumulated gradient
    (the shards add up to the trained bytes once); with defer_grad_reduce, every rank holds
    full-size unsharded gradients."""
    measured = gradient_bytes(tmp_path, data, defer=False)
    trained = measured["trained_bytes"]
    assert sum(r["sharded"] for r in measured["ranks"]) == trained
    assert all(r["unsharded"] == 0 and r["sharded"] < 0.6 * trained for r in measured["ranks"]), measured
    if FULL:
        measured = gradient_bytes(tmp_path, data, defer=True)
        assert all(r["unsharded"] == trained and r["sharded"] == 0 for r in measured["ranks"]), measured
