"""tests/run_limits.py, the limits of unattended runs (gpu_check.sh on a GPU, CI): a test past its
time fails with the reason, one that Python cannot interrupt ends the process and a resumed run
goes on after it, tests past the deadline skip, and the log keeps every finished test."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = """
import signal, time

def test_fast():
    pass

def test_sleeps():
    time.sleep(30)

def test_stuck():  # SIGALRM cannot interrupt it: as a test stuck inside a CUDA call
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(30)

def test_after():
    pass
"""


def run_demo(tmp_path, **env):
    (tmp_path / "test_demo.py").write_text(DEMO)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JANUS_FAST_TEST_LOG": str(tmp_path / "log.jsonl"), **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.run_limits",
                           "test_demo.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def ended(tmp_path) -> dict:
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    return {x["test"].split("::")[1]: x for x in lines if not x.get("started")}


def started(tmp_path) -> list:
    return [x["test"].split("::")[1] for x in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())
            if x.get("started")]


def test_a_timeout_fails_the_test_a_stuck_test_ends_the_run_and_a_resume_goes_on(tmp_path):
    start = time.monotonic()
    first = run_demo(tmp_path, JANUS_FAST_TEST_TIMEOUT="1")
    assert first.returncode == 1 and "passed" not in first.stdout  # ended inside test_stuck, no summary
    assert "in test_stuck" in first.stderr  # faulthandler's dump of the stack
    done = ended(tmp_path)
    assert started(tmp_path) == ["test_fast", "test_sleeps", "test_stuck"]
    assert done["test_fast"]["outcome"] == "passed" and set(done) == {"test_fast", "test_sleeps"}
    assert done["test_sleeps"]["outcome"] == "failed" and "ran past its 1 s" in done["test_sleeps"]["message"]
    resumed = run_demo(tmp_path, JANUS_FAST_TEST_TIMEOUT="1", JANUS_FAST_TEST_RESUME="1")
    assert resumed.returncode == 0 and "1 passed, 3 deselected" in resumed.stdout, resumed.stdout
    done = ended(tmp_path)
    assert done["test_stuck"]["outcome"] == "failed" and "process ended" in done["test_stuck"]["message"]
    assert done["test_after"]["outcome"] == "passed" and len(done) == 4
    assert time.monotonic() - start < 60


def test_tests_past_the_deadline_skip_with_the_reason(tmp_path):
    result = run_demo(tmp_path, JANUS_FAST_TEST_DEADLINE=str(time.time() - 1))
    assert result.returncode == 0 and "4 skipped" in result.stdout
    assert all(x["outcome"] == "skipped" and "time budget" in x["message"] for x in ended(tmp_path).values())
