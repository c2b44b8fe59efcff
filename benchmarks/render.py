"""Render a pytest-benchmark JSON file as markdown tables: one table per benchmark group, a row
per case (shape), a column per contender, each cell the GPU median and its throughput.

    python benchmarks/render.py results.json > table.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

METRICS = ("tflops", "gbps", "tokens_per_s", "images_per_s")
UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tok/s", "images_per_s": "img/s"}


def cell(info: dict) -> str:
    text = f"{info['median_ms'] * 1000:.1f} µs" if info["median_ms"] < 1 else f"{info['median_ms']:.3f} ms"
    for metric in METRICS:
        if metric in info:
            text += f" · {info[metric]:.1f} {UNITS[metric]}"
    return text


def render(data: dict) -> str:
    tables: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    columns: dict[str, list[str]] = defaultdict(list)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "median_ms" not in info:
            continue
        group = bench.get("group") or bench["name"].split("[")[0]
        tables[group][info["case"]][info["label"]] = cell(info)
        if info["label"] not in columns[group]:
            columns[group].append(info["label"])
    first = next((b["extra_info"] for b in data["benchmarks"] if "device" in b.get("extra_info", {})), {})
    lines = [f"Device: {first.get('device', '?')} · torch {first.get('torch', '?')} · "
             f"triton {first.get('triton', '?')} · CUDA {first.get('cuda', '?')} · commit {first.get('commit', '?')}", ""]
    for group, rows in tables.items():
        cols = columns[group]
        lines += [f"### {group}", "", "| case | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {case} | " + " | ".join(row.get(c, "—") for c in cols) + " |" for case, row in rows.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python benchmarks/render.py RESULTS.json")
    with open(argv[0], encoding="utf-8") as f:
        print(render(json.load(f)))


if __name__ == "__main__":
    main()
