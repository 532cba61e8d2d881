"""Fetch: pinned hub snapshots through huggingface_hub (offline, from a local cache), local folders,
pickle refusal, and HF_TOKEN never leaking."""

from __future__ import annotations

import json

import pytest

from kiln.pipeline.data.fetch import _allow_patterns
from kiln.pipeline.recipe.schema import ModelSource
from tests.conftest import run_kiln, write_recipe
from tests.hub_cache import COMMIT, model_files, seed_hub_cache

SECRET = "hf_kilnTestSecretToken0123456789"


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return hf_home


def _hub_recipe(tmp_path, repo="acme/tiny-llama", revision=COMMIT):
    return write_recipe(tmp_path, f"hf://{repo}", variants={"fp8": {"quant": "fp8"}}, model={"revision": revision})


def test_pinned_snapshot_from_the_local_cache(tmp_path, test_model, offline_hub, kiln_home):
    seed_hub_cache(offline_hub, "acme/tiny-llama", model_files(test_model))
    result = run_kiln("plan", _hub_recipe(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    stages = json.loads(result.stdout)["stages"]
    assert stages[0]["stage"] == "fetch" and stages[0]["status"] == "cached"
    assert SECRET not in result.stdout + result.stderr


def test_snapshot_missing_offline_says_how_to_fix(tmp_path, offline_hub, kiln_home):
    (offline_hub / "hub").mkdir(parents=True)
    result = run_kiln("build", _hub_recipe(tmp_path, repo="acme/not-cached"))
    assert result.returncode == 1
    assert "hf://acme/not-cached@" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr
    assert not list(kiln_home.rglob("kiln-entry.json")) and not (kiln_home / "cache" / "quantize").exists()


def test_pickle_only_snapshot_is_refused(tmp_path, offline_hub, kiln_home, test_model):
    files = {"config.json": test_model / "config.json", "pytorch_model.bin": b"\x80\x04pickle"}
    seed_hub_cache(offline_hub, "acme/pickled", files)
    for command in ("plan", "build"):
        result = run_kiln(command, _hub_recipe(tmp_path, repo="acme/pickled"))
        assert result.returncode == 2, result.stderr
        assert "only pickle weights (pytorch_model.bin)" in result.stderr
        assert "model.allow_pickle: true" in result.stderr
    assert not (kiln_home / "cache").exists() or not any((kiln_home / "cache").rglob("kiln-entry.json"))


def test_local_pickle_only_folder_is_refused_unless_opted_in(tmp_path, kiln_home, test_model):
    folder = tmp_path / "pickled-model"
    folder.mkdir()
    (folder / "config.json").write_bytes((test_model / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    recipe = write_recipe(tmp_path, str(folder), variants={"fp8": {"quant": "fp8"}})
    result = run_kiln("plan", recipe)
    assert result.returncode == 2 and "only pickle weights" in result.stderr
    opted_in = write_recipe(tmp_path, str(folder), variants={"fp8": {"quant": "fp8"}}, name="t2",
                            model={"allow_pickle": True})
    assert run_kiln("plan", opted_in).returncode == 0


def test_local_folder_digest_follows_content(tmp_path, kiln_home, test_model):
    import shutil

    copy = tmp_path / "model-copy"
    shutil.copytree(test_model, copy)
    recipe = write_recipe(tmp_path, str(copy), variants={"fp8": {"quant": "fp8"}})
    key = lambda: json.loads(run_kiln("plan", recipe, "--json").stdout)["stages"][0]["key"]
    before = key()
    assert key() == before
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert key() != before


def test_remote_code_and_pickle_stay_out_by_default():
    default = ModelSource(source="hf://acme/m", revision=COMMIT)
    assert default.trust_remote_code is False and default.allow_pickle is False
    patterns = _allow_patterns(default)
    assert "*.py" not in patterns and "*.bin" not in patterns and "*.safetensors" in patterns
    opted = _allow_patterns(ModelSource(source="hf://acme/m", revision=COMMIT, trust_remote_code=True, allow_pickle=True))
    assert "*.py" in opted and "*.bin" in opted


def test_layer_widths_are_checked_from_a_cached_config_before_any_download(tmp_path, offline_hub, kiln_home):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
              "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 512}
    seed_hub_cache(offline_hub, "acme/odd-widths", {"config.json": json.dumps(config).encode()})
    recipe = write_recipe(tmp_path, "hf://acme/odd-widths", {"int4": {"quant": "int4_awq"}}, model={"revision": COMMIT})
    for command in ("check", "plan"):
        result = run_kiln(command, recipe)
        assert result.returncode == 2, result.stderr
        assert "cannot pack model.layers.*.mlp.down_proj (input width 688)" in result.stderr
    fine = write_recipe(tmp_path, "hf://acme/odd-widths", {"fp8": {"quant": "fp8"}}, model={"revision": COMMIT}, name="t2")
    result = run_kiln("plan", fine, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stages"][0]["status"] == "will run"  # config alone is not a fetched model
