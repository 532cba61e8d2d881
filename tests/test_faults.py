"""Fault and hostile-input tests (issue 13): each reproduces a failure seen on main and proves it is gone."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import run_kiln, write_recipe


def _model_folder(folder):
    folder.mkdir(parents=True)
    save_file({"model.norm.weight": torch.ones(128)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
        "max_position_embeddings": 512}))
    return folder


def test_a_link_out_of_the_model_folder_is_refused(tmp_path):
    """Issue 13.2: chat_template.jinja -> a file outside was read and published."""
    outside = tmp_path / "secret.txt"
    outside.write_text("not for publishing\n")
    model = _model_folder(tmp_path / "model")
    (model / "chat_template.jinja").symlink_to(outside)
    recipe = write_recipe(tmp_path, str(model), {"fp8": {"quant": "fp8"}})
    env = {"KILN_HOME": str(tmp_path / "home")}
    for command in ("check", "plan", "build"):
        result = run_kiln(command, recipe, env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert f"chat_template.jinja links to {outside}, outside the model folder (fix: copy the file" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "cache").exists()


def test_links_inside_the_folder_and_into_a_hub_blob_store_are_fine(tmp_path):
    from kiln.pipeline.fetch import refuse_outside_links

    model = _model_folder(tmp_path / "model")
    (model / "tokenizer_config.json").write_text("{}")
    (model / "alias.json").symlink_to(model / "tokenizer_config.json")
    refuse_outside_links(model)
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(os.path.relpath(repo / "blobs" / "abc123", snapshot))
    refuse_outside_links(snapshot)
    (snapshot / "extra.txt").symlink_to(tmp_path / "hub")   # a folder outside the repo's blob store
    with pytest.raises(Exception, match="extra.txt links to"):
        refuse_outside_links(snapshot)


def test_kiln_diff_runs_from_the_command_line(kiln_home, tmp_path):
    """Issue 13.11: `kiln diff NAME V1 V2` failed for every pair with TypeError: PosixPath / int."""
    from kiln.pipeline.progress import SILENT
    from kiln.registry import PUBLISH_KEY_TAG, publish

    for version, weights in (("a", b"one"), ("b", b"two")):
        folder = tmp_path / version / "hf"
        folder.mkdir(parents=True)
        (folder / "w.bin").write_bytes(weights)
        publish(kiln_home, "m", {"hf/w.bin": folder / "w.bin"}, {PUBLISH_KEY_TAG: version}, [], SILENT)
    result = run_kiln("diff", "m", "1", "2", "--json", env={"KILN_HOME": str(kiln_home)})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "hf/w.bin" in result.stdout


def test_duplicate_yaml_keys_are_refused(tmp_path):
    """Issue 13.14: two `fp8:` blocks under variants silently kept the last one."""
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("kiln: 1\nname: dup\nmodel: {source: ../m}\n"
                      "calibration: {builtin: python-docs-train}\nevaluation: {builtin: python-docs-heldout}\n"
                      "variants:\n  fp8:\n    quant: fp8\n  fp8:\n    quant: int4_awq\n")
    result = run_kiln("check", recipe)
    assert result.returncode == 2
    assert f"{recipe}:9: variants.fp8: duplicate key; YAML would silently drop the one at line 7" in result.stderr
