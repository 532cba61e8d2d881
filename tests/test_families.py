"""Every family of the family table, quantized, validated and published from a small trained model.

Per family, the formats the issue names (FP8 + FP8 KV, INT4-AWQ group 64, NVFP4) that the family
table allows for the PyTorch backend (the target every family has):
- the reference runtime computes what ModelOpt's in-memory model computes given the exported files
  (tests/conformance.py, issue 42), and a planted difference breaks that; NVFP4's fake-quant needs CUDA, so
  NVFP4 is compared there (bench/nvfp4_gpu.py) and validated here;
- `kiln build` publishes each variant with its gates passed;
- families with a TensorRT-LLM checkpoint carry every family field, as TensorRT-LLM would derive it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kiln.pipeline.data.corpus import python_docs
from kiln.pipeline.data.documents import token_samples
from tests.family_models import FAMILY_CONFIGS
from kiln.quantize import FAMILIES, KVCacheFormat, QuantFormat
from kiln.quantize import modelopt_adapter as adapter
from kiln.quantize.trtllm_checks import check_trtllm_checkpoint, expected_fields
from kiln.validate.reference_loader import load_baseline_model, load_reference_model
from tests import conformance
from tests.conftest import run_kiln, write_recipe

pytestmark = pytest.mark.slow

# The reference against the as-exported model directly: on the test families they agree to float rounding (KL
# below 1e-4 of their KL to the baseline); one layer's activations left 16-bit gives 5 % and more. On the real
# models (18 and 30 layers) FP8 rounding flips grow layer by layer, so the bench holds the mean KL only.
MAX_KL_BETWEEN_SHARE = 0.03
ISSUE_FORMATS = {
    "fp8": ({"quant": "fp8", "kv_cache": "fp8"}, QuantFormat.fp8, KVCacheFormat.fp8, None),
    "int4-awq-g64": ({"quant": "int4_awq", "group_size": 64}, QuantFormat.int4_awq, KVCacheFormat.none, 64),
    "nvfp4": ({"quant": "nvfp4"}, QuantFormat.nvfp4, KVCacheFormat.none, None),
}
GATES = {"max_ppl_increase_pct": 25, "max_kl": 0.2, "min_top1_agreement": 0.6}


def allowed(family: str) -> dict:
    formats = FAMILIES[family].pytorch_formats
    return {name: spec for name, spec in ISSUE_FORMATS.items() if spec[1] in formats}


def test_every_family_in_the_trainer_is_in_the_table():
    assert set(FAMILY_CONFIGS) <= set(FAMILIES)
    # the issue's list: Llama, Qwen2, Qwen3, Mistral, Gemma 2 or 3, Phi-3, one MoE family
    assert {"llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "mixtral"} <= set(FAMILY_CONFIGS)


@pytest.fixture(scope="module")
def texts(family_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_models["llama"])   # every family model shares it
    return {"calibration": token_samples(python_docs("train"), tokenizer, 8, 128),
            "evaluation": token_samples(python_docs("heldout"), tokenizer, 4, 128)}


IN_MEMORY_CASES = [(family, name) for family in FAMILY_CONFIGS for name in allowed(family) if name != "nvfp4"]


def conforms(found: conformance.Agreement) -> bool:
    """The mean KL agrees (within the bound, or the windows' noise), and so does every token's distribution:
    with two decoder layers an FP8 rounding flip stays small, so the direct KL is held too."""
    return found.holds and found.kl_between <= MAX_KL_BETWEEN_SHARE * found.kl_as_exported


@pytest.fixture(scope="module")
def baselines(family_models):
    return {family: load_baseline_model(folder) for family, folder in family_models.items()}


@pytest.mark.parametrize("family, name", IN_MEMORY_CASES, ids=[f"{f}-{n}" for f, n in IN_MEMORY_CASES])
def test_reference_runtime_computes_what_modelopt_computes_with_the_export(tmp_path, family_models, texts,
                                                                            baselines, family, name):
    """Issue 42: kiln's KL on the exported files is the in-memory model's given those files (within the bound
    the real models show), and leaving one layer's activations 16-bit (FP8), or ignoring one layer's AWQ input
    scale (INT4-AWQ), breaks that agreement."""
    _, quant, kv, group = ISSUE_FORMATS[name]
    model = adapter.load_source_model(family_models[family], "bfloat16", False, False)
    adapter.calibrate(model, adapter.modelopt_config(quant, kv, group), texts["calibration"], lambda n: None)
    in_memory = copy.deepcopy(model).float()
    adapter.export_hf(model, tmp_path / "hf")
    reference = load_reference_model(tmp_path / "hf")
    found = conformance.agreement(baselines[family], in_memory, reference, texts["evaluation"])
    print(json.dumps({"family": family, "format": name, **found.as_dict()}))
    quantized = sum(1 for m in in_memory.modules() if getattr(m, "weight_quantizer", None) is not None
                    and m.weight_quantizer.is_enabled)
    quantized += sum(len(m.gate_up_proj_weight_quantizers) * 2 for m in in_memory.modules()
                     if hasattr(m, "gate_up_proj_weight_quantizers"))   # fused experts: one quantizer per expert
    assert found.layers_replaced == quantized > 0   # every quantized layer compared with what it stores
    assert found.kl_as_exported > 0 and conforms(found), found.as_dict()

    # The planted difference: the first decoder layer's first layer with an input transform loses it (FP8: its
    # activations stay 16-bit; INT4-AWQ: its unfolded AWQ scale is ignored).
    planted = next(layer for layer in conformance.reference_layers(reference).values() if layer._transform)
    planted._transform = None
    broken = conformance.agreement(baselines[family], in_memory, reference, texts["evaluation"])
    assert not conforms(broken), broken.as_dict()


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_kiln_build_publishes_every_allowed_format(tmp_path, family_models, family):
    variants = {name: {**spec, "gates": GATES} for name, (spec, *_) in allowed(family).items()}
    # The trained Mixtral's router sends layer 1's expert 3 no token of this text (the structure checks refuse
    # that, issue 39): its experts are calibrated on every token.
    every_expert = {"calibration": {"builtin": "python-docs-train", "samples": 8, "seq_len": 128, "all_experts": True}}
    recipe = write_recipe(tmp_path, str(family_models[family]), variants, name=family.replace("_", "-"),
                          samples=8, seq_len=128, build={"target": "trtllm-pytorch"},
                          **(every_expert if family == "mixtral" else {}))
    home = tmp_path / "home"
    result = run_kiln("build", recipe, "--json", env={"KILN_HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    build = json.loads(result.stdout)
    assert sorted(v["variant"] for v in build["variants"]) == sorted(variants)
    for v in build["variants"]:
        assert v["gate"]["passed"] and v["registry"]["version"] == "1", v

    row = FAMILIES[family]
    source = json.loads((family_models[family] / "config.json").read_text())
    for stage in (s for s in build["stages"] if s["stage"] == "quantize"):
        checkpoint = home / "cache" / "quantize" / stage["key"]
        record = json.loads((checkpoint / "kiln.json").read_text())
        assert record["family"] == family and record["trtllm_checkpoint"] is (row.trtllm is not None)
        assert json.loads((checkpoint / "source-config.json").read_text()) == source
        if row.trtllm is None:
            assert not (checkpoint / "trtllm").exists()
            continue
        config = json.loads((checkpoint / "trtllm" / "config.json").read_text())
        want = expected_fields(source, row)
        for spec in row.trtllm.fields:
            assert config[spec.name] == want[spec.name], spec.name
        assert check_trtllm_checkpoint(checkpoint / "trtllm", source, 1) == []   # nothing left to correct
        fixed = {c["field"] for c in record["trtllm_corrections"]}
        if family.startswith("qwen"):
            assert {"qwen_type", "moe", "seq_length"} <= fixed   # what ModelOpt leaves out without tensorrt_llm


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_baseline_keeps_16_bit_weights_and_gives_float32_logits(family_models, texts, family):
    """The validation baseline of every family (scaled embeddings, soft-capping, fused MoE experts) keeps its
    weights in 16 bits and computes what a float32 load computes."""
    from transformers import AutoModelForCausalLM

    from kiln.validate.metrics import logits_of
    from kiln.validate.reference_loader import load_baseline_model

    ids = texts["evaluation"][0]
    baseline = load_baseline_model(family_models[family])
    float32 = AutoModelForCausalLM.from_pretrained(family_models[family], dtype=torch.float32).eval()
    got, want = logits_of(baseline, ids), logits_of(float32, ids)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()

    def size(model):   # tied weights share one storage: count it once
        unique = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
        return sum(t.numel() * t.element_size() for t in unique.values())

    assert size(baseline) < 0.55 * size(float32)
