"""Janus-Pro configuration: the official config.json (`model_type: "multi_modality"`) as dataclasses.

The official file names each part by a class (`cls`) and a few `params`; the sizes of SigLIP-L and
VQ-16 are implied by those names. To describe smaller models (tests, the CPU demo) the params may
also carry explicit sizes (e.g. `width`, `layers`, `ch_mult`); `to_dict` writes them only when
they differ from the named architecture, so a real release config round-trips unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

SIGLIP_LARGE = dict(width=1024, layers=24, heads=16, mlp_dim=4096, patch_size=16)
VQ16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, image_size=384)


# Validation at construction: every config (parsed from config.json or built in code) is checked
# for types, ranges and divisibility, and the error names the config.json field and the rule.
# Sizes also have a sanity bound (far above any Janus-Pro), so a corrupt config fails at once
# instead of building a million layers.
SANITY_BOUNDS = {
    "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024, "num_attention_heads": 1024,
    "num_key_value_heads": 1024, "vocab_size": 1 << 22, "max_position_embeddings": 1 << 22,
    "image_size": 8192, "patch_size": 8192, "width": 1 << 16, "layers": 1024, "heads": 1024, "mlp_dim": 1 << 18,
    "image_token_size": 1 << 22, "n_embed": 1 << 12, "ch": 1 << 12, "num_res_blocks": 64, "z_channels": 1 << 12,
    "ch_mult": 64,
}


def _int(section: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{section}.{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{section}.{name} must be >= {minimum}, got {value}")
    bound = SANITY_BOUNDS.get(name.split("[")[0])
    if bound is not None and value > bound:
        raise ValueError(f"{section}.{name} must be <= {bound} (a sanity bound: Janus-Pro-7B's largest such size is "
                         f"far below it), got {value}")


def _positive(section: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{section}.{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{section}.{name} must be finite and > 0, got {value}")


def _divides(section: str, name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise ValueError(f"{section}.{name} ({value}) must be divisible by {by_name} ({by})")


@dataclass
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 16384
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        sec = "language_config"
        for f in dataclasses.fields(self)[:7]:
            _int(sec, f.name, getattr(self, f.name))
        _positive(sec, "rms_norm_eps", self.rms_norm_eps)
        _positive(sec, "rope_theta", self.rope_theta)
        _divides(sec, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        _divides(sec, "num_attention_heads", self.num_attention_heads, "num_key_value_heads", self.num_key_value_heads)
        if self.head_dim % 2:
            raise ValueError(f"{sec}: the head size hidden_size / num_attention_heads = {self.head_dim} must be even "
                             "(rotary embeddings rotate pairs)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    """SigLIP ViT (understanding encoder)."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    select_layer: int = -1
    model_name: str = "siglip_large_patch16_384"

    def __post_init__(self):
        sec = "vision_config.params"
        for name in ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim"):
            _int(sec, name, getattr(self, name))
        _int(sec, "select_layer", self.select_layer, minimum=-self.layers)
        if self.select_layer == 0 or self.select_layer > self.layers:
            raise ValueError(f"{sec}.select_layer must be in [-{self.layers}, -1] or [1, {self.layers}] "
                             f"(layers is {self.layers}), got {self.select_layer}")
        if not isinstance(self.model_name, str):
            raise TypeError(f"{sec}.model_name must be a string, got {self.model_name!r}")
        _divides(sec, "image_size", self.image_size, "patch_size", self.patch_size)
        _divides(sec, "width", self.width, "heads", self.heads)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_blocks(self) -> int:
        """Blocks actually run: select_layer -1 keeps all (the official rule: depth + s + 1)."""
        s = self.select_layer
        return self.layers + s + 1 if s <= 0 else s


@dataclass
class VQConfig:
    """VQ-16 VQGAN (generation tokenizer)."""

    codebook_size: int = 16384
    codebook_dim: int = 8
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    image_size: int = 384

    def __post_init__(self):
        sec = "gen_vision_config.params"
        for name, official in (("codebook_size", "image_token_size"), ("codebook_dim", "n_embed"), ("ch", "ch"),
                               ("num_res_blocks", "num_res_blocks"), ("z_channels", "z_channels"),
                               ("image_size", "image_size")):
            _int(sec, official, getattr(self, name))
        if not isinstance(self.ch_mult, (list, tuple)) or not self.ch_mult:
            raise TypeError(f"{sec}.ch_mult must be a non-empty list of integers, got {self.ch_mult!r}")
        if len(self.ch_mult) > 8:  # each level halves the image: 8 levels is a 128x downsampling
            raise ValueError(f"{sec}.ch_mult must have at most 8 levels, got {len(self.ch_mult)}")
        for i, m in enumerate(self.ch_mult):
            _int(sec, f"ch_mult[{i}]", m)
        self.ch_mult = tuple(self.ch_mult)
        _divides(sec, "image_size", self.image_size, "the downsampling factor 2**(len(ch_mult) - 1)", self.downsample)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2


@dataclass
class JanusProConfig:
    language: LlamaConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    # Keys of config.json we do not interpret (architectures, torch_dtype, ...), kept for saving.
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ presets
    @classmethod
    def janus_pro_1b(cls) -> "JanusProConfig":
        return cls(LlamaConfig(2048, 5632, 24, 16, 16, 102400))

    @classmethod
    def janus_pro_7b(cls) -> "JanusProConfig":
        return cls(LlamaConfig(4096, 11008, 30, 32, 32, 102400))

    @classmethod
    def tiny(cls, vocab_size: int = 512) -> "JanusProConfig":
        """A few-MB model with every structural feature of the real one (GQA, 5 VQ levels,
        attention blocks), for tests and the CPU demo: 64x64 images, 16 tokens each."""
        return cls(
            LlamaConfig(64, 128, 2, 4, 2, vocab_size, max_position_embeddings=1024),
            VisionConfig(image_size=64, patch_size=16, width=32, layers=2, heads=2, mlp_dim=64,
                         model_name="siglip_tiny"),
            VQConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=1,
                     z_channels=32, image_size=64),
        )

    # ------------------------------------------------------------------ official config.json
    @classmethod
    def from_dict(cls, d: dict) -> "JanusProConfig":
        """Parse an official config.json dict; errors name the missing field."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)
        try:
            lang = d.pop("language_config")
            vis = d.pop("vision_config")["params"]
            gen = d.pop("gen_vision_config")["params"]
            aligner = d.pop("aligner_config")["params"]
            gen_aligner = d.pop("gen_aligner_config")["params"]
            gen_head = d.pop("gen_head_config")["params"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"config.json is not a Janus-Pro (multi_modality) config: missing {e}") from None
        for name, part in (("language_config", lang), ("vision_config.params", vis),
                           ("gen_vision_config.params", gen), ("aligner_config.params", aligner),
                           ("gen_aligner_config.params", gen_aligner), ("gen_head_config.params", gen_head)):
            if not isinstance(part, dict):
                raise TypeError(f"config.json {name} must be a JSON object, got {part!r}")
        names = [f.name for f in dataclasses.fields(LlamaConfig)]
        missing = [n for n in names[:6] if n not in lang]
        if missing:
            raise ValueError(f"config.json language_config lacks {missing}")
        language = LlamaConfig(**{n: lang[n] for n in names if n in lang})
        if "rope_theta" not in lang and isinstance(lang.get("rope_parameters"), dict):
            language.rope_theta = float(lang["rope_parameters"].get("rope_theta", 10000.0))
        if lang.get("rope_scaling") not in (None, {}):
            raise ValueError(f"rope_scaling {lang['rope_scaling']} is not supported (Janus-Pro has none)")
        if vis.get("select_feature", "same") != "same":
            raise ValueError(f"vision select_feature {vis['select_feature']!r} is not supported (only 'same')")
        arch = dict(SIGLIP_LARGE) if "siglip_large" in vis.get("model_name", "siglip_large") else {}
        arch.update({k: vis[k] for k in SIGLIP_LARGE if k in vis})
        missing = [k for k in SIGLIP_LARGE if k not in arch]
        if missing:
            raise ValueError(f"vision_config params lack {missing} for model_name {vis.get('model_name')!r}")
        vision = VisionConfig(image_size=vis.get("image_size", 384), select_layer=vis.get("select_layer", -1),
                              model_name=vis.get("model_name", "siglip_large_patch16_384"), **arch)
        vq_arch = dict(VQ16)
        vq_arch.update({k: gen[k] for k in VQ16 if k in gen})
        vq_arch["ch_mult"] = tuple(vq_arch["ch_mult"])
        vq = VQConfig(codebook_size=gen.get("image_token_size", 16384), codebook_dim=gen.get("n_embed", 8),
                      **vq_arch)
        cfg = cls(language, vision, vq, extra=d)
        h = language.hidden_size
        for name, p, want in (("aligner_config", aligner, dict(input_dim=vision.width, n_embed=h)),
                              ("gen_aligner_config", gen_aligner, dict(input_dim=vq.codebook_dim, n_embed=h)),
                              ("gen_head_config", gen_head, dict(n_embed=h, image_token_embed=h,
                                                                 image_token_size=vq.codebook_size))):
            for k, v in want.items():
                if k in p and p[k] != v:
                    raise ValueError(f"config.json {name}.params.{k} is {p[k]!r}, expected {v} from the other parts")
        for name, p in (("aligner_config", aligner), ("gen_aligner_config", gen_aligner)):
            if p.get("projector_type", "mlp_gelu") != "mlp_gelu" or p.get("depth", 2) != 2:
                raise ValueError(f"config.json {name}: only projector_type 'mlp_gelu' with depth 2 is supported")
        return cfg

    def to_dict(self) -> dict:
        lang, vis, vq = self.language, self.vision, self.vq
        h = lang.hidden_size
        vparams = dict(image_size=vis.image_size, model_name=vis.model_name, select_feature="same",
                       select_layer=vis.select_layer)
        named = SIGLIP_LARGE if "siglip_large" in vis.model_name else {}
        vparams.update({k: getattr(vis, k) for k in SIGLIP_LARGE if named.get(k) != getattr(vis, k)})
        gparams = dict(image_token_size=vq.codebook_size, n_embed=vq.codebook_dim)
        gparams.update({k: list(v) if isinstance(v, tuple) else v
                        for k in VQ16 if (v := getattr(vq, k)) != VQ16[k]})
        out = {"architectures": ["MultiModalityCausalLM"], **self.extra}
        out.update(
            model_type="multi_modality",
            vision_config={"cls": "CLIPVisionTower", "model_type": "vision", "params": vparams},
            aligner_config={"cls": "MlpProjector", "model_type": "aligner",
                            "params": dict(projector_type="mlp_gelu", depth=2, input_dim=vis.width, n_embed=h)},
            gen_vision_config={"cls": "VQ-16", "model_type": "gen_vision", "params": gparams},
            gen_aligner_config={"cls": "MlpProjector", "model_type": "gen_aligner",
                                "params": dict(projector_type="mlp_gelu", depth=2, input_dim=vq.codebook_dim,
                                               n_embed=h)},
            gen_head_config={"cls": "vision_head", "model_type": "gen_head",
                             "params": dict(n_embed=h, image_token_embed=h, image_token_size=vq.codebook_size)},
            language_config={"model_type": "llama", **dataclasses.asdict(lang)},
        )
        return out
