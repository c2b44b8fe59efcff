#!/usr/bin/env bash
# Compile-check every CUDA kernel in csrc/ for sm_80 and sm_90 (kernels include CUDA headers
# only, so this needs nvcc, not a CUDA build of torch), hold each kernel to its register budget
# with no spill (ptxas -v), and syntax-check the torch bindings against the headers of the torch
# janus_fast is installed with. Skips with a message when nvcc is absent, and the bindings' part
# when that interpreter has no torch.
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
# Register budgets per kernel (a substring of the mangled name), from the threads per block each
# launch uses and the blocks per SM it is meant to keep: 65536 / (threads x blocks).
budgets="cfg_sample_kernel 128
cfg_sample_split_kernel 128
lookup_kernel 64
prepare_kernel 128
quantize_kernel 128
quantize_mma_kernel 128
unpack_kernel 32"
# The flags torch's BuildExtension adds (no implicit half/bf16 conversions), plus setup.py's.
nvcc_flags=(-O3 --use_fast_math -lineinfo --expt-relaxed-constexpr -Icsrc -Xptxas -v
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
status=0
while IFS= read -r -d '' cu; do
  "$NVCC" -c "$cu" -o "$out/$(basename "$cu").o" -std=c++17 "${nvcc_flags[@]}" 2> "$out/ptxas.log" \
    || { cat "$out/ptxas.log"; exit 1; }
  # one line per kernel and architecture: name arch registers spill-store-bytes spill-load-bytes
  sed -n -e "s/.*Compiling entry function '\([^']*\)' for '\(sm_[0-9]*\)'.*/F \1 \2/p" \
         -e 's/.* \([0-9]*\) bytes spill stores, \([0-9]*\) bytes spill loads.*/S \1 \2/p' \
         -e 's/.*Used \([0-9]*\) registers.*/R \1/p' "$out/ptxas.log" |
    awk -v budgets="$budgets" -v file="$cu" '
      BEGIN { n = split(budgets, lines, "\n"); for (i = 1; i <= n; i++) { split(lines[i], f, " "); limit[f[1]] = f[2] } }
      $1 == "F" { name = $2; arch = $3; stores = 0; loads = 0 }
      $1 == "S" { stores = $2; loads = $3 }
      $1 == "R" {
        budget = 0
        for (k in limit) if (index(name, k)) { budget = limit[k]; short = k }
        if (!budget) { printf "check_cuda: %s: no register budget for %s\n", file, name; bad = 1; next }
        printf "check_cuda: %-18s %-6s %3d registers (budget %3d), spills %s/%s bytes\n", short, arch, $2, budget, stores, loads
        if ($2 > budget || stores > 0 || loads > 0) { print "check_cuda: FAIL: over budget or spilling: " name; bad = 1 }
      }
      END { exit bad }' || status=1
  count=$((count + 1))
done < <(find csrc -name '*.cu' -print0 | sort -z)
[ "$status" -eq 0 ] || { echo "check_cuda: a kernel spills or exceeds its register budget"; exit 1; }
echo "check_cuda: $count CUDA sources compile for sm_80 and sm_90, every kernel within its register budget, no spills"
# The bindings need torch's headers, from the interpreter janus_fast is installed in (the active
# virtual environment, ./.venv, python3 or python: scripts/interpreter.sh).
. scripts/interpreter.sh
skip="the bindings (csrc/**/*.cpp) are not syntax-checked against torch's headers"
if ! pick_python; then
  echo "check_cuda: no python found; $skip"
  exit 0
elif ! "$py" -c "import torch.utils.cpp_extension" 2>/dev/null; then
  echo "check_cuda: $py ($py_origin) has no torch; $skip"
  exit 0
fi
# nvcc may be a wrapper script: ask it where its own headers are
cuda_include=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
torch_includes=$("$py" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
py_include=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# Bindings: C++17 (older torch builds with it) and C++20 (torch 2.13's BuildExtension does).
bindings=0
while IFS= read -r -d '' cpp; do
  for std in c++17 c++20; do
    g++ -std=$std -fsyntax-only -Wno-c++20-extensions -Icsrc -I"$cuda_include" $torch_includes -I"$py_include" "$cpp"
  done
  bindings=$((bindings + 1))
done < <(find csrc -name '*.cpp' -print0 | sort -z)
echo "check_cuda: $bindings binding sources syntax-check against the torch headers of $py"
