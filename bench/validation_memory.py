"""Peak memory and scratch disk of validation on a real large-vocabulary model (issue 25.6).

    python bench/validation_memory.py [--model DIR] [--checkpoint DIR] [--samples 32] [--seq-len 512]

Runs what a build's validate stage runs, `Baseline` then `run`, on python-docs-heldout samples, in a
child process, and prints its peak RSS (the kernel's ru_maxrss), the peak size of its scratch folder
(sampled every 0.2 s) and the metrics. Default model: Gemma 3 270M from bench/real_models.py
(vocabulary 262,144), validated against itself unless --checkpoint names an exported `hf` folder.
Any kiln on the import path is measured, so an older commit can be measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args) -> None:
    from transformers import AutoTokenizer

    from kiln.common.progress import ProgressReporter
    from kiln.pipeline.data.corpus import python_docs
    from kiln.pipeline.data.documents import token_samples
    from kiln.validate import Baseline, run

    samples = token_samples(python_docs("heldout"), AutoTokenizer.from_pretrained(args.model),
                            samples=args.samples, seq_len=args.seq_len)
    started = time.monotonic()
    baseline = Baseline(args.model, Path(args.scratch))
    metrics = run(args.checkpoint or args.model, baseline, samples, ProgressReporter())
    print(json.dumps({"seconds": time.monotonic() - started, **metrics.as_dict()}))


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="an exported hf folder (default: the model itself)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scratch:
        _child(args)
        return 0
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from real_models import ensure_real_model

        args.model = ensure_real_model("gemma3-270m")
    with tempfile.TemporaryDirectory(prefix="kiln-validation-memory-") as scratch:
        command = [sys.executable, __file__, "--model", str(args.model), "--samples", str(args.samples),
                   "--seq-len", str(args.seq_len), "--scratch", scratch]
        if args.checkpoint:
            command += ["--checkpoint", str(args.checkpoint)]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        peak_disk = 0
        while child.poll() is None:
            peak_disk = max(peak_disk, _folder_bytes(Path(scratch)))
            time.sleep(0.2)
        out = child.stdout.read()
    if child.returncode:
        sys.exit(f"validation failed (exit {child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    import kiln.validate

    print(f"model {args.model.name}, {args.samples} x {args.seq_len} tokens, kiln from {Path(kiln.validate.__file__).parent}")
    print(f"{'peak RSS':<22} {peak_rss / 1e9:8.2f} GB")
    print(f"{'peak scratch on disk':<22} {peak_disk / 1e9:8.2f} GB")
    print(f"{'wall time':<22} {result['seconds']:8.0f} s")
    print(f"{'metrics':<22} ppl {result['baseline_ppl']:.3f} -> {result['quantized_ppl']:.3f} "
          f"({result['ppl_increase_pct']:+.3f} %), KL {result['mean_kl']:.5f}, top-1 {result['top1_agreement']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
