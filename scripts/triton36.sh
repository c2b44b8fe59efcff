#!/usr/bin/env bash
# Run a command with Triton 3.6 (the GPU machine's version: torch 2.11 pins it) in place of the
# installed Triton, so compile facts and interpreter results can be checked on both versions:
# triton==3.6.0 and numpy<2.4 (3.6's interpreter needs it) are installed once into .triton36/
# (or $TRITON36_DIR) with the project's interpreter and put first on PYTHONPATH.
#
#   bash scripts/triton36.sh python -m pytest tests/test_compile_facts.py -q
#   bash scripts/triton36.sh --dry-run python -c 'import triton'   print, change nothing
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
[ $# -gt 0 ] || { echo "usage: bash scripts/triton36.sh [--dry-run] COMMAND [ARGS...]" >&2; exit 2; }
. scripts/interpreter.sh
if ! pick_python; then
  echo "triton36: no python found; run scripts/setup.sh first" >&2
  exit 1
fi
dir="${TRITON36_DIR:-.triton36}"
if [ "$dry_run" = 1 ]; then
  echo "triton36: \$ $py -m pip install -q --target $dir triton==3.6.0 numpy<2.4"
  echo "triton36: \$ PYTHONPATH=$dir $*"
  exit 0
fi
if ! PYTHONPATH="$dir" "$py" -c 'import sys, triton; sys.exit(triton.__version__ != "3.6.0")' 2>/dev/null; then
  echo "triton36: installing triton==3.6.0 and numpy<2.4 into $dir"
  rm -rf "$dir"
  "$py" -m pip install -q --target "$dir" "triton==3.6.0" "numpy<2.4"
fi
PATH="$(dirname "$py"):$PATH" PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" exec "$@"
