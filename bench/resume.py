"""What a resumable calibration costs and saves (issue 39.3): INT4-AWQ on the 1.07B random Llama, killed at half.

    python bench/resume.py [--size large] [--samples 2] [--seq-len 64] [--root DIR]

Four runs of kiln's quantize stage (load, calibrate, export) on the same model and calibration tokens, each in its
own process, back to back:
  whole      ModelOpt's whole-model calibration, as a build without `calibration.resumable`;
  resumable  a layer at a time, each layer saved (ModelOpt's checkpoints) and its digests recorded (kiln's);
  killed     the same, SIGKILLed as soon as half the decoder layers are recorded;
  resumed    the same run again on what the killed one left: it verifies the digests and calibrates the rest.
It prints wall times, what the checkpoints hold on disk, and whether every export equals the whole-model one byte
for byte. "saved" is what the resumed run spares against starting again from nothing (the resumable run's time).
Timings swing when other work shares the cores: compare within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_models import SIZES, make_model  # noqa: E402

QUANTIZE = r"""
import json, os, signal, sys, time
STARTED = time.monotonic()
import torch
from pathlib import Path
from kiln import quantize
from kiln.common.progress import ProgressReporter
from kiln.quantize import resume
model, samples, out, resume_dir, kill_at = sys.argv[1:6]
kill_at = int(kill_at)
original = resume.LayerCheckpoints.boundary
def boundary(self, state):
    recorded = original(self, state)
    if kill_at and recorded >= kill_at:
        print(json.dumps({"killed_at_layer": recorded, "killed_after_s": time.monotonic() - STARTED}),
              file=sys.__stdout__, flush=True)   # stdout is quieted
        os.kill(os.getpid(), signal.SIGKILL)
    return recorded
resume.LayerCheckpoints.boundary = boundary
request = quantize.QuantizeRequest(quant=quantize.QuantFormat("int4_awq"), kv_cache=quantize.KVCacheFormat.none,
                                   group_size=None, dtype="bfloat16", tp_size=1)
Path(out).mkdir(parents=True)
record = quantize.run(request, Path(model), torch.load(samples), Path(out), ProgressReporter(),
                      resume_dir=Path(resume_dir) if resume_dir else None)
print(json.dumps({"seconds": record.seconds, "layer_checkpoints": record.layer_checkpoints}), file=sys.__stdout__,
      flush=True)
"""


def run(model: Path, samples: Path, out: Path, resume_dir: Path | None, kill_at: int = 0) -> dict:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", QUANTIZE, str(model), str(samples), str(out),
                           str(resume_dir or ""), str(kill_at)], capture_output=True, text=True)
    wall = time.monotonic() - started
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if kill_at:
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    else:
        assert done.returncode == 0, done.stderr[-3000:]
    return {"wall": wall, **(lines[-1] if lines else {})}


def export_digest(out: Path) -> str | None:
    hf = out / "hf"
    if not hf.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(hf.glob("*.safetensors")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="large", choices=list(SIZES))
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--root", type=Path, default=None, help="where the model and outputs go (default: a temp dir)")
    args = parser.parse_args()

    import torch

    root = args.root or Path(tempfile.mkdtemp(prefix="kiln-resume-bench-"))
    model = root / f"model-{args.size}"
    if not (model / "config.json").is_file():
        params = make_model(model, args.size)
        print(f"made a {params / 1e9:.2f}B random Llama in {model}", file=sys.stderr)
    layers = SIZES[args.size][1]
    samples = root / "samples.pt"
    torch.save(torch.randint(3, 2000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0)),
               samples)
    outs = {name: root / name for name in ("whole", "resumable", "killed", "resumed")}
    for out in outs.values():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    checkpoints, kept = root / "checkpoints", root / "checkpoints-uninterrupted"
    subprocess.run(["rm", "-rf", str(checkpoints), str(kept)], check=True)

    rows = {"whole": run(model, samples, outs["whole"], None)}
    rows["resumable"] = run(model, samples, outs["resumable"], kept)
    kept_bytes = folder_bytes(kept)
    rows["killed"] = run(model, samples, outs["killed"], checkpoints, kill_at=layers // 2)
    left_bytes = folder_bytes(checkpoints)
    rows["resumed"] = run(model, samples, outs["resumed"], checkpoints)
    reference = export_digest(outs["whole"])

    print(f"INT4-AWQ, {args.size} ({layers} decoder layers), calibration {args.samples} x {args.seq_len} tokens, "
          f"{os.cpu_count()} CPUs")
    print("| run | wall s | calibrate s | layers calibrated | export equals whole-model |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        seconds = row.get("seconds", {})
        lc = row.get("layer_checkpoints")
        calibrated = (f"{layers - lc['resumed_from_layer']} (from layer {lc['resumed_from_layer']})" if lc
                      else f"killed after {row['killed_at_layer']} recorded" if "killed_at_layer" in row
                      else f"{layers} (whole model)")
        same = "-" if name == "killed" else ("yes" if export_digest(outs[name]) == reference else "NO")
        print(f"| {name} | {row['wall']:.0f} | {seconds.get('calibrate', float('nan')):.0f} | {calibrated} | {same} |")
    saved = rows["resumable"]["wall"] - rows["resumed"]["wall"]
    print(f"checkpoint overhead (resumable - whole): {rows['resumable']['wall'] - rows['whole']['wall']:+.0f} s; "
          f"resumed run saves {saved:.0f} s of the {rows['resumable']['wall']:.0f} s a restart from layer 0 takes "
          f"({saved / rows['resumable']['wall']:.0%})")
    print(f"checkpoint folder: {kept_bytes / 1e9:.2f} GB at the end of an uninterrupted run, "
          f"{left_bytes / 1e9:.2f} GB left by the killed one")
    return 0 if all(export_digest(outs[n]) == reference for n in ("resumable", "resumed")) else 1


if __name__ == "__main__":
    sys.exit(main())
