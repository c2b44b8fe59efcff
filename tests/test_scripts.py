"""scripts/setup.sh and scripts/gpu_check.sh without installing or running anything: setup's
choice of interpreter (a virtual environment when the system Python is externally managed, as
Debian's is) under a fake PATH, and gpu_check's steps and argument handling, through --dry-run."""

import os
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


def test_gpu_check_steps_dry_run(tmp_path):
    bin_dir = fake_bin(tmp_path, python3="plain")
    repo = checkout_without_venv(tmp_path)
    results = tmp_path / "results"

    def dry(*args):
        result = run_script(repo, ["gpu_check.sh", "--dry-run", *args], bin_dir, GPU_CHECK_RESULTS=str(results))
        assert result.returncode == 0, result.stderr
        return [line.split("$ ", 1)[1] for line in result.stdout.splitlines() if "$ " in line]

    py = f"{bin_dir}/python3"
    build = dry("build")
    assert build[0] == f"env JANUS_FAST_BUILD_CUDA=1 {py} -m pip install -q --no-build-isolation --no-deps --no-index -e ."
    assert "cuda_extension" in build[1] and len(build) == 2
    assert dry("test", "-k", "decode") == [f"{py} -m pytest tests -q -m gpu -p no:cacheprovider -k decode"]
    one = dry("bench", "vq")
    assert one == [f"{py} -m janus_fast.bench --family vq --out {results}",
                   f"{py} benchmarks/render.py {results}/*.jsonl -o benchmarks/RESULTS.md"]
    everything = dry()
    assert everything[:2] == build and everything[2].startswith(f"{py} -m pytest tests -q -m gpu")
    families = "--family attention --family flex --family vq --family sampling --family generation --family training"
    assert everything[3] == f"{py} -m janus_fast.bench {families} --out {results} --budget 80"
    assert everything[4].endswith("-o benchmarks/RESULTS.md") and len(everything) == 5
    assert not results.exists()


def test_gpu_check_rejects_bad_arguments_and_a_machine_without_gpu(tmp_path):
    bin_dir = fake_bin(tmp_path, python3="plain")
    repo = checkout_without_venv(tmp_path)
    for args, message in ((["frob"], "unknown step 'frob'"), (["bench", "nope"], "unknown benchmark family 'nope'"),
                          (["bench", "vq", "sampling"], "usage"), (["build", "extra"], "usage")):
        result = run_script(repo, ["gpu_check.sh", *args], bin_dir)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    import torch

    if not torch.cuda.is_available():
        result = run_script(repo, ["gpu_check.sh", "test"], bin_dir)
        assert result.returncode == 1 and "needs a CUDA GPU" in result.stderr


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
