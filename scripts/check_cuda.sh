#!/usr/bin/env bash
# Compile-check every CUDA kernel in csrc/ for sm_80 and sm_90 (kernels include CUDA headers
# only, so this needs nvcc, not a CUDA build of torch), and syntax-check the torch bindings
# against torch's headers. Skips with a message when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "check_cuda: nvcc not found; CUDA sources not compile-checked"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count=0
# The flags torch's BuildExtension adds (no implicit half/bf16 conversions), plus setup.py's.
nvcc_flags=(-O3 --use_fast_math -lineinfo --expt-relaxed-constexpr -Icsrc
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
while IFS= read -r -d '' cu; do
  "$NVCC" -c "$cu" -o "$out/$(basename "$cu").o" -std=c++17 "${nvcc_flags[@]}"
  count=$((count + 1))
done < <(find csrc -name '*.cu' -print0 | sort -z)
# nvcc may be a wrapper script: ask it where its own headers are
cuda_include=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
torch_includes=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
py_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# Bindings: C++17 (older torch builds with it) and C++20 (torch 2.13's BuildExtension does).
while IFS= read -r -d '' cpp; do
  for std in c++17 c++20; do
    g++ -std=$std -fsyntax-only -Wno-c++20-extensions -Icsrc -I"$cuda_include" $torch_includes -I"$py_include" "$cpp"
  done
  count=$((count + 1))
done < <(find csrc -name '*.cpp' -print0 | sort -z)
echo "check_cuda: $count CUDA/C++ sources compile for sm_80 and sm_90"
