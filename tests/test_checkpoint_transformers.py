"""A checkpoint saved by transformers' own JanusForConditionalGeneration (tiny JanusConfig) loads
through the key mapping and reproduces transformers' outputs part by part and end to end."""

import pytest
import torch

from janus_fast.models import JanusPro

transformers = pytest.importorskip("transformers")
IMAGE_TOKEN = 5


def hf_config(tie: bool):
    return transformers.JanusConfig(
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
                           projection_dim=64, depth=2, num_image_tokens=16),
        vq_config=dict(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1, 1, 1, 2],
                       num_res_blocks=1, latent_channels=32, num_patches=4, projection_dim=64,
                       image_token_embed_dim=64),
        image_token_id=IMAGE_TOKEN, tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.JanusForConditionalGeneration(hf_config(tie=False)).eval()
    with torch.no_grad():  # move norms and biases off their init values so a swap would show
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("hf_janus")
    hf.save_pretrained(path)
    return hf, JanusPro.from_pretrained(path, dtype=None, device="cpu")


TOL = dict(rtol=1e-4, atol=1e-5)


def test_language_model(pair):
    hf, ours = pair
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        want = hf.lm_head(hf.model.language_model(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(ours.language_model(input_ids=ids).logits, want, **TOL)


def test_image_features(pair):
    hf, ours = pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = hf.model.get_image_features(pixel_values=x)
        want = getattr(want, "pooler_output", want)  # an output object in newer transformers, a tensor before
        torch.testing.assert_close(ours.aligner(ours.vision_model(x)), want, **TOL)


def test_generation_parts(pair):
    hf, ours = pair
    ids = torch.randint(0, 64, (2, 16))
    h = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.gen_head(h), hf.model.generation_head(h), **TOL)
        want = hf.model.generation_aligner(hf.model.generation_embeddings(ids))
        torch.testing.assert_close(ours.prepare_gen_img_embeds(ids), want, **TOL)
        torch.testing.assert_close(ours.gen_vision_model.decode_code(ids), hf.model.vqmodel.decode(ids), **TOL)


def test_understanding_forward_end_to_end(pair):
    hf, ours = pair
    ids = torch.randint(20, 300, (1, 24))
    ids[0, 3:19] = IMAGE_TOKEN
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=x).logits
        embeds = ours.prepare_inputs_embeds(ids, x[:, None], ids == IMAGE_TOKEN, torch.ones(1, 1, 16, dtype=torch.bool))
        torch.testing.assert_close(ours.language_model(inputs_embeds=embeds).logits, want, **TOL)


def test_tied_embeddings_checkpoint(tmp_path):
    hf = transformers.JanusForConditionalGeneration(hf_config(tie=True)).eval()
    hf.save_pretrained(tmp_path)
    ours = JanusPro.from_pretrained(tmp_path, dtype=None, device="cpu")
    assert torch.equal(ours.language_model.lm_head.weight, hf.lm_head.weight)
