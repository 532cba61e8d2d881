"""The engine check: the same accuracy metrics, measured on a built TensorRT-LLM artifact.

It runs in a child process (`python -m kiln.validate.engine_check REQUEST.json`),
under `mpirun` when an engine spans several GPUs, so that CUDA, MPI and TensorRT
never live in the `kiln` process. Files in, files out: the request names the
per-SM folder, the checkpoint, the unquantized model and the token samples;
the child writes the report the validate stage writes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.common.errors import KilnError
from kiln.common.foreign_python import run_logged, trtllm_python
from kiln.compile import Target
from kiln.validate.records import Metrics


@dataclass(frozen=True)
class EngineCheckRequest:
    target: Target       # written to the child's request as its value (trtllm-engine | trtllm-pytorch)
    sm_dir: str          # engines/<sm>/ as built
    hf_dir: str          # the exported HF checkpoint (tokenizer; the PyTorch backend's weights)
    model_dir: str       # the unquantized model: the baseline
    samples: str         # JSON file: list of token-id lists
    report: str          # where the child writes Metrics as JSON
    tp_size: int = 1
    trust_remote_code: bool = False


def check_command(request_path: Path, target: Target, tp_size: int, python: str = sys.executable) -> list[str]:
    command = [python, "-m", "kiln.validate.engine_check", str(request_path)]
    if target is Target.trtllm_engine and tp_size > 1:
        # The C++ runtime wants one MPI rank per GPU of the engine.
        command = ["mpirun", "-n", str(tp_size), "--allow-run-as-root", *command]
    return command


def check_engine(target: Target, sm_dir: Path, hf_dir: Path, model_dir: Path, samples, progress, label: str,
                 tp_size: int = 1, trust_remote_code: bool = False) -> Metrics:
    """Run the engine check in a child process and return its metrics."""
    with tempfile.TemporaryDirectory(prefix="kiln-engine-check-") as tmp:
        tmp_path = Path(tmp)
        samples_path = tmp_path / "samples.json"
        samples_path.write_text(json.dumps([s.tolist() for s in samples]))
        request = EngineCheckRequest(Target(target), str(sm_dir), str(hf_dir), str(model_dir), str(samples_path),
                                     str(tmp_path / "report.json"), tp_size, trust_remote_code)
        request_path = tmp_path / "request.json"
        request_path.write_text(json.dumps(asdict(request), indent=2))
        python = trtllm_python()  # the Python that has tensorrt_llm, maybe not kiln's own
        with progress.task(f"engine check {label}", total=None):
            run_logged(check_command(request_path, target, tp_size, python), python, tmp_path / "engine-check.log",
                       f"engine check for {label}")
        if not Path(request.report).is_file():
            raise KilnError(f"engine check for {label} wrote no report")
        return Metrics(**json.loads(Path(request.report).read_text()))


def main(argv: list[str]) -> int:
    import torch
    from transformers import AutoTokenizer

    from kiln.validate.measure import Baseline
    from kiln.validate.request import ValidateRequest
    from kiln.validate.metrics import compare
    from kiln.validate.trtllm_runtime import RUNTIMES

    request = EngineCheckRequest(**json.loads(Path(argv[0]).read_text()))
    samples = [torch.tensor(ids, dtype=torch.long) for ids in json.loads(Path(request.samples).read_text())]
    tokenizer = AutoTokenizer.from_pretrained(request.hf_dir, trust_remote_code=request.trust_remote_code)
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    engine = RUNTIMES[Target(request.target)](Path(request.sm_dir), Path(request.hf_dir), end_id, pad_id)
    if int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0"))) != 0:
        for ids in samples:  # every rank takes part in each generate; only the leader gets logits
            engine(ids)
        return 0
    with tempfile.TemporaryDirectory(prefix="kiln-baseline-") as scratch:
        baseline = Baseline(Path(request.model_dir), Path(scratch), ValidateRequest(trust_remote_code=request.trust_remote_code))
        metrics = compare(baseline.logits(torch.stack(samples)), engine, samples)
    Path(request.report).write_text(json.dumps(metrics.as_dict(), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
