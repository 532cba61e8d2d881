"""llm-compressor's oneshot, run in the interpreter that has llm-compressor (KILN_LLMCOMPRESSOR_PYTHON).

`python -m kiln.quantize.llmcompressor_worker JOB.json`: the job names the source model, the
calibration token ids (a safetensors file), the modifiers and preset scheme, and where to save the
compressed-tensors checkpoint; the worker writes `result.json` beside the job (tool versions,
seconds, device). Only torch, transformers, datasets and llm-compressor are imported here: this
interpreter has none of kiln's other dependencies.

Under torchrun (`calibration.processes` > 1, quantize/distributed.py launches it) each process is one rank of
llm-compressor's own data-parallel oneshot: each calibrates on its contiguous share of the windows, llm-compressor
reduces the statistics (observers, AWQ's activation means and losses, SmoothQuant's ranges, GPTQ's Hessians, whose
per-module work it spreads over the ranks) and global rank 0 saves. See `_Ranks` for what differs without a GPU.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TOOLS = ("llmcompressor", "compressed-tensors", "torch", "transformers")


@dataclass(frozen=True)
class OneshotJob:
    model_dir: str
    calibration: str                 # safetensors with "input_ids" [n, seq_len]
    out_dir: str                     # the HF checkpoint to write (compressed)
    modifiers: tuple[str, ...]       # "smoothquant", "gptq", "awq", in order
    scheme: str                      # compressed-tensors preset: W4A16, W4A16_ASYM, W8A8
    ignore: tuple[str, ...]          # module names or "re:" patterns kept unquantized
    dtype: str = "bfloat16"
    smoothing_strength: float | None = None
    max_shard_size: str = "5GB"
    trust_remote_code: bool = False

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def _modifiers(job: OneshotJob) -> list:
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    quantizing = {"targets": ["Linear"], "scheme": job.scheme, "ignore": list(job.ignore)}
    made = {
        "smoothquant": lambda: SmoothQuantModifier(
            **({"smoothing_strength": job.smoothing_strength} if job.smoothing_strength is not None else {})),
        "gptq": lambda: GPTQModifier(**quantizing),
        "awq": lambda: AWQModifier(**quantizing),
    }
    return [made[name]() for name in job.modifiers]


def _without_pinned_memory_on_cpu_hosts() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies, unconditionally;
    without an accelerator torch refuses ("Cannot access accelerator device when none is available").
    Pinning only speeds up copies to a GPU, so on a host without one it is skipped."""
    import torch

    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    if hasattr(IntermediatesCache, "_pin_intermediate"):
        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)


class _Ranks:
    """This process as one rank of llm-compressor 0.14's data-parallel oneshot (torchrun set WORLD_SIZE and RANK).

    With an accelerator, as llm-compressor's own DDP examples do it: `init_dist` (NCCL), rank 0 loads the weights
    into shared host memory (`load_offloaded_model`, device_map auto_offload) and every rank saves together.
    Without one, 0.14 assumes an accelerator in several places, so on a CPU host (measured on the test model, 2 gloo
    ranks against 1 process):
      - `init_dist` reads `torch.accelerator.current_accelerator().type` (None here): gloo is started directly;
      - its sequential pipeline offloads weights to host memory shared by the ranks, and with the CPU as the
        execution device SmoothQuant and AWQ smooth those shared weights in place once per rank (norm weights
        came out at 0.54x); each rank keeps a private copy instead (a plain CPU offload cache);
      - GPTQ and weight quantization spread modules over the ranks and skip broadcasting results to CPU modules
        (shared memory made it unnecessary): with private copies they are broadcast (skip_cpu=False);
      - AWQ's all-reduce moves its sums to the accelerator first: they are reduced where they are;
      - saving compresses modules in parallel through shared memory: the group is dissolved and rank 0 saves alone.
    In both cases each rank is handed its own share of the windows: 0.14.0.1's automatic partition of a dataset that
    is the same on every rank gives every rank the first share (its sampler indexes the unpartitioned dataset)."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        self.accelerated = torch.accelerator.current_accelerator() is not None
        if self.accelerated:
            from compressed_tensors.offload import init_dist

            init_dist()
        else:
            dist.init_process_group("gloo")
            _private_copies_on_cpu()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def share(self, ids):
        import torch

        return torch.tensor_split(ids, self.world)[self.rank]

    def load(self, load_model):
        if not self.accelerated:
            return load_model()
        from compressed_tensors.offload import load_offloaded_model

        with load_offloaded_model():
            return load_model(device_map="auto_offload")

    def save(self, model, save) -> None:
        import torch.distributed as dist

        if self.accelerated:
            save(model)
            dist.destroy_process_group()
            return
        dist.barrier()
        dist.destroy_process_group()
        if self.writes:
            save(model)

    def record(self, ids) -> dict:
        import torch

        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))   # torchrun's count of nodes
        return {"processes": self.world // nodes, "backend": "nccl" if self.accelerated else "gloo",
                **({"nodes": nodes} if nodes > 1 else {}),
                "samples_per_rank": [len(s) for s in torch.tensor_split(ids, self.world)]}


def _private_copies_on_cpu() -> None:
    """_Ranks on a CPU host: private offload copies, results broadcast to them, AWQ's sums reduced in host memory."""
    import functools
    import importlib

    import torch.distributed as dist
    from compressed_tensors.distributed.utils import wait_for_comms
    from compressed_tensors.offload.cache.base import OffloadCache
    from compressed_tensors.offload.cache.cpu import CPUCache

    shared_cache_for = OffloadCache.cls_from_device.__func__

    def private_cache_for(cls, device=None):
        return CPUCache if device != "disk" and str(device).startswith("cpu") else shared_cache_for(cls, device)

    OffloadCache.cls_from_device = classmethod(private_cache_for)
    broadcast = importlib.import_module("llmcompressor.utils.dist").broadcast_qparams_and_cleanup
    for name in ("llmcompressor.modifiers.gptq.base", "llmcompressor.modifiers.quantization.quantization.base"):
        importlib.import_module(name).broadcast_qparams_and_cleanup = functools.partial(broadcast, skip_cpu=False)

    def summed_in_place(data):
        data = [datum.clone() for datum in data]
        wait_for_comms([dist.all_reduce(datum, op=dist.ReduceOp.SUM, async_op=True) for datum in data])
        return data

    importlib.import_module("llmcompressor.modifiers.transform.awq.base")._allreduce_data_sum = summed_in_place


def run(job: OneshotJob) -> dict:
    from importlib.metadata import version

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _without_pinned_memory_on_cpu_hosts()
    ranks = _Ranks() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    seconds = {}
    started = time.monotonic()
    every_window = load_file(job.calibration)["input_ids"]
    ids = ranks.share(every_window) if ranks else every_window

    def load_model(**placement):
        return AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=getattr(torch, job.dtype),
                                                    use_safetensors=True, trust_remote_code=job.trust_remote_code,
                                                    **placement)

    model = ranks.load(load_model) if ranks else load_model()
    seconds["load"] = time.monotonic() - started
    started = time.monotonic()
    calibration = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # Kiln's samples are already tokenized to one length and in a fixed order: no shuffling, no truncation.
    oneshot(model=model, dataset=calibration, recipe=_modifiers(job), max_seq_length=int(ids.shape[1]),
            num_calibration_samples=int(ids.shape[0]), shuffle_calibration_samples=False)
    seconds["calibrate"] = time.monotonic() - started
    started = time.monotonic()

    def save(model) -> None:
        model.save_pretrained(job.out_dir, save_compressed=True, max_shard_size=job.max_shard_size)

    ranks.save(model, save) if ranks else save(model)
    seconds["export"] = time.monotonic() - started
    return {"tools": {name: version(name) for name in TOOLS}, "seconds": seconds,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            **({"distributed": ranks.record(every_window), "writes": ranks.writes} if ranks else {})}


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    fields = json.loads(job_path.read_text())
    job = OneshotJob(**{**fields, "modifiers": tuple(fields["modifiers"]), "ignore": tuple(fields["ignore"])})
    result = run(job)
    if result.pop("writes", True):   # one rank (global rank 0) reports
        (job_path.parent / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
