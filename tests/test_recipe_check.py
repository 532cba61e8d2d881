"""`kiln check`: every refusal is one line naming file, line, field and fix, exit 2, no traceback."""

from __future__ import annotations

import re
import textwrap

import pytest

from kiln.quantize import FORMATS, Backend, KVCacheFormat, QuantFormat, Runtime, loading_runtimes
from kiln.quantize.runtimes import backend_makes
from tests.conftest import repo_recipe_beside_model, run_kiln


# The lists refusals name, read from the tables, so that adding a format or a runtime changes them and not this test.
def _quoted(names) -> str:
    names = [f"'{name}'" for name in names]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _loaded_by(runtime: Runtime) -> str:
    return " or ".join(q.value for q in QuantFormat if runtime in loading_runtimes(q, KVCacheFormat.none))


_LLMC_MAKES = " or ".join(q.value for q in QuantFormat if backend_makes(Backend.llmcompressor, q))

GOOD = """\
kiln: 1
name: good
model:
  source: hf://acme/tiny-llama
  revision: 0123456789abcdef0123456789abcdef01234567
calibration: {builtin: python-docs-train, samples: 8, seq_len: 64}
evaluation: {builtin: python-docs-heldout, samples: 8, seq_len: 64}
variants:
  fp8: {quant: fp8, kv_cache: fp8, gpus: [sm90]}
"""

# (name, text replacement applied to GOOD, expected pattern in the one output line)
CASES = [
    ("unknown-key", ("  fp8: {quant: fp8,", "  fp8: {quantt: fp8, quant: fp8,"),
     r":9: variants\.fp8\.quantt: unknown key \(fix: remove it"),
    ("wrong-type", ("samples: 8, seq_len: 64}\nevaluation", "samples: many, seq_len: 64}\nevaluation"),
     r":6: calibration\.samples: Input should be a valid integer"),
    ("missing-revision", ("  revision: 0123456789abcdef0123456789abcdef01234567\n", ""),
     r":3: model: a hub source needs `revision`"),
    ("short-revision", ("0123456789abcdef0123456789abcdef01234567", "main"),
     r":3: model: revision 'main' is not a 40-hex commit"),
    ("bad-name", ("name: good", "name: Good Model"),
     r":2: name: String should match pattern .*\(fix: use lower-case letters"),
    ("bad-variant-name", ("  fp8: {quant", "  FP8!: {quant"),
     r":9: variants\.FP8!\.\[key\]: String should match pattern"),
    ("zero-size", ("samples: 8, seq_len: 64}\nvariants", "samples: 8, seq_len: 0}\nvariants"),
     r":7: evaluation\.seq_len: Input should be greater than 0 \(fix: use a positive number\)"),
    ("negative-build", ("variants:", "build: {max_batch_size: -4}\nvariants:"),
     r":8: build\.max_batch_size: Input should be greater than 0"),
    ("unknown-format", ("quant: fp8,", "quant: fp9,"),
     r"variants\.fp8\.quant: Input should be " + _quoted([*FORMATS, "auto"])),
    ("group-size-on-fp8", ("kv_cache: fp8,", "kv_cache: fp8, group_size: 128,"),
     r"variants\.fp8: group_size does not apply to fp8"),
    ("alpha-on-fp8", ("kv_cache: fp8,", "kv_cache: fp8, alpha: 0.5,"), r"variants\.fp8: alpha applies only to int8_sq"),
    ("schema-version", ("kiln: 1", "kiln: 2"), r":1: kiln: Input should be 1"),
    ("unknown-difference", ("seq_len: 64}\nvariants", "seq_len: 64, allow_differences: [weights]}\nvariants"),
     r":7: evaluation\.allow_differences\.0: Input should be 'config', 'generation_config', 'tokenizer' or "
     r"'chat_template'"),
    ("resumable-word", ("samples: 8, seq_len: 64}\nevaluation", "samples: 8, seq_len: 64, resumable: always}\nevaluation"),
     r":6: calibration\.resumable: 'always' is not auto, true or false \(fix: "),
    ("unknown-gpu", ("gpus: [sm90]", "gpus: [sm91]"), r"variants\.fp8\.gpus: unknown GPU 'sm91'; use an SM or GPU name: sm80 \(A100/A30\)"),
    ("runtime-refuses", ("{quant: fp8, kv_cache: fp8,", "{quant: int4_awq, runtimes: [trtllm, vllm],"),
     r"variants\.fp8: vllm does not load int4_awq \(vLLM 0\.32\.0, source: .*modelopt\.py.*\) "
     rf"\(fix: choose quant {_loaded_by(Runtime.vllm)}, set backend: llmcompressor, or drop vllm from runtimes\)"),
    ("llmc-format", ("{quant: fp8, kv_cache: fp8,", "{quant: fp8, backend: llmcompressor,"),
     rf"variants\.fp8: backend llmcompressor makes {_LLMC_MAKES} in kiln, not fp8 "
     r"\(fix: choose one of those, or set backend: modelopt\)"),
    ("llmc-kv", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}", "{quant: int4_gptq, backend: llmcompressor, kv_cache: fp8}"),
     r"variants\.fp8: kv_cache applies to backend modelopt"),
    ("llmc-gpus", ("{quant: fp8, kv_cache: fp8,", "{quant: int8_sq, backend: llmcompressor,"),
     r"variants\.fp8: gpus applies to backend modelopt: .*\(fix: remove gpus, or set backend: modelopt\)"),
    ("unknown-runtime", ("kv_cache: fp8,", "kv_cache: fp8, runtimes: [tgi],"),
     r"variants\.fp8\.runtimes\.0: Input should be " + _quoted(r.value for r in Runtime)),
    # quant auto (issue 27): a budget the formats cannot reach, a format a GPU cannot run, a runtime that cannot
    # load the mix, and the auto block's own shape.
    ("auto-below-floor", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}",
                          "{quant: auto, auto: {formats: [fp8, int8_wo], effective_bits: 6}}"),
     r"variants\.fp8\.auto: effective_bits 6 is below what fp8, int8_wo can reach \(8: every layer in fp8\); give at "
     r"least 8, or add a smaller format"),
    ("auto-above-16", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}", "{quant: auto, auto: {formats: [fp8], effective_bits: 16}}"),
     r"variants\.fp8\.auto\.effective_bits: 16 is not below 16 bits per weight \(the unquantized model\)"),
    ("auto-gpu", ("{quant: fp8, kv_cache: fp8,", "{quant: auto, auto: {formats: [nvfp4, fp8], effective_bits: 5},"),
     r"variants\.fp8: sm90 cannot run nvfp4; .*\(fix: drop that GPU or drop it from auto\.formats\)"),
    ("auto-vllm", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}",
                   "{quant: auto, auto: {formats: [int4_awq, fp8], effective_bits: 5}, runtimes: [vllm]}"),
     r"variants\.fp8: vllm does not load a mix of int4_awq and fp8 \(vLLM 0\.32\.0, .*\) \(fix: mix only formats among "
     rf"{_loaded_by(Runtime.vllm)}, or drop vllm from runtimes\)"),
    ("auto-sglang", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}",
                     "{quant: auto, auto: {formats: [nvfp4, fp8], effective_bits: 5}, runtimes: [sglang]}"),
     r"variants\.fp8: sglang is not known to load a mix of nvfp4 and fp8 .*\(fix: choose one format, quant "
     rf"{_loaded_by(Runtime.sglang)}, "
     r"or drop sglang from runtimes\)"),
    ("auto-missing", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}", "{quant: auto}"),
     r"variants\.fp8: quant auto needs `auto:` with formats and effective_bits"),
    ("auto-on-a-format", ("kv_cache: fp8,", "kv_cache: fp8, auto: {formats: [fp8], effective_bits: 8},"),
     r"variants\.fp8: auto applies to quant: auto; remove it from this fp8 variant"),
    ("auto-group-size", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}",
                         "{quant: auto, group_size: 128, auto: {formats: [int4_awq, fp8], effective_bits: 5}}"),
     r"variants\.fp8: group_size does not apply to quant auto"),
    ("auto-gptq", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}", "{quant: auto, auto: {formats: [int4_gptq, fp8], effective_bits: 6}}"),
     r"variants\.fp8\.auto\.formats: int4_gptq calibrates with gptq, which ModelOpt's auto_quantize does not run "
     rf"\(fix: search among {', '.join(q for q, spec in FORMATS.items() if spec.auto_searchable)}\)"),
    ("auto-search-one-budget", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}",
                                "{quant: auto, auto: {formats: [fp8], effective_bits: 8, search: smallest-passing}}"),
     r"variants\.fp8\.auto: search: smallest-passing needs candidates: give effective_bits as a list"),
    ("auto-budget-not-a-number", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}",
                                  "{quant: auto, auto: {formats: [fp8], effective_bits: [8, five]}}"),
     r"variants\.fp8\.auto\.effective_bits: 'five' is not a number of bits; give a number such as 5\.0"),
    ("auto-no-budget", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}", "{quant: auto, auto: {formats: [fp8]}}"),
     r"variants\.fp8\.auto: give effective_bits \(a budget, or a list of candidates\) or search: smallest-passing"),
    ("auto-score-samples", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}",
                            "{quant: auto, auto: {formats: [fp8], effective_bits: 8, score_samples: 99}}"),
     r"variants\.fp8\.auto\.score_samples \(99\) exceeds calibration\.samples \(8\)"),
    # Issue 36.6: lax numbers read `true` as 1 and '8' as 8; a number is a number, a flag is a flag.
    ("bool-as-samples", ("samples: 8, seq_len: 64}\nevaluation", "samples: true, seq_len: 64}\nevaluation"),
     r":6: calibration\.samples: Input should be a valid integer \(fix: write a whole number, without quotes\)"),
    ("string-as-score-samples", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}",
                                 "{quant: auto, auto: {formats: [fp8], effective_bits: 8, score_samples: '8'}}"),
     r"variants\.fp8\.auto\.score_samples: Input should be a valid integer \(fix: write a whole number"),
    ("bool-as-score-samples", ("{quant: fp8, kv_cache: fp8, gpus: [sm90]}",
                               "{quant: auto, auto: {formats: [fp8], effective_bits: 8, score_samples: true}}"),
     r"variants\.fp8\.auto\.score_samples: Input should be a valid integer"),
    ("bool-as-host-memory", ("calibration: {builtin: python-docs-train,",
                             "calibration: {offload: disk, max_host_memory: true, builtin: python-docs-train,"),
     r"calibration\.max_host_memory: a size such as 6GiB or a number of bytes, not a boolean \(fix: write a size"),
    ("string-as-gate", ("kv_cache: fp8,", "kv_cache: fp8, gates: {max_kl: '0.1'},"),
     r"variants\.fp8\.gates\.max_kl: Input should be a valid number \(fix: write a number, without quotes\)"),
    ("bool-as-gate", ("kv_cache: fp8,", "kv_cache: fp8, gates: {max_kl: true},"),
     r"variants\.fp8\.gates\.max_kl: Input should be a valid number"),
    ("string-as-flag", ("  revision:", "  trust_remote_code: 'yes'\n  revision:"),
     r"model\.trust_remote_code: Input should be a valid boolean \(fix: write true or false\)"),
    ("bool-as-limit", ("samples: 8, seq_len: 64}\nvariants", "samples: 8, seq_len: 64, tasks: [{name: next-line, "
                                                                "limit: true}]}\nvariants"),
     r"evaluation\.tasks\.0\.limit: Input should be a valid integer"),
]


@pytest.mark.parametrize("recipe", ["demo.yaml", "demo-matrix.yaml", "demo-llmcompressor.yaml"])
def test_demo_recipe_is_valid(tmp_path, test_model, recipe):
    # The demo recipes point at ../build/demo-model, which `make demo` links to the same trained model.
    result = run_kiln("check", repo_recipe_beside_model(tmp_path, test_model, recipe))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_good_recipe_passes(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    result = run_kiln("check", path)
    assert result.returncode == 0, result.stderr


def test_every_refusal_is_one_clear_line(tmp_path):
    paths = {}
    for name, (old, new), _ in CASES:
        assert old in GOOD, name
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(GOOD.replace(old, new, 1))
    result = run_kiln("check", *paths.values())
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    for name, _, pattern in CASES:
        mine = [line for line in lines if f"{paths[name]}:" in line]
        assert len(mine) == 1, (name, mine)
        assert re.search(pattern, mine[0]), (name, mine[0])


def test_several_problems_in_one_file_each_get_a_line(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text(GOOD.replace("name: good", "name: BAD").replace("seq_len: 64}\nvariants", "seq_len: -1}\nvariants"))
    result = run_kiln("check", path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 2


@pytest.mark.parametrize("text, expected", [
    ("kiln: 1\nname: [unclosed\n", r"not valid YAML"),
    ("- just\n- a list\n", r":1: a recipe is a mapping"),
])
def test_unparseable_recipes(tmp_path, text, expected):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    result = run_kiln("check", path)
    assert result.returncode == 2
    assert re.search(expected, result.stderr)
    assert "Traceback" not in result.stderr


def test_missing_file():
    result = run_kiln("check", "/nonexistent/recipe.yaml")
    assert result.returncode == 2
    assert "/nonexistent/recipe.yaml: file not found" in result.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("kiln: 1", "kiln: 2"))
    result = run_kiln("--debug", "check", path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_layer_widths_not_divisible_by_the_group_are_named(tmp_path):
    """INT4 packs blocks of 128 inputs: a 688-wide MLP cannot be packed, and check says which layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    model_dir = tmp_path / "odd-model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    recipe = tmp_path / "odd.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        kiln: 1
        name: odd
        model: {{source: {model_dir}}}
        calibration: {{builtin: python-docs-train}}
        evaluation: {{builtin: python-docs-heldout}}
        variants:
          fp8: {{quant: fp8}}
          int4: {{quant: int4_awq}}
        """))
    for command in ("check", "plan"):
        result = run_kiln(command, recipe)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr  # fp8 has no block size: only int4 is refused
        assert "variants.int4: int4_awq with group size 128 cannot pack model.layers.*.mlp.down_proj (input width 688)" in result.stderr
        assert "Traceback" not in result.stderr
    # Excluded layers stay unquantized, so their widths do not matter.
    recipe.write_text(recipe.read_text().replace("int4: {quant: int4_awq}", "int4: {quant: int4_awq, exclude: ['*.mlp.down_proj']}"))
    result = run_kiln("check", recipe)
    assert result.returncode == 0, result.stderr
