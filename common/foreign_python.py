"""Running a little of kiln in another Python: one whose tools cannot share kiln's environment.

TensorRT-LLM 1.2 pins transformers 4.57 and ModelOpt 0.37; llm-compressor 0.14 pins transformers
<= 5.17 and compressed-tensors 0.19; vLLM brings its own torch and transformers. kiln needs
transformers 5.20+ and ModelOpt 0.47. kiln therefore lives in its own environment and runs only
its light, torch-and-transformers code (the engine check, llm-compressor's oneshot, version probes)
in the interpreter an environment variable names (KILN_TRTLLM_PYTHON, KILN_LLMCOMPRESSOR_PYTHON,
KILN_VLLM_PYTHON), which sees kiln through a folder of links put first on PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from kiln.common.fsutil import build_once

TRTLLM_PYTHON_ENV = "KILN_TRTLLM_PYTHON"
LLMCOMPRESSOR_PYTHON_ENV = "KILN_LLMCOMPRESSOR_PYTHON"
VLLM_PYTHON_ENV = "KILN_VLLM_PYTHON"
_SUBPACKAGES = ("common", "pipeline", "quantize", "compile", "validate", "registry", "serve")


def trtllm_python() -> str:
    """The interpreter that has tensorrt_llm: KILN_TRTLLM_PYTHON, or kiln's own."""
    return tool_python(TRTLLM_PYTHON_ENV)


def tool_python(env_var: str) -> str:
    """The interpreter an environment variable names, or kiln's own."""
    return os.environ.get(env_var) or sys.executable


def is_foreign(python: str) -> bool:
    """Another environment than kiln's. A venv's python is a link to the base interpreter, so links are not
    followed: the environment is the folder the interpreter is called from."""
    return Path(python).absolute().parent != Path(sys.executable).absolute().parent


def _kiln_path_shim() -> Path:
    """A folder holding kiln/ with one link per installed kiln subpackage (created once, atomically)."""
    sources = {name: Path(importlib.util.find_spec(f"kiln.{name}").submodule_search_locations[0]) for name in _SUBPACKAGES}
    tag = hashlib.sha256("\n".join(f"{n}={p}" for n, p in sorted(sources.items())).encode()).hexdigest()[:16]

    def fill(staging: Path) -> None:
        (staging / "kiln").mkdir()
        for name, source in sources.items():
            (staging / "kiln" / name).symlink_to(source, target_is_directory=True)

    return build_once(Path(tempfile.gettempdir()) / f"kiln-path-{os.getuid()}-{tag}", fill,
                      done=lambda shim: (shim / "kiln").is_dir())


def env_for(python: str) -> dict[str, str]:
    """The environment for running `python -m kiln....` in `python`."""
    env = os.environ.copy()
    if is_foreign(python):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_kiln_path_shim()), env.get("PYTHONPATH")) if p)
    return env


def run_logged(command: list[str], python: str, log_path: Path, what: str) -> None:
    """Run kiln code in `python` with its output in `log_path`; a failure is one KilnError with the log's
    last lines and a copy of the log that outlives the caller's temporary folder."""
    import subprocess

    from kiln.common.errors import KilnError

    with Path(log_path).open("w") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env_for(python)).returncode
    if returncode != 0:
        import time

        from kiln.common.scratch import LOGS, kiln_home

        kept = kiln_home() / LOGS / f"{Path(log_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_bytes(Path(log_path).read_bytes())
        tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-5:]
        raise KilnError(f"{what} exited {returncode}; last lines:\n  " + "\n  ".join(tail) + f"\n  full log: {kept}")
