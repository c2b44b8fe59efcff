#!/usr/bin/env bash
# Set up janus_fast in the current Python environment: torch (the CPU wheel when none is
# installed; an existing CUDA torch is kept), the build tools that are missing, then the package
# with its test extras. The CUDA extension is built when torch has CUDA and nvcc is found.
# Installs nothing that is already there, so it also works offline on a prepared GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
python -c "import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))" \
  || missing+=("setuptools>=70.1")
python -c "import ninja" 2>/dev/null || missing+=(ninja)
python -c "import torch" 2>/dev/null || missing+=(torch==2.13.0)
if [ ${#missing[@]} -gt 0 ]; then
  python -m pip install -q "${missing[@]}"
fi
if ! python -m pip install -q --no-build-isolation -e ".[test]"; then
  echo "setup: the test extras could not be installed (offline?); installing janus_fast alone"
  python -m pip install -q --no-build-isolation --no-deps -e .
fi
python -c "import janus_fast; b = janus_fast.backends(); print('janus_fast:', {k: b[k] for k in ('torch', 'triton', 'cuda_extension', 'device')})"
