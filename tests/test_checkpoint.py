"""Loading and saving checkpoints (janus_fast.checkpoint): the official layout in every form
(single/sharded, .bin/.safetensors) round-trips exactly; strict, clear errors; atomic saves."""

import json
import os

import pytest
import torch

from janus_fast import checkpoint
from janus_fast.checkpoint import CheckpointError, write_weights
from janus_fast.models import JanusPro, JanusProConfig

from .tiny_janus import official_state, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def write_release(model, path, *, safe=True, max_shard_size="5GB", state=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    return write_weights(official_state(model) if state is None else state, path, safe=safe,
                         max_shard_size=max_shard_size)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_official_layout_round_trips_exactly(tmp_path, model, safe, sharded):
    names = write_release(model, tmp_path, safe=safe, max_shard_size="1MB" if sharded else "5GB")
    assert (len(names) > 1) == sharded
    if sharded:
        index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
        assert (tmp_path / index).is_file() and names[0].endswith(f"-00001-of-{len(names):05d}.{names[0].split('.')[-1]}")
    loaded = JanusPro.from_pretrained(tmp_path, dtype=None, device="cpu")
    assert_same_weights(model, loaded)
    assert not loaded.training and loaded.processor is None
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_default_dtype_is_bfloat16(tmp_path, model):
    write_release(model, tmp_path)
    loaded = JanusPro.from_pretrained(tmp_path, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(loaded.gen_embed.weight, model.gen_embed.weight.bfloat16(), rtol=0, atol=0)


def test_save_pretrained_round_trip_with_processor(tmp_path, model):
    model.save_pretrained(tmp_path / "ck", max_shard_size="2MB")
    files = set(os.listdir(tmp_path / "ck"))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "preprocessor_config.json"} <= files
    loaded = JanusPro.from_pretrained(tmp_path / "ck", dtype=None, device="cpu")
    assert_same_weights(model, loaded)
    assert loaded.processor is not None and loaded.processor.num_image_tokens == model.config.vision.num_tokens
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"] == "multi_modality"


def test_config_round_trip():
    for cfg in (JanusProConfig.tiny(), JanusProConfig.janus_pro_1b(), JanusProConfig.janus_pro_7b()):
        again = JanusProConfig.from_dict(cfg.to_dict())
        assert again.language == cfg.language and again.vision == cfg.vision and again.vq == cfg.vq
    params = JanusProConfig.janus_pro_1b().to_dict()["vision_config"]["params"]
    assert params == dict(image_size=384, model_name="siglip_large_patch16_384", select_feature="same", select_layer=-1)
    assert JanusProConfig.janus_pro_1b().to_dict()["gen_vision_config"]["params"] == dict(image_token_size=16384, n_embed=8)


def test_full_size_keys_match_the_official_list():
    spec = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "spec", "official_state_dict_keys.txt")
    if not os.path.isfile(spec):
        pytest.skip("shared/spec/official_state_dict_keys.txt is not beside the repository")
    official = {}
    for line in open(spec, encoding="utf-8"):
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("  ")[:2]
            n = 24
            for i in range(n if "{i}" in key else 1):
                official[key.replace("{i}", str(i))] = tuple(json.loads(shape))
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in JanusPro(JanusProConfig.janus_pro_1b()).state_dict().items()}
    unused = {k for k in official if checkpoint.IGNORED_KEYS.match(k)}
    assert unused and ours == {k: v for k, v in official.items() if k not in unused}


# --------------------------------------------------------------------------- errors


def test_missing_directory_config_and_weights(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="not found"):
        JanusPro.from_pretrained(tmp_path / "nope", device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        JanusPro.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no weights"):
        JanusPro.from_pretrained(tmp_path, device="cpu")


def test_corrupt_files(tmp_path, model):
    write_release(model, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "multi_modality", ')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        JanusPro.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert' is not Janus-Pro"):
        JanusPro.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "multi_modality"}))
    with pytest.raises(CheckpointError, match="missing 'language_config'"):
        JanusPro.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        JanusPro.from_pretrained(tmp_path, device="cpu")


def test_corrupt_pickle(tmp_path, model):
    write_release(model, tmp_path, safe=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="weights_only"):
        JanusPro.from_pretrained(tmp_path, device="cpu")


def test_unknown_and_missing_keys_are_listed(tmp_path, model):
    state = official_state(model)
    state["language_model.model.layers.7.mlp.extra.weight"] = torch.zeros(2)
    del state["gen_head.vision_head.bias"]
    write_release(model, tmp_path, state=state)
    with pytest.raises(CheckpointError) as err:
        JanusPro.from_pretrained(tmp_path, device="cpu")
    msg = str(err.value)
    assert "missing keys (1): gen_head.vision_head.bias" in msg
    assert "unexpected keys (1): language_model.model.layers.7.mlp.extra.weight" in msg


def test_wrong_shape_names_key_and_shapes(tmp_path, model):
    state = official_state(model)
    state["gen_embed.weight"] = torch.zeros(64, 9)
    write_release(model, tmp_path, state=state)
    with pytest.raises(CheckpointError, match=r"shape mismatch for gen_embed.weight: checkpoint has \(64, 9\), "
                                              r"the model expects \(64, 8\)"):
        JanusPro.from_pretrained(tmp_path, device="cpu")


def test_missing_shard(tmp_path, model):
    names = write_release(model, tmp_path, max_shard_size="1MB")
    (tmp_path / names[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="shards listed in"):
        JanusPro.from_pretrained(tmp_path, device="cpu")


# --------------------------------------------------------------------------- atomic save


def test_failed_save_leaves_the_old_checkpoint(tmp_path, model, monkeypatch):
    target = tmp_path / "ck"
    model.save_pretrained(target)
    (target / "NOTES.md").write_text("mine")
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    other = tiny_model(seed=1, processor=False)

    def broken(state, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(target)
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert os.listdir(tmp_path) == ["ck"]  # no temporary directories left behind
    monkeypatch.undo()
    other.save_pretrained(target)  # a successful save replaces it and keeps the extra file
    assert (target / "NOTES.md").read_text() == "mine" and (target / "tokenizer.json").is_file()
    assert_same_weights(other, JanusPro.from_pretrained(target, dtype=None, device="cpu"))
    assert os.listdir(tmp_path) == ["ck"]


RELEASE_1B_CONFIG = {  # config.json as the Janus-Pro-1B release ships it
    "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                       "params": {"depth": 2, "input_dim": 1024, "n_embed": 2048, "projector_type": "mlp_gelu"}},
    "architectures": ["MultiModalityCausalLM"],
    "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                           "params": {"depth": 2, "input_dim": 8, "n_embed": 2048, "projector_type": "mlp_gelu"}},
    "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                        "params": {"image_token_embed": 2048, "image_token_size": 16384, "n_embed": 2048}},
    "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {"image_token_size": 16384, "n_embed": 8}},
    "language_config": {"hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 16384,
                        "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": 24,
                        "num_key_value_heads": 16, "torch_dtype": "bfloat16", "vocab_size": 102400},
    "model_type": "multi_modality",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                      "params": {"image_size": 384, "model_name": "siglip_large_patch16_384", "select_feature": "same",
                                 "select_layer": -1}},
}


def test_release_config_parses_and_round_trips():
    cfg = JanusProConfig.from_dict(RELEASE_1B_CONFIG)
    want = JanusProConfig.janus_pro_1b()
    assert (cfg.language, cfg.vision, cfg.vq) == (want.language, want.vision, want.vq)
    out = cfg.to_dict()
    for key in ("aligner_config", "gen_aligner_config", "gen_head_config", "gen_vision_config", "vision_config",
                "model_type", "torch_dtype", "architectures"):
        assert out[key] == RELEASE_1B_CONFIG[key], key
    assert {k: v for k, v in out["language_config"].items() if k in RELEASE_1B_CONFIG["language_config"]} == {
        k: v for k, v in RELEASE_1B_CONFIG["language_config"].items() if k != "torch_dtype"}


def test_inconsistent_config_is_rejected():
    bad = json.loads(json.dumps(RELEASE_1B_CONFIG))
    bad["gen_head_config"]["params"]["n_embed"] = 4096
    with pytest.raises(ValueError, match="gen_head_config.params.n_embed is 4096, expected 2048"):
        JanusProConfig.from_dict(bad)


def test_model_is_built_on_meta_then_filled(tmp_path, model, monkeypatch):
    """No full-size random init: the module tree is built on the meta device, tensors are
    assigned from the files (so a 7B load needs about one copy of the weights)."""
    write_release(model, tmp_path, safe=False)
    devices, loads = [], []
    original_init, original_load = JanusPro.__init__, torch.load

    def init(self, config):
        devices.append(torch.empty(1).device.type)
        original_init(self, config)

    def load(*args, **kwargs):
        loads.append(kwargs)
        return original_load(*args, **kwargs)

    monkeypatch.setattr(JanusPro, "__init__", init)
    monkeypatch.setattr(torch, "load", load)
    loaded = JanusPro.from_pretrained(tmp_path, dtype=None, device="cpu")
    assert devices == ["meta"]
    assert loads and all(k.get("weights_only") and k.get("mmap") for k in loads)
    assert not any(p.is_meta for p in loaded.parameters())


# --------------------------------------------------------------------------- hostile or old files


@pytest.mark.parametrize("shard", ["../other/x.safetensors", "/abs/x.safetensors", "sub/../../x.safetensors"])
def test_shards_outside_the_checkpoint_are_refused(tmp_path, model, shard):
    release = tmp_path / "release"
    names = write_release(model, release, max_shard_size="1MB")
    outside = tmp_path / "other"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes((release / names[0]).read_bytes())
    index_file = next(release.glob("*.index.json"))
    index = json.loads(index_file.read_text())
    key = next(k for k, v in index["weight_map"].items() if v == names[0])
    index["weight_map"][key] = shard
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shards must be files inside the checkpoint folder"):
        JanusPro.from_pretrained(release, device="cpu")


def test_a_symlinked_shard_leading_outside_is_refused(tmp_path, model):
    release = tmp_path / "release"
    names = write_release(model, release, max_shard_size="1MB")
    elsewhere = tmp_path / "elsewhere.safetensors"
    (release / names[0]).rename(elsewhere)
    (release / names[0]).symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        JanusPro.from_pretrained(release, device="cpu")


def test_legacy_pickle_bin_loads(tmp_path, model):
    """A pre-zip `pytorch_model.bin` (torch.save(_use_new_zipfile_serialization=False)) cannot be
    memory-mapped: it is read whole, still with weights_only=True."""
    write_release(model, tmp_path, safe=False)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_same_weights(JanusPro.from_pretrained(tmp_path, dtype=None, device="cpu"), model)


@pytest.mark.parametrize("section, field, value, match", [
    ("language_config", "num_hidden_layers", 1_000_000, r"language_config.num_hidden_layers must be <= 1024"),
    ("language_config", "vocab_size", 1 << 40, r"language_config.vocab_size must be <= "),
    ("language_config", "hidden_size", 1 << 20, r"language_config.hidden_size must be <= "),
])
def test_absurd_sizes_fail_at_once(tmp_path, model, section, field, value, match):
    config = model.config.to_dict()
    config[section][field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        checkpoint.read_config(tmp_path)
