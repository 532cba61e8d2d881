"""Running a little of kiln in another Python: TensorRT-LLM's, which cannot share kiln's environment.

TensorRT-LLM 1.2 pins transformers 4.57 and ModelOpt 0.37; kiln needs transformers 5 and
ModelOpt 0.47. On a GPU host kiln therefore lives in its own environment and runs only its
light, torch-and-transformers code (the engine check, version probes) in the interpreter named
by KILN_TRTLLM_PYTHON, which sees kiln through a folder of links put first on PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

TRTLLM_PYTHON_ENV = "KILN_TRTLLM_PYTHON"
_SUBPACKAGES = ("common", "pipeline", "quantize", "compile", "validate", "registry", "serve")


def trtllm_python() -> str:
    """The interpreter that has tensorrt_llm: KILN_TRTLLM_PYTHON, or kiln's own."""
    return os.environ.get(TRTLLM_PYTHON_ENV) or sys.executable


def is_foreign(python: str) -> bool:
    return Path(python).resolve() != Path(sys.executable).resolve()


def _kiln_path_shim() -> Path:
    """A folder holding kiln/ with one link per installed kiln subpackage (created once, atomically)."""
    sources = {name: Path(importlib.util.find_spec(f"kiln.{name}").submodule_search_locations[0]) for name in _SUBPACKAGES}
    tag = hashlib.sha256("\n".join(f"{n}={p}" for n, p in sorted(sources.items())).encode()).hexdigest()[:16]
    shim = Path(tempfile.gettempdir()) / f"kiln-path-{os.getuid()}-{tag}"
    if not (shim / "kiln").is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".tmp-kiln-path-", dir=shim.parent))
        (staging / "kiln").mkdir()
        for name, source in sources.items():
            (staging / "kiln" / name).symlink_to(source, target_is_directory=True)
        try:
            staging.rename(shim)
        except OSError:  # another process made it first
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return shim


def env_for(python: str) -> dict[str, str]:
    """The environment for running `python -m kiln....` in `python`."""
    env = os.environ.copy()
    if is_foreign(python):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_kiln_path_shim()), env.get("PYTHONPATH")) if p)
    return env
