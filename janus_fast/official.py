"""The official names on the fast path: `MultiModalityCausalLM` (what the official scripts
import from `janus.models`, here `janus_fast.models`) is the engine's JanusPro with transformers'
from_pretrained signature, so a script that changes only its import decodes on the engine:
`language_model.generate` replays captured steps, and the scripts' own token-by-token loop
(`language_model.model(inputs_embeds=..., use_cache=True, past_key_values=...)`) runs the fused
decode layer on a static cache, captured per cache on the GPU (janus_fast.engine.decode).

This module sits above the engine (beside cli.py); `janus_fast.models` hands its class out by
name and registers it with transformers' Auto classes (models/official.py).
"""

from __future__ import annotations

from .engine import JanusPro
from .models.official import OfficialLoading, VLChatProcessor, load_pil_images, register_auto_classes

__all__ = ["MultiModalityCausalLM", "VLChatProcessor", "load_pil_images"]


class MultiModalityCausalLM(OfficialLoading, JanusPro):
    """JanusPro on the engine under the official class name, loaded as transformers loads it:
    the stored dtype unless `dtype`/`torch_dtype` says otherwise, on the CPU unless `device_map`
    names a device ("auto": cuda when available)."""


register_auto_classes()  # now complete: registers at once if transformers is already imported
