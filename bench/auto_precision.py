"""Quant auto against the plain formats: is a per-layer NVFP4/FP8 mix worth its bits, and what does the search cost?

    python bench/auto_precision.py [--models demo,smollm2-135m] [--bits 4.5,5,6] [--random small] [--home DIR]
    python bench/auto_precision.py --search-cost [--models smollm2-135m] [--before PYTHONPATH]

For each model, kiln builds (one recipe, a private KILN_HOME) plain NVFP4, plain FP8 and `quant: auto` over
[nvfp4, fp8] at each budget, with 8 calibration windows of 256 tokens (the first 8 also score the layers) and
16 evaluation windows of 256. Every number comes from the reference runtime running the exported files. It prints:

- per variant: the budget, the measured bits per weight, KL, perplexity change, top-1 agreement, and how many
  layers took each format;
- the expectation to test: at 5-6 bits the mix should sit below the straight line between NVFP4 and FP8 on the
  accuracy-against-size figure (log KL against bits). The line's KL at the mix's measured size is printed
  beside the mix's own, and the verdict, whichever way it goes;
- where the time goes: the quantize stage's seconds (load, calibrate or search, export) of each auto build
  against the plain FP8 build's. `--random small` adds a random-initialised Llama (bench/scale.py's sizes)
  for time alone (its KL means nothing).

--search-cost times, side by side in one run, what a size search costs against one budget: `kiln build` of a
single-budget auto variant, then of a search over the --bits budgets whose gate no candidate passes (so every one is
built), each in a fresh KILN_HOME; then a fourth budget added to the finished search (it must not score again).
`--before` runs the same two builds with an older kiln (a PYTHONPATH whose `kiln` package is a snapshot), where
every candidate calibrated and scored on its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

from tests.recipes import run_kiln  # noqa: E402  (the suite's helpers, no pytest)

SAMPLES, EVAL_SAMPLES, SEQ_LEN = 8, 16, 256


def recipe(folder: Path, model: Path, bits: list[float]) -> Path:
    variants = {"nvfp4": {"quant": "nvfp4"}, "fp8": {"quant": "fp8"}}
    for b in bits:
        variants[f"auto-{b:g}"] = {"quant": "auto", "auto": {"formats": ["nvfp4", "fp8"], "effective_bits": b}}
    text = {"kiln": 1, "name": "autobench", "model": {"source": str(model)},
            "calibration": {"builtin": "python-docs-train", "samples": SAMPLES, "seq_len": SEQ_LEN},
            "evaluation": {"builtin": "python-docs-heldout", "samples": EVAL_SAMPLES, "seq_len": SEQ_LEN},
            "variants": variants}
    path = folder / "autobench.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path


def build(model: Path, bits: list[float], home: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="kiln-autobench-") as folder:
        result = run_kiln("build", recipe(Path(folder), model, bits), "--json", env={"KILN_HOME": str(home)})
    if result.returncode not in (0, 1):
        raise SystemExit(f"kiln build failed:\n{result.stderr[-3000:]}")
    built = json.loads(result.stdout)
    records = {}
    for stage in built["stages"]:
        if stage["stage"] == "quantize":
            entry = home / "cache" / "quantize" / stage["key"]
            records[stage["target"]] = json.loads((entry / "kiln.json").read_text())
    return {"variants": {v["variant"]: v for v in built["variants"]}, "records": records}


def line_kl(nvfp4: dict, fp8: dict, bits: float) -> float:
    """KL on the straight line between NVFP4 and FP8 on the figure (its y axis is log KL) at `bits`."""
    (x0, y0), (x1, y1) = ((p["size"]["bits_per_weight"], math.log(p["metrics"]["mean_kl"])) for p in (nvfp4, fp8))
    return math.exp(y0 + (y1 - y0) * (bits - x0) / (x1 - x0))


def tables(name: str, built: dict, bits: list[float]) -> list[str]:
    variants, records = built["variants"], built["records"]
    lines = [f"#### {name}", "",
             "| variant | budget | measured bits | KL | KL on the NVFP4-FP8 line | ppl change % | top-1 | layers |",
             "|---|---|---|---|---|---|---|---|"]
    nvfp4, fp8 = variants["nvfp4"], variants["fp8"]
    verdicts = []
    for label in ["nvfp4", *[f"auto-{b:g}" for b in bits], "fp8"]:
        v, record = variants[label], records[label]
        m, measured = v["metrics"], v["size"]["bits_per_weight"]
        counts = Counter(record.get("layer_formats", {}).values())
        layers = ", ".join(f"{fmt} {n}" for fmt, n in sorted(counts.items())) or f"all {record['quant']}"
        budget = f"{record['auto']['effective_bits']:g}" if record.get("auto") else "-"
        on_line = line_kl(nvfp4, fp8, measured) if record.get("auto") else None
        low, high = nvfp4["size"]["bits_per_weight"], fp8["size"]["bits_per_weight"]
        if on_line is not None and low + 0.01 < measured < high - 0.01:
            verdicts.append(f"{label}: KL {m['mean_kl']:.5f} {'below' if m['mean_kl'] < on_line else 'NOT below'} "
                            f"the line's {on_line:.5f} at {measured:.2f} bits")
        lines.append(f"| {label} | {budget} | {measured:.3f} | {m['mean_kl']:.5f} | "
                     f"{'-' if on_line is None else f'{on_line:.5f}'} | {m['ppl_increase_pct']:+.2f} | "
                     f"{m['top1_agreement']:.4f} | {layers} |")
    lines += ["", "Expectation (a mix between the two sizes sits below the straight line from NVFP4 to FP8):"]
    lines += [f"- {v}" for v in verdicts] or ["- no mix measured strictly between the two formats' sizes"]
    lines += ["", "Where the time goes (quantize stage, seconds):", "",
              "| variant | load | calibrate or search | export | total | vs plain FP8 |", "|---|---|---|---|---|---|"]
    fp8_total = sum(records["fp8"]["seconds"].values())
    for label in ["fp8", "nvfp4", *[f"auto-{b:g}" for b in bits]]:
        s = records[label]["seconds"]
        total = sum(s.values())
        lines.append(f"| {label} | {s.get('load', 0) + s.get('before_calibration', 0):.1f} | {s['calibrate']:.1f} | "
                     f"{s['export']:.1f} | {total:.1f} | {total / fp8_total:.1f}x |")
    return lines + [""]


def model_folder(name: str, scratch: Path) -> Path:
    if name == "demo":
        from tests.testmodel import ensure_test_model

        return ensure_test_model()
    if name.startswith("random-"):
        from scale_models import make_model

        folder = scratch / name
        params = make_model(folder, name[len("random-"):])
        print(f"{name}: {params / 1e9:.2f}B parameters, random weights (time only)", file=sys.stderr)
        return folder
    from real_models import ensure_real_model

    return ensure_real_model(name)


def timed_build(recipe_text: dict, folder: Path, home: Path, pythonpath: str | None) -> tuple[float, list[str]]:
    """Wall seconds of one `kiln build` (the installed kiln, or the one on `pythonpath`) and the stages it ran."""
    path = folder / f"{recipe_text['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe_text, sort_keys=False))
    command = [sys.executable, "-c", "from kiln.pipeline.cli.app import main; main()", "build", str(path), "--json"]
    env = {**os.environ, "KILN_HOME": str(home), **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - started
    if result.returncode not in (0, 3):   # 3: a gate failed, as the search recipe intends
        raise SystemExit(f"kiln build failed:\n{result.stderr[-3000:]}")
    return seconds, json.loads(result.stdout)["ran"]


def search_cost(model: Path, bits: list[float], pythonpath: str | None, scratch: Path,
                score_samples: int | None, dtype: str | None) -> dict:
    def recipe(name: str, auto: dict, gates: dict) -> dict:
        auto = {**auto, **({"score_samples": score_samples} if score_samples else {})}
        return {"kiln": 1, "name": name, "model": {"source": str(model), **({"dtype": dtype} if dtype else {})},
                "calibration": {"builtin": "python-docs-train", "samples": SAMPLES, "seq_len": SEQ_LEN},
                "evaluation": {"builtin": "python-docs-heldout", "samples": EVAL_SAMPLES, "seq_len": SEQ_LEN},
                "variants": {"mix": {"quant": "auto", "auto": {"formats": ["nvfp4", "fp8"], **auto}, "gates": gates}}}

    tag = "before" if pythonpath else "now"
    folder = scratch / tag
    folder.mkdir()
    single, _ = timed_build(recipe("single", {"effective_bits": bits[len(bits) // 2]}, {}), folder,
                            folder / "home-single", pythonpath)
    unreachable = {"max_kl": 1e-12}   # every candidate fails: the search builds them all
    searched, ran = timed_build(recipe("search", {"effective_bits": bits, "search": "smallest-passing"}, unreachable),
                                folder, folder / "home-search", pythonpath)
    row = {"single": single, "search": searched, "ran": ran}
    if not pythonpath:
        more = sorted({*bits, (bits[0] + bits[1]) / 2})
        row["fourth"], row["fourth_ran"] = timed_build(
            recipe("search", {"effective_bits": more, "search": "smallest-passing"}, unreachable), folder,
            folder / "home-search", pythonpath)
    return row


def search_cost_table(name: str, bits: list[float], rows: dict) -> list[str]:
    lines = [f"#### {name}: what a size search over {len(bits)} budgets ({', '.join(f'{b:g}' for b in bits)}) costs "
             "against one budget", "",
             "| kiln | one budget (s) | the search (s) | search / one | a 4th budget added (s) | stages the 4th ran |",
             "|---|---|---|---|---|---|"]
    for tag, row in rows.items():
        fourth = f"{row['fourth']:.1f}" if "fourth" in row else "-"
        ran = ", ".join(row.get("fourth_ran", [])) or "-"
        lines.append(f"| {tag} | {row['single']:.1f} | {row['search']:.1f} | {row['search'] / row['single']:.2f}x | "
                     f"{fourth} | {ran} |")
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo", help="demo and/or real models (bench/real_models.py)")
    parser.add_argument("--bits", default="4.5,5,6", help="auto budgets, comma-separated")
    parser.add_argument("--random", default="", help="also a random-initialised Llama for time: small|medium|large")
    parser.add_argument("--home", type=Path, help="KILN_HOME to build in (default: a temporary one)")
    parser.add_argument("--search-cost", action="store_true", help="time a search against one budget, side by side")
    parser.add_argument("--before", help="with --search-cost: a PYTHONPATH holding an older kiln to time too")
    parser.add_argument("--score-samples", type=int, help="with --search-cost: windows that score the layers "
                        f"(default: all {SAMPLES}); fewer make the scores cheaper, so the search's share larger")
    parser.add_argument("--dtype", help="with --search-cost: the model's dtype (float32 where the CPU has no bf16 "
                        "matrix units: bf16 matmuls ran 6x slower than float32 on an EPYC without AVX-512)")
    args = parser.parse_args()
    bits = [float(b) for b in args.bits.split(",")]
    if args.search_cost:
        scored = args.score_samples or SAMPLES
        out = [f"Measured {date.today().isoformat()} on {os.cpu_count()} CPU cores; wall time of `kiln build` in a "
               f"fresh KILN_HOME, {SAMPLES} x {SEQ_LEN} calibration tokens (the first {scored} score the layers, "
               f"method kl), {EVAL_SAMPLES} x {SEQ_LEN} evaluation" + (f", dtype {args.dtype}" if args.dtype else "")
               + ".", ""]
        for name in [n for n in args.models.split(",") if n]:
            with tempfile.TemporaryDirectory(prefix="kiln-searchcost-") as scratch:
                model = model_folder(name, Path(scratch))
                rows = {"this kiln": search_cost(model, bits, None, Path(scratch), args.score_samples, args.dtype)}
                print(search_cost_table(name, bits, rows)[-2], flush=True)
                if args.before:
                    rows["before (--before)"] = search_cost(model, bits, args.before, Path(scratch),
                                                               args.score_samples, args.dtype)
            out += search_cost_table(name, bits, rows)
            print("\n".join(out), flush=True)
        return 0
    names = [n for n in args.models.split(",") if n] + ([f"random-{args.random}"] if args.random else [])
    out = [f"Measured {date.today().isoformat()} on {os.cpu_count()} CPU cores; {SAMPLES} x {SEQ_LEN} calibration "
           f"tokens (the first {SAMPLES} windows score the layers, method kl), {EVAL_SAMPLES} x {SEQ_LEN} evaluation.", ""]
    with tempfile.TemporaryDirectory(prefix="kiln-autobench-") as scratch:
        home = args.home or Path(scratch) / "home"
        for name in names:
            built = build(model_folder(name, Path(scratch)), bits, home)
            out += tables(name, built, bits)
            print("\n".join(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
