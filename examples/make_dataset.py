"""Write a small multi-task training set for `janus-fast train`: text, understanding (image +
question -> answer) and text-to-image samples, with the images drawn here (coloured shapes), so
nothing is downloaded.

    python examples/make_dataset.py examples/data            # then
    python -m janus_fast.cli train --config examples/train_tiny.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from janus_fast.checkpoint import atomic_write_text

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")


def draw(shape: str, colour: str, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(image)
    m = rng.randint(size // 8, size // 4)
    box = (m, m, size - m, size - m)
    fill = COLOURS[colour]
    if shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "circle":
        d.ellipse(box, fill=fill)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    return image


def make_dataset(out_dir, n_text: int = 8, n_understanding: int = 8, n_generation: int = 8, image_size: int = 64,
                 seed: int = 0) -> Path:
    """Images under out_dir/images and out_dir/train.jsonl (written atomically); returns the JSONL path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n_text):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        if i % 2:
            lines.append({"type": "text", "text": f"The sum of {a} and {b} is {a + b}."})
        else:
            lines.append({"type": "text", "conversation": [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    for kind, count in (("understanding", n_understanding), ("generation", n_generation)):
        for i in range(count):
            shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
            name = f"images/{kind}_{i:03d}.png"
            draw(shape, colour, image_size, rng).save(out / name)
            if kind == "understanding":
                lines.append({"type": kind, "image": name, "question": "What is in the image?",
                              "answer": f"A {colour} {shape}."})
            else:
                lines.append({"type": kind, "prompt": f"A {colour} {shape} on a white background.", "image": name})
    rng.shuffle(lines)
    return atomic_write_text(out / "train.jsonl", "".join(json.dumps(x) + "\n" for x in lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default=str(Path(__file__).parent / "data"))
    p.add_argument("--n", type=int, default=8, help="samples of each kind")
    p.add_argument("--image-size", type=int, default=64, help="64 for the tiny model, 384 for Janus-Pro")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = make_dataset(args.out_dir, args.n, args.n, args.n, args.image_size, args.seed)
    print(f"wrote {path} ({3 * args.n} samples) and its images")


if __name__ == "__main__":
    main()
