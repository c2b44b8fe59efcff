"""Packing and the packed multi-task forward: a packed micro-batch (one flat varlen sequence, no
pads) gives the losses and gradients of its samples run one by one through the official
(unpacked) model methods; positions restart per sample; targets are exactly the answers / image
ids; best-fit packing; the VQ cache; bad samples named by file:line."""

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from examples.make_dataset import make_dataset
from janus_fast.models.random_model import random_model
from janus_fast.training.data import GEN_IMAGE, DatasetError
from janus_fast.training.packing import best_fit, collate, next_fit, padding_fraction, unconditional
from tests.loader_helpers import encoded, make_loader, steps, write_jsonl


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=1).train()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, model):
    """The example data (2 text, 1 understanding, 1 text-to-image), its samples encoded with
    their VQ ids (the loader fills the cache), and one micro-batch holding all four."""
    root = tmp_path_factory.mktemp("data")
    path = make_dataset(root, n_text=2, n_understanding=1, n_generation=1, image_size=64, seed=3)
    loader = make_loader(model, path, root, row_tokens=2000, pack_window=4)
    (step,) = steps(loader, 1)
    return path, [encoded(loader, 0, i) for i in range(4)], step.micro[0], loader


def alone(model, sample, uncond=False):
    proc = model.processor
    pixels = lambda s: proc.preprocess_images([s.image])[0]  # noqa: E731
    return collate([sample], [uncond], proc.pad_id, proc.image_size, pixels).inputs


def grads_of(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def official_loss_sum(model, sample, pixels):
    """The summed text + image cross-entropy of one sample through the official methods: the
    dense LLM forward over [1, L], full logits, F.cross_entropy."""
    proc = model.processor
    ids = torch.tensor(sample.ids)[None]
    kinds = torch.tensor(sample.kinds)
    gen = kinds == GEN_IMAGE
    text_ids = ids.masked_fill(gen[None], proc.pad_id)
    if sample.image is not None and not gen.any():
        seq_mask = (text_ids == proc.image_id)
        emb_mask = torch.ones(1, 1, proc.num_image_tokens, dtype=torch.bool)
        emb = model.prepare_inputs_embeds(text_ids, pixels[None, None], seq_mask, emb_mask)
    else:
        emb = model.language_model.get_input_embeddings()(text_ids)
        emb[0, gen] = model.prepare_gen_img_embeds(ids[0, gen])
    hidden = model.language_model.model(inputs_embeds=emb).last_hidden_state[0]
    targets = torch.tensor(sample.targets)
    nxt_text = targets[1:] & (kinds[1:] != GEN_IMAGE)
    nxt_image = targets[1:] & (kinds[1:] == GEN_IMAGE)
    text = F.cross_entropy(model.language_model.lm_head(hidden[:-1][nxt_text]), ids[0, 1:][nxt_text], reduction="sum")
    image = F.cross_entropy(model.gen_head(hidden[:-1][nxt_image]), ids[0, 1:][nxt_image], reduction="sum")
    return text, image


def test_packed_batch_equals_samples_alone(model, dataset):
    _, samples, batch, loader = dataset
    assert sorted(batch.samples) == sorted(s.name for s in samples)  # everything in one micro-batch
    out = model(**batch.inputs)
    assert out.num_text_targets > 0 and out.num_image_targets > 0
    packed_grads = grads_of(model, out.text_loss_sum + out.image_loss_sum)
    text_total, image_total, alone_grads = 0.0, 0.0, None
    for sample in samples:
        pixels = loader.source.understanding_pixels(sample) if sample.image is not None else None
        text, image = official_loss_sum(model, sample, pixels)
        with torch.no_grad():  # alone in a micro-batch of the packer, too
            single = model(**alone(model, sample))
        torch.testing.assert_close(single.text_loss_sum + single.image_loss_sum, (text + image).detach(),
                                   rtol=1e-5, atol=1e-5)
        g = grads_of(model, text + image)
        alone_grads = g if alone_grads is None else [a + b for a, b in zip(alone_grads, g)]
        text_total, image_total = text_total + text.detach(), image_total + image.detach()
    torch.testing.assert_close(out.text_loss_sum, text_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.image_loss_sum, image_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, (text_total + image_total) / (out.num_text_targets + out.num_image_targets))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, packed_grads, alone_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_one_flat_sequence_without_pads(model, dataset):
    _, samples, batch, _ = dataset
    inputs = batch.inputs
    cu, pos = inputs["cu_seqlens"].tolist(), inputs["position_ids"]
    by_name = {s.name: s for s in samples}
    lengths = [len(by_name[name]) for name in batch.samples]
    assert [b - a for a, b in zip(cu, cu[1:])] == lengths  # one sequence per sample, nothing else
    assert batch.num_tokens == len(inputs["input_ids"]) == cu[-1] == sum(lengths)
    assert inputs["max_seqlen"] == max(lengths)
    for a, b in zip(cu, cu[1:]):
        assert torch.equal(pos[a:b], torch.arange(b - a))
    for a, name in zip(cu, batch.samples):  # the samples' own ids, VQ ids aside
        s = by_name[name]
        want = torch.tensor([model.processor.pad_id if k == GEN_IMAGE else i for i, k in zip(s.ids, s.kinds)])
        assert torch.equal(inputs["input_ids"][a:a + len(s)], want)
    firsts = torch.tensor(cu[:-1])
    for key in ("text_positions", "image_positions"):  # nothing predicts across a sample boundary
        assert not torch.isin(inputs[key] + 1, firsts).any()


def test_targets_are_answers_and_image_ids(model, dataset):
    path, samples, _, _ = dataset
    lines = [json.loads(x) for x in Path(path).read_text().splitlines()]
    tok, proc = model.processor.tokenizer, model.processor
    for sample, line in zip(samples, lines):
        batch = alone(model, sample)
        ids = batch["input_ids"]
        assert torch.equal(batch["text_targets"], torch.tensor(sample.ids)[batch["text_positions"] + 1])
        text = tok.decode(batch["text_targets"].tolist())
        if line["type"] == "understanding":
            assert text == f" {line['answer']}{tok.eos_token}"
            assert len(batch["und_image_positions"]) == proc.num_image_tokens
            assert (ids[batch["und_image_positions"]] == proc.image_id).all()
        elif line["type"] == "generation":
            assert text == "" and len(batch["image_targets"]) == len(batch["gen_image_positions"])
            assert ids[batch["image_positions"][0]] == proc.image_start_id  # <begin_of_image> predicts the 1st id
            assert torch.equal(batch["image_targets"], batch["gen_image_ids"])
            assert (ids[batch["gen_image_positions"]] == proc.pad_id).all()
        elif "conversation" in line:
            assert text == f" {line['conversation'][1]['content']}{tok.eos_token}"
        else:
            assert text == line["text"] + tok.eos_token


def test_unconditional_prompt_replacement(model, dataset):
    _, samples, _, _ = dataset
    gen = next(s for s in samples if s.prompt is not None)
    proc = model.processor
    kept = alone(model, gen)["input_ids"]
    assert kept.tolist() == [proc.pad_id if k == GEN_IMAGE else i for i, k in zip(gen.ids, gen.kinds)]
    dropped = alone(model, gen, uncond=True)["input_ids"]
    a, b = gen.prompt
    assert dropped[0] == gen.ids[0] and dropped[b] == proc.image_start_id
    assert (dropped[a:b] == proc.pad_id).all() and torch.equal(dropped[b:], kept[b:])
    # Drawn per (seed, file, position in the stream): some occurrences keep the prompt, others
    # drop it, reproducibly; 0 and 1 are never and always.
    draws = [unconditional(7, 0, k, 0.5) for k in range(40)]
    assert 5 < sum(draws) < 35 and draws == [unconditional(7, 0, k, 0.5) for k in range(40)]
    assert not any(unconditional(7, 0, k, 0.0) for k in range(40)) and all(unconditional(7, 0, k, 1.0) for k in range(40))


def test_best_fit_and_next_fit():
    assert next_fit([3, 4, 2, 5], 7) == [[0, 1], [2, 3]]
    assert best_fit([3, 4, 2, 5], 7) == [[3, 2], [1, 0]]  # the longest first, each where it fits tightest
    assert best_fit([6, 5, 4, 2, 1], 7) == [[0, 4], [1, 3], [2]]
    rng = random.Random(0)
    for capacity in (16, 100, 4096):
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
        for pack in (best_fit, next_fit):
            bins = pack(lengths, capacity)
            assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each sample once
            assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        assert best_fit(lengths, capacity) == best_fit(list(lengths), capacity)  # deterministic
        assert padding_fraction(best_fit(lengths, capacity), lengths, capacity) \
            <= padding_fraction(next_fit(lengths, capacity), lengths, capacity)
    assert padding_fraction([[0, 1]], [3, 4], 7) == 0.0 and padding_fraction([[0], [1]], [3, 4], 7) == 0.5


def test_vq_cache_is_filled_lazily_and_reused(model, dataset, monkeypatch):
    path, samples, batch, _ = dataset
    cache = Path(path).parent / "vq_cache"
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 1 and not list(cache.rglob(".*"))  # one per generation image, no temporaries
    from janus_fast.training.vq_cache import VQEncoder

    def no_encoding(*args):
        raise AssertionError("a cached image was encoded again")

    monkeypatch.setattr(VQEncoder, "encode", no_encoding)
    (again,) = steps(make_loader(model, path, Path(path).parent, row_tokens=2000, pack_window=4), 1)
    for k, v in batch.inputs.items():
        assert torch.equal(v, again.micro[0].inputs[k]) if isinstance(v, torch.Tensor) else v == again.micro[0].inputs[k]


def test_bad_samples_are_named(model, tmp_path):
    with pytest.raises(DatasetError, match="empty.jsonl hold.* no samples"):
        make_loader(model, write_jsonl(tmp_path / "empty.jsonl", []), tmp_path)
    (tmp_path / "utf8.jsonl").write_bytes(b'{"type": "text", "text": "fine"}\n{"type": "text", "text": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"utf8.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 30"):
        make_loader(model, tmp_path / "utf8.jsonl", tmp_path)
    (tmp_path / "json.jsonl").write_text('{"type": "text", "text": "a"}\n\n{"type": "text", "text": }\n')
    with pytest.raises(DatasetError, match=r"json.jsonl:3: not valid JSON"):
        make_loader(model, tmp_path / "json.jsonl", tmp_path)
    with pytest.raises(DatasetError, match=r"fields.jsonl:1 \(understanding\).*missing"):
        make_loader(model, write_jsonl(tmp_path / "fields.jsonl", [{"type": "understanding", "image": "a.png"}]), tmp_path)
    with pytest.raises(DatasetError, match=r"turns.jsonl:1 \(text\): conversation turn 1"):
        make_loader(model, write_jsonl(tmp_path / "turns.jsonl", [{"type": "text", "conversation": [
            {"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}]), tmp_path)
    long = write_jsonl(tmp_path / "long.jsonl", [{"type": "text", "text": "short"}, {"type": "text", "text": "y" * 300}])
    with pytest.raises(DatasetError, match=r"long.jsonl:2 \(text\) has 30\d tokens, more than the row budget of 64"):
        make_loader(model, long, tmp_path, row_tokens=64)
    # Images are decoded when their sample is packed: the run stops there, naming it.
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    bad_image = write_jsonl(tmp_path / "bad.jsonl", [{"type": "text", "text": "fine"},
                                                     {"type": "generation", "prompt": "x", "image": "broken.png"}])
    loader = make_loader(model, bad_image, tmp_path / "run", loader_workers=1)  # raised in a worker, sent back
    with pytest.raises(DatasetError, match=r"bad.jsonl:2 \(generation\).*broken.png"):
        steps(loader, 1)
    assert not list((tmp_path / "run" / "vq_cache").rglob("*.*"))  # nothing written, not even half a cache entry
    bad_und = write_jsonl(tmp_path / "und.jsonl", [{"type": "understanding", "image": "missing.png",
                                                     "question": "q", "answer": "a"}])
    with pytest.raises(DatasetError, match=r"und.jsonl:1 \(understanding\).*missing.png"):
        steps(make_loader(model, bad_und, tmp_path / "run"), 1)
