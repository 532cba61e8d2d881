"""Sharded checkpoints in and out: a source in several safetensors files with an index is fetched,
width-checked, quantized and validated; an export past max_shard_size is sharded with an index; the
manifest covers every shard and a pull verifies them all."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import run_kiln, write_recipe

pytestmark = pytest.mark.slow

VARIANTS = {"fp8": {"quant": "fp8", "kv_cache": "fp8", "gates": {"max_kl": 0.05}}}


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory, test_model):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sharded") / "model"
    model = AutoModelForCausalLM.from_pretrained(test_model, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="1MB")
    for path in test_model.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(path, folder / path.name)
    return folder


def test_a_sharded_source_builds_publishes_sharded_and_pulls_verified(tmp_path, sharded_model, test_model, kiln_home):
    shards = sorted(p.name for p in sharded_model.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (sharded_model / "model.safetensors.index.json").is_file()

    recipe = write_recipe(tmp_path, str(sharded_model), VARIANTS, name="shards", samples=8, seq_len=128,
                          build={"max_shard_size": "2MB"}, publish={"aliases": ["candidate"]})
    built = run_kiln("build", recipe, "--json")
    assert built.returncode == 0, built.stderr
    document = json.loads(built.stdout)
    variant = document["variants"][0]
    assert variant["registry"] == {**variant["registry"], "name": "shards-fp8", "version": "1"}
    assert 0 < variant["metrics"]["mean_kl"] < 0.05

    key = next(s["key"] for s in document["stages"] if s["stage"] == "quantize")
    hf = kiln_home / "cache" / "quantize" / key / "hf"
    exported = sorted(p.name for p in hf.glob("model-*-of-*.safetensors"))
    assert len(exported) >= 2, sorted(p.name for p in hf.iterdir())
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == exported
    assert "model.layers.0.self_attn.q_proj.weight_scale" in index["weight_map"]

    out = tmp_path / "pulled"
    pulled = run_kiln("pull", "shards-fp8@candidate", "--out", out, "--json")
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["verified"] is True
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    for name in [*exported, "model.safetensors.index.json"]:
        assert f"hf/{name}" in manifest
        assert (out / "hf" / name).read_bytes() == (hf / name).read_bytes()

    # A damaged shard in the registry is caught on pull.
    blob = next(p for p in (kiln_home / "registry").rglob("*") if p.is_file() and p.name == manifest[f"hf/{exported[-1]}"]["sha256"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    again = run_kiln("pull", "shards-fp8/1", "--out", tmp_path / "again")
    assert again.returncode == 1 and exported[-1] in again.stderr, again.stderr


def test_the_baseline_reads_a_sharded_source_exactly(sharded_model, test_model):
    from kiln.validate.reference_loader import load_baseline_model

    ids = torch.arange(64)[None] % 2048
    with torch.no_grad():
        whole = load_baseline_model(test_model)(input_ids=ids).logits
        sharded = load_baseline_model(sharded_model)(input_ids=ids).logits
    assert torch.equal(whole, sharded)
