"""The requests the plan hands each stage, built from the recipe: what compile, quantize and validate are asked
for, each setting under the recipe's own name. Their fields are what the stages' keys are made of."""

from __future__ import annotations

import json
from dataclasses import replace

from kiln import compile as compile_stage
from kiln import quantize, validate
from kiln.common.memory import ModelShape
from kiln.common.versions import tool_versions
from kiln.pipeline.recipe.loader import LoadedRecipe
from kiln.pipeline.recipe.schema import Variant


def compile_request(loaded: LoadedRecipe, sm: str) -> compile_stage.CompileRequest:
    build = loaded.recipe.build
    return compile_stage.CompileRequest(
        target=build.target,
        sm=sm,
        tp_size=build.tp_size,
        max_batch_size=build.max_batch_size,
        max_input_len=build.max_input_len,
        max_seq_len=build.max_seq_len,
        max_num_tokens=build.max_num_tokens,
        kv_cache_reuse=build.kv_cache_reuse,
        free_gpu_memory_fraction=build.free_gpu_memory_fraction,
        cuda_graph_batch_sizes=build.cuda_graph_batch_sizes,
        lora_target_modules=build.lora.target_modules if build.lora else (),
        max_lora_rank=build.lora.max_rank if build.lora else 64,
        speculative_mode=build.speculative.mode if build.speculative else None,
        max_draft_len=build.speculative.max_draft_len if build.speculative else 0,
    )


def quantize_request(loaded: LoadedRecipe, variant: Variant, bits: float | None = None,
                     source_config: dict | None = None) -> quantize.QuantizeRequest:
    """What quantize is asked for; `bits`: the candidate budget of a quant-auto variant's size search;
    `source_config`: the source's config.json where it is at hand (the day-0 path's choice reads its family)."""
    request = _modelopt_request(loaded, variant, bits)
    day0 = _day0(loaded, request, source_config)[0]
    if day0:   # day-0 calibrates nothing
        request = replace(request, processes=1, nodes=1)
    return replace(request, day0=day0)


def quantize_path(loaded: LoadedRecipe, variant: Variant, source_config: dict | None) -> tuple[str, str]:
    """The variant's quantize path (day0 | modelopt | llmcompressor) and why, as `kiln plan` says it."""
    calibration = loaded.recipe.calibration
    across = ""
    if calibration.ranks > 1:
        hosts = f" on each of {calibration.nodes} nodes" if calibration.nodes > 1 else ""
        across = (f"; calibrated by {calibration.processes} ranks{hosts} under torchrun, each on its share of the "
                  "samples, rank 0 exports")
    if variant.backend is not quantize.Backend.modelopt:
        return variant.backend.value, f"{variant.backend.value} backend (its own tool, in its own interpreter){across}"
    day0, why = _day0(loaded, _modelopt_request(loaded, variant, None), source_config)
    return ("day0" if day0 else "modelopt"), why + ("" if day0 else across)


def _day0(loaded: LoadedRecipe, request: quantize.QuantizeRequest, source_config: dict | None) -> tuple[bool, str]:
    """Whether the day-0 path makes the request, and why. `auto` takes it where it makes everything the ModelOpt
    path would: not for a format whose TensorRT-LLM checkpoint (trtllm/) ModelOpt also writes for the family."""
    setting = loaded.recipe.quantize.path
    if setting is quantize.QuantizePath.modelopt:
        return False, "ModelOpt path (quantize.path: modelopt)"
    family = quantize.family_of(source_config) if source_config else None
    problem = quantize.day0_problem(request.quant, request.kv_cache, request.algorithm, request.backend, family)
    if setting is quantize.QuantizePath.day0:   # the recipe check refused what it cannot make (checks.py)
        return True, "day-0 path (quantize.path: day0): read from the safetensors shards, no model built"
    if problem:
        return False, f"ModelOpt path: {problem}"
    offloaded = loaded.recipe.calibration.offload is quantize.Offload.disk
    if request.engine_checkpoint and not offloaded and (family is None or family.trtllm is not None):
        return False, (f"ModelOpt path: it also writes the TensorRT-LLM checkpoint (trtllm/) of {request.quant.value}, "
                       "which the day-0 path does not (quantize.path: day0 publishes hf/ only)")
    return True, (f"day-0 path: {request.quant.value} needs no calibration data, so each tensor is quantized from the "
                  "safetensors shards by ModelOpt's own functions, no model built (the same hf/ byte for byte)")


def _modelopt_request(loaded: LoadedRecipe, variant: Variant, bits: float | None) -> quantize.QuantizeRequest:
    model = loaded.recipe.model
    return quantize.QuantizeRequest(
        quant=variant.quant,
        kv_cache=variant.kv_cache,
        group_size=variant.effective_group_size,
        dtype=model.dtype,
        tp_size=loaded.recipe.build.tp_size,
        trust_remote_code=model.trust_remote_code,
        allow_pickle=model.allow_pickle,
        alpha=variant.alpha,
        exclude=variant.exclude,
        only=variant.only,
        # The format's default named explicitly is the default: the same key and checkpoint as leaving it out.
        algorithm=None if variant.is_auto or variant.algorithm not in quantize.FORMATS[variant.quant].algorithms
        else variant.algorithm,
        max_shard_size=loaded.recipe.build.max_shard_size,
        calibration_batch_size=loaded.recipe.calibration.batch_size,
        backend=variant.backend,
        auto=auto_request(loaded, variant, bits),
        all_experts=loaded.recipe.calibration.all_experts,
        processes=loaded.recipe.calibration.processes,
        nodes=loaded.recipe.calibration.nodes,
    )


RESUMABLE_FROM_PARAMS = 1e9   # calibration.resumable auto: where calibration takes minutes to hours on one host


def resumable(loaded: LoadedRecipe, variant: Variant, source_config: dict) -> bool:
    """Whether the variant's calibration saves each layer to resume from (quantize/resume.py): ModelOpt calibrating
    one format. `auto`: sources of RESUMABLE_FROM_PARAMS or more whose calibration makes more than one pass (AWQ,
    GPTQ, SmoothQuant, a scale search); a max-calibrated format's one pass would run twice a layer at a time (each
    layer once to calibrate, once to feed the next), which costs more than a kill could."""
    setting = loaded.recipe.calibration.resumable
    if variant.backend is not quantize.Backend.modelopt or variant.is_auto or setting is False:
        return False
    if loaded.recipe.calibration.ranks > 1:   # ranks calibrate the whole model at once
        return False
    if quantize_request(loaded, variant, source_config=source_config).day0:   # finished shards are kept
        return setting is True or ModelShape.from_config(source_config).params >= RESUMABLE_FROM_PARAMS
    spec = quantize.FORMATS[variant.quant]
    searches = spec.rewrites_weights or variant.algorithm in spec.algorithms
    return setting is True or (searches and ModelShape.from_config(source_config).params >= RESUMABLE_FROM_PARAMS)


def auto_request(loaded: LoadedRecipe, variant: Variant, bits: float | None) -> quantize.AutoRequest | None:
    auto = variant.auto
    if auto is None:
        return None
    calibration = loaded.recipe.calibration.samples
    return quantize.AutoRequest(formats=auto.formats, effective_bits=bits if bits is not None else auto.candidates[0],
                                method=auto.method.modelopt, score_samples=auto.score_samples or min(16, calibration))


def validate_request(loaded: LoadedRecipe) -> validate.ValidateRequest:
    """What validate is asked for; the baseline and every variant of the recipe share it."""
    recipe = loaded.recipe
    return validate.ValidateRequest(trust_remote_code=recipe.model.trust_remote_code,
                                    allow_pickle=recipe.model.allow_pickle, offload=recipe.calibration.offload,
                                    allow_code_execution=recipe.evaluation.allow_code_execution)


def structure_expectation(record: quantize.CheckpointRecord, min_expert_tokens: int, trust_remote_code: bool,
                          allowed_differences: tuple[str, ...] = ()) -> validate.StructureExpectation:
    """What the structure checks hold an exported checkpoint to: what its kiln.json says quantize was asked to make,
    and the recipe's `calibration.min_expert_tokens`, `model.trust_remote_code` and
    `evaluation.allow_differences`. A size search's mix that came out as one format exports as that format."""
    formats = record.quant_formats
    if quantize.Backend(record.backend) is not quantize.Backend.modelopt:
        quant_algo = None   # compressed-tensors: config.json's own config groups, no hf_quant_config.json
    elif record.quant == quantize.AUTO and len(formats) > 1:
        quant_algo = quantize.MIXED_PRECISION
    else:
        quant_algo = quantize.FORMATS[formats[0]].export_quant_algo if formats else None
    labels = {name: "none" if fmt == "none" else quantize.FORMATS[quantize.QuantFormat(fmt)].export_quant_algo
              for name, fmt in record.layer_formats.items()}
    return validate.StructureExpectation(
        quant_algo=quant_algo,
        kv_cache_quant_algo=quantize.KV_CACHE_FORMATS[quantize.KVCacheFormat(record.kv_cache)].export_algo,
        layer_formats=labels,
        exclude=tuple(record.exclude), only=tuple(record.only),
        unquantized_by_default=quantize.UNQUANTIZED_BY_DEFAULT,
        norms_may_change=any(quantize.FORMATS[f].rewrites_weights for f in formats),
        trust_remote_code=trust_remote_code, expert_tokens=record.expert_tokens, min_expert_tokens=min_expert_tokens,
        allowed_differences=tuple(allowed_differences), dtype=record.dtype)


def quantize_key_config(request: quantize.QuantizeRequest) -> dict:
    """The request as the quantize key records it."""
    def encode(value):
        return list(value) if isinstance(value, tuple) else value.value

    fields = dict(request.__dict__)
    if request.backend is quantize.Backend.modelopt:
        del fields["backend"]   # ModelOpt keys predate backends: their cache entries stay valid
    if not request.only:
        del fields["only"]      # keys of variants that quantize every layer predate `only`
    if not request.all_experts:
        del fields["all_experts"]   # and those that calibrate experts on their routed tokens, all_experts
    if request.algorithm is None:
        del fields["algorithm"]   # and those of a format's default algorithm, `algorithm`
    if not request.day0:
        del fields["day0"]      # and ModelOpt-path keys, the day-0 path
    if request.processes == 1:
        del fields["processes"]   # and one-process keys, calibration across processes
    if request.nodes == 1:
        del fields["nodes"]       # and one-host keys, calibration across nodes
    if request.auto is None:
        del fields["auto"]      # and single-format keys predate auto precision
    else:
        fields["auto"] = {**request.auto.__dict__, "formats": [q.value for q in request.auto.formats]}
    return json.loads(json.dumps(fields, default=encode))


def quantize_tools(backend: quantize.Backend) -> dict[str, str]:
    if backend is quantize.Backend.modelopt:
        return tool_versions(quantize.TOOLS)
    return {**quantize.tool_versions(backend), **tool_versions(())}
