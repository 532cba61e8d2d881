"""What this host can build: GPU detection, tool versions, and the GPU stages in `kiln plan`."""

from __future__ import annotations

import importlib
import json

import pytest
import yaml

from kiln.compile import Target, detect_host
from kiln.compile.host import Host, HostGpu
from tests.conftest import GpuHost, run_kiln, write_recipe

FP8_ON_ADA_AND_HOPPER = {"fp8": {"quant": "fp8", "kv_cache": "fp8", "gpus": ["sm89", "sm90"]}}


def _use(host_env: GpuHost, monkeypatch) -> None:
    """Apply a stand-in GPU host to this process (PATH for nvidia-smi, sys.path for the distributions)."""
    monkeypatch.setenv("PATH", host_env.env["PATH"])
    monkeypatch.setenv("KILN_STANDIN_GPUS", host_env.env["KILN_STANDIN_GPUS"])
    monkeypatch.syspath_prepend(host_env.env["PYTHONPATH"])
    importlib.invalidate_caches()


def test_detects_gpus_through_nvidia_smi_without_cuda(tmp_path, monkeypatch):
    _use(GpuHost(tmp_path / "h", sms=("sm89", "sm90")), monkeypatch)
    host = detect_host()
    assert host.probe == "nvidia-smi"
    assert [(g.index, g.name, g.sm) for g in host.gpus] == [(0, "NVIDIA L40S", "sm89"), (1, "NVIDIA H100 80GB HBM3", "sm90")]
    assert host.gpus[1].memory_mib == 81559 and host.driver == "570.86.15"
    assert (host.tensorrt, host.tensorrt_llm) == ("10.14.1", "1.2.0")
    assert host.compile_problem("sm90", Target.trtllm_engine) is None
    assert host.compile_problem("sm80", Target.trtllm_engine) == "needs an sm80 GPU host with tensorrt_llm (0.17 to 1.2)"


def test_a_gpu_outside_the_table_is_noted(tmp_path, monkeypatch):
    _use(GpuHost(tmp_path / "h"), monkeypatch)
    monkeypatch.setenv("KILN_STANDIN_GPUS", "0, NVIDIA B300, 10.3, 1000, 580.1")
    host = detect_host()
    assert host.sms == ("sm103",)
    assert any("not in kiln's GPU table" in note for note in host.notes)


def test_a_cpu_host_has_no_gpu_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    host = detect_host()
    assert host.gpus == () and host.probe == "none"
    assert host.compile_problem("sm90", Target.trtllm_pytorch) == "needs an sm90 GPU host with tensorrt_llm (1.0 or later)"


@pytest.mark.parametrize("trtllm,target,problem", [
    ("1.3.0", Target.trtllm_engine, "(this host has tensorrt_llm 1.3.0)"),   # trtllm-build was removed after 1.2
    ("1.3.0", Target.trtllm_pytorch, None),
    ("0.16.0", Target.trtllm_engine, "(this host has tensorrt_llm 0.16.0)"),
    ("0.19.0", Target.trtllm_pytorch, "(this host has tensorrt_llm 0.19.0)"),  # no PyTorch backend before 1.0
])
def test_tensorrt_llm_version_ranges_per_target(trtllm, target, problem):
    host = Host(gpus=(HostGpu(0, "H100", "9.0"),), tensorrt="10.14.1", tensorrt_llm=trtllm)
    found = host.compile_problem("sm90", target)
    assert found == problem if problem is None else problem in found


def test_tensor_parallelism_needs_that_many_gpus_of_the_sm():
    host = Host(gpus=(HostGpu(0, "H100", "9.0"), HostGpu(1, "L40S", "8.9")), tensorrt="10.14.1", tensorrt_llm="1.2.0")
    assert host.compile_problem("sm90", Target.trtllm_engine, tp_size=2) == \
        "needs 2 sm90 GPUs for tp_size 2; this host has 1"


def test_plan_skips_gpu_stages_here_with_the_reason(tmp_path, kiln_home, test_model):
    recipe = write_recipe(tmp_path, str(test_model), FP8_ON_ADA_AND_HOPPER)
    result = run_kiln("plan", recipe, "--json", env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    stages = {(s["stage"], s["target"]): s["status"] for s in json.loads(result.stdout)["stages"]}
    for sm in ("sm89", "sm90"):
        for stage in ("compile", "engine-check", "publish"):
            assert stages[(stage, f"fp8@{sm}")] == f"skipped: needs an {sm} GPU host with tensorrt_llm (0.17 to 1.2)"
    assert stages[("publish", "fp8")] == "will run"   # the checkpoint is still published


def test_gpu_option_selects_one_sm(tmp_path, kiln_home, gpu_host):
    host = gpu_host(sms=("sm89", "sm90"))
    recipe = write_recipe(tmp_path, str(host.env["KILN_STANDIN_MODEL"]), FP8_ON_ADA_AND_HOPPER)
    result = run_kiln("plan", recipe, "--gpu", "H100", "--json", env=host.env)
    assert result.returncode == 0, result.stderr
    stages = {(s["stage"], s["target"]): s["status"] for s in json.loads(result.stdout)["stages"]}
    assert stages[("compile", "fp8@sm90")] == "will run"
    assert stages[("compile", "fp8@sm89")] == "skipped: not selected (--gpu sm90)"


@pytest.mark.parametrize("gpu,message", [
    ("sm100", "--gpu sm100: no variant of"),
    ("V100", "--gpu: unknown GPU 'V100'"),
])
def test_gpu_option_refuses_what_the_recipe_does_not_target(tmp_path, kiln_home, test_model, gpu, message):
    recipe = write_recipe(tmp_path, str(test_model), FP8_ON_ADA_AND_HOPPER)
    result = run_kiln("build", recipe, "--gpu", gpu)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (kiln_home / "cache" / "quantize").exists()


def test_doctor_reports_the_host_and_recipe_variants(tmp_path, kiln_home, gpu_host):
    host = gpu_host(sms=("sm90",), trtllm="1.3.0")
    recipe = write_recipe(tmp_path, str(host.env["KILN_STANDIN_MODEL"]), FP8_ON_ADA_AND_HOPPER)
    result = run_kiln("doctor", recipe, "--json", env=host.env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["host"]["gpus"][0]["sm"] == "sm90"
    assert document["host"]["tensorrt_llm"] == "1.3.0" and document["host"]["tensorrt"] == "10.14.1"
    can = {(t["target"], t["sm"]): t["can_build"] for t in document["targets"]}
    assert can == {("trtllm-engine", "sm90"): False, ("trtllm-pytorch", "sm90"): True}
    rows = {(r["variant"], r["sm"]): r for r in document["recipes"]}
    assert rows[("fp8", "sm89")]["reason"].startswith("needs an sm89 GPU host")
    assert "this host has tensorrt_llm 1.3.0" in rows[("fp8", "sm90")]["reason"]
    # The interpreters of llm-compressor and vLLM: kiln's own here, which has neither.
    assert {name: found["version"] for name, found in document["interpreters"].items()} == {
        "llm-compressor": "absent", "vLLM": "absent"}
    table = run_kiln("doctor", env=host.env)
    assert "NVIDIA H100 80GB HBM3" in table.stdout and "sm90" in table.stdout
    assert "not installed (set KILN_VLLM_PYTHON)" in table.stdout


@pytest.mark.parametrize("build,message", [
    ({"target": "trtllm-pytorch", "speculative": {"mode": "lookahead_decoding", "max_draft_len": 4}},
     "speculative applies to target trtllm-engine"),
    ({"target": "trtllm-pytorch", "cuda_graph_batch_sizes": [1, 16]}, "cuda_graph_batch_sizes [16] exceed max_batch_size"),
    ({"cuda_graph_batch_sizes": [1, 2]}, "cuda_graph_batch_sizes applies to target trtllm-pytorch"),
    ({"lora": {"target_modules": ["q_proj"]}}, "build.lora.target_modules"),
    ({"target": "tensorrt"}, "build.target"),
])
def test_build_section_errors_name_the_field(tmp_path, test_model, build, message):
    recipe = write_recipe(tmp_path, str(test_model), FP8_ON_ADA_AND_HOPPER, build=build)
    result = run_kiln("check", recipe)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_recipe_build_section_round_trips(tmp_path, test_model):
    from kiln.pipeline.recipe.loader import load_recipe

    build = {"target": "trtllm-pytorch", "kv_cache_reuse": True, "cuda_graph_batch_sizes": [1, 4],
             "lora": {"target_modules": ["attn_q", "attn_v"], "max_rank": 8}}
    loaded = load_recipe(write_recipe(tmp_path, str(test_model), FP8_ON_ADA_AND_HOPPER, build=build))
    assert loaded.recipe.build.target is Target.trtllm_pytorch
    assert loaded.recipe.build.lora.target_modules == ("attn_q", "attn_v")
    assert yaml.safe_load(loaded.path.read_text())["build"] == build
