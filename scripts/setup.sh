#!/usr/bin/env bash
# Set up janus_fast in the current Python environment: torch (the CPU wheel when none is
# installed; an existing CUDA torch is kept), build tools, then the package with its test
# extras. The CUDA extension is built when torch has CUDA and nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade "pip>=23" "setuptools>=70" wheel ninja
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q --no-build-isolation -e ".[test]"
python -c "import janus_fast; b = janus_fast.backends(); print('janus_fast:', {k: b[k] for k in ('torch', 'triton', 'cuda_extension', 'device')})"
