"""The official package's names, so its scripts run with only the import changed, and
registration of our config, model and processor with transformers' Auto classes under
model_type "multi_modality" (what `janus.models` does when imported).

The official model class must decode on the engine, which models may not import: it lives above
the engine, in `janus_fast.official` (the front door: `MultiModalityCausalLM` = this module's
`OfficialLoading` + the engine's JanusPro). `janus_fast.models` hands that class out by name
(the package's `__getattr__`), and the registration imports the front door by name when
transformers is imported: nothing in models imports the engine.

Importing transformers' Auto classes takes seconds, so registration happens when transformers
is imported: at once if it already is, otherwise by a one-shot import hook.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

import torch

from ..processor import JanusProcessor, load_pil_images
from .config import JanusProConfig

__all__ = ["FRONT_DOOR", "OfficialLoading", "VLChatProcessor", "load_pil_images", "register_auto_classes"]

FRONT_DOOR = "janus_fast.official"  # the module above the engine that holds MultiModalityCausalLM

# Keyword arguments transformers' Auto classes pass on (or users pass out of habit) that mean
# nothing for a local directory of safetensors: accepted and ignored.
_HUB_KWARGS = frozenset({
    "trust_remote_code", "adapter_kwargs", "revision", "cache_dir", "force_download", "local_files_only", "proxies",
    "token", "code_revision", "low_cpu_mem_usage", "use_safetensors", "attn_implementation", "repo_type",
    "user_agent", "return_unused_kwargs"})


def _local_dir(path, subfolder: str | None) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a local directory: janus_fast loads local Janus-Pro release "
                                "directories (download one first, e.g. with `hf download deepseek-ai/Janus-Pro-1B "
                                "--local-dir DIR`)")
    return path / subfolder if subfolder else path


def _unknown(kwargs: dict, where: str) -> None:
    unknown = sorted(k for k in kwargs if k not in _HUB_KWARGS and not k.startswith("_"))
    if unknown:
        raise TypeError(f"{where} got unexpected keyword arguments {unknown}")


class OfficialLoading:
    """transformers' from_pretrained signature over JanusPro.from_pretrained (mixed into the
    official class name): the stored dtype unless `dtype`/`torch_dtype` says otherwise, on the
    CPU unless `device_map` names a device ("auto": cuda when available)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, dtype=None, torch_dtype=None,
                        device_map=None, subfolder: str | None = None, **kwargs):
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no extra positional arguments, "
                            f"got {len(model_args)}")
        _unknown(kwargs, f"{cls.__name__}.from_pretrained")
        dtype = dtype if dtype is not None else torch_dtype
        if dtype == "auto":
            dtype = None
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        if device_map is not None and not isinstance(device_map, (str, torch.device, int)):
            raise TypeError(f"device_map must name one device (a str, int or torch.device), got {device_map!r}")
        return super().from_pretrained(_local_dir(pretrained_model_name_or_path, subfolder), dtype=dtype,
                                       device=device_map if device_map is not None else "cpu")


class VLChatProcessor(JanusProcessor):
    """JanusProcessor under the official class name (the name transformers' AutoProcessor looks
    up from processor_config.json)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs) -> "VLChatProcessor":
        kwargs = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS and not k.startswith("_")}
        return super().from_pretrained(_local_dir(pretrained_model_name_or_path, subfolder), **kwargs)


_CONFIG_CLASS = None
_SUB_CONFIGS = ("vision_config", "aligner_config", "gen_vision_config", "gen_aligner_config", "gen_head_config",
                "language_config")


def _config_class():
    """A transformers config for model_type "multi_modality" that keeps the official sub-config
    dicts and validates them with JanusProConfig.from_dict."""
    global _CONFIG_CLASS
    if _CONFIG_CLASS is None:
        from transformers import PretrainedConfig

        class MultiModalityConfig(PretrainedConfig):
            model_type = "multi_modality"

            def __init__(self, **kwargs):
                parts = {k: kwargs.pop(k) for k in _SUB_CONFIGS if k in kwargs}
                if parts:  # transformers also builds an empty config to diff against
                    JanusProConfig.from_dict(dict(parts))
                for k, v in parts.items():
                    setattr(self, k, v)
                super().__init__(**kwargs)

            def to_janus_config(self) -> JanusProConfig:
                return JanusProConfig.from_dict({k: getattr(self, k) for k in _SUB_CONFIGS})

        _CONFIG_CLASS = MultiModalityConfig
    return _CONFIG_CLASS


def official_model_class():
    """The front door's MultiModalityCausalLM (imported by name), or None while the front door
    is still being imported (it registers itself once complete)."""
    module = sys.modules.get(FRONT_DOOR)
    if module is None:
        module = importlib.import_module(FRONT_DOOR)
    return getattr(module, "MultiModalityCausalLM", None)


def _register_now() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

    model_class = official_model_class()
    if model_class is None:
        return
    config = _config_class()
    AutoConfig.register("multi_modality", config, exist_ok=True)
    AutoModelForCausalLM.register(config, model_class, exist_ok=True)
    AutoProcessor.register(config, VLChatProcessor, exist_ok=True)


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is first imported it wraps that module's loader
    so registration runs right after transformers has finished executing."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_now()

            spec.loader.exec_module = exec_then_register
        return spec


def register_auto_classes() -> None:
    """Register with transformers' Auto classes now if transformers is imported, else as soon
    as it is; nothing happens when transformers is not installed."""
    if "transformers" in sys.modules:
        _register_now()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterWhenImported())
