"""JanusProcessor: a drop-in for the official VLChatProcessor (tokenizer, SFT template, image-tag
expansion, image preprocessing, left-padded batches), on `tokenizers` + PIL + numpy."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _token_text(value):
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


# Modes PIL's convert("RGB") would clip rather than scale, with their factor to 0..255.
# 16-bit files open as I;16* (or I in older Pillow); float images are taken to lie in [0, 1].
_HIGH_DEPTH_SCALE = {"I;16": 255 / 65535, "I;16L": 255 / 65535, "I;16B": 255 / 65535, "I;16N": 255 / 65535,
                     "I": 255 / 65535, "F": 255.0}


def to_rgb8(image):
    """An 8-bit RGB copy of a PIL image of any mode: 16-bit and 32-bit integer greyscale scaled
    from 0..65535, float greyscale from [0, 1] (values outside clipped), palette images through
    their palette (transparent entries keep their colour, as for RGBA, whose alpha is dropped as
    the official loader does), everything else by PIL's conversion."""
    from PIL import Image

    scale = _HIGH_DEPTH_SCALE.get(image.mode)
    if scale is not None:
        gray = np.asarray(image, dtype=np.float64) * scale
        gray = np.clip(np.nan_to_num(gray, nan=0.0), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # a palette with transparency would warn going to RGB directly
    return image.convert("RGB")


def _read_image(source, name: str):
    from PIL import Image

    try:
        with Image.open(source) as im:
            return to_rgb8(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read {name} as an image: {e}") from None


def load_image(image):
    """An 8-bit RGB PIL image (see to_rgb8) from a PIL image, a path, or a base64
    "data:image/...;base64," string (as the official loader takes); a source that cannot be read
    as an image raises a ValueError naming it."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return to_rgb8(image)
    if isinstance(image, str) and image.startswith("data:image"):
        import base64
        import binascii
        import io

        try:
            data = base64.b64decode(image.split(",", 1)[-1], validate=True)
        except binascii.Error as e:
            raise ValueError(f"a data:image string that is not valid base64: {e}") from None
        return _read_image(io.BytesIO(data), "the data:image string")
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file {image} not found")
        return _read_image(image, f"image file {image}")
    raise TypeError(f"an image must be a PIL.Image, a path or a data:image string, got {type(image).__name__}")


def load_pil_images(conversations) -> list:
    """The images named in each turn's "images" list, as RGB PIL images (the official helper)."""
    return [load_image(x) for message in conversations for x in message.get("images", [])]


class JanusTokenizer:
    """The parts of the HF tokenizer the official scripts use, over a `tokenizers.Tokenizer`:
    encode() prepends BOS (as LlamaTokenizerFast does), decode(), and the special token ids."""

    def __init__(self, tokenizer, bos_token: str = BOS, eos_token: str = EOS, pad_token: str | None = PAD,
                 add_bos_token: bool = True):
        self._tok = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.add_bos_token = add_bos_token
        for name in ("bos_token", "eos_token"):
            if self.token_to_id(getattr(self, name)) is None:
                raise ValueError(f"the tokenizer has no {name} {getattr(self, name)!r}")

    @classmethod
    def from_pretrained(cls, path) -> "JanusTokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (the processor needs the release's tokenizer.json)")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{file} is not a valid tokenizers file: {e}") from None
        cfg = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
        return cls(tok, bos_token=_token_text(cfg.get("bos_token")) or BOS,
                   eos_token=_token_text(cfg.get("eos_token")) or EOS,
                   pad_token=_token_text(cfg.get("pad_token")) or PAD,
                   add_bos_token=cfg.get("add_bos_token", True))

    def save_pretrained(self, path) -> None:
        path = Path(path)
        self._tok.save(str(path / "tokenizer.json"))
        special = dict(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token)
        (path / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False, indent=2))
        config = dict(special, add_bos_token=self.add_bos_token, tokenizer_class="LlamaTokenizerFast")
        (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.token_to_id(token)

    @property
    def bos_token_id(self) -> int:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Special tokens are added here rather than by the file's post-processor, so BOS comes
        # exactly once whatever the tokenizer.json says.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id] + ids if add_special_tokens and self.add_bos_token else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@dataclass
class VLChatProcessorOutput:
    sft_format: str
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    num_image_tokens: list[int]

    def __len__(self):
        return len(self.input_ids)


@dataclass
class BatchedVLChatProcessorOutput:
    sft_format: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    images_seq_mask: torch.Tensor
    images_emb_mask: torch.Tensor
    _fields: tuple = field(default=("sft_format", "input_ids", "attention_mask", "pixel_values",
                                    "images_seq_mask", "images_emb_mask"), repr=False)

    def keys(self):
        return self._fields

    def __getitem__(self, key):
        return getattr(self, key)

    def to(self, device, dtype=torch.bfloat16):
        for name in ("input_ids", "attention_mask", "images_seq_mask", "images_emb_mask"):
            setattr(self, name, getattr(self, name).to(device))
        self.pixel_values = self.pixel_values.to(device=device, dtype=dtype)
        return self


class JanusProcessor:
    image_tag = "<image_placeholder>"
    image_start_tag = "<begin_of_image>"
    image_end_tag = "<end_of_image>"
    pad_tag = PAD
    roles = ("<|User|>", "<|Assistant|>")

    def __init__(self, tokenizer: JanusTokenizer, image_size: int = 384, num_image_tokens: int = 576,
                 min_size: int = 14, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                 rescale_factor: float = 1.0 / 255.0, do_normalize: bool = True, sft_format: str = "deepseek",
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, image_tag: str | None = None):
        if sft_format != "deepseek":
            raise ValueError(f"sft_format {sft_format!r} is not supported (Janus-Pro uses 'deepseek')")
        self.tokenizer = tokenizer
        self.image_size, self.num_image_tokens, self.min_size = image_size, num_image_tokens, min_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.rescale_factor, self.do_normalize = rescale_factor, do_normalize
        self.background_color = tuple(int(x * 255) for x in self.image_mean)
        self.sft_format, self.system_prompt = sft_format, system_prompt
        if image_tag is not None:
            self.image_tag = image_tag
        for tag in (self.image_tag, self.image_start_tag, self.image_end_tag):
            if tokenizer.token_to_id(tag) is None:
                raise ValueError(f"the tokenizer has no token {tag!r} (Janus needs it as a special token)")
        if self.pad_id is None:
            raise ValueError(f"the tokenizer has no pad token ({tokenizer.pad_token!r} or {PAD!r})")

    # ------------------------------------------------------------------ files
    @staticmethod
    def has_tokenizer(path) -> bool:
        return (Path(path) / "tokenizer.json").is_file()

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "JanusProcessor":
        from .checkpoint import finish_interrupted_save

        path = Path(path)
        finish_interrupted_save(path)  # a save killed mid-publish may have replaced some files only
        pre = _read_json(path / "preprocessor_config.json")
        proc = _read_json(path / "processor_config.json")
        kwargs = {k: pre[k] for k in ("image_size", "min_size", "image_mean", "image_std", "rescale_factor",
                                      "do_normalize") if k in pre}
        kwargs.update({k: proc[k] for k in ("num_image_tokens", "sft_format", "image_tag") if k in proc})
        kwargs.update(overrides)
        return cls(JanusTokenizer.from_pretrained(path), **kwargs)

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        pre = dict(image_processor_type="VLMImageProcessor", processor_class="VLChatProcessor",
                   image_size=self.image_size, min_size=self.min_size, image_mean=list(self.image_mean),
                   image_std=list(self.image_std), rescale_factor=self.rescale_factor,
                   do_normalize=self.do_normalize, background_color=list(self.background_color))
        (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        proc = dict(processor_class="VLChatProcessor", image_tag=self.image_tag, num_image_tokens=self.num_image_tokens,
                    sft_format=self.sft_format, add_special_token=False, ignore_id=-100, mask_prompt=True)
        (path / "processor_config.json").write_text(json.dumps(proc, indent=2))

    # ------------------------------------------------------------------ ids
    @property
    def image_id(self) -> int:
        return self.tokenizer.token_to_id(self.image_tag)

    @property
    def image_start_id(self) -> int:
        return self.tokenizer.token_to_id(self.image_start_tag)

    @property
    def image_end_id(self) -> int:
        return self.tokenizer.token_to_id(self.image_end_tag)

    @property
    def pad_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.token_to_id(PAD)

    # ------------------------------------------------------------------ text
    def apply_sft_template_for_multi_turn_prompts(self, conversations, sft_format: str = "deepseek",
                                                  system_prompt: str = "") -> str:
        """The "deepseek" template: [system + "\\n\\n"] then each turn as role + ": " + text
        (stripped), followed by "\\n\\n" after even turns (user) and EOS after odd ones
        (assistant); an empty turn renders as role + ":". The result is stripped."""
        if sft_format != "deepseek":
            raise ValueError(f"sft_format {sft_format!r} is not supported (Janus-Pro uses 'deepseek')")
        seps = ("\n\n", self.tokenizer.eos_token)
        out = system_prompt + seps[0] if system_prompt else ""
        for i, message in enumerate(conversations):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"conversation turn {i} must be a dict with 'role' and 'content', got {message!r}")
            text = message["content"].strip()
            out += f"{message['role']}: {text}{seps[i % 2]}" if text else f"{message['role']}:"
        return out.strip()

    def _expand_image_tokens(self, ids: list[int]) -> tuple[list[int], int]:
        """Each <image_placeholder> id -> <begin_of_image>, num_image_tokens placeholders, <end_of_image>."""
        out, n = [], 0
        for t in ids:
            if t == self.image_id:
                out += [self.image_start_id] + [self.image_id] * self.num_image_tokens + [self.image_end_id]
                n += 1
            else:
                out.append(t)
        return out, n

    # ------------------------------------------------------------------ images
    def _resize_pad(self, image) -> np.ndarray:
        """Longer side to image_size (bicubic, antialiased; shorter side >= min_size), centred on
        a square canvas of the mean colour -> uint8 [S, S, 3]."""
        from PIL import Image

        image = load_image(image)
        w, h = image.size
        longest = max(w, h)
        size = (max(int(w / longest * self.image_size), self.min_size),
                max(int(h / longest * self.image_size), self.min_size))
        image = image.resize(size, Image.BICUBIC)
        w, h = image.size
        if w != h:
            side = max(w, h)
            canvas = Image.new(image.mode, (side, side), self.background_color)
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image = canvas
        return np.asarray(image)

    def preprocess_images(self, images) -> torch.Tensor:
        """PIL images or paths -> float32 [n, 3, S, S], normalised (x/255 - mean) / std."""
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        arrays = []
        for image in images:
            x = self._resize_pad(image).astype(np.float32) * np.float32(self.rescale_factor)
            if self.do_normalize:
                x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
            arrays.append(x.transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays))

    # ------------------------------------------------------------------ processing
    def process_one(self, prompt: str | None = None, conversations=None, images=None) -> VLChatProcessorOutput:
        if (prompt is None) == (conversations is None):
            raise ValueError("pass exactly one of prompt and conversations")
        sft = prompt if prompt is not None else self.apply_sft_template_for_multi_turn_prompts(
            conversations, self.sft_format, self.system_prompt)
        images = list(images or [])
        ids, n_tags = self._expand_image_tokens(self.tokenizer.encode(sft))
        if n_tags != len(images):
            raise ValueError(f"the text has {n_tags} {self.image_tag} tag(s) but {len(images)} image(s) were given")
        return VLChatProcessorOutput(sft, torch.tensor(ids, dtype=torch.long), self.preprocess_images(images),
                                     [self.num_image_tokens] * len(images))

    def __call__(self, prompt: str | None = None, conversations=None, images=None, force_batchify: bool = True,
                 **kwargs):
        one = self.process_one(prompt=prompt, conversations=conversations, images=images)
        return self.batchify([one]) if force_batchify else one

    def batchify(self, prepare_list: list[VLChatProcessorOutput]) -> BatchedVLChatProcessorOutput:
        """Left-padded batch: pads are pad_id with attention_mask 0; pixel_values [b, n_max, 3, S, S]
        (n_max >= 1) zero-filled past each sample's images; images_emb_mask marks real image tokens."""
        b = len(prepare_list)
        longest = max(len(p) for p in prepare_list)
        n_max = max(1, max(len(p.num_image_tokens) for p in prepare_list))
        s = self.image_size
        input_ids = torch.full((b, longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(b, longest, dtype=torch.long)
        pixel_values = torch.zeros(b, n_max, 3, s, s)
        images_seq_mask = torch.zeros(b, longest, dtype=torch.bool)
        images_emb_mask = torch.zeros(b, n_max, self.num_image_tokens, dtype=torch.bool)
        for i, p in enumerate(prepare_list):
            n = len(p)
            input_ids[i, longest - n:] = p.input_ids
            attention_mask[i, longest - n:] = 1
            images_seq_mask[i, longest - n:] = p.input_ids == self.image_id
            for j, count in enumerate(p.num_image_tokens):
                pixel_values[i, j] = p.pixel_values[j]
                images_emb_mask[i, j, :count] = True
        return BatchedVLChatProcessorOutput([p.sft_format for p in prepare_list], input_ids, attention_mask,
                                            pixel_values, images_seq_mask, images_emb_mask)


TOY_SPECIAL_TOKENS = (BOS, EOS, PAD, JanusProcessor.image_tag, JanusProcessor.image_start_tag,
                      JanusProcessor.image_end_tag, *JanusProcessor.roles)


def toy_tokenizer() -> JanusTokenizer:
    """A byte-level tokenizer with no merges (256 byte tokens) plus the Janus special tokens:
    any text round-trips. For tests and the random-weight demo, not for real checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(TOY_SPECIAL_TOKENS))
    return JanusTokenizer(tok)
