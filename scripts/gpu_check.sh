#!/usr/bin/env bash
# The GPU check, the first thing to run on a machine with an NVIDIA GPU: build janus_fast._C, run
# the whole test suite on CUDA, then the benchmarks with their peers, in phases that each fit one
# 10-minute command on a bare machine, a cold build included, and keep what finished when time
# runs out. Nothing is fetched: pip, the Hugging Face hub and transformers are told to stay offline.
#
#   bash scripts/gpu_check.sh [--results DIR] [--time SECONDS] [--dry-run] PHASE...
#
#   build      build janus_fast._C for this GPU's architecture only (sm_90 on an H100/H200) with
#              every core, and load it; skipped when it already loads. Every other phase starts here.
#   test       the whole test suite (tests/) on CUDA: a test past GPU_CHECK_TEST_TIMEOUT s (150) fails
#              (tests/run_limits.py), the rest skip once the phase's time is up, each finished test
#              is a JSON line in DIR/tests.jsonl at once; 8 pytest-xdist processes when installed
#   headline   the headline benchmarks: attention (dense, decode), generation at 1B, the training step
#   rest       the other benchmarks, in this order: sampling, vq, attention's varlen, the rest of training,
#              generation at 7B, flex
#   bench:F    one benchmark family F (attention|flex|vq|sampling|generation|training), all its cases
#   all        build test headline rest (for a machine without a 10-minute limit per command)
#
#   --results DIR   everything the run makes goes into DIR, 5 files: gpu_check.log (every command's
#                   output), tests.jsonl, bench.jsonl, RESULTS.md and RESULTS.png (rendered from
#                   DIR/bench.jsonl after each benchmark phase); default benchmarks/results/gpu-check-<commit>
#   --time SECONDS  the wall-clock time this command may take (default 570: one 10-minute call with a
#                   margin). Phases share it in order, each within its budget; a step that would start
#                   with under 30 s left is skipped, saying so. The README gives the 15-minute plan.
#   --dry-run       print the steps and their time limits, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
FAMILIES=(attention flex vq sampling generation training)
BUILD_BUDGET=240   # the limit of a cold build of the extension for one architecture
BUILD_ESTIMATE=90  # what one takes on 16 cores (an estimate: 2 .cu files for one arch, 4 .cpp with torch's headers)
BENCH_OVERHEAD=45  # per benchmark command: start-up, imports, a model build, the last case begun in time
BENCH_MIN=60       # the least time a benchmark step is started with
MIN_STEP=30        # a step that would start with less than this left is skipped
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-150}"
BENCH_CASE_TIMEOUT="${GPU_CHECK_BENCH_CASE_TIMEOUT:-180}"

usage() {
  sed -n '7,26p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0 total=570 results="" phases=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --results) [ $# -ge 2 ] || usage; results="$2"; shift ;;
    --time) [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || { echo "gpu_check: --time takes whole seconds" >&2; exit 2; }
            total="$2"; shift ;;
    -h|--help) usage ;;
    build|test|headline|rest|all) phases+=("$1") ;;
    bench:*)
      known=" ${FAMILIES[*]} "
      if [[ "$known" != *" ${1#bench:} "* ]]; then
        echo "gpu_check: unknown benchmark family '${1#bench:}'; one of: ${FAMILIES[*]}" >&2
        exit 2
      fi
      phases+=("$1") ;;
    *) echo "gpu_check: unknown phase or option '$1'" >&2; usage ;;
  esac
  shift
done
[ ${#phases[@]} -gt 0 ] || usage
expanded=()
for phase in "${phases[@]}"; do
  if [ "$phase" = all ]; then expanded+=(build test headline rest); else expanded+=("$phase"); fi
done
phases=("${expanded[@]}")
explicit_build=0
[[ " ${phases[*]} " == *" build "* ]] && explicit_build=1

. scripts/interpreter.sh
if ! pick_python; then
  echo "gpu_check: no python found; run scripts/setup.sh first" >&2
  exit 1
fi
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# The device copy of a working tree has no .git: the caller passes JANUS_FAST_COMMIT (and
# JANUS_FAST_DIRTY), which the benchmark results record; a checkout fills them in itself.
if [ -z "${JANUS_FAST_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  export JANUS_FAST_COMMIT="$(git rev-parse --short HEAD)"
  export JANUS_FAST_DIRTY="$([ -n "$(git status --porcelain 2>/dev/null)" ] && echo 1 || echo 0)"
fi
commit="${JANUS_FAST_COMMIT:-unknown}"
results="${results:-${GPU_CHECK_RESULTS:-benchmarks/results/gpu-check-$commit}}"
if [ "$dry_run" = 0 ] && ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: a CUDA GPU and a CUDA build of torch are needed; this machine has none ($py)"
  exit 1
fi
if [ "$dry_run" = 0 ]; then
  mkdir -p "$results"
  results="$(cd "$results" && pwd)"  # the steps run from other directories too
fi
log="$results/gpu_check.log"
summary=() built=0

say() {  # to the terminal and the log
  echo "gpu_check: $*"
  if [ "$dry_run" = 0 ]; then echo "gpu_check: $*" >> "$log"; fi
}
dry_spent=0  # --dry-run: each step counted as taking all its time (a cold build its estimate)
left() { echo $(( total - SECONDS - dry_spent )); }

run() {  # run LIMIT CMD...: print it; unless --dry-run, run it for at most LIMIT s, output teed to the log
  local limit="$1"
  shift
  say "\$ $* (at most ${limit} s)"
  if [ "$dry_run" = 1 ]; then dry_spent=$(( dry_spent + ${DRY_CHARGE:-$limit} )); return 0; fi
  set +e
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  set -e
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then say "stopped at its ${limit} s limit"; fi
  return "$status"
}

record() {  # record PHASE STATUS START BUDGET
  summary+=("$(printf '%-22s %-28s %5d s of %5s s' "$1" "$2" $(( SECONDS + dry_spent - $3 )) "$4")")
}
now() { echo $(( SECONDS + dry_spent )); }


arch() {  # this GPU's compute capability, e.g. 9.0 (TORCH_CUDA_ARCH_LIST's form)
  if [ "$dry_run" = 1 ]; then echo '<this GPU, e.g. 9.0>'; return; fi
  "$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())"
}

do_build() {  # once per command: later phases find it done
  local start=$(now) budget=$(( BUILD_BUDGET < $(left) ? BUILD_BUDGET : $(left) ))
  [ "$built" = 1 ] && return 0
  built=1
  if [ "$dry_run" = 0 ] && "$py" -c "import janus_fast._C, janus_fast.kernels" 2>/dev/null; then
    say "build: janus_fast._C already loads; not rebuilt"
    return 0
  fi
  if [ "$dry_run" = 1 ] && [ "$explicit_build" = 0 ]; then
    say "build: (a dry run without the build phase takes the extension as built: a warm machine)"
    return 0
  fi
  if [ "$budget" -lt "$MIN_STEP" ]; then
    say "build: skipped, $(left) s left"; record build "skipped (time)" "$start" "$budget"; return 1
  fi
  local status=0
  # JANUS_FAST_BUILD_CUDA=1: a build that cannot make the extension fails instead of skipping it.
  DRY_CHARGE=$BUILD_ESTIMATE run "$budget" env JANUS_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$(arch)" \
    MAX_JOBS="$(nproc)" "$py" -m pip install -q --no-build-isolation --no-deps --no-index -e . || status=$?
  if [ "$status" = 0 ]; then
    DRY_CHARGE=10 run 60 "$py" -c "import janus_fast; b = janus_fast.backends(); print(b); assert b['cuda_extension'], b['cuda_extension_error']" \
      || status=$?
  fi
  record build "$([ "$status" = 0 ] && echo ok || echo "failed ($status)")" "$start" "$budget"
  return "$status"
}

tests_unfinished() {  # whether the test log shows a test the process died in
  "$py" -c "import sys; from tests.run_limits import read_log; sys.exit(0 if read_log(sys.argv[1])[1] else 1)" \
    "$results/tests.jsonl" 2>/dev/null
}

do_test() {
  local start=$(now) budget=$(( $(left) - 10 )) status=0 resume=0 xdist=()
  if [ "$budget" -lt "$MIN_STEP" ]; then
    say "test: skipped, $(left) s left"; record test "skipped (time)" "$start" "$budget"; return 0
  fi
  if [ "$dry_run" = 1 ] || "$py" -c "import xdist" 2>/dev/null; then
    xdist=(-n 8 --dist load)  # Triton compiles in parallel; a worker that dies is replaced
  fi
  local deadline=$(( $(date +%s) + budget - 20 ))  # room for the summary of a run cut at its deadline
  while :; do
    status=0
    run $(( budget - ($(now) - start) )) env JANUS_FAST_TEST_TIMEOUT="$TEST_TIMEOUT" \
      JANUS_FAST_TEST_DEADLINE="$deadline" JANUS_FAST_TEST_LOG="$results/tests.jsonl" \
      JANUS_FAST_TEST_RESUME="$resume" "$py" -m pytest tests -q -p tests.run_limits -p no:cacheprovider -rfE \
      --durations=25 "${xdist[@]}" || status=$?
    # the process died inside a test (a hang past the timeout, a crash): go on after it
    [ "$dry_run" = 0 ] && [ "$status" != 0 ] && [ "$resume" -lt 5 ] && tests_unfinished \
      && [ $(( budget - ($(now) - start) )) -ge "$MIN_STEP" ] || break
    resume=$(( resume + 1 ))
    say "test: the run ended inside a test; resuming after it ($resume)"
  done
  local counts=""
  if [ "$dry_run" = 0 ] && [ -f "$results/tests.jsonl" ]; then
    counts=$("$py" -c "import collections, json, sys
lines = [json.loads(x) for x in open(sys.argv[1]) if x.strip() and not json.loads(x).get('started')]
c = collections.Counter(x['outcome'] for x in lines)
print(', '.join(f'{n} {k}' for k, n in sorted(c.items())))" "$results/tests.jsonl" 2>/dev/null || true)
  fi
  record test "${counts:-rc $status}" "$start" "$budget"
  return "$status"
}

bench_steps() {  # the benchmark steps of a phase: FAMILY[|PYTEST -k EXPRESSION]
  case "$1" in
    headline) printf '%s\n' "attention|test_dense or test_decode" "generation|1b" "training|llm_step" ;;
    rest) printf '%s\n' "sampling" "vq" "attention|test_varlen" "training|not llm_step" "generation|7b" "flex" ;;
    bench:*) echo "${1#bench:}" ;;
  esac
}

skipped_line() {  # skipped_line FAMILY SELECTION: RESULTS.md names what the time left out
  [ "$dry_run" = 1 ] && return 0
  local what="all cases"
  [ "$2" != "$1" ] && what="the cases selected by -k '$2'"
  printf '{"family": "%s", "table": "%s", "case": "(%s)", "label": "(all)", "status": "skipped", "reason": "gpu_check: the command'"'"'s time (--time %s) ran out before this step", "context": {"device": "n/a", "command": "scripts/gpu_check.sh"}}\n' \
    "$1" "$1" "$what" "$total" >> "$results/bench.jsonl"
}

do_bench() {  # do_bench PHASE: its steps share what is left of the command's time
  local phase="$1" start=$SECONDS status=0 steps=() step
  mapfile -t steps < <(bench_steps "$phase")
  local n=${#steps[@]} i=0
  for step in "${steps[@]}"; do
    local family="${step%%|*}" select=() share
    [[ "$step" == *"|"* ]] && select=(-k "${step#*|}")
    # an equal share of the time left (20 s kept for the report), at least BENCH_MIN so a step
    # times something, recomputed as steps end early; the steps go in priority order
    share=$(( ($(left) - 20) / (n - i) ))
    share=$(( share < BENCH_MIN ? BENCH_MIN : share ))
    share=$(( share > $(left) - 20 ? $(left) - 20 : share ))
    i=$(( i + 1 ))
    if [ "$share" -lt "$MIN_STEP" ]; then
      say "$phase: $step skipped, $(left) s left"; record "$phase:$family" "skipped (time)" "$(now)" "$share"
      skipped_line "$family" "${step#*|}"
      continue
    fi
    local step_start=$(now) step_status=0
    run "$share" env JANUS_FAST_TEST_TIMEOUT="$BENCH_CASE_TIMEOUT" "$py" -m janus_fast.bench --family "$family" \
      --out "$results" --jsonl "$results/bench.jsonl" --budget $(( share > 2 * BENCH_OVERHEAD ? share - BENCH_OVERHEAD : share / 2 )) \
      "${select[@]}" || step_status=$?
    record "$phase:$family" "$([ "$step_status" = 0 ] && echo ok || echo "rc $step_status")" "$step_start" "$share"
    [ "$step_status" = 0 ] || status=$step_status
  done
  if [ "$dry_run" = 1 ] || [ -s "$results/bench.jsonl" ]; then
    run 60 "$py" benchmarks/render.py "$results/bench.jsonl" -o "$results/RESULTS.md" --one-chart || status=$?
  fi
  return "$status"
}

say "$(IFS=' '; echo "${phases[*]}"), python $py ($py_origin), commit $commit, at most $total s, results in $results"
status=0
for phase in "${phases[@]}"; do
  case "$phase" in
    build) do_build || status=$? ;;
    test) do_build || status=$?; do_test || status=$? ;;
    *) do_build || status=$?; do_bench "$phase" || status=$? ;;
  esac
done
say "summary (phase, outcome, time used of its budget), $SECONDS s in all:"
for line in "${summary[@]}"; do say "  $line"; done
if [ "$dry_run" = 0 ]; then
  files=$(find "$results" -maxdepth 1 -type f | wc -l)
  say "$files files in $results: $(cd "$results" && ls | tr '\n' ' ')"
  [ "$files" -le 8 ] || say "WARNING: more than 8 files in $results"
fi
exit "$status"
