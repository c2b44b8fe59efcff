"""JanusPro: a drop-in for the official MultiModalityCausalLM (same submodules, same state-dict
keys, same methods), plus `generate_images` and `answer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .. import ops
from . import arguments
from .config import JanusProConfig
from .llama import BadLogitsError, LlamaForCausalLM, first_bad_step
from .quant import check_quantize, quantize_linears, weight_formats
from .siglip import CLIPVisionTower, MlpProjector
from .vq import VQModel


DECODINGS = ("token", "sjd")  # token by token; speculative Jacobi decoding (on the engine)
DEFAULT_WINDOW = 16


def check_decoding(decoding, window, num_tokens: int, kv_cache_dtype: str | None = None) -> None:
    """ValueError/TypeError for an unknown decoding, an SJD window outside [1, num_tokens], or SJD
    with a quantized KV cache (its verify attention reads plain caches only)."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    if decoding == "token":
        return
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if not 1 <= window <= num_tokens:
        raise ValueError(f"window must be in [1, {num_tokens}] (the tokens of an image), got {window}")
    if kv_cache_dtype is not None:
        raise ValueError(f"decoding='sjd' does not take a quantized KV cache yet (kv_cache_dtype={kv_cache_dtype!r})")


def unconditional_prompt(ids: list[int], pad_id: int) -> list[int]:
    """The unconditional partner of a generation prompt, as the official script builds it: its
    first and last tokens around pads."""
    return ids[:1] + [pad_id] * max(len(ids) - 2, 0) + ids[1:][-1:]


def raise_bad_image_tokens(codes: torch.Tensor) -> None:
    """BadLogitsError naming the first image token (column of codes) the sampler marked -1."""
    bad = first_bad_step(codes)
    if bad is not None:
        raise BadLogitsError(f"the guided image logits held NaN or +inf (or nothing finite) at image token "
                             f"{bad} of {codes.shape[1]}: no token can be sampled; check the weights and cfg_weight")


class VisionHead(nn.Module):
    """`gen_head`: image-token logits from LLM hidden states (Linear, exact GELU, Linear)."""

    def __init__(self, n_embed: int, image_token_size: int):
        super().__init__()
        self.output_mlp_projector = nn.Linear(n_embed, n_embed)
        self.vision_activation = nn.GELU()
        self.vision_head = nn.Linear(n_embed, image_token_size)

    def forward(self, x):
        return self.vision_head(self.vision_activation(self.output_mlp_projector(x)))


@dataclass
class MultiTaskOutput:
    """The losses of a packed multi-task batch. `loss` is the mean over every target token, text
    and image ((text_loss_sum + image_loss_weight * image_loss_sum) / (n_text + n_image));
    text_loss / image_loss are the means of each kind (0 when a batch has none). The sums and
    counts let a caller normalise over several batches (gradient accumulation, data parallel)."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    text_loss_sum: torch.Tensor
    image_loss_sum: torch.Tensor
    num_text_targets: int
    num_image_targets: int


class JanusPro(nn.Module):
    """The model and the straightforward eager generation loops (a growing cache, one launch at a
    time). `janus_fast.JanusPro` is its engine-backed subclass (janus_fast.engine): the same
    model with static buffers and captured decode steps."""

    language_model_class = LlamaForCausalLM  # the engine's subclass decodes text on the engine

    def __init__(self, config: JanusProConfig):
        super().__init__()
        self.config = config
        h = config.language.hidden_size
        self.vision_model = CLIPVisionTower(config.vision)
        self.aligner = MlpProjector(config.vision.width, h)
        self.gen_vision_model = VQModel(config.vq)
        self.gen_aligner = MlpProjector(config.vq.codebook_dim, h)
        self.gen_head = VisionHead(h, config.vq.codebook_size)
        self.gen_embed = nn.Embedding(config.vq.codebook_size, config.vq.codebook_dim)
        self.language_model = self.language_model_class(config.language)
        self.processor = None  # a JanusProcessor, set by from_pretrained when the tokenizer is there

    @torch.no_grad()
    def init_random_weights(self, std: float = 0.02) -> "JanusPro":
        """Linear and embedding weights ~ N(0, std), biases 0 (the Llama/transformers init), so
        a random model of any depth keeps finite activations in bf16; convolutions and norms
        keep their PyTorch defaults. For demos and benchmarks: real weights come from
        from_pretrained."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
        return self

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = torch.bfloat16, device=None,
                        load_processor: bool = True, quantize: str | None = None,
                        kv_cache_dtype: str | None = None) -> "JanusPro":
        """Load an official release directory (or a transformers "janus" conversion). Weights go
        straight from the files (memory-mapped) to `device` (default: cuda if available) in
        `dtype` (None keeps the stored dtype); the processor is attached when the directory
        holds a tokenizer. `quantize` / `kv_cache_dtype` ("int8" / "fp8") quantize the loaded
        model (see `quantize`), checked before anything is read."""
        from ..checkpoint import load_model

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if quantize is not None:
            check_quantize(quantize, device)
        if kv_cache_dtype is not None:
            check_quantize(kv_cache_dtype, device, "kv_cache_dtype")
        model = load_model(cls, path, dtype=dtype, device=device)
        if quantize is not None or kv_cache_dtype is not None:
            model.quantize(quantize, kv_cache_dtype=kv_cache_dtype)
        if load_processor:
            from ..processor import JanusProcessor

            if JanusProcessor.has_tokenizer(path):
                model.processor = JanusProcessor.from_pretrained(path)
        return model

    def save_pretrained(self, path, max_shard_size: int | str = "5GB") -> None:
        """config.json + safetensors (sharded above max_shard_size), written atomically; the
        processor's files too when one is attached. A model with quantized weights is refused:
        the official layout has no place for them, and quantizing at load is quick and gives
        the same weights."""
        from ..checkpoint import save_model

        if weight_formats(self):
            raise ValueError("save_pretrained writes the official (unquantized) layout and this model's weights are "
                             "quantized: save the unquantized model and pass quantize= to from_pretrained instead")
        save_model(self, path, max_shard_size=max_shard_size)

    def quantize(self, weights: str | None = "int8", *, kv_cache_dtype: str | None = None) -> "JanusPro":
        """Quantize for inference, in place; returns the model.

        weights "int8" / "fp8" (e4m3): every Linear layer of the LLM (attention and MLP
        projections, lm_head) and of gen_head is stored in that format with one fp32 scale per
        output channel (models.quant.QuantizedLinear, run by ops.quantized_linear), layer by
        layer, so no second copy of the model is ever held; None leaves the weights as they are.
        kv_cache_dtype "int8" / "fp8": KV caches made from now on store each head of each token in
        that format with an fp32 scale; None keeps the current format. fp8 needs compute
        capability 8.9+ on CUDA. A quantized model generates and answers as before; it cannot be
        trained or saved."""
        if weights is not None:
            check_quantize(weights, self.device)
        if kv_cache_dtype is not None:
            check_quantize(kv_cache_dtype, self.device, "kv_cache_dtype")
        if weights is not None:
            current = weight_formats(self)
            if current - {weights}:
                raise ValueError(f"the weights are already quantized to {sorted(current)}; load the model again to "
                                 f"quantize it to {weights!r}")
            for part in (self.language_model, self.gen_head):
                quantize_linears(part, weights)
        if kv_cache_dtype is not None:
            self.language_model.model.kv_cache_dtype = kv_cache_dtype
        return self

    @property
    def device(self) -> torch.device:
        return self.gen_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gen_embed.weight.dtype

    # ------------------------------------------------------------------ official methods
    def prepare_inputs_embeds(self, input_ids, pixel_values, images_seq_mask, images_emb_mask, **kwargs):
        """Text embeddings with the image embeddings scattered in at the image positions.

        input_ids [b, T] (negative ids read as 0), pixel_values [b, n, 3, S, S],
        images_seq_mask [b, T] (where image tokens go), images_emb_mask [b, n, tokens_per_image]
        (which image tokens are real) -> [b, T, hidden]."""
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [batch, n_images, 3, H, W], got {tuple(pixel_values.shape)}")
        b, n = pixel_values.shape[:2]
        per_image = self.config.vision.num_tokens
        if tuple(images_emb_mask.shape) != (b, n, per_image):
            raise ValueError(f"images_emb_mask must be [{b}, {n}, {per_image}], got {tuple(images_emb_mask.shape)}")
        if tuple(images_seq_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"images_seq_mask {tuple(images_seq_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        n_slots, n_embeds = int(images_seq_mask.sum()), int(images_emb_mask.sum())
        if n_slots != n_embeds:
            raise ValueError(f"{n_slots} image positions in images_seq_mask but {n_embeds} image embeddings in "
                             f"images_emb_mask: the <image_placeholder> tokens do not match the images")
        emb = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        if n_slots:
            images = pixel_values.flatten(0, 1).to(self.aligner.layers[0].weight.dtype)
            image_embeds = self.aligner(self.vision_model(images)).reshape(b, n * per_image, -1)
            emb = emb.clone()
            emb[images_seq_mask.bool()] = image_embeds[images_emb_mask.reshape(b, -1).bool()].to(emb.dtype)
        return emb

    def prepare_gen_img_embeds(self, image_ids):
        # (cfg_sample's -1 of bad logits is never an embedding index: the loops report it)
        return self.gen_aligner(self.gen_embed(image_ids.clamp(min=0)))

    # ------------------------------------------------------------------ training
    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, *, text_positions=None,
                text_targets=None, image_positions=None, image_targets=None, gen_image_positions=None,
                gen_image_ids=None, pixel_values=None, und_image_positions=None,
                image_loss_weight: float = 1.0) -> MultiTaskOutput:
        """The losses of a packed batch (`model(**batch)`), everything flat over T packed tokens:

        input_ids [T] text ids (placeholders at image positions); position_ids [T] and
        cu_seqlens int32 [n + 1] / max_seqlen describe the sequences (see LlamaModel.forward_packed).
        Understanding images: pixel_values [n_img, 3, S, S], whose SigLIP + aligner embeddings go to
        und_image_positions [n_img * tokens_per_image]. Generation images: gen_image_ids [G] (VQ
        ids) embedded by gen_aligner(gen_embed(.)) at gen_image_positions [G]. Losses: the hidden
        state at text_positions [Nt] predicts text_targets [Nt] through lm_head, the one at
        image_positions [Ni] predicts image_targets [Ni] through gen_head; both with
        ops.linear_cross_entropy, so no [tokens, vocab] logits exist."""
        lm = self.language_model
        emb = lm.get_input_embeddings()(input_ids.clamp(min=0))
        # Every branch runs whenever its inputs are given, even when they are empty: each trained
        # parameter then gets a gradient (zero if unused) in every batch, which data-parallel
        # reductions need (FSDP reduces the same tensors on every rank), and shapes stay uniform.
        if gen_image_ids is not None:
            gen = self.prepare_gen_img_embeds(gen_image_ids)
            emb = emb.index_put((gen_image_positions,), gen.to(emb.dtype))
        if pixel_values is not None:
            und = self.aligner(self.vision_model(pixel_values.to(self.aligner.layers[0].weight.dtype)))
            emb = emb.index_put((und_image_positions,), und.flatten(0, 1).to(emb.dtype))
        hidden = lm.model.forward_packed(emb, position_ids, cu_seqlens, max_seqlen)
        zero = hidden.new_zeros((), dtype=torch.float32)
        text_sum, image_sum = zero, zero
        n_text = 0 if text_targets is None else text_targets.shape[0]
        n_image = 0 if image_targets is None else image_targets.shape[0]
        if text_targets is not None:
            text_sum = ops.linear_cross_entropy(hidden.index_select(0, text_positions), lm.lm_head.weight,
                                                text_targets, reduction="sum")
        if image_targets is not None:
            head = self.gen_head
            x = head.vision_activation(head.output_mlp_projector(hidden.index_select(0, image_positions)))
            image_sum = ops.linear_cross_entropy(x, head.vision_head.weight, image_targets, head.vision_head.bias,
                                                 reduction="sum")
        loss = (text_sum + image_loss_weight * image_sum) / max(n_text + n_image, 1)
        return MultiTaskOutput(loss, text_sum / max(n_text, 1), image_sum / max(n_image, 1), text_sum, image_sum,
                               n_text, n_image)

    # ------------------------------------------------------------------ high level
    def _processor(self, processor):
        proc = processor if processor is not None else self.processor
        if proc is None:
            raise ValueError("no processor: load the model with from_pretrained from a directory that holds "
                             "tokenizer.json, or pass processor=JanusProcessor.from_pretrained(...)")
        return proc

    def _generation_prompt_ids(self, proc, prompt: str) -> list[int]:
        conversation = [{"role": proc.roles[0], "content": prompt}, {"role": proc.roles[1], "content": ""}]
        text = proc.apply_sft_template_for_multi_turn_prompts(conversation, system_prompt="")
        return proc.tokenizer.encode(text + proc.image_start_tag)

    @torch.inference_mode()
    def generate_images(self, prompt: str | Sequence[str], parallel_size: int = 16, cfg_weight: float = 5.0,
                        temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                        seed: int | Sequence[int] | None = None, processor=None,
                        progress: Callable[[int, int], None] | None = None, decoding: str = "token",
                        window: int = DEFAULT_WINDOW) -> torch.Tensor:
        """Text -> images as the official generation script does, for one prompt or several
        (of any lengths) in one batch: uint8 [len(prompts) * parallel_size, S, S, 3] on the CPU,
        prompt by prompt. Classifier-free guidance pairs each prompt row with an unconditional
        row (the prompt's first and last tokens around pads, pads attended). `seed` (one for all
        prompts, or one per prompt) makes the result reproducible: a prompt's images depend on its
        text, seed and settings only, not on the other prompts of the batch. Seeds are ints in
        [0, 2**63); the prompt plus the image's tokens must fit the model's context
        (language_config.max_position_embeddings); the sampling arguments are checked as
        `models.arguments.sampling` states (cfg_weight >= 0, top_p in (0, 1]), all before anything
        is allocated. `progress(step, total)` is called after each image token. decoding="sjd"
        decodes by speculative Jacobi decoding with a window of `window` tokens
        (janus_fast.JanusPro, on the engine): fewer forward passes, the same distribution as token
        by token (janus_fast.ops.sjd_verify); the same seed gives the same images for the same
        settings and window."""
        check_decoding(decoding, window, self.config.vq.num_tokens, self.language_model.model.kv_cache_dtype)
        proc = self._processor(processor)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("need at least one prompt")
        parallel_size = arguments.parallel_size(parallel_size)
        cfg_weight, temperature, top_k, top_p = arguments.sampling(cfg_weight, temperature, top_k, top_p)
        seeds = arguments.request_seeds(seed, len(prompts))
        ids = [self._generation_prompt_ids(proc, text) for text in prompts]
        arguments.fits_context(max(len(i) for i in ids), self.config.vq.num_tokens,
                               self.config.language.max_position_embeddings, "an image takes")
        sjd = {} if decoding == "token" else {"decoding": decoding, "window": window}
        codes = self.generate_image_tokens(ids, proc.pad_id, parallel_size, cfg_weight, temperature, top_k, top_p,
                                           seeds, progress, **sjd)
        return self.decode_images(codes)

    def generate_image_tokens(self, prompts: list[list[int]], pad_id: int, parallel_size: int, cfg_weight: float,
                              temperature: float, top_k: int, top_p: float, seeds: list[int],
                              progress=None, decoding: str = "token", window: int = DEFAULT_WINDOW) -> torch.Tensor:
        """The image-token loop of `generate_images`, eager over a growing cache (the engine
        replaces it): prompt token ids -> codes [len(prompts) * parallel_size, num_tokens].
        Request r samples its rows in its own cfg_sample launch from the random state
        new_rng_state(seeds[r]), so its draws do not depend on the other requests. Token by
        token only: speculative Jacobi decoding needs the engine's static buffers."""
        if decoding != "token":
            raise ValueError(f"decoding={decoding!r} runs on the engine: use janus_fast.JanusPro "
                             f"({type(self).__name__} decodes token by token)")
        rows = []
        for ids in prompts:
            rows += [ids, unconditional_prompt(ids, pad_id)] * parallel_size
        lm = self.language_model
        device = self.device
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, longest - len(r):] = torch.tensor(r)
            mask[i, longest - len(r):] = 1
        ids, mask = ids.to(device), mask.to(device)
        n_images, n_tokens = len(rows) // 2, self.config.vq.num_tokens
        cache = lm.model.new_cache(len(rows), longest + n_tokens)
        h = lm.model(inputs_embeds=lm.get_input_embeddings()(ids), attention_mask=mask, past_key_values=cache,
                     use_cache=True).last_hidden_state[:, -1]
        rng_states = [ops.new_rng_state(s, device=device) for s in seeds]
        codes = torch.empty(n_images, n_tokens, dtype=torch.long, device=device)
        with ops.no_value_checks():
            for i in range(n_tokens):
                logits = self.gen_head(h).split(2 * parallel_size)
                drawn = [ops.cfg_sample(part, cfg_weight=cfg_weight, temperature=temperature, top_k=top_k,
                                        top_p=top_p, rng_state=state, return_ids=True)
                         for part, state in zip(logits, rng_states)]
                codes[:, i] = torch.cat([t for t, _ in drawn])
                if i + 1 < n_tokens:
                    pair_ids = torch.cat([p for _, p in drawn])
                    h = lm.model.decode_step(self.prepare_gen_img_embeds(pair_ids), cache)
                    cache.max_seqlen += 1
                if progress is not None:
                    progress(i + 1, n_tokens)
        raise_bad_image_tokens(codes)
        return codes

    @torch.inference_mode()
    def decode_images(self, codes: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Image token ids [N, grid*grid] -> uint8 [N, S, S, 3] on the CPU (clip((x+1)/2*255),
        truncated as the official script's uint8 assignment does)."""
        vq = self.config.vq
        out = []
        for chunk in codes.split(batch_size):
            x = self.gen_vision_model.decode_code(chunk, (chunk.shape[0], vq.codebook_dim, vq.grid, vq.grid))
            x = ((x.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
            out.append(x.permute(0, 2, 3, 1).cpu())
        return torch.cat(out)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list:
        """uint8 [N, H, W, 3] -> list of PIL images."""
        from PIL import Image

        return [Image.fromarray(img.numpy()) for img in images]

    @torch.inference_mode()
    def answer(self, image, question: str | Sequence[str], max_new_tokens: int = 512, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
               processor=None, progress: Callable[[int, int], None] | None = None) -> str | list[str]:
        """Image(s) + question -> the assistant's answer, as the official inference script does.
        `image` is a PIL image, a path, a list of those, or None for a text-only question. With a
        list of questions, `image` holds one such entry per question and the answers (a list)
        are decoded together in one left-padded batch. `progress(step, max_new_tokens)` is
        called as each new token is done."""
        from ..processor import load_image

        proc = self._processor(processor)
        max_new_tokens = arguments.max_new_tokens(max_new_tokens)
        _, temperature, _, top_p = arguments.sampling(None, temperature, None, top_p)
        seed = None if seed is None else arguments.seed_value(seed)
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        per_question = [image] if single else list(image if image is not None else [None] * len(questions))
        if not questions or len(per_question) != len(questions):
            raise ValueError(f"answer needs one image entry (an image, a list of images or None) per question: "
                             f"got {len(per_question)} for {len(questions)} questions")
        prepared = []
        for entry, text in zip(per_question, questions):
            images = [] if entry is None else [load_image(x) for x in (entry if isinstance(entry, (list, tuple)) else [entry])]
            content = "".join(f"{proc.image_tag}\n" for _ in images) + text
            conversation = [{"role": proc.roles[0], "content": content}, {"role": proc.roles[1], "content": ""}]
            prepared.append(proc.process_one(conversations=conversation, images=images))
        inputs = proc.batchify(prepared).to(self.device, self.dtype)
        arguments.fits_context(inputs.input_ids.shape[1], max_new_tokens, self.config.language.max_position_embeddings,
                               "the answer may take")
        embeds = self.prepare_inputs_embeds(**inputs)
        tok = proc.tokenizer
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        out = self.language_model.generate(inputs_embeds=embeds, attention_mask=inputs.attention_mask,
                                           pad_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                           eos_token_id=tok.eos_token_id, max_new_tokens=max_new_tokens,
                                           do_sample=do_sample, temperature=temperature, top_p=top_p,
                                           generator=generator, progress=progress)
        answers = [tok.decode(row, skip_special_tokens=True) for row in out.tolist()]
        return answers[0] if single else answers
