"""Step compression of speculative Jacobi decoding on a trained tiny model: trains the tiny random
Janus-Pro with `janus-fast train` on the example shapes dataset (or resumes / reuses the run),
then counts the model forward passes per image of token-by-token decoding and of SJD, on the
trained weights and on random ones, and prints the table.

    python examples/sjd_compression.py /tmp/sjd-tiny              # train (~1000 steps), measure
    python examples/sjd_compression.py /tmp/sjd-tiny --steps 0    # measure the run as it is
    python examples/sjd_compression.py /tmp/sjd-tiny128 --image-size 128   # 8 x 8 = 64-token images

Forward passes per image: token by token, the prefill and one decode step per token after the
first (N = 16 for the tiny model's 4 x 4 images); SJD, the prefill and its verification passes
(ops.sjd_verify counts them per image). Tokens per pass: (N - 1) / verification passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

from janus_fast import JanusPro
from janus_fast.checkpoint import atomic_write_text
from janus_fast.engine import ImageSettings, generate_image_tokens_sjd
from janus_fast.engine.step import Buckets
from janus_fast.models.random_model import random_config
from janus_fast.processor import JanusProcessor, toy_tokenizer
from janus_fast.training.checkpoints import latest_checkpoint

HERE = Path(__file__).resolve().parent
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle")
TRAIN = {"steps": 1000, "lr": 0.002, "warmup_steps": 5, "save_every": 100, "mixed_precision": "fp32",
         "activation_checkpointing": False, "progress": False}


def tiny_model(image_size: int, seed: int = 0) -> JanusPro:
    """The random tiny model (random_model("tiny")) on image_size-pixel images (generated and
    understood: training tokenizes its targets at the processor's size): 64 is the stock one
    (4 x 4 tokens), 128 gives 8 x 8."""
    config = random_config("tiny")
    config = dataclasses.replace(config, vq=dataclasses.replace(config.vq, image_size=image_size),
                                 vision=dataclasses.replace(config.vision, image_size=image_size))
    torch.manual_seed(seed)
    model = JanusPro(config).init_random_weights().eval()
    model.processor = JanusProcessor(toy_tokenizer(), image_size=config.vision.image_size,
                                     num_image_tokens=config.vision.num_tokens)
    return model


def train(run: Path, steps: int, image_size: int) -> Path:
    """The dataset (32 samples of each kind, image_size pixels) and `janus-fast train` from
    examples/train_tiny.json with TRAIN's overrides, from the random tiny model at that image size;
    resumes an unfinished run. -> the latest checkpoint."""
    data, start = run / "data", run / "random"
    if not (data / "train.jsonl").is_file():
        subprocess.run([sys.executable, str(HERE / "make_dataset.py"), str(data), "--n", "32", "--image-size",
                        str(image_size)], check=True)
    if not (start / "config.json").is_file():
        tiny_model(image_size).save_pretrained(start)
    config = json.loads((HERE / "train_tiny.json").read_text()) | TRAIN | {
        "model": str(start), "data": str(data / "train.jsonl"), "output_dir": str(run / "train"), "steps": steps}
    atomic_write_text(run / "train.json", json.dumps(config, indent=2))
    subprocess.run([sys.executable, "-m", "janus_fast.cli", "train", "--config", str(run / "train.json")], check=True)
    return latest_checkpoint(run / "train")


@torch.inference_mode()
def passes_per_image(model, window: int, temperature: float, images_per_prompt: int = 8) -> float:
    """Mean forward passes per image of SJD (the prefill + its verification passes) over the
    dataset's 12 prompts."""
    proc = model.processor
    ids = [model._generation_prompt_ids(proc, f"A {c} {s} on a white background.") for c in COLOURS for s in SHAPES]
    settings = ImageSettings(5.0, temperature, 0, 1.0)
    result = generate_image_tokens_sjd(model, ids, proc.pad_id, images_per_prompt, settings, list(range(len(ids))),
                                       Buckets(), window=window)
    return 1 + float(result.passes.double().mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="directory of the dataset, the training run and its checkpoints")
    p.add_argument("--steps", type=int, default=TRAIN["steps"], help="training steps (0: use the latest checkpoint)")
    p.add_argument("--image-size", type=int, default=64, help="image pixels (64: the tiny model's 4 x 4 tokens)")
    args = p.parse_args(argv)
    run = Path(args.run)
    checkpoint = train(run, args.steps, args.image_size) if args.steps else latest_checkpoint(run / "train")
    if checkpoint is None:
        raise SystemExit(f"no checkpoint under {run / 'train'}: train first (--steps > 0)")
    losses = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    recent = [r["image_loss"] for r in losses[-50:] if r["image_targets"]]
    models = {f"trained ({checkpoint.name}, image loss {sum(recent) / len(recent):.2f} over its last 50 steps)":
              JanusPro.from_pretrained(checkpoint, dtype=torch.float32, device="cpu"),
              "random weights (std 0.02)": tiny_model(args.image_size)}
    print("| weights | sampling | token by token | SJD W=4 | SJD W=16 | fewer passes (W=16) | tokens / pass (W=16) |")
    print("|---|---|---|---|---|---|---|")
    for name, model in models.items():
        n = model.config.vq.num_tokens
        for temperature in (1.0, 0.0):
            w4, w16 = (passes_per_image(model, w, temperature) for w in (4, 16))
            label = "T=1, cfg 5" if temperature else "greedy, cfg 5"
            print(f"| {name} | {label} | {n} | {w4:.2f} | {w16:.2f} | {n / w16:.2f}x | {(n - 1) / (w16 - 1):.2f} |")


if __name__ == "__main__":
    main()
