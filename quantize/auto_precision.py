"""Auto precision (`quant: auto`): ModelOpt's auto_quantize picks each linear layer's format under a budget.

kiln states the budget as it measures checkpoints (quantize/size.py: bits per decoder weight, scales
included, lm_head and embeddings left out and kept 16-bit). ModelOpt's `effective_bits` also counts the
layers it leaves unquantized, lm_head among them, at 16 bits; `modelopt_budget` translates, and the
exported files are measured afterwards (`check_budget`), so a translation that drifts fails the build.

The layers are scored on the first `score_samples` calibration windows; every format is calibrated on all
of them first (ModelOpt reads both phases from the start of the same loader; AWQ formats calibrate on a
quarter). The scores only rank layers: the held-out evaluation text decides the gates.

On a CPU, ModelOpt's NVFP4 fake quantization asserts CUDA; while the search runs there, kiln's own NVFP4
rounding (common/nvfp4.py, the reference runtime's, compared with ModelOpt's CUDA kernel by
bench/nvfp4_gpu.py) stands in for that one op, and kiln's MXFP8 rounding (common/blockscale.py) for MXFP8's.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import re
from pathlib import Path

from kiln.common.errors import KilnError
from kiln.quantize.checkpoint import AutoRequest
from kiln.quantize.formats import FORMATS, MIXED_PRECISION, KVCacheFormat, format_of_export
from kiln.quantize.size import CheckpointSize, decoder_linear_weights

UNQUANTIZED = "none"
# kiln's size definition leaves these out and every format keeps them 16-bit; auto precision does too.
ALWAYS_16_BIT = ("lm_head",)
BUDGET_TOLERANCE_BITS = 0.1


class BudgetMissed(KilnError):
    exit_code = 1


# The layers auto_quantize gives one format together (its quant_grouping_rules for Llama-like decoders): the shards
# serving runtimes fuse. Used to count the search's forward passes for its progress bar.
_SHARED_FORMAT = re.compile(r"^(.*?)\.(?:(q_proj|k_proj|v_proj)|(gate_proj|up_proj))$")


def search_forwards(layers: list[str], exclude: tuple[str, ...], formats: int, batches: int, score_batches: int,
                    method: str = "kl_div") -> int:
    """How many forward passes of the whole model a search makes: each format calibrates on every batch (AWQ on a
    quarter), then with method kl each score batch runs once unquantized and once per group of layers and format
    (measured equal on the test model); with method gradient once, with its backward pass."""
    patterns = disabled_layers(exclude)
    groups = set()
    for name in layers:
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        shared = _SHARED_FORMAT.match(name)
        groups.add((shared.group(1), bool(shared.group(2))) if shared else name)
    per_score_batch = 1 + len(groups) * formats if method == "kl_div" else 1
    return formats * batches + score_batches * per_score_batch


def disabled_layers(exclude: tuple[str, ...]) -> list[str]:
    """ModelOpt's module-name patterns for the layers kept 16-bit: lm_head and the recipe's `exclude`."""
    return [p for pattern in (*ALWAYS_16_BIT, *exclude) for p in (pattern, f"{pattern}.*")]


def linear_weights(model) -> dict[str, int]:
    """The linear layers' weights ModelOpt's effective_bits counts: the decoder's, and every other one (lm_head)."""
    from torch import nn

    decoder_layers = set(decoder_linear_layers(model))
    counts = {"decoder": 0, "others": 0}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            counts["decoder" if name in decoder_layers else "others"] += module.weight.numel()
    return counts


def modelopt_budget(weights: dict[str, int], bits: float) -> float:
    """`bits` per decoder weight as ModelOpt's effective_bits: its weight count adds every other linear layer
    (lm_head) at 16 bits. `weights`: linear_weights(model)."""
    decoder, others = weights["decoder"], weights["others"]
    return (bits * decoder + 16.0 * others) / (decoder + others)


def kiln_bits(weights: dict[str, int], modelopt_bits: float) -> float:
    """ModelOpt's effective_bits back in bits per decoder weight (modelopt_budget's inverse)."""
    decoder, others = weights["decoder"], weights["others"]
    return (modelopt_bits * (decoder + others) - 16.0 * others) / decoder


@contextlib.contextmanager
def block_formats_on_cpu():
    """ModelOpt's block fake quant with kiln's rounding for CPU tensors (ModelOpt's asserts CUDA, or needs Triton):
    dynamic NVFP4 and static NVFP4 blocks (common/nvfp4.py) and MXFP8 and MXFP4 (common/blockscale.py), the
    reference runtime's own numerics."""
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.nn.modules import tensor_quantizer as quantizer_module

    from kiln.common import blockscale, nvfp4

    modelopt_op = tensor_quant.dynamic_block_quantize_op

    def block_quantize(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
        bits = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
        if inputs.is_cuda:
            return modelopt_op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
        # E2M1 values (4 bits, 2 exponent) in blocks of 16 (W4A8_NVFP4_FP8's weights: 32) with E4M3 scales (8 bits,
        # 4 exponent): NVFP4.
        if amax is not None and block_size in (nvfp4.BLOCK, 2 * nvfp4.BLOCK) and bits == (4, 2, 8, 4):
            global_scale = amax.float().amax() / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX)
            return nvfp4.fake_quant_activation(inputs, global_scale, block_size)
        # E4M3 or E2M1 values in blocks of 32 with E8M0 scales (9 bits as ModelOpt counts, 8 exponent): MXFP8, MXFP4.
        if block_size == blockscale.MX_BLOCK and bits == (8, 4, 9, 8):
            return blockscale.fake_quant_mxfp8(inputs)
        if block_size == blockscale.MX_BLOCK and bits == (4, 2, 9, 8):
            return blockscale.fake_quant_mxfp4(inputs)
        return modelopt_op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)

    def static_fp4(inputs, amax, global_amax=None, quantize_block_scales=True, fp8_max=nvfp4.E4M3_MAX,
                   out_dtype=None, pass_through_bwd=False):
        if inputs.is_cuda or not quantize_block_scales:
            return modelopt_static(inputs, amax, global_amax, quantize_block_scales, fp8_max, out_dtype,
                                   pass_through_bwd)
        return nvfp4.fake_quant_static(inputs, amax, global_amax, fp8_max).to(out_dtype or inputs.dtype)

    # The scale searches' static NVFP4 blocks (MSE, local Hessian, four over six) are a Triton kernel in ModelOpt.
    modelopt_static = quantizer_module.static_blockwise_fp4_fake_quant
    tensor_quant.dynamic_block_quantize_op = block_quantize
    quantizer_module.static_blockwise_fp4_fake_quant = static_fp4
    try:
        yield
    finally:
        tensor_quant.dynamic_block_quantize_op = modelopt_op
        quantizer_module.static_blockwise_fp4_fake_quant = modelopt_static


@contextlib.contextmanager
def quiet_search():
    """auto_quantize draws its own tqdm bars on stderr, beside kiln's progress; kiln --debug keeps them."""
    import os
    from functools import partial

    from modelopt.torch.quantization import algorithms

    bars = algorithms.tqdm
    if os.environ.get("KILN_DEBUG") != "1":
        algorithms.tqdm = partial(bars, disable=True)
    try:
        yield
    finally:
        algorithms.tqdm = bars


SEARCH_STATE = "search_state.pth"   # the score stage's entry: ModelOpt's saved search (calibration and scores)
SCORE_RECORD = "score.json"         # and kiln's record of it (quantize.score)


def search(model, request: AutoRequest, exclude: tuple[str, ...], batches: list, forward, on_forward,
           modelopt_config, search_state: Path | None = None, budget_bits: float | None = None) -> dict:
    """Run ModelOpt's auto_quantize over `batches` (token-id tensors) and leave `model` quantized with the
    chosen formats, each format's full config (GPTQ's method, not only its INT4 quantizers) from
    `modelopt_config`. Returns the search's summary: ModelOpt's achieved effective bits, its budget, its score.

    `search_state`: ModelOpt's checkpoint of the search. Where the file exists, every format's calibration and
    every layer's scores are restored from it and only the budget is solved (no forward pass); where it does not,
    ModelOpt writes it after calibrating and scoring. `budget_bits` overrides the request's budget."""
    import modelopt.torch.quantization as mtq

    def forward_step(m, batch):
        on_forward()
        return forward(m, batch)

    def loss_func(output, batch):   # method gradient: the language-modelling loss on the window itself
        import torch.nn.functional as F

        logits = output.logits if hasattr(output, "logits") else output
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten().to(logits.device))

    bits = request.effective_bits if budget_bits is None else budget_bits
    budget = modelopt_budget(linear_weights(model), bits)
    with block_formats_on_cpu(), quiet_search():
        try:
            _, state = mtq.auto_quantize(
                model, constraints={"effective_bits": budget},
                quantization_formats=[modelopt_config(q, KVCacheFormat.none, None) for q in request.formats],
                data_loader=batches, forward_step=forward_step,
                loss_func=loss_func if request.method == "gradient" else None,
                disabled_layers=disabled_layers(exclude), num_calib_steps=len(batches),
                num_score_steps=request.score_samples, method=request.method, verbose=False,
                checkpoint=str(search_state) if search_state is not None else None,
            )
        except ValueError as exc:
            if "infeasible" not in str(exc):   # "The effective_bits target ... is infeasible ...": anything else raises
                raise
            raise BudgetMissed(f"auto precision: effective_bits {bits:g} cannot be met on this "
                               f"model with {', '.join(q.value for q in request.formats)} (ModelOpt: {exc})") from None
    best = state.get("best", {})
    return {"modelopt_budget": round(budget, 4),
            "modelopt_effective_bits": round(float(best.get("constraints", {}).get("effective_bits", 0.0)), 4),
            "score": float(best.get("score", 0.0))}


def frontier(search_state: Path, weights: dict[str, int], formats: tuple, budgets, modelopt_config) -> list[dict]:
    """Each budget solved from a size search's saved scores, without the model: how many layer groups each format
    takes, ModelOpt's effective bits back in kiln's bits per decoder weight, and the sum of the chosen formats'
    scores: ModelOpt's estimate of what the mix costs (method kl: each group's KL from the 16-bit model's outputs
    with that group alone quantized), which ranks candidates before any is built. validate measures the real KL."""
    from modelopt.torch.quantization.algorithms import QuantRecipe, _resolve_best_recipe   # 0.47's re-solve
    from modelopt.torch.utils.serialization import safe_load

    state = safe_load(search_state)
    names = {QuantRecipe(modelopt_config(q, KVCacheFormat.none, None), name=f"CUSTOM_{i}"): q.value
             for i, q in enumerate(formats)}   # ModelOpt names a custom format by its index in the list
    stats = state["candidate_stats"]
    total = state.get("cost_denominator") or sum(s.get("uncompressed_cost", max(s["costs"])) for s in stats.values())
    points = []
    for bits in budgets:
        try:
            with quiet_search():
                best = _resolve_best_recipe(state, {"effective_bits": modelopt_budget(weights, bits)})
        except ValueError as exc:
            if "infeasible" not in str(exc):
                raise
            points.append({"effective_bits": bits, "feasible": False})
            continue
        cost = score = 0.0
        groups: dict[str, int] = {}
        for name, recipe in best.items():
            index = stats[name]["formats"].index(recipe)
            cost += stats[name]["costs"][index]
            score += stats[name]["scores"][index]
            label = names.get(recipe, UNQUANTIZED)
            groups[label] = groups.get(label, 0) + 1
        points.append({"effective_bits": bits, "feasible": True, "estimated_score": round(score, 6),
                       "estimated_bits": round(kiln_bits(weights, 16.0 * cost / total), 4), "groups": groups})
    return points


def layer_formats(hf_quant_config: dict, linear_layers: list[str], formats: tuple = ()) -> dict[str, str]:
    """Each linear layer's kiln format as the exported hf_quant_config.json says ("none": kept 16-bit); a label
    two formats share (INT4 AWQ and GPTQ export W4A16_AWQ) names the one of `formats` the search chose from.

    A mixed export lists each quantized layer's quant_algo; a mix that came out as one format exports as
    that format, its 16-bit layers in `exclude_modules`."""
    searched = {FORMATS[q].export_quant_algo: FORMATS[q] for q in formats}
    quant = hf_quant_config["quantization"]
    if quant.get("quant_algo") == MIXED_PRECISION:
        per_layer = {name: cfg.get("quant_algo") for name, cfg in quant.get("quantized_layers", {}).items()}
    else:
        excluded = quant.get("exclude_modules") or []
        per_layer = {name: None if any(fnmatch.fnmatch(name, p) for p in excluded) else quant.get("quant_algo")
                     for name in linear_layers}
    formats = {}
    for name in linear_layers:
        algo = per_layer.get(name)
        spec = (searched.get(algo) or format_of_export(algo)) if algo else None
        if algo and spec is None:
            raise KilnError(f"hf_quant_config.json gives {name} quant_algo {algo}, which no kiln format exports")
        formats[name] = spec.name.value if spec else UNQUANTIZED
    return formats


def read_layer_formats(hf_dir: Path, linear_layers: list[str], formats: tuple = ()) -> dict[str, str]:
    return layer_formats(json.loads((Path(hf_dir) / "hf_quant_config.json").read_text()), linear_layers, formats)


def decoder_linear_layers(model) -> list[str]:
    """The decoder's linear layers, by module name: what kiln's size counts and auto precision chooses for."""
    from torch import nn

    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in f"{name}.weight"]


# Where ModelOpt's TensorRT-LLM export puts a decoder layer's HF linear layers (attention and dense MLP; other
# layers, such as experts, are not compared). auto_quantize gives q/k/v one format, and gate/up one.
_TRTLLM_LAYERS = {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): ("attention.qkv",),
                  ("self_attn.o_proj",): ("attention.dense",),
                  ("mlp.gate_proj", "mlp.up_proj"): ("mlp.fc", "mlp.gate"),
                  ("mlp.down_proj",): ("mlp.proj",)}


def trtllm_disagreements(hf_quant_config: dict, trtllm_layer_config: dict, num_layers: int) -> list[str]:
    """Decoder layers whose format differs between the HF export and TensorRT-LLM's quant_cfg.json."""
    hf = {k: v.get("quant_algo") for k, v in hf_quant_config["quantization"].get("quantized_layers", {}).items()}
    trt = {k: v.get("quant_algo") for k, v in (trtllm_layer_config.get("quantized_layers") or {}).items()}
    problems = []
    for i in range(num_layers):
        for hf_names, trt_names in _TRTLLM_LAYERS.items():
            hf_algos = {hf.get(f"model.layers.{i}.{name}") for name in hf_names}
            trt_algos = {trt.get(f"transformer.layers.{i}.{name}") for name in trt_names}
            if hf_algos != trt_algos and hf_algos != {None}:
                problems.append(f"layer {i} {'/'.join(hf_names)}: hf/ says {sorted(map(str, hf_algos))}, trtllm/ "
                                f"says {sorted(map(str, trt_algos))}")
    return problems


def lowest_budget(model_dir: Path, formats: tuple, exclude: tuple[str, ...]) -> float | None:
    """The fewest bits per decoder weight a mix of `formats` can reach on this model: every layer in the cheapest
    format, the excluded ones 16-bit (kiln's size definition). None before the weights are on disk."""
    linears = decoder_linear_weights(model_dir)
    if not linears:
        return None
    kept = sum(count for module, count in linears.items() if any(fnmatch.fnmatch(module, p) for p in exclude))
    total = sum(linears.values())
    return (min(FORMATS[q].weight_bits for q in formats) * (total - kept) + 16.0 * kept) / total


def check_budget(size: CheckpointSize, request: AutoRequest) -> float:
    """The exported checkpoint's measured bits per weight; a failed build past the budget by more than
    BUDGET_TOLERANCE_BITS."""
    measured = size.bits_per_weight
    if measured is None or measured > request.effective_bits + BUDGET_TOLERANCE_BITS:
        raise BudgetMissed(f"auto precision: the exported checkpoint measures {measured} bits per decoder weight, "
                           f"the budget was effective_bits {request.effective_bits:g} (tolerance "
                           f"{BUDGET_TOLERANCE_BITS} bit); the mix ModelOpt chose does not fit what kiln measures")
    return measured
