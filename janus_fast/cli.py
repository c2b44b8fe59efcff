"""The `janus-fast` command: generate images, chat about an image, or run a self-contained demo.

  janus-fast demo [--keep DIR]        random-weight model -> real checkpoint -> load -> generate + answer
  janus-fast generate --model DIR --prompt TEXT [--n 16 --cfg 5 --seed 0] --out DIR [--quantize int8 --decoding sjd]
  janus-fast chat --model DIR --image FILE "question" [--quantize int8 --kv-cache-dtype int8]
  janus-fast train --config FILE      packed multi-task training (under torchrun: FSDP2)

Arguments are checked before anything loads; an error the user can fix prints one line
(`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .models.janus_pro import DECODINGS, DEFAULT_WINDOW

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANT_FORMATS = ("int8", "fp8")  # janus_fast.ops.quant.FORMATS, without importing the ops here


class UsageError(Exception):
    """An error the user can fix from the command line: printed as one line."""


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (cuda, cuda:1, cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
    return name


def _dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:  # bf16 matmuls are slow on most CPUs
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


class ProgressBar:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width, self.start, self.last = label, width, time.perf_counter(), -1

    def __call__(self, step: int, total: int) -> None:
        filled = self.width * step // total
        if filled == self.last and step != total:
            return
        self.last = filled
        rate = step / max(time.perf_counter() - self.start, 1e-9)
        bar = "#" * filled + "-" * (self.width - filled)
        end = "\n" if step == total else ""
        print(f"\r{self.label} [{bar}] {step}/{total} tokens ({rate:.0f} steps/s)", end=end, file=sys.stderr, flush=True)


def image_grid(images: torch.Tensor, cols: int | None = None):
    """uint8 [N, H, W, 3] -> one PIL image, rows of `cols` (default about sqrt(N))."""
    from PIL import Image

    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return Image.fromarray(grid)


def save_images(images: torch.Tensor, out: Path, stem: str = "img") -> Path:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images.numpy()):
        Image.fromarray(img).save(out / f"{stem}_{i:03d}.png")
    grid = out / "grid.png"
    image_grid(images).save(grid)
    return grid


def check_model_dir(path: str) -> Path:
    """The release directory, checked (config parsed, weights and tokenizer present) before any
    weight is read."""
    from .checkpoint import read_config, weight_files

    model = Path(path)
    if not model.exists():
        raise UsageError(f"--model {model}: no such directory")
    if not model.is_dir():
        raise UsageError(f"--model {model} is a file; pass the release directory that holds config.json")
    if not (model / "config.json").is_file():
        raise UsageError(f"--model {model} has no config.json: not a Janus-Pro release directory")
    read_config(model)
    weight_files(model)
    if not (model / "tokenizer.json").is_file():
        raise UsageError(f"--model {model} has no tokenizer.json; a release directory holds it beside the weights")
    return model


def check_out_dir(path: str) -> Path:
    """The output directory, created now so that an unwritable one fails before generating."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; pass a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written: {e.strerror or e}") from None
    return out


def _load(args, model_dir: Path):
    from .engine import JanusPro

    device = _device(args.device)
    t = time.perf_counter()
    model = JanusPro.from_pretrained(model_dir, dtype=_dtype(args.dtype, device), device=device,
                                     quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype)
    quantized = "".join(f", {what} {fmt}" for what, fmt in (("weights", args.quantize),
                                                               ("KV cache", args.kv_cache_dtype)) if fmt)
    print(f"loaded {model_dir} on {device}{quantized} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return model


def check_fits(model_dir: Path, prompt: str, n: int, device: str, dtype: torch.dtype, quantize: str | None = None,
               kv_cache_dtype: str | None = None, decoding: str = "token", window: int = DEFAULT_WINDOW) -> None:
    """The quantization formats supported by the device, and a batch that fits the GPU's free
    memory at least one prompt at a time (the engine's memory plan on a meta-device model with
    the same formats and decoding): else an error before any weight is read."""
    from .checkpoint import read_config
    from .engine import JanusPro
    from .engine.memory import free_bytes, plan_requests, weight_bytes
    from .engine.sjd import image_generation_bytes
    from .models.quant import check_quantize
    from .processor import JanusProcessor

    for what, fmt in (("quantize", quantize), ("kv_cache_dtype", kv_cache_dtype)):
        if fmt is not None:
            check_quantize(fmt, torch.device(device), what)
    free = free_bytes(torch.device(device))
    if free is None:
        return
    with torch.device("meta"):
        model = JanusPro(read_config(model_dir)[0]).to(dtype).quantize(quantize, kv_cache_dtype=kv_cache_dtype)
    ids = model._generation_prompt_ids(JanusProcessor.from_pretrained(model_dir), prompt)
    try:
        plan_requests(1, 2 * n, image_generation_bytes(model, [ids], decoding, window), free - weight_bytes(model),
                      "--n")
    except ValueError as e:
        raise UsageError(f"--n {n} does not fit {device} beside the {weight_bytes(model) / 2**30:.1f} GiB of "
                         f"weights: {e}") from None


def cmd_generate(args) -> None:
    if args.decoding == "sjd" and args.kv_cache_dtype is not None:
        raise UsageError("--decoding sjd does not take a quantized KV cache yet: drop --kv-cache-dtype")
    model_dir, out = check_model_dir(args.model), check_out_dir(args.out)
    device = _device(args.device)
    check_fits(model_dir, args.prompt, args.n, device, _dtype(args.dtype, device), args.quantize, args.kv_cache_dtype,
               args.decoding, args.window)
    model = _load(args, model_dir)
    t = time.perf_counter()
    images = model.generate_images(args.prompt, parallel_size=args.n, cfg_weight=args.cfg,
                                   temperature=args.temperature, seed=args.seed, progress=ProgressBar("generating"),
                                   decoding=args.decoding, window=args.window)
    dt = time.perf_counter() - t
    grid = save_images(images, out)
    print(f"{len(images)} images in {dt:.1f}s ({len(images) / dt:.2f} images/s); wrote {out / 'img_*.png'} and {grid}")


def cmd_chat(args) -> None:
    from .processor import load_image

    model_dir = check_model_dir(args.model)
    image = load_image(args.image)
    _device(args.device)
    model = _load(args, model_dir)
    print(model.answer(image, args.question, max_new_tokens=args.max_new_tokens, progress=ProgressBar("answering")))


DEMO_MARK = "made-by-janus-fast-demo.txt"  # in a --keep directory: a later demo may replace it
DEMO_MARK_TEXT = ("This random-weight Janus-Pro checkpoint was made by `janus-fast demo --keep`; running that "
                  "command again on this directory replaces it.\n")


def cmd_demo(args) -> None:
    from .checkpoint import atomic_write_text
    from .engine import JanusPro
    from .models.random_model import build_random_checkpoint

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    out = check_out_dir(args.out)
    keep = Path(args.keep) if args.keep else None
    ours = keep is not None and (keep / DEMO_MARK).is_file()
    if keep is not None and keep.exists() and not ours and (not keep.is_dir() or any(keep.iterdir())):
        raise UsageError(f"--keep {keep} must be a new or empty directory, or one an earlier demo kept")
    n = args.n or (16 if device.startswith("cuda") else 4)
    print("janus-fast demo: RANDOM weights, so the images are noise and the answer is gibberish.\n"
          "It shows the whole path (build, save a real checkpoint, load, generate, answer) and its speed.\n"
          "For real output point the other commands at a Janus-Pro release directory, e.g.\n"
          "  janus-fast generate --model /path/to/Janus-Pro-1B --prompt 'a red fox in snow' --out out/\n"
          "  janus-fast chat --model /path/to/Janus-Pro-1B --image photo.jpg 'What is in this image?'\n")
    with tempfile.TemporaryDirectory(prefix="janus-fast-demo-") as tmp:
        ckpt = keep if keep is not None else Path(tmp) / "janus-pro-random"
        t = time.perf_counter()
        config = build_random_checkpoint(ckpt, "1b" if device.startswith("cuda") else "tiny", device, dtype)
        if keep is not None:
            atomic_write_text(keep / DEMO_MARK, DEMO_MARK_TEXT)
        size = "1B" if config.language.hidden_size == 2048 else "tiny"
        print(f"[1/4] built a random {size} Janus-Pro on {device} ({dtype}) and saved it to {ckpt}"
              f"{' (replacing the one an earlier demo kept there)' if ours else ''} in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        model = JanusPro.from_pretrained(ckpt, dtype=dtype, device=device)
        print(f"[2/4] loaded it back with JanusPro.from_pretrained in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    images = model.generate_images(args.prompt, parallel_size=n, seed=args.seed, progress=ProgressBar("[3/4] generating"))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    grid = save_images(images, out)
    side = images.shape[1]
    print(f"[3/4] {n} images of {side}x{side} ({config.vq.num_tokens} tokens each) in {dt:.1f}s "
          f"= {n / dt:.2f} images/s; grid: {grid}")
    t = time.perf_counter()
    reply = model.answer(model.to_pil(images[:1])[0], "What is in this image?", max_new_tokens=args.max_new_tokens)
    print(f"[4/4] answer in {time.perf_counter() - t:.1f}s: {reply!r}")
    print("done. Random weights: expect noise and gibberish, as announced.")
    if keep is None:
        print("(the checkpoint was temporary: `janus-fast demo --keep DIR` keeps it to try the commands below on)")
        return
    q = shlex.quote
    print(f"kept the random checkpoint in {keep}; try it with:\n"
          f"  janus-fast generate --model {q(str(keep))} --prompt 'a red fox in snow' --n 4 --out {q(str(out / 'more'))}\n"
          f"  janus-fast chat --model {q(str(keep))} --image {q(str(out / 'img_000.png'))} 'What is in this image?'")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _finite(minimum: float | None = None):
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number{f' >= {minimum}' if minimum is not None else ''}, "
                                             f"got {text}")
        return value
    parse.__name__ = "number"  # argparse names the type in its error
    return parse


def _seed(text: str) -> int:
    from .models.arguments import seed_value

    try:
        return seed_value(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if text.lstrip("+-").isdigit() else f"must be an int, got {text}")
_seed.__name__ = "seed"


def _out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "not enough memory" in str(e)))


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" where a default is a value (not for required options, flags, or
    None, whose meaning the help text states)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="janus-fast", description="Janus-Pro image generation and understanding.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str):
        sp = sub.add_parser(name, help=help, description=help, formatter_class=_DefaultsFormatter)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
        return sp

    def common(sp, model: bool = True):
        if model:
            sp.add_argument("--model", required=True, help="Janus-Pro release directory (config.json, weights, tokenizer)")
            sp.add_argument("--quantize", choices=sorted(QUANT_FORMATS), default=None,
                            help="store the LLM's and gen_head's weights in this format (one scale per output "
                                 "channel): half the bytes of bf16; fp8 needs an sm_89+ GPU")
            sp.add_argument("--kv-cache-dtype", choices=sorted(QUANT_FORMATS), default=None,
                            help="store the KV cache in this format (one scale per head and token): about half "
                                 "the memory of bf16; fp8 needs an sm_89+ GPU")
        sp.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
        sp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")

    g = command("generate", "text -> images (PNGs and a grid)")
    common(g)
    g.add_argument("--prompt", required=True, help="what to draw")
    g.add_argument("--n", type=_positive_int, default=16, help="images per prompt (parallel_size)")
    g.add_argument("--cfg", type=_finite(0.0), default=5.0,
                   help="classifier-free guidance weight (0: unconditional, 1: no guidance)")
    g.add_argument("--temperature", type=_finite(0.0), default=1.0, help="sampling temperature (0: argmax)")
    g.add_argument("--seed", type=_seed, default=0, help="random seed, an int in [0, 2**63)")
    g.add_argument("--out", required=True, help="output directory (created; img_NNN.png and grid.png)")
    g.add_argument("--decoding", choices=DECODINGS, default="token",
                   help="token by token, or speculative Jacobi decoding (fewer forward passes, the same distribution)")
    g.add_argument("--window", type=_positive_int, default=DEFAULT_WINDOW, help="tokens drafted per pass with --decoding sjd")
    g.set_defaults(func=cmd_generate)

    c = command("chat", "image + question -> answer")
    common(c)
    c.add_argument("--image", required=True, help="image file")
    c.add_argument("--max-new-tokens", type=_positive_int, default=512, help="longest answer, in tokens")
    c.add_argument("question", help="the question about the image")
    c.set_defaults(func=cmd_chat)

    d = command("demo", "random-weight end-to-end demo (no download)")
    common(d, model=False)
    d.add_argument("--out", default="janus-fast-demo", help="where the images and grid go")
    d.add_argument("--keep", default=None, metavar="DIR",
                   help="keep the random checkpoint in DIR (new, empty, or kept by an earlier demo, which is "
                        "replaced) to try generate and chat on")
    d.add_argument("--prompt", default="A close-up photo of a red fox in fresh snow.", help="what to draw")
    d.add_argument("--n", type=_positive_int, default=None, help="images (default: 16 on a GPU, 4 on the CPU)")
    d.add_argument("--seed", type=_seed, default=0, help="random seed, an int in [0, 2**63)")
    d.add_argument("--max-new-tokens", type=_positive_int, default=16, help="longest answer, in tokens")
    d.set_defaults(func=cmd_demo)

    from .training.command import add_train_command

    add_train_command(command)
    return p


def main(argv: list[str] | None = None) -> None:
    """Run a command. Errors the user can fix (bad paths, files, configs, out of memory) print
    one line and exit with status 2; anything else is a bug and shows its traceback."""
    from .checkpoint import CheckpointError

    args = parser().parse_args(argv)
    fixable = (UsageError, CheckpointError, OSError, ValueError, torch.OutOfMemoryError, MemoryError)
    try:
        args.func(args)
    except (*fixable, RuntimeError) as e:
        if args.debug or not (isinstance(e, fixable) or _out_of_memory(e)):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _out_of_memory(e):
            message = f"out of memory ({message}); try a smaller --n or --dtype bfloat16"
        print(f"janus-fast {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"janus-fast {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
