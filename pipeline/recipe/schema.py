"""The recipe schema: small frozen pydantic models, unknown keys refused.

Loading YAML and turning validation errors into one line per problem lives in
`recipe/loader.py`; this module only says what a valid recipe is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from kiln.compile.targets import LORA_MODULES, SPECULATIVE_MODES, Target
from kiln.pipeline.recipe.quant import (AUTO, AutoPrecision, Flag, HostBytes, NonNegativeInt, Number, PositiveInt,
                                       QuantName, Strict)
from kiln.quantize.day0 import QuantizePath
from kiln.quantize.day0 import problem as day0_problem
from kiln.quantize.formats import FORMATS, KV_CACHE_FORMATS, Backend, KVCacheFormat, QuantFormat
from kiln.quantize.placement import Device, Offload
from kiln.quantize.runtimes import Loads, Runtime, backend_makes, loading_runtimes, runtime_cells, runtime_problem
from kiln.validate import BUILTIN_TASKS, DIFFERENCES, GateResult, Metrics, StructureReport, TaskDrop, evaluate_gates

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
HF_SCHEME = "hf://"

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]


class ModelSource(Strict):
    source: str = Field(description="hf://org/name (with revision) or a local folder, relative to the recipe")
    revision: str | None = Field(default=None, description="40-hex commit; required for hf:// sources")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="the dtype the model is loaded, calibrated and exported in; float32 for "
        "CPUs without bf16 matrix units (bf16 matmuls ran 8x slower than float32 on an EPYC with AVX2 only)")
    trust_remote_code: Flag = False
    allow_pickle: Flag = Field(default=False, description="load *.bin/*.pt weights (pickle can run code)")

    @property
    def is_hub(self) -> bool:
        return self.source.startswith(HF_SCHEME)

    @property
    def repo_id(self) -> str:
        return self.source[len(HF_SCHEME):]

    @model_validator(mode="after")
    def _revision_matches_source(self) -> "ModelSource":
        if self.is_hub:
            repo = self.repo_id
            if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
                raise ValueError(f"'{self.source}' is not hf://org/name")
            if self.revision is None:
                raise ValueError("a hub source needs `revision`: the 40-hex commit to pin (see the model's 'Files' history)")
            if not _COMMIT.match(self.revision):
                raise ValueError(f"revision '{self.revision}' is not a 40-hex commit; branch and tag names move, pin the commit")
        elif self.revision is not None:
            raise ValueError("`revision` applies only to hf:// sources; remove it for a local folder")
        return self


class DataSpec(Strict):
    """Text for calibration or evaluation: exactly one of builtin, file."""

    builtin: Literal["python-docs-train", "python-docs-heldout"] | None = None
    file: str | None = Field(default=None, description=".txt (blank-line separated) or .jsonl, relative to the recipe")
    text_field: str = "text"
    samples: PositiveInt = 32
    seq_len: PositiveInt = 256

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.builtin is None) == (self.file is None):
            raise ValueError("set exactly one of `builtin` or `file`")
        if self.file is not None and Path(self.file).suffix not in (".txt", ".jsonl"):
            raise ValueError(f"file '{self.file}' must end in .txt or .jsonl")
        return self


class CalibrationSpec(DataSpec):
    """Calibration text, and where calibration, export and validation run."""

    device: Device = Field(default=Device.auto, description="auto (every visible GPU, else the CPU) | cpu | cuda")
    gpu_memory_fraction: Number = Field(default=0.8, gt=0, le=1,
                                       description="share of each GPU's memory the model may take; the rest is "
                                                   "offloaded to CPU memory")
    batch_size: PositiveInt = Field(default=1, description="samples per calibration forward pass: larger is faster "
                                    "for small models (AWQ: 1.6x at 16 on the demo model), but the float sums change "
                                    "and AWQ can pick another scale near a tie (bench/awq_calibration.py)")
    offload: Offload = Field(default=Offload.none, description="none | cpu | disk: where weights that do not fit go. "
                             "cpu: GPUs, then host memory; disk: GPUs, then host memory up to max_host_memory, then "
                             "read from disk a decoder layer at a time (validation too): for models larger than memory")
    max_host_memory: HostBytes | None = Field(default=None, description="host memory the weights may take under "
                                             "offload: disk, e.g. 6GiB (default: what the host has free, less 2 GiB)")
    min_expert_tokens: NonNegativeInt = Field(default=1, description="mixture-of-experts: the fewest calibration "
                                              "tokens an expert may receive; one below it fails the build (its scales "
                                              "came from nothing)")
    all_experts: bool = Field(default=False, description="mixture-of-experts: calibrate every expert on every token "
                              "(ModelOpt's moe_calib_experts_ratio 1.0; the forward's outputs are unchanged)")
    resumable: Flag | Literal["auto"] = Field(
        default="auto", description="save each decoder layer as calibration finishes it, so that a killed build "
        "resumes from the last one when run again (the same checkpoint, byte for byte; backend modelopt, one format "
        "per variant). auto: for sources of 1B parameters or more calibrated in several passes (AWQ, GPTQ, "
        "SmoothQuant, scale searches) | true | false")
    processes: PositiveInt = Field(
        default=1, description="ranks that calibrate, each on its share of the samples, under torchrun (gloo on CPUs, "
        "NCCL with one GPU a rank); the backend (ModelOpt, llm-compressor) reduces their statistics and rank 0 "
        "exports. Max-calibrated formats come out byte for byte as with 1; AWQ, SmoothQuant and GPTQ within measured "
        "bounds. Each rank holds the model")
    nodes: PositiveInt = Field(
        default=1, description="hosts that calibrate together, `processes` ranks each, every one running `kiln build "
        "--stage quantize` against a shared KILN_HOME with KILN_NODE_RANK and KILN_RENDEZVOUS set (`kiln plan "
        "--launcher slurm|kubernetes` writes what does that); node 0 writes the checkpoint")

    @property
    def ranks(self) -> int:
        """Every rank that calibrates, over all the nodes."""
        return self.processes * self.nodes

    @field_validator("resumable", mode="before")
    @classmethod
    def _auto_true_or_false(cls, value):
        if value is True or value is False or value == "auto":
            return value
        raise ValueError(f"{value!r} is not auto, true or false (fix: auto saves layers for 1B+ models calibrated in "
                         "several passes; true or false decides)")

    @model_validator(mode="after")
    def _budget_needs_disk(self) -> "CalibrationSpec":
        if self.max_host_memory is not None and self.offload is not Offload.disk:
            raise ValueError(f"max_host_memory caps the weights in host memory under offload: disk, but offload is "
                             f"{self.offload.value} (fix: set offload: disk, or remove max_host_memory)")
        if self.ranks > 1:
            problem = ("each rank needs at least one sample" if self.ranks > self.samples else
                       f"offload: {self.offload.value} is for one process (each rank holds the model)"
                       if self.offload is not Offload.none else
                       "resumable calibration saves layers from one process" if self.resumable is True else None)
            if problem:
                ranks = f"processes: {self.processes}" + (f" on nodes: {self.nodes}" if self.nodes > 1 else "")
                raise ValueError(f"{ranks} with samples: {self.samples}: {problem} (fix: "
                                 "processes: 1, or fewer ranks than samples, offload: none and resumable: auto)")
        return self


class TaskSpec(Strict):
    """An lm-evaluation-harness task scored on the baseline (once) and on every variant's exported checkpoint."""

    name: Name = Field(description="next-line or humaneval (kiln's builtins), or the `task:` of the YAML in `config`")
    config: str | None = Field(default=None, description="an lm-eval task YAML, relative to the recipe, whose data "
                                                         "files are local")
    metric: str | None = Field(default=None, description="the score gates read (default: acc; humaneval: pass_at_1)")
    limit: PositiveInt | None = Field(default=None, description="score only the first N documents")
    num_fewshot: NonNegativeInt | None = None
    max_new_tokens: PositiveInt | None = Field(default=None, description="longest generation, for tasks that "
                                               "generate (humaneval: 384)")

    @model_validator(mode="after")
    def _builtin_or_config(self) -> "TaskSpec":
        if self.config is None and self.name not in BUILTIN_TASKS:
            raise ValueError(f"task '{self.name}' is not a kiln builtin ({', '.join(BUILTIN_TASKS)}); for another lm-eval "
                             "task give `config:` the path of its task YAML, with local data files")
        if self.config is not None and Path(self.config).suffix not in (".yaml", ".yml"):
            raise ValueError(f"config '{self.config}' must be an lm-eval task .yaml file")
        return self


class EvaluationSpec(DataSpec):
    """Held-out text for the accuracy metrics, and the tasks scored on top of them."""

    tasks: tuple[TaskSpec, ...] = ()
    allow_code_execution: Flag = Field(default=False, description="let tasks that run generated code (humaneval) "
                                       "run it, in kiln's sandbox (README, \"Task evaluation\")")
    allow_task_code: Flag = Field(default=False, description="let a task YAML's `!function` entries import and run "
                                  "the Python modules beside it (they go into the cache key; README, \"Task "
                                  "evaluation\")")
    allow_differences: tuple[Literal[DIFFERENCES], ...] = Field(  # type: ignore[valid-type]
        default=(), exclude_if=lambda allowed: not allowed,
        description="files the exported checkpoint may differ from the source in, listed in the structure report "
                    "instead of failing the build: config (config.json), generation_config, tokenizer, chat_template")

    @model_validator(mode="after")
    def _tasks(self) -> "EvaluationSpec":
        names = [task.name for task in self.tasks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"task(s) {', '.join(repeated)} listed twice; give each task once")
        if "humaneval" in names and not self.allow_code_execution:
            raise ValueError("task humaneval runs the code the model writes; set allow_code_execution: true to let "
                             "kiln run it in its sandbox, or remove the task")
        return self


class Gates(Strict):
    max_ppl_increase_pct: Number | None = Field(default=None, ge=0)
    max_kl: Number | None = Field(default=None, ge=0)
    min_top1_agreement: Number | None = Field(default=None, ge=0, le=1)
    max_task_drop: dict[Name, Annotated[Number, Field(ge=0)]] | None = Field(
        default=None, description="per task in evaluation.tasks: the most its score may drop against the baseline, "
                                  "in percentage points (a drop within its standard error never fails)")

    def evaluate(self, metrics: Metrics, tasks: dict[str, TaskDrop] | None = None,
                 structure: StructureReport | None = None) -> GateResult:
        """These gates over measured metrics; `tasks` and `structure` where the checkpoint's tasks were scored and
        its files checked (not an engine)."""
        return evaluate_gates(metrics, **self.model_dump(), tasks=tasks, structure=structure)


class Variant(Strict):
    quant: QuantName = Field(description="a format, or auto (`auto:` says which formats and the size budget)")
    # Left out of the dump when unset: recipe digests (publish keys) of single-format variants predate it.
    auto: AutoPrecision | None = Field(default=None, exclude_if=lambda auto: auto is None)
    backend: Backend = Field(default=Backend.modelopt,
                             description="modelopt (HF + TensorRT-LLM checkpoints) or llmcompressor (a compressed-tensors "
                                         "checkpoint that vLLM and SGLang load: int4_gptq, int4_awq, int8_sq)")
    kv_cache: KVCacheFormat = KVCacheFormat.none
    group_size: PositiveInt | None = None
    alpha: Number | None = Field(default=None, gt=0, le=1, description="SmoothQuant migration strength (int8_sq)")
    # Left out of the dump when unset, like `only`: digests of variants on a format's default algorithm predate it.
    algorithm: str | None = Field(default=None, exclude_if=lambda algorithm: algorithm is None,
                                  description="how the format's scales are found, where it offers a choice (nvfp4: max, "
                                              "awq_clip, mse, local_hessian, four_over_six); default: the format's own")
    gpus: tuple[str, ...] = ()
    exclude: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        default=(), description="module name patterns kept unquantized, e.g. lm_head, *.mlp.down_proj")
    # Left out of the dump when empty, like `auto`: recipe digests (publish keys) of whole-model variants predate it.
    only: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        default=(), exclude_if=lambda only: not only,
        description="module name patterns that alone are quantized, e.g. *.mlp.experts (NVFP4 on the experts only) "
                    "or *.mlp (the MLPs only); the rest stays 16-bit, and exclude still applies")
    gates: Gates = Gates()
    runtimes: tuple[Runtime, ...] = Field(
        default=(), description="runtimes this variant must load in: trtllm, trtllm-pytorch, vllm, sglang "
                                "(kiln check refuses a format one of them cannot load)")

    @field_validator("gpus")
    @classmethod
    def _known_gpus(cls, gpus: tuple[str, ...]) -> tuple[str, ...]:
        from kiln.compile import resolve_gpu

        for gpu in gpus:
            resolve_gpu(gpu)  # ValueError names the known SMs and GPUs
        return gpus

    @property
    def sms(self) -> tuple[str, ...]:
        from kiln.compile import resolve_gpu

        return tuple(dict.fromkeys(resolve_gpu(gpu).sm for gpu in self.gpus))

    @property
    def is_auto(self) -> bool:
        return self.quant == AUTO

    @property
    def quant_formats(self) -> tuple[QuantFormat, ...]:
        """The formats its checkpoint may hold: the variant's one format, or those auto precision mixes."""
        return self.auto.formats if self.auto is not None else (self.quant,)

    @property
    def quant_label(self) -> str:
        return getattr(self.quant, "value", self.quant)

    @model_validator(mode="after")
    def _group_size_applies(self) -> "Variant":
        if self.is_auto or self.auto is not None:
            return self._auto_applies()
        spec = FORMATS[self.quant]
        if self.backend is Backend.llmcompressor:
            self._llmcompressor_makes_it()
        if self.group_size is not None and not spec.group_sizes:
            raise ValueError(f"group_size does not apply to {self.quant.value} (per-tensor scales); remove it")
        if self.group_size is not None and self.group_size not in spec.group_sizes:
            allowed = " or ".join(str(g) for g in spec.group_sizes)
            raise ValueError(f"group_size {self.group_size} is not supported by {self.quant.value}; use {allowed}")
        choices = (spec.algorithm, *spec.algorithms)
        if self.algorithm is not None and self.algorithm not in choices:
            offered = f"choose {' or '.join(choices)}" if spec.algorithms else \
                f"{self.quant.value} offers only {spec.algorithm}; remove it"
            raise ValueError(f"algorithm {self.algorithm} is not one {self.quant.value} has ({offered})")
        if self.algorithm is not None and self.backend is not Backend.modelopt:
            raise ValueError("algorithm applies to backend modelopt (ModelOpt's scale searches); remove it or set "
                             "backend: modelopt")
        if self.only and self.backend is not Backend.modelopt:
            raise ValueError("only applies to backend modelopt (ModelOpt's quantizer patterns); remove it or set "
                             "backend: modelopt")
        if self.alpha is not None and not spec.takes_alpha:
            raise ValueError(f"alpha applies only to int8_sq (SmoothQuant); remove it from this {self.quant.value} variant")
        return self._runs_where_asked()

    def _auto_applies(self) -> "Variant":
        if not self.is_auto:
            raise ValueError(f"auto applies to quant: auto; remove it from this {self.quant_label} variant, or set "
                             "quant: auto")
        if self.auto is None:
            raise ValueError("quant auto needs `auto:` with formats and effective_bits, e.g. "
                             "auto: {formats: [nvfp4, fp8], effective_bits: 5.0}")
        for field_name, fix in (("group_size", "each format uses its default block size"),
                                ("alpha", "SmoothQuant layers use ModelOpt's default"),
                                ("only", "the search picks each layer's format; exclude keeps layers 16-bit"),
                                ("algorithm", "each format's default algorithm runs")):
            if getattr(self, field_name) not in (None, ()):
                raise ValueError(f"{field_name} does not apply to quant auto ({fix}); remove it")
        if self.backend is not Backend.modelopt:
            raise ValueError("quant auto is ModelOpt's auto_quantize; set backend: modelopt or choose one format")
        return self._runs_where_asked()

    def _runs_where_asked(self) -> "Variant":
        """Every format it may hold runs on each of its GPUs, and each of its runtimes loads the checkpoint."""
        unsupported = KV_CACHE_FORMATS[self.kv_cache].unsupported
        if unsupported:
            raise ValueError(f"kv_cache {self.kv_cache.value}: {unsupported}")
        from kiln.compile import support_problem

        problems = [p for p in (support_problem(quant, self.kv_cache, gpu) for gpu in self.gpus
                                for quant in self.quant_formats) if p]
        if problems:
            fix = "drop it from auto.formats" if self.is_auto else "choose a format it runs"
            raise ValueError("; ".join(problems) + f" (fix: drop that GPU or {fix})")
        refused = [p for p in (runtime_problem(r, self.quant_formats, self.kv_cache, self.backend)
                               for r in dict.fromkeys(self.runtimes)) if p]
        if refused:
            raise ValueError("; ".join(refused))
        return self

    def _llmcompressor_makes_it(self) -> None:
        if not backend_makes(Backend.llmcompressor, self.quant):
            made = " or ".join(q.value for q in QuantFormat if backend_makes(Backend.llmcompressor, q))
            raise ValueError(f"backend llmcompressor makes {made} in kiln, not {self.quant.value} "
                             "(fix: choose one of those, or set backend: modelopt)")
        if self.kv_cache is not KVCacheFormat.none:
            raise ValueError("kv_cache applies to backend modelopt; llm-compressor variants keep a 16-bit KV cache "
                             "(fix: remove kv_cache, or set backend: modelopt)")
        groups = FORMATS[self.quant].llmcompressor.group_sizes
        if self.group_size is not None and self.group_size not in groups:
            allowed = " or ".join(str(g) for g in groups) or "none (per-channel)"
            raise ValueError(f"group_size {self.group_size} is not llm-compressor's {self.quant.value} preset; use {allowed}")
        if self.gpus:
            raise ValueError("gpus applies to backend modelopt: TensorRT-LLM engines are built from ModelOpt's "
                             "TensorRT-LLM checkpoint, which llm-compressor does not write (fix: remove gpus, or set "
                             "backend: modelopt)")

    @property
    def effective_group_size(self) -> int | None:
        """The block size it quantizes with (auto: each format's default)."""
        return None if self.is_auto else self.group_size or FORMATS[self.quant].default_group_size


class LoraSpec(Strict):
    """LoRA serving support built into the artifact (adapters are loaded at run time)."""

    target_modules: tuple[str, ...] = Field(min_length=1, description="TensorRT-LLM LoRA module names")
    max_rank: PositiveInt = 64

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, modules: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in modules if m not in LORA_MODULES]
        if unknown:
            raise ValueError(f"unknown LoRA module {', '.join(unknown)}; use TensorRT-LLM's names: {', '.join(LORA_MODULES)}")
        return modules


class SpeculativeSpec(Strict):
    mode: Literal[SPECULATIVE_MODES]  # type: ignore[valid-type]
    max_draft_len: PositiveInt


class BuildSizes(Strict):
    """How the per-GPU artifacts are built (`build:` in the recipe)."""

    target: Target = Field(default=Target.trtllm_engine,
                           description="trtllm-engine (TensorRT engines, TRT-LLM 0.17-1.2) or trtllm-pytorch (TRT-LLM 1.0+)")
    max_batch_size: PositiveInt = 8
    max_input_len: PositiveInt = 1024
    max_seq_len: PositiveInt = 2048
    max_num_tokens: PositiveInt = 4096
    tp_size: PositiveInt = 1
    max_shard_size: str = Field(default="5GB", pattern=r"^[1-9][0-9]*(B|KB|MB|GB|KiB|MiB|GiB)$",
                                description="largest safetensors file of the exported HF checkpoint; larger "
                                            "exports are sharded with model.safetensors.index.json")
    kv_cache_reuse: Flag = Field(default=False, description="prefix caching: reuse KV blocks across requests")
    free_gpu_memory_fraction: Number = Field(default=0.9, gt=0, le=1, description="share of free GPU memory for the KV cache")
    cuda_graph_batch_sizes: tuple[PositiveInt, ...] | None = Field(
        default=None, description="trtllm-pytorch: batch sizes captured as CUDA graphs (default: powers of 2 up to max_batch_size)")
    lora: LoraSpec | None = None
    speculative: SpeculativeSpec | None = None

    @model_validator(mode="after")
    def _input_fits(self) -> "BuildSizes":
        if self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len ({self.max_input_len}) exceeds max_seq_len ({self.max_seq_len})")
        too_big = [b for b in self.cuda_graph_batch_sizes or () if b > self.max_batch_size]
        if too_big:
            raise ValueError(f"cuda_graph_batch_sizes {too_big} exceed max_batch_size ({self.max_batch_size}); "
                             "drop them or raise max_batch_size")
        if self.cuda_graph_batch_sizes is not None and self.target is not Target.trtllm_pytorch:
            raise ValueError("cuda_graph_batch_sizes applies to target trtllm-pytorch; remove it or change the target")
        if self.speculative is not None and self.target is not Target.trtllm_engine:
            raise ValueError("speculative applies to target trtllm-engine (trtllm-build's draft-token modes); "
                             "remove it or set target: trtllm-engine")
        return self


class QuantizeSpec(Strict):
    """How the quantize stage runs (what it makes is the same either way)."""

    path: QuantizePath = Field(default=QuantizePath.auto, description="auto | day0 | modelopt. day0 quantizes a "
                               "calibration-free format (" + ", ".join(q.value for q, spec in FORMATS.items()
                                                                       if spec.calibration_free) +
                               ") tensor by tensor from the source's safetensors shards with ModelOpt's own "
                               "functions: no model built, no calibration, the ModelOpt path's hf/ byte for byte, "
                               "no trtllm/ (trtllm-engine builds convert hf/ on the compile host). auto: day0 where "
                               "that loses nothing (not where ModelOpt also writes the family's TensorRT-LLM "
                               "checkpoint); `kiln plan` says which path each variant takes and why")
    workers: PositiveInt | None = Field(default=None, description="day-0 worker threads (default: the host's cores)")


class Publish(Strict):
    aliases: tuple[Name, ...] = ()


class Recipe(Strict):
    kiln: Literal[1] = Field(description="schema version")
    name: Name
    model: ModelSource
    calibration: CalibrationSpec
    evaluation: EvaluationSpec
    variants: dict[Name, Variant] = Field(min_length=1)
    build: BuildSizes = BuildSizes()
    publish: Publish = Publish()
    quantize: QuantizeSpec = Field(default=QuantizeSpec(), exclude_if=lambda spec: spec == QuantizeSpec())

    @model_validator(mode="after")
    def _day0_can_make(self) -> "Recipe":
        if self.quantize.path is not QuantizePath.day0:
            return self
        for name, variant in self.variants.items():
            algorithm = None if variant.is_auto or variant.algorithm not in FORMATS[variant.quant].algorithms \
                else variant.algorithm
            problem = day0_problem(variant.quant, variant.kv_cache, algorithm, variant.backend)
            if problem:
                raise ValueError(f"quantize.path: day0 cannot make variants.{name}: {problem} (fix: quantize.path: "
                                 "auto, which takes the ModelOpt path where day-0 cannot)")
        return self

    @model_validator(mode="after")
    def _ranks_can_calibrate(self) -> "Recipe":
        calibration = self.calibration
        if calibration.ranks == 1:
            return self
        across = f"calibration.processes: {calibration.processes}" + (
            f" on nodes: {calibration.nodes}" if calibration.nodes > 1 else "")
        for name, variant in self.variants.items():
            if variant.is_auto:
                raise ValueError(f"variants.{name}: quant auto's size search calibrates in one process, not across "
                                 f"{across} (fix: processes: 1 and nodes: 1, or a format of its own)")
        return self

    @model_validator(mode="after")
    def _offload_can_build(self) -> "Recipe":
        if self.calibration.offload is not Offload.disk:
            return self
        for name, variant in self.variants.items():
            if variant.backend is not Backend.modelopt or variant.is_auto:
                what = "quant auto" if variant.is_auto else f"backend {variant.backend.value}"
                raise ValueError(f"variants.{name}: {what} does not run under calibration.offload: disk "
                                 "(fix: offload: none, or a ModelOpt format)")
        return self

    @model_validator(mode="after")
    def _gpu_builds_load(self) -> "Recipe":
        """`gpus` builds TensorRT-LLM artifacts of the target: a format TensorRT-LLM does not load for it cannot
        have any (its HF checkpoint still publishes, for the runtimes that load it)."""
        runtime = Runtime.trtllm if self.build.target is Target.trtllm_engine else Runtime.trtllm_pytorch
        for name, variant in self.variants.items():
            cell = runtime_cells(variant.quant_formats, variant.kv_cache, variant.backend)[runtime]
            if variant.gpus and cell.loads is Loads.no:
                where = ", ".join(r.value for r in loading_runtimes(variant.quant_formats, variant.kv_cache,
                                                                      variant.backend)) or "no runtime"
                raise ValueError(f"variants.{name}.gpus: target {self.build.target.value} builds TensorRT-LLM "
                                 f"artifacts per GPU, and {runtime.value} does not load {variant.quant_label} "
                                 f"({cell.evidence_text()}) (fix: remove gpus to publish the HF checkpoint, which "
                                 f"{where} loads, or choose another format)")
        return self

    @model_validator(mode="after")
    def _task_gates_name_tasks(self) -> "Recipe":
        tasks = {task.name for task in self.evaluation.tasks}
        for name, variant in self.variants.items():
            score = variant.auto.score_samples if variant.auto else None
            if score is not None and score > self.calibration.samples:
                raise ValueError(f"variants.{name}.auto.score_samples ({score}) exceeds calibration.samples "
                                 f"({self.calibration.samples}): the scores read calibration windows (fix: lower it "
                                 "or raise calibration.samples)")
            unknown = sorted(set(variant.gates.max_task_drop or ()) - tasks)
            if unknown:
                listed = ", ".join(sorted(tasks)) or "none"
                raise ValueError(f"variants.{name}.gates.max_task_drop names {', '.join(unknown)}, which "
                                 f"evaluation.tasks does not list (it lists {listed}); add the task or remove the gate")
        return self
