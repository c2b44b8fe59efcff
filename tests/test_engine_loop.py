"""The engine's host side: the bounded look-ahead loop (on an instrumented device that runs
steps only when the host waits, as a GPU runs behind its queue), EOS ending text a few steps
after it is drawn, and the memory plan (split batches equal whole ones; a request that cannot
fit is refused before any launch)."""

import pytest
import torch

from janus_fast.engine import Marks, MemoryPlanWarning, run_steps
from janus_fast.engine import images as engine_images
from janus_fast.engine import text as engine_text
from janus_fast.engine.lookahead import LOOKAHEAD
from janus_fast.engine.step import tensor_bytes

from .test_engine import engine_copy, tokens
from .tiny_janus import tiny_model


class QueuedDevice(Marks):
    """A device whose queue runs only as far as the host waits: steps and marks are queued, and
    wait(i) runs the queue up to mark i."""

    def __init__(self, stop_after: int | None):
        self.queue, self.executed, self.flag, self.stop_after, self.seen = [], 0, -1, stop_after, {}

    def step(self):
        def run():
            self.executed += 1
            if self.stop_after is not None and self.executed == self.stop_after + 1:
                self.flag = self.stop_after  # "every row is done after step stop_after"
        self.queue.append(run)

    def record(self, i):
        self.queue.append(lambda: self.seen.__setitem__(i, self.flag))

    def wait(self, i):
        while i not in self.seen:
            self.queue.pop(0)()
        return self.seen[i]


@pytest.mark.parametrize("stop_after,lookahead", [(3, 4), (0, 1), (10, 2), (None, 3)])
def test_the_host_runs_a_bounded_number_of_steps_ahead(stop_after, lookahead):
    device, reports = QueuedDevice(stop_after), []

    def progress(i, n):
        reports.append(i)
        assert i <= device.executed or i == n  # progress follows finished steps, not queued ones

    ran = run_steps(device.step, 50, stop=torch.zeros(1), progress=progress, lookahead=lookahead, marks=device)
    assert reports == sorted(reports) and reports[-1] == 50
    if stop_after is None:
        assert ran == 50 and device.executed == 50
    else:  # stops within `lookahead` steps of the flag: a short answer costs about its length
        assert stop_after + 1 <= ran <= stop_after + lookahead + 1
        device.wait(ran - 1)
        assert device.executed == ran


def test_without_a_flag_or_progress_nothing_is_waited_for():
    device = QueuedDevice(None)
    assert run_steps(device.step, 7, marks=device) == 7 and device.executed == 0 and len(device.queue) == 7
    with pytest.raises(ValueError, match="lookahead"):
        run_steps(device.step, 7, progress=print, lookahead=0)


def test_text_ends_a_few_steps_after_every_row_hit_eos(monkeypatch):
    lm = engine_copy(tiny_model()).language_model
    ids = torch.randint(0, 100, (2, 5))
    greedy = lm.generate(input_ids=ids, max_new_tokens=20)[:, 5:]
    eos = [int(greedy[0, 2]), int(greedy[1, 2])]  # every row stops by its 3rd token
    first = [int(torch.isin(row, torch.tensor(eos)).nonzero()[0]) for row in greedy]
    calls, steps = [], []
    real = engine_text.run_steps

    def counted(step, n, **kwargs):
        return real(lambda: steps.append(step()), n, **kwargs)

    monkeypatch.setattr(engine_text, "run_steps", counted)
    out = lm.generate(input_ids=ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=-1,
                      progress=lambda i, n: calls.append(i))[:, 5:]
    assert out.shape[1] == max(first) + 1 and all((row[f + 1:] == -1).all() for row, f in zip(out, first))
    assert len(steps) <= max(first) + 1 + LOOKAHEAD  # not 20: a short answer costs about its length
    assert calls[-1] == 20 and calls == sorted(calls)


def test_kv_bytes_per_token_counts_the_cache_and_plans_count_real_buffers():
    model = engine_copy(tiny_model())
    lm = model.language_model.model
    cache = lm.new_cache(3, 80)
    assert lm.kv_bytes_per_token() * 3 * 80 == tensor_bytes([cache.k, cache.v])
    assert lm.kv_bytes_per_token(torch.float16) * 2 == lm.kv_bytes_per_token(torch.float32)
    buffers = engine_images.ImageBuffers(model, 6, 80)  # counted on the meta device: the same tensors
    nbytes = engine_images.image_bucket_bytes(model, 6, 80)
    cache_bytes = tensor_bytes(buffers.cache)
    meta = engine_images.ImageBuffers(model, 6, 80, torch.device("meta"))
    assert tensor_bytes(meta) == tensor_bytes(buffers) - cache_bytes
    assert tensor_bytes(buffers) < nbytes < tensor_bytes(buffers) + 6 * 4096 * 8  # + the step's transients


def test_a_batch_over_the_free_memory_is_split_into_equal_chunks(monkeypatch):
    plain = tiny_model()
    eng = engine_copy(plain)
    prompts, seeds = ["a fox", "a cat on a sofa", "x"], [3, 4, 5]
    whole = tokens(eng, prompts, 2, seeds)
    two = engine_images.image_bucket_bytes(eng, 8, 80)  # two prompts' 8 rows fit, three do not
    monkeypatch.setattr(engine_images, "free_bytes", lambda device, buckets=None: two + 1)
    with pytest.warns(MemoryPlanWarning, match="3 requests in 2 chunk\\(s\\) of 2 \\(8 rows"):
        split = tokens(eng, prompts, 2, seeds)  # the last chunk padded with a copy of its prompt
    assert torch.equal(split, whole)  # a request's images do not depend on its chunk


def test_a_request_that_cannot_fit_is_refused_before_any_launch(monkeypatch):
    eng = engine_copy(tiny_model())
    monkeypatch.setattr(engine_images, "free_bytes", lambda device, buckets=None: 1000)
    monkeypatch.setattr(engine_images, "prefill", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(ValueError, match="one request \\(4 rows\\) needs .* GiB .* lower parallel_size"):
        tokens(eng, ["a fox"], 2, [0])
    assert eng._engine.buckets.built == 0


def test_text_rows_over_the_free_memory_are_split(monkeypatch):
    lm = engine_copy(tiny_model()).language_model
    ids = torch.randint(0, 100, (3, 5))
    kwargs = dict(input_ids=ids, max_new_tokens=6, do_sample=True, top_k=20)
    whole = lm.generate(generator=torch.Generator().manual_seed(1), **kwargs)
    monkeypatch.setattr(engine_text, "free_bytes",
                        lambda device, buckets=None: engine_text.text_bucket_bytes(lm, 2, 64) + 1)
    with pytest.warns(MemoryPlanWarning, match="3 requests in 2 chunk"):
        split = lm.generate(generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(split, whole)  # each row draws from its own seed
