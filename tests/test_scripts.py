"""The scripts without installing or running anything real: setup's choice of interpreter (a
virtual environment when the system Python is externally managed, as Debian's is) under a fake
PATH; gpu_check's steps, time limits and arguments through --dry-run, the README's GPU plan, and
a whole run on a stand-in GPU machine; check_cuda with a python that has no torch."""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None or shutil.which("timeout") is None, reason="needs bash and coreutils")


def fake_bin(tmp_path, *, python3: str | None = None, python: str | None = None) -> Path:
    """A PATH holding only the tools the scripts need, plus fake interpreters whose probe of
    "externally managed / venv / plain" answers `python3` (or `python`); anything else they run
    with the real interpreter without its site-packages (so nothing is installed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("env", "dirname", "sed", "git", "timeout"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, kind in (("python3", python3), ("python", python)):
        if kind is None:
            continue
        script = bin_dir / name
        script.write_text(f'#!{BASH}\nif [[ "$*" == *EXTERNALLY-MANAGED* ]]; then echo {kind}; exit 0; fi\n'
                          f'exec {sys.executable} -S "$@"\n')  # -S: no site-packages, a bare interpreter
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def copy_scripts(tmp_path) -> Path:
    """A bare checkout holding only scripts/ (the scripts work from their repository root)."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", root / "scripts")
    return root


def checkout_without_venv(tmp_path) -> Path:
    """The repository as links, less a ./.venv that setup.sh may have made in it (gpu_check.sh
    would pick that interpreter over the fake PATH's)."""
    root = tmp_path / "checkout"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name != ".venv":
            (root / entry.name).symlink_to(entry)
    return root


def run_script(root, args, bin_dir, **env):
    clean = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run([BASH, str(root / "scripts" / args[0]), *args[1:]], capture_output=True, text=True,
                          env=clean, timeout=120)


def test_setup_makes_a_venv_for_an_externally_managed_python3(tmp_path):
    root = copy_scripts(tmp_path)
    bin_dir = fake_bin(tmp_path, python3="managed")  # Debian: python3 only, no `python`
    result = run_script(root, ["setup.sh", "--dry-run"], bin_dir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{bin_dir}/python3 is externally managed" in out
    assert f"$ {bin_dir}/python3 -m venv .venv" in out and "interpreter: .venv/bin/python" in out
    assert "torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu" in out  # no GPU: the CPU build
    assert "$ .venv/bin/python -m pip install -q --no-build-isolation -e .[test]" in out
    assert not (root / ".venv").exists()  # a dry run changes nothing


def test_setup_uses_a_plain_python_or_an_existing_venv(tmp_path):
    root = copy_scripts(tmp_path)
    bin_dir = fake_bin(tmp_path, python="plain")  # only `python`, not externally managed
    result = run_script(root, ["setup.sh", "--dry-run"], bin_dir)
    assert result.returncode == 0, result.stderr
    assert f"using {bin_dir}/python from the PATH (plain)" in result.stdout and "venv .venv" not in result.stdout
    venv = tmp_path / "active"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(bin_dir / "python")
    result = run_script(root, ["setup.sh", "--dry-run"], bin_dir, VIRTUAL_ENV=str(venv))
    assert f"using {venv}/bin/python: the active virtual environment" in result.stdout
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(bin_dir / "python")
    result = run_script(root, ["setup.sh", "--dry-run"], bin_dir)
    assert "using .venv/bin/python: ./.venv made by scripts/setup.sh" in result.stdout


def test_setup_without_python_or_with_bad_arguments(tmp_path):
    root = copy_scripts(tmp_path)
    bin_dir = fake_bin(tmp_path)
    result = run_script(root, ["setup.sh"], bin_dir)
    assert result.returncode == 1 and "no python3 found" in result.stderr
    result = run_script(root, ["setup.sh", "--frobnicate"], bin_dir)
    assert result.returncode == 2 and "usage" in result.stderr


def gpu_plan() -> list[tuple[int, str]]:
    """(timeout_s, command) of each call of the README's GPU plan."""
    text = (REPO / "README.md").read_text()
    block = text.split("**GPU plan for a 15-minute device budget**")[1].split("```bash")[1].split("```")[0]
    return [(int(t), c) for t, c in re.findall(r"# call \d, timeout_s (\d+): .*\n(bash scripts/gpu_check\.sh .*)", block)]


def gpu_check_dry_run(repo, bin_dir, args) -> tuple[list[str], str]:
    result = run_script(repo, ["gpu_check.sh", "--dry-run", *args], bin_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line.split("$ ", 1)[1] for line in result.stdout.splitlines() if "$ " in line], result.stdout


MACHINE_START_S, TRANSFERS_S, DEVICE_BUDGET_S = 90, 30, 15 * 60


def test_the_readmes_gpu_plan_fits_a_15_minute_budget(tmp_path):
    # Three calls: build + every test, the headline benchmarks, the rest. Each dry-run plan
    # (every step counted as taking all its time) fits its --time, each --time its call's
    # timeout_s, and the calls with the machine's start fit 15 minutes.
    bin_dir = fake_bin(tmp_path, python3="plain")
    repo = checkout_without_venv(tmp_path)
    out, py = tmp_path / "out", f"{bin_dir}/python3"
    plan = gpu_plan()
    assert [c.split("--time ")[1].split(maxsplit=1)[1] for _, c in plan] == ["build test", "headline", "rest"]
    steps = {}
    for timeout_s, command in plan:
        args = [a.replace("$OUT", str(out)) for a in shlex.split(command)[2:]]
        limit = int(args[args.index("--time") + 1])
        assert timeout_s >= limit + 15, command
        steps[args[-1]], printed = gpu_check_dry_run(repo, bin_dir, args)
        used = [int(x) for x in re.findall(r" (\d+) s of +-?\d+ s", printed)]
        assert used and sum(used) <= limit, (command, printed)
    assert MACHINE_START_S + TRANSFERS_S + sum(t for t, _ in plan) <= DEVICE_BUDGET_S
    build, load, test = steps["test"]
    assert build.startswith("env JANUS_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=<this GPU") and "MAX_JOBS=" in build
    assert build.endswith(f"{py} -m pip install -q --no-build-isolation --no-deps --no-index -e . (at most 240 s)")
    assert "cuda_extension" in load
    # the whole suite (no -m gpu), per-test timeouts, the log in the results
    assert f"JANUS_FAST_TEST_LOG={out}/tests.jsonl" in test and "JANUS_FAST_TEST_TIMEOUT=150" in test
    assert f"{py} -m pytest tests -q -p tests.run_limits" in test and "-m gpu" not in test
    *benches, render = steps["headline"]
    assert [b.split("--family ")[1].split()[0] for b in benches] == ["attention", "generation", "training"]
    assert all(f"--jsonl {out}/bench.jsonl" in b and "-k " in b for b in benches)
    assert render.startswith(f"{py} benchmarks/render.py {out}/bench.jsonl -o {out}/RESULTS.md --one-chart")
    assert len(steps["rest"]) >= 3 and not out.exists()  # a dry run writes nothing


FAKE_MACHINE = r"""#!BASH
# python3 on a fake GPU machine: answers gpu_check.sh's probes and stands in for pip, pytest, the
# benchmarks and the renderer, writing what they write.
case "$*" in
  *"torch.cuda.is_available"*|*"import janus_fast; b ="*) exit 0 ;;
  *"get_device_capability"*) echo 9.0 ;;
  *"import janus_fast._C"*) [ -f "$FAKE/built" ] ;;
  *"import xdist"*) exit 1 ;;
  "-m pip install"*) touch "$FAKE/built" ;;
  *"from tests.run_limits import read_log"*|*"collections.Counter"*) exec REAL "$@" ;;
  "-m pytest tests"*)
    if [ "$JANUS_FAST_TEST_RESUME" = 0 ]; then  # dies inside its second test
      printf '%s
' '{"test": "t::a", "started": true}' '{"test": "t::a", "outcome": "passed"}'         '{"test": "t::b", "started": true}' >> "$JANUS_FAST_TEST_LOG"
      exit 1
    fi
    printf '%s
' '{"test": "t::b", "outcome": "failed"}' '{"test": "t::c", "started": true}'       '{"test": "t::c", "outcome": "passed"}' >> "$JANUS_FAST_TEST_LOG" ;;
  "-m janus_fast.bench"*)
    file=$(echo "$*" | sed 's/.*--jsonl \([^ ]*\).*/\1/')
    echo '{"family": "x", "case": "c", "label": "janus_fast", "status": "ok", "kernel_ms": 1}' >> "$file"
    sleep 2 ;;  # time passes: the phase's later steps do not fit
  "benchmarks/render.py"*) out=$(echo "$*" | sed 's/.*-o \([^ ]*\).*/\1/'); echo report > "$out"; echo png > "${out%.md}.png" ;;
  *) echo "fake python3: unexpected $*" >&2; exit 3 ;;
esac
"""


def test_gpu_check_on_a_fake_gpu_machine_keeps_everything_in_its_results(tmp_path):
    # Every phase for real on a stand-in machine: the build once, the suite resumed after the test
    # its process died in, the benchmark steps that fit and a line naming those that did not,
    # and nothing but the five files in --results.
    bin_dir = fake_bin(tmp_path)
    for tool in ("tee", "date", "nproc", "mkdir", "touch", "find", "wc", "ls", "tr", "cat", "sleep"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    fake = tmp_path / "fake"
    fake.mkdir()
    (bin_dir / "python3").write_text(FAKE_MACHINE.replace("BASH", BASH).replace("REAL", f"{sys.executable}"))
    (bin_dir / "python3").chmod(0o755)
    out = tmp_path / "out"
    result = run_script(checkout_without_venv(tmp_path), ["gpu_check.sh", "--results", str(out), "--time", "56",
                                                         "build", "test", "rest"], bin_dir, FAKE=str(fake),
                        PYTHONPATH=str(REPO))
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "RESULTS.png", "bench.jsonl", "gpu_check.log",
                                                     "tests.jsonl"]
    log = (out / "gpu_check.log").read_text()
    assert log.count("-m pip install") == 1 and "resuming after it (1)" in log and "JANUS_FAST_TEST_RESUME=1" in log
    assert "test                   1 failed, 2 passed" in result.stdout
    bench = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    ran = [x for x in bench if x["status"] == "ok"]
    skipped = [x for x in bench if x["status"] == "skipped"]
    assert ran and skipped and all("ran out before this step" in x["reason"] for x in skipped)
    assert len(ran) + len(skipped) == 6  # rest's six steps: each ran or is named


def test_gpu_check_rejects_bad_arguments_and_a_machine_without_gpu(tmp_path):
    bin_dir = fake_bin(tmp_path, python3="plain")
    repo = checkout_without_venv(tmp_path)
    for args, message in ((["frob"], "unknown phase or option 'frob'"),
                          (["bench:nope"], "unknown benchmark family 'nope'"),
                          (["--time", "soon", "test"], "--time takes whole seconds"), ([], "PHASE...")):
        result = run_script(repo, ["gpu_check.sh", *args], bin_dir)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    import torch

    if not torch.cuda.is_available():
        result = run_script(repo, ["gpu_check.sh", "--results", str(tmp_path / "r"), "test"], bin_dir)
        assert result.returncode == 1 and "CUDA GPU" in result.stdout


def test_check_cuda_skips_the_bindings_when_python_has_no_torch(tmp_path):
    # nvcc is found (a stand-in that compiles nothing) but the interpreter janus_fast would use
    # has no torch: the kernels are still checked, the bindings' part says why it is skipped, and
    # the script succeeds (it used to stop at the binding check with status 1).
    bin_dir = fake_bin(tmp_path, python3="plain")
    for tool in ("find", "sort", "mktemp", "rm", "basename", "awk", "head", "cat"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(f'#!{BASH}\n[[ "$*" == *--dryrun* ]] && echo \'#$ INCLUDES="-I/cuda/include"\' >&2\nexit 0\n')
    nvcc.chmod(0o755)
    result = run_script(checkout_without_venv(tmp_path), ["check_cuda.sh"], bin_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CUDA sources compile for sm_80 and sm_90" in result.stdout
    assert f"check_cuda: {bin_dir}/python3 (the PATH) has no torch; the bindings" in result.stdout


def test_activate_sources_the_venv_only_when_setup_made_one(tmp_path):
    root = copy_scripts(tmp_path)
    probe = [BASH, "-c", ". scripts/activate.sh && echo \"${MARK:-none}\""]
    assert subprocess.run(probe, cwd=root, capture_output=True, text=True).stdout.strip() == "none"
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "activate").write_text("MARK=activated\n")
    assert subprocess.run(probe, cwd=root, capture_output=True, text=True).stdout.strip() == "activated"
