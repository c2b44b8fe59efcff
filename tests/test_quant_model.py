"""Quantized Janus-Pro on the CPU: `quantize` / `from_pretrained(quantize=, kv_cache_dtype=)` /
`--quantize`; an int8 (or fp8) model generates token for token what the model holding the
dequantized weights generates (greedy), with the Triton kernels (the interpreter) as with the
reference; the decode step keeps its op count; quantizing goes layer by layer; a decode step
reads half the weight bytes; the KV cache's bytes per token; bad input fails before loading."""

import copy

import pytest
import torch
from torch import nn

from janus_fast import cli, ops
from janus_fast.engine import JanusPro, decode_op_counts
from janus_fast.models.llama import LlamaForCausalLM
from janus_fast.models.quant import QuantizedLinear, quantize_linears
from janus_fast.ops import quant

from .helpers import DEVICE, grid
from .test_quant import needs_format
from .test_engine import engine_copy
from .tiny_janus import tiny_model

PROMPT_IDS = torch.tensor([[5, 17, 42, 9, 88, 3], [7, 7, 120, 64, 2, 31]], device=DEVICE)


@pytest.fixture(scope="module")
def model():
    return engine_copy(tiny_model()).to(DEVICE)


def dequantized_copy(quantized: JanusPro) -> JanusPro:
    """The same model with plain Linear layers holding the dequantized weights (fp32 here)."""
    ref = copy.deepcopy(quantized)
    for module in list(ref.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.qweight.device)
                linear.weight = nn.Parameter(child.dequantized_weight(torch.float32))
                linear.bias = child.bias
                setattr(module, name, linear)
    return ref


@pytest.fixture
def on_triton(monkeypatch):
    """quantized_linear, rope_kv_write and decode_attention forced onto the Triton kernels (the
    interpreter here)."""
    from janus_fast.ops import attention, decode_layer

    resolve = quant._resolve
    monkeypatch.setattr(quant, "_resolve", lambda x, qweight, backend: resolve(x, qweight, "triton"))
    monkeypatch.setattr(decode_layer, "_resolve", lambda op, backend, t: "triton")
    real = attention._backend.resolve
    monkeypatch.setattr(attention._backend, "resolve",
                        lambda op, backend, device, fast, **kw: "triton" if op == "decode_attention"
                        else real(op, backend, device, fast, **kw))


def generated(model, images: bool = True, new_tokens: int = 5):
    """Greedy text tokens, and the greedy image codes (top_k=1) of one prompt's image."""
    text = model.language_model.generate(input_ids=PROMPT_IDS, max_new_tokens=new_tokens)
    if not images:
        return text, None
    ids = [model._generation_prompt_ids(model.processor, "a fox")]
    return text, model.generate_image_tokens(ids, model.processor.pad_id, 1, 5.0, 1.0, 1, 1.0, [0])


# the interpreter runs each kernel launch slowly: the quick tier runs the Triton kernels over one
# decode step (below), the full tier whole generations on them
@pytest.mark.parametrize("fmt, kernels, images", grid(
    [("int8", "reference", True), ("fp8", "reference", False)],
    [("fp8", "reference", True), ("int8", "triton", False), ("fp8", "triton", False), ("int8", "triton", True)]))
def test_quantized_model_generates_what_the_dequantized_model_does(model, fmt, kernels, images, request):
    needs_format(fmt)
    if kernels == "triton":
        request.getfixturevalue("on_triton")
    quantized = copy.deepcopy(model).quantize(fmt)
    want_text, want_codes = generated(dequantized_copy(quantized), images, 5 if images else 3)
    text, codes = generated(quantized, images, 5 if images else 3)
    assert torch.equal(text, want_text)
    assert not images or torch.equal(codes, want_codes)
    assert not torch.equal(dequantized_copy(quantized).language_model.lm_head.weight,
                           model.language_model.lm_head.weight)  # (the weights did change)


@pytest.mark.parametrize("fmt", grid(["int8"], ["fp8"]))
def test_quantized_cache_decode_step_on_the_kernels_equals_the_reference(model, fmt, on_triton, monkeypatch):
    """With int8 weights and a quantized cache, the decode step on the Triton kernels equals the
    reference step (which dequantizes), and both write the same codes into the cache."""
    needs_format(fmt)
    lm = copy.deepcopy(model).quantize("int8", kv_cache_dtype=fmt).language_model.model
    prefix = torch.randn(3, 5, 64, device=DEVICE)

    def step():
        cache = lm.new_cache(3, 8)
        with torch.no_grad():
            lm(inputs_embeds=prefix, attention_mask=torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]],
                                                                 device=DEVICE),
               past_key_values=cache, use_cache=True)
            out = lm.decode_step(prefix[:, 0] * 0.5, cache)
        return out, cache

    got, got_cache = step()
    monkeypatch.undo()  # back to the reference ops
    want, want_cache = step()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_cache.k[0].dtype == quant.FORMATS[fmt]
    for a, b in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
        assert (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs().max() <= 1
    for a, b in zip(got_cache.k_scale + got_cache.v_scale, want_cache.k_scale + want_cache.v_scale):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_engine_and_eager_loop_agree_on_a_quantized_cache(model):
    """The prompt attends to its own keys unquantized and stores them quantized, in the eager
    packed forward as in the engine's prefill: both loops produce the same tokens."""
    lm = copy.deepcopy(model).quantize("int8", kv_cache_dtype="int8").language_model
    embeds = lm.get_input_embeddings()(PROMPT_IDS)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6], device=DEVICE)
    args = (embeds, mask, 6, False, 1.0, 0, 1.0, (), 0, None)
    eager = LlamaForCausalLM.generate_new_tokens(lm, *args)  # the models' loop over a growing cache
    assert torch.equal(lm.generate_new_tokens(*args), eager)


def test_decode_step_keeps_nine_ops_per_layer(model):
    plain = decode_op_counts(model.language_model.model)
    quantized = copy.deepcopy(model).quantize("int8", kv_cache_dtype="int8")
    assert decode_op_counts(quantized.language_model.model) == plain and plain["per_layer"] == 9


def test_quantize_goes_layer_by_layer(model, monkeypatch):
    """At every layer the model holds at most its starting bytes plus one quantized layer: each
    float weight (with the fused decode copy that views it) is released before the next."""
    m = copy.deepcopy(model)
    m.language_model.generate(input_ids=PROMPT_IDS[:, :3], max_new_tokens=2)  # makes the fused weights

    def held():
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in list(m.parameters()) + list(m.buffers())}
        return sum(storages.values())

    start, peaks, layer_bytes = held(), [], []
    original = QuantizedLinear.from_linear

    def spy(linear, fmt):
        out = original(linear, fmt)
        peaks.append(held() + out.qweight.nbytes + out.weight_scale.nbytes)
        layer_bytes.append(out.qweight.nbytes + out.weight_scale.nbytes)
        return out

    monkeypatch.setattr(QuantizedLinear, "from_linear", spy)
    m.quantize("int8")
    assert len(peaks) == 2 * 7 + 1 + 2  # 7 per LLM layer, lm_head, gen_head's two
    assert max(peaks) <= start + max(layer_bytes)
    assert held() < start


def test_quantized_module_moves_but_keeps_its_format(model):
    """Casting the model casts biases and norms, never the stored format or its scales (the fused
    decode views survive); moving it moves the buffers."""
    needs_format("fp8")
    m = copy.deepcopy(model).quantize("fp8")
    before = generated(m, images=False)[0]  # (also makes the fused views of the quantized buffers)
    layer = m.language_model.model.layers[0].self_attn.q_proj
    stored = (layer.qweight.clone(), layer.weight_scale.clone())
    m.double()
    assert layer.qweight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert m.gen_head.vision_head.bias.dtype == torch.float64
    m.float()
    assert torch.equal(layer.qweight.view(torch.uint8), stored[0].view(torch.uint8))
    assert torch.equal(layer.weight_scale, stored[1])
    assert torch.equal(generated(m, images=False)[0], before)
    meta = copy.deepcopy(m).to("meta")
    assert meta.language_model.model.layers[0].self_attn.q_proj.qweight.device.type == "meta"
    with pytest.raises(AttributeError, match="no float weight"):
        layer.weight
    assert not hasattr(layer, "weight")


@pytest.mark.parametrize("kv_dtype, value_bytes, scale_bytes", [(None, 4, 0), (torch.bfloat16, 2, 0),
                                                                ("int8", 1, 4), ("fp8", 1, 4), (torch.int8, 1, 4)])
def test_kv_bytes_per_token(model, kv_dtype, value_bytes, scale_bytes):
    lm = copy.deepcopy(model.language_model.model)
    c = lm.config
    want = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.head_dim * value_bytes + scale_bytes)
    assert lm.kv_bytes_per_token(kv_dtype) == want
    if kv_dtype is None or isinstance(kv_dtype, str):  # what new_cache really allocates
        lm.kv_cache_dtype = kv_dtype
        cache = lm.new_cache(3, 10)
        held = sum(t.nbytes for t in cache.k + cache.v + (cache.k_scale + cache.v_scale if cache.quantized else []))
        assert held == 3 * 10 * lm.kv_bytes_per_token()


def test_from_pretrained_quantizes_and_save_refuses(model, tmp_path):
    model.save_pretrained(tmp_path / "release")
    loaded = JanusPro.from_pretrained(tmp_path / "release", dtype=torch.float32, device="cpu", quantize="int8",
                                      kv_cache_dtype="fp8")
    again = copy.deepcopy(model).quantize("int8")
    assert torch.equal(loaded.gen_head.vision_head.qweight, again.gen_head.vision_head.qweight)
    assert loaded.language_model.model.kv_cache_dtype == "fp8"
    assert loaded.language_model.model.new_cache(1, 4).k[0].dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="save the unquantized model"):
        loaded.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="already quantized"):
        loaded.quantize("fp8")


def test_bad_quantize_values_fail_before_loading(model, monkeypatch):
    missing = "/nonexistent/release"  # loading would raise FileNotFoundError
    with pytest.raises(ValueError, match=r"quantize must be one of \['fp8', 'int8'\], got 'int4'"):
        JanusPro.from_pretrained(missing, quantize="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        JanusPro.from_pretrained(missing, kv_cache_dtype=torch.int8)
    with pytest.raises(ValueError, match="quantize must be one of"):
        copy.deepcopy(model).quantize("bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    for kwargs in (dict(quantize="fp8"), dict(kv_cache_dtype="fp8")):
        with pytest.raises(ValueError, match=r"'fp8' \(e4m3\) needs a GPU of compute capability 8\.9"):
            JanusPro.from_pretrained(missing, device="cuda", **kwargs)


def test_cli_quantize(model, tmp_path, capsys, monkeypatch):
    """`--quantize` / `--kv-cache-dtype` reach from_pretrained; a bad value is a usage error, and
    fp8 on an sm_80 GPU a one-line error before any weight is read."""
    seen = {}

    def fake_load(cls, path, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(JanusPro, "from_pretrained", classmethod(fake_load))
    model.save_pretrained(tmp_path / "release")
    args = ["generate", "--model", str(tmp_path / "release"), "--prompt", "x", "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    with pytest.raises(SystemExit):
        cli.main(args + ["--quantize", "int8", "--kv-cache-dtype", "fp8"])
    assert seen["quantize"] == "int8" and seen["kv_cache_dtype"] == "fp8"
    with pytest.raises(SystemExit) as e:
        cli.main(args + ["--quantize", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(cli, "_device", lambda name: "cuda")
    with pytest.raises(SystemExit) as e:
        cli.main(args + ["--quantize", "fp8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "quantize='fp8'" in err and len(err.strip().splitlines()) == 1


def test_quantize_linears_counts_what_it_replaced():
    stack = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4, bias=False)))
    assert quantize_linears(stack, "int8") == 2
    assert isinstance(stack[0], QuantizedLinear) and isinstance(stack[2][0], QuantizedLinear)
    x = torch.randn(3, 8)
    torch.testing.assert_close(stack(x), ops.quantized_linear(
        torch.relu(ops.quantized_linear(x, stack[0].qweight, stack[0].weight_scale, stack[0].bias)),
        stack[2][0].qweight, stack[2][0].weight_scale))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_captured_quantized_steps_replay_the_eager_ones(fmt):
    """bf16 on the GPU: the image step with quantized weights and cache, captured as one CUDA graph
    and replayed, draws the same codes as the same step run eagerly."""
    needs_format(fmt)
    m = engine_copy(tiny_model()).to("cuda", torch.bfloat16).quantize(fmt, kv_cache_dtype=fmt)
    ids = [m._generation_prompt_ids(m.processor, p) for p in ("a fox", "a much longer prompt about a fox")]
    args = (ids, m.processor.pad_id, 2, 5.0, 1.0, 0, 1.0, [1, 2])
    assert torch.equal(m.generate_image_tokens(*args, use_graphs=True), m.generate_image_tokens(*args, use_graphs=False))
