#!/usr/bin/env python3
"""The suite's time budget, defended while there is still room: CI stops a run at 90 minutes and then lands
nothing, so pytest alone may take at most --limit-minutes (45 by default).

Reads the timings file that tests/conftest.py writes at the end of every pytest session (wall time, and
setup + call + teardown seconds per test), prints the wall time and the slowest tests, and exits 1 with one
line naming the budget when the wall time is over it, 2 when the file is missing or unreadable.
Standard library only: CI runs it with the system Python.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timings", type=Path, help="the JSON file pytest wrote (KILN_TEST_TIMINGS)")
    parser.add_argument("--limit-minutes", type=float, default=45.0)
    parser.add_argument("--slowest", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        timings = json.loads(args.timings.read_text())
        wall, tests = float(timings["wall_s"]), dict(timings["tests"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"budget: cannot read the suite's timings at {args.timings} ({exc}) (fix: run the tests through "
              "`make test`, whose conftest writes them)", file=sys.stderr)
        return 2
    print(f"pytest wall time: {_minutes(wall)} ({wall:.0f} s) for {len(tests)} tests; "
          f"budget {args.limit_minutes:g} min")
    print(f"slowest {min(args.slowest, len(tests))}:")
    for nodeid, seconds in sorted(tests.items(), key=lambda item: -item[1])[: args.slowest]:
        print(f"  {seconds:8.1f} s  {nodeid}")
    if wall > args.limit_minutes * 60:
        print(f"budget: pytest took {_minutes(wall)}, over the {args.limit_minutes:g}-minute budget that keeps CI "
              "inside its 90 (fix: make the slowest tests above share their builds, or move them to a slower tier)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
