"""Quant auto (issue 27): ModelOpt's per-layer format search under kiln's bits-per-weight budget.

The fast tests pin the pieces (the runtimes table's mixed rows, reading an export's layer formats, the budget's
translation into ModelOpt's terms and the size check). The slow ones run the search on the trained test model:
the reference runtime reads each layer's format from the exported files and agrees with ModelOpt's in-memory
model; and a recipe builds, publishes and pulls with the layer map the exports carry.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch import nn

from kiln.quantize import FORMATS, MIXED_PRECISION, AutoRequest, KVCacheFormat, Loads, QuantFormat, Runtime
from kiln.quantize import auto_precision, runtime_cells
from kiln.quantize.size import CheckpointSize
from tests.recipes import run_kiln, write_recipe
from tests.test_reference_runtime import MAX_KL, MIN_TOP1, _kl_and_top1

NVFP4_FP8 = (QuantFormat.nvfp4, QuantFormat.fp8)


def test_a_mix_loads_where_every_format_and_the_mixed_row_load():
    cells = runtime_cells(NVFP4_FP8)
    assert {r: c.loads for r, c in cells.items()} == {
        Runtime.trtllm: Loads.yes, Runtime.trtllm_pytorch: Loads.yes, Runtime.vllm: Loads.yes,
        Runtime.sglang: Loads.unchecked}   # SGLang reads mixed checkpoints for Nemotron-H only
    assert "LINEAR_ALGOS" in cells[Runtime.vllm].evidence.source
    # vLLM's mixed loader leaves a layer of any other format unquantized: INT4 AWQ's own row refuses it.
    assert runtime_cells((QuantFormat.int4_awq, QuantFormat.fp8))[Runtime.vllm].loads is Loads.no
    # A one-format "mix" is that format's checkpoint.
    assert runtime_cells((QuantFormat.fp8,)) == runtime_cells(QuantFormat.fp8)
    assert runtime_cells(NVFP4_FP8, KVCacheFormat.nvfp4)[Runtime.vllm].loads is Loads.unchecked


def test_layer_formats_come_from_the_exported_config():
    layers = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    mixed = {"quantization": {"quant_algo": MIXED_PRECISION, "quantized_layers": {
        "model.layers.0.mlp.down_proj": {"quant_algo": "FP8"},
        "model.layers.0.self_attn.q_proj": {"quant_algo": "NVFP4", "group_size": 16}}}}
    assert auto_precision.layer_formats(mixed, layers) == {
        "model.layers.0.mlp.down_proj": "fp8", "model.layers.0.self_attn.q_proj": "nvfp4",
        "model.layers.1.mlp.down_proj": "none"}
    # A search that chose one format exports as that format, its 16-bit layers excluded.
    single = {"quantization": {"quant_algo": "W4A16_AWQ", "exclude_modules": ["lm_head", "model.layers.1*"]}}
    got = auto_precision.layer_formats(single, layers, (QuantFormat.int4_gptq, QuantFormat.fp8))
    assert got == {layers[0]: "int4_gptq", layers[1]: "int4_gptq", layers[2]: "none"}   # the searched GPTQ, not AWQ
    with pytest.raises(Exception, match="quant_algo W8A8_FP4"):
        auto_precision.layer_formats({"quantization": {"quant_algo": MIXED_PRECISION, "quantized_layers": {
            layers[0]: {"quant_algo": "W8A8_FP4"}}}}, layers)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 64, bias=False) for _ in range(3)])   # 3 x 4096 decoder weights
        self.lm_head = nn.Linear(64, 1024, bias=False)                                    # 65536, kept 16-bit


def test_the_search_counts_its_forward_passes():
    layers = [f"model.layers.{i}.{kind}" for i in range(2) for kind in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")]
    # 4 groups a layer (q/k/v, o, gate/up, down): 2 formats x 8 batches, then 4 windows x (1 + 8 groups x 2 formats)
    assert auto_precision.search_forwards(layers, (), 2, 8, 4) == 16 + 4 * 17
    assert auto_precision.search_forwards(layers, ("*.mlp.down_proj",), 2, 8, 4) == 16 + 4 * 13
    assert auto_precision.search_forwards(layers, (), 2, 8, 4, method="gradient") == 16 + 4


def test_the_budget_is_translated_into_modelopts_count():
    model = _Tiny()
    model.layers = nn.ModuleList([nn.Sequential(layer) for layer in model.layers])   # names model.layers.i.0
    wrapper = nn.Module()
    wrapper.model = model
    weights = auto_precision.linear_weights(wrapper)
    assert weights == {"decoder": 3 * 4096, "others": 65536}
    budget = auto_precision.modelopt_budget(weights, 6.0)
    assert budget == pytest.approx((6.0 * 3 * 4096 + 16.0 * 65536) / (3 * 4096 + 65536))
    assert auto_precision.kiln_bits(weights, budget) == pytest.approx(6.0)   # the frontier reads ModelOpt's back
    assert auto_precision.decoder_linear_layers(wrapper) == [f"model.layers.{i}.0" for i in range(3)]


def test_a_checkpoint_past_its_budget_fails_the_build():
    request = AutoRequest(NVFP4_FP8, 5.0, "kl_div", 8)
    assert auto_precision.check_budget(CheckpointSize(1, 100, 5.09), request) == 5.09
    with pytest.raises(auto_precision.BudgetMissed, match="measures 5.2 bits per decoder weight, the budget was "
                                                         "effective_bits 5"):
        auto_precision.check_budget(CheckpointSize(1, 100, 5.2), request)


def test_hf_and_trtllm_layer_maps_are_compared():
    hf = {"quantization": {"quantized_layers": {
        **{f"model.layers.0.self_attn.{p}_proj": {"quant_algo": "FP8"} for p in "qkvo"},
        **{f"model.layers.0.mlp.{p}_proj": {"quant_algo": "NVFP4"} for p in ("gate", "up", "down")}}}}
    trt = {"quantized_layers": {"transformer.layers.0.attention.qkv": {"quant_algo": "FP8"},
                                "transformer.layers.0.attention.dense": {"quant_algo": "FP8"},
                                **{f"transformer.layers.0.mlp.{p}": {"quant_algo": "NVFP4"} for p in ("fc", "gate", "proj")}}}
    assert auto_precision.trtllm_disagreements(hf, trt, 1) == []
    trt["quantized_layers"]["transformer.layers.0.mlp.proj"] = {"quant_algo": "FP8"}
    assert auto_precision.trtllm_disagreements(hf, trt, 1) == [
        "layer 0 mlp.down_proj: hf/ says ['NVFP4'], trtllm/ says ['FP8']"]


def test_check_refuses_a_budget_the_model_cannot_reach_with_its_excludes(tmp_path, test_model):
    """Excluded layers stay 16-bit: on the test model the down projections (a third of the decoder's weights) lift
    the lowest reachable budget from 4.5 to 7.57 bits, and check says so before anything is calibrated."""
    variants = {"mix": {"quant": "auto", "exclude": ["*.mlp.down_proj"],
                        "auto": {"formats": ["nvfp4", "fp8"], "effective_bits": [6.0, 8.0]}}}
    result = run_kiln("check", write_recipe(tmp_path, str(test_model), variants, name="floor"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert ("variants.mix.auto.effective_bits: 6 is below the 7.567 bits per weight nvfp4, fp8 reach on this model "
            "with exclude ['*.mlp.down_proj'] kept 16-bit (fix: give at least 7.57") in result.stderr
    variants["mix"]["auto"]["effective_bits"] = [8.0]
    assert run_kiln("check", write_recipe(tmp_path, str(test_model), variants, name="floor")).returncode == 0


def test_a_size_search_plans_one_candidate_per_budget(tmp_path, kiln_home, test_model):
    """search: smallest-passing without budgets plans every half bit from NVFP4's 4.5 to FP8's 8, smallest first,
    and one publish whose key follows the candidates and the gates; a single budget plans the variant itself."""
    def plan(gates, auto):
        variants = {"mix": {"quant": "auto", "auto": {"formats": ["nvfp4", "fp8"], **auto}, "gates": gates},
                    "one": {"quant": "auto", "auto": {"formats": ["nvfp4", "fp8"], "effective_bits": 5.0}}}
        result = run_kiln("plan", write_recipe(tmp_path, str(test_model), variants, name="p"), "--json")
        assert result.returncode == 0, result.stderr
        stages = json.loads(result.stdout)["stages"]
        score = {s["target"]: s["key"] for s in stages if s["stage"] == "score"}
        # every candidate restores its variant's scores, computed once by the score stage
        assert all(s["depends_on"] == [score[s["target"].split("@")[0]]] for s in stages if s["stage"] == "quantize")
        return {(s["stage"], s["target"]): s["key"] for s in stages}

    keys = plan({"max_kl": 0.01}, {"search": "smallest-passing"})
    budgets = ["4.5", "5", "5.5", "6", "6.5", "7", "7.5", "8"]
    assert [t for s, t in keys if s == "quantize" and t.startswith("mix")] == [f"mix@{b}b" for b in budgets]
    assert [t for s, t in keys if s == "publish" and "@" not in t] == ["mix", "one"]
    assert ("quantize", "one") in keys and ("validate", "one") in keys
    stricter = plan({"max_kl": 0.001}, {"search": "smallest-passing"})
    checkpoints = {"quantize", "validate"}
    assert {k: v for k, v in keys.items() if k[0] in checkpoints} == \
        {k: v for k, v in stricter.items() if k[0] in checkpoints}
    # Other gates may publish another candidate: what is built from the published one is keyed anew.
    assert keys[("publish", "mix")] != stricter[("publish", "mix")]
    assert keys[("vllm-check", "mix@vllm")] != stricter[("vllm-check", "mix@vllm")]
    listed = plan({"max_kl": 0.01}, {"effective_bits": [6.0, 5.0]})
    assert [t for s, t in listed if s == "quantize" and t.startswith("mix")] == ["mix@5b", "mix@6b"]
    assert listed[("quantize", "mix@5b")] == keys[("quantize", "mix@5b")] == listed[("quantize", "one")]
    # The scores do not depend on the budgets or the gates: one search scores once, whatever budgets are added
    # later, and a variant with the same formats, method and score windows shares them.
    assert listed[("score", "mix")] == keys[("score", "mix")] == stricter[("score", "mix")] == keys[("score", "one")]
    gradient = plan({"max_kl": 0.01}, {"effective_bits": [6.0, 5.0], "method": "gradient"})
    assert gradient[("score", "mix")] != keys[("score", "mix")]
    assert gradient[("quantize", "mix@5b")] != keys[("quantize", "mix@5b")]


def test_the_figure_draws_failed_candidates_and_the_frontier():
    from dataclasses import asdict

    from kiln.common.digest import canonical_digest
    from kiln.pipeline.report.figures import SizePoint, accuracy_size_figure, candidate_points, figure_digest, frontier

    variants = [SizePoint("nvfp4", "nvfp4", 4.5, 0.008, True, 0.01), SizePoint("mix", "auto 5.5b", 5.5, 0.0018, True, 0.01),
                SizePoint("int8", "int8_sq", 8.2, 0.0009, True, None), SizePoint("fp8", "fp8", 8.0, 0.0007, True, None)]
    searched = candidate_points("mix", [{"effective_bits": 4.5, "bits_per_weight": 4.5, "mean_kl": 0.012, "passed": False},
                                        {"effective_bits": 5.5, "bits_per_weight": 5.5, "mean_kl": 0.0018, "passed": True}])
    assert [(p.variant, p.candidate, p.passed) for p in searched] == [("mix@4.5b", True, False)]   # the published one is "mix"
    assert [p.variant for p in frontier(variants + searched)] == ["nvfp4", "mix", "fp8"]   # int8 is beaten by fp8
    _, axes, _ = accuracy_size_figure("t", variants + searched)
    labels = axes.get_legend_handles_labels()[1]
    assert "mix@4.5b: 4.50 bits, a search candidate that failed" in labels
    assert "frontier: the least KL each size bought" in labels
    search = labels.index("mix: its size search, bits against KL for each budget built")
    line = axes.get_legend_handles_labels()[0][search]
    assert list(line.get_xdata()) == [4.5, 5.5] and list(line.get_ydata()) == [0.012, 0.0018]
    # Figures without candidates keep the digests they had: a rebuild does not redraw them.
    assert figure_digest("t", variants) == canonical_digest(
        {"title": "t", "points": [{k: v for k, v in asdict(p).items() if k != "candidate"} for p in variants],
         "kind": "accuracy-vs-size/1"})


# ---- the search itself, on the trained test model ----

@pytest.fixture(scope="module")
def texts(test_model):
    from transformers import AutoTokenizer

    from kiln.pipeline.data.corpus import python_docs
    from kiln.pipeline.data.documents import token_samples

    tokenizer = AutoTokenizer.from_pretrained(test_model)
    return {"calibration": token_samples(python_docs("train"), tokenizer, 8, 128),
            "evaluation": token_samples(python_docs("heldout"), tokenizer, 6, 128)}


# [int4_awq, fp8]: both run ModelOpt's own fake quantization on a CPU, so the comparison is independent of kiln's
# code. [nvfp4, fp8]: the mix; on a CPU the search's NVFP4 rounding is kiln's (auto_precision.block_formats_on_cpu).
MIXES = {"int4_awq-fp8": (QuantFormat.int4_awq, QuantFormat.fp8), "nvfp4-fp8": NVFP4_FP8}


@pytest.mark.slow
@pytest.mark.parametrize("mix", list(MIXES))
def test_reference_runtime_decodes_each_layer_as_exported(tmp_path, test_model, texts, mix):
    from kiln.quantize import modelopt_adapter as adapter
    from kiln.validate.runtime import ReferenceLinear
    from kiln.validate.reference_loader import load_reference_model

    formats = MIXES[mix]
    request = AutoRequest(formats, 6.0, "kl_div", 4)
    model = adapter.load_source_model(test_model, "bfloat16", False, False)
    layers = auto_precision.decoder_linear_layers(model)
    forwards = []
    adapter.auto_quantize(model, request, (), texts["calibration"], 1, lambda: forwards.append(1))
    if mix == "nvfp4-fp8":   # the progress bar's count is ModelOpt's (AWQ calibrates in passes of its own)
        assert len(forwards) == auto_precision.search_forwards(layers, (), 2, len(texts["calibration"]), 4) == 8 * 2 + 4 * 33
    in_memory = copy.deepcopy(model).float()
    with auto_precision.block_formats_on_cpu(), torch.no_grad():
        expected = [in_memory(input_ids=ids[None]).logits[0] for ids in texts["evaluation"]]
    adapter.export_hf(model, tmp_path / "hf")
    chosen = auto_precision.read_layer_formats(tmp_path / "hf", layers, formats)
    assert {q.value for q in formats} <= set(chosen.values()), chosen   # a real mix: both formats (and maybe 16-bit)

    def agreement(checkpoint):
        reference = load_reference_model(checkpoint)
        with torch.no_grad():
            got = [reference(input_ids=ids[None]).logits[0] for ids in texts["evaluation"]]
        pairs = [_kl_and_top1(e, g) for e, g in zip(expected, got)]
        return reference, sum(k for k, _ in pairs) / len(pairs), sum(t for _, t in pairs) / len(pairs)

    reference, kl, top1 = agreement(tmp_path / "hf")
    assert kl < MAX_KL and top1 >= MIN_TOP1, (kl, top1)
    # Each layer holds its own format's stored bytes: the codec the exported config names for it.
    stored = {torch.float8_e4m3fn: "fp8", torch.uint8: formats[0].value,   # NVFP4 and INT4 both pack into uint8
              torch.bfloat16: "none"}
    for name in layers:
        module = reference.get_submodule(name)
        assert isinstance(module, ReferenceLinear)
        assert stored[module.stored_weight.dtype] == chosen[name], name

    # The per-layer config is what the reference reads: give one FP8 layer another format's label and it fails.
    corrupted = tmp_path / "corrupted"
    shutil.copytree(tmp_path / "hf", corrupted)
    config = json.loads((corrupted / "hf_quant_config.json").read_text())
    victim = next(name for name, fmt in chosen.items() if fmt == "fp8")
    config["quantization"]["quantized_layers"][victim] = {"quant_algo": "NVFP4", "group_size": 16}
    (corrupted / "hf_quant_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{victim}: its format stores weight, weight_scale, weight_scale_2"):
        agreement(corrupted)
    print(json.dumps({"mix": mix, "kl": kl, "top1": top1, "layers": chosen}))


@pytest.mark.slow
def test_mixed_exports_carry_what_the_loaders_read(tmp_path, test_model, texts):
    """The fields vLLM's ModelOpt mixed loader (ModelOptMixedPrecisionConfig) and TensorRT-LLM's mixed-precision
    config (PretrainedConfig.from_json_file -> quant_cfg.json) read, on a real [nvfp4, fp8] export with an FP8
    KV cache: the label of each layer, its block size, the KV algorithm, and stored bytes that match the label.
    The search scores with method gradient here (the other tests use kl): the loss's backward pass on a CPU."""
    from kiln.quantize import modelopt_adapter as adapter
    from kiln.quantize.headers import safetensors_header

    model = adapter.load_source_model(test_model, "bfloat16", False, False)
    forwards = []
    request = AutoRequest(NVFP4_FP8, 6.0, "gradient", 4)
    adapter.auto_quantize(model, request, (), texts["calibration"], 1, lambda: forwards.append(1))
    assert len(forwards) == auto_precision.search_forwards(auto_precision.decoder_linear_layers(model), (), 2, 8, 4,
                                                           "gradient")
    adapter.calibrate_kv_cache(model, KVCacheFormat.fp8, texts["calibration"], 1)
    adapter.export_hf(model, tmp_path / "hf")
    adapter.export_trtllm(model, tmp_path / "trtllm", "bfloat16", 1)

    # vLLM: config.json's quantization_config (preferred) names the method, MIXED_PRECISION and every layer; each
    # layer's algorithm is one its mixed loader quantizes (the formats whose own vLLM cell says yes), NVFP4 blocks
    # of 16, and the shards vLLM fuses (q/k/v, gate/up) share one algorithm or it refuses the checkpoint.
    vllm_algos = {FORMATS[q].export_quant_algo for q in QuantFormat if runtime_cells(q)[Runtime.vllm].loads is Loads.yes}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "modelopt" and config["quant_algo"] == MIXED_PRECISION
    layers = config["quantized_layers"]
    assert layers and {cfg["quant_algo"] for cfg in layers.values()} == {"NVFP4", "FP8"} <= vllm_algos
    assert all(cfg["group_size"] == 16 for cfg in layers.values() if cfg["quant_algo"] == "NVFP4")
    for i in range(4):
        for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            kind = "self_attn" if fused[0] == "q_proj" else "mlp"
            assert len({layers[f"model.layers.{i}.{kind}.{p}"]["quant_algo"] for p in fused}) == 1, (i, fused)
    hf_quant = json.loads((tmp_path / "hf" / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["kv_cache_quant_algo"] == "FP8" and hf_quant["quantized_layers"] == layers
    stored = safetensors_header(tmp_path / "hf" / "model.safetensors")
    for name, cfg in layers.items():
        assert stored[f"{name}.weight"]["dtype"] == {"FP8": "F8_E4M3", "NVFP4": "U8"}[cfg["quant_algo"]], name

    # TensorRT-LLM: config.json says MIXED_PRECISION; quant_cfg.json beside it carries the KV algorithm (global) and
    # each layer's, by TensorRT-LLM's names, every one a layer rank0.safetensors holds, its bytes matching its label.
    trt = json.loads((tmp_path / "trtllm" / "config.json").read_text())["quantization"]
    quant_cfg = json.loads((tmp_path / "trtllm" / "quant_cfg.json").read_text())
    assert trt["quant_algo"] == quant_cfg["quant_algo"] == MIXED_PRECISION
    assert quant_cfg["kv_cache_quant_algo"] == "FP8"
    rank0 = safetensors_header(tmp_path / "trtllm" / "rank0.safetensors")
    for name, cfg in quant_cfg["quantized_layers"].items():
        assert rank0[f"{name}.weight"]["dtype"] == {"FP8": "F8_E4M3", "NVFP4": "U8"}[cfg["quant_algo"]], name
        assert cfg.get("group_size", 16) == 16
    assert auto_precision.trtllm_disagreements({"quantization": hf_quant}, quant_cfg, 4) == []


@pytest.mark.slow
def test_a_size_search_publishes_the_smallest_passing_candidate_and_pulls(tmp_path, kiln_home, test_model):
    """Two budgets and a KL gate between them (all NVFP4 measures KL about 0.008 on the test model, the 6-bit
    mix about 0.0015): the 4.5-bit candidate fails and is reported, the 6-bit one is published."""
    variants = {"mix": {"quant": "auto", "auto": {"formats": ["nvfp4", "fp8"], "effective_bits": [4.5, 6.0],
                                                  "search": "smallest-passing"},
                        "runtimes": ["trtllm", "vllm"], "gates": {"max_kl": 0.004, "min_top1_agreement": 0.8}}}
    recipe = write_recipe(tmp_path, str(test_model), variants, name="auto", samples=8)
    result = run_kiln("build", recipe, "--json")
    assert result.returncode == 0, result.stderr
    built = json.loads(result.stdout)["variants"][0]
    smallest, published = built["candidates"]
    assert smallest["effective_bits"] == 4.5 and not smallest["gate"]["passed"]
    assert smallest["gate"]["failures"][0].startswith("max_kl: ")
    assert 4.5 <= smallest["size"]["bits_per_weight"] <= 4.6
    assert published["effective_bits"] == 6.0 and published["gate"]["passed"]
    assert built["registry"]["version"] == "1" and built["metrics"] == published["metrics"]
    assert "mix@4.5b: gate failed (max_kl: " in result.stderr
    out = tmp_path / "pulled"
    pulled = run_kiln("pull", "auto-mix/1", "--out", out)
    assert pulled.returncode == 0, pulled.stderr
    record = json.loads((out / "kiln.json").read_text())
    assert record["quant"] == "auto" and record["export_quant_algo"] == MIXED_PRECISION
    assert record["auto"]["effective_bits"] == 6.0
    assert 4.5 < record["auto"]["measured_bits"] <= 6.0 + auto_precision.BUDGET_TOLERANCE_BITS
    # kiln.json's map is the exported configs' map: hf_quant_config.json, and TensorRT-LLM's quant_cfg.json.
    hf = json.loads((out / "hf" / "hf_quant_config.json").read_text())
    exported = {name: FORMATS[QuantFormat(fmt)].export_quant_algo for name, fmt in record["layer_formats"].items()
                if fmt != "none"}
    assert exported == {name: cfg["quant_algo"] for name, cfg in hf["quantization"]["quantized_layers"].items()}
    trt = json.loads((out / "trtllm" / "quant_cfg.json").read_text())
    assert auto_precision.trtllm_disagreements(hf, trt, 4) == []
    assert set(record["layer_formats"].values()) == {"nvfp4", "fp8"}
    # The version carries the budget, the measured size and the layer counts.
    from kiln.common.digest import canonical_digest
    from kiln.registry import client
    from kiln.registry import tags as version_tags

    tags = client(kiln_home).get_model_version("auto-mix", "1").tags
    assert tags["kiln.quant"] == "auto" and tags["kiln.auto.effective_bits"] == "6.0"
    assert float(tags["kiln.auto.measured_bits"]) == record["auto"]["measured_bits"]
    assert tags["kiln.auto.layers_sha256"] == canonical_digest(record["layer_formats"])
    counts = dict(part.split(":") for part in tags["kiln.auto.formats"].split())
    assert sum(map(int, counts.values())) == 4 * 7 and set(counts) == {"nvfp4", "fp8"}
    assert tags["kiln.runtime.vllm"].startswith("yes")
    searched = [(c["effective_bits"], c["passed"]) for c in version_tags.search_candidates(tags)]
    assert searched == [(4.5, False), (6.0, True)]
    # The scores were computed once (the score stage) and each candidate restored them: no forward pass of its own.
    ran = json.loads(result.stdout)["ran"]
    assert ran[:2] == ["score:mix", "quantize:mix@4.5b"], ran
    assert record["auto"]["restored"] is True and record["auto"]["forwards"] == 0
    frontier = json.loads(result.stdout)["variants"][0]["frontier"]
    assert [p["effective_bits"] for p in frontier] == [4.5, 6.0]
    assert frontier[0]["estimated_score"] > frontier[1]["estimated_score"] > 0   # more bits, less estimated loss
    assert frontier[1]["estimated_score"] == pytest.approx(published["estimated_score"])
    assert abs(frontier[1]["estimated_bits"] - published["size"]["bits_per_weight"]) < 0.05
    # A rebuild recomputes nothing.
    again = run_kiln("build", recipe, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["ran"] == [], again.stdout

    # Another budget publishes version 2 with another mix; kiln diff names the layers whose format changed.
    variants["mix"]["auto"] = {"formats": ["nvfp4", "fp8"], "effective_bits": 5.0}
    variants["mix"]["gates"] = {"max_kl": 0.1}
    another = run_kiln("build", write_recipe(tmp_path, str(test_model), variants, name="auto", samples=8), "--json")
    assert another.returncode == 0, another.stderr
    # a budget added to a finished search solves from the saved scores: nothing is scored again
    assert json.loads(another.stdout)["ran"][0] == "quantize:mix", another.stdout
    second = tmp_path / "second"
    assert run_kiln("pull", "auto-mix/2", "--out", second).returncode == 0
    layers_2 = json.loads((second / "kiln.json").read_text())["layer_formats"]
    diff = run_kiln("diff", "auto-mix", "1", "2", "--json")
    assert diff.returncode == 0, diff.stderr
    changed = json.loads(diff.stdout)["layers"]
    expected = {name: [fmt, layers_2[name]] for name, fmt in record["layer_formats"].items() if fmt != layers_2[name]}
    assert changed == expected and changed, changed
    structure = json.loads(diff.stdout)["structure"]   # both versions hold structure.json: a dict of what changed
    assert isinstance(structure, dict) and "problems" not in structure, structure
    shown = run_kiln("diff", "auto-mix", "1", "2")
    assert "layers" in shown.stdout and next(iter(changed)) in shown.stdout
