"""kiln at real sizes: random-initialised Llama models, one FP8 + FP8-KV variant each, against the
bare ModelOpt calls on the same model and calibration tokens.

    python bench/scale.py                 # three sizes, the largest about 1.1B parameters
    python bench/scale.py --sizes small   # one size (small | medium | large)
    python bench/scale.py --memory-cap    # kiln with disk offload, and the bare calls, under a hard memory limit
    python bench/scale.py --awq [--before PYTHONPATH] [--calibration 2x64]   # INT4-AWQ in memory: peak RSS by step

For each size it prints parameters and bf16 bytes; kiln's wall time per stage and in total; the
bare calls' wall time (load, calibrate, both exports) and the ratio; the peak RSS of each and RSS
divided by the model's bf16 bytes. Each run is its own process, measured with wait4(), so one
run's peak is not another's. Both run in one go on this machine: compare the ratios of one run
(timings swing when other work shares the cores). Tokens: 8 x 256 calibration, 8 x 256 evaluation.

Targets at the largest size: kiln's peak RSS and total time (validation included) at most 1.5x the
bare run's, and kiln's peak RSS at most 1.5x bf16 bytes + 1.5 GB.

--memory-cap (root; cgroup v1's memory controller, or v2's memory.max): each run goes into a memory cgroup
limited to 0.6 x the model's bf16 bytes + 1 GB, so the kernel kills what does not fit (no RSS sampling).
kiln builds with calibration.offload: disk; the bare calls load the whole model as before. kiln's metrics are
compared with the same recipe built without offload and without the cap.

--awq (large by default): kiln builds one INT4-AWQ variant in memory (no offload), its RSS sampled every 100 ms
and attributed to the progress step running (load, calibrate, export, evaluate...); with --before, the same build
by an older kiln (a PYTHONPATH whose `kiln` is a snapshot) first. Target: peak RSS at most 2 x the bf16 bytes, the
exported files byte-identical to the older kiln's. --calibration NxLEN shortens AWQ's calibration (8x256 by default;
evaluation stays 8x256), whose time, not memory, grows with it.
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
from pathlib import Path

from scale_models import BARE, GB, SAMPLES, SEQ_LEN, SIZES, calibration_tokens, make_model


def run_measured(command: list[str], env: dict) -> tuple[float, int, str, str]:
    """(wall seconds, peak RSS bytes of that process tree's largest process, stdout, stderr)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(command)} failed ({code}):\n{stderr[-3000:]}")
    return elapsed, usage.ru_maxrss * 1024, stdout, stderr


def recipe_for(folder: Path, model: Path) -> Path:
    recipe = folder / "scale.yaml"
    recipe.write_text(
        "kiln: 1\nname: scale\n"
        f"model: {{source: {model}, dtype: bfloat16}}\n"
        f"calibration: {{builtin: python-docs-train, samples: {SAMPLES}, seq_len: {SEQ_LEN}, device: cpu}}\n"
        f"evaluation: {{builtin: python-docs-heldout, samples: {SAMPLES}, seq_len: {SEQ_LEN}}}\n"
        "variants:\n  fp8: {quant: fp8, kv_cache: fp8}\n")
    return recipe


def measure(size: str, root: Path) -> dict:
    model = root / f"llama-{size}"
    started = time.perf_counter()
    params = make_model(model, size)
    print(f"{size}: {params / 1e9:.2f}B parameters written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    samples = root / f"samples-{size}.pt"
    calibration_tokens(model, samples)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "KILN_HOME": str(root / f"home-{size}")}

    bare_s, bare_rss, bare_out, _ = run_measured([sys.executable, "-c", BARE, str(model), str(samples),
                                                 str(root / f"bare-{size}")], env)
    bare_stages = json.loads(bare_out.strip().splitlines()[-1])
    kiln = str(Path(sys.executable).with_name("kiln"))
    kiln_s, kiln_rss, kiln_out, _ = run_measured([kiln, "build", str(recipe_for(root, model)), "--json"], env)
    document = json.loads(kiln_out)
    stages = {s["stage"]: s.get("seconds") or 0.0 for s in document["stages"] if s["stage"] != "fetch"}
    quantize_key = next(s["key"] for s in document["stages"] if s["stage"] == "quantize")
    record = json.loads((root / f"home-{size}" / "cache" / "quantize" / quantize_key / "kiln.json").read_text())
    bf16 = params * 2
    return {"size": size, "params": params, "bf16_bytes": bf16,
            "bare": {"seconds": bare_s, "stages": bare_stages, "peak_rss": bare_rss},
            "kiln": {"seconds": kiln_s, "stages": stages, "quantize_stages": record["seconds"], "peak_rss": kiln_rss,
                     "metrics": document["variants"][0]["metrics"]}}


def run_sampled(command: list[str], env: dict) -> tuple[float, dict[str, dict[str, int]], str]:
    """(wall seconds, {progress step: peak VmRSS / RssAnon / RssFile bytes}, stdout) of one process, sampled every
    100 ms; a step is what the process's progress lines say started last."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    step, peaks, tail = ["load"], {}, []

    def follow() -> None:
        for line in process.stderr:
            tail.append(line)
            if line.rstrip().endswith(": started"):
                step[0] = line.rstrip()[:-len(": started")].split(" (pass")[0]

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    out = []
    threading.Thread(target=lambda: out.append(process.stdout.read()), daemon=True).start()
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status
                          if line.startswith(("VmRSS", "RssAnon", "RssFile"))}
        except (OSError, ValueError, IndexError):
            break
        peak = peaks.setdefault(step[0], {})
        for name, value in fields.items():
            peak[name] = max(peak.get(name, 0), value)
        time.sleep(0.1)
    code = process.wait()
    reader.join(timeout=5)
    if code != 0:
        sys.exit(f"{' '.join(command)} failed ({code}):\n{''.join(tail)[-3000:]}")
    time.sleep(0.2)
    return time.perf_counter() - started, peaks, out[0] if out else ""


def measure_awq(size: str, root: Path, before: str | None, samples: int = SAMPLES, seq_len: int = SEQ_LEN) -> dict:
    model = root / f"llama-{size}"
    params = make_model(model, size)
    recipe = root / "awq.yaml"
    recipe.write_text(
        "kiln: 1\nname: awq\n"
        f"model: {{source: {model}, dtype: bfloat16}}\n"
        f"calibration: {{builtin: python-docs-train, samples: {samples}, seq_len: {seq_len}, device: cpu}}\n"
        f"evaluation: {{builtin: python-docs-heldout, samples: {SAMPLES}, seq_len: {SEQ_LEN}}}\n"
        "variants:\n  int4-awq: {quant: int4_awq}\n")
    runs = {}
    for label, pythonpath in ([("before (--before)", before)] if before else []) + [("this kiln", None)]:
        home = root / f"home-awq-{len(runs)}"
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "KILN_HOME": str(home),
               **({"PYTHONPATH": pythonpath} if pythonpath else {})}
        command = [sys.executable, "-c", "from kiln.pipeline.cli.app import main; main()", "build", str(recipe), "--json"]
        seconds, peaks, out = run_sampled(command, env)
        document = json.loads(out)
        key = next(s["key"] for s in document["stages"] if s["stage"] == "quantize")
        hf = home / "cache" / "quantize" / key / "hf"
        digest = hashlib.sha256()
        for file in sorted(hf.iterdir()):
            digest.update(file.name.encode() + file.read_bytes())
        runs[label] = {"seconds": seconds, "peaks": peaks, "hf_sha256": digest.hexdigest(),
                       "kl": document["variants"][0]["metrics"]["mean_kl"]}
    return {"size": size, "params": params, "bf16_bytes": params * 2, "runs": runs, "calibration": (samples, seq_len)}


def awq_table(row: dict) -> str:
    bf16 = row["bf16_bytes"]
    samples, seq_len = row["calibration"]
    lines = [f"INT4-AWQ in memory, {row['params'] / 1e9:.2f}B parameters, bf16 {bf16 / GB:.2f} GB, calibration "
             f"{samples} x {seq_len} tokens "
             f"(target: peak RSS at most 2 x bf16 = {2 * bf16 / GB:.2f} GB)", "",
             "| kiln | step | peak RSS GB (x bf16) | of it anonymous GB | of it file-backed GB |", "|---|---|---|---|---|"]
    for label, run in row["runs"].items():
        for step, peak in run["peaks"].items():
            lines.append(f"| {label} | {step} | {peak.get('VmRSS', 0) / GB:.2f} ({peak.get('VmRSS', 0) / bf16:.2f}) "
                         f"| {peak.get('RssAnon', 0) / GB:.2f} | {peak.get('RssFile', 0) / GB:.2f} |")
        top = max(p.get("VmRSS", 0) for p in run["peaks"].values())
        lines.append(f"| {label} | **whole build: {run['seconds']:.0f} s** | **{top / GB:.2f} ({top / bf16:.2f})** "
                     f"| | hf/ sha256 {run['hf_sha256'][:16]}, KL {run['kl']:.5f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| size | parameters | bf16 GB | kiln quantize s (load / baseline / calibrate / export) | kiln validate s | kiln publish s "
        "| kiln total s | bare s (load / calibrate / export) | time ratio | kiln peak RSS GB (x bf16) "
        "| bare peak RSS GB (x bf16) | RSS ratio | budget 1.5 x bf16 + 1.5 GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k, b, bf16 = r["kiln"], r["bare"], r["bf16_bytes"]
        q = k["quantize_stages"]
        budget = 1.5 * bf16 + 1.5 * GB
        lines.append(
            f"| {r['size']} | {r['params'] / 1e9:.2f}B | {bf16 / GB:.2f} "
            f"| {k['stages']['quantize']:.0f} ({q['load']:.0f} / {q.get('before_calibration', 0):.0f} / {q['calibrate']:.0f} / {q['export']:.0f}) "
            f"| {k['stages']['validate']:.0f} | {k['stages']['publish']:.0f} | {k['seconds']:.0f} "
            f"| {b['seconds']:.0f} ({b['stages']['load']:.0f} / {b['stages']['calibrate']:.0f} / {b['stages']['export']:.0f}) "
            f"| {k['seconds'] / b['seconds']:.2f} | {k['peak_rss'] / GB:.2f} ({k['peak_rss'] / bf16:.2f}) "
            f"| {b['peak_rss'] / GB:.2f} ({b['peak_rss'] / bf16:.2f}) | {k['peak_rss'] / b['peak_rss']:.2f} "
            f"| {budget / GB:.2f}: {'met' if k['peak_rss'] <= budget else 'MISSED'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None,
                        help="default: all three; with --memory-cap, large")
    parser.add_argument("--memory-cap", action="store_true", help="run under a hard memory limit (needs root)")
    parser.add_argument("--nvfp4", action="store_true", help="with --memory-cap: an NVFP4 variant beside FP8 + FP8-KV")
    parser.add_argument("--caps", nargs="+", type=float, metavar="GB",
                        help="with --memory-cap: the limits to run under (default: 0.6 x bf16 + 1 GB)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--awq", action="store_true", help="INT4-AWQ in memory: peak RSS by step")
    parser.add_argument("--before", help="with --awq: a PYTHONPATH holding an older kiln to measure first")
    parser.add_argument("--calibration", default=f"{SAMPLES}x{SEQ_LEN}", metavar="NxLEN",
                        help="with --awq: calibration windows x tokens (AWQ's memory barely depends on them, its time "
                             "does: on a CPU without bf16 units 8x256 calibrates the large model for about an hour)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-scale-") as tmp:
        if args.awq:
            for size in args.sizes or ["large"]:
                samples, seq_len = (int(n) for n in args.calibration.split("x"))
                rows.append(measure_awq(size, Path(tmp), args.before, samples, seq_len))
                print(awq_table(rows[-1]))
        elif args.memory_cap:
            from capped import capped_table, measure_capped

            for size in args.sizes or ["large"]:
                rows.append(measure_capped(size, Path(tmp), args.caps))
            print(capped_table(rows))
        else:
            for size in args.sizes or list(SIZES):
                rows.append(measure(size, Path(tmp)))
                print(table(rows[-1:]), file=sys.stderr)
            print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
