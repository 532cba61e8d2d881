"""Fault and hostile-input tests (issue 13): each reproduces a failure seen on main and proves it is gone."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import KILN, run_kiln, write_recipe


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


def _on_small_disk(tmp_path, size: str, script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) with $DISK a fresh tmpfs of `size`, in a private mount namespace; skip where the
    machine allows no such mount (not root, no unshare)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({probe.stderr.strip() or 'unshare failed'})")
    return subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {disk} && {script}"],
                          capture_output=True, text=True, env={**os.environ, "DISK": str(disk)}, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("size, where", [("2500k", "export"), ("10m", "upload")])
def test_a_full_disk_during_a_build_is_one_line_and_leaves_nothing_partial(tmp_path, test_model, size, where):
    """Issue 13.10: a full disk during export or upload printed a traceback. On a tmpfs that fills up while
    the checkpoint is written (2.5 MB) or while it is uploaded to the embedded registry (10 MB)."""
    recipe = write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8"}}, name="full", samples=8, seq_len=64)
    result = _on_small_disk(tmp_path, size, f'KILN_HOME=$DISK/home {KILN} build {recipe}; echo "rc=$?"; '
                                            f'find $DISK -name ".tmp-*"; KILN_HOME=$DISK/home {KILN} ls --json')
    errors = [line for line in result.stderr.splitlines() if line.startswith("kiln: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "space" in errors[0] or "disk is full" in errors[0], errors[0]
    assert "(fix: free space on that disk" in errors[0]
    out = result.stdout.splitlines()
    assert "rc=1" in out, result.stdout
    after = out[out.index("rc=1") + 1:]
    assert not [line for line in after if ".tmp-" in line], "partial folders were left behind"
    assert json.loads("\n".join(after)) == [], "no version may be published from a failed build"
