"""Accuracy of every format on the exported checkpoints of the trained test model.

    python bench/accuracy.py [--home DIR]

Builds recipes/demo-matrix.yaml (against the trained test model) with kiln, so every
number comes from the reference runtime running the exported files, and
recipes/demo-llmcompressor.yaml (llm-compressor's compressed-tensors variants, rows
"(llmc) ...") where an llm-compressor interpreter is at hand (KILN_LLMCOMPRESSOR_PYTHON,
or build/llmcompressor-env from `make llmcompressor-env`). Then adds two rows the bench
computes itself: the unquantized model and plain round-to-nearest INT4 (group 128, no
AWQ, no GPTQ). Prints one table and checks three expectations from the literature; a
contradiction is printed, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kiln.quantize import checkpoint_size

REPO = Path(__file__).resolve().parents[1]
FOUR_BIT = ("nvfp4", "int4_awq", "int4_gptq", "w4a8_awq")


LLMC_PYTHON = os.environ.get("KILN_LLMCOMPRESSOR_PYTHON") or str(REPO / "build" / "llmcompressor-env" / "bin" / "python")


def _build(home: Path, model: Path, recipe_name: str = "demo-matrix.yaml") -> dict:
    workdir = home / "bench-recipes"
    (workdir / "recipes").mkdir(parents=True, exist_ok=True)
    (workdir / "build").mkdir(exist_ok=True)
    link = workdir / "build" / "demo-model"
    if not link.exists():
        link.symlink_to(model, target_is_directory=True)
    recipe = workdir / "recipes" / recipe_name
    recipe.write_text((REPO / "recipes" / recipe_name).read_text())
    kiln = str(Path(sys.executable).with_name("kiln"))
    result = subprocess.run([kiln, "build", str(recipe), "--json"], capture_output=True, text=True,
                            env={**os.environ, "KILN_HOME": str(home), "KILN_LLMCOMPRESSOR_PYTHON": LLMC_PYTHON})
    if result.returncode not in (0, 3):
        sys.exit(f"kiln build failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def _rtn_int4(model_dir: Path, group: int = 128):
    """Round-to-nearest INT4, symmetric per group of `group` inputs, computed here without ModelOpt."""
    from kiln.validate.runtime import ReferenceLinear, load_baseline_model

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="KILN_HOME to build in (default: a temporary one)")
    args = parser.parse_args()

    from kiln.pipeline.testmodel import ensure_test_model

    model = ensure_test_model()
    with tempfile.TemporaryDirectory(prefix="kiln-accuracy-") as tmp:
        home = args.home or Path(tmp)
        builds = [("", _build(home, model))]
        if Path(LLMC_PYTHON).exists():
            builds.append(("(llmc) ", _build(home, model, "demo-llmcompressor.yaml")))
        else:
            print(f"llm-compressor rows skipped: no {LLMC_PYTHON} (make llmcompressor-env)", file=sys.stderr)
        rows = []
        for prefix, build in builds:
            keys = {s["target"]: s["key"] for s in build["stages"] if s["stage"] == "quantize"}
            for v in build["variants"]:
                checkpoint = home / "cache" / "quantize" / keys[v["variant"]]
                record = json.loads((checkpoint / "kiln.json").read_text())
                size = (checkpoint / "hf" / "model.safetensors").stat().st_size
                rows.append({"variant": prefix + v["variant"], "format": v["quant"], "kv": v["kv_cache"],
                             "group": record["group_size"], "bits": checkpoint_size(checkpoint / "hf", model).bits_per_weight,
                             "size": size, **v["metrics"]})

    from kiln.pipeline.corpus import python_docs
    from kiln.pipeline.data import token_samples
    from kiln.validate import Baseline
    from kiln.validate.metrics import compare

    recipe_eval = {"samples": 32, "seq_len": 256}  # as in recipes/demo-matrix.yaml
    from transformers import AutoTokenizer

    samples = token_samples(python_docs("heldout"), AutoTokenizer.from_pretrained(model), **recipe_eval)
    with tempfile.TemporaryDirectory() as scratch:
        rtn = compare(Baseline(model, Path(scratch)).logits(samples), _rtn_int4(model), samples)
    source_size = (model / "model.safetensors").stat().st_size
    rows.append({"variant": "(bench) RTN int4 g128", "format": "int4_rtn", "kv": "none", "group": 128,
                 "bits": 4 + 32 / 128, "size": None, **rtn.as_dict()})
    rows.insert(0, {"variant": "(source) bf16", "format": "bf16", "kv": "none", "group": None, "bits": 16.0,
                    "size": source_size, "ppl_increase_pct": 0.0, "mean_kl": 0.0, "top1_agreement": 1.0,
                    "baseline_ppl": rtn.baseline_ppl})

    print(f"test model {model.name}; evaluation: python-docs-heldout, 32 x 256 tokens; baseline perplexity "
          f"{rtn.baseline_ppl:.2f}")
    header = f"{'variant':<22} {'format':<10} {'KV':<6} {'bits/w':>6} {'size MB':>8} {'ppl %':>8} {'KL':>9} {'top-1':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        size = f"{r['size'] / 1e6:8.2f}" if r["size"] else f"{'-':>8}"
        print(f"{r['variant']:<22} {r['format']:<10} {r['kv']:<6} {r['bits']:6.2f} {size} "
              f"{r['ppl_increase_pct']:+8.3f} {r['mean_kl']:9.5f} {r['top1_agreement']:7.4f}")

    by_variant = {r["variant"]: r for r in rows}
    rtn_kl = by_variant["(bench) RTN int4 g128"]["mean_kl"]
    fp8_kl = min(r["mean_kl"] for r in rows if r["format"] == "fp8" and r["kv"] == "none") \
        if any(r["format"] == "fp8" and r["kv"] == "none" for r in rows) else by_variant["fp8"]["mean_kl"]
    four_bit = [r for r in rows if r["format"] in FOUR_BIT and r["kv"] in ("none", "fp8")]
    checks = [
        ("INT4-AWQ beats round-to-nearest INT4 on KL", by_variant["int4-awq"]["mean_kl"] < rtn_kl),
        ("INT4-GPTQ beats round-to-nearest INT4 on KL", by_variant["int4-gptq"]["mean_kl"] < rtn_kl),
        ("FP8 is closer to the baseline than every 4-bit format", all(fp8_kl < r["mean_kl"] for r in four_bit)),
    ]
    checks += [(f"{name} beats round-to-nearest INT4 on KL", by_variant[name]["mean_kl"] < rtn_kl)
               for name in ("(llmc) int4-awq", "(llmc) int4-gptq") if name in by_variant]
    print()
    for claim, holds in checks:
        print(f"{'as expected' if holds else 'CONTRADICTS the literature'}: {claim}")
    if not checks[2][1]:
        closer = [r["variant"] for r in four_bit if r["mean_kl"] <= fp8_kl]
        print(f"  4-bit variants at or below FP8's KL {fp8_kl:.5f}: {', '.join(closer)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
