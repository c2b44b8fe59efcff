#!/usr/bin/env bash
# Set up janus_fast: the interpreter, torch, the build tools that are missing, then the package
# with its test extras. The CUDA extension is built when torch has CUDA and nvcc is found.
#
# The interpreter: the active virtual environment if there is one; else ./.venv if an earlier
# run made it; else `python3` (or `python`). When that interpreter is externally managed (PEP
# 668, e.g. Debian's system python3, where pip refuses to install), ./.venv is made with it and
# used; `. scripts/activate.sh` then puts .venv's `python` and `janus-fast` on the PATH.
#
# torch, when missing: torch==2.13.0, the CUDA build (PyPI's default wheel) when nvidia-smi
# finds a GPU, else the CPU build (torch's CPU wheel index as an extra index, so its "+cpu" wheel
# wins over PyPI's CUDA one and PyPI still serves the dependencies). An installed torch is kept.
# Nothing already installed is installed again, so it also works offline on a prepared machine.
#
#   bash scripts/setup.sh            set up
#   bash scripts/setup.sh --dry-run  print the decisions and the commands, change nothing
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: bash scripts/setup.sh [--dry-run]" >&2; exit 2 ;;
esac

say() { echo "setup: $*"; }
run() {  # a command that changes the machine: printed, and run unless --dry-run
  echo "setup: \$ $*"
  if [ "$dry_run" = 0 ]; then "$@"; fi
}

# ---------------------------------------------------------------- the interpreter
. scripts/interpreter.sh
if ! pick_python; then
  echo "setup: no python3 found; install Python 3.10 or newer (Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if [ "$py_origin" = "the PATH" ]; then
  # "venv": inside a virtual environment; "managed": PEP 668 forbids pip here; else "plain".
  kind="$("$py" -c 'import os, sys, sysconfig
if sys.prefix != sys.base_prefix: print("venv")
elif os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")): print("managed")
else: print("plain")')"
  if [ "$kind" = managed ]; then
    say "$py is externally managed (PEP 668): making ./.venv with it and installing there"
    if ! run "$py" -m venv .venv; then
      echo "setup: '$py -m venv' failed; install the venv module (Debian/Ubuntu: apt-get install python3-venv)" >&2
      exit 1
    fi
    py=.venv/bin/python
  else
    say "using $py from the PATH ($kind)"
  fi
else
  say "using $py: $py_origin"
fi
say "interpreter: $py"

# ---------------------------------------------------------------- what is missing
has() { [ "$dry_run" = 1 ] && [ ! -x "$py" ] && return 1; "$py" -c "$1" 2>/dev/null; }
missing=()
has "import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))" \
  || missing+=("setuptools>=70.1")
has "import ninja" || missing+=(ninja)
if [ ${#missing[@]} -gt 0 ]; then
  run "$py" -m pip install -q "${missing[@]}"
fi
if has "import torch"; then
  say "keeping the installed torch: $("$py" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  say "installing torch $TORCH_VERSION, CUDA build (a GPU was found)"
  run "$py" -m pip install -q "torch==$TORCH_VERSION"
else
  say "installing torch $TORCH_VERSION, CPU build (no GPU found)"
  run "$py" -m pip install -q "torch==$TORCH_VERSION" --extra-index-url "$TORCH_CPU_INDEX"
fi

# ---------------------------------------------------------------- janus_fast
if [ "$dry_run" = 1 ]; then
  run "$py" -m pip install -q --no-build-isolation -e ".[test]"
  exit 0
fi
if ! "$py" -m pip install -q --no-build-isolation -e ".[test]"; then
  say "the test extras could not be installed (offline?); installing janus_fast alone"
  "$py" -m pip install -q --no-build-isolation --no-deps -e .
fi
"$py" -c "import janus_fast; b = janus_fast.backends(); print('janus_fast:', {k: b[k] for k in ('torch', 'triton', 'cuda_extension', 'device')})"
if [ "$py" = .venv/bin/python ] && [ "${VIRTUAL_ENV:-}" != "$PWD/.venv" ]; then
  say "installed into ./.venv: run '. scripts/activate.sh' to put its python and janus-fast on the PATH"
fi
