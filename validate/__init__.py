"""Validate stage: measure the accuracy of what ships.

Public entry points:
  ValidateRequest(trust_remote_code, allow_pickle, offload, allow_code_execution)   what the plan asks for
  Baseline(model_dir, scratch, request)   the unquantized model's outputs, computed once per build
  run(hf_dir, baseline, samples, progress) -> Metrics   (the baseline's request says how)
  evaluate_gates(metrics, **gates) -> GateResult
  check_structure(hf_dir, source_dir, StructureExpectation) -> StructureReport   the exported files against the plan
                                                  and the source, before any metric (write_/load_structure)
  check_engine(target, sm_dir, hf_dir, model_dir, samples, progress, label) -> Metrics   (GPU hosts)
  check_vllm(hf_dir, model_dir, samples, progress, label, max_model_len) -> RuntimeReport (where vLLM is installed)
  vllm_build() -> "absent" | "cpu:<version>" | "<version>"   the vLLM in KILN_VLLM_PYTHON
  vllm_kv_cache_bytes(config, max_model_len)   the KV cache vLLM is given on CPUs (the check, kiln serve)
  load_reference_model(hf_dir, trust_remote_code) -> model   the exported checkpoint as validation runs it
  run_tasks(model_path, task_requests, request, baseline) -> {task: TaskScore}   lm-eval tasks
  compare_tasks(baseline_scores, variant_scores) -> {task: TaskDrop}   drops with paired standard errors
  peak_memory(shape, dtype_bytes, evaluation_seq_len, exported_bytes, min_weight_bits, gpu_caps, offload)
                                                  the stage's memory formula, from config.json alone
"""

from __future__ import annotations

from kiln.validate.builtin_tasks import BUILTIN as BUILTIN_TASKS
from kiln.validate.engine_check import check_engine
from kiln.validate.gates import GateResult, evaluate_gates
from kiln.validate.measure import (
    REPORT, STAGE_VERSION, TASK_TOOLS, TOOLS, Baseline, load_metrics, load_reference_model, run, write_metrics,
)
from kiln.validate.memory import peak_memory
from kiln.validate.records import LOGIT_BLOCK_BYTES, UNMEASURED, Metrics, RuntimeReport
from kiln.validate.request import ValidateRequest
from kiln.validate.sandbox import describe as sandbox_description
from kiln.validate.sandbox import unavailable as sandbox_unavailable
from kiln.validate.task_config import TaskFiles, task_files
from kiln.validate.structure import (
    DIFFERENCES, STRUCTURE, STRUCTURE_VERSION, StructureExpectation, StructureReport, check_structure, load_structure,
    write_structure,
)
from kiln.validate.tasks import (
    TASKS_FILE, TaskDrop, TaskRequest, TaskScore, compare_tasks, load_task_drops, load_task_scores, run_tasks,
    task_metrics, write_task_drops, write_task_scores,
)
from kiln.validate.vllm_check import check_vllm, vllm_build, vllm_kv_cache_bytes

__all__ = ["ValidateRequest", "Baseline", "run", "check_engine", "load_reference_model", "evaluate_gates", "GateResult", "Metrics",
           "load_metrics", "REPORT", "STAGE_VERSION", "TOOLS", "RuntimeReport", "check_vllm", "vllm_build",
           "vllm_kv_cache_bytes", "BUILTIN_TASKS", "TASKS_FILE", "TaskDrop", "TaskRequest", "TaskScore",
           "compare_tasks", "load_task_drops", "load_task_scores", "run_tasks", "task_metrics", "write_task_drops",
           "write_task_scores", "TASK_TOOLS", "sandbox_description", "sandbox_unavailable", "TaskFiles", "task_files", "LOGIT_BLOCK_BYTES",
           "write_metrics", "peak_memory", "UNMEASURED", "DIFFERENCES", "STRUCTURE", "STRUCTURE_VERSION", "StructureExpectation", "StructureReport",
           "check_structure", "load_structure", "write_structure"]
