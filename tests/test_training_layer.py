"""The fused packed Llama layer (models/packed_layer.py) that training and the packed prefill run:
parity with the unfused eager layer (float64 tight, fp32 on the Triton kernels, bf16 within the
error rule), the three activation-checkpointing modes, the activation bytes each keeps, the
dispatched ops of a layer, parameters and state-dict keys left as they are, bf16 against fp32 for
the whole model, and the config's errors."""

import pytest
import torch

from janus_fast import ops
from janus_fast.models.config import LlamaConfig
from janus_fast.models.llama import LlamaModel, rope_cos_sin
from janus_fast.models.packed_layer import activation_bytes_per_token
from janus_fast.training import TrainConfig, Trainer
from janus_fast.training.distributed import Topology, checkpoint_layers
from janus_fast.training.precision import compute_dtype
from janus_fast.training.profile import layer_op_counts, layer_saved_bytes, tiny_llm_config

from .helpers import DEVICE, assert_close_to_reference

MODES = ("selective", "full", "none")
LENGTHS = (5, 1, 9, 2)  # a sequence of one token included
CFG = LlamaConfig(48, 80, 2, 4, 2, 64, max_position_embeddings=32)  # GQA: 4 query heads on 2 kv heads


def packed_inputs(lengths=LENGTHS, hidden=CFG.hidden_size):
    """Packed sequences of `lengths` on DEVICE (natively on a GPU, the interpreter here)."""
    positions = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return torch.randn(sum(lengths), hidden, device=DEVICE), positions, cu, max(lengths)


def new_model(cfg=CFG, dtype=torch.float32, mode="none", seed=0):
    torch.manual_seed(seed)
    model = LlamaModel(cfg).to(DEVICE, dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    checkpoint_layers(model.layers, mode)
    return model


def eager(model, x, positions, cu, max_seqlen):
    """The unfused layer: separate Q/K/V and gate/up projections, rotate_half RoPE, unfused
    RMSNorm modules and adds (LlamaDecoderLayer's dense block definition)."""
    cos, sin = rope_cos_sin(positions, model.config.head_dim, model.config.rope_theta, x.dtype)

    def attend(attn, y):
        q, k, v = attn.qkv(y, cos, sin)
        out = ops.varlen_attention(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)
        return attn.o_proj(out.reshape(x.shape[0], -1))

    h = x
    for layer in model.layers:
        h = layer(h, attend)
    return model.norm(h)


def fused(model, x, positions, cu, max_seqlen):
    return model.forward_packed(x, positions, cu, max_seqlen)


def run(model, forward, x, packed, grad, autocast=None):
    """(output, gradient of x, {parameter: gradient}) of Σ forward(...) · grad."""
    x = x.detach().clone().requires_grad_()
    with ops.no_value_checks(), (autocast or torch.autocast(x.device.type, enabled=False)):
        out = forward(model, x, *packed)
    (out.double() * grad).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", MODES)
def test_fused_layer_equals_the_unfused_layer_in_float64(mode):
    x, *packed = packed_inputs()
    grad = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)
    want = run(new_model(dtype=torch.float64), eager, x.double(), packed, grad)
    got = run(new_model(dtype=torch.float64, mode=mode), fused, x.double(), packed, grad)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    assert got[2].keys() == want[2].keys() == {n for n, _ in new_model().named_parameters()} - {"embed_tokens.weight"}
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-11, atol=1e-12, msg=name)


def within_rule(got, base, exact, factor):
    assert_close_to_reference(got[0], base[0], exact[0], factor=factor, name="output")
    assert_close_to_reference(got[1], base[1], exact[1], factor=factor, name="grad of the input")
    for name in exact[2]:
        assert got[2][name].dtype == torch.float32, name  # fp32 gradients for fp32 parameters
        assert_close_to_reference(got[2][name], base[2][name], exact[2][name], factor=factor, floor=1e-4, name=name)


def test_fused_layer_on_the_triton_kernels_fp32():
    """fp32 with the layer's fused ops on their Triton kernels (the interpreter here; attention's
    have their own tests): against float64, the error rule with the unfused fp32 layer as the
    baseline."""
    x, *packed = packed_inputs((3, 1, 2))
    grad = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)
    exact = run(new_model(dtype=torch.float64), eager, x.double(), packed, grad)
    base = run(new_model(), eager, x, packed, grad)
    with ops.prefer_backend("triton", ops=("rms_norm", "rope_qkv", "silu_mul")):
        got = run(new_model(mode="selective"), fused, x, packed, grad)
    within_rule(got, base, exact, factor=3.0)


def test_bf16_compute_on_fp32_masters_within_the_rule():
    """bf16 compute with fp32 master weights (autocast: the trainer's one-process mixed precision)
    against float64; baseline: the unfused layer in plain bf16 (bf16 weights and activations)."""
    x, *packed = packed_inputs()
    grad = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)
    exact = run(new_model(dtype=torch.float64), eager, x.double(), packed, grad)
    base = run(new_model(dtype=torch.bfloat16), eager, x.bfloat16(), packed, grad)
    got = run(new_model(mode="selective"), fused, x, packed, grad, torch.autocast(DEVICE, dtype=torch.bfloat16))
    assert got[0].dtype == torch.bfloat16  # the residual stream in bf16
    within_rule(got, base, exact, factor=3.0)


def test_checkpointing_modes_compute_the_same():
    x, *packed = packed_inputs((3, 1, 2))
    grad = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)
    results = [run(new_model(mode=mode), fused, x, packed, grad) for mode in MODES]
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])
        assert all(torch.equal(other[2][n], g) for n, g in results[0][2].items())


@pytest.mark.parametrize("mode", MODES)
def test_activation_bytes_per_layer(mode):
    """What a layer keeps for the backward, counted with saved_tensors_hooks, is the documented
    number (models/packed_layer.py) for bf16 compute on fp32 master weights."""
    lengths = (3, 1, 2)
    kept = layer_saved_bytes(activation_checkpointing=mode, lengths=lengths)
    assert kept == sum(lengths) * activation_bytes_per_token(tiny_llm_config(), mode)


def test_janus_pro_1b_activation_table():
    from janus_fast.models.config import JanusProConfig

    cfg = JanusProConfig.janus_pro_1b().language
    kib = {m: activation_bytes_per_token(cfg, m) / 1024 for m in MODES}
    assert (round(kib["none"], 1), round(kib["selective"], 1), kib["full"]) == (65.1, 46.1, 8.0)
    gib = {m: kib[m] * 4 * 4096 * cfg.num_hidden_layers / 2**20 for m in MODES}  # 4 x 4096 tokens, 24 layers
    assert [round(gib[m], 1) for m in ("none", "selective", "full")] == [24.4, 17.3, 3.0]


def test_dispatched_ops_per_layer():
    """The CPU proxy of issue 18: at most 40 dispatched ops per decoder layer per forward +
    backward in the default config (selective, bf16 on fp32 masters), fused ops on Triton."""
    counts = layer_op_counts()
    assert counts["per_layer"] <= 40, counts
    for op in ("janus_fast::add_rms_norm", "janus_fast::rope_qkv", "janus_fast::silu_mul_fused",
               "janus_fast::rms_norm_backward", "janus_fast::rope_qkv_backward", "janus_fast::silu_mul_fused_backward"):
        assert op in counts["per_layer_ops"], counts  # the fused ops run, with their backward
    assert counts["per_layer_ops"]["aten::mm"] == 8  # the four GEMMs' two backward GEMMs each, and no others


def test_parameters_and_keys_stay_as_they_are():
    """Training steps and a packed prefill in inference mode (which reads the cached fused
    weights) keep the Parameter objects and the official state-dict keys; an optimizer built
    before either keeps training what the model computes with."""
    model = new_model(mode="selective")
    params, keys = list(model.parameters()), list(model.state_dict())
    optimizer = torch.optim.SGD(params, lr=0.1)
    x, *packed = packed_inputs()
    with torch.inference_mode():
        before = fused(model, x, *packed)
    run(model, fused, x, packed, torch.ones(x.shape, dtype=torch.float64, device=DEVICE))
    optimizer.step()
    assert all(a is b for a, b in zip(model.parameters(), params)) and list(model.state_dict()) == keys
    with torch.inference_mode():
        after = fused(model, x, *packed)
    with torch.no_grad():
        again = fused(model, x, *packed)  # the flat copy of the weights, not the cache
    assert not torch.equal(after, before) and torch.equal(after, again)


def test_model_bf16_matches_fp32():
    """The whole tiny Janus-Pro on a packed multi-task batch: bf16 compute on fp32 master weights
    against fp32 compute, loss and every gradient within bf16 tolerance."""
    from benchmarks.bench_training import synthetic_multitask_batch
    from janus_fast.models.random_model import random_model

    model = random_model("tiny").train()
    checkpoint_layers(model.language_model.model.layers, "selective")
    proc = model.processor
    batch = synthetic_multitask_batch(model.config, proc.image_id, proc.pad_id, rows=1, row_tokens=160)

    def loss_and_grads(autocast):
        model.zero_grad(set_to_none=True)
        with ops.no_value_checks(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch.inputs)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss32, grads32 = loss_and_grads(False)
    loss16, grads16 = loss_and_grads(True)
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert grads16.keys() == grads32.keys()
    for name, g in grads32.items():
        assert grads16[name].dtype == torch.float32
        err = (grads16[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 0.05, f"{name}: relative gradient error {err:.3g}"


def test_config_errors_name_the_field(tmp_path, monkeypatch):
    base = dict(data="d.jsonl", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="activation_checkpointing must be one of 'selective', 'full', 'none'"):
        TrainConfig(**base, activation_checkpointing="partial")
    assert TrainConfig(**base).activation_checkpointing == "selective"
    assert TrainConfig(**base, activation_checkpointing=True).activation_checkpointing == "full"
    assert TrainConfig(**base, activation_checkpointing=False).activation_checkpointing == "none"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"mixed_precision='bf16' needs a GPU with bfloat16 .*Tesla V100"):
        compute_dtype("bf16", cuda)
    assert compute_dtype("fp32", cuda) == torch.float32 and compute_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr("janus_fast.training.trainer.load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="mixed_precision='bf16'"):
        Trainer(TrainConfig(**base), Topology(0, 1, cuda))

