"""What the suite needs before its workers start, made once per machine: the trained demo model and one small
model per family (tests/family_models.py, cached in KILN_TEST_MODEL_CACHE). `make test` runs this one model after
the other, beside the tool environments' installs: two test workers that each trained models at once on the two
cores took about twice as long (eight models in 8 minutes against about 4)."""

from __future__ import annotations

import sys
import time

from tests.testmodel import ensure_test_model
from tests.family_models import FAMILY_CONFIGS, family_model


def main(argv: list[str] | None = None) -> int:
    """With --demo-only, just the demo model (what the fast tier uses)."""
    argv = sys.argv[1:] if argv is None else argv
    started = time.monotonic()
    ensure_test_model()
    for family in FAMILY_CONFIGS if "--demo-only" not in argv else ():
        family_model(family)
    print(f"test models ready ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
