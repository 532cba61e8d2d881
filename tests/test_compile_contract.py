"""Contract tests of the compile stage: exactly what kiln hands TensorRT-LLM, per (format, SM, target).

They prove kiln's side of the interface, not TensorRT: the argv of `trtllm-build` and the
LLM-API options file are checked against the table below, which cites TensorRT-LLM for each
flag, and the argv is parsed by tests/standins/bin/trtllm-build, which declares the real
command's flag names and choices (an unknown flag or value fails there as it would on a GPU host).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.compile import ARCHS, CompileRequest, Target
from kiln.compile.engine import trtllm_build_argv
from kiln.compile.llmapi import llm_api_options
from kiln.compile.targets import CheckpointQuant
from kiln.quantize.formats import FORMATS, KV_CACHE_FORMATS, KVCacheFormat, QuantFormat
from kiln.quantize.runtimes import Loads, Runtime, runtime_cells

STANDIN_BUILD = Path(__file__).parent / "standins" / "bin" / "trtllm-build"

# quant_algo / kv_cache_quant_algo as ModelOpt 0.47 writes them into the checkpoints (measured in issue 3).
QUANT_ALGO = {
    QuantFormat.fp8: "FP8", QuantFormat.fp8_pc_pt: "FP8_PER_CHANNEL_PER_TOKEN", QuantFormat.nvfp4: "NVFP4",
    QuantFormat.int4_awq: "W4A16_AWQ", QuantFormat.int4_gptq: "W4A16_AWQ", QuantFormat.w4a8_awq: "W4A8_AWQ",
    QuantFormat.int8_sq: "W8A8_SQ_PER_CHANNEL", QuantFormat.int8_wo: "W8A16",
}
# A format measured here is checked against its row; a newer row's own label stands in until it is measured.
def quant_algo_of(quant: QuantFormat) -> str:
    return QUANT_ALGO.get(quant, FORMATS[quant].export_quant_algo)


def test_the_rows_carry_the_measured_quant_algo():
    assert {quant: FORMATS[quant].export_quant_algo for quant in QUANT_ALGO} == QUANT_ALGO


KV_ALGO = {KVCacheFormat.none: None, KVCacheFormat.fp8: "FP8", KVCacheFormat.nvfp4: "NVFP4", KVCacheFormat.int8: "INT8"}


def kv_algo_of(kv: KVCacheFormat) -> str | None:
    """As quant_algo_of: the measured label, or a newer KV row's own (fp8_cast's export was measured FP8 too)."""
    return KV_ALGO.get(kv, KV_CACHE_FORMATS[kv].export_algo)


def test_the_kv_rows_carry_the_measured_kv_cache_quant_algo():
    exported = [kv for kv, spec in KV_CACHE_FORMATS.items() if kv in KV_ALGO and not spec.unsupported]
    assert {kv: KV_CACHE_FORMATS[kv].export_algo for kv in exported} == {kv: KV_ALGO[kv] for kv in exported}
    assert kv_algo_of(KVCacheFormat.fp8_cast) == "FP8"

# Each flag kiln passes, and where TensorRT-LLM defines it (paths in NVIDIA/TensorRT-LLM, release 0.17-1.2):
#   --checkpoint_dir/--output_dir/--max_batch_size/--max_input_len/--max_seq_len/--max_num_tokens:
#       tensorrt_llm/commands/build.py parse_arguments; docs/source/commands/trtllm-build.rst
#   --kv_cache_type paged: build.py ("Set KV cache type (continuous, paged, or disabled)")
#   --gemm_plugin fp8 | nvfp4 | auto: plugin options (tensorrt_llm/plugin/plugin.py); FP8 examples build with
#       `--gemm_plugin fp8` (examples/models/core/llama/README.md), NVFP4 ones with `--gemm_plugin nvfp4`
#   --use_fp8_context_fmha enable: only with the FP8 (QDQ) workflow (tensorrt_llm/layers/attention.py: "FP8 Context
#       FMHA must be used together with the fp8 quantization workflow") and only on SM 89/90
#       (cpp/.../gptAttentionCommon.cpp: "FP8 FMHA cannot be enabled except on Ada or Hopper Arch.")
#   --use_paged_context_fmha enable: KV-cache reuse needs it (docs/source/advanced/kv-cache-reuse.md)
#   --gather_context_logits: build.py "Logits arguments"; the C++ runner returns context_logits only for such
#       engines (examples/run.py: `if runner.gather_context_logits`), and kiln's engine check reads them
#   --workers: build.py "The number of workers for building in parallel" (one per TP rank)
#   --lora_plugin/--lora_target_modules/--max_lora_rank: build.py "LoRA arguments"
#   --speculative_decoding_mode/--max_draft_len: build.py "Speculative decoding arguments"
GEMM_PLUGIN = {"FP8": "fp8", "NVFP4": "nvfp4"}
FP8_FMHA_SMS = {"sm89", "sm90"}


def allowed_combinations(runtime: Runtime):
    """What kiln builds for a target per GPU: what the SM runs and the target's runtime loads (a recipe whose gpus ask
    for a format TensorRT-LLM does not load for the target is refused at `kiln check`)."""
    for sm, arch in ARCHS.items():
        for quant in sorted(arch.formats, key=lambda q: q.value):
            for kv in sorted(arch.kv_caches, key=lambda k: k.value):
                if kv is KVCacheFormat.int8:
                    continue  # refused at `kiln check`: ModelOpt 0.47 cannot export it
                if runtime_cells(quant, kv)[runtime].loads is Loads.no:
                    continue
                yield pytest.param(quant, kv, sm, id=f"{quant.value}-kv_{kv.value}-{sm}")


def request_for(sm: str, target: Target, **overrides) -> CompileRequest:
    fields = dict(target=target, sm=sm, tp_size=1, max_batch_size=8, max_input_len=1024, max_seq_len=2048,
                  max_num_tokens=4096)
    return CompileRequest(**{**fields, **overrides})


def expected_argv(quant_algo, kv_algo, sm, ckpt, out, tp=1, reuse=False, lora=None, speculative=None):
    argv = ["trtllm-build", "--checkpoint_dir", str(ckpt), "--output_dir", str(out),
            "--max_batch_size", "8", "--max_input_len", "1024", "--max_seq_len", "2048", "--max_num_tokens", "4096",
            "--kv_cache_type", "paged", "--gemm_plugin", GEMM_PLUGIN.get(quant_algo, "auto")]
    if quant_algo == "FP8" and kv_algo == "FP8" and sm in FP8_FMHA_SMS:
        argv += ["--use_fp8_context_fmha", "enable"]
    if reuse:
        argv += ["--use_paged_context_fmha", "enable"]
    argv += ["--gather_context_logits", "--workers", str(tp)]
    if lora:
        argv += ["--lora_plugin", "auto", "--lora_target_modules", *lora[0], "--max_lora_rank", str(lora[1])]
    if speculative:
        argv += ["--speculative_decoding_mode", speculative[0], "--max_draft_len", str(speculative[1])]
    return argv


def fake_checkpoint(tmp_path: Path, quant_algo, kv_algo, tp=1) -> Path:
    ckpt = tmp_path / "trtllm"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps({
        "architecture": "LlamaForCausalLM",
        "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_algo},
        "mapping": {"world_size": tp, "tp_size": tp},
    }))
    return ckpt


def run_standin(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STANDIN_BUILD), *argv[1:]], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)


@pytest.mark.parametrize("quant,kv,sm", list(allowed_combinations(Runtime.trtllm)))
def test_trtllm_build_argv_contract(quant, kv, sm, tmp_path):
    quant_algo, kv_algo = quant_algo_of(quant), kv_algo_of(kv)
    ckpt, out = fake_checkpoint(tmp_path, quant_algo, kv_algo), tmp_path / "engine"
    argv = trtllm_build_argv(request_for(sm, Target.trtllm_engine), CheckpointQuant(quant_algo, kv_algo, 1), ckpt, out)
    assert argv == expected_argv(quant_algo, kv_algo, sm, ckpt, out)
    done = run_standin(argv, tmp_path)
    assert done.returncode == 0, done.stderr
    built = json.loads((out / "config.json").read_text())
    assert built["pretrained_config"]["quantization"]["quant_algo"] == quant_algo
    assert built["build_config"]["gather_context_logits"] is True
    assert (out / "rank0.engine").is_file()


def test_trtllm_build_argv_with_reuse_tp_lora_and_speculation(tmp_path):
    request = request_for("sm90", Target.trtllm_engine, tp_size=2, kv_cache_reuse=True,
                          lora_target_modules=("attn_q", "attn_v"), max_lora_rank=16,
                          speculative_mode="draft_tokens_external", max_draft_len=4)
    ckpt, out = fake_checkpoint(tmp_path, "FP8", "FP8", tp=2), tmp_path / "engine"
    argv = trtllm_build_argv(request, CheckpointQuant("FP8", "FP8", 2), ckpt, out)
    assert argv == expected_argv("FP8", "FP8", "sm90", ckpt, out, tp=2, reuse=True,
                                 lora=(("attn_q", "attn_v"), 16), speculative=("draft_tokens_external", 4))
    assert run_standin(argv, tmp_path).returncode == 0
    assert sorted(p.name for p in out.glob("rank*.engine")) == ["rank0.engine", "rank1.engine"]


def test_standin_rejects_what_trtllm_build_rejects(tmp_path):
    """The stand-in is strict like the real argparse: a misspelt flag or an unknown choice fails."""
    ckpt = fake_checkpoint(tmp_path, "FP8", None)
    bad_flag = run_standin(["trtllm-build", "--checkpoint_dir", str(ckpt), "--output_dir", "o", "--gemm-plugin", "fp8"], tmp_path)
    bad_choice = run_standin(["trtllm-build", "--checkpoint_dir", str(ckpt), "--output_dir", "o", "--gemm_plugin", "int4"], tmp_path)
    assert bad_flag.returncode == 2 and "unrecognized arguments" in bad_flag.stderr
    assert bad_choice.returncode == 2 and "invalid choice" in bad_choice.stderr


# LLM-API options, the keyword arguments of tensorrt_llm.LLM (docs/source/llm-api/reference.rst, TensorRT-LLM 1.0+),
# which `trtllm-serve --extra_llm_api_options FILE` and Triton's llmapi model read:
#   tensor_parallel_size, max_batch_size, max_num_tokens, max_seq_len: LLM args (BaseLlmArgs)
#   kv_cache_config: KvCacheConfig(dtype "auto" | "fp8" | "nvfp4", enable_block_reuse, free_gpu_memory_fraction);
#       docs/source/features/quantization.md sets FP8/NVFP4 KV with KvCacheConfig(dtype=...)
#   cuda_graph_config: CudaGraphConfig(batch_sizes=[...]) (TorchLlmArgs, 1.0+)
#   lora_config: LoraConfig(lora_target_modules, max_lora_rank)
KV_DTYPE = {None: "auto", "FP8": "fp8", "NVFP4": "nvfp4"}


@pytest.mark.parametrize("quant,kv,sm", list(allowed_combinations(Runtime.trtllm_pytorch)))
def test_llm_api_options_contract(quant, kv, sm):
    kv_algo = kv_algo_of(kv)
    options = llm_api_options(request_for(sm, Target.trtllm_pytorch), CheckpointQuant(quant_algo_of(quant), kv_algo, 1))
    assert options == {
        "tensor_parallel_size": 1, "max_batch_size": 8, "max_num_tokens": 4096, "max_seq_len": 2048,
        "kv_cache_config": {"dtype": KV_DTYPE[kv_algo], "enable_block_reuse": False, "free_gpu_memory_fraction": 0.9},
        "cuda_graph_config": {"batch_sizes": [1, 2, 4, 8]},
    }


def test_llm_api_options_with_reuse_graphs_and_lora():
    request = request_for("sm100", Target.trtllm_pytorch, max_batch_size=48, kv_cache_reuse=True,
                          free_gpu_memory_fraction=0.75, lora_target_modules=("attn_qkv",), max_lora_rank=8)
    options = llm_api_options(request, CheckpointQuant("NVFP4", "NVFP4", 1))
    assert options["kv_cache_config"] == {"dtype": "nvfp4", "enable_block_reuse": True, "free_gpu_memory_fraction": 0.75}
    assert options["cuda_graph_config"] == {"batch_sizes": [1, 2, 4, 8, 16, 32, 48]}
    assert options["lora_config"] == {"lora_target_modules": ["attn_qkv"], "max_lora_rank": 8}
    explicit = request_for("sm90", Target.trtllm_pytorch, cuda_graph_batch_sizes=(1, 3, 8))
    assert llm_api_options(explicit, CheckpointQuant("FP8", None, 1))["cuda_graph_config"] == {"batch_sizes": [1, 3, 8]}


# --- Item 3 of the family issue: TensorRT-LLM's own from_hugging_face decides the checkpoint config. ---
# The stand-in (tests/standins/site/tensorrt_llm/models) answers per family as the real classes do,
# each line citing tensorrt_llm/models/{llama,qwen}/config.py.

STANDIN_SITE = Path(__file__).parent / "standins" / "site"
QWEN2_SOURCE = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
    # written by transformers 5: TensorRT-LLM's transformers 4.57 would not see this rope_theta
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
}


@pytest.fixture()
def standin_trtllm(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(STANDIN_SITE))
    monkeypatch.delenv("KILN_TRTLLM_PYTHON", raising=False)
    monkeypatch.delenv("KILN_STANDIN_TRTLLM_OVERRIDE", raising=False)


def _kiln_checkpoint(tmp_path, source: dict, **changes) -> Path:
    """The TensorRT-LLM config kiln's quantize stage leaves: ModelOpt's, with every family field filled."""
    from kiln.quantize import family_of
    from kiln.quantize.trtllm_checks import expected_fields

    family = family_of(source)
    config = {"architecture": family.trtllm.architecture, "dtype": "bfloat16", **expected_fields(source, family)}
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    folder = tmp_path / "trtllm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_transformers5_rope_is_handed_to_trtllm_in_the_4x_layout():
    from kiln.compile.trtllm_config import transformers4_config

    legacy = transformers4_config({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}})
    assert legacy["rope_theta"] == 500000.0 and legacy["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    assert "rope_scaling" not in transformers4_config(QWEN2_SOURCE)


def test_a_faithful_checkpoint_agrees_with_trtllm_field_by_field(tmp_path, standin_trtllm):
    from kiln.compile.trtllm_config import check_against_trtllm
    from kiln.quantize import family_of

    family = family_of(QWEN2_SOURCE)
    checked = check_against_trtllm(_kiln_checkpoint(tmp_path, QWEN2_SOURCE), QWEN2_SOURCE,
                                   family.trtllm_field_names, tp_size=1)
    assert checked["qwen_type"] == "qwen2" and checked["attn_bias"] is True and checked["rotary_base"] == 1000000.0
    assert set(checked) == set(family.trtllm_field_names)


@pytest.mark.parametrize("changes, field", [
    ({"qwen_type": None}, "qwen_type"),            # what ModelOpt writes without tensorrt_llm
    ({"rotary_base": 10000.0}, "rotary_base"),
    ({"attn_bias": False}, "attn_bias"),
])
def test_a_field_trtllm_derives_differently_stops_the_build(tmp_path, standin_trtllm, changes, field):
    from kiln.compile.trtllm_config import check_against_trtllm
    from kiln.common.errors import KilnError
    from kiln.quantize import family_of

    checkpoint = _kiln_checkpoint(tmp_path, QWEN2_SOURCE, **changes)
    with pytest.raises(KilnError, match=rf"config.json: {field} is .*but TensorRT-LLM's own from_hugging_face gives"):
        check_against_trtllm(checkpoint, QWEN2_SOURCE, family_of(QWEN2_SOURCE).trtllm_field_names, tp_size=1)


def test_trtllm_disagreeing_with_kiln_stops_the_build(tmp_path, standin_trtllm, monkeypatch):
    """The other direction: a TensorRT-LLM version whose mapping differs (here: a changed moe default)."""
    from kiln.compile.trtllm_config import check_against_trtllm
    from kiln.common.errors import KilnError
    from kiln.quantize import family_of

    monkeypatch.setenv("KILN_STANDIN_TRTLLM_OVERRIDE", json.dumps({"moe": {"num_experts": 0, "top_k": 0,
                                                                             "normalization_mode": 1}}))
    with pytest.raises(KilnError, match="moe is .* gives"):
        check_against_trtllm(_kiln_checkpoint(tmp_path, QWEN2_SOURCE), QWEN2_SOURCE,
                             family_of(QWEN2_SOURCE).trtllm_field_names, tp_size=1)
