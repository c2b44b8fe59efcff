"""`python -m janus_fast.bench`: the kernel benchmark table, peers side by side.

With a CUDA GPU it runs the pytest-benchmark suites in benchmarks/ (the real shapes), saves the
JSON under benchmarks/results/ and prints the markdown table. Without one it says so and times
tiny shapes on the CPU — the reference backend against the torch peers — which shows the
harness works, not how fast the kernels are.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import ops, peers

REPO = Path(__file__).resolve().parent.parent


def run_gpu_suites(extra: list[str]) -> int:
    bench_dir = REPO / "benchmarks"
    if not bench_dir.is_dir():
        sys.exit(f"janus_fast.bench: {bench_dir} not found; run from a source checkout (pip install -e .)")
    out_dir = bench_dir / "results"
    out_dir.mkdir(exist_ok=True)
    name = torch.cuda.get_device_name().replace(" ", "_")
    out = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    code = subprocess.call([sys.executable, "-m", "pytest", str(bench_dir), "-q", "--benchmark-only",
                            f"--benchmark-json={out}", *extra], cwd=REPO)
    if out.exists():
        sys.path.insert(0, str(REPO))
        from benchmarks.render import main as render

        render([str(out)])
        print(f"\nresults: {out}")
    return code


def cpu_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def cpu_cases():
    """(op, case, {contender: fn}) at tiny shapes."""
    q, k, v = (torch.randn(2, 128, h, 64) for h in (8, 8, 8))
    z, codebook = torch.randn(576, 8), torch.randn(16384, 8)
    ids = torch.randint(0, 16384, (576,))
    logits = torch.randn(8, 16384)
    return [
        ("flash_attention", "B2 H8 S128 D64 causal", {
            "janus_fast (reference)": lambda: ops.flash_attention(q, k, v, causal=True),
            "torch sdpa": lambda: peers.sdpa(q, k, v, causal=True)}),
        ("vq_quantize", "576 latents x 16384 codes, D 8", {
            "janus_fast (reference)": lambda: ops.vq_quantize(z, codebook),
            "torch distance + argmin": lambda: peers.torch_vq_quantize(z, codebook)}),
        ("vq_lookup", "1 x 576 ids -> [1, 8, 24, 24]", {
            "janus_fast (reference)": lambda: ops.vq_lookup(ids, codebook, shape=(1, 8, 24, 24)),
            "torch embedding + permute": lambda: peers.torch_vq_lookup(ids, codebook, (1, 8, 24, 24))}),
        ("cfg_sample", "logits [8, 16384]", {
            "janus_fast (reference)": lambda: ops.cfg_sample(logits, cfg_weight=5.0),
            "official softmax + multinomial": lambda: peers.official_cfg_sample(logits, 5.0)}),
    ]


def run_cpu_table() -> int:
    print("janus_fast.bench: no CUDA GPU here, so this times tiny shapes on the CPU with the reference "
          "backend against the torch peers. These numbers say nothing about kernel speed; run on an "
          "NVIDIA GPU for the real table (benchmarks/RESULTS.md).\n")
    print("| op | case | contender | CPU median |")
    print("|---|---|---|---|")
    for op, case, contenders in cpu_cases():
        for name, fn in contenders.items():
            print(f"| {op} | {case} | {name} | {cpu_ms(fn):.3f} ms |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m janus_fast.bench", description=__doc__.splitlines()[0])
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments for the GPU suites (e.g. -k vq)")
    args = parser.parse_args(argv)
    print("janus_fast backends:", ops.backends())
    if torch.cuda.is_available():
        return run_gpu_suites(args.pytest_args)
    return run_cpu_table()


if __name__ == "__main__":
    sys.exit(main())
