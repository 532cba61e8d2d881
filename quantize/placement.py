"""Where calibration, export and validation run: the CPU, or every visible GPU with CPU offload.

One small record, `Placement`, decided once per build from the recipe's `calibration.device`
and the GPUs torch can see, then handed to the quantize and validate stages. What kiln hands
transformers and accelerate is computed here and nowhere else, so a contract test can pin it
for any set of GPUs without one being present.

The anchor is ModelOpt's own `examples/llm_ptq`: accelerate's `device_map="auto"` over all
visible GPUs, with a per-GPU memory cap (a fraction of each GPU), spilling what does not fit
to CPU memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Offload(str, Enum):
    """Where weights that do not fit go: nowhere (none), host memory after the GPUs (cpu), then disk (disk)."""

    none = "none"
    cpu = "cpu"
    disk = "disk"


# Host memory kept back from the CPU offload budget: the interpreter, torch, ModelOpt and the
# calibration activations live there too.
HOST_RESERVE_BYTES = 2 << 30


@dataclass(frozen=True)
class VisibleGpu:
    index: int            # torch's index, after CUDA_VISIBLE_DEVICES
    name: str
    total_bytes: int


@dataclass(frozen=True)
class Placement:
    device: str                                   # "cpu" or "cuda": where the math runs
    gpus: tuple[VisibleGpu, ...] = ()
    max_memory: dict = field(default_factory=dict)   # accelerate's {gpu index: bytes, "cpu": bytes}
    offload: str = Offload.none.value             # disk: what exceeds max_memory is read from disk per layer

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def to_disk(self) -> bool:
        return self.offload == Offload.disk.value

    def load_kwargs(self, device_map: dict | None = None, offload_folder: str | None = None) -> dict:
        """What `from_pretrained` gets beyond the dtype: nothing on the CPU; a device map with caps on GPUs;
        under disk offload the device map kiln computed (offload_device_map) and the folder for what accelerate
        cannot read back from the source files themselves."""
        if self.to_disk:
            return {"device_map": device_map, "offload_folder": offload_folder}
        if not self.on_gpu:
            return {}
        return {"device_map": "auto", "max_memory": dict(self.max_memory)}

    def dispatch_kwargs(self) -> dict:
        """accelerate's `infer_auto_device_map` caps for a model built on the CPU (the reference runtime)."""
        return {"max_memory": dict(self.max_memory)} if self.on_gpu else {}

    def record(self) -> dict:
        """What kiln.json keeps: the device, the GPUs' names and the offload (the caps are this host's business)."""
        return {"device": self.device, "gpus": [g.name for g in self.gpus], "offload": self.offload}

    def as_dict(self) -> dict:
        return {**asdict(self), "max_memory": {str(k): v for k, v in self.max_memory.items()}}


def plan_placement(device: Device | str, gpus: list[VisibleGpu] | tuple[VisibleGpu, ...], gpu_memory_fraction: float,
                   host_memory_bytes: int, offload: Offload | str = Offload.none,
                   max_host_memory: int | None = None) -> Placement:
    """The placement for a recipe's `device` and `offload` on a host with these GPUs and this much memory.

    `auto` takes every visible GPU when there is one, else the CPU; `cuda` without a GPU is an
    input error (ValueError, naming the fix). Each GPU is capped at `gpu_memory_fraction` of its
    memory; the weights in host memory at `max_host_memory`, or the host's memory less a reserve.
    Offload `disk` fills the GPUs, then host memory, then disk; on a CPU-only host, host memory then disk.
    """
    device, offload = Device(device), Offload(offload)
    if device is Device.cuda and not gpus:
        raise ValueError("calibration.device is cuda, but torch sees no CUDA GPU on this host "
                         "(fix: set calibration.device: auto or cpu, or check CUDA_VISIBLE_DEVICES and the driver)")
    host = host_budget(max_host_memory, host_memory_bytes)
    on_cpu = device is Device.cpu or not gpus
    if on_cpu and offload is not Offload.disk:
        return Placement("cpu")
    if not 0 < gpu_memory_fraction <= 1:
        raise ValueError(f"gpu_memory_fraction {gpu_memory_fraction} must be in (0, 1]")
    max_memory: dict = {} if on_cpu else {g.index: int(g.total_bytes * gpu_memory_fraction) for g in gpus}
    max_memory["cpu"] = host
    return Placement("cpu" if on_cpu else "cuda", () if on_cpu else tuple(gpus), max_memory, offload.value)


def host_budget(max_host_memory: int | None, available_bytes: int) -> int:
    """The bytes of weights host memory may hold: the recipe's max_host_memory, or what is available less a reserve."""
    return max_host_memory if max_host_memory is not None else max(available_bytes - HOST_RESERVE_BYTES, 0)


def offload_device_map(model, placement: Placement) -> dict[str, int | str]:
    """accelerate's device map for a (meta) model under disk offload: whole decoder layers on each GPU up to its
    cap, then in host memory up to the host cap, the rest on "disk" (module order: the head comes last).

    The input embedding stays in host memory even past the cap: `model.device` is its weight's device, and
    ModelOpt's export sends a dummy forward's input there, which on a disk-offloaded (meta) embedding fails with
    "Cannot copy out of meta tensor" (measured with a 0.08 GB budget). Validation holds it resident anyway."""
    from accelerate import infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory=dict(placement.max_memory),
                                       no_split_module_classes=list(model._no_split_modules or ()))
    embedding = next(name for name, module in model.named_modules() if module is model.get_input_embeddings())
    return _in_host_memory(device_map, model, embedding)


def _in_host_memory(device_map: dict, model, name: str) -> dict:
    """`device_map` with module `name` in host memory where it was on disk; an enclosing entry on disk (accelerate
    maps a whole model to "" when nothing fits) is split into its children, the module's own ancestors again."""
    holder = next((key for key in device_map if key == name or key == "" or name.startswith(key + ".")), None)
    if holder is None or device_map[holder] != "disk":
        return device_map
    if holder == name:
        return {**device_map, name: "cpu"}
    parent = model.get_submodule(holder)
    split = {key: where for key, where in device_map.items() if key != holder}
    for child, _ in parent.named_children():
        split[f"{holder}.{child}" if holder else child] = "disk"
    for tensor, _ in [*parent.named_parameters(recurse=False), *parent.named_buffers(recurse=False)]:
        split[f"{holder}.{tensor}" if holder else tensor] = "disk"
    return _in_host_memory(split, model, name)


def visible_gpus() -> list[VisibleGpu]:
    """The CUDA GPUs torch can use here (none with a CPU build of torch). Initialises CUDA: call it only
    when a stage is about to run, never from planning."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [VisibleGpu(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
            for i in range(torch.cuda.device_count())]


def host_memory_bytes() -> int:
    """Memory available to this process now (MemAvailable, within its memory cgroup's limit), which is what
    offload can count on."""
    return host_memory()[1]


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of memory this process may use: the host's, or its memory cgroup's limit where that
    is lower (a container, a CI job, `bench/scale.py --memory-cap`), which the host's numbers do not show."""
    import psutil

    memory = psutil.virtual_memory()
    limit = cgroup_memory_limit()
    if limit is None:
        return int(memory.total), int(memory.available)
    return min(int(memory.total), limit), min(int(memory.available), limit)


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's cgroup (v1's memory.limit_in_bytes, v2's memory.max), or None."""
    from pathlib import Path

    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            candidates = [Path(root) / "memory" / path.lstrip("/") / "memory.limit_in_bytes"]
        elif controllers == "":
            candidates = [Path(root) / path.lstrip("/") / "memory.max"]
        else:
            continue
        for file in candidates:
            try:
                value = file.read_text().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) < 1 << 60:   # v1 writes its "no limit" as a huge number
                return int(value)
    return None


def gpu_peak_bytes(placement: Placement) -> dict[str, int]:
    """Peak memory allocated on each GPU since the last reset, by GPU name and index."""
    if not placement.on_gpu:
        return {}
    import torch

    return {f"{g.index}:{g.name}": int(torch.cuda.max_memory_allocated(g.index)) for g in placement.gpus}


def reset_gpu_peaks(placement: Placement) -> None:
    if placement.on_gpu:
        import torch

        for g in placement.gpus:
            torch.cuda.reset_peak_memory_stats(g.index)
