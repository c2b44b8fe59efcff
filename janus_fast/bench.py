"""`python -m janus_fast.bench`: run benchmark families, one JSON line per finished case.

    python -m janus_fast.bench --family attention --out bench-results        # one family
    python -m janus_fast.bench --family vq --out bench-results -k lookup    # -k and pytest args pass through
    python -m janus_fast.bench --out bench-results                          # every family, one after another
    python benchmarks/render.py bench-results/*.jsonl -o benchmarks/RESULTS.md

Each family is a pytest-benchmark file, benchmarks/bench_<family>.py, run by path in a pytest
subprocess, so this package never imports the benchmarks folder. Cells are appended to
OUT/<family>.jsonl as each case finishes, so a run stopped by a timeout keeps what finished; a
family's remaining cases skip with a reason once its --budget is spent, so one family fits one
10-minute GPU call. Without CUDA the families run tiny shapes timed by the host clock (--tiny is
then the default): that checks the benchmarks run, not how fast anything is.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("attention", "flex", "vq", "sampling", "generation", "generation_sjd", "training")  # benchmarks/bench_<family>.py
DEFAULT_BUDGET_S = 480  # of a 10-minute call: the rest is start-up, imports and a last case begun in time (<= ~60 s)


def _missing_line(family: str, path: Path, command: str) -> dict:
    return {"family": family, "table": family, "case": "(family)", "label": "(all)", "status": "skipped",
            "reason": f"{path.relative_to(REPO)} does not exist in this checkout",
            "context": {"device": "n/a", "command": command,
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}


def run_families(families: list[str], out_dir: Path, pytest_args: list[str], *, tiny: bool, budget_s: float,
                 command: str) -> int:
    """Run the families' benchmark files in one pytest subprocess; 0 unless pytest failed.
    A family whose file is missing gets one skipped line saying so."""
    paths = []
    for family in families:
        path = REPO / "benchmarks" / f"bench_{family}.py"
        if path.is_file():
            paths.append(str(path))
            continue
        print(f"janus_fast.bench: {family}: skipped, {path} does not exist in this checkout")
        with open(out_dir / f"{family}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(_missing_line(family, path, command)) + "\n")
    if not paths:
        return 0
    env = dict(os.environ, JANUS_FAST_BENCH_OUT=str(out_dir.resolve()), JANUS_FAST_BENCH_TINY="1" if tiny else "0",
               JANUS_FAST_BENCH_BUDGET=str(budget_s), JANUS_FAST_BENCH_COMMAND=command)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if tiny:
        env.setdefault("TRITON_INTERPRET", "1")
    code = subprocess.call([sys.executable, "-m", "pytest", *paths, "-q", "-rsfE", "-p", "no:cacheprovider",
                            *pytest_args], cwd=REPO, env=env)
    print(f"janus_fast.bench: pytest exit {code}; cells in {out_dir}/<family>.jsonl")
    return 0 if code in (0, 5) else code  # 5: every case deselected by -k


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m janus_fast.bench", description=__doc__.splitlines()[0],
                                     epilog="Any other argument (-k EXPR, -x, ...) goes to pytest.",
                                     allow_abbrev=False)
    parser.add_argument("--family", action="append", choices=FAMILIES,
                        help="family to run (repeatable); default: all of them, one after another")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                        help="directory that receives <family>.jsonl (appended; default benchmarks/results)")
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                        help="tiny shapes (default: on without CUDA, off with it)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds per family, from its first case, after which its remaining cases skip "
                             f"(default {DEFAULT_BUDGET_S})")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    raw = sys.argv[1:] if argv is None else argv
    args, pytest_args = parse(raw)
    cuda = torch.cuda.is_available()
    tiny = (not cuda) if args.tiny is None else args.tiny
    if not cuda:
        print("janus_fast.bench: no CUDA GPU here, so the families run tiny shapes timed by the host clock. "
              "That shows the benchmarks run end to end; it says nothing about kernel speed.")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "janus_fast.bench", *raw])
    return run_families(args.family or list(FAMILIES), out_dir, pytest_args, tiny=tiny, budget_s=args.budget,
                        command=command)


if __name__ == "__main__":
    sys.exit(main())
