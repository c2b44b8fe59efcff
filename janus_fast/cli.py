"""The `janus-fast` command: generate images, chat about an image, or run a self-contained demo.

  janus-fast demo                     random-weight model -> real checkpoint -> load -> generate + answer
  janus-fast generate --model DIR --prompt TEXT [--n 16 --cfg 5 --seed 0] --out DIR
  janus-fast chat --model DIR --image FILE "question"
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


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


def _load(args):
    from .engine import JanusPro

    device = _device(args.device)
    t = time.perf_counter()
    model = JanusPro.from_pretrained(args.model, dtype=_dtype(args.dtype, device), device=device)
    if model.processor is None:
        raise SystemExit(f"error: {args.model} has no tokenizer.json; a release directory holds it beside the weights")
    print(f"loaded {args.model} on {device} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return model


def cmd_generate(args) -> None:
    model = _load(args)
    t = time.perf_counter()
    images = model.generate_images(args.prompt, parallel_size=args.n, cfg_weight=args.cfg,
                                   temperature=args.temperature, seed=args.seed, progress=ProgressBar("generating"))
    dt = time.perf_counter() - t
    grid = save_images(images, Path(args.out))
    print(f"{len(images)} images in {dt:.1f}s ({len(images) / dt:.2f} images/s); wrote {args.out}/img_*.png and {grid}")


def cmd_chat(args) -> None:
    model = _load(args)
    print(model.answer(args.image, args.question, max_new_tokens=args.max_new_tokens))


def cmd_demo(args) -> None:
    from .engine import JanusPro
    from .models.random_model import build_random_checkpoint

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    out = Path(args.out)
    n = args.n or (16 if device.startswith("cuda") else 4)
    print("janus-fast demo: RANDOM weights, so the images are noise and the answer is gibberish.\n"
          "It shows the whole path (build, save a real checkpoint, load, generate, answer) and its speed.\n"
          "For real output point the other commands at a Janus-Pro release directory, e.g.\n"
          "  janus-fast generate --model /path/to/Janus-Pro-1B --prompt 'a red fox in snow' --out out/\n"
          "  janus-fast chat --model /path/to/Janus-Pro-1B --image photo.jpg 'What is in this image?'\n")
    with tempfile.TemporaryDirectory(prefix="janus-fast-demo-") as tmp:
        ckpt = Path(tmp) / "janus-pro-random"
        t = time.perf_counter()
        config = build_random_checkpoint(ckpt, "1b" if device.startswith("cuda") else "tiny", device, dtype)
        size = "1B" if config.language.hidden_size == 2048 else "tiny"
        print(f"[1/4] built a random {size} Janus-Pro on {device} ({dtype}) and saved it to {ckpt} "
              f"in {time.perf_counter() - t:.1f}s")
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="janus-fast", description="Janus-Pro image generation and understanding.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model: bool = True):
        if model:
            sp.add_argument("--model", required=True, help="Janus-Pro release directory (config.json, weights, tokenizer)")
        sp.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
        sp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")

    g = sub.add_parser("generate", help="text -> images (PNGs and a grid)")
    common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--n", type=int, default=16, help="images per prompt (parallel_size)")
    g.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance weight")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="output directory")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="image + question -> answer")
    common(c)
    c.add_argument("--image", required=True)
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("question")
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("demo", help="random-weight end-to-end demo (no download)")
    common(d, model=False)
    d.add_argument("--out", default="janus-fast-demo", help="where the image grid goes")
    d.add_argument("--prompt", default="A close-up photo of a red fox in fresh snow.")
    d.add_argument("--n", type=int, default=None, help="images (default: 16 on a GPU, 4 on the CPU)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
