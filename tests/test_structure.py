"""Structure checks of exported checkpoints (issue 39.1): each check sees a fault planted in a real export of the
test model (the spine build's FP8 + FP8 KV and INT4-AWQ checkpoints, copied) and names it in one line; a planted
fault fails the build's gate and is not published. The demo matrix passing every check is asserted where it is
built (tests/test_matrix.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln import quantize, validate
from kiln.validate import StructureExpectation, check_structure
from tests.conftest import run_kiln, seed_home, write_recipe

FP8 = StructureExpectation("FP8", "FP8", unquantized_by_default=quantize.UNQUANTIZED_BY_DEFAULT)
AWQ = StructureExpectation("W4A16_AWQ", None, unquantized_by_default=quantize.UNQUANTIZED_BY_DEFAULT,
                           norms_may_change=True)
LAYER = "model.layers.1.self_attn.q_proj"


def _entry(cache: Path, quant: str) -> Path:
    return next(p.parent for p in (cache / "quantize").glob("*/kiln.json")
                if json.loads(p.read_text())["quant"] == quant)


@pytest.fixture()
def export(tmp_path, spine_cache):
    """Copies of the spine's FP8 and INT4-AWQ exports, to plant faults in."""
    def copy(quant: str) -> Path:
        dest = tmp_path / f"{quant}-{len(list(tmp_path.glob(f'{quant}-*')))}"
        shutil.copytree(_entry(spine_cache, quant) / quantize.HF_DIR, dest)
        return dest
    return copy


def _plant(hf: Path, change) -> None:
    """Rewrite the export's tensors through `change(tensors)`."""
    path = hf / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _problems(hf: Path, source: Path, expected=FP8) -> list[str]:
    return list(check_structure(hf, source, expected).problems)


def test_real_exports_pass_every_check(export, test_model):
    for quant, expected in (("fp8", FP8), ("int4_awq", AWQ)):
        report = check_structure(export(quant), test_model, expected)
        assert report.passed, report.problems
        layers = 4 * 7 + 1   # the decoder's linear layers and lm_head
        assert report.checked["layers"] == layers and report.checked["scales"] > 0 and report.checked["files"] == 3


@pytest.mark.parametrize("value, says", [
    (float("nan"), "input_scale: 1 of 1 is NaN"),
    (float("inf"), "input_scale: 1 of 1 is infinite"),
    (0.0, "input_scale: 1 of 1 is zero"),
    (-0.5, "input_scale: 1 of 1 is negative"),
    (1e-40, "input_scale: 1 of 1 is subnormal"),
])
def test_a_bad_scale_is_named(export, test_model, value, says):
    hf = export("fp8")
    _plant(hf, lambda t: t.__setitem__(f"{LAYER}.input_scale", torch.tensor(value, dtype=torch.float32)))
    assert _problems(hf, test_model) == [f"{LAYER}.{says}"]


def test_a_nan_among_group_scales_is_counted(export, test_model):
    hf = export("int4_awq")
    name = "model.layers.2.mlp.down_proj.weight_scale"

    def corrupt(t):
        t[name][3, 1] = float("nan")
    _plant(hf, corrupt)
    (line,) = _problems(hf, test_model, AWQ)
    assert line == f"{name}: 1 of {load_file(hf / 'model.safetensors')[name].numel()} are NaN"


def test_a_skipped_layer_and_a_layer_quantized_unasked_are_named(export, test_model):
    hf = export("fp8")
    _plant(hf, lambda t: [t.pop(f"{LAYER}.{s}") for s in ("weight_scale", "input_scale")])
    skipped = _problems(hf, test_model)
    assert skipped[0] == f"{LAYER}: hf_quant_config.json quantizes it (FP8) but it stores no weight_scale: the layer " \
                         "was skipped"
    # The recipe excluded layer 0, the export quantized it anyway.
    hf = export("int4_awq")
    excluded = StructureExpectation(**{**AWQ.__dict__, "exclude": ("model.layers.0.mlp.*",)})
    assert _problems(hf, test_model, excluded) == [
        f"model.layers.0.mlp.{p}: the recipe excludes it (model.layers.0.mlp.*) but the export quantizes it"
        for p in ("down_proj", "gate_proj", "up_proj")]


def test_formats_other_than_the_plan_are_named(export, test_model):
    hf = export("fp8")
    _edit_json(hf / "hf_quant_config.json", lambda d: d["quantization"].update(quant_algo="NVFP4"))
    problems = _problems(hf, test_model)
    assert problems[0] == "hf_quant_config.json: quant_algo is NVFP4, the plan made FP8"
    assert problems[1] == "config.json: quantization_config.quant_algo is FP8, hf_quant_config.json's is NVFP4 " \
                          "(runtimes read config.json)"
    assert "the checkpoint lacks" in problems[2]   # NVFP4's codec finds no weight_scale_2
    hf = export("int4_awq")
    _edit_json(hf / "config.json", lambda d: d["quantization_config"]["ignore"].append("model.layers.3*"))
    assert _problems(hf, test_model, AWQ)[0].startswith("config.json: quantization_config.ignore [")


def test_kv_scales_must_cover_every_layer(export, test_model):
    hf = export("fp8")
    _plant(hf, lambda t: t.pop("model.layers.2.self_attn.k_proj.k_scale"))
    assert _problems(hf, test_model) == ["k_scale: 3 of 4 decoder layers store it (fix: rebuild the variant; a KV "
                                         "cache without its scales is read with the wrong range)"]
    no_kv = StructureExpectation(**{**FP8.__dict__, "kv_cache_quant_algo": None})
    assert _problems(export("fp8"), test_model, no_kv) == [
        "hf_quant_config.json: kv_cache_quant_algo is FP8, the plan made None",
        "k_scale: 4 layers store it, but the plan quantizes no KV cache",
        "v_scale: 4 layers store it, but the plan quantizes no KV cache"]


def test_a_tensor_the_format_leaves_alone_must_be_the_sources(export, test_model):
    hf = export("fp8")

    def touch(t):
        t["model.embed_tokens.weight"][5, 7] += 1.0
        t["model.layers.0.input_layernorm.weight"][0] = 2.0
    _plant(hf, touch)
    width = load_file(test_model / "model.safetensors")["model.embed_tokens.weight"].numel()
    assert _problems(hf, test_model) == [
        "model.embed_tokens.weight: 1 of %d values differ from the source's, though the recipe's format leaves it "
        "alone" % width,
        "model.layers.0.input_layernorm.weight: 1 of 128 values differ from the source's, though the recipe's "
        "format leaves it alone"]
    # AWQ folds its input scales into the norms: they may change, but not to NaN.
    hf = export("int4_awq")
    assert _problems(hf, test_model, AWQ) == []
    _plant(hf, lambda t: t["model.layers.0.input_layernorm.weight"].__setitem__(0, float("nan")))
    assert _problems(hf, test_model, AWQ) == ["model.layers.0.input_layernorm.weight: not finite after scales were "
                                              "folded in, though the recipe's format leaves it alone"]


def test_tensors_lost_or_added_are_named(export, test_model):
    hf = export("fp8")
    _plant(hf, lambda t: (t.pop("model.norm.weight"), t.__setitem__("model.norm.weight_scale", torch.ones(()))))
    assert _problems(hf, test_model) == [
        "model.norm.weight: in the source, missing from the export",
        "model.norm.weight_scale: the export adds a tensor the source does not have (weight_scale on a layer that "
        "stores no quantized weight)"]


def _source_copy(tmp_path: Path, test_model: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(test_model, source)
    return source


def test_a_touched_or_quantized_vision_tower_is_named(export, tmp_path, test_model):
    source, hf = _source_copy(tmp_path, test_model), export("fp8")
    tower = "vision_tower.encoder.proj"
    weights = load_file(source / "model.safetensors")
    weights[f"{tower}.weight"] = torch.randn(16, 16, dtype=torch.bfloat16)
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    _plant(hf, lambda t: t.__setitem__(f"{tower}.weight", weights[f"{tower}.weight"].clone()))
    # As ModelOpt exports a model with a tower: left 16-bit, bit for bit, and listed so.
    _edit_json(hf / "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].append("vision_tower*"))
    _edit_json(hf / "config.json", lambda d: d["quantization_config"]["ignore"].append("vision_tower*"))
    assert _problems(hf, source) == []
    _plant(hf, lambda t: t[f"{tower}.weight"].mul_(2))
    assert _problems(hf, source) == [f"{tower}.weight: 256 of 256 values differ from the source's, though the "
                                     "recipe's format leaves it alone"]
    _plant(hf, lambda t: t.update({f"{tower}.weight": weights[f"{tower}.weight"].to(torch.float8_e4m3fn),
                                   f"{tower}.weight_scale": torch.ones(())}))
    assert _problems(hf, source) == [
        f"{tower}: stores scales but hf_quant_config.json leaves it 16-bit",
        f"{tower}: a module outside the language model (vision) was quantized (fix: name it in `only:` if that is "
        "meant)"]


def test_tokenizer_template_and_generation_config_must_be_the_sources(export, tmp_path, test_model):
    source, hf = _source_copy(tmp_path, test_model), export("fp8")
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    for folder in (source, hf):
        _edit_json(folder / "tokenizer_config.json", lambda d: d.update(chat_template=template))
    assert _problems(hf, source) == []
    _edit_json(hf / "tokenizer_config.json", lambda d: d.pop("chat_template"))
    _edit_json(hf / "generation_config.json", lambda d: d.update(eos_token_id=2))
    _edit_json(hf / "config.json", lambda d: d.update(tie_word_embeddings=True))
    assert _problems(hf, source) == [
        "lm_head.weight: differs from the embeddings the config ties it to (untied)",
        "hf/config.json: tie_word_embeddings is true, the source's is false",
        "hf/generation_config.json: eos_token_id is 2, the source's is 1",
        "hf/ tokenizer: the chat template is missing (chat requests would be formatted differently)"]
    _edit_json(hf / "tokenizer_config.json", lambda d: d.update(chat_template=template, eos_token="<|pad|>"))
    assert "hf/ tokenizer: eos_token is '<|pad|>', the source's is '<|eos|>'" in _problems(hf, source)


def test_differences_the_recipe_allows_are_listed_not_refused(export, tmp_path, test_model):
    """`evaluation.allow_differences: [chat_template, generation_config]`: those two are listed in the report
    (`allowed`) and pass; a difference of another kind (the tokenizer's eos) still fails."""
    from dataclasses import replace

    source, hf = _source_copy(tmp_path, test_model), export("fp8")
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    _edit_json(source / "tokenizer_config.json", lambda d: d.update(chat_template=template))
    _edit_json(hf / "generation_config.json", lambda d: d.update(eos_token_id=2))
    allowing = replace(FP8, allowed_differences=("chat_template", "generation_config"))
    report = check_structure(hf, source, allowing)
    assert report.passed and report.allowed == (
        "hf/generation_config.json: eos_token_id is 2, the source's is 1",
        "hf/ tokenizer: the chat template is missing (chat requests would be formatted differently)")
    assert validate.StructureReport.from_dict(report.as_dict()) == report
    _edit_json(hf / "tokenizer_config.json", lambda d: d.update(eos_token="<|pad|>"))
    assert check_structure(hf, source, allowing).problems[0] == (
        "hf/ tokenizer: eos_token is '<|pad|>', the source's is '<|eos|>'")


def test_untied_embeddings_are_named(export, tmp_path, test_model):
    """A source that ties its output head to the embeddings: an export with its own lm_head must keep it equal."""
    source, hf = _source_copy(tmp_path, test_model), export("fp8")
    for folder in (source, hf):
        _edit_json(folder / "config.json", lambda d: d.update(tie_word_embeddings=True))
    embed = load_file(source / "model.safetensors")["model.embed_tokens.weight"]
    _plant(hf, lambda t: t.__setitem__("lm_head.weight", embed.clone()))
    source_weights = load_file(source / "model.safetensors")
    source_weights["lm_head.weight"] = embed.clone()
    save_file(source_weights, source / "model.safetensors", metadata={"format": "pt"})
    assert _problems(hf, source) == []
    _plant(hf, lambda t: t["lm_head.weight"].mul_(0.5))
    assert "lm_head.weight: differs from the embeddings the config ties it to (untied)" in _problems(hf, source)


def test_block_scales_of_the_formats_own_range_are_not_faults(tmp_path):
    """An NVFP4 block scale may be zero or subnormal E4M3 under its global scale; an MX exponent of 255 is NaN."""
    from kiln.validate.structure.tensors import Checkpoint, check_scales

    folder = tmp_path / "synthetic"
    folder.mkdir()
    block = torch.tensor([0.0, 0.001953125, 1.0]).to(torch.float8_e4m3fn)
    save_file({"a.weight_scale": block, "a.weight_scale_2": torch.tensor(0.01),
               "b.weight_scale": torch.tensor([127, 255, 3], dtype=torch.uint8),
               "c.weight_scale": block.clone()}, folder / "model.safetensors")
    assert check_scales(Checkpoint(folder)) == (4, [
        "b.weight_scale: 1 of 3 E8M0 exponents are 255 (NaN)",
        "c.weight_scale: 1 of 3 are zero"])   # an E4M3 scale under no global scale must be positive


def test_the_default_unquantized_patterns_are_modelopts():
    from modelopt.torch.quantization.config import _default_disabled_quantizer_cfg

    theirs = tuple(e["quantizer_name"] for e in _default_disabled_quantizer_cfg
                   if "parent_class" not in e and not e.get("enable", True))
    assert quantize.UNQUANTIZED_BY_DEFAULT == theirs


@pytest.mark.slow   # two builds and publishes (56 s in CI): make test-fast keeps the checks on planted files above
def test_a_planted_fault_fails_the_build_and_is_not_published(tmp_path, spine_cache, test_model, kiln_home):
    """A checkpoint the quantize stage left with a NaN scale (its cache entry resealed, as a faulty exporter would
    leave it): the build refuses it in one line, publishes nothing for it, and `--publish-failed` publishes it
    marked failed."""
    from kiln.common.digest import tree_manifest

    seed_home(kiln_home, spine_cache)
    entry = _entry(kiln_home / "cache", "fp8")
    _plant(entry / quantize.HF_DIR, lambda t: t.__setitem__(f"{LAYER}.input_scale", torch.tensor(float("nan"))))
    record = json.loads((entry / "kiln-entry.json").read_text())
    record["files"] = {rel: info for rel, info in tree_manifest(entry).items() if rel != "kiln-entry.json"}
    (entry / "kiln-entry.json").write_text(json.dumps(record))
    for validated in (kiln_home / "cache" / "validate").glob("*"):
        shutil.rmtree(validated)
    recipe = write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8", "kv_cache": "fp8"}})
    built = run_kiln("build", recipe, "--json")
    assert built.returncode == 3, built.stderr   # a failed gate
    (variant,) = json.loads(built.stdout)["variants"]
    assert variant["gate"]["failures"] == [f"structure: {LAYER}.input_scale: 1 of 1 is NaN"]
    assert variant["registry"] is None and variant["structure"]["checked"]["scales"] == 64
    assert f"fp8: structure check failed: {LAYER}.input_scale: 1 of 1 is NaN" in built.stderr
    forced = run_kiln("build", recipe, "--json", "--publish-failed")
    (variant,) = json.loads(forced.stdout)["variants"]
    assert variant["registry"]["version"] == "1" and not variant["gate"]["passed"]
    assert validate.load_structure(next((kiln_home / "cache" / "validate").glob("*"))).problems == (
        f"{LAYER}.input_scale: 1 of 1 is NaN",)

    # Seen where people look (39.4): the version's tag and structure.json, kiln report, and kiln registry verify,
    # which checks the stored files again against the source and changes nothing.
    from kiln.registry import client

    name = variant["registry"]["name"]
    tags = client(kiln_home).get_model_version(name, "1").tags
    assert tags["kiln.structure"].startswith("failed: 1 problem; checked ") and "scales 64" in tags["kiln.structure"]
    report = run_kiln("report", recipe, "--out", tmp_path / "report.html")
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Structure checks</h2>" in page and 'class="fail">failed: 1 problem</td>' in page
    unseen = run_kiln("registry", "verify")
    assert unseen.returncode == 0, unseen.stderr
    assert (f"{name}/1: ok (" in unseen.stdout and "structure not re-checked: its source (a local folder with content "
            "digest " in unseen.stdout and "(fix: --source FOLDER)" in unseen.stdout)
    artifacts = kiln_home / "registry" / "artifacts"
    before = {p: p.read_bytes() for p in artifacts.rglob("*") if p.is_file()}
    again = run_kiln("registry", "verify", "--source", test_model, "--json")
    assert again.returncode == 0, again.stderr   # published as failed, and failing again: nothing new
    (row,) = json.loads(again.stdout)
    assert row["structure"]["rechecked"] and row["structure"]["problems"] == [f"{LAYER}.input_scale: 1 of 1 is NaN"]
    assert row["structure"]["checked"] == variant["structure"]["checked"]
    client(kiln_home).set_model_version_tag(name, "1", "kiln.gate", "pass")   # a forged "passed"
    forged = run_kiln("registry", "verify", "--source", test_model)
    assert forged.returncode == 1 and "Traceback" not in forged.stderr
    assert f"{name}/1: ok (" in forged.stdout
    assert f"structure re-checked: 1 problem: {LAYER}.input_scale" in forged.stdout
    assert forged.stderr.strip().splitlines()[-1] == f"kiln: 1 fail the structure checks: {name}/1; nothing was changed"
    assert {p: p.read_bytes() for p in artifacts.rglob("*") if p.is_file()} == before


def test_an_expert_below_the_minimum_is_named():
    from kiln.validate.structure import check_experts

    table = {"model.layers.0.mlp": [2, 0, 2, 0], "model.layers.1.mlp": [3, 1, 2, 2]}
    expected = StructureExpectation("FP8", expert_tokens=table, min_expert_tokens=2)
    count, problems = check_experts(expected)
    assert count == 2 and [p.split(" received")[0] for p in problems] == [
        "model.layers.0.mlp: experts 1 (0), 3 (0)", "model.layers.1.mlp: expert 1 (1)"]
    assert "calibration.all_experts: true" in problems[0]


@pytest.mark.slow
def test_experts_without_calibration_tokens_fail_the_build_and_all_experts_fixes_it(tmp_path, kiln_home):
    """About 30 s: the Mixtral test model calibrated on 2 tokens (top-2 of 4 experts: at most 4 routings per layer)
    fails with the starved experts named; `calibration.all_experts: true` (ModelOpt's remedy, which kiln applies
    itself to transformers 5's fused experts) sends every token through every expert, and the build passes."""
    from tests.family_models import family_model

    model = family_model("mixtral")
    variants = {"fp8": {"quant": "fp8"}}
    tiny = {"builtin": "python-docs-train", "samples": 1, "seq_len": 2}
    sections = {"build": {"target": "trtllm-pytorch"}, "evaluation": {"builtin": "python-docs-heldout", "samples": 2,
                                                                      "seq_len": 32}}
    starved = write_recipe(tmp_path, str(model), variants, name="starved", calibration=tiny, **sections)
    built = run_kiln("build", starved, "--json")
    assert built.returncode == 3, built.stderr
    (variant,) = json.loads(built.stdout)["variants"]
    record = json.loads(next(kiln_home.glob("cache/quantize/*/kiln.json")).read_text())
    table = record["expert_tokens"]
    assert sorted(table) == ["model.layers.0.mlp", "model.layers.1.mlp"] and not record["all_experts"]
    assert all(sum(counts) == 2 * 2 for counts in table.values())   # 2 tokens, each routed to 2 experts
    starved_lines = [f for f in variant["gate"]["failures"] if "min_expert_tokens (1)" in f]
    assert len(starved_lines) == sum(1 for counts in table.values() if 0 in counts) > 0
    assert variant["registry"] is None and variant["structure"]["checked"]["experts"] == 2

    everyone = write_recipe(tmp_path, str(model), variants, name="everyone", calibration={**tiny, "all_experts": True},
                            **sections)
    built = run_kiln("build", everyone, "--json")
    assert built.returncode == 0, built.stderr
    records = [json.loads(p.read_text()) for p in kiln_home.glob("cache/quantize/*/kiln.json")]
    (record,) = [r for r in records if r["all_experts"]]
    # Each expert saw both tokens in the widened pass, and its routed ones again in the routed pass.
    assert all(min(counts) >= 2 and sum(counts) == 2 * 4 + 2 * 2 for counts in record["expert_tokens"].values())
    from kiln.registry import client

    (published,) = json.loads(built.stdout)["variants"]
    tags = client(kiln_home).get_model_version(published["registry"]["name"], "1").tags
    fewest = min(min(counts) for counts in record["expert_tokens"].values())
    assert tags["kiln.experts"].startswith(f"2 MoE blocks x 4 experts; fewest calibration tokens: {fewest} (")


def test_a_tokenizer_that_does_not_load_is_named(export, test_model):
    hf = export("fp8")
    (hf / "tokenizer.json").write_text('{"truncated": ')
    (line,) = _problems(hf, test_model)
    assert line.startswith("hf/ tokenizer: it does not load (")


def test_verify_names_a_stored_version_it_cannot_read_instead_of_failing(tmp_path, test_model):
    """kiln registry verify's re-check of one version whose kiln.json no longer reads as kiln wrote it: one note for
    that version, not a traceback for the whole command."""
    from kiln.common.digest import tree_digest
    from kiln.common.progress import SILENT
    from kiln.pipeline.run.recheck import StructureRecheck, structure_line

    (tmp_path / "hf").mkdir()
    (tmp_path / "kiln.json").write_text('{"quant": "fp8"}')
    tags = {"kiln.source": "local:0123", "kiln.revision": tree_digest(test_model)}
    found = StructureRecheck([test_model], SILENT)(tags, tmp_path)
    assert not found["rechecked"] and found["note"].startswith("its stored files could not be checked (TypeError: ")
    assert structure_line(found).startswith("; structure not re-checked: its stored files could not be checked")
    elsewhere = StructureRecheck([], SILENT)({**tags, "kiln.revision": "f" * 64}, tmp_path)
    assert elsewhere["note"] == ("its source (a local folder with content digest ffffffffffffffff) is not among "
                                 "--source (none given) (fix: --source FOLDER)")


def test_config_dtype_is_held_to_the_dtype_the_recipe_loaded(export, tmp_path, test_model):
    """`model.dtype: float32` (CPUs without bf16 units) exports config.json in float32: that is what was asked for,
    not a difference from the source; a dtype the recipe did not ask for still is."""
    from dataclasses import replace

    source, hf = _source_copy(tmp_path, test_model), export("fp8")
    stored = json.loads((source / "config.json").read_text())["dtype"]
    _edit_json(hf / "config.json", lambda d: d.update(dtype="float32"))
    assert _problems(hf, source) == [f'hf/config.json: dtype is "float32", the source\'s is "{stored}"']
    assert _problems(hf, source, replace(FP8, dtype="float32")) == []
    assert _problems(hf, source, replace(FP8, dtype=stored)) == [
        f'hf/config.json: dtype is "float32", the source\'s is "{stored}"']
