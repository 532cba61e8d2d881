"""Validate stage: measure the accuracy of what ships.

Public entry points:
  Baseline(model_dir, trust_remote_code)   the unquantized model, loaded once per build
  run(hf_dir, baseline, samples, progress) -> Metrics
  evaluate_gates(metrics, **gates) -> GateResult
  check_engine(target, sm_dir, hf_dir, model_dir, samples, progress, label) -> Metrics   (GPU hosts)
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.validate.engine_check import check_engine
from kiln.validate.gates import GateResult, evaluate_gates
from kiln.validate.records import Metrics

STAGE_VERSION = 1
TOOLS = ("torch", "transformers")
REPORT = "report.json"

__all__ = ["Baseline", "run", "check_engine", "evaluate_gates", "GateResult", "Metrics", "load_metrics", "REPORT", "STAGE_VERSION", "TOOLS"]


class Baseline:
    """The unquantized model and its logits per evaluation sample, computed once and shared by variants."""

    def __init__(self, model_dir: Path, trust_remote_code: bool = False, allow_pickle: bool = False):
        self.model_dir = Path(model_dir)
        self.trust_remote_code = trust_remote_code
        self.allow_pickle = allow_pickle
        self._model = None
        self._logits: dict[tuple[int, bytes], object] = {}

    def logits(self, samples):
        from kiln.validate.metrics import logits_of
        from kiln.validate.runtime import load_baseline_model

        def for_sample(i: int):
            key = (i, samples[i].numpy().tobytes())
            if key not in self._logits:
                if self._model is None:
                    self._model = load_baseline_model(self.model_dir, self.trust_remote_code, self.allow_pickle)
                self._logits[key] = logits_of(self._model, samples[i])
            return self._logits[key]

        return for_sample


def run(hf_dir: Path, baseline: Baseline, samples, progress, label: str = "", trust_remote_code: bool = False) -> Metrics:
    """Load the exported checkpoint in the reference runtime and compare it with the baseline."""
    from kiln.pipeline.progress import quiet_libraries
    from kiln.validate.metrics import compare
    from kiln.validate.runtime import load_reference_model

    with quiet_libraries():
        model = load_reference_model(hf_dir, trust_remote_code)
        with progress.task(f"evaluate {label}".strip(), total=len(samples)) as task:
            return compare(baseline.logits(samples), model, samples, task.advance)


def write_metrics(metrics: Metrics, out_dir: Path) -> None:
    (Path(out_dir) / REPORT).write_text(json.dumps(metrics.as_dict(), indent=2, sort_keys=True) + "\n")


def load_metrics(out_dir: Path) -> Metrics:
    return Metrics(**json.loads((Path(out_dir) / REPORT).read_text()))
