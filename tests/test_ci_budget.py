"""CI guards its own limit (issue 23.5): `.ci/run` prints the suite's wall time and slowest tests after
`make test`, and fails while there is still room when pytest alone took more than 45 minutes.

The whole `.ci/run` runs here with a stand-in `make` on PATH that writes the timings a pytest session would
write: take the guard out of `.ci/run` and the over-budget run exits 0, which fails this test."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SLOW = {f"tests/test_x.py::test_{i}": float(i * 10) for i in range(1, 13)}


def _stand_ins(tmp_path: Path, wall_s: float, make_exit: int = 0) -> dict:
    """PATH with a `make` that writes timings of `wall_s` and exits `make_exit`; chromium and initdb present."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    timings = {"wall_s": wall_s, "exit_status": make_exit, "tests": SLOW}
    scripts = {
        "make": f"#!/bin/sh\n[ \"$1\" = test ] || exit 9\n"
                f"printf '%s' '{json.dumps(timings)}' > \"$KILN_TEST_TIMINGS\"\nexit {make_exit}\n",
        "chromium": "#!/bin/sh\nexit 0\n",
        "initdb": "#!/bin/sh\nexit 0\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "KILN_TEST_TIMINGS": str(tmp_path / "timings.json")}


def _ci_run(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("minutes, code", [(46, 1), (44, 0)])
def test_ci_run_fails_when_pytest_takes_more_than_45_minutes(tmp_path, minutes, code):
    result = _ci_run(_stand_ins(tmp_path, minutes * 60.0))
    assert result.returncode == code, (result.stdout, result.stderr)
    assert f"pytest wall time: {minutes}m00s ({minutes * 60} s) for 12 tests; budget 45 min" in result.stdout
    slowest = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("  ") and " s  " in line]
    assert slowest == [f"tests/test_x.py::test_{i}" for i in range(12, 2, -1)]   # the ten slowest, slowest first
    over = f"budget: pytest took {minutes}m00s, over the 45-minute budget"
    assert (over in result.stderr) is (code == 1)


def test_a_failed_suite_keeps_its_exit_code_and_still_prints_the_timings(tmp_path):
    result = _ci_run(_stand_ins(tmp_path, 600.0, make_exit=2))
    assert result.returncode == 2 and "pytest wall time: 10m00s" in result.stdout


def test_missing_timings_are_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / ".ci" / "budget.py"), str(tmp_path / "none.json")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "none.json" in result.stderr



def test_a_pytest_session_writes_the_timings_the_guard_reads(tmp_path):
    """The writer is tests/conftest.py: a real pytest session over one test of this file."""
    timings = tmp_path / "t.json"
    node = "tests/test_ci_budget.py::test_missing_timings_are_one_line_and_exit_2"
    session = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], cwd=REPO,
                             env={**os.environ, "KILN_TEST_TIMINGS": str(timings)}, capture_output=True, text=True,
                             timeout=300)
    assert session.returncode == 0, session.stdout
    written = json.loads(timings.read_text())
    assert list(written["tests"]) == [node] and written["tests"][node] > 0
    assert written["wall_s"] >= written["tests"][node] and written["exit_status"] == 0
    guard = subprocess.run([sys.executable, str(REPO / ".ci" / "budget.py"), str(timings)], capture_output=True,
                           text=True)
    assert guard.returncode == 0 and node in guard.stdout
