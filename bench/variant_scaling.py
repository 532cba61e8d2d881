"""What a variant costs alone and inside a recipe with others (the source model is read once per build).

    python bench/variant_scaling.py

Builds five single-variant recipes and one recipe with all five, each from an empty
cache, on the trained test model, and prints the seconds and the ratio
    five together / sum of the five alone.
Calibration passes still run per variant (each format calibrates its own quantizers);
what is shared is the interpreter start, the imports, reading and tokenizing the data,
loading the source model and the unquantized baseline's logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))   # tests.testmodel: development tooling, not in kiln
VARIANTS = {
    "fp8": {"quant": "fp8", "kv_cache": "fp8"},
    "nvfp4": {"quant": "nvfp4"},
    "int4-awq": {"quant": "int4_awq"},
    "int8-sq": {"quant": "int8_sq"},
    "int8-wo": {"quant": "int8_wo"},
}


def _build_seconds(model: Path, variants: dict, workdir: Path, name: str) -> float:
    recipe = {"kiln": 1, "name": name, "model": {"source": str(model)},
              "calibration": {"builtin": "python-docs-train", "samples": 32, "seq_len": 256},
              "evaluation": {"builtin": "python-docs-heldout", "samples": 32, "seq_len": 256},
              "variants": variants}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "KILN_HOME": str(workdir / f"home-{name}")}
    started = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).with_name("kiln")), "build", str(path), "--json"],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(result.stderr[-2000:])
    return time.perf_counter() - started


def main() -> int:
    from tests.testmodel import ensure_test_model

    model = ensure_test_model()
    with tempfile.TemporaryDirectory(prefix="kiln-scaling-") as tmp:
        alone = {name: _build_seconds(model, {name: spec}, Path(tmp), f"one-{name}") for name, spec in VARIANTS.items()}
        together = _build_seconds(model, VARIANTS, Path(tmp), "all")
    print(f"{'build (empty cache)':<28} {'seconds':>8}")
    for name, seconds in alone.items():
        print(f"{'only ' + name:<28} {seconds:8.1f}")
    print(f"{'all five in one recipe':<28} {together:8.1f}")
    print(f"{'ratio together / sum alone':<28} {together / sum(alone.values()):8.2f}")
    print(f"{'ratio together / mean alone':<28} {together / (sum(alone.values()) / len(alone)):8.2f}  (5.00 = no sharing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
