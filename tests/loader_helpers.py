"""Building TrainLoaders over small JSONL files in tests, and reading back what they packed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from janus_fast.training import TrainConfig
from janus_fast.training.data import GEN_IMAGE, EncodedSample
from janus_fast.training.distributed import Topology
from janus_fast.training.loader import TrainLoader
from janus_fast.training.vq_cache import file_digest


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def make_loader(model, data, out, rank: int = 0, world: int = 1, **overrides) -> TrainLoader:
    """A loader for `model` (no process group needed: the loader never communicates). In-process
    (loader_workers 0) and without unconditional prompts unless overridden."""
    settings = dict(row_tokens=600, loader_workers=0, uncond_prob=0.0, vq_cache_dir=str(Path(out) / "vq_cache"))
    settings.update(overrides)
    config = TrainConfig(data=data if isinstance(data, list) else str(data), output_dir=str(out), **settings)
    return TrainLoader(config, model, model.processor, Topology(rank, world, torch.device("cpu")))


def encoded(loader: TrainLoader, f: int, i: int) -> EncodedSample:
    """Sample i of file f as the packer encodes it, VQ ids read from the cache (fill it first)."""
    sample = loader.source.reader.encode(f, i)
    if sample.prompt is not None:
        ids = loader.source.cache.get(file_digest(sample.image))
        assert ids is not None, f"{sample.name}: not in the VQ cache yet"
        at = [j for j, k in enumerate(sample.kinds) if k == GEN_IMAGE]
        for j, v in zip(at, ids.tolist()):
            sample.ids[j] = v
    return sample


def steps(loader: TrainLoader, n: int) -> list:
    """n steps' micro-batches' inputs and counts, then the loader closed."""
    try:
        return [loader.next_step() for _ in range(n)]
    finally:
        loader.close()


def same_batches(a, b) -> bool:
    """Two lists of StepBatches hold the same micro-batches (tensors equal) and counts."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if (x.text_targets, x.image_targets, x.tokens, x.position) != (y.text_targets, y.image_targets, y.tokens,
                                                                       y.position):
            return False
        if [m.samples for m in x.micro] != [m.samples for m in y.micro]:
            return False
        for m, n in zip(x.micro, y.micro):
            for k, v in m.inputs.items():
                if not (torch.equal(v, n.inputs[k]) if isinstance(v, torch.Tensor) else v == n.inputs[k]):
                    return False
    return True


def startup_probe(n: int, root: str) -> dict:
    """Run in a fresh process: write n short text samples, then time a Trainer from construction
    to the end of its first step; peak RSS of this process and of its loader workers."""
    import resource
    import time

    from janus_fast.training import Trainer

    data = Path(root) / "train.jsonl"
    data.write_text("".join(json.dumps({"type": "text", "text": f"Sample {i}: {i % 97} plus {i % 89} is "
                                                                 f"{i % 97 + i % 89}."}) + "\n" for i in range(n)))
    torch.set_num_threads(1)
    start = time.perf_counter()
    trainer = Trainer(TrainConfig(data=str(data), output_dir=str(Path(root) / "out"), steps=1, row_tokens=512,
                                  mixed_precision="fp32", progress=False))
    record = trainer.train_step()
    seconds = time.perf_counter() - start
    trainer.loader.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"samples": n, "seconds": seconds, "peak_rss_mb": peak, "worker_peak_rss_mb": workers,
            "padding": record["padding"]}
