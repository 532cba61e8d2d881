"""bench/scale.py --memory-cap: kiln with disk offload and the bare ModelOpt calls inside a hard memory limit.

Each run is put in a memory cgroup (cgroup v1's memory controller where the host mounts it, else v2's
memory.max) before it execs, so the kernel kills it at the limit: a peak that RSS sampling would miss
still counts. The limit is 0.6 x the model's bf16 bytes + 1 GB. kiln builds FP8 + FP8-KV (`--nvfp4` adds an NVFP4
variant) with calibration.offload: disk; the same recipe without offload and without a cap gives the metrics
to match. The bare calls run once per format: FP8 + FP8-KV, and INT4-AWQ (whose rewritten layers kiln writes back
to the offload folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from scale_models import BARE, GB, SAMPLES, SEQ_LEN, calibration_tokens, make_model

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")
HOST_BUDGET_OF_BF16 = 0.25     # calibration.max_host_memory, as a share of the model's bf16 bytes
SHARD = "256MB"                # the streaming exporter holds one shard in memory before writing it
FIELDS = ("baseline_ppl", "quantized_ppl", "mean_kl", "top1_agreement")
NVFP4 = "--nvfp4" in sys.argv
RUN_LIMIT_S = 2400
BARE_FORMATS = {"fp8": "FP8 + FP8-KV", "int4_awq": "INT4-AWQ"}   # BARE's last argument, and how the table names it


class MemoryCgroup:
    """A memory cgroup limited to `limit` bytes; `enter()` moves the calling process into it (for preexec_fn)."""

    def __init__(self, limit: int):
        self.v1 = (V1 / "memory.limit_in_bytes").exists()
        if not self.v1 and not (V2 / "cgroup.controllers").exists():
            sys.exit("--memory-cap needs a memory cgroup: neither cgroup v1's memory controller nor cgroup v2 is mounted")
        self.path = (V1 if self.v1 else V2) / f"kiln-bench-{os.getpid()}-{time.monotonic_ns()}"
        self.limit = limit

    def __enter__(self) -> "MemoryCgroup":
        try:
            self.path.mkdir()
        except PermissionError:
            sys.exit(f"--memory-cap must run as root to create {self.path}")
        # A file page is charged to the group that first read it: the model's pages cached by an earlier run
        # would not count against this one's limit (measured: the bare INT4-AWQ calls killed in 8 s under
        # 1.30 GB in one run, and mapping 3.1 GB for 15 minutes under the same cap in the next). Dropped here,
        # every page the run maps is read again and charged to its own group.
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        (self.path / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(self.limit))
        if not self.v1:
            (self.path / "memory.swap.max").write_text("0")
        return self

    def enter(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        return int((self.path / name).read_text()) if (self.path / name).exists() else 0

    def oom_kills(self) -> int:
        text = (self.path / ("memory.oom_control" if self.v1 else "memory.events")).read_text()
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def run(command: list[str], env: dict, cgroup: MemoryCgroup | None) -> dict:
    """Wall time, exit code, peak RSS, bytes read from disk (ru_inblock) and, capped, the group's peak and kills."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env,
                                   preexec_fn=cgroup.enter if cgroup else None)
        # A run that thrashes under its cap (re-reading memory-mapped weights) is stopped, and the table says so.
        limit = threading.Timer(RUN_LIMIT_S, process.kill)
        limit.start()
        _, status, usage = os.wait4(process.pid, 0)
        timed_out = limit.finished.is_set()   # set when it fired (cancel comes after)
        limit.cancel()
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    return {"seconds": seconds, "code": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
            "peak_rss": usage.ru_maxrss * 1024,
            "read_bytes": usage.ru_inblock * 512, "group_peak": cgroup.peak() if cgroup else None,
            "oom_kills": cgroup.oom_kills() if cgroup else None, "stdout": stdout, "stderr": stderr}


def recipe(folder: Path, model: Path, name: str, offload: bool, host_budget: int) -> Path:
    calibration = {"builtin": "python-docs-train", "samples": SAMPLES, "seq_len": SEQ_LEN, "device": "cpu"}
    if offload:
        calibration.update({"offload": "disk", "max_host_memory": str(host_budget)})
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({
        "kiln": 1, "name": name, "model": {"source": str(model), "dtype": "bfloat16"}, "calibration": calibration,
        "evaluation": {"builtin": "python-docs-heldout", "samples": SAMPLES, "seq_len": SEQ_LEN},
        "variants": {"fp8": {"quant": "fp8", "kv_cache": "fp8"}, "int4-awq": {"quant": "int4_awq"},
                     **({"nvfp4": {"quant": "nvfp4"}} if NVFP4 else {})},
        "build": {"target": "trtllm-pytorch", "max_shard_size": SHARD},
    }))
    return path


def kiln_build(root: Path, model: Path, name: str, offload: bool, host_budget: int, cgroup) -> dict:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "KILN_HOME": str(root / f"home-{name}")}
    kiln = str(Path(sys.executable).with_name("kiln"))
    result = run([kiln, "build", str(recipe(root, model, name, offload, host_budget)), "--json"], env, cgroup)
    if result["code"] == 0:
        document = json.loads(result["stdout"])
        result["metrics"] = {v["variant"]: v["metrics"] for v in document["variants"]}
        result["stages"] = {s["stage"]: s.get("seconds") or 0.0 for s in document["stages"]}
        records = [json.loads(p.read_text()) for p in (root / f"home-{name}" / "cache" / "quantize").glob("*/kiln.json")]
        result["on_disk"] = max(len(r["placement"].get("on_disk", [])) for r in records)
        result["offload_folder_bytes"] = sum(r["placement"].get("offload_folder_bytes", 0) for r in records)
    return result


def measure_capped(size: str, root: Path, caps_gb: list[float] | None = None) -> dict:
    """kiln without offload or cap (the metrics to match), then the bare calls and kiln (disk offload) under each
    cap (default: 0.6 x bf16 + 1 GB); the table so far goes to stderr after each cap."""
    model = root / f"llama-{size}"
    params = make_model(model, size)
    bf16 = 2 * params
    caps = [int(c * GB) for c in caps_gb] if caps_gb else [int(0.6 * bf16 + 1 * GB)]
    host_budget = int(HOST_BUDGET_OF_BF16 * bf16)
    samples = root / f"samples-{size}.pt"
    calibration_tokens(model, samples)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    free = _public(kiln_build(root, model, f"free-{size}", False, host_budget, None))
    print(f"{size}: kiln, no offload, no cap: exit {free['code']}", file=sys.stderr)
    row = {"size": size, "params": params, "bf16_bytes": bf16, "host_budget": host_budget, "runs": [], "free": free}
    for cap in caps:
        print(f"{size}: {params / 1e9:.2f}B parameters, {bf16 / GB:.2f} GB bf16, cap {cap / GB:.2f} GB", file=sys.stderr)
        bare = {}
        for quant in BARE_FORMATS:
            with MemoryCgroup(cap) as group:
                bare[quant] = run([sys.executable, "-c", BARE, str(model), str(samples),
                                   str(root / f"bare-{size}-{cap}-{quant}"), quant], env, group)
            print(f"  bare ModelOpt calls ({quant}), capped: exit {bare[quant]['code']}", file=sys.stderr)
        with MemoryCgroup(cap) as group:
            capped = kiln_build(root, model, f"capped-{size}-{cap}", True, host_budget, group)
        print(f"  kiln, disk offload, capped: exit {capped['code']}", file=sys.stderr)
        if capped["code"] != 0:
            print(capped["stderr"][-3000:], file=sys.stderr)
        row["runs"].append({"cap": cap, "bare": {q: _public(b) for q, b in bare.items()}, "capped": _public(capped)})
        print(capped_table([row]), file=sys.stderr)
    return row


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("stdout", "stderr")}


def _run_cell(result: dict) -> str:
    if result.get("timed_out"):
        return f"stopped after {RUN_LIMIT_S} s (thrashing under the cap)"
    if result["code"] != 0:
        killed = " (killed by the cap)" if result.get("oom_kills") else ""
        return f"exit {result['code']}{killed}"
    return "completed"


def capped_table(rows: list[dict]) -> str:
    lines = [
        "| size | bf16 GB | cap GB | host budget GB | run | result | wall s | quantize / validate s | group peak GB "
        "| peak RSS GB | read from disk GB | modules on disk | offload folder GB | max rel. diff vs no offload |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        free = r["free"]
        measured = [(c["cap"], f"bare ModelOpt calls ({BARE_FORMATS[q]}), capped", x)
                    for c in r["runs"] for q, x in c["bare"].items()]
        measured += [(c["cap"], "kiln, offload: disk, capped", c["capped"]) for c in r["runs"]]
        for cap, label, x in sorted(measured, key=lambda m: -m[0]) + [(None, "kiln, no offload, no cap", free)]:
            stages = x.get("stages") or {}
            diff = "-"
            if x is not free and x.get("metrics") and free.get("metrics"):
                diff = f"{max(abs(x['metrics'][v][f] / free['metrics'][v][f] - 1) for v in x['metrics'] for f in FIELDS):.1e}"
            group = f"{x['group_peak'] / GB:.2f}" if x.get("group_peak") else "-"
            lines.append(
                f"| {r['size']} | {r['bf16_bytes'] / GB:.2f} | {cap / GB if cap else float('nan'):.2f} "
                f"| {r['host_budget'] / GB:.2f} | {label} | {_run_cell(x)} | {x['seconds']:.0f} "
                f"| {stages.get('quantize', 0):.0f} / {stages.get('validate', 0):.0f} | {group} "
                f"| {x['peak_rss'] / GB:.2f} | {x['read_bytes'] / GB:.2f} | {x.get('on_disk', '-')} "
                f"| {x.get('offload_folder_bytes', 0) / GB:.2f} | {diff} |")
    return "\n".join(lines).replace("| nan |", "| none |")
