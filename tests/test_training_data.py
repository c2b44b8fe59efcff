"""The streaming training data pipeline: the JSONL index (built once, cached, O(samples)
integers), the sample stream (windows, per-file epochs, mixing weights), deterministic sharding
over ranks, exact resume in the middle of an epoch on another number of processes, worker
processes (the same batches; a dead or stalled worker named, never a hang), the dataset
fingerprint, generation-image fits, and start-up cost independent of the dataset's size."""

import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from examples.make_dataset import make_dataset
from janus_fast.models.random_model import random_model
from janus_fast.training import dataset as dataset_module
from janus_fast.training.dataset import data_files, load_index, mixing_shares
from janus_fast.training import TrainConfig, Trainer
from janus_fast.training.distributed import Topology
from janus_fast.training.loader import DatasetChangedError, TrainLoader, _Feeder, _Source
from janus_fast.training.packing import SampleStream
from janus_fast.training.vq_cache import file_digest, generation_pixels
from janus_fast.training.workers import WorkerError
from tests.helpers import FULL
from tests.loader_helpers import make_loader, same_batches, startup_probe, steps, write_jsonl

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 samples of all three kinds; at row_tokens 300 a window makes 3-4 micro-batches."""
    root = tmp_path_factory.mktemp("stream_data")
    return make_dataset(root, n_text=2, n_understanding=2, n_generation=2, image_size=64, seed=5)


# ---------------------------------------------------------------------------------------- index
def test_index_offsets_lines_and_cache(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    lines = [b'{"type": "text", "text": "a"}\r\n', b"\n", b"   \n", b'{"type": "text", "text": "bb"}\n',
             b'{"type": "text", "text": "\xc3\xa9"}']  # CRLF, blank lines, no final newline
    path.write_bytes(b"".join(lines))
    index = load_index(path)
    assert index.lines.tolist() == [1, 4, 5]
    assert index.offsets.tolist() == [0, sum(map(len, lines[:3])), sum(map(len, lines[:4]))]
    assert index.offsets.dtype.itemsize == 8 and index.sizes.tolist() == [len(lines[0]), len(lines[3]), len(lines[4])]
    assert (tmp_path / ".d.jsonl.index.npz").is_file()

    def no_build(path):
        raise AssertionError("the cached index was rebuilt")

    monkeypatch.setattr(dataset_module, "build_index", no_build)
    assert load_index(path).offsets.tolist() == index.offsets.tolist()  # read from the cache
    monkeypatch.undo()
    path.write_bytes(b"".join(lines) + b'\n{"type": "text", "text": "new"}\n')  # changed: rebuilt
    assert load_index(path).lines.tolist() == [1, 4, 5, 6]


def test_index_falls_back_when_the_data_folder_is_read_only(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    data = write_jsonl(tmp_path / "ro" / "d.jsonl", [{"type": "text", "text": "a"}])
    real = dataset_module.atomic_write

    def read_only(file, write):
        if Path(file).parent == data.parent:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, write)

    monkeypatch.setattr(dataset_module, "atomic_write", read_only)
    assert len(load_index(data, tmp_path / "cache")) == 1
    assert len(list((tmp_path / "cache").glob("d-*.index.npz"))) == 1 and not (data.parent / ".d.jsonl.index.npz").exists()
    assert len(load_index(data)) == 1  # nowhere to write: in memory only


def test_data_entries():
    assert data_files("a.jsonl") == [("a.jsonl", None)]
    assert data_files([{"path": "a", "weight": 5}, {"path": "b", "weight": 1.5}]) == [("a", 5.0), ("b", 1.5)]
    for bad in ([], [{"path": "a", "weight": 0}], [{"path": "a", "weight": True}], [{"path": "a"}, "b"], [3],
                [{"path": "a", "weight": 1, "extra": 2}]):
        with pytest.raises(ValueError, match="data"):
            data_files(bad)


# ---------------------------------------------------------------------------------------- stream
def test_stream_windows_epochs_and_mixing():
    # The Janus-Pro stage III mix: multimodal : text : text-to-image = 5 : 1 : 4.
    sizes, weights = [7, 3, 5], [5, 1, 4]
    shares = mixing_shares(sizes, weights)
    assert shares == [Fraction(1, 2), Fraction(1, 10), Fraction(2, 5)]
    stream = SampleStream(sizes, shares, window=10, seed=3)
    taken = [[] for _ in sizes]
    for w in range(30):
        for f, i, k in stream.refs(w):
            assert k == len(taken[f])  # each file's positions in order, none skipped
            taken[f].append(i)
        for f in range(3):  # the shares hold exactly, window after window
            assert len(taken[f]) == int(shares[f] * (w + 1) * 10)
    for f, n in enumerate(sizes):  # every epoch of a file is a permutation of its samples
        for e in range(len(taken[f]) // n):
            assert sorted(taken[f][e * n:(e + 1) * n]) == list(range(n))
        assert taken[f][:n] != taken[f][n:2 * n] or n < 3  # and epochs differ
    assert mixing_shares([6, 2], [None, None]) == [Fraction(3, 4), Fraction(1, 4)]  # unweighted: concatenated
    again = SampleStream(sizes, shares, window=10, seed=3)
    assert [again.refs(w) for w in (29, 0)] == [stream.refs(29), stream.refs(0)]  # random access by window


def test_mixed_files_through_the_loader(model, tmp_path):
    files = []
    for name, n in (("und", (0, 3, 0)), ("text", (3, 0, 0)), ("gen", (0, 0, 3))):
        files.append(make_dataset(tmp_path / name, *n, image_size=64, seed=1))
    mix = [{"path": str(files[0]), "weight": 5}, {"path": str(files[1]), "weight": 1}, {"path": str(files[2]), "weight": 4}]
    loader = make_loader(model, mix, tmp_path, row_tokens=600, rows_per_batch=4, pack_window=10)
    seen = [name for step in steps(loader, 6) for m in step.micro for name in m.samples]
    counts = {kind: sum(kind in n for n in seen) for kind in ("understanding", "text", "generation")}
    assert (counts["understanding"], counts["text"], counts["generation"]) == (27, 5, 21)  # floor(54 x share): 5 : 1 : 4


# ---------------------------------------------------------------------------------------- sharding, resume
def test_ranks_share_each_step_and_counts_are_global(model, data, tmp_path):
    single = steps(make_loader(model, data, tmp_path, row_tokens=300, grad_accum=2, uncond_prob=0.5), 3)
    ranks = [steps(make_loader(model, data, tmp_path, rank=r, world=2, row_tokens=300, uncond_prob=0.5), 3)
             for r in range(2)]
    for s, r0, r1 in zip(single, *ranks):
        for r, mine in enumerate((r0, r1)):
            assert (mine.text_targets, mine.image_targets, mine.tokens, mine.position) == \
                (s.text_targets, s.image_targets, s.tokens, s.position)  # the whole step's counts
            assert len(mine.micro) == 1 and mine.micro[0].samples == s.micro[r].samples
            for k, v in s.micro[r].inputs.items():
                assert torch.equal(v, mine.micro[0].inputs[k]) if isinstance(v, torch.Tensor) else v == mine.micro[0].inputs[k]
        assert s.tokens == sum(m.num_tokens for m in s.micro)
        assert s.text_targets == sum(len(m.inputs["text_targets"]) for m in s.micro)
        assert s.image_targets == sum(len(m.inputs["image_targets"]) for m in s.micro)


def test_exact_resume_mid_epoch_on_another_world_size(model, data, tmp_path):
    whole = steps(make_loader(model, data, tmp_path, row_tokens=300, grad_accum=2, uncond_prob=0.5), 4)
    first = make_loader(model, data, tmp_path, row_tokens=300, grad_accum=2, uncond_prob=0.5)
    done = steps(first, 1)
    state = first.state_dict()
    assert 0 < state["micro_batch"] and state["window"] == 0  # stopped in the middle of the first epoch
    assert same_batches(done, whole[:1])
    for world in (1, 2):  # the same global stream, whether the run continues on 1 or 2 processes
        parts = []
        for rank in range(world):
            loader = make_loader(model, data, tmp_path, rank=rank, world=world, row_tokens=300,
                                 grad_accum=2 // world, uncond_prob=0.5)
            loader.load_state_dict(state)
            parts.append(steps(loader, 3))
        for step, *mine in zip(whole[1:], *parts):
            assert [n for m in mine for b in m.micro for n in [b.samples]] == [b.samples for b in step.micro]
            assert all((m.tokens, m.position) == (step.tokens, step.position) for m in mine)


def test_workers_give_the_same_batches(model, data, tmp_path):
    inline = steps(make_loader(model, data, tmp_path, row_tokens=300, uncond_prob=0.5), 5)
    forked = steps(make_loader(model, data, tmp_path, row_tokens=300, uncond_prob=0.5, loader_workers=2), 5)
    assert same_batches(inline, forked)
    padding = [s.padding for s in inline]
    assert all(0 <= p < 1 for p in padding) and padding == [1 - s.tokens / 300 for s in inline]


def test_each_rank_encodes_the_images_of_its_own_micro_batches(model, tmp_path, monkeypatch):
    """The VQ-id cache is filled by every rank in parallel, each for the micro-batches it builds.
    8 text-to-image samples, one per micro-batch: a window (an epoch) is 4 steps of 2 ranks."""
    data = make_dataset(tmp_path / "d", n_text=0, n_understanding=0, n_generation=8, image_size=64, seed=4)
    probe = make_loader(model, data, tmp_path / "probe")
    reader = probe.source.reader
    budget = max(len(reader.encode(0, i)) for i in range(8))
    by_name = {reader.encode(0, i).name: file_digest(reader.encode(0, i).image) for i in range(8)}
    finished, finish = [], _Feeder._finish
    monkeypatch.setattr(_Feeder, "_finish", lambda self, built: finished.append(built.batch.samples) or
                        finish(self, built))
    whole = steps(make_loader(model, data, tmp_path / "one", row_tokens=budget, grad_accum=2, prefetch_steps=1), 1)
    encoded_by = []
    for rank in range(2):
        finished.clear()
        loader = make_loader(model, data, tmp_path / f"rank{rank}", rank=rank, world=2, row_tokens=budget,
                             prefetch_steps=1)
        (step,) = steps(loader, 1)
        assert finished[0] == step.micro[0].samples == whole[0].micro[rank].samples
        cached = {p.stem for p in (tmp_path / f"rank{rank}" / "vq_cache").rglob("*.safetensors")}
        assert cached == {by_name[name] for names in finished for name in names}  # what it built, no more
        encoded_by.append(cached)
    assert encoded_by[0] and encoded_by[1] and not encoded_by[0] & encoded_by[1]  # two shares, encoded apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU: pinned host memory, copies on a side stream")
def test_batches_arrive_on_the_gpu(data, tmp_path):
    gpu_model = random_model("tiny", seed=1, device="cuda")
    cpu = steps(make_loader(random_model("tiny", seed=1), data, tmp_path / "cpu", row_tokens=300, uncond_prob=0.5), 3)
    # The CPU run's VQ ids (its cache): a GPU's convolutions may round differently.
    config = dict(row_tokens=300, uncond_prob=0.5, loader_workers=2, vq_cache_dir=str(tmp_path / "cpu" / "vq_cache"))
    loader = TrainLoader(TrainConfig(data=str(data), output_dir=str(tmp_path / "gpu"), **config), gpu_model,
                         gpu_model.processor, Topology(0, 1, torch.device("cuda")))
    gpu = steps(loader, 3)
    torch.cuda.synchronize()
    for a, b in zip(cpu, gpu):
        assert b.ready is not None and b.ready.query()
        for m, n in zip(a.micro, b.micro):
            for k, v in m.inputs.items():
                if isinstance(v, torch.Tensor):
                    assert n.inputs[k].is_cuda and torch.equal(v, n.inputs[k].cpu()), k
                else:
                    assert v == n.inputs[k]


def loader_processes() -> list:
    return [p for p in multiprocessing.active_children() if p.name == "janus-fast-loader"]


def test_a_dropped_loader_stops_its_workers(model, data, tmp_path):
    loader = make_loader(model, data, tmp_path, row_tokens=300, loader_workers=2)
    loader.next_step()  # workers busy preparing the next steps
    assert len(loader_processes()) == 2
    del loader  # e.g. a Trainer used for a few train_step() calls, never fit() or closed
    gc.collect()
    assert not loader_processes()


# ---------------------------------------------------------------------------------------- failures
def _die(self, plan):
    os.kill(os.getpid(), signal.SIGKILL)


def _stall(self, plan):
    time.sleep(60)


def test_a_dead_or_stalled_worker_stops_the_run_naming_its_samples(model, data, tmp_path, monkeypatch):
    monkeypatch.setattr(_Source, "build", _die)  # forked workers inherit it; planning still works
    loader = make_loader(model, data, tmp_path, row_tokens=300, loader_workers=1)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"loader worker 0 \(pid \d+\) died \(killed by SIGKILL\) while building "
                                          r"a micro-batch of samples train.jsonl:\d"):
        loader.next_step()
    monkeypatch.setattr(_Source, "build", _stall)
    loader = make_loader(model, data, tmp_path, row_tokens=300, loader_workers=1, loader_timeout=1.0)
    with pytest.raises(WorkerError, match=r"sent nothing for 1 s \(loader_timeout\) while building a micro-batch "
                                          r"of samples train.jsonl:\d"):
        loader.next_step()
    assert time.monotonic() - start < 20
    assert not loader_processes()


def test_a_changed_dataset_or_setting_is_named_on_resume(model, tmp_path):
    data = make_dataset(tmp_path / "d", n_text=2, n_understanding=0, n_generation=0, seed=2)
    loader = make_loader(model, data, tmp_path, row_tokens=300)
    steps(loader, 1)
    state = loader.state_dict()
    assert loader.fingerprint() == make_loader(model, data, tmp_path, row_tokens=300).fingerprint()
    with pytest.raises(DatasetChangedError, match=r"row_tokens 300 -> 301"):
        make_loader(model, data, tmp_path, row_tokens=301).load_state_dict(state)
    with data.open("a") as f:
        f.write(json.dumps({"type": "text", "text": "one more"}) + "\n")
    with pytest.raises(DatasetChangedError, match=r"train.jsonl: contents \w+ -> \w+; train.jsonl: samples 2 -> 3"):
        make_loader(model, data, tmp_path, row_tokens=300).load_state_dict(state)
    with pytest.raises(DatasetChangedError, match="older janus_fast loader"):
        loader.load_state_dict({"epoch": 0, "row": 1, "seed": 0})


def test_a_resumed_trainer_refuses_a_changed_dataset(tmp_path):
    data = make_dataset(tmp_path / "d", n_text=2, n_understanding=0, n_generation=0, seed=2)
    config = TrainConfig(data=str(data), output_dir=str(tmp_path / "run"), steps=2, row_tokens=300, progress=False,
                         mixed_precision="fp32", activation_checkpointing=False, loader_workers=0)
    Trainer(config).fit(max_steps=1)
    data.write_text(data.read_text().replace("sum", "Sum"))  # same length, other contents
    with pytest.raises(DatasetChangedError, match=r"dataset or packing settings changed .* train.jsonl: contents"):
        Trainer(config)


def test_generation_image_fit(model, tmp_path):
    from PIL import Image

    proc = model.processor
    image = Image.new("RGB", (96, 64), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 80, 64))  # blue centre square, red bands left and right
    image.save(tmp_path / "wide.png")
    crop = generation_pixels(proc, "s", tmp_path / "wide.png", "crop")
    assert torch.equal(crop, proc.preprocess_images([image.crop((16, 0, 80, 64))])[0])
    assert (crop[2] > 0.9).all() and (crop[0] < -0.9).all()  # all blue: the bands are cut off
    box = generation_pixels(proc, "s", tmp_path / "wide.png", "letterbox")
    assert torch.equal(box, proc.preprocess_images([image])[0])
    assert box[:, 0].abs().max() < 0.01  # a grey bar on top (the mean colour)


# ---------------------------------------------------------------------------------------- start-up cost
def _probe(n: int, root: Path, fresh: bool) -> dict:
    """startup_probe in a fresh interpreter (the real start-up), or in a process forked from this
    one (no import cost: both sizes start from the same memory, so the difference still holds)."""
    root.mkdir()
    if fresh:
        code = f"import json; from tests.loader_helpers import startup_probe; print(json.dumps(startup_probe({n}, {str(root)!r})))"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-4000:]
        return json.loads(out.stdout.strip().splitlines()[-1])
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=lambda: results.put(startup_probe(n, str(root))))
    child.start()
    try:
        return results.get(timeout=300)
    finally:
        child.join(timeout=60)


@pytest.mark.parametrize("big, fresh", [(200_000, False)] + ([(200_000, True), (1_000_000, True)] if FULL else []))
def test_startup_cost_does_not_grow_with_the_dataset(tmp_path, big, fresh):
    """Construction to the end of the first step, 1k samples against `big`: the index is one
    streaming pass (cached after), samples are tokenised when packed; goal < +150 MB peak RSS
    (main process and loader workers), < +30 s, per 200k samples."""
    small, large = _probe(1_000, tmp_path / "small", fresh), _probe(big, tmp_path / "big", fresh)
    print(f"start-up 1k: {small}\nstart-up {big}: {large}")
    scale = big / 200_000
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 150 * scale
    assert large["worker_peak_rss_mb"] - small["worker_peak_rss_mb"] < 150 * scale
    assert large["seconds"] - small["seconds"] < 30 * scale
    assert 0 <= large["padding"] < 0.2  # the step's record reports what packing left unused
