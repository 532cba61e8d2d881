"""A screenshot of `kiln report` as headless Chromium renders it (the picture in the README).

    python bench/report_screenshot.py recipes/demo-matrix.yaml --out bench/results/report-matrix.png

Reads the registry of $KILN_HOME (or MLFLOW_TRACKING_URI): build the recipe first. Writes the HTML
beside the PNG, and prints the size of the page and of its accuracy-against-size figure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.chromium import Chromium  # noqa: E402  (the tests' DevTools client; no other dependency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1180)
    parser.add_argument("--figure-only", action="store_true", help="only the accuracy-against-size figure")
    args = parser.parse_args()
    page = args.out.with_suffix(".html")
    kiln = str(Path(sys.executable).with_name("kiln"))
    subprocess.run([kiln, "report", str(args.recipe), "--out", str(page)], check=True)
    with Chromium(width=args.width, height=900) as browser:
        browser.open(page)
        box = browser.evaluate("""(() => { const r = document.querySelector('#accuracy-vs-size img')
            .getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; })()""")
        png = browser.screenshot(box if args.figure_only else None)
        size = browser.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    args.out.write_bytes(png)
    print(f"| page | {size[0]} x {size[1]} px |\n| figure | {box['width']:.0f} x {box['height']:.0f} px |\n"
          f"| screenshot | {args.out} ({len(png)} bytes) |")


if __name__ == "__main__":
    main()
