"""What this host can build: its GPUs (by SM) and the NVIDIA tools installed.

GPUs are found through NVML, or `nvidia-smi` when NVML is unavailable, never by
initialising CUDA: the CLI must stay light and must not grab a device. Tool
versions come from installed distributions' metadata, so nothing is imported.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from packaging.version import InvalidVersion, Version

from kiln.common.versions import ABSENT, installed_version
from kiln.compile.gpus import ARCHS
from kiln.compile.targets import Target

# The engine flow (`trtllm-build`) exists up to TensorRT-LLM 1.2; the PyTorch backend from 1.0.
TARGET_TRTLLM_RANGE = {
    Target.trtllm_engine: (Version("0.17"), Version("1.3"), "0.17 to 1.2"),
    Target.trtllm_pytorch: (Version("1.0"), None, "1.0 or later"),
}


@dataclass(frozen=True)
class HostGpu:
    index: int
    name: str
    compute_capability: str   # "9.0"
    memory_mib: int | None = None

    @property
    def sm(self) -> str:
        major, _, minor = self.compute_capability.partition(".")
        return f"sm{major}{minor or '0'}"


@dataclass(frozen=True)
class Host:
    gpus: tuple[HostGpu, ...] = ()
    probe: str = "none"               # nvml, nvidia-smi or none
    driver: str | None = None
    tensorrt: str | None = None
    tensorrt_llm: str | None = None
    modelopt: str | None = None
    notes: tuple[str, ...] = field(default=())

    def gpus_of(self, sm: str) -> tuple[HostGpu, ...]:
        return tuple(g for g in self.gpus if g.sm == sm)

    @property
    def sms(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g.sm for g in self.gpus))

    def compile_problem(self, sm: str, target: Target, tp_size: int = 1) -> str | None:
        """Why this host cannot build `target` for `sm`, or None when it can."""
        lo, hi, span = TARGET_TRTLLM_RANGE[target]
        needs = f"needs an {sm} GPU host with tensorrt_llm ({span})"
        gpus = self.gpus_of(sm)
        if not gpus or self.tensorrt_llm is None:
            return needs
        try:
            installed = Version(self.tensorrt_llm)
        except InvalidVersion:
            return f"{needs} (installed tensorrt_llm version '{self.tensorrt_llm}' is unreadable)"
        if installed < lo or (hi is not None and installed >= hi):
            return f"{needs} (this host has tensorrt_llm {self.tensorrt_llm})"
        if target is Target.trtllm_engine and self.tensorrt is None:
            return f"{needs} and tensorrt"
        if len(gpus) < tp_size:
            return f"needs {tp_size} {sm} GPUs for tp_size {tp_size}; this host has {len(gpus)}"
        return None

    def as_dict(self) -> dict:
        return {
            "gpus": [{"index": g.index, "name": g.name, "sm": g.sm, "memory_mib": g.memory_mib} for g in self.gpus],
            "probe": self.probe,
            "cuda_driver": self.driver,
            "tensorrt": self.tensorrt,
            "tensorrt_llm": self.tensorrt_llm,
            "modelopt": self.modelopt,
            "notes": list(self.notes),
        }


def first_installed(*distributions: str, module: str | None = None) -> str | None:
    """The first installed distribution's version; with `module`, only if that module is importable."""
    if module is not None and importlib.util.find_spec(module) is None:
        return None
    return next((found for found in map(installed_version, distributions) if found != ABSENT), None)


def _nvml_gpus() -> tuple[tuple[HostGpu, ...], str | None]:
    import pynvml  # nvidia-ml-py: ctypes over libnvidia-ml, no CUDA context

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024)
            gpus.append(HostGpu(index, name.decode() if isinstance(name, bytes) else name, f"{major}.{minor}", memory))
        return tuple(gpus), driver.decode() if isinstance(driver, bytes) else driver
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi_gpus(executable: str) -> tuple[tuple[HostGpu, ...], str | None]:
    query = "index,name,compute_cap,memory.total,driver_version"
    out = subprocess.run([executable, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    gpus, driver = [], None
    for line in out.splitlines():
        if not line.strip():
            continue
        index, name, cap, memory, driver = (part.strip() for part in line.split(","))
        gpus.append(HostGpu(int(index), name, cap, int(float(memory)) if memory.replace(".", "").isdigit() else None))
    return tuple(gpus), driver


def detect_host() -> Host:
    notes: list[str] = []
    gpus: tuple[HostGpu, ...] = ()
    driver, probe = None, "none"
    try:
        gpus, driver = _nvml_gpus()
        probe = "nvml"
    except Exception as exc:  # no driver library, no pynvml, or no device: try nvidia-smi
        notes.append(f"NVML unavailable ({type(exc).__name__})")
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                gpus, driver = _nvidia_smi_gpus(smi)
                probe = "nvidia-smi"
            except (subprocess.SubprocessError, OSError, ValueError) as smi_exc:
                notes.append(f"nvidia-smi failed: {smi_exc}")
        else:
            notes.append("nvidia-smi not on PATH")
    for gpu in gpus:
        if gpu.sm not in ARCHS:
            notes.append(f"GPU {gpu.index} ({gpu.name}, {gpu.sm}) is not in kiln's GPU table")
    tools = _nvidia_tool_versions(notes)
    return Host(gpus=gpus, probe=probe, driver=driver, tensorrt=tools["tensorrt"], tensorrt_llm=tools["tensorrt_llm"],
                modelopt=first_installed("nvidia-modelopt"), notes=tuple(notes))


def _local_nvidia_tool_versions() -> dict[str, str | None]:
    return {"tensorrt": first_installed("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
            "tensorrt_llm": first_installed("tensorrt_llm", module="tensorrt_llm")}


def _nvidia_tool_versions(notes: list[str]) -> dict[str, str | None]:
    """TensorRT and TensorRT-LLM versions, asked of the Python that has them (KILN_TRTLLM_PYTHON)."""
    from kiln.common.foreign_python import TRTLLM_PYTHON_ENV, env_for, is_foreign, trtllm_python

    python = trtllm_python()
    if not is_foreign(python):
        return _local_nvidia_tool_versions()
    try:
        done = subprocess.run([python, "-m", "kiln.compile.host"], capture_output=True, text=True, timeout=120,
                              env=env_for(python), check=True)
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        notes.append(f"{TRTLLM_PYTHON_ENV}={python} did not report its TensorRT-LLM version ({exc})")
        return {"tensorrt": None, "tensorrt_llm": None}
    notes.append(f"TensorRT and TensorRT-LLM versions are those of {python} ({TRTLLM_PYTHON_ENV})")
    return found


if __name__ == "__main__":  # run by kiln in KILN_TRTLLM_PYTHON: report what that environment has
    print(json.dumps(_local_nvidia_tool_versions()))
    sys.exit(0)
