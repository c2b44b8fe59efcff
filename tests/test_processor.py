"""JanusProcessor against hand-built expectations, with a word-level tokenizer built here with
`tokenizers` (special tokens included): SFT template, ids and image-tag expansion, left-padded
batches, image preprocessing, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from janus_fast.processor import BOS, DEFAULT_SYSTEM_PROMPT, EOS, PAD, JanusProcessor

tokenizers = pytest.importorskip("tokenizers")

SPECIAL = [BOS, EOS, PAD, "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>"]
WORDS = ["[UNK]", ":", "what", "is", "it", "hi", "there", "be", "brief", "a", "b", "c", "."]
N_TOKENS, SIZE = 4, 32


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("release")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": BOS}, "eos_token": EOS, "pad_token": PAD, "add_bos_token": True}))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_size": SIZE, "min_size": 14, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
         "rescale_factor": 1 / 255, "do_normalize": True}))
    (path / "processor_config.json").write_text(json.dumps(
        {"image_tag": "<image_placeholder>", "num_image_tokens": N_TOKENS, "sft_format": "deepseek"}))
    return path


@pytest.fixture(scope="module")
def proc(release):
    return JanusProcessor.from_pretrained(release, system_prompt="be brief .")


def tid(proc, token):
    return proc.tokenizer.token_to_id(token)


def test_loads_configs_and_special_ids(proc):
    assert proc.image_size == SIZE and proc.num_image_tokens == N_TOKENS
    assert proc.tokenizer.bos_token_id == len(WORDS) and proc.pad_id == len(WORDS) + 2
    assert proc.image_id == len(WORDS) + 3 and proc.image_start_id == len(WORDS) + 4
    assert JanusProcessor(proc.tokenizer).system_prompt == DEFAULT_SYSTEM_PROMPT


def test_sft_template(proc):
    conv = [{"role": "<|User|>", "content": " a "}, {"role": "<|Assistant|>", "content": "b"},
            {"role": "<|User|>", "content": "c"}, {"role": "<|Assistant|>", "content": ""}]
    assert proc.apply_sft_template_for_multi_turn_prompts(conv) == (
        f"<|User|>: a\n\n<|Assistant|>: b{EOS}<|User|>: c\n\n<|Assistant|>:")
    assert proc.apply_sft_template_for_multi_turn_prompts(conv[2:], system_prompt="be brief .") == (
        "be brief .\n\n<|User|>: c\n\n<|Assistant|>:")


def test_tokenizer_adds_bos_once_and_decodes(proc):
    ids = proc.tokenizer.encode("<|User|>: hi there")
    assert ids == [tid(proc, BOS), tid(proc, "<|User|>"), 1, 5, 6]
    assert proc.tokenizer.decode(ids, skip_special_tokens=True) == ": hi there"


def test_process_one_expands_image_tags(proc):
    conv = [{"role": "<|User|>", "content": "<image_placeholder>\nwhat is it"}, {"role": "<|Assistant|>", "content": ""}]
    out = proc(conversations=conv, images=[Image.new("RGB", (10, 10))], force_batchify=False)
    assert out.sft_format == "be brief .\n\n<|User|>: <image_placeholder>\nwhat is it\n\n<|Assistant|>:"
    want = ([tid(proc, BOS), 7, 8, 12, tid(proc, "<|User|>"), 1, proc.image_start_id] + [proc.image_id] * N_TOKENS
            + [proc.image_end_id, 2, 3, 4, tid(proc, "<|Assistant|>"), 1])
    assert out.input_ids.tolist() == want
    assert out.pixel_values.shape == (1, 3, SIZE, SIZE) and out.num_image_tokens == [N_TOKENS]


def test_batchify_left_pads(proc):
    img = Image.new("RGB", (SIZE, SIZE), (255, 0, 0))
    one = proc.process_one(prompt="<image_placeholder> a <image_placeholder>", images=[img, img])
    two = proc.process_one(prompt="hi")
    batch = proc.batchify([one, two])
    n1, n2 = len(one), len(two)
    assert n2 == 2 and batch.input_ids.shape == (2, n1)
    assert batch.input_ids[1].tolist() == [proc.pad_id] * (n1 - n2) + [tid(proc, BOS), 5]
    assert batch.attention_mask.tolist() == [[1] * n1, [0] * (n1 - n2) + [1] * n2]
    assert batch.images_seq_mask[0].sum() == 2 * N_TOKENS and not batch.images_seq_mask[1].any()
    assert batch.images_seq_mask[0].tolist() == (batch.input_ids[0] == proc.image_id).tolist()
    assert batch.images_emb_mask.shape == (2, 2, N_TOKENS)
    assert batch.images_emb_mask[0].all() and not batch.images_emb_mask[1].any()
    assert batch.pixel_values.shape == (2, 2, 3, SIZE, SIZE) and (batch.pixel_values[1] == 0).all()
    torch.testing.assert_close(batch.pixel_values[0, 0, 0], torch.ones(SIZE, SIZE))  # red: (1 - 0.5) / 0.5
    assert batch.sft_format == ["<image_placeholder> a <image_placeholder>", "hi"]
    moved = batch.to("cpu", torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.input_ids.dtype == torch.long
    assert set(moved.keys()) >= {"input_ids", "attention_mask", "pixel_values", "images_seq_mask", "images_emb_mask"}


def test_image_preprocessing_by_hand(proc):
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))  # w 40, h 20
    canvas = Image.new("RGB", (SIZE, SIZE), (127, 127, 127))
    canvas.paste(wide.resize((32, 16), Image.BICUBIC), (0, 8))
    want = (np.asarray(canvas, np.float32) / 255 - 0.5) / 0.5
    got = proc.preprocess_images([wide])[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[0, 0, 0] == pytest.approx(127 / 255 * 2 - 1, abs=1e-6)


def test_tall_and_thin_images(proc):
    tall = Image.new("RGB", (8, 32), (255, 255, 255))  # w 8 -> centred horizontally
    x = proc.preprocess_images([tall])[0]
    assert x[0, 16, 16] == pytest.approx(1.0) and x[0, 16, 0] == pytest.approx(127 / 255 * 2 - 1, abs=1e-6)
    thin = Image.new("RGB", (1000, 10), (255, 255, 255))  # short side clamped to min_size 14
    x = proc.preprocess_images([thin])[0]
    rows = (x[0, :, 16] > 0.99).nonzero()[:, 0]
    assert len(rows) == 14


def test_image_count_must_match_placeholders(proc):
    with pytest.raises(ValueError, match=r"2 <image_placeholder> tag\(s\) but 1 image"):
        proc(prompt="<image_placeholder> <image_placeholder>", images=[Image.new("RGB", (4, 4))])
    with pytest.raises(ValueError, match="exactly one"):
        proc()


def test_missing_files_and_bad_json(tmp_path, release):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        JanusProcessor.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((release / "tokenizer.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json is not valid JSON"):
        JanusProcessor.from_pretrained(tmp_path)


def test_save_and_reload(tmp_path, proc):
    proc.save_pretrained(tmp_path)
    again = JanusProcessor.from_pretrained(tmp_path, system_prompt=proc.system_prompt)
    assert again.image_size == SIZE and again.num_image_tokens == N_TOKENS
    text = "<|User|>: what is it\n\n<|Assistant|>:"
    assert again.tokenizer.encode(text) == proc.tokenizer.encode(text)


# --------------------------------------------------------------------------- image modes


def picture():
    """An 8-bit greyscale ramp with every value 0..255 and its RGB version."""
    gray = (np.arange(32 * 40).reshape(32, 40) % 256).astype(np.uint8)
    return gray, np.repeat(gray[..., None], 3, axis=-1)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_depth_greyscale_is_scaled_not_clipped(tmp_path, proc, mode):
    from janus_fast.processor import load_image

    gray, rgb = picture()
    wide = gray.astype(np.uint16) * 257
    image = {"F": lambda: Image.fromarray(gray.astype(np.float32) / 255, mode="F"),
             "I": lambda: Image.fromarray(wide.astype(np.int32)),
             "I;16": lambda: Image.fromarray(wide),
             "I;16B": lambda: Image.frombytes("I;16B", gray.shape[::-1], wide.astype(">u2").tobytes())}[mode]()
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(load_image(image)), rgb)
    if mode == "I;16":  # a 16-bit PNG file, as the issue found it: same pixels as the 8-bit one
        image.save(tmp_path / "g16.png")
        Image.fromarray(gray).save(tmp_path / "g8.png")
        with Image.open(tmp_path / "g16.png") as f:
            assert f.mode == "I;16"
        torch.testing.assert_close(proc.preprocess_images([str(tmp_path / "g16.png")]),
                                   proc.preprocess_images([str(tmp_path / "g8.png")]), rtol=0, atol=0)


def test_float_outside_unit_range_and_nan_are_clipped():
    from janus_fast.processor import load_image

    image = Image.fromarray(np.array([[-1.0, 0.5, 2.0, np.nan]], dtype=np.float32), mode="F")
    assert np.asarray(load_image(image))[0, :, 0].tolist() == [0, 128, 255, 0]


def test_palette_images_use_their_palette(tmp_path):
    from janus_fast.processor import load_image

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (7, 3), dtype=np.uint8)
    rgb = colours[rng.integers(0, 7, (20, 24))]
    pal = Image.fromarray(rgb).quantize(colors=7, method=Image.Quantize.MAXCOVERAGE)
    assert pal.mode == "P"
    np.testing.assert_array_equal(np.asarray(load_image(pal)), rgb)
    pal.info["transparency"] = 0  # a transparent palette entry keeps its colour, without a warning
    pal.save(tmp_path / "p.png")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "p.png"))), rgb)


def test_unreadable_images_name_the_file(tmp_path):
    from janus_fast.processor import load_image, load_pil_images

    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=f"cannot read image file {bad} as an image"):
        load_image(str(bad))
    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good)
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(noise.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"cannot read image file {truncated}"):
        load_image(truncated)
    import base64

    uri = "data:image/png;base64," + base64.b64encode(good.read_bytes()).decode()
    images = load_pil_images([{"role": "<|User|>", "content": "x", "images": [uri, str(good)]}])
    assert [im.getpixel((0, 0)) for im in images] == [(10, 20, 30), (10, 20, 30)]
