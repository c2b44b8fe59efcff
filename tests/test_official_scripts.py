"""Drop-in for real: the steps of DeepSeek's official `inference.py` (understanding) and
`generation_inference.py` (generation), with only `from janus.models import ...` changed to
`from janus_fast.models import ...`, on a tiny random checkpoint in the official layout. The
scripts' own code is followed step by step (our test code, their flow); `.cuda()` is applied
only when a GPU is present, and the sizes are the tiny model's."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402  (the scripts' first import)

from janus_fast.models import MultiModalityCausalLM, VLChatProcessor, load_pil_images  # noqa: E402
from janus_fast.models.random_model import build_random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("Janus-Pro-tiny")
    build_random_checkpoint(path, "tiny", "cpu", torch.bfloat16, seed=0)
    return str(path)


def load_like_the_scripts(model_path):
    vl_chat_processor: VLChatProcessor = VLChatProcessor.from_pretrained(model_path)
    tokenizer = vl_chat_processor.tokenizer
    vl_gpt: MultiModalityCausalLM = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    vl_gpt = vl_gpt.to(torch.bfloat16)
    if CUDA:
        vl_gpt = vl_gpt.cuda()
    return vl_chat_processor, tokenizer, vl_gpt.eval()


def test_auto_classes_return_our_model_and_processor(model_path):
    vl_gpt = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    assert type(vl_gpt) is MultiModalityCausalLM and not vl_gpt.training
    assert vl_gpt.dtype == torch.bfloat16 and vl_gpt.device.type == "cpu"  # stored dtype, on the CPU
    config = transformers.AutoConfig.from_pretrained(model_path, trust_remote_code=True)
    assert config.model_type == "multi_modality"
    assert config.to_janus_config().language == vl_gpt.config.language
    processor = transformers.AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    assert type(processor) is VLChatProcessor and processor.num_image_tokens == vl_gpt.config.vision.num_tokens
    f32 = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True, dtype=torch.float32,
                                               device_map="cpu")
    assert f32.dtype == torch.float32 and f32.device.type == "cpu"
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['quantization_config'\]"):
        AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True, quantization_config={"bits": 4})


def test_understanding_script(model_path, tmp_path):
    image = tmp_path / "equation.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(image)
    vl_chat_processor, tokenizer, vl_gpt = load_like_the_scripts(model_path)

    conversation = [
        {"role": "<|User|>", "content": "<image_placeholder>\nConvert the formula into latex code.",
         "images": [str(image)]},
        {"role": "<|Assistant|>", "content": ""},
    ]
    pil_images = load_pil_images(conversation)
    prepare_inputs = vl_chat_processor(conversations=conversation, images=pil_images, force_batchify=True
                                       ).to(vl_gpt.device)
    inputs_embeds = vl_gpt.prepare_inputs_embeds(**prepare_inputs)
    outputs = vl_gpt.language_model.generate(
        inputs_embeds=inputs_embeds, attention_mask=prepare_inputs.attention_mask,
        pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=6, do_sample=False, use_cache=True)
    answer = tokenizer.decode(outputs[0].cpu().tolist(), skip_special_tokens=True)
    printed = f"{prepare_inputs['sft_format'][0]}"

    assert printed.endswith("<|User|>: <image_placeholder>\nConvert the formula into latex code.\n\n<|Assistant|>:")
    assert 1 <= outputs.shape[1] <= 6
    # the fast path: generate ran on the engine (a bucket of static buffers and a step)
    (bucket,) = vl_gpt.language_model._engine.buckets._items.values()
    assert bucket.kind == "text" and list(bucket.steps) == [("greedy", CUDA)]
    # the same greedy answer as our own API gives for the same image and question
    assert answer == vl_gpt.answer(str(image), "Convert the formula into latex code.", max_new_tokens=6)


def test_generation_script(model_path, tmp_path):
    vl_chat_processor, tokenizer, vl_gpt = load_like_the_scripts(model_path)
    conversation = [{"role": "<|User|>", "content": "A close-up photo of a red fox in the snow."},
                    {"role": "<|Assistant|>", "content": ""}]
    sft_format = vl_chat_processor.apply_sft_template_for_multi_turn_prompts(
        conversations=conversation, sft_format=vl_chat_processor.sft_format, system_prompt="")
    prompt = sft_format + vl_chat_processor.image_start_tag
    device = vl_gpt.device

    # generate(mmgpt, vl_chat_processor, prompt) with the tiny model's sizes
    mmgpt, temperature, parallel_size, cfg_weight = vl_gpt, 1, 2, 5
    image_token_num_per_image, img_size, patch_size = 16, 64, 16
    torch.manual_seed(0)
    llm, caches = mmgpt.language_model.model, []  # a spy on the fused decode step the loop reaches
    decode_step = llm.decode_step
    llm.decode_step = lambda x, cache: caches.append((cache.k[0], cache.capacity)) or decode_step(x, cache)
    with torch.inference_mode():
        input_ids = torch.LongTensor(vl_chat_processor.tokenizer.encode(prompt))
        tokens = torch.zeros((parallel_size * 2, len(input_ids)), dtype=torch.int).to(device)
        for i in range(parallel_size * 2):
            tokens[i, :] = input_ids
            if i % 2 != 0:
                tokens[i, 1:-1] = vl_chat_processor.pad_id
        inputs_embeds = mmgpt.language_model.get_input_embeddings()(tokens)
        generated_tokens = torch.zeros((parallel_size, image_token_num_per_image), dtype=torch.int).to(device)
        for i in range(image_token_num_per_image):
            outputs = mmgpt.language_model.model(inputs_embeds=inputs_embeds, use_cache=True,
                                                 past_key_values=outputs.past_key_values if i != 0 else None)
            hidden_states = outputs.last_hidden_state
            logits = mmgpt.gen_head(hidden_states[:, -1, :])
            logit_cond = logits[0::2, :]
            logit_uncond = logits[1::2, :]
            logits = logit_uncond + cfg_weight * (logit_cond - logit_uncond)
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs.float(), num_samples=1)
            generated_tokens[:, i] = next_token.squeeze(dim=-1)
            next_token = torch.cat([next_token.unsqueeze(dim=1), next_token.unsqueeze(dim=1)], dim=1).view(-1)
            img_embeds = mmgpt.prepare_gen_img_embeds(next_token)
            inputs_embeds = img_embeds.unsqueeze(dim=1)
        dec = mmgpt.gen_vision_model.decode_code(generated_tokens.to(dtype=torch.int),
                                                 shape=[parallel_size, 8, img_size // patch_size, img_size // patch_size])
    dec = dec.to(torch.float32).cpu().numpy().transpose(0, 2, 3, 1)
    dec = np.clip((dec + 1) / 2 * 255, 0, 255)
    visual_img = np.zeros((parallel_size, img_size, img_size, 3), dtype=np.uint8)
    visual_img[:, :, :] = dec
    os.makedirs(tmp_path / "generated_samples", exist_ok=True)
    for i in range(parallel_size):
        Image.fromarray(visual_img[i]).save(tmp_path / "generated_samples" / f"img_{i}.jpg")

    assert len(list((tmp_path / "generated_samples").iterdir())) == parallel_size
    # the fast path: every step after the prefill is one fused decode step on one static cache
    # (sized at the prefill for the image's tokens: never reallocated)
    assert type(llm).__module__ == "janus_fast.engine.decode"
    assert all(k is caches[0][0] for k, _ in caches) and caches[0][1] >= len(input_ids) + image_token_num_per_image
    if CUDA:  # the first decode runs eagerly, the second is captured (the spy runs while recording)
        decoder = outputs.past_key_values.__dict__["_decoder"]  # and every later one replays
        assert len(caches) == 2 and decoder.step.captured and decoder.calls == image_token_num_per_image - 1
    else:
        assert len(caches) == image_token_num_per_image - 1
    del llm.decode_step
    assert ((generated_tokens >= 0) & (generated_tokens < vl_gpt.config.vq.codebook_size)).all()
    # the cached decode the script relies on: the last step's hidden state equals a full forward
    # over the whole sequence without a cache
    with torch.inference_mode():
        everything = torch.cat([mmgpt.language_model.get_input_embeddings()(tokens),
                                mmgpt.prepare_gen_img_embeds(generated_tokens[:, :-1].repeat_interleave(2, 0))], 1)
        full = mmgpt.language_model.model(inputs_embeds=everything).last_hidden_state[:, -1]
    torch.testing.assert_close(hidden_states[:, -1].float(), full.float(), rtol=0.05, atol=0.05)


def test_import_janus_fast_registers_nothing_and_models_registers_in_any_order(model_path):
    """`import janus_fast` has no side effects; importing janus_fast.models registers, whether
    transformers is imported before or after it."""
    code = r"""
import sys
import janus_fast
assert "transformers" not in sys.modules and "janus_fast.models" not in sys.modules
import janus_fast.models
assert "transformers" not in sys.modules  # registration waits for transformers to be imported
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "multi_modality" in CONFIG_MAPPING
print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)).__name__)
"""
    result = subprocess.run([sys.executable, "-c", code, model_path], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "MultiModalityCausalLM"
