"""What the structure checks cost on a real-sized export (issue 39: at most 5 % of the build).

    python bench/structure_cost.py SOURCE_MODEL QUANTIZE_OUT [--runs 3]

QUANTIZE_OUT is a quantize stage's output (hf/ and kiln.json beside it: a cache entry of
`$KILN_HOME/cache/quantize/`, or what bench/resume.py leaves in its `whole` folder). Each run checks the export
against the source in a fresh process (imports included, as a build's validate stage pays them) and prints the
wall time and what was checked.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHECK = r"""
import json, sys, time
from pathlib import Path
from kiln import quantize, validate
from kiln.pipeline.plan.requests import structure_expectation
source, out = Path(sys.argv[1]), Path(sys.argv[2])
started = time.monotonic()
expected = structure_expectation(quantize.CheckpointRecord.load(out), 1, False)
report = validate.check_structure(out / quantize.HF_DIR, source, expected)
print(json.dumps({"seconds": time.monotonic() - started, **report.as_dict()}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for _ in range(args.runs):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", CHECK, str(args.source), str(args.out)], capture_output=True,
                              text=True, check=True)
        rows.append((time.monotonic() - started, json.loads(done.stdout.splitlines()[-1])))
    weights = sum(p.stat().st_size for p in (args.out / "hf").glob("*.safetensors"))
    print(f"export {args.out / 'hf'}: {weights / 1e9:.2f} GB of safetensors")
    print("| run | process wall s | checks s | checked | problems |")
    print("|---|---|---|---|---|")
    for index, (wall, report) in enumerate(rows, 1):
        checked = ", ".join(f"{name} {n}" for name, n in report["checked"].items())
        print(f"| {index} | {wall:.1f} | {report['seconds']:.1f} | {checked} | {len(report['problems'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
