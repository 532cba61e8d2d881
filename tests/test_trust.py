"""Issue 36's items that are not the sandbox (tests/test_sandbox.py) or registry verify: what cannot be measured
never passes, bad numbers in a recipe are refused, and the source's weights are checked before calibration."""

from __future__ import annotations

import shutil

import pytest

from tests.recipes import run_kiln, write_recipe


def _poisoned_copy(test_model, folder, value: float):
    from safetensors.torch import load_file, save_file

    shutil.copytree(test_model, folder)
    [shard] = folder.glob("*.safetensors")
    tensors = load_file(shard)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 5] = value
    tensors[name][7, 1] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard, name


def test_an_infinite_weight_is_named_too(tmp_path, test_model):
    from kiln.common.errors import UserInputError
    from kiln.quantize import refuse_nonfinite_weights

    shard, name = _poisoned_copy(test_model, tmp_path / "model", float("-inf"))
    with pytest.raises(UserInputError, match=f"{shard}: tensor {name} holds 0 NaN and 2 infinite value"):
        refuse_nonfinite_weights(tmp_path / "model")
    refuse_nonfinite_weights(test_model)   # the clean source passes


def test_a_source_whose_weights_are_not_finite_is_refused_before_calibration(tmp_path, test_model):
    """On 9edec45 a NaN weight gave a ValueError traceback that blamed the architecture (validate/heads.py)."""
    counts = "2 NaN and 0 infinite"
    shard, name = _poisoned_copy(test_model, tmp_path / "model", float("nan"))
    recipe = write_recipe(tmp_path, str(tmp_path / "model"), {"fp8": {"quant": "fp8"}}, samples=4, seq_len=32)
    home = tmp_path / "home"
    result = run_kiln("build", recipe, env={"KILN_HOME": str(home)})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"kiln: {shard}: tensor {name} holds {counts} value(s); kiln will not calibrate or measure a model whose "
        "weights are not finite (fix: repair or fetch the checkpoint again)")
    assert not any((home / "cache" / "quantize").glob("*")) if (home / "cache" / "quantize").exists() else True
