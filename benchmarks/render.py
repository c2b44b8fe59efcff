"""Merge benchmark JSON-lines files (`python -m janus_fast.bench --out DIR` writes DIR/<family>.jsonl)
into one markdown report:

- a summary: for each headline workload (a cell with a target), our best contender against the
  best peer as a speed-up (peer time / our time) and against the target;
- one table per family, a row per case, a column per contender, a footnote with the reason for
  every skipped or failed cell;
- the runs: device, versions, commit, dirty flag, command;
- a PNG chart per family next to the output (TFLOP/s, or time on a log scale), or one for all
  with --one-chart, when matplotlib is installed.

    python benchmarks/render.py results/*.jsonl          # -> results/RESULTS.md (and charts) beside them

When a cell appears in several lines (re-runs), the latest timed line wins, else the latest line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from janus_fast.checkpoint import atomic_write, atomic_write_text

OURS_PREFIX = "janus_fast"
METRICS = {  # field: unit
    "tflops": "TFLOP/s",
    "gbps": "GB/s",
    "images_per_s": "img/s",
    "tokens_per_s": "tok/s",
    "ms_per_step": "ms/step",
    "mfu": "MFU",
    "peak_gib": "GiB peak",
    "peak_extra_gib": "GiB peak beyond weights",
    "launches_per_layer_per_step": "launches/layer/step",
    "launches_per_step": "launches/step",
    "peak_extra_mib": "MiB extra",
}
HIGHER_IS_BETTER = {"tflops", "gbps", "images_per_s", "tokens_per_s", "mfu"}


def read_lines(paths) -> list[dict]:
    lines = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    lines.append(json.loads(text))
                except json.JSONDecodeError:  # a line cut by a kill: keep the rest
                    print(f"render: {path}:{n}: unreadable line skipped", file=sys.stderr)
    return lines


def merge(lines: list[dict]) -> dict:
    """{table: {(case, label): line}}: the latest ok line of each cell, else the latest line."""
    tables: dict[str, dict] = {}
    for line in lines:
        cells = tables.setdefault(line.get("table") or line.get("family", "?"), {})
        key = (line.get("case", "?"), line.get("label", "?"))
        if line.get("status") == "ok" or cells.get(key, {}).get("status") != "ok":
            cells[key] = line
    return tables


def ordered(items):
    return list(dict.fromkeys(items))


def metric(line: dict, name: str) -> float | None:
    """A cell's value of `name`; kernel_us / call_us derive from the ms fields."""
    if name in ("kernel_us", "call_us"):
        ms = line.get(name[:-3] + "_ms")
        return None if ms is None else ms * 1000
    if name == "seconds":
        return line["kernel_ms"] / 1000
    return line.get(name)


def num(x: float) -> str:
    """Three significant figures, without an exponent in the usual range."""
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 0.01 or x == 0:
        return f"{x:.3g}"
    return f"{x:.2e}"


def fmt_time(ms: float) -> str:
    if ms < 1:
        return f"{num(ms * 1000)} µs"
    if ms < 1000:
        return f"{num(ms)} ms"
    return f"{num(ms / 1000)} s"


def cell_text(line: dict, notes: dict[str, int]) -> str:
    """A cell's text; a skipped or failed cell refers to its reason's number in `notes`."""
    if line.get("status") != "ok":
        number = notes.setdefault(line.get("reason") or "no reason recorded", len(notes) + 1)
        return f"{line.get('status', '?')} [{number}]"
    parts = [fmt_time(line["kernel_ms"])]
    if "failed" in line.get("kernel_timing", ""):  # e.g. a graph capture that fell back to eager calls
        parts[0] += f" [{notes.setdefault(line['kernel_timing'], len(notes) + 1)}]"
    for name, unit in METRICS.items():
        value = line.get(name)
        if isinstance(value, (int, float)) and value == value:  # NaN: not measured here
            parts.append(f"{num(value)} {unit}")
    if line.get("call_ms") is not None:
        parts.append(f"call {fmt_time(line['call_ms'])}")
    return " · ".join(parts)


def is_cpu(line: dict) -> bool:
    return line.get("context", {}).get("device", "cpu") == "cpu"


def is_ours(label: str) -> bool:
    return label.startswith(OURS_PREFIX)


def summary_rows(tables: dict) -> list[str]:
    rows = []
    for table, cells in tables.items():
        for case in ordered(c for c, _ in cells):
            row = {label: line for (c, label), line in cells.items() if c == case}
            targets = [line["target"] for line in row.values() if line.get("target")]
            if not targets:
                continue
            target = targets[0]
            ok = {label: line for label, line in row.items() if line.get("status") == "ok"}
            ours = {label: line for label, line in ok.items() if is_ours(label)}
            peers = {label: line for label, line in ok.items() if not is_ours(label)}
            best_ours = min(ours.items(), key=lambda kv: kv[1]["kernel_ms"], default=None)
            best_peer = min(peers.items(), key=lambda kv: kv[1]["kernel_ms"], default=None)
            speedup = "—"
            if best_ours and best_peer and (is_cpu(best_ours[1]) or is_cpu(best_peer[1])):
                speedup = "not judged (CPU)"
            elif best_ours and best_peer:
                speedup = f"{num(best_peer[1]['kernel_ms'] / best_ours[1]['kernel_ms'])}×"
            name = target["metric"]
            bound = target.get("at_least", target.get("at_most"))
            unit = {"kernel_us": "µs", "call_us": "µs (call)", "seconds": "s"}.get(name, METRICS.get(name, name))
            goal = target.get("note", "—") if bound is None else \
                f"{'≥' if 'at_least' in target else '≤'} {num(bound)} {unit}"
            verdict = "—"
            values = [metric(line, name) for line in ours.values() if metric(line, name) is not None]
            if values:
                value = max(values) if "at_least" in target or name in HIGHER_IS_BETTER else min(values)
                if any(is_cpu(line) for line in ours.values()):
                    verdict = f"{num(value)} {unit}: not judged (CPU)"
                elif bound is None:
                    verdict = f"{num(value)} {unit}: judge against the note"
                else:
                    met = value >= bound if "at_least" in target else value <= bound
                    verdict = f"{num(value)} {unit}: {'met' if met else 'missed'}"
            named = [f"{best[0]} {fmt_time(best[1]['kernel_ms'])}" if best else "—" for best in (best_ours, best_peer)]
            rows.append(f"| {table} | {case} | {named[0]} | {named[1]} | {speedup} | {goal} | {verdict} |")
    return rows


def family_table(table: str, cells: dict, chart: str | None) -> list[str]:
    cases = ordered(c for c, _ in cells)
    labels = ordered(label for _, label in cells)
    labels = [x for x in labels if is_ours(x)] + [x for x in labels if not is_ours(x)]
    devices = ordered(line.get("context", {}).get("device", "?") for line in cells.values())
    out = [f"## {table}", "", f"Device: {', '.join(devices)}.", ""]
    out += ["| case | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    notes: dict[str, int] = {}
    for case in cases:
        texts = [cell_text(cells[(case, label)], notes) if (case, label) in cells else "" for label in labels]
        out.append(f"| {case} | " + " | ".join(texts) + " |")
    out.append("")
    timings = ordered(line["kernel_timing"] for line in cells.values() if line.get("kernel_timing"))
    if timings:
        out += ["First figure of a cell, the one the speed-ups use: " + "; ".join(timings) + ".", ""]
    if notes:
        out += [f"{number}. {reason}" for reason, number in notes.items()] + [""]
    if chart:
        out += [f"![{table}]({chart})", ""]
    return out


def runs_table(lines: list[dict]) -> list[str]:
    keys = ("device", "torch", "triton", "cuda", "commit", "dirty", "date", "command")
    runs = ordered((line.get("family", "?"), *(str(line.get("context", {}).get(k, "?")) for k in keys))
               for line in lines)
    out = ["## Runs", "", "| family | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    out += ["| " + " | ".join(f"`{v}`" if i == len(keys) else v for i, v in enumerate(run)) + " |" for run in runs]
    return out + [""]


MEANING = """## What the numbers mean

- **Kernel time** (the first figure of a cell, and the speed-ups): the median of single calls
  with L2 flushed before each, timed by CUDA events; a CUDA-graph replay where the note says so
  (the kernels alone, as a captured engine step runs them).
- **call**: a tight loop of real eager calls timed by CUDA events, Python wrapper, checks and
  dispatch included: what a model pays per call. Given for µs-scale ops.
- Throughputs derive from the kernel time. Generation cells are seconds per batch (median over
  runs), with ms per decode step, images/s and peak memory.
- pytest-benchmark's own statistics (its terminal table and JSON) time a few host-clocked calls,
  each followed by a device sync: they are not these numbers.

To reproduce: `python -m janus_fast.bench --family FAMILY --out DIR` per family (the command in
Runs), then `python benchmarks/render.py DIR/*.jsonl` (writes DIR/RESULTS.md).
"""


def _bars(ax, ok: dict, value, ylabel: str, log: bool) -> None:
    cases = ordered(c for c, _ in ok)
    labels = ordered(label for _, label in ok)
    labels = [x for x in labels if is_ours(x)] + [x for x in labels if not is_ours(x)]
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        points = [(j + i * width, value(ok[(case, label)])) for j, case in enumerate(cases) if (case, label) in ok]
        ax.bar([x for x, _ in points], [y for _, y in points], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def _panels(cells: dict) -> list:
    """(cells, value, y label, log scale) of a table's chart panels: TFLOP/s for the cases that
    have it, kernel time (log scale) for the other timed cases."""
    ok = {key: line for key, line in cells.items() if line.get("status") == "ok"}
    flops_cases = {c for (c, _), line in ok.items() if line.get("tflops") is not None}
    return [(p, v, y, log) for p, v, y, log in (
        ({k: x for k, x in ok.items() if k[0] in flops_cases}, lambda x: x["tflops"], "TFLOP/s (higher is better)",
         False),
        ({k: x for k, x in ok.items() if k[0] not in flops_cases}, lambda x: x["kernel_ms"] * 1000,
         "time, µs (the first figure of a cell; log, lower is better)", True)) if p]


def _draw(fig, table: str, panels: list) -> None:
    widths = [max(4.0, 0.35 * len(p)) for p, *_ in panels]
    axes = fig.subplots(1, len(panels), width_ratios=widths, squeeze=False)
    for ax, (part, value, ylabel, log) in zip(axes[0], panels):
        _bars(ax, part, value, ylabel, log)
    devices = ", ".join(ordered(line.get("context", {}).get("device", "?") for p, *_ in panels for line in p.values()))
    fig.suptitle(f"{table}: {devices}" + (" (CPU: harness check, not kernel speed)" if devices == "cpu" else ""))


def make_chart(tables: dict, path: Path) -> bool:
    """Bar charts of the tables' timed cells, ours beside the peers, one row per table, in one
    PNG. False when matplotlib is missing or nothing was timed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [(table, panels) for table, cells in tables.items() if (panels := _panels(cells))]
    if not rows:
        return False
    width = max(sum(max(4.0, 0.35 * len(p)) for p, *_ in panels) for _, panels in rows) + 1
    try:  # (an older matplotlib may lack subfigures: the report is written without the chart)
        fig = plt.figure(figsize=(width, 4.8 * len(rows)), layout="constrained")
        for sub, (table, panels) in zip(fig.subfigures(len(rows), 1, squeeze=False)[:, 0], rows):
            _draw(sub, table, panels)
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    except (TypeError, AttributeError, ValueError) as e:
        print(f"render: no chart {path.name}: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    finally:
        plt.close("all")
    return True


def render(lines: list[dict], chart_dir: Path | None = None, chart_stem: str = "RESULTS",
           one_chart: bool = False) -> str:
    """The report; with chart_dir, a PNG per table (<stem>-<table>.png) or, with one_chart, one
    for all tables (<stem>.png) beside it."""
    tables = merge(lines)
    out = ["# Benchmark results", ""]
    if any(is_cpu(line) for line in lines):
        out += ["> **CPU results** (tiny shapes, host clock) are a check that the benchmarks run end to end. "
                "They say nothing about kernel speed: no speed-up is computed from them, and targets are not "
                "judged on them.", ""]
    if not any(line.get("context", {}).get("device", "n/a") not in ("cpu", "n/a") for line in lines):
        out += ["> **No GPU result** is in these files: the suite is unmeasured on a GPU.", ""]
    rows = summary_rows(tables)
    if rows:
        out += ["## Summary: ours against the best peer", "",
                "Targets are the issues' H100 targets (an H200 is measured against them as is).", "",
                "| family | workload | ours (best) | best peer | speed-up | H100 target | ours vs target |",
                "|---|---|---|---|---|---|---|", *rows, ""]
    if chart_dir is not None and one_chart and make_chart(tables, chart_dir / f"{chart_stem}.png"):
        out += [f"![every table]({chart_stem}.png)", ""]
    for table, cells in tables.items():
        chart = None
        if chart_dir is not None and not one_chart:
            path = chart_dir / f"{chart_stem}-{table}.png"
            chart = path.name if make_chart({table: cells}, path) else None
        out += family_table(table, cells, chart)
    out += runs_table(lines)
    out.append(MEANING)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/render.py", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="JSON-lines files from python -m janus_fast.bench")
    parser.add_argument("-o", "--output", help="markdown file to write (charts beside it; - for stdout); default: "
                                               "RESULTS.md beside the first file")
    parser.add_argument("--one-chart", action="store_true", help="one PNG for every table (<output stem>.png)")
    args = parser.parse_args(argv)
    lines = read_lines(args.files)
    if args.output == "-":
        print(render(lines))
        return 0
    output = Path(args.output) if args.output else Path(args.files[0]).parent / "RESULTS.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, render(lines, chart_dir=output.parent, chart_stem=output.stem,
                                     one_chart=args.one_chart))
    print(f"render: {len(lines)} lines from {len(args.files)} files -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
