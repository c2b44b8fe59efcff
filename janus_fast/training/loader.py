"""The training loader: each optimizer step's micro-batches built in the background (loader
workers read, tokenise, decode, resize and pack; the main process pins, copies and VQ-encodes
images not cached yet), on the device before the step asks for them.

Every rank plans the whole step (which samples form each of the world x grad_accum micro-batches:
tokenising only, no image decoding), so each knows the step's global target counts (the loss
divisor) without a collective, and builds only its own grad_accum micro-batches. Rank r takes
micro-batches [r * grad_accum, (r + 1) * grad_accum) of the step, so the global stream, and so
`state_dict()`, does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import GEN_IMAGE, SAMPLE_TYPES, DatasetError, EncodedSample, SampleEncoder
from .dataset import SampleReader, check_length, data_files, load_index, mixing_shares
from .packing import MicroPlan, PackedBatch, SampleStream, collate, plan_window, unconditional
from .vq_cache import VQEncoder, VQTokenCache, file_digest, generation_pixels, load_sample_image
from .workers import Cancelled, WorkerPool

_GENERATION = SAMPLE_TYPES.index("generation")


class DatasetChangedError(ValueError):
    """A resumed run's data or packing settings differ from the checkpoint's."""


@dataclass
class StepBatches:
    micro: list[PackedBatch]  # this rank's micro-batches of one optimizer step, in order, on the device
    text_targets: int  # counts over ALL ranks' micro-batches of the step (the loss divisor)
    image_targets: int
    tokens: int  # real tokens over all ranks (there are no pads)
    padding: float  # share of the step's token budget (world x grad_accum micro-batches) left unused
    position: tuple[int, int]  # (window, micro-batch) of the stream after this step
    ready: object = None  # CUDA event: the copies of `micro` are done


@dataclass
class _Built:
    batch: PackedBatch  # host tensors; generation ids still -1 where `pending`
    pending: list[tuple[int, int, str, str]]  # (offset in gen_image_ids, tokens, image digest, sample name)
    pixels: torch.Tensor | None  # [len(pending), 3, S, S]


class _Source:
    """What a worker needs: the files, the stream, the tokenizer and image preprocessing, the
    VQ-id cache's folder (read-only state, inherited by forked workers)."""

    def __init__(self, reader: SampleReader, stream: SampleStream, processor, cache: VQTokenCache | None,
                 config):
        self.reader, self.stream, self.proc, self.cache = reader, stream, processor, cache
        self.row_tokens, self.capacity = config.row_tokens, config.row_tokens * config.rows_per_batch
        self.packing, self.seed, self.uncond_prob = config.packing, config.seed, config.uncond_prob
        self.fit = config.gen_image_fit

    def measure(self, f: int, i: int) -> EncodedSample:
        sample = self.reader.encode(f, i)
        check_length(sample, self.row_tokens)
        return sample

    def plan(self, w: int) -> list[MicroPlan]:
        return plan_window(self.stream, w, self.measure, self.capacity, self.packing)

    def understanding_pixels(self, sample: EncodedSample) -> torch.Tensor:
        return self.proc.preprocess_images([load_sample_image(sample.name, sample.image)])[0]

    def build(self, plan: MicroPlan) -> _Built:
        samples, uncond, pending, pixels = [], [], [], []
        offset = 0  # of the next generation image in gen_image_ids
        for f, i, k in plan.refs:
            sample = self.reader.encode(f, i)
            if sample.prompt is not None:
                at = [j for j, kind in enumerate(sample.kinds) if kind == GEN_IMAGE]
                try:
                    digest = file_digest(sample.image)
                except OSError as e:
                    raise DatasetError(f"sample {sample.name}: image {sample.image} cannot be read ({e})") from None
                ids = self.cache.get(digest)
                if ids is None:
                    pending.append((offset, len(at), digest, sample.name))
                    pixels.append(generation_pixels(self.proc, sample.name, sample.image, self.fit))
                    ids = torch.full((len(at),), -1)
                elif ids.numel() != len(at):
                    raise DatasetError(f"sample {sample.name}: the VQ cache holds {ids.numel()} ids for its image, "
                                       f"the model expects {len(at)}")
                for j, v in zip(at, ids.tolist()):
                    sample.ids[j] = v
                offset += len(at)
            samples.append(sample)
            uncond.append(unconditional(self.seed, f, k, self.uncond_prob))
        batch = collate(samples, uncond, self.proc.pad_id, self.proc.image_size, self.understanding_pixels)
        got = (batch.num_tokens, len(batch.inputs["text_targets"]), len(batch.inputs["image_targets"]))
        if got != (plan.tokens, plan.text_targets, plan.image_targets):
            raise DatasetError(f"samples {', '.join(batch.samples)} changed while training (planned "
                               f"{plan.tokens} tokens, found {got[0]}): the dataset files must not change under a run")
        return _Built(batch, pending, torch.stack(pixels) if pixels else None)


@dataclass
class _PlanTask:
    window: int
    files: str

    def run(self, source: _Source):
        return source.plan(self.window)

    def describe(self) -> str:
        return f"tokenising window {self.window} of {self.files} for packing"


@dataclass
class _BuildTask:
    plan: MicroPlan
    names: tuple[str, ...]

    def run(self, source: _Source):
        return source.build(self.plan)

    def describe(self) -> str:
        return f"building a micro-batch of samples {', '.join(self.names)}"


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class TrainLoader:
    """The next optimizer step's micro-batches, for `topology`'s rank, prepared in the background.

    config: a TrainConfig (data, row_tokens, rows_per_batch, grad_accum, pack_window, packing,
    seed, uncond_prob, gen_image_fit, loader_workers, loader_timeout, prefetch_steps,
    vq_cache_dir / output_dir). Build it before FSDP shards `model`: it keeps its own copy of the
    VQ encoder for images not cached yet. A micro-batch holds at most rows_per_batch x row_tokens
    tokens, a sample at most row_tokens."""

    def __init__(self, config, model, processor, topology):
        self.rank, self.device = topology.rank, topology.device
        self.grad_accum, self.per_step = config.grad_accum, topology.world * config.grad_accum
        self.workers, self.timeout, self.prefetch = config.loader_workers, config.loader_timeout, config.prefetch_steps
        files = data_files(config.data)
        cache_dir = Path(config.vq_cache_dir) if config.vq_cache_dir else Path(config.output_dir) / "vq_cache"
        indexes = [load_index(path, cache_dir / "index") for path, _ in files]
        for index, (_, weight) in zip(indexes, files):
            if weight is not None and not len(index):
                raise DatasetError(f"dataset file {index.path} holds no samples (it has weight {weight})")
        if not sum(len(ix) for ix in indexes):
            raise DatasetError(f"the dataset is empty: {', '.join(str(ix.path) for ix in indexes)} hold(s) no samples")
        reader = SampleReader(indexes, SampleEncoder(processor, model.config.vq.num_tokens))
        reader.check_lengths(config.row_tokens)
        shares = mixing_shares([len(ix) for ix in indexes], [w for _, w in files])
        stream = SampleStream([len(ix) for ix in indexes], shares, config.pack_window, config.seed)
        generation = any(bool((ix.kinds == _GENERATION).any()) for ix in indexes)
        cache = VQTokenCache(cache_dir, model.gen_vision_model, processor.image_size, config.gen_image_fit) \
            if generation else None
        self.vq = VQEncoder(model.gen_vision_model) if generation else None
        self.source = _Source(reader, stream, processor, cache, config)
        self._files = [{"name": ix.path.name, "content": ix.fingerprint(), "samples": len(ix),
                        "share": str(share)} for ix, share in zip(indexes, shares)]
        tok = processor.tokenizer
        probe = tok.encode("Janus-Pro 1B/7B: a tokenizer probe, ünïcödé, 12345.", add_special_tokens=True)
        tokenizer = hashlib.sha256(f"{len(tok)}:{probe}".encode()).hexdigest()[:16]
        self._settings = {"row_tokens": config.row_tokens, "rows_per_batch": config.rows_per_batch,
                          "pack_window": stream.window, "packing": config.packing, "seed": config.seed,
                          "uncond_prob": config.uncond_prob, "gen_image_fit": config.gen_image_fit,
                          "image_size": processor.image_size, "tokenizer": tokenizer}
        self._position = (0, 0)
        self._feeder = None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ identity and position
    def fingerprint(self) -> str:
        """The dataset's identity (each file's content fingerprint and share) and the packing
        settings: equal fingerprints give the same stream of micro-batches."""
        text = json.dumps({"files": self._files, "settings": self._settings}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        window, micro = self._position
        return {"window": window, "micro_batch": micro, "fingerprint": self.fingerprint(),
                "files": self._files, "settings": self._settings,
                "epochs": self.source.stream.epochs(window)}  # for people reading checkpoints

    def load_state_dict(self, state: dict) -> None:
        if "fingerprint" not in state:
            raise DatasetChangedError(f"the checkpoint's data-loader state {sorted(state)} is from an older "
                                      "janus_fast loader: the run cannot continue its sample stream exactly")
        if state["fingerprint"] != self.fingerprint():
            raise DatasetChangedError("the dataset or packing settings changed since the checkpoint was written: "
                                      + "; ".join(self._differences(state)) + " (start a new output_dir, or restore them)")
        self.close()
        self._position = (int(state["window"]), int(state["micro_batch"]))

    def _differences(self, state: dict) -> list[str]:
        out = []
        old_files, new_files = state.get("files", []), self._files
        if [f["name"] for f in old_files] != [f["name"] for f in new_files]:
            out.append(f"data files {[f['name'] for f in old_files]} -> {[f['name'] for f in new_files]}")
        for old, new in zip(old_files, new_files):
            for key in ("content", "samples", "share"):
                if old.get(key) != new[key]:
                    what = "contents" if key == "content" else key
                    out.append(f"{new['name']}: {what} {old.get(key)} -> {new[key]}")
        for key, value in self._settings.items():
            if state.get("settings", {}).get(key) != value:
                out.append(f"{key} {state.get('settings', {}).get(key)!r} -> {value!r}")
        return out or ["fingerprint differs"]

    # ------------------------------------------------------------------ the steps
    def next_step(self) -> StepBatches:
        """The next optimizer step's batches for this rank (waiting for them only if the
        background has not finished them yet). A sample that cannot be used, a worker that died
        or stalled past loader_timeout raise here, naming the samples' file:line."""
        if self._feeder is None:
            self._start()
        while True:
            try:
                item = self._feeder.out.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._feeder.is_alive():
                    item = _Failure(RuntimeError("the loader's feeder thread ended without a result"))
                    break
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        self._position = item.position
        if item.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(item.ready)
            for batch in item.micro:  # allocated on the copy stream, used on this one
                for t in batch.inputs.values():
                    if isinstance(t, torch.Tensor):
                        t.record_stream(current)
        return item

    def _start(self) -> None:
        stop = threading.Event()
        pool = WorkerPool(self.source, self.workers, self.timeout, stop)
        self._feeder = _Feeder(self, pool, stop)
        self._feeder.start()
        # A Trainer dropped without close() (or fit()) must not leave the workers behind: the
        # feeder holds no reference to the loader, so the loader can be collected, and this stops them.
        self._shut_down = weakref.finalize(self, _shut_down, self._feeder, pool)

    def close(self) -> None:
        """Stop the background work; a later next_step() starts it again where the last step ended."""
        if self._feeder is not None:
            self._shut_down()
        self._feeder = None
        self.source.reader.close()


def _shut_down(feeder: "_Feeder", pool: WorkerPool) -> None:
    feeder.stop.set()
    if feeder is not threading.current_thread():
        feeder.join()
    pool.close()


class _Feeder(threading.Thread):
    """Plans windows and steps ahead, hands this rank's micro-batches to the workers, finishes
    them in order (VQ-encoding uncached images, copying to the device) and queues up to
    prefetch_steps ready steps."""

    def __init__(self, loader: TrainLoader, pool: WorkerPool, stop: threading.Event):
        super().__init__(name="janus-fast-loader-feeder", daemon=True)
        self.pool, self.source, self.vq, self.device = pool, loader.source, loader.vq, loader.device
        self.copy_stream, self.position, self.stop = loader._copy_stream, loader._position, stop
        self.per_step, self.prefetch = loader.per_step, loader.prefetch
        self.mine = slice(loader.rank * loader.grad_accum, (loader.rank + 1) * loader.grad_accum)
        self.out: queue.Queue = queue.Queue(maxsize=loader.prefetch)

    def run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        try:
            for item in self._steps():
                if not self._put(item):
                    return
        except Cancelled:
            return
        except BaseException as e:  # noqa: BLE001 - raised by next_step() in the main thread
            self._put(_Failure(e))

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _steps(self):
        pool, source = self.pool, self.source
        files = ", ".join(ix.path.name for ix in source.reader.indexes)
        first_window, skip = self.position
        windows: deque = deque()  # (window, ticket) being planned
        plans: deque = deque()  # (window, micro-batch, micro-batches in the window, MicroPlan)
        next_window = first_window
        inflight: deque = deque()  # (step plans, build tickets)
        while not self.stop.is_set():
            while len(inflight) < self.prefetch:
                while len(plans) < self.per_step:
                    while len(windows) < 2:  # one window planned ahead
                        windows.append((next_window, pool.submit(_PlanTask(next_window, files))))
                        next_window += 1
                    w, ticket = windows.popleft()
                    planned = pool.result(ticket)
                    start = skip if w == first_window else 0
                    plans.extend((w, j, len(planned), p) for j, p in enumerate(planned) if j >= start)
                step = [plans.popleft() for _ in range(self.per_step)]
                tickets = [pool.submit(_BuildTask(p, tuple(source.reader.indexes[f].source(i) for f, i, _ in p.refs)))
                           for *_, p in step[self.mine]]
                inflight.append((step, tickets))
            step, tickets = inflight.popleft()
            yield self._step(step, [pool.result(t) for t in tickets])

    def _finish(self, built: _Built) -> PackedBatch:
        """VQ-encode (and cache) the micro-batch's images that were not cached, then move it."""
        batch = built.batch
        if built.pending:
            ids = self.vq.encode(built.pixels)
            for (offset, count, digest, name), row in zip(built.pending, ids):
                if row.numel() != count:
                    raise DatasetError(f"sample {name}: the VQ model gives {row.numel()} tokens per image, "
                                       f"the model expects {count}")
                self.source.cache.put(digest, row)
                batch.inputs["gen_image_ids"][offset:offset + count] = row
                batch.inputs["image_targets"][offset:offset + count] = row  # the same layout (packing.collate)
        if self.copy_stream is None:
            return batch.to(self.device)
        inputs = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.inputs.items()}
        return PackedBatch(inputs, batch.samples, batch.num_tokens).to(self.device, non_blocking=True)

    def _step(self, step: list[tuple[int, int, int, MicroPlan]], built: list[_Built]) -> StepBatches:
        w, j, n, _ = step[-1]
        plans = [p for *_, p in step]
        ready = None
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                micro = [self._finish(b) for b in built]
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
        else:
            micro = [self._finish(b) for b in built]
        tokens = sum(p.tokens for p in plans)
        return StepBatches(micro, sum(p.text_targets for p in plans), sum(p.image_targets for p in plans), tokens,
                           1.0 - tokens / (self.source.capacity * len(plans)), (w, j + 1) if j + 1 < n else (w + 1, 0),
                           ready)
