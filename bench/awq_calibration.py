"""Where INT4-AWQ calibration time goes, against FP8 on the same model and text.

    python bench/awq_calibration.py [MODEL_DIR] [--samples 16] [--seq-len 128]

ModelOpt's AWQ-lite (the `awq_lite` algorithm of INT4_AWQ_CFG) runs the calibration set through the
model twice: a caching pass (activation means per input channel) and a search pass in which every
quantized linear layer runs once unquantized and then once per candidate alpha (0, 0.1, ..., 1:
11 candidates), each time fake-quantizing its weight in blocks again. FP8 ("max") runs one plain
pass. The table times each pass, for one sample per forward (kiln's default) and for the whole
set in one forward (`calibration.batch_size`), and measures what the batch size changes in the
result: the relative change of AWQ's scales, and the KL of each exported checkpoint against the
unquantized model on held-out text. Nothing here changes what ModelOpt computes per pass.
Timings swing when other work shares the cores: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _calibrate(model_dir: Path, quant, samples, batch_size: int):
    import modelopt.torch.quantization as mtq
    import torch

    from kiln.quantize import KVCacheFormat
    from kiln.quantize import modelopt_adapter as adapter

    model = adapter.load_source_model(model_dir, "bfloat16", False, False)
    config = adapter.modelopt_config(quant, KVCacheFormat.none, None)
    passes: list[float] = []

    def forward_loop(m):
        started = time.monotonic()
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                m(input_ids=samples[start:start + batch_size])
        passes.append(time.monotonic() - started)

    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, config, forward_loop)
    return model, time.monotonic() - started, passes


def _kl_to_source(model_dir: Path, hf_dir: Path, evaluation) -> float:
    import torch

    from kiln.validate.reference_loader import load_baseline_model, load_reference_model

    total = 0.0
    with torch.no_grad():
        base, quantized = load_baseline_model(model_dir), load_reference_model(hf_dir)
        for ids in evaluation:
            p = torch.log_softmax(base(input_ids=ids[None]).logits[0], -1)
            q = torch.log_softmax(quantized(input_ids=ids[None]).logits[0], -1)
            total += (p.exp() * (p - q)).sum(-1).mean().item()
    return total / len(evaluation)


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoTokenizer

    from kiln.pipeline.data.corpus import python_docs
    from kiln.pipeline.data.documents import token_samples
    from kiln.quantize import QuantFormat
    from kiln.quantize import modelopt_adapter as adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default="build/demo-model")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    model_dir = Path(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = token_samples(python_docs("train"), tokenizer, args.samples, args.seq_len)
    evaluation = token_samples(python_docs("heldout"), tokenizer, 8, args.seq_len)

    rows, scales = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for quant, batch_size in ((QuantFormat.fp8, 1), (QuantFormat.int4_awq, 1), (QuantFormat.int4_awq, args.samples)):
            model, seconds, passes = _calibrate(model_dir, quant, samples, batch_size)
            out = Path(scratch) / f"{quant.value}-{batch_size}"
            adapter.export_hf(model, out)
            del model
            if quant is QuantFormat.int4_awq:   # AWQ's chosen per-channel scales, as exported
                from safetensors.torch import load_file

                scales[batch_size] = {k: v.float() for path in out.glob("*.safetensors")
                                      for k, v in load_file(path).items() if k.endswith("pre_quant_scale")}
            rows.append({"format": quant.value, "batch_size": batch_size, "calibrate_s": round(seconds, 1),
                         "passes_s": [round(p, 1) for p in passes], "kl_to_source": _kl_to_source(model_dir, out, evaluation)})
    changed = [((scales[1][n] - scales[args.samples][n]).abs().max() / scales[1][n].abs().max()).item()
               for n in scales[1]]
    fp8 = rows[0]["calibrate_s"]
    print(f"model {model_dir}, {args.samples} x {args.seq_len} tokens, torch threads {torch.get_num_threads()}")
    print("| format | samples per forward | calibrate (s) | passes (s) | x FP8 | KL to source |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['format']} | {row['batch_size']} | {row['calibrate_s']} | {' + '.join(map(str, row['passes_s']))} "
              f"| {row['calibrate_s'] / fp8:.1f} | {row['kl_to_source']:.5f} |")
    print(f"AWQ scales, batch {args.samples} vs 1: {sum(c > 0.01 for c in changed)} of {len(changed)} layers differ by "
          f"more than 1 % (largest {max(changed):.1%})")
    print(json.dumps({"rows": rows, "scale_changes": changed}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
