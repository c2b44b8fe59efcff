"""Loading and saving Janus-Pro checkpoints.

Reads an official release directory: config.json (`model_type: "multi_modality"`) and weights as
model.safetensors / pytorch_model.bin, single or sharded with an index json. Also reads
directories converted for transformers' JanusForConditionalGeneration (`model_type: "janus"`),
mapping their keys to the official ones. Pickles are opened with torch.load(weights_only=True): no
code execution; zip-format files are memory-mapped, legacy (pre-zip) ones read whole. Shards named
by an index json must lie inside the checkpoint folder. The model is built on the meta device
and each tensor is assigned as it is read, so peak host memory stays near one copy of the model.
Loading is strict: missing, unexpected and wrongly shaped keys raise errors that name them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write, atomic_write_text  # noqa: F401  (re-exported: the layers above import them here)
from .models.config import JanusProConfig, LlamaConfig, VisionConfig, VQConfig

CONFIG_NAME = "config.json"
WEIGHT_FILES = (  # in order of preference: (index json, single file)
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# Stored in official checkpoints but unused by Janus: accepted on load, not kept.
IGNORED_KEYS = re.compile(r"^vision_model\.vision_tower\.attn_pool\.|^gen_vision_model\.quantize\.codebook_used$")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked (the message says why)."""


# --------------------------------------------------------------------------- config


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


def read_config(path) -> tuple[JanusProConfig, str]:
    """(config, layout) from `path`/config.json; layout is "official" or "transformers"."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file: a checkpoint is a directory holding {CONFIG_NAME} and weights")
    if not path.is_dir():
        # janus_fast 0.1.0 swapped directories with renames; a kill between them left the data here
        held = sorted(path.parent.glob(f".{path.name}.old-*/ckpt")) if path.parent.is_dir() else []
        hint = f"; an interrupted save left a checkpoint in {held[-1]} (move it to {path})" if held else ""
        raise FileNotFoundError(f"checkpoint directory {path} not found{hint}")
    finish_interrupted_save(path)
    d = _read_json(path / CONFIG_NAME)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path / CONFIG_NAME} must hold a JSON object")
    kind = d.get("model_type")
    if kind == "janus":
        try:
            return _config_from_transformers(d), "transformers"
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None
    if kind not in ("multi_modality", None):
        raise CheckpointError(f"{path / CONFIG_NAME}: model_type {kind!r} is not Janus-Pro "
                              "('multi_modality', or 'janus' for a transformers conversion)")
    try:
        return JanusProConfig.from_dict(d), "official"
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None


def _config_from_transformers(d: dict) -> JanusProConfig:
    """Our config from a transformers JanusConfig dict (its defaults are Janus-Pro-7B's)."""
    text, vis, vq = d.get("text_config", {}), d.get("vision_config", {}), d.get("vq_config", {})
    if vis.get("use_qk_norm") or vis.get("hidden_act", "gelu") != "gelu" or vq.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError("transformers Janus config with qk-norm or a non-GELU activation is not Janus-Pro")
    rope = text.get("rope_parameters") or {}
    heads = text.get("num_attention_heads", 32)
    language = LlamaConfig(
        hidden_size=text.get("hidden_size", 4096), intermediate_size=text.get("intermediate_size", 11008),
        num_hidden_layers=text.get("num_hidden_layers", 30), num_attention_heads=heads,
        num_key_value_heads=text.get("num_key_value_heads") or heads, vocab_size=text.get("vocab_size", 102400),
        max_position_embeddings=text.get("max_position_embeddings", 16384),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6), rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))))
    width = vis.get("hidden_size", 1024)
    vision = VisionConfig(image_size=vis.get("image_size", 384), patch_size=vis.get("patch_size", 16), width=width,
                          layers=vis.get("num_hidden_layers", 24), heads=vis.get("num_attention_heads", 16),
                          mlp_dim=int(width * vis.get("mlp_ratio", 4.0)),
                          model_name="siglip_large_patch16_384" if width == 1024 else "siglip_custom")
    ch_mult = tuple(vq.get("channel_multiplier", (1, 1, 2, 2, 4)))
    vqc = VQConfig(codebook_size=vq.get("num_embeddings", 16384), codebook_dim=vq.get("embed_dim", 8),
                   ch=vq.get("base_channels", 128), ch_mult=ch_mult, num_res_blocks=vq.get("num_res_blocks", 2),
                   z_channels=vq.get("latent_channels", 256),
                   image_size=vq.get("num_patches", 24) * 2 ** (len(ch_mult) - 1))
    h = language.hidden_size
    for name, value in (("vision_config.projection_dim", vis.get("projection_dim", 2048)),
                        ("vq_config.projection_dim", vq.get("projection_dim", 2048)),
                        ("vq_config.image_token_embed_dim", vq.get("image_token_embed_dim", 2048))):
        if value != h:
            raise CheckpointError(f"transformers Janus config: {name} is {value}, expected the LLM width {h}")
    cfg = JanusProConfig(language, vision, vqc)
    cfg.extra["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", True))
    return cfg


# --------------------------------------------------------------------------- tensors


def weight_files(path) -> list[Path]:
    """The weight files of a checkpoint directory (shards listed by the index json)."""
    path = Path(path)
    for index_name, single_name in WEIGHT_FILES:
        if (path / index_name).is_file():
            index = _read_json(path / index_name)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{path / index_name} has no 'weight_map' object")
            files = [_shard_file(path, index_name, f) for f in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"shards listed in {path / index_name} are missing: {missing}")
            return files
        if (path / single_name).is_file():
            return [path / single_name]
    names = ", ".join(n for pair in WEIGHT_FILES for n in pair)
    raise FileNotFoundError(f"no weights in {path}: expected one of {names}")


def _shard_file(path: Path, index_name: str, name) -> Path:
    """A shard named by an index json: a file name inside the checkpoint folder, never a path
    that leads out of it (absolute, `..`, or a symlink pointing elsewhere)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{path / index_name} names the shard {name!r}: shards must be files inside "
                              f"the checkpoint folder {path}")
    file = path / name
    if file.exists() and not file.resolve().is_relative_to(path.resolve()):
        raise CheckpointError(f"{path / index_name} names the shard {name!r}, which resolves to {file.resolve()}, "
                              f"outside the checkpoint folder {path}")
    return file


def _torch_load(file: Path):
    """torch.load(weights_only=True): no code runs. A zip-format file (torch >= 1.6's default)
    is memory-mapped; a legacy (pre-zip) one cannot be, so it is read whole."""
    return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))


def iter_tensors(file: Path):
    """(key, tensor) pairs of one weight file, on the CPU and memory-mapped where possible."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{file} is not a valid safetensors file: {e}") from None
        return
    try:
        state = _torch_load(file)
    except Exception as e:  # torch raises several types for corrupt or unsafe pickles
        raise CheckpointError(f"{file} could not be loaded with torch.load(weights_only=True): {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict (got {type(state).__name__})")
    yield from state.items()


# transformers JanusForConditionalGeneration -> official names
_TRANSFORMERS_RULES = [(re.compile(p), r) for p, r in (
    (r"^model\.vision_model\.embeddings\.patch_embedding\.", "vision_model.vision_tower.patch_embed.proj."),
    (r"^model\.vision_model\.embeddings\.position_embedding\.weight$", "vision_model.vision_tower.pos_embed"),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"vision_model.vision_tower.blocks.\1.norm\2."),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer\.", r"vision_model.vision_tower.blocks.\1.attn.proj."),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"vision_model.vision_tower.blocks.\1.attn.qkv.\2."),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision_model.vision_tower.blocks.\1.mlp."),
    (r"^model\.vision_model\.post_layernorm\.", "vision_model.vision_tower.norm."),
    (r"^model\.aligner\.fc1\.", "aligner.layers.0."),
    (r"^model\.aligner\.hidden_layers\.0\.", "aligner.layers.2."),
    (r"^model\.generation_aligner\.fc1\.", "gen_aligner.layers.0."),
    (r"^model\.generation_aligner\.hidden_layers\.0\.", "gen_aligner.layers.2."),
    (r"^model\.vqmodel\.encoder\.down\.(\d+)\.block\.", r"gen_vision_model.encoder.conv_blocks.\1.res."),
    (r"^model\.vqmodel\.decoder\.up\.(\d+)\.block\.", r"gen_vision_model.decoder.conv_blocks.\1.res."),
    (r"^model\.vqmodel\.encoder\.down\.", "gen_vision_model.encoder.conv_blocks."),
    (r"^model\.vqmodel\.decoder\.up\.", "gen_vision_model.decoder.conv_blocks."),
    (r"^model\.vqmodel\.(encoder|decoder)\.mid\.block_1\.", r"gen_vision_model.\1.mid.0."),
    (r"^model\.vqmodel\.(encoder|decoder)\.mid\.attn_1\.", r"gen_vision_model.\1.mid.1."),
    (r"^model\.vqmodel\.(encoder|decoder)\.mid\.block_2\.", r"gen_vision_model.\1.mid.2."),
    (r"^model\.vqmodel\.", "gen_vision_model."),
    (r"^model\.generation_embeddings\.", "gen_embed."),
    (r"^model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
    (r"^model\.generation_head\.", "gen_head."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
)]
_QKV_PART = re.compile(r"^(.*\.attn\.qkv)\.([qkv])\.(weight|bias)$")


def _from_transformers(items):
    """Rename transformers Janus tensors; the separate q/k/v projections are concatenated into
    the fused qkv (whatever shards they come from) and positions get their batch dim."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in items:
        new = key
        for pattern, repl in _TRANSFORMERS_RULES:
            new, n = pattern.subn(repl, new)
            if n:
                break
        if new == "vision_model.vision_tower.pos_embed":
            t = t[None]
        m = _QKV_PART.match(new)
        if m is None:
            yield key, new, t
            continue
        fused = f"{m.group(1)}.{m.group(3)}"
        parts.setdefault(fused, {})[m.group(2)] = t
        if len(parts[fused]) == 3:
            p = parts.pop(fused)
            yield key, fused, torch.cat([p["q"], p["k"], p["v"]])
    if parts:
        raise CheckpointError(f"transformers checkpoint lacks q/k/v parts for: {sorted(parts)}")


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, dtype, device) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    current = module._parameters.get(name)
    if current is None:
        current = module._buffers[name]
    if tuple(current.shape) != tuple(tensor.shape):
        raise CheckpointError(f"shape mismatch for {key}: checkpoint has {tuple(tensor.shape)}, "
                              f"the model expects {tuple(current.shape)}")
    tensor = tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=current.requires_grad)
    else:
        module._buffers[name] = tensor


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_model(cls, path, dtype: torch.dtype | None = torch.bfloat16, device=None) -> nn.Module:
    """Build `cls(config)` on the meta device and fill it from the checkpoint at `path`."""
    path = Path(path)
    config, layout = read_config(path)
    files = weight_files(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict().keys())
    loaded, unexpected = set(), []
    for file in files:
        items = ((k, k, t) for k, t in iter_tensors(file))
        if layout == "transformers":
            items = _from_transformers(iter_tensors(file))
        for source_key, key, tensor in items:
            if key in expected:
                _assign(model, key, tensor, dtype, device)
                loaded.add(key)
            elif not IGNORED_KEYS.match(key):
                unexpected.append(source_key)
    missing = expected - loaded
    if missing == {"language_model.lm_head.weight"} and config.extra.get("tie_word_embeddings"):
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        missing = set()
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(problems))
    return model.eval()


# --------------------------------------------------------------------------- saving


def parse_size(size) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be an int or like '5GB', got {size!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def write_weights(state: dict[str, torch.Tensor], directory, *, safe: bool = True,
                  max_shard_size: int | str = "5GB") -> list[str]:
    """Write a state dict in the release layout: one file, or shards + index json above
    max_shard_size. safe=False writes torch pickles (pytorch_model*.bin). Returns file names."""
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    stem, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    names = [f"{stem}.{ext}"] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    seen: set[int] = set()
    for name, shard in zip(names, shards):
        cpu = {}
        for k, v in shard.items():
            v = v.detach().to("cpu").contiguous()
            if v.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
                v = v.clone()
            seen.add(v.data_ptr())
            cpu[k] = v
        if safe:
            from safetensors.torch import save_file

            save_file(cpu, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(cpu, directory / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        (directory / f"{names[0].split('-')[0]}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return names


# Saving is crash-safe without moving the user's directory. Inside the target directory:
#   1. every new file is written (and fsynced) into a hidden staging directory;
#   2. a journal naming the staging directory, the new files and the stale weight files is
#      written atomically (write + fsync + rename): this rename is the commit point;
#   3. each new file is renamed over its place, stale weight files are unlinked;
#   4. the journal is unlinked, then the empty staging directory.
# A kill before (2) leaves the old checkpoint untouched (the staging data is deleted by the next
# save); a kill after it leaves a journal, and the next load or save rolls the commit forward
# (every step of 3-4 is idempotent), so a reader always gets the old or the new checkpoint.
STAGING_PREFIX = ".janus_fast-save-"
JOURNAL_NAME = ".janus_fast-commit.json"
# The files of a checkpoint's weights; in a Janus checkpoint directory these belong to the
# checkpoint and are replaced by a save. Everything else in the directory is never touched.
_WEIGHT_NAME = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin"
                          r"|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json)$")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    try:  # Linux reports it; os.umask would change it, briefly, for every thread
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _is_ours(name: str) -> bool:
    return name.startswith(STAGING_PREFIX) or name.startswith(JOURNAL_NAME)


def _is_janus_config(file: Path) -> bool:
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("model_type") in ("multi_modality", "janus")


def finish_interrupted_save(path) -> None:
    """Roll forward a save that was killed after its commit point (see above). A directory that
    cannot be written raises a CheckpointError naming where the new checkpoint's files are."""
    path = Path(path)
    journal_file = path / JOURNAL_NAME
    if not journal_file.is_file():
        return
    try:
        journal = json.loads(journal_file.read_text(encoding="utf-8"))
        staging = path / journal["staging"]
        files, stale = list(journal["files"]), list(journal["stale"])
        # Only plain names inside `path`: a crafted journal must not move or delete anything else.
        if not (_plain_name(journal["staging"]) and journal["staging"].startswith(STAGING_PREFIX)
                and all(_plain_name(n) and not _is_ours(n) for n in files)
                and all(_plain_name(n) and _WEIGHT_NAME.match(n) for n in stale)):
            raise ValueError("it names files outside the checkpoint")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{journal_file} is damaged ({e}); the interrupted save's files are in "
                              f"{path}/{STAGING_PREFIX}*") from None
    try:  # tolerant of a second process (a reader) finishing the same commit at the same time
        for name in files:
            try:
                os.replace(staging / name, path / name)
            except FileNotFoundError:
                if not (path / name).exists():
                    raise CheckpointError(f"interrupted save in {path}: {name} is neither in {staging} "
                                          "nor in place") from None
        for name in stale:
            (path / name).unlink(missing_ok=True)
        _fsync_dir(path)
        journal_file.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    except PermissionError as e:
        raise CheckpointError(f"{path} holds a save that was interrupted after its commit point and cannot be "
                              f"completed here ({e}); the new checkpoint's files are in {staging}, listed in "
                              f"{journal_file}") from None


def _prepare_target(path: Path) -> Path:
    """The directory to save into: symlinks followed, created if missing; a non-empty directory
    must already hold a Janus checkpoint. Interrupted saves are finished, stale staging removed."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {path}: it is a file, not a directory")
    target.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(target)
    foreign = sorted(n for n in os.listdir(target) if not _is_ours(n))
    if foreign and not _is_janus_config(target / CONFIG_NAME):
        raise CheckpointError(f"refusing to save into {path}: the directory is not empty ({_listing(foreign, 5)}) "
                              f"and holds no Janus-Pro checkpoint (no {CONFIG_NAME} with model_type "
                              "'multi_modality'); choose an empty or new directory")
    for name in os.listdir(target):  # what saves killed before their commit point left
        if name.startswith(STAGING_PREFIX):
            shutil.rmtree(target / name, ignore_errors=True)
        elif name == f"{JOURNAL_NAME}.tmp":
            os.unlink(target / name)
    return target


def save_model(model, path, max_shard_size: int | str = "5GB") -> None:
    """Write config.json, safetensors weights (and the processor's files) into the directory
    `path` (through a symlink, created if missing), crash-safely: see the comment above.
    Only the files written and the previous checkpoint's weight files are replaced; other
    files and subdirectories stay as they are. Modes follow the umask."""
    target = _prepare_target(Path(path))
    staging = target / f"{STAGING_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(staging)
    try:
        config = model.config.to_dict()
        config["torch_dtype"] = str(model.dtype).replace("torch.", "")
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        write_weights(model.state_dict(), staging, safe=True, max_shard_size=max_shard_size)
        if getattr(model, "processor", None) is not None:
            model.processor.save_pretrained(staging)
        files = sorted(os.listdir(staging))
        mode = 0o666 & ~_umask()
        for name in files:
            os.chmod(staging / name, mode)
            _fsync_file(staging / name)
        _fsync_dir(staging)
        blocked = [n for n in files if (target / n).is_dir() and not (target / n).is_symlink()]
        if blocked:
            raise CheckpointError(f"cannot save into {path}: {blocked} are folders where the checkpoint's files go")
        stale = sorted(n for n in os.listdir(target) if _WEIGHT_NAME.match(n) and n not in files)
        journal = target / f"{JOURNAL_NAME}.tmp"
        journal.write_text(json.dumps({"staging": staging.name, "files": files, "stale": stale}))
        _fsync_file(journal)
        os.replace(journal, target / JOURNAL_NAME)  # the commit point
        _fsync_dir(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        (target / f"{JOURNAL_NAME}.tmp").unlink(missing_ok=True)
        raise
    finish_interrupted_save(target)
