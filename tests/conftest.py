"""Shared fixtures: the trained test model (cached across runs), a private KILN_HOME, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.recipes import DEFAULT_VARIANTS, HUNG_S, KILN, REPO, repo_recipe_beside_model, run_kiln, write_recipe  # noqa: F401

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Under xdist, each worker (and every kiln it starts) gets its share of the cores: two workers of two OpenMP threads
# each on two cores spin against each other (the matrix build took 315 s beside another worker, 69 s alone).
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_share)

# The session's timings for .ci/budget.py (CI's 45-minute guard): wall time, and setup + call + teardown per test.
_SESSION_STARTED: list[float] = []
_TEST_SECONDS: dict[str, float] = {}


def pytest_sessionstart(session):
    _SESSION_STARTED.append(time.monotonic())


# The modules that take longest (seconds beside another worker, CI of 2026-12-06; test_vllm after its check got
# faster) go first, so that the two workers of `make test` (each taking whole modules) finish together instead of one
# waiting on a long module started last.
LONGEST_MODULES = {"test_compile_e2e.py": 470, "test_families.py": 380, "test_distributed.py": 320,
                   "test_matrix.py": 310, "test_vllm.py": 250, "test_offload.py": 240, "test_faults_registry.py": 215,
                   "test_structure.py": 175, "test_end_to_end.py": 150, "test_serve_cpu.py": 150}


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: -LONGEST_MODULES.get(item.path.name, 0))   # stable: each module keeps its order


def pytest_runtest_logreport(report):
    _TEST_SECONDS[report.nodeid] = _TEST_SECONDS.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("KILN_TEST_TIMINGS")
    if not target or hasattr(session.config, "workerinput"):   # an xdist worker: its controller writes
        return
    from kiln.common.fsutil import atomic_write_text

    Path(target).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(target), json.dumps({
        "wall_s": round(time.monotonic() - _SESSION_STARTED[0], 2), "exit_status": int(exitstatus),
        "tests": {k: round(v, 3) for k, v in _TEST_SECONDS.items()}}, indent=1) + "\n")


@pytest.fixture(scope="session")
def test_model() -> Path:
    from tests.testmodel import ensure_test_model

    return ensure_test_model()   # trained once per machine, kept outside the clone


@pytest.fixture()
def kiln_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "kiln-home"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def tool_python(target: str) -> Path:
    """The interpreter of a tool environment (`make llmcompressor-env`, `make vllm-env`): built once per machine
    in a cache outside the clone, keyed by its pins; the make target's last line names it."""
    made = subprocess.run(["make", "-s", target], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert made.returncode == 0, made.stderr
    return Path(made.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def llmcompressor_python() -> Path:
    """llm-compressor 0.14 in its own venv, made once per machine by `make llmcompressor-env` (about 3 min) in a
    cache outside the clone keyed by its pins; the command's last line is the interpreter."""
    return tool_python("llmcompressor-env")


# The spine's two variants at write_recipe's default 16 x 128 samples: what most end-to-end modules build first.
SPINE_VARIANTS = {"fp8": {"quant": "fp8", "kv_cache": "fp8"}, "int4-awq": {"quant": "int4_awq"}}
CPU_STAGES = ("fetch", "quantize", "validate", "size", "task-baseline")


def session_root(tmp_path_factory) -> Path:
    """A folder of this test session shared by its xdist workers (each worker has its own basetemp below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def spine_cache(tmp_path_factory, test_model) -> Path:
    """The stage cache of one build of SPINE_VARIANTS on the test model, made once per session (the first worker
    to ask builds it, the other waits) and never written again: modules copy it into their own KILN_HOME
    (seed_home), so that their builds of these variants (whatever their names and gates) find quantize and
    validate cached and go straight to what they test. At the end it must still hold what the build wrote."""
    import fcntl

    from kiln.common.digest import tree_digest

    root = session_root(tmp_path_factory) / "spine"
    root.mkdir(exist_ok=True)
    cache, done = root / "home" / "cache", root / "built"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            recipe = write_recipe(root, str(test_model), SPINE_VARIANTS, name="spine")
            built = run_kiln("build", recipe, "--json", env={"KILN_HOME": str(root / "home")})
            assert built.returncode == 0, built.stderr
            done.write_text(tree_digest(cache))
    digest = done.read_text()
    yield cache
    assert tree_digest(cache) == digest, "a test wrote into the shared spine cache; it must copy it (seed_home)"


def seed_home(home: Path, cache: Path) -> Path:
    """Copy the CPU stages' entries of a shared cache into `home` (copies, not links: a test may alter its own)."""
    import shutil

    for stage in CPU_STAGES:
        if (cache / stage).is_dir():
            shutil.copytree(cache / stage, home / "cache" / stage, dirs_exist_ok=True)
    return home


STANDINS = REPO / "tests" / "standins"
GPU_LINES = {
    "sm80": "NVIDIA A100-SXM4-80GB, 8.0", "sm86": "NVIDIA A10, 8.6", "sm89": "NVIDIA L40S, 8.9",
    "sm90": "NVIDIA H100 80GB HBM3, 9.0", "sm100": "NVIDIA B200, 10.0", "sm120": "NVIDIA GeForce RTX 5090, 12.0",
}


class GpuHost:
    """Environment that makes this CPU machine look like a GPU build host to kiln, for contract tests.

    Stand-ins (tests/standins/): `nvidia-smi` answering kiln's query with the given SMs, `trtllm-build`
    recording its argv and writing an engine-shaped folder, and a `tensorrt_llm` package whose runtime
    API returns logits computed on the CPU. They prove kiln's side of the interface, not TensorRT.
    """

    def __init__(self, root: Path, sms=("sm90",), trtllm="1.2.0", tensorrt="10.14.1", model: Path | None = None,
                 foreign_python: bool = False):
        """With `foreign_python`, TensorRT-LLM is visible only to a separate interpreter (KILN_TRTLLM_PYTHON),
        as on a GPU host where TensorRT-LLM's pins keep it out of kiln's environment."""
        self.root = root
        site = root / "site"
        site.mkdir(parents=True, exist_ok=True)
        (site / "tensorrt_llm").symlink_to(STANDINS / "site" / "tensorrt_llm", target_is_directory=True)
        for dist, ver in (("tensorrt_llm", trtllm), ("tensorrt", tensorrt)):
            if ver is None:
                continue
            info = site / f"{dist}-{ver}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {ver}\n")
        self.log = root / "standin-calls.jsonl"
        gpus = "\n".join(f"{i}, {GPU_LINES[sm]}, 81559, 570.86.15" for i, sm in enumerate(sms))
        self.env = {
            "PATH": f"{STANDINS / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(site),
            "KILN_STANDIN_GPUS": gpus,
            "KILN_STANDIN_LOG": str(self.log),
            "KILN_STANDIN_TRTLLM": trtllm or "",
            "KILN_STANDIN_MODEL": str(model or ""),
        }
        if foreign_python:
            # -S: no site processing, so kiln's editable-install hook is not loaded and `import kiln` must
            # resolve through the links kiln puts on PYTHONPATH; torch and transformers come from purelib.
            import sysconfig

            wrapper = root / "trtllm-python"
            wrapper.write_text(
                "#!/bin/sh\n"
                f"echo '{{\"tool\": \"trtllm-python\"}}' >> '{self.log}'\n"
                f"PYTHONPATH=\"$PYTHONPATH:{site}:{sysconfig.get_paths()['purelib']}\" exec '{sys.executable}' -S \"$@\"\n")
            wrapper.chmod(0o755)
            del self.env["PYTHONPATH"]
            self.env["KILN_TRTLLM_PYTHON"] = str(wrapper)

    def calls(self, tool: str) -> list[dict]:
        import json

        if not self.log.is_file():
            return []
        return [c for c in map(json.loads, self.log.read_text().splitlines()) if c["tool"] == tool]


@pytest.fixture()
def gpu_host(tmp_path, test_model):
    def make(sms=("sm90",), trtllm="1.2.0", tensorrt="10.14.1", name="gpu-host") -> GpuHost:
        return GpuHost(tmp_path / name, sms, trtllm, tensorrt, test_model)

    return make


@pytest.fixture(scope="session")
def family_models() -> dict[str, Path]:
    """One small trained model per family of the family table (trained once, cached like test_model)."""
    from tests.family_models import FAMILY_CONFIGS, family_model

    return {family: family_model(family) for family in FAMILY_CONFIGS}
