"""Limits for long unattended pytest runs (scripts/gpu_check.sh on a GPU machine, CI), with no
plugin beyond pytest itself (the GPU machine's image may lack pytest-timeout). tests/conftest.py
and benchmarks/conftest.py register this module as a plugin; each part does nothing unless its
variable is set:

    JANUS_FAST_TEST_TIMEOUT=S    a test (each of setup, call and teardown, S in all) that runs past
                                 S seconds fails with that reason (SIGALRM). One stuck where Python
                                 cannot interrupt it (inside a CUDA call) ends the process once it
                                 has run min(2 S, S + 60) seconds, every thread's stack dumped
                                 (faulthandler; to the terminal when the plugin is loaded with
                                 `-p tests.run_limits`, before pytest captures it): a pytest-xdist
                                 worker is replaced and the run goes on; otherwise
                                 JANUS_FAST_TEST_RESUME continues it.
    JANUS_FAST_TEST_DEADLINE=T   tests starting after Unix time T skip with the reason (a step's
                                 time budget), so the run ends with its summary.
    JANUS_FAST_TEST_LOG=FILE     one JSON line per test as it starts ({"test", "started": true})
                                 and as it ends ({"test", "outcome", "seconds", "message"}),
                                 flushed at once: a run killed from outside keeps what finished.
    JANUS_FAST_TEST_RESUME=1     with the log: the tests it shows ended are deselected, and one it
                                 shows started but never ended (the process died in it) is logged
                                 as failed and deselected, so a rerun continues where the last
                                 one stopped.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import threading
import time

import pytest

_STDERR = os.dup(2)  # where a stuck test's stacks go (pytest has not redirected fd 2 yet under -p)
_writes_log = False  # True in the process that reports (not a pytest-xdist worker)
_test_deadline: dict[str, float] = {}  # nodeid -> monotonic time its timeout expires
_outcomes: dict[str, dict] = {}  # nodeid -> the line being assembled from its phase reports


class TestTimeout(BaseException):
    """A test ran past JANUS_FAST_TEST_TIMEOUT (BaseException: `except Exception` in a test
    cannot swallow it)."""

    __test__ = False


def _timeout() -> float:
    return float(os.environ.get("JANUS_FAST_TEST_TIMEOUT") or 0)


def _log_path() -> str | None:
    return os.environ.get("JANUS_FAST_TEST_LOG") or None


def _write(line: dict) -> None:
    with open(_log_path(), "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log(path: str) -> tuple[set[str], list[str]]:
    """(tests that ended, tests that started and never ended) in a JANUS_FAST_TEST_LOG file."""
    ended, started = set(), []
    if not os.path.exists(path):
        return ended, started
    with open(path, encoding="utf-8") as f:
        for text in f:
            try:
                line = json.loads(text)
            except json.JSONDecodeError:  # cut by a kill
                continue
            if line.get("started"):
                started.append(line["test"])
            else:
                ended.add(line["test"])
    return ended, [t for t in dict.fromkeys(started) if t not in ended]


def pytest_configure(config):
    global _writes_log
    _writes_log = bool(_log_path()) and not hasattr(config, "workerinput")  # xdist: the controller writes
    if _writes_log and os.environ.get("JANUS_FAST_TEST_RESUME") == "1":
        _, died_in = read_log(_log_path())
        for nodeid in died_in:
            _write({"test": nodeid, "outcome": "failed", "seconds": None,
                    "message": "the test process ended while this test ran (a hang past JANUS_FAST_TEST_TIMEOUT, "
                               "or a crash); resumed after it"})


def pytest_collection_modifyitems(config, items):
    if not (_log_path() and os.environ.get("JANUS_FAST_TEST_RESUME") == "1"):
        return
    ended, _ = read_log(_log_path())
    done = [item for item in items if item.nodeid in ended]
    if done:
        config.hook.pytest_deselected(items=done)
        items[:] = [item for item in items if item.nodeid not in ended]


def _arm(item) -> bool:
    """Arm SIGALRM for what is left of `item`'s time; False where signals cannot be used."""
    if item.nodeid not in _test_deadline or threading.current_thread() is not threading.main_thread():
        return False
    left = _test_deadline[item.nodeid] - time.monotonic()
    seconds = _timeout()

    def expire(signum, frame):
        raise TestTimeout(f"{item.nodeid} ran past its {seconds:g} s (JANUS_FAST_TEST_TIMEOUT)")
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    seconds = _timeout()
    if seconds and hasattr(signal, "SIGALRM"):
        _test_deadline[item.nodeid] = time.monotonic() + seconds
        faulthandler.dump_traceback_later(min(2 * seconds, seconds + 60), exit=True, file=_STDERR)
    try:
        yield
    finally:
        if _test_deadline.pop(item.nodeid, None) is not None:
            faulthandler.cancel_dump_traceback_later()


def _phase(item):
    armed = _arm(item)
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    deadline = os.environ.get("JANUS_FAST_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("the step's time budget was used up before this test (JANUS_FAST_TEST_DEADLINE)")
    yield from _phase(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _phase(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield from _phase(item)


def pytest_runtest_logstart(nodeid, location):
    if _writes_log:
        _write({"test": nodeid, "started": True})


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = getattr(report, "longreprtext", "") or str(report.longrepr or "")
    errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    return (" ".join(errors[:3]) or (text.strip().splitlines() or [""])[-1])[:500]


def pytest_runtest_logreport(report):
    if not _writes_log:
        return
    line = _outcomes.setdefault(report.nodeid, {"test": report.nodeid, "outcome": "passed", "seconds": 0.0,
                                                "message": ""})
    line["seconds"] = round(line["seconds"] + (getattr(report, "duration", 0) or 0), 3)
    if report.failed or (report.skipped and line["outcome"] == "passed"):
        line["outcome"] = "failed" if report.failed else "skipped"
        line["message"] = line["message"] or _message(report)
    if report.when not in ("setup", "call"):  # teardown, or xdist's report of a crashed worker
        _write(_outcomes.pop(report.nodeid))
