"""Calibration on 1 process against 2 (issue 41.5): kiln's quantize stage on the random Llama of bench/scale.py.

    python bench/distributed.py [--size large] [--formats fp8,int4_awq] [--samples 8] [--seq-len 256] [--root DIR]

For each format, kiln's quantize stage (load, calibrate, export) runs twice in its own process on the same model and
calibration windows, back to back: once in that process, once as 2 torchrun ranks (gloo) that each calibrate on half
the windows and reduce their statistics, rank 0 exporting. It prints wall seconds, the calibrate step's seconds
(rank 0's share for 2 ranks), peak RSS summed over every process of the run, and whether the 2-rank export equals the
1-process one (sha256 of every hf/ file) or, where it may not (AWQ), the largest relative difference of any scale.
On a host with 2 cores the ranks share them (one thread a rank against two for one process): the speed-up is
bounded by the cores, and what shows is the launcher's and each rank's fixed cost (imports, a model load a rank).
Timings swing when other work shares the cores: compare within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from scale_models import SIZES, calibration_tokens, make_model  # noqa: E402

QUANTIZE = r"""
import json, sys
import torch
from pathlib import Path
from kiln import quantize
from kiln.common.progress import ProgressReporter
model, samples, out, quant, processes = sys.argv[1:6]
request = quantize.QuantizeRequest(quant=quantize.QuantFormat(quant), kv_cache=quantize.KVCacheFormat.none,
                                   group_size=None, dtype="bfloat16", tp_size=1, processes=int(processes))
Path(out).mkdir(parents=True)
record = quantize.run(request, Path(model), torch.load(samples), Path(out), ProgressReporter())
print(json.dumps({"seconds": record.seconds, "distributed": record.distributed}), file=sys.__stdout__, flush=True)
"""


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and every process below it (the launcher and its ranks)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            total += int((Path(f"/proc/{pid}/statm")).read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run(model: Path, samples: Path, out: Path, quant: str, processes: int) -> dict:
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", QUANTIZE, str(model), str(samples), str(out), quant,
                                str(processes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.25):
            peak = max(peak, _tree_rss(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{quant} on {processes} process(es) failed:\n{stderr[-3000:]}")
    record = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": time.monotonic() - started, "peak_rss": peak, **record}


def compare(one: Path, two: Path) -> str:
    """'identical' when every hf/ file has the same sha256, else the largest relative scale difference."""
    def digests(folder: Path) -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    if digests(one / "hf") == digests(two / "hf"):
        return "identical"
    from safetensors import safe_open

    worst = 0.0
    for path in sorted((one / "hf").glob("*.safetensors")):
        with safe_open(path, "pt") as a, safe_open(two / "hf" / path.name, "pt") as b:
            for name in a.keys():
                if name.endswith(("weight_scale", "pre_quant_scale", "input_scale")):
                    x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
                    worst = max(worst, ((x - y).abs().max() / x.abs().max().clamp_min(1e-12)).item())
    return f"differs: scales within {100 * worst:.1f} %"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="large")
    parser.add_argument("--formats", default="fp8,int4_awq")
    parser.add_argument("--samples", type=int, default=8, choices=range(2, 9), metavar="2..8")
    parser.add_argument("--seq-len", type=int, default=256, choices=range(8, 257), metavar="8..256")
    parser.add_argument("--root", type=Path, help="where the model and the exports go (default: a temporary folder)")
    args = parser.parse_args()
    if args.root is not None:
        args.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-distributed-", dir=args.root) as root:
        root = Path(root)
        model = root / f"llama-{args.size}"
        params = make_model(model, args.size)
        samples = root / "samples.pt"
        calibration_tokens(model, samples)   # bench/scale.py's 8 x 256 windows, cut to the asked size
        import torch

        torch.save(torch.load(samples)[:args.samples, :args.seq_len].clone(), samples)
        lines = [f"Calibration on 1 and 2 processes, {date.today()}, {os.cpu_count()} cores: llama-{args.size} "
                 f"({params / 1e9:.2f}B parameters), {args.samples} x {args.seq_len} calibration tokens", "",
                 "| format | processes | wall s | calibrate s | peak RSS GB (all processes) | export |",
                 "|---|---|---|---|---|---|"]
        for quant in args.formats.split(","):
            rows = {n: run(model, samples, root / f"{quant}-{n}", quant, n) for n in (1, 2)}
            verdict = compare(root / f"{quant}-1", root / f"{quant}-2")
            for n, row in rows.items():
                lines.append(f"| {quant} | {n} | {row['wall_s']:.0f} | {row['seconds'].get('calibrate', 0):.1f} | "
                             f"{row['peak_rss'] / 1e9:.2f} | {'-' if n == 1 else verdict} |")
            print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
