"""Build time of a recipe: full build, cached re-build, and the bare ModelOpt calls it wraps.

    python bench/build_time.py recipes/demo.yaml

Runs everything in one go on this machine (timings swing when other work shares
the cores, so compare the ratios of one run, not numbers across runs). The bare
baseline is a fresh Python process that loads the model, calibrates with the same
token windows, and writes both exports per variant: what a hand-written script
would do, without kiln's validation, registry and cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = r"""
import sys, time, json, torch, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from kiln.pipeline.recipe.loader import load_recipe
from kiln.pipeline.data.documents import resolve_data, token_samples
from kiln.quantize import modelopt_adapter as adapter
from transformers import AutoTokenizer
loaded = load_recipe(Path(sys.argv[1])); out = Path(sys.argv[2]); recipe = loaded.recipe
model_dir = loaded.resolve(recipe.model.source)
data = resolve_data(recipe.calibration, loaded.resolve, "calibration")
samples = token_samples(data.documents(), AutoTokenizer.from_pretrained(model_dir), data.spec.samples, data.spec.seq_len)
for name, variant in recipe.variants.items():
    model = adapter.load_source_model(model_dir, recipe.model.dtype, False, False)
    adapter.calibrate(model, adapter.modelopt_config(variant.quant, variant.kv_cache, variant.effective_group_size), samples, lambda n: None)
    adapter.export_hf(model, out / name / "hf")
    adapter.export_trtllm(model, out / name / "trtllm", recipe.model.dtype, recipe.build.tp_size)
"""


def _timed(command: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 3):
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed, result


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    recipe = Path(sys.argv[1])
    kiln = str(Path(sys.executable).with_name("kiln"))
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        env = {**os.environ, "KILN_HOME": str(Path(tmp) / "home"), "MLFLOW_DISABLE_TELEMETRY": "true"}
        full, first = _timed([kiln, "build", str(recipe), "--json"], env)
        cached, second = _timed([kiln, "build", str(recipe), "--json"], env)
        bare, _ = _timed([sys.executable, "-c", BARE, str(recipe), str(Path(tmp) / "bare")], env)
        stages = {}
        build = json.loads(first.stdout)
        for stage in build["stages"]:
            if stage["stage"] == "quantize":
                record = json.loads((Path(tmp) / "home" / "cache" / "quantize" / stage["key"] / "kiln.json").read_text())
                for part, seconds in record["seconds"].items():
                    stages[part] = stages.get(part, 0.0) + seconds
        ran_again = json.loads(second.stdout)["ran"]

    rows = [
        ("kiln build, empty cache (quantize + export + validate + publish)", full),
        ("kiln build again, everything cached", cached),
        ("bare ModelOpt calls (load + calibrate + both exports)", bare),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"recipe: {recipe}  variants: {len(build['variants'])}")
    print(f"{'what':<{width}}  {'seconds':>8}")
    for label, seconds in rows:
        print(f"{label:<{width}}  {seconds:8.1f}")
    print(f"{'ratio kiln full build / bare ModelOpt':<{width}}  {full / bare:8.2f}")
    print(f"{'ratio cached re-build / full build':<{width}}  {cached / full:8.3f}")
    print(f"stages re-run by the cached build: {len(ran_again)}")
    print("inside kiln's quantize stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(stages.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
