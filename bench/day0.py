"""Day-0 speed (issue 40.3): a calibration-free format from the safetensors shards, raced against its peers.

    python bench/day0.py [--shape 3b|8b|tiny] [--formats fp8_block,nvfp4_a16] [--workers N] [--root DIR]
                         [--skip-modelopt] [--validate]

A random Llama of the shape is written to disk once (3b: Llama 3.2 3B's, 6.4 GB of bf16 in 2 GB shards; 8b: Llama
3.1 8B's, 16 GB), then, per format, back to back on the same files, each in its own process:
  floor          every source shard read once and the day-0 output's byte count written once (the disk's own speed)
  kiln day-0     quantize.run with request.day0: ModelOpt's functions per linear, from the shards, no model built
  model_free_ptq llm-compressor 0.14's model-free PTQ of the same format (its preset scheme), as many workers
  kiln ModelOpt  quantize.run as a build ran it before day-0: the model loaded, calibrated (8 x 256 tokens), exported
Each row: wall seconds, peak RSS of the process tree (sampled every 20 ms), logical bytes read (the source's
shards) and written (the output's files). Every run starts the same way: dirty pages synced and the source's pages
evicted from the page cache (posix_fadvise DONTNEED), so the shards come from the disk; and its time ends when its
output is on the disk (a sync after the process exits). The libraries stay cached: a day-0 host has them warm.
With --validate, kiln's validation of the day-0 checkpoint (KL and perplexity against the source, 8 x 256 tokens,
the model loaded a decoder layer at a time from disk as offloaded builds do) is timed on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
# hidden, layers, MLP width, heads, KV heads, vocabulary, tied embeddings
SHAPES = {"tiny": (512, 4, 1536, 8, 8, 32000, False),
          "3b": (3072, 28, 8192, 24, 8, 128256, True),      # Llama 3.2 3B
          "8b": (4096, 32, 14336, 32, 8, 128256, False)}    # Llama 3.1 8B
# kiln's format -> llm-compressor's preset scheme for the same checkpoint contents
MODEL_FREE_SCHEMES = {"fp8_block": "FP8_BLOCK", "nvfp4_a16": "NVFP4A16", "mxfp4": "MXFP4", "mxfp8": "MXFP8",
                      "fp8_pc_pt": "FP8_DYNAMIC", "int8_wo": "W8A16"}

KILN = r"""
import json, sys, torch
from pathlib import Path
from kiln import quantize
from kiln.common.progress import SILENT
model, quant, out, day0, workers = sys.argv[1:6]
request = quantize.QuantizeRequest(quant=quantize.QuantFormat(quant), kv_cache=quantize.KVCacheFormat.none,
                                   group_size=None, dtype="bfloat16", tp_size=1, day0=day0 == "1")
samples = None if day0 == "1" else torch.randint(3, 2000, (8, 256), generator=torch.Generator().manual_seed(0))
record = quantize.run(request, Path(model), samples, Path(out), SILENT, workers=int(workers) or None)
print(json.dumps({"seconds": record.seconds, "day0": record.day0}), file=sys.__stdout__, flush=True)
"""

MODEL_FREE = r"""
import sys
from llmcompressor import model_free_ptq
model, scheme, out, workers = sys.argv[1:5]
model_free_ptq(model, out, scheme=scheme, ignore=["lm_head"], max_workers=int(workers), device="cpu")
"""

FLOOR = r"""
import os, sys
source, out, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
buffer = bytearray(64 << 20)
view = memoryview(buffer)
for name in sorted(os.listdir(source)):
    if name.endswith(".safetensors"):
        with open(os.path.join(source, name), "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
with open(out, "wb", buffering=0) as handle:
    while nbytes > 0:
        nbytes -= handle.write(view[:min(len(buffer), nbytes)])
"""


def make_model(folder: Path, shape: str) -> int:
    """A random Llama of the shape, written tensor by tensor in 2 GB shards (never whole in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))   # tests.testmodel trains the demo tokenizer's model (development tooling)
    from tests.testmodel import ensure_test_model

    hidden, layers, mlp, heads, kv_heads, vocab, tied = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                         tie_word_embeddings=tied, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    state = {k: v for k, v in skeleton.state_dict().items() if not (tied and k == "lm_head.weight")}
    # Shards filled in state-dict order, each a run of whole layers, as most published checkpoints are
    # (huggingface_hub's own splitter interleaves small tensors into earlier shards, which llm-compressor 0.14's
    # model_free_ptq refuses for NVFP4A16: "Matched ... k_proj twice before completing set").
    shards, size = [[]], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * 2
        if shards[-1] and size + nbytes > 2 * GB:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for number, names in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            tensors[name] = (torch.ones(state[name].shape) if name.endswith("norm.weight")
                             else torch.randn(state[name].shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, folder / file, metadata={"format": "pt"})
    total = sum(t.numel() * 2 for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ensure_test_model()).save_pretrained(folder)   # ids < 2048: valid here
    return sum(t.numel() for t in state.values())


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                stack += [int(c) for c in children.read().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            continue
    return total


def evict(folder: Path) -> None:
    """Dirty pages written out, then the folder's safetensors dropped from the page cache."""
    os.sync()
    for path in Path(folder).glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measured(argv: list[str], env: dict | None = None, source: Path | None = None) -> dict:
    """Wall seconds (until its writes are on the disk), peak tree RSS and the last stdout line (JSON where the child
    prints it) of one run, started with `source` out of the page cache."""
    if source is not None:
        evict(source)
    started = time.monotonic()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(child.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = child.communicate()
    os.sync()
    done.set()
    sampler.join()
    wall = time.monotonic() - started
    if child.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed ({child.returncode}):\n{err[-3000:]}")
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    return {"wall": wall, "peak_rss": peak, "out": json.loads(last) if last.startswith("{") else {}}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    parser.add_argument("--formats", default="fp8_block,nvfp4_a16")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "kiln-day0-bench")
    parser.add_argument("--skip-modelopt", action="store_true", help="leave out kiln's ModelOpt path (minutes)")
    parser.add_argument("--validate", action="store_true", help="time kiln's validation of the day-0 checkpoint")
    args = parser.parse_args()

    source = args.root / f"llama-{args.shape}"
    if not (source / "config.json").is_file():
        started = time.monotonic()
        params = make_model(source, args.shape)
        print(f"wrote {source}: {params / 1e9:.2f}B parameters, {folder_bytes(source) / GB:.2f} GB "
              f"in {time.monotonic() - started:.0f} s", flush=True)
    read = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    python = str(REPO / ".venv" / "bin" / "python")
    tool = REPO / "build" / "llmcompressor-env" / "bin" / "python"
    pythonpath = {"PYTHONPATH": os.environ.get("KILN_BENCH_PYTHONPATH", str(REPO.parent))}
    rows = []
    for quant in args.formats.split(","):
        work = args.root / "out" / quant
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        day0 = measured([python, "-c", KILN, str(source), quant, str(work / "day0"), "1", str(args.workers)],
                        pythonpath, source)
        written = folder_bytes(work / "day0" / "hf")
        floor = measured([sys.executable, "-c", FLOOR, str(source), str(work / "floor.bin"), str(written)],
                         source=source)
        (work / "floor.bin").unlink()
        runs = [("floor", floor, written), ("kiln day-0", day0, written)]
        scheme = MODEL_FREE_SCHEMES.get(quant)
        if scheme and tool.is_file():
            model_free = measured([str(tool), "-c", MODEL_FREE, str(source), scheme, str(work / "model_free"),
                                   str(args.workers)], source=source)
            runs.append((f"model_free_ptq {scheme}", model_free, folder_bytes(work / "model_free")))
            shutil.rmtree(work / "model_free")
        if not args.skip_modelopt:
            slow = measured([python, "-c", KILN, str(source), quant, str(work / "modelopt"), "0", "0"], pythonpath,
                            source)
            runs.append(("kiln ModelOpt path", slow, folder_bytes(work / "modelopt" / "hf")))
            same = _same_tensors(work / "day0" / "hf", work / "modelopt" / "hf")
            print(f"{quant}: day-0 hf/ equals the ModelOpt path's: {same}", flush=True)
            if same is True:
                shutil.rmtree(work / "modelopt")
        for name, run, out_bytes in runs:
            rows.append((quant, name, run["wall"], run["peak_rss"], read, out_bytes, floor["wall"],
                         runs[2][1]["wall"] if scheme and tool.is_file() else None,
                         runs[2][1]["peak_rss"] if scheme and tool.is_file() else None))
        if args.validate:
            rows_validate = _validate(python, source, work / "day0", pythonpath)
            print(f"{quant}: validation of the day-0 checkpoint {rows_validate}", flush=True)
        print(json.dumps({"format": quant, "day0": day0["out"]}), flush=True)
    _print_table(args, rows)


def _same_tensors(a: Path, b: Path) -> bool | list[str]:
    """True, or the files whose bytes differ (or that one side lacks)."""
    files = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    differ = [f for f in files if not (a / f).is_file() or not (b / f).is_file()
              or (a / f).read_bytes() != (b / f).read_bytes()]
    return differ or True


VALIDATE = r"""
import json, sys, time, torch
from pathlib import Path
from kiln import validate
from kiln.common.progress import SILENT
from kiln.quantize import Offload
source, checkpoint, scratch = sys.argv[1:4]
samples = torch.randint(3, 2000, (8, 256), generator=torch.Generator().manual_seed(1))
request = validate.ValidateRequest(trust_remote_code=False, allow_pickle=False, offload=Offload.disk)
started = time.monotonic()
baseline = validate.Baseline(Path(source), Path(scratch), request)
metrics = validate.run(Path(checkpoint), baseline, samples, SILENT)
print(json.dumps({"seconds": time.monotonic() - started, "kl": metrics.mean_kl}), file=sys.__stdout__, flush=True)
"""


def _validate(python: str, source: Path, checkpoint: Path, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        run = measured([python, "-c", VALIDATE, str(source), str(checkpoint / "hf"), scratch], env, source)
    return {"wall_s": round(run["wall"], 1), "peak_rss_gb": round(run["peak_rss"] / GB, 2), **run["out"]}


def _print_table(args, rows) -> None:
    print(f"\nday-0 race, {args.shape} shape, {args.workers} workers, "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores (source read from disk, output synced)")
    print(f"{'format':<10} {'run':<26} {'wall s':>8} {'peak RSS GB':>12} {'read GB':>8} {'written GB':>11} "
          f"{'x floor':>8} {'x model_free':>13} {'RSS x mf':>9}")
    for quant, name, wall, rss, read, written, floor, mf_wall, mf_rss in rows:
        versus = f"{wall / mf_wall:.2f}" if mf_wall else "-"
        rss_versus = f"{rss / mf_rss:.2f}" if mf_rss else "-"
        print(f"{quant:<10} {name:<26} {wall:>8.1f} {rss / GB:>12.2f} {read / GB:>8.2f} {written / GB:>11.2f} "
              f"{wall / floor:>8.2f} {versus:>13} {rss_versus:>9}")


if __name__ == "__main__":
    main()
