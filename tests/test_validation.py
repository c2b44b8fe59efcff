"""Bad input gets a clear error naming the argument, before any launch."""

import pytest
import torch

from janus_fast import ops
from tests.helpers import DEVICE


def qkv(b=1, sq=4, sk=4, hq=2, hkv=2, d=8, dtype=torch.float32):
    return (torch.randn(b, sq, hq, d, dtype=dtype), torch.randn(b, sk, hkv, d, dtype=dtype),
            torch.randn(b, sk, hkv, d, dtype=dtype))


def raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_flash_attention_errors():
    q, k, v = qkv()
    raises(TypeError, "q must be a torch.Tensor", ops.flash_attention, q.tolist(), k, v)
    raises(ValueError, "q must have 4 dimensions", ops.flash_attention, q[0], k, v)
    raises(TypeError, "k must have dtype", ops.flash_attention, q, k.int(), v)
    raises(ValueError, "dtypes must match", ops.flash_attention, q, k.double(), v)
    raises(ValueError, "k and v shapes must match", ops.flash_attention, q, k, v[:, :3])
    raises(ValueError, "head_dim of q and k", ops.flash_attention, q, k[..., :4], v[..., :4])
    raises(ValueError, "multiple of the kv head count", ops.flash_attention, *qkv(hq=3, hkv=2))
    raises(ValueError, "batch sizes", ops.flash_attention, q, *qkv(b=2)[1:])
    raises(ValueError, "head_dim must be in", ops.flash_attention, *qkv(d=300))
    raises(ValueError, "stride", ops.flash_attention, q.transpose(1, 3).contiguous().transpose(1, 3), k, v)
    raises(ValueError, "softmax_scale must be positive", ops.flash_attention, q, k, v, softmax_scale=-1.0)
    raises(ValueError, "softmax_scale must be finite", ops.flash_attention, q, k, v, softmax_scale=float("nan"))
    raises(ValueError, "k is on meta", ops.flash_attention, q, k.to("meta"), v)
    raises(ValueError, "backend must be one of", ops.flash_attention, q, k, v, backend="fastest")
    raises(ValueError, "no 'cuda' backend", ops.flash_attention, q, k, v, backend="cuda")
    raises(TypeError, "dtype in", ops.flash_attention, *qkv(dtype=torch.float64), backend="triton")


def test_varlen_attention_errors():
    q, k, v = (t[0] for t in qkv(sq=5, sk=5))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    raises(TypeError, "cu_seqlens_q must have dtype", ops.varlen_attention, q, k, v, cu.long(), cu, 3, 3)
    raises(ValueError, "cu_seqlens_q must start at 0", ops.varlen_attention, q, k, v, cu + 1, cu, 3, 3)
    raises(ValueError, "non-decreasing", ops.varlen_attention, q, k, v,
           torch.tensor([0, 4, 2, 5], dtype=torch.int32), torch.tensor([0, 1, 2, 5], dtype=torch.int32), 3, 3)
    raises(ValueError, "must end at the packed total 5", ops.varlen_attention, q, k, v, cu.clone().fill_(0), cu, 3, 3)
    raises(ValueError, "max_seqlen for cu_seqlens_k is 2", ops.varlen_attention, q, k, v, cu, cu, 3, 2)
    raises(ValueError, "cu_seqlens lengths must match", ops.varlen_attention, q, k, v, cu,
           torch.tensor([0, 5], dtype=torch.int32), 3, 5)
    raises(ValueError, "max_seqlen_q must be >= 0", ops.varlen_attention, q, k, v, cu, cu, -1, 3)
    raises(ValueError, "q must have 3 dimensions", ops.varlen_attention, q[None], k, v, cu, cu, 3, 3)


def test_decode_attention_errors():
    q = torch.randn(2, 4, 8)
    kc = vc = torch.randn(2, 6, 2, 8)
    lengths = torch.tensor([1, 6], dtype=torch.int32)
    raises(ValueError, "cache_seqlens must lie in", ops.decode_attention, q, kc, vc, lengths + 1)
    raises(ValueError, "cache_seqlens must lie in", ops.decode_attention, q, kc, vc, lengths - 2)
    raises(TypeError, "cache_seqlens must have dtype", ops.decode_attention, q, kc, vc, lengths.long())
    raises(ValueError, "batch sizes of q and cache_seqlens", ops.decode_attention, q, kc, vc, lengths[:1])
    raises(ValueError, "multiple of the kv head count", ops.decode_attention, q[:, :3], kc, vc, lengths)
    raises(ValueError, "k_cache must have 4 dimensions", ops.decode_attention, q, kc[0], vc, lengths)


def test_vq_errors():
    cb = torch.randn(16, 8)
    raises(ValueError, "indices must lie in \\[0, 16\\)", ops.vq_lookup, torch.tensor([0, 16]), cb)
    raises(ValueError, "indices must lie in", ops.vq_lookup, torch.tensor([-1]), cb)
    raises(TypeError, "indices must have dtype", ops.vq_lookup, torch.tensor([0.0]), cb)
    raises(ValueError, "B\\*H\\*W and the number of indices", ops.vq_lookup, torch.zeros(5, dtype=torch.long), cb,
           shape=(1, 8, 2, 2))
    raises(ValueError, "shape's D", ops.vq_lookup, torch.zeros(4, dtype=torch.long), cb, shape=(1, 4, 2, 2))
    raises(ValueError, "shape must be", ops.vq_lookup, torch.zeros(4, dtype=torch.long), cb, shape=(4, 8))
    raises(ValueError, "codebook must be a non-empty", ops.vq_lookup, torch.zeros(1, dtype=torch.long), cb[:0])
    raises(ValueError, "latent width", ops.vq_quantize, torch.randn(3, 4), cb)
    raises(TypeError, "z must have dtype", ops.vq_quantize, torch.randn(3, 8).half(), cb)
    raises(ValueError, "z must have 2 dimensions", ops.vq_quantize, torch.randn(3, 8, 1), cb)
    raises(ValueError, "codebook must be contiguous", ops.vq_quantize, torch.randn(3, 8), torch.randn(8, 16).T)
    wide = [torch.randn(n, 65, device=DEVICE) for n in (3, 4)]  # (a GPU has no interpreter for CPU tensors)
    raises(ValueError, "supports D <= 64", ops.vq_quantize, *wide, backend="triton")


def test_cfg_sample_errors():
    logits = torch.randn(4, 10)
    raises(ValueError, "cfg_weight must be finite", ops.cfg_sample, logits, cfg_weight=float("inf"))
    raises(TypeError, "cfg_weight must be a Python number", ops.cfg_sample, logits, cfg_weight=torch.tensor(1.0))
    raises(ValueError, "top_p must be in", ops.cfg_sample, logits, cfg_weight=1.0, top_p=1.5)
    raises(ValueError, "top_p must be in", ops.cfg_sample, logits, cfg_weight=1.0, top_p=-0.1)
    raises(ValueError, "top_k must be >= 0", ops.cfg_sample, logits, cfg_weight=1.0, top_k=-1)
    raises(TypeError, "top_k must be an int", ops.cfg_sample, logits, cfg_weight=1.0, top_k=2.5)
    raises(ValueError, "temperature must be in", ops.cfg_sample, logits, cfg_weight=1.0, temperature=-1.0)
    raises(ValueError, "logits must be \\[2B, V\\]", ops.cfg_sample, logits[:3], cfg_weight=1.0)
    raises(ValueError, "layout must be one of", ops.cfg_sample, logits, cfg_weight=1.0, layout="pairs")
    raises(TypeError, "generator must be", ops.cfg_sample, logits, cfg_weight=1.0, generator=0)
    raises(TypeError, "logits must have dtype", ops.cfg_sample, logits.long(), cfg_weight=1.0)


# --------------------------------------------------------------------------- model configs
# A config.json is checked when it loads: types, ranges and divisibility, each error naming the
# field and the rule (not a shape mismatch or a torch error later).

import json  # noqa: E402

from janus_fast.checkpoint import CheckpointError  # noqa: E402
from janus_fast.models import JanusPro, JanusProConfig  # noqa: E402


def tiny_dict():
    return JanusProConfig.tiny().to_dict()


def set_field(d, dotted, value):
    *parents, last = dotted.split(".")
    for k in parents:
        d = d[k]
    d[last] = value


CONFIG_ERRORS = [
    ("language_config.num_attention_heads", 3, ValueError,
     r"language_config.hidden_size \(64\) must be divisible by num_attention_heads \(3\)"),
    ("language_config.num_key_value_heads", 3, ValueError,
     r"language_config.num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)"),
    ("language_config.hidden_size", "64", TypeError, r"language_config.hidden_size must be an integer, got '64' \(str\)"),
    ("language_config.vocab_size", -5, ValueError, r"language_config.vocab_size must be >= 1, got -5"),
    ("language_config.num_hidden_layers", 2.0, TypeError, r"language_config.num_hidden_layers must be an integer"),
    ("language_config.rms_norm_eps", "abc", TypeError, r"language_config.rms_norm_eps must be a number, got 'abc'"),
    ("language_config.rms_norm_eps", 0, ValueError, r"language_config.rms_norm_eps must be finite and > 0"),
    ("language_config.rope_theta", float("inf"), ValueError, r"language_config.rope_theta must be finite and > 0"),
    ("language_config.hidden_size", 60, ValueError, r"head size .* = 15 must be even"),
    ("vision_config.params.patch_size", 24, ValueError,
     r"vision_config.params.image_size \(64\) must be divisible by patch_size \(24\)"),
    ("vision_config.params.heads", True, TypeError, r"vision_config.params.heads must be an integer, got True"),
    ("vision_config.params.select_layer", 0, ValueError, r"select_layer must be in \[-2, -1\] or \[1, 2\]"),
    ("gen_vision_config.params.image_token_size", 0, ValueError,
     r"gen_vision_config.params.image_token_size must be >= 1, got 0"),
    ("gen_vision_config.params.ch_mult", [1, "2"], TypeError, r"gen_vision_config.params.ch_mult\[1\] must be an integer"),
    ("gen_vision_config.params.image_size", 72, ValueError,
     r"gen_vision_config.params.image_size \(72\) must be divisible by the downsampling factor"),
    ("gen_head_config.params", "x", TypeError, r"gen_head_config.params must be a JSON object"),
]


@pytest.mark.parametrize("field,value,exc,match", CONFIG_ERRORS, ids=[f"{c[0]}={c[1]!r}" for c in CONFIG_ERRORS])
def test_config_errors_name_field_and_rule(field, value, exc, match):
    d = tiny_dict()
    set_field(d, field, value)
    raises(exc, match, JanusProConfig.from_dict, d)


def test_config_checked_when_the_checkpoint_loads(tmp_path):
    d = tiny_dict()
    d["language_config"]["num_attention_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(d))
    raises(CheckpointError, r"config.json: language_config.hidden_size \(64\) must be divisible",
           JanusPro.from_pretrained, tmp_path, device="cpu")
    d = tiny_dict()
    d["language_config"]["hidden_size"] = "64"
    (tmp_path / "config.json").write_text(json.dumps(d))
    raises(CheckpointError, r"config.json: language_config.hidden_size must be an integer",
           JanusPro.from_pretrained, tmp_path, device="cpu")
    raises(CheckpointError, r"config.json is a file: a checkpoint is a directory", JanusPro.from_pretrained,
           tmp_path / "config.json", device="cpu")
