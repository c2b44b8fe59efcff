"""`python -m janus_fast.bench`: run benchmark families, one JSON line per finished case.

    python -m janus_fast.bench --family attention --out bench-results        # one family
    python -m janus_fast.bench --family vq --out bench-results -k lookup    # -k and pytest args pass through
    python -m janus_fast.bench --out bench-results                          # every family, one after another
    python benchmarks/render.py bench-results/*.jsonl                       # -> bench-results/RESULTS.md

Each family is a pytest-benchmark file, benchmarks/bench_<family>.py, run by path in a pytest
subprocess, so this package never imports the benchmarks folder. Cells are appended to
OUT/<family>.jsonl as each case finishes, so a run stopped by a timeout keeps what finished; a
family's remaining cases skip with a reason once its --budget is spent, so one family fits one
10-minute GPU call. Without CUDA the families run tiny shapes timed by the host clock (--tiny is
then the default): that checks the benchmarks run, not how fast anything is.

It exits non-zero, saying why, when our own contenders cannot run: before the run when Triton is
unusable or (with CUDA) janus_fast._C is not built, and after it when no case of ours was timed
in a family that has one (--allow-missing-ours runs the peers alone anyway).
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
WITHOUT_OURS = ("flex",)  # families with no contender of ours (flex lands in the attention table)
OURS_PREFIX = "janus_fast"  # the label of every contender of ours
DEFAULT_BUDGET_S = 480  # of a 10-minute call: the rest is start-up, imports and a last case begun in time (<= ~60 s)


def _missing_line(family: str, path: Path, command: str) -> dict:
    return {"family": family, "table": family, "case": "(family)", "label": "(all)", "status": "skipped",
            "reason": f"{path.relative_to(REPO)} does not exist in this checkout",
            "context": {"device": "n/a", "command": command,
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}


def ours_unusable(cuda: bool) -> str | None:
    """Why our contenders cannot run here (None if they can): Triton missing or unusable, or,
    with CUDA, janus_fast._C not built."""
    import janus_fast

    info = janus_fast.backends()
    if info["triton"] is None:
        return "triton is not installed, so janus_fast's Triton kernels cannot run (pip install triton)"
    if cuda and info["triton_interpreter"]:
        return "TRITON_INTERPRET=1 is set on a machine with CUDA: the Triton kernels would run in the interpreter"
    if cuda and not info["cuda_extension"]:
        return (f"{info['cuda_extension_error']}: build it with `JANUS_FAST_BUILD_CUDA=1 pip install "
                "--no-build-isolation -e .` (or `bash scripts/gpu_check.sh build`)")
    return None


def _new_lines(files: dict[Path, int]) -> list[dict]:
    """The JSON lines appended to each file since it had `files[path]` bytes."""
    lines = []
    for path, start in files.items():
        if not path.exists():
            continue
        with open(path, "rb") as f:
            f.seek(start)
            for text in f.read().decode("utf-8", "replace").splitlines():
                try:
                    lines.append(json.loads(text))
                except json.JSONDecodeError:
                    continue
    return lines


def ours_missing(families: list[str], lines: list[dict]) -> list[str]:
    """Families (with a contender of ours, and cases run) in which no case of ours was timed,
    each with the reasons its cells of ours give."""
    missing = []
    for family in families:
        mine = [x for x in lines if x.get("family") == family]
        if family in WITHOUT_OURS or not mine or any(x.get("status") == "ok" and str(x.get("label", "")).startswith(
                OURS_PREFIX) for x in mine):
            continue
        if all("time budget" in str(x.get("reason", "")) or "does not exist" in str(x.get("reason", ""))
               for x in mine if x.get("status") != "ok"):
            continue  # nothing of ours was reached, which is not a failure of ours
        reasons = sorted({str(x.get("reason")) for x in mine
                          if str(x.get("label", "")).startswith(OURS_PREFIX) and x.get("reason")})
        missing.append(f"{family}: " + ("; ".join(reasons)[:600] or "no case of ours ran"))
    return missing


def run_families(families: list[str], out_dir: Path, pytest_args: list[str], *, tiny: bool, budget_s: float,
                 command: str, jsonl: Path | None = None) -> int:
    """Run the families' benchmark files in one pytest subprocess; 0 unless pytest failed.
    A family whose file is missing gets one skipped line saying so. Lines go to
    OUT/<family>.jsonl, or all to `jsonl`."""
    paths = []
    for family in families:
        path = REPO / "benchmarks" / f"bench_{family}.py"
        if path.is_file():
            paths.append(str(path))
            continue
        print(f"janus_fast.bench: {family}: skipped, {path} does not exist in this checkout")
        with open(jsonl or out_dir / f"{family}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(_missing_line(family, path, command)) + "\n")
    if not paths:
        return 0
    env = dict(os.environ, JANUS_FAST_BENCH_OUT=str(out_dir.resolve()), JANUS_FAST_BENCH_TINY="1" if tiny else "0",
               JANUS_FAST_BENCH_BUDGET=str(budget_s), JANUS_FAST_BENCH_COMMAND=command)
    if jsonl is not None:
        env["JANUS_FAST_BENCH_FILE"] = str(jsonl.resolve())
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
    parser.add_argument("--jsonl", default=None, metavar="FILE",
                        help="append every family's lines to FILE instead of OUT/<family>.jsonl")
    parser.add_argument("--allow-missing-ours", action="store_true",
                        help="run (and exit 0) even when janus_fast's own contenders cannot run here")
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
    families = args.family or list(FAMILIES)
    reason = None if all(f in WITHOUT_OURS for f in families) else ours_unusable(cuda)
    if reason and not args.allow_missing_ours:
        print(f"janus_fast.bench: error: janus_fast's own contenders cannot run here: {reason}. "
              "(--allow-missing-ours benchmarks the peers alone.)", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = Path(args.jsonl) if args.jsonl else None
    if jsonl is not None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
    files = [jsonl] if jsonl else [out_dir / f"{f}.jsonl" for f in families]
    before = {path: path.stat().st_size if path.exists() else 0 for path in files}
    command = shlex.join(["python", "-m", "janus_fast.bench", *raw])
    code = run_families(families, out_dir, pytest_args, tiny=tiny, budget_s=args.budget, command=command,
                        jsonl=jsonl)
    missing = ours_missing(families, _new_lines(before))
    if missing and not args.allow_missing_ours:
        print("janus_fast.bench: error: no case of janus_fast's own was timed in " + " | ".join(missing),
              file=sys.stderr)
        return code or 3
    return code


if __name__ == "__main__":
    sys.exit(main())
