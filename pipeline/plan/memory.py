"""Plan-time memory estimate: each stage's peak host and GPU memory for a recipe on this host, from config.json
alone. The stages own their formulas (kiln.quantize.peak_memory, kiln.validate.peak_memory); this module adds
them up, says whether the largest fits this host's memory and GPUs (with CPU offload, or under
`calibration.offload: disk` its resident set and what the offload folder receives), and draws the table."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kiln import quantize, validate
from kiln.common.memory import GB, RUNTIME_BYTES, DiskOffload, ModelShape, StageMemory

__all__ = ["GB", "RUNTIME_BYTES", "DiskOffload", "ModelShape", "StageMemory", "MemoryEstimate", "estimate",
           "recipe_estimate", "disk_offload", "memory_table", "host_memory"]


@dataclass(frozen=True)
class MemoryEstimate:
    shape: ModelShape
    stages: tuple[StageMemory, ...]
    host_total: int
    host_available: int
    gpu_caps: tuple[int, ...]   # per GPU, after the recipe's gpu_memory_fraction
    offload: DiskOffload | None = None
    folder_bytes: int = 0       # what the offload folder receives: converted weights, layers calibration rewrote
    folder_holds: str = ""      # which of those, in words

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.host_bytes + s.gpu_bytes)

    def fits(self) -> bool:
        """Whether the largest stage fits this host's memory and GPU caps, with offload to CPU memory (or, under
        disk offload, its resident set fits the host and the offload folder's disk what it writes)."""
        if self.offload is not None:
            return self._offload_refusal("") is None
        peak = self.peak
        return peak.host_bytes + peak.gpu_bytes <= self.host_total + sum(self.gpu_caps)

    def refusal(self, where: str) -> str | None:
        if self.offload is not None:
            return self._offload_refusal(where)
        if self.fits():
            return None
        peak = self.peak
        gpus = f" and {len(self.gpu_caps)} GPU(s) with {sum(self.gpu_caps) / GB:.1f} GB usable" if self.gpu_caps \
            else " and no GPU"
        return (f"{where}: the model ({self.shape.params_label} parameters) needs about "
                f"{(peak.host_bytes + peak.gpu_bytes) / GB:.1f} GB at its peak ({peak.stage}: {peak.detail}), but this "
                f"host has {self.host_total / GB:.1f} GB of memory{gpus} (fix: build on a host with more memory or "
                "GPUs; `kiln plan` shows each stage's estimate, or set calibration.offload: disk)")

    def _offload_refusal(self, where: str) -> str | None:
        peak = max(self.stages, key=lambda s: s.host_bytes)
        if peak.host_bytes > self.host_total:
            return (f"{where}: under calibration.offload: disk the smallest resident set still needs about "
                    f"{peak.host_bytes / GB:.2f} GB of host memory ({peak.stage}: {peak.detail}), but this host has "
                    f"{self.host_total / GB:.2f} GB (fix: lower calibration.max_host_memory, evaluation.samples or "
                    "seq_len, or build on a host with more memory)")
        if self.folder_bytes > self.offload.folder_free:
            return (f"{where}: disk offload writes {self.folder_bytes / GB:.2f} GB ({self.folder_holds}) to "
                    f"KILN_HOME/tmp, whose "
                    f"filesystem has {self.offload.folder_free / GB:.2f} GB free (fix: free space there, point "
                    "KILN_HOME at a larger disk, or store the source as safetensors in model.dtype so that accelerate "
                    "reads it in place)")
        return None

    def as_dict(self) -> dict:
        return {
            "params": self.shape.params,
            "host_total_bytes": self.host_total,
            "host_available_bytes": self.host_available,
            "gpu_caps_bytes": list(self.gpu_caps),
            "fits": self.fits(),
            "offload": None if self.offload is None else {
                "host_budget_bytes": self.offload.host_budget, "writes_folder": self.offload.writes_folder,
                "folder_bytes": self.folder_bytes, "folder_free_bytes": self.offload.folder_free},
            "stages": [{"stage": s.stage, "host_bytes": s.host_bytes, "gpu_bytes": s.gpu_bytes,
                        "disk_bytes": s.disk_bytes, "detail": s.detail} for s in self.stages],
        }


def estimate(config: dict, dtype_bytes: int, formats, calibration_seq_len: int, evaluation_seq_len: int,
             host_total: int, host_available: int, gpu_caps: tuple[int, ...] = (),
             offload: DiskOffload | None = None, processes: int = 1) -> MemoryEstimate:
    """Peak memory per stage for a model of this config.json, quantized to each of `formats` (QuantFormat).

    `gpu_caps` are the GPUs' usable bytes when calibration runs on them (empty on the CPU); `processes`: the
    calibrating ranks, each holding the model (on the CPU, all in this host's memory).
    """
    shape, caps = ModelShape.from_config(config), tuple(gpu_caps)
    calibrate, export = quantize.peak_memory(shape, dtype_bytes, formats, calibration_seq_len, caps, offload)
    if processes > 1 and not caps:
        calibrate = replace(calibrate, host_bytes=calibrate.host_bytes * processes,
                            detail=f"{processes} ranks x ({calibrate.detail})")
    stages = (calibrate, export,
              validate.peak_memory(shape, dtype_bytes, evaluation_seq_len, quantize.exported_bytes(shape, formats),
                                   quantize.min_weight_bits(formats), caps, offload))
    if offload is None:
        return MemoryEstimate(shape, stages, host_total, host_available, caps)
    # Converted weights go to the folder before calibration; rewritten layers go back there (offload_writeback).
    writes = quantize.offload_folder_writes(formats, offload)
    return MemoryEstimate(shape, stages, host_total, host_available, caps, offload,
                          len(writes) * stages[0].disk_bytes, " and ".join(writes))


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of this host's memory, or of this process's memory cgroup where that is lower."""
    from kiln.quantize.placement import host_memory as usable

    return usable()


def recipe_estimate(loaded, folder, host) -> MemoryEstimate | None:
    """The estimate for a recipe's model (config.json in `folder`) on this host, or None without a config.

    GPUs count only when `calibration.device` lets kiln use them; `host` is kiln.compile's Host
    (GPUs found through NVML or nvidia-smi, so planning never initialises CUDA).
    """
    import json
    from pathlib import Path

    if folder is None or not (Path(folder) / "config.json").is_file():
        return None
    recipe = loaded.recipe
    config = json.loads((Path(folder) / "config.json").read_text())
    caps: tuple[int, ...] = ()
    if recipe.calibration.device.value != "cpu":
        fraction = recipe.calibration.gpu_memory_fraction
        caps = tuple(int(g.memory_mib * 2**20 * fraction) for g in host.gpus if g.memory_mib)
    total, available = host_memory()
    # A calibration batch holds batch_size windows at once: its activations scale with their tokens.
    return estimate(config, quantize.MODEL_DTYPE_BYTES[recipe.model.dtype],
                    [q for v in recipe.variants.values() for q in v.quant_formats],
                    recipe.calibration.seq_len * recipe.calibration.batch_size,
                    recipe.evaluation.seq_len, total, available, caps,
                    disk_offload(recipe, Path(folder), config, available), recipe.calibration.processes)


def disk_offload(recipe, folder, config: dict, available: int) -> DiskOffload | None:
    """The recipe's disk offload as the estimate needs it, or None when it does not offload to disk."""
    import shutil

    from pydantic import ByteSize, TypeAdapter

    from kiln.common.scratch import kiln_home
    from kiln.quantize.placement import host_budget

    calibration = recipe.calibration
    if calibration.offload.value != "disk":
        return None
    budget = host_budget(calibration.max_host_memory, available)
    stored = config.get("dtype") or config.get("torch_dtype")
    in_place = stored == recipe.model.dtype and any(folder.glob("*.safetensors"))
    home = kiln_home()
    while not home.exists():
        home = home.parent
    return DiskOffload(int(budget), recipe.evaluation.samples * recipe.evaluation.seq_len,
                       int(TypeAdapter(ByteSize).validate_python(recipe.build.max_shard_size)), not in_place,
                       shutil.disk_usage(home).free, calibration.samples * calibration.seq_len)


def memory_table(estimate_: MemoryEstimate, title: str):
    from rich.table import Table

    table = Table(title=f"{title}: estimated peak memory ({estimate_.shape.params_label} parameters)",
                  title_justify="left")
    offload = estimate_.offload
    columns = (("stage", "left"), ("host GB", "right"), ("GPU GB", "right"),
               *((("disk GB", "right"),) if offload else ()), ("what", "left"))
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for stage in estimate_.stages:
        disk = (f"{stage.disk_bytes / GB:.2f}",) if offload else ()
        table.add_row(stage.stage, f"{stage.host_bytes / GB:.2f}", f"{stage.gpu_bytes / GB:.2f}", *disk, stage.detail)
    gpus = f"{len(estimate_.gpu_caps)} GPU(s), {sum(estimate_.gpu_caps) / GB:.1f} GB usable" if estimate_.gpu_caps \
        else "no GPU used"
    verdict = "fits" if estimate_.fits() else "DOES NOT FIT"
    budget = (f"; weights in host memory capped at {offload.host_budget / GB:.2f} GB, the rest read from disk "
              + ("(converted into KILN_HOME/tmp first)" if offload.writes_folder else "in place from the source's "
                 "safetensors")) if offload else ""
    table.add_row("this host", f"{estimate_.host_total / GB:.2f}", f"{sum(estimate_.gpu_caps) / GB:.2f}",
                  *((f"{offload.folder_free / GB:.0f} free",) if offload else ()),
                  f"{verdict}: {estimate_.host_available / GB:.1f} GB available now; {gpus}{budget}")
    return table
