"""Packing and the packed multi-task forward: a packed batch gives the losses and gradients of
its samples run one by one through the official (unpacked) model methods; positions restart
per sample; targets are exactly the answers / image ids; the VQ cache; bad samples."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from examples.make_dataset import make_dataset
from janus_fast.models.random_model import random_model
from janus_fast.training.data import GEN_IMAGE, DatasetError
from janus_fast.training.dataset import prepare_dataset, understanding_pixels
from janus_fast.training.packing import PackedLoader, pack_rows


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=1).train()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("data")
    path = make_dataset(root, n_text=2, n_understanding=1, n_generation=1, image_size=64, seed=3)
    return path, prepare_dataset(path, model, model.processor, root / "vq_cache")


def loader_for(model, encoded, row_tokens=256, rows=1, uncond_prob=0.0, seed=0):
    return PackedLoader(encoded, row_tokens=row_tokens, rows_per_batch=rows, pad_id=model.processor.pad_id,
                        image_size=model.processor.image_size, images=understanding_pixels(model.processor), uncond_prob=uncond_prob, seed=seed)


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
    _, encoded = dataset
    loader = loader_for(model, encoded, row_tokens=sum(len(s) for s in encoded), rows=1)
    (row,) = loader.next_rows()
    assert sorted(row[1]) == list(range(len(encoded)))  # everything in one packed row
    batch = loader.collate([row])
    out = model(**batch.inputs)
    assert out.num_text_targets > 0 and out.num_image_targets > 0
    packed_grads = grads_of(model, out.text_loss_sum + out.image_loss_sum)
    pixels = understanding_pixels(model.processor)
    text_total, image_total, alone_grads = 0.0, 0.0, None
    for sample in encoded:
        text, image = official_loss_sum(model, sample, pixels(sample) if sample.image is not None else None)
        with torch.no_grad():  # alone in a padded row of the packer, too
            padded = model(**loader_for(model, [sample], row_tokens=len(sample) + 9).collate([(0, [0])]).inputs)
        torch.testing.assert_close(padded.text_loss_sum + padded.image_loss_sum, (text + image).detach(),
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


def test_positions_restart_and_rows_are_padded(model, dataset):
    _, encoded = dataset
    loader = loader_for(model, encoded, row_tokens=700, rows=2)
    rows = loader.next_rows()
    batch = loader.collate(rows).inputs
    cu, pos = batch["cu_seqlens"].tolist(), batch["position_ids"]
    assert batch["input_ids"].shape == (2 * 700,) and cu[-1] == 2 * 700
    assert batch["max_seqlen"] == max(b - a for a, b in zip(cu, cu[1:]))
    for a, b in zip(cu, cu[1:]):
        assert torch.equal(pos[a:b], torch.arange(b - a))
    lengths = [len(encoded[i]) for _, row in rows for i in row]
    real = [b - a for a, b in zip(cu, cu[1:])]
    assert [n for n in real if n in lengths][:len(lengths)] == lengths  # samples in order, pads between rows
    assert sum(real) - sum(lengths) == 2 * 700 - sum(lengths)  # the rest is padding, with no targets
    pad_positions = torch.ones(2 * 700, dtype=torch.bool)
    for i, start in zip([i for _, row in rows for i in row], [c for c, n in zip(cu, real) if n in lengths]):
        pad_positions[start:start + len(encoded[i])] = False
    assert not pad_positions[batch["text_positions"]].any() and not pad_positions[batch["image_positions"]].any()
    assert (batch["input_ids"][pad_positions] == model.processor.pad_id).all()


def test_targets_are_answers_and_image_ids(model, dataset):
    path, encoded = dataset
    lines = [json.loads(x) for x in Path(path).read_text().splitlines()]
    tok, proc = model.processor.tokenizer, model.processor
    for sample, line in zip(encoded, lines):
        batch = loader_for(model, [sample], row_tokens=len(sample) + 5).collate([(0, [0])]).inputs
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
    _, encoded = dataset
    gen = next(s for s in encoded if s.prompt is not None)
    proc = model.processor
    kept = loader_for(model, [gen], row_tokens=len(gen), uncond_prob=0.0).collate([(0, [0])]).inputs["input_ids"]
    assert kept.tolist() == [proc.pad_id if k == GEN_IMAGE else i for i, k in zip(gen.ids, gen.kinds)]
    dropped = loader_for(model, [gen], row_tokens=len(gen), uncond_prob=1.0).collate([(0, [0])]).inputs["input_ids"]
    a, b = gen.prompt
    assert dropped[0] == gen.ids[0] and dropped[b] == proc.image_start_id
    assert (dropped[a:b] == proc.pad_id).all() and torch.equal(dropped[b:], kept[b:])
    # Drawn per (seed, epoch, sample): some epochs keep the prompt, others drop it, reproducibly.
    loader = loader_for(model, [gen], row_tokens=len(gen), uncond_prob=0.5, seed=7)
    draws = [loader.unconditional(e, 0) for e in range(40)]
    assert 5 < sum(draws) < 35 and draws == [loader.unconditional(e, 0) for e in range(40)]


def test_pack_rows_and_epochs():
    assert pack_rows([3, 4, 2, 5], [0, 1, 2, 3], 7) == [[0, 1], [2, 3]]
    assert pack_rows([3, 4, 2, 5], [3, 2, 1, 0], 7) == [[3, 2], [1, 0]]


def test_vq_cache_is_reused(model, dataset, tmp_path, monkeypatch):
    path, encoded = dataset
    cache = Path(path).parent / "vq_cache"
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 1 and not list(cache.rglob(".*"))  # one per generation image, no temporaries
    from janus_fast.training import vq_cache

    def no_encoding(*args):
        raise AssertionError("a cached image was encoded again")

    monkeypatch.setattr(vq_cache.VQTokenCache, "encode_images", no_encoding)
    again = prepare_dataset(path, model, model.processor, cache)
    assert [s.ids for s in again] == [s.ids for s in encoded]


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_bad_samples_are_named(model, tmp_path):
    proc = model.processor
    with pytest.raises(DatasetError, match="no samples"):
        prepare_dataset(write_jsonl(tmp_path / "empty.jsonl", []), model, proc, tmp_path / "c")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    bad_image = write_jsonl(tmp_path / "bad.jsonl", [{"type": "text", "text": "fine"},
                                                     {"type": "generation", "prompt": "x", "image": "broken.png"}])
    with pytest.raises(DatasetError, match=r"bad.jsonl:2 \(generation\).*broken.png"):
        prepare_dataset(bad_image, model, proc, tmp_path / "c")
    assert not list((tmp_path / "c").rglob("*.*"))  # nothing written, not even half a cache entry
    bad_und = write_jsonl(tmp_path / "und.jsonl", [{"type": "understanding", "image": "missing.png",
                                                     "question": "q", "answer": "a"}])
    with pytest.raises(DatasetError, match=r"und.jsonl:1 \(understanding\).*missing.png"):
        prepare_dataset(bad_und, model, proc, tmp_path / "c")
    with pytest.raises(DatasetError, match=r"fields.jsonl:1 \(understanding\).*missing"):
        prepare_dataset(write_jsonl(tmp_path / "fields.jsonl", [{"type": "understanding", "image": "a.png"}]),
                        model, proc, tmp_path / "c")
    long = write_jsonl(tmp_path / "long.jsonl", [{"type": "text", "text": "short"}, {"type": "text", "text": "y" * 300}])
    encoded = prepare_dataset(long, model, proc, tmp_path / "c")
    with pytest.raises(DatasetError, match=r"long.jsonl:2 \(text\) has 30\d tokens, more than the row budget of 64"):
        loader_for(model, encoded, row_tokens=64)
