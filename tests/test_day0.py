"""The day-0 path (issue 40.1, 40.2, 40.4; quantize/day0.py): calibration-free formats quantized from the
safetensors shards with no model built make the ModelOpt path's HF checkpoint byte for byte (one shard or many,
sharded sources, the families' shared-input fusions); `kiln plan` says which path each variant takes and why, a
recipe forces either; a run SIGKILLed mid-way keeps only the shards whose digests it recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln import quantize
from kiln.common.digest import tree_digest
from kiln.common.errors import UserInputError
from kiln.common.progress import SILENT
from kiln.quantize.safetensors_layout import ShardLayout, safetensors_dtype
from kiln.pipeline.plan.requests import quantize_path
from kiln.pipeline.recipe.loader import load_recipe
from tests.conftest import run_kiln, write_recipe

PYTORCH = {"target": "trtllm-pytorch"}   # Llama's engine flow takes none of the 2026 formats
CALIBRATION_FREE = ("fp8_pc_pt", "int8_wo", "fp8_block", "mxfp8", "nvfp4_a16", "mxfp4", "w4a8_mxfp4_fp8")


def _request(quant: str, day0: bool, max_shard_size: str = "5GB") -> quantize.QuantizeRequest:
    return quantize.QuantizeRequest(quant=quantize.QuantFormat(quant), kv_cache=quantize.KVCacheFormat.none,
                                    group_size=None, dtype="bfloat16", tp_size=1, max_shard_size=max_shard_size,
                                    day0=day0)


def _both_paths(model: Path, quant: str, out: Path, max_shard_size: str = "5GB", workers: int = 2):
    """hf/ of the ModelOpt path and of the day-0 path for one request: (digests, day-0 record)."""
    digests = []
    for day0 in (False, True):
        folder = out / f"{quant}-{'day0' if day0 else 'modelopt'}"
        folder.mkdir(parents=True)
        samples = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))
        record = quantize.run(_request(quant, day0, max_shard_size), model, None if day0 else samples, folder, SILENT,
                              workers=workers)
        digests.append({p.name: tree_digest(p) if p.is_dir() else p.read_bytes() for p in (folder / "hf").iterdir()})
    return digests, record


def test_the_rows_marked_calibration_free_are_those_without_calibrated_scales():
    """A row is calibration_free exactly when ModelOpt's config for it (as kiln hands it over) calibrates nothing
    from activations: no algorithm at all (MX: every scale from its own block), or max over the weights with every
    enabled input quantizer dynamic and self-contained (per token, or MX blocks; NVFP4's blocks need a calibrated
    global scale)."""
    from kiln.quantize.modelopt_adapter import modelopt_config

    free = set()
    for quant in quantize.FORMATS:
        config = modelopt_config(quant, quantize.KVCacheFormat.none, None)
        method = config.get("algorithm")
        method = method.get("method") if isinstance(method, dict) else method
        inputs = [entry.get("cfg") for entry in config["quant_cfg"]
                  if entry.get("quantizer_name") == "*input_quantizer" and entry.get("enable", True) is not False]
        if method is None or (method == "max" and all(_self_scaled(cfg) for cfg in inputs)):
            free.add(quant.value)
    assert free == set(CALIBRATION_FREE)
    assert {q.value for q, spec in quantize.FORMATS.items() if spec.calibration_free} == set(CALIBRATION_FREE)


def _self_scaled(cfg: dict) -> bool:
    blocks = cfg.get("block_sizes") or {}
    return cfg.get("type") == "dynamic" or (blocks.get("type") == "dynamic" and blocks.get("scale_bits") == (8, 0))


@pytest.mark.slow   # both paths for seven formats (about 11 s); test-fast keeps the layout and plan tests
def test_every_calibration_free_format_is_the_modelopt_export_byte_for_byte(tmp_path, test_model):
    """The 4-layer test model, one output file: config.json, generation_config.json, hf_quant_config.json,
    model.safetensors and the tokenizer have the same bytes on both paths, for each of the seven formats."""
    for quant in CALIBRATION_FREE:
        (modelopt, day0), record = _both_paths(test_model, quant, tmp_path)
        assert sorted(day0) == sorted(modelopt) and "model.safetensors" in day0
        assert day0 == modelopt, quant
        assert record.day0["shards"] == 1 and record.day0["workers"] == 2
        assert record.calibration_samples == 0 and not record.trtllm_checkpoint
        assert record.export_quant_algo == quantize.FORMATS[quantize.QuantFormat(quant)].export_quant_algo


@pytest.mark.slow
def test_a_sharded_source_and_sharded_output_match_too(tmp_path, test_model):
    """The test model re-saved in float32 as six shards, exported at 400KB a file: the same shard files, tensor
    placement and index (transformers' total_parameters with packed weights included) on both paths."""
    import shutil

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(test_model, dtype=torch.float32).save_pretrained(sharded,
                                                                                           max_shard_size="1MB")
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(test_model / extra, sharded)
    assert len(list(sharded.glob("*.safetensors"))) == 6   # float32 source, bfloat16 export: a cast on the way
    for quant in ("fp8_pc_pt", "nvfp4_a16"):
        (modelopt, day0), record = _both_paths(sharded, quant, tmp_path, max_shard_size="400KB")
        assert day0 == modelopt, quant
        assert record.day0["shards"] > 1 and "model.safetensors.index.json" in day0
        index = json.loads(day0["model.safetensors.index.json"])
        first = sorted(set(index["weight_map"].values()))[0]
        with safe_open(str(tmp_path / f"{quant}-day0" / "hf" / first), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "phi3", "gemma2"])
def test_the_families_shared_input_scales_match(tmp_path, family_models, family):
    """Weight-only NVFP4 shares one global scale among the linears that read one input (ModelOpt's export finds them
    by running the model; day-0 by their names): qwen2 (q/k/v biases, tied embeddings), phi3 (fused qkv_proj and
    gate_up_proj, nothing to share) and gemma2 give the same bytes on both paths."""
    (modelopt, day0), _ = _both_paths(family_models[family], "nvfp4_a16", tmp_path, workers=1)
    assert day0 == modelopt


def test_the_layout_is_the_safetensors_librarys(tmp_path):
    """A file laid out first and filled a tensor at a time, in any order, has save_file's bytes."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    tensors = {"b.weight": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
               "a.weight_scale": torch.rand(3, generator=generator), "z": torch.tensor(2.5),
               "c.weight": torch.randint(0, 255, (2, 2), dtype=torch.uint8, generator=generator),
               "a.weight": torch.randn(7, generator=generator).to(torch.float8_e4m3fn),
               "d.weight": torch.randint(-9, 9, (4,), dtype=torch.int8, generator=generator)}
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    layout = ShardLayout.of("filled.safetensors", [(k, safetensors_dtype(t.dtype), tuple(t.shape),
                                                    t.numel() * t.element_size()) for k, t in tensors.items()],
                            {"format": "pt"})
    path = layout.create(tmp_path)
    with open(path, "r+b") as handle:
        for name in reversed(list(tensors)):
            handle.seek(layout.slots[name].start)
            handle.write(tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes())
    assert path.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_a_nonfinite_source_tensor_is_refused_by_name(tmp_path, test_model):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(test_model, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 3] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "out").mkdir()
    with pytest.raises(UserInputError, match=r"tensor model.layers.1.mlp.up_proj.weight holds 1 NaN"):
        quantize.run(_request("fp8_block", True), broken, None, tmp_path / "out", SILENT)


def test_plan_says_which_path_each_variant_takes_and_a_recipe_forces_either(tmp_path, kiln_home, test_model):
    """auto: day-0 for a calibration-free format with no engine-flow checkpoint; ModelOpt for a format it calibrates,
    and for fp8_pc_pt on Llama (ModelOpt also writes its TensorRT-LLM checkpoint). A day-0 key leaves calibration
    out (other calibration text, the same checkpoint). quantize.path forces either; day0 refuses what it cannot make."""
    variants = {"block": {"quant": "fp8_block"}, "rowwise": {"quant": "fp8_pc_pt"}, "awq": {"quant": "int4_awq"}}

    def planned(samples: int = 16, **sections) -> dict:
        recipe = write_recipe(tmp_path, str(test_model), variants, samples=samples, build=PYTORCH, **sections)
        result = run_kiln("plan", recipe, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    document = planned()
    paths = document["quantize_paths"]
    assert {name: path["path"] for name, path in paths.items()} == {"block": "day0", "rowwise": "modelopt",
                                                                    "awq": "modelopt"}
    assert paths["block"]["why"].startswith("day-0 path: fp8_block needs no calibration data")
    assert paths["rowwise"]["why"] == ("ModelOpt path: it also writes the TensorRT-LLM checkpoint (trtllm/) of "
                                       "fp8_pc_pt, which the day-0 path does not (quantize.path: day0 publishes hf/ "
                                       "only)")
    assert paths["awq"]["why"].startswith("ModelOpt path: int4_awq calibrates on data (awq_lite")
    keys = {s["target"]: s["key"] for s in document["stages"] if s["stage"] == "quantize"}
    other = {s["target"]: s["key"] for s in planned(samples=8)["stages"] if s["stage"] == "quantize"}
    assert other["block"] == keys["block"] and other["awq"] != keys["awq"]

    forced = planned(quantize={"path": "modelopt"})["quantize_paths"]
    assert {path["path"] for path in forced.values()} == {"modelopt"}
    oneshot = load_recipe(write_recipe(tmp_path, str(test_model), {"v": {"quant": "int4_awq",
                                                                          "backend": "llmcompressor"}}, build=PYTORCH))
    assert quantize_path(oneshot, oneshot.recipe.variants["v"], None)[0] == "llmcompressor"
    del variants["awq"]
    forced = planned(quantize={"path": "day0", "workers": 1})
    assert {path["path"] for path in forced["quantize_paths"].values()} == {"day0"}
    assert "rowwise publish hf/ only (quantize.path: day0 writes no TensorRT-LLM checkpoint" in \
        forced["family"]["publishes"]

    variants["awq"] = {"quant": "int4_awq"}
    notes = planned(calibration={"builtin": "python-docs-train", "samples": 16, "seq_len": 128,
                                 "resumable": True})["notes"]
    assert ("block: the day-0 path records each output shard's digest as it finishes (calibration.resumable: true): a "
            "killed build keeps the shards it wrote") in notes
    recipe = write_recipe(tmp_path, str(test_model), variants, build=PYTORCH, quantize={"path": "day0"})
    refused = run_kiln("check", recipe)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert ("quantize.path: day0 cannot make variants.awq: int4_awq calibrates on data (awq_lite sets scales the "
            "weights alone do not give) (fix: quantize.path: auto") in refused.stderr


# quantize.run on the day-0 path, SIGKILLed as soon as it has recorded KILN_KILL_AT finished shards.
KILLED_QUANTIZE = """
import os, signal, sys
from pathlib import Path
from kiln import quantize
from kiln.common.progress import SILENT
from kiln.quantize import day0
original = day0._Shards._finish
def finish(self, shard):
    original(self, shard)
    if len(self.done) >= int(os.environ["KILN_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
day0._Shards._finish = finish
model, out, resume = sys.argv[1:4]
request = quantize.QuantizeRequest(quant=quantize.QuantFormat("fp8_block"), kv_cache=quantize.KVCacheFormat.none,
                                   group_size=None, dtype="bfloat16", tp_size=1, max_shard_size="400KB", day0=True)
quantize.run(request, Path(model), None, Path(out), SILENT, resume_dir=Path(resume))
"""


@pytest.mark.slow   # a subprocess killed mid-way and two more runs (about 8 s)
def test_a_killed_day0_build_keeps_the_shards_it_recorded(tmp_path, test_model):
    """fp8_block at 400KB a shard, SIGKILLed once 2 shards are recorded: resume_point (what `kiln plan` shows) says
    so; the next run keeps them but one altered afterwards, which it writes again saying why; its hf/ is the
    uninterrupted run's."""
    resume, killed_out = tmp_path / "resume", tmp_path / "killed"
    killed_out.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLED_QUANTIZE, str(test_model), str(killed_out), str(resume)],
                            capture_output=True, text=True, env={**os.environ, "KILN_KILL_AT": "2"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    point = quantize.resume_point(resume)
    assert point.unit == "shard" and point.layer == 2 and point.layers > 2
    assert str(point) == f"resumable: 2 of {point.layers} shards written"
    recorded = json.loads((resume / "kiln-day0.json").read_text())["shards"]
    altered = resume / "shards" / sorted(recorded)[1]
    data = bytearray(altered.read_bytes())
    data[-1] ^= 0xFF
    altered.write_bytes(bytes(data))

    logged: list[str] = []

    class Progress(type(SILENT)):
        def log(self, message: str) -> None:
            logged.append(message)

    resumed, whole = tmp_path / "resumed", tmp_path / "whole"
    resumed.mkdir()
    whole.mkdir()
    record = quantize.run(_request("fp8_block", True, "400KB"), test_model, None, resumed, Progress(enabled=False),
                          resume_dir=resume)
    assert any(f"{altered.name} does not match the digest recorded when it was written" in line for line in logged)
    assert any("day-0 resumes with 1 of " in line for line in logged)
    assert record.day0["kept_shards"] == 1 and record.day0["shards"] == point.layers
    quantize.run(_request("fp8_block", True, "400KB"), test_model, None, whole, SILENT)
    assert tree_digest(resumed / "hf") == tree_digest(whole / "hf")
