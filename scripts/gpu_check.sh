#!/usr/bin/env bash
# The first thing to run on a machine with an NVIDIA GPU: build the CUDA extension, run the
# `gpu` tests, run every benchmark family with its peers, and write benchmarks/RESULTS.md (the
# renderer records the device, versions, commit and command of each run). No network: it uses
# only what is installed (scripts/setup.sh installs it).
#
#   bash scripts/gpu_check.sh                  all steps (build, test, bench of every family)
#   bash scripts/gpu_check.sh build            build janus_fast._C in place and check it loads
#   bash scripts/gpu_check.sh test [ARGS...]   the gpu-marked tests (ARGS go to pytest)
#   bash scripts/gpu_check.sh bench [FAMILY]   one family (or all, with a shorter budget each),
#                                              then render benchmarks/RESULTS.md
#   bash scripts/gpu_check.sh --dry-run ...    print the commands, run nothing
#
# Each single step stays under 10 minutes on an H100 (STEP_TIMEOUT seconds, default 570, is
# enforced). Benchmark lines go to $GPU_CHECK_RESULTS (default benchmarks/results/gpu-check-<commit>),
# one <family>.jsonl each; running a family again replaces its file, and RESULTS.md is rendered
# from every family file there, so families can be run one call at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
FAMILIES=(attention flex vq sampling generation training)
STEP_TIMEOUT="${STEP_TIMEOUT:-570}"

usage() {
  echo "usage:" >&2
  sed -n '7,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
step="${1:-all}"
[ $# -gt 0 ] && shift
case "$step" in
  all) [ $# -eq 0 ] || usage ;;
  build) [ $# -eq 0 ] || usage ;;
  test) ;;
  bench)
    [ $# -le 1 ] || usage
    if [ $# -eq 1 ]; then
      known=" ${FAMILIES[*]} "
      if [[ "$known" != *" $1 "* ]]; then
        echo "gpu_check: unknown benchmark family '$1'; one of: ${FAMILIES[*]}" >&2
        exit 2
      fi
    fi ;;
  -h|--help) usage ;;
  *) echo "gpu_check: unknown step '$step'" >&2; usage ;;
esac

. scripts/interpreter.sh
if ! pick_python; then
  echo "gpu_check: no python found; run scripts/setup.sh first" >&2
  exit 1
fi
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing may come from the network
# The device copy of a working tree has no .git: the caller passes JANUS_FAST_COMMIT (and
# JANUS_FAST_DIRTY), which the benchmark results record; a checkout fills them in itself.
if [ -z "${JANUS_FAST_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  export JANUS_FAST_COMMIT="$(git rev-parse --short HEAD)"
  export JANUS_FAST_DIRTY="$([ -n "$(git status --porcelain 2>/dev/null)" ] && echo 1 || echo 0)"
fi
commit="${JANUS_FAST_COMMIT:-unknown}"
results="${GPU_CHECK_RESULTS:-benchmarks/results/gpu-check-$commit}"

run() {  # print a command; run it unless --dry-run, killed after STEP_TIMEOUT seconds
  echo "gpu_check: \$ $*"
  if [ "$dry_run" = 0 ]; then timeout --kill-after=20 "$STEP_TIMEOUT" "$@"; fi
}

need_gpu() {
  [ "$dry_run" = 1 ] && return 0
  if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: '$step' needs a CUDA GPU and a CUDA build of torch; this machine has none" >&2
    exit 1
  fi
}

do_build() {
  # JANUS_FAST_BUILD_CUDA=1: a build that cannot make the extension fails instead of skipping it.
  run env JANUS_FAST_BUILD_CUDA=1 "$py" -m pip install -q --no-build-isolation --no-deps --no-index -e .
  run "$py" -c "import janus_fast; b = janus_fast.backends(); print(b); assert b['cuda_extension'], b['cuda_extension_error']"
}

do_test() {
  need_gpu
  run "$py" -m pytest tests -q -m gpu -p no:cacheprovider "$@"
}

do_bench() {
  need_gpu
  local families=("$@") budget=()
  if [ ${#families[@]} -eq 0 ]; then
    families=("${FAMILIES[@]}")
    budget=(--budget $(( (STEP_TIMEOUT - 90) / ${#FAMILIES[@]} )))  # all families in one step's time
  fi
  echo "gpu_check: benchmark lines go to $results"
  [ "$dry_run" = 1 ] || mkdir -p "$results"
  local family status=0
  for family in "${families[@]}"; do
    [ "$dry_run" = 1 ] || rm -f "$results/$family.jsonl"
  done
  local args=()
  for family in "${families[@]}"; do args+=(--family "$family"); done
  run "$py" -m janus_fast.bench "${args[@]}" --out "$results" "${budget[@]}" || status=$?
  if [ "$dry_run" = 1 ] || compgen -G "$results/*.jsonl" >/dev/null; then
    run "$py" benchmarks/render.py "$results"/*.jsonl -o benchmarks/RESULTS.md
  fi
  return "$status"
}

echo "gpu_check: $step, python $py ($py_origin), commit $commit"
case "$step" in
  build) do_build ;;
  test) do_test "$@" ;;
  bench) do_bench "$@" ;;
  all)
    status=0
    do_build
    do_test || status=$?
    do_bench || status=$?
    exit "$status" ;;
esac
