"""Calibration that survives a kill (issue 39.3, quantize/resume.py): a build SIGKILLed mid-calibration resumes from
the last layer whose digests kiln recorded, `kiln plan` says from where, and the checkpoint is byte-identical to an
uninterrupted build's; a recorded file that no longer matches its digest is never trusted."""

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
from kiln.common.progress import SILENT
from kiln.quantize.resume import LayerCheckpoints
from tests.conftest import run_kiln, write_recipe

# `kiln` as a user runs it, killed with SIGKILL (no handler runs, nothing is flushed but what was written) as soon as
# kiln has recorded the digests of KILN_KILL_AT layers.
KILLED_KILN = """
import os, signal, sys
from kiln.quantize import resume
original = resume.LayerCheckpoints.boundary
def boundary(self, state):
    recorded = original(self, state)
    if recorded >= int(os.environ["KILN_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return recorded
resume.LayerCheckpoints.boundary = boundary
from kiln.pipeline.cli.app import main
sys.argv = ["kiln", *sys.argv[1:]]
main()
"""


def _quantize_entry(cache: Path, quant: str) -> Path:
    return next(p.parent for p in (cache / "quantize").glob("*/kiln.json")
                if json.loads(p.read_text())["quant"] == quant)


@pytest.mark.slow   # three kiln commands and a build killed mid-calibration (about 35 s beside the spine build)
def test_a_killed_build_resumes_from_its_last_layer_and_makes_the_same_checkpoint(tmp_path, kiln_home, test_model,
                                                                                  spine_cache):
    """INT4-AWQ on the test model (4 decoder layers), killed once layers 0 and 1 are recorded: the plan says
    "resumable from layer 2 of 4", the next build calibrates layers 2 and 3 only, and its checkpoint has the key and
    the bytes of the spine's uninterrupted whole-model build of the same request."""
    recipe = write_recipe(tmp_path, str(test_model), {"int4-awq": {"quant": "int4_awq"}}, name="resume",
                          calibration={"builtin": "python-docs-train", "samples": 16, "seq_len": 128,
                                       "resumable": True})
    killed = subprocess.run([sys.executable, "-c", KILLED_KILN, "build", str(recipe)], capture_output=True, text=True,
                            env={**os.environ, "KILN_KILL_AT": "2"}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not list((kiln_home / "cache" / "quantize").glob("*/kiln.json"))   # nothing partial became an entry

    planned = run_kiln("plan", recipe, "--json")
    assert planned.returncode == 0, planned.stderr
    (stage,) = [s for s in json.loads(planned.stdout)["stages"] if s["stage"] == "quantize"]
    assert stage["status"] == "will run (resumable from layer 2 of 4)"
    assert json.loads(planned.stdout)["notes"] == ["int4-awq: calibration saves each decoder layer as it finishes "
                                                   "(calibration.resumable: true): a killed build resumes from the "
                                                   "last one"]
    listed = run_kiln("cache", "ls", "--json")
    (left,) = [e for e in json.loads(listed.stdout) if e["stage"] == "quantize (resume)"]
    assert left["key"] == stage["key"] and left["size"] > 0   # what `kiln cache prune` may remove

    built = run_kiln("build", recipe, "--json")
    assert built.returncode == 0, built.stderr
    assert "int4_awq: calibration resumes from layer 2 of 4" in built.stderr
    entry = _quantize_entry(kiln_home / "cache", "int4_awq")
    spine = _quantize_entry(spine_cache, "int4_awq")
    assert entry.name == stage["key"] == spine.name   # resumability is not part of what is built
    assert tree_digest(entry / quantize.HF_DIR) == tree_digest(spine / quantize.HF_DIR)
    assert tree_digest(entry / quantize.TRTLLM_DIR) == tree_digest(spine / quantize.TRTLLM_DIR)
    record = json.loads((entry / "kiln.json").read_text())
    assert record["layer_checkpoints"] == {"layers": 4, "resumed_from_layer": 2}
    assert json.loads(built.stdout)["variants"][0]["gate"]["passed"]
    assert not (kiln_home / "cache" / ".resume" / "quantize" / entry.name).exists()   # done: nothing to resume


def _deeper(family: str, folder: Path) -> Path:
    """The family's test model with 4 decoder layers, randomly initialised: kiln records a layer when ModelOpt next
    calls its forward loop, which it does for every layer but the last, so resuming needs 3 layers or more."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.family_models import family_model

    source = family_model(family)
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    for tokenizer_file in source.glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)
    return folder


class _Stop(Exception):
    pass


def _stopped_after(layers: int):
    """LayerCheckpoints.boundary that stops the calibration (as a crash would) once `layers` are recorded."""
    original = LayerCheckpoints.boundary

    def boundary(self, state):
        recorded = original(self, state)
        if recorded >= layers:
            raise _Stop
        return recorded
    return boundary


@pytest.mark.parametrize("family, quant", [("llama", "int4_awq"), ("mixtral", "fp8")])
def test_only_files_matching_their_digests_are_resumed_from(tmp_path, monkeypatch, test_model, family, quant):
    """In process, on the 4-layer Llama test model (AWQ: the layers' rewritten weights are what is saved) and a
    4-layer Mixtral (max: quantizer buffers, and the expert-token table carried across the stop):
    - a calibration stopped after its first layers resumes where kiln's record ends, even where ModelOpt's manifest
      claims one more layer (committed, never recorded), and gives the whole-model build's bytes and expert table;
    - a recorded file altered afterwards discards every layer (calibration would start from layer 0), saying why."""
    model = test_model if family == "llama" else _deeper(family, tmp_path / "model")
    samples = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    request = quantize.QuantizeRequest(quant=quantize.QuantFormat(quant), kv_cache=quantize.KVCacheFormat.none,
                                       group_size=None, dtype="bfloat16", tp_size=1)
    logged: list[str] = []

    class Progress(type(SILENT)):
        def log(self, message: str) -> None:
            logged.append(message)

    def build(name: str, resume_dir: Path | None = None) -> tuple[str, quantize.CheckpointRecord]:
        out = tmp_path / name
        out.mkdir()
        record = quantize.run(request, model, samples, out, Progress(enabled=False), resume_dir=resume_dir)
        return tree_digest(out / quantize.HF_DIR), record

    whole, whole_record = build("whole")
    assert whole_record.layer_checkpoints is None
    resume_dir = tmp_path / "resume"
    stop_at = 1
    with monkeypatch.context() as patched:
        patched.setattr(LayerCheckpoints, "boundary", _stopped_after(stop_at))
        with pytest.raises(_Stop):
            build("stopped", resume_dir)
    manifest = json.loads((resume_dir / "manifest.json").read_text())
    assert manifest["last_completed_layer"] == stop_at - 1
    # ModelOpt committing a layer kiln never recorded (a kill between the two writes): it is calibrated again.
    (resume_dir / "manifest.json").write_text(json.dumps({**manifest, "last_completed_layer": stop_at}))
    assert quantize.resume_point(resume_dir).layer == stop_at

    resumed, resumed_record = build("resumed", resume_dir)
    assert resumed_record.layer_checkpoints["resumed_from_layer"] == stop_at
    assert resumed == whole
    assert resumed_record.expert_tokens == whole_record.expert_tokens
    if family == "mixtral":
        assert sorted(whole_record.expert_tokens) == [f"model.layers.{i}.mlp" for i in range(4)]
        assert all(sum(counts) == 4 * 32 * 2 for counts in whole_record.expert_tokens.values())

    # What the resumed build left (the pipeline removes it once the entry is written) with one recorded file
    # altered: nothing is trusted, the folder is emptied, and the line names the file.
    recorded = quantize.resume_point(resume_dir)
    assert recorded is not None and recorded.layer == 2   # layers 0 and 1: the last boundary of 4 layers
    altered = next((resume_dir / "layer_0000").glob("quantizer_*.pt"))
    altered.write_bytes(altered.read_bytes() + b"\0")
    assert LayerCheckpoints(resume_dir).start(logged.append) is None
    assert logged[-1] == (f"calibration checkpoints in {resume_dir} are not trusted (layer_0000/{altered.name} does "
                          "not match its recorded digest); calibrating from layer 0")
    assert list(resume_dir.iterdir()) == []


def test_which_calibrations_are_resumable(tmp_path, test_model):
    """`calibration.resumable: auto` saves layers where a kill costs most: sources of 1B parameters or more whose
    calibration makes several passes (AWQ, a scale search), not a one-pass max calibration (which a layer at a time
    would run twice), nor llm-compressor's or a size search's; true and false decide for any ModelOpt variant."""
    from kiln.pipeline.plan.requests import resumable
    from kiln.pipeline.recipe.loader import load_recipe

    variants = {"fp8": {"quant": "fp8"}, "awq": {"quant": "int4_awq"},
                "searched": {"quant": "nvfp4", "algorithm": "mse"},
                "compressed": {"quant": "int4_awq", "backend": "llmcompressor", "group_size": 128},
                "mix": {"quant": "auto", "auto": {"formats": ["nvfp4", "fp8"], "effective_bits": 6.0}}}
    small = json.loads((test_model / "config.json").read_text())
    large = {**small, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 20,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000}
    for setting, config, expected in (("auto", small, set()), ("auto", large, {"awq", "searched"}),
                                      (True, small, {"fp8", "awq", "searched"}), (False, large, set())):
        recipe = write_recipe(tmp_path, str(test_model), variants, build={"target": "trtllm-pytorch"},
                              calibration={"builtin": "python-docs-train", "samples": 4, "seq_len": 64,
                                           "resumable": setting})
        loaded = load_recipe(recipe)
        chosen = {name for name, variant in loaded.recipe.variants.items() if resumable(loaded, variant, config)}
        assert chosen == expected, (setting, chosen)
