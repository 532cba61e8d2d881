"""Real sizes without a GPU: the plan-time memory estimate, its refusal, and what kiln hands
transformers and accelerate for a given set of GPUs (contract tests: no GPU runs here)."""

from __future__ import annotations

import json

import pytest

from kiln.pipeline.plan.memory import ModelShape, estimate
from kiln.quantize import Placement, VisibleGpu, plan_placement
from kiln.quantize.formats import QuantFormat
from kiln.quantize.placement import HOST_RESERVE_BYTES
from tests.conftest import run_kiln, write_recipe
from tests.hub_cache import COMMIT, seed_hub_cache

GiB = 2**30

# config.json fields of two real models (values from their hub configs).
LLAMA_3_1_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
                "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
LLAMA_3_3_70B = {**LLAMA_3_1_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                 "num_attention_heads": 64}


def test_parameter_counts_match_the_published_models():
    assert ModelShape.from_config(LLAMA_3_1_8B).params == 8_030_261_248
    assert ModelShape.from_config(LLAMA_3_3_70B).params == 70_553_706_496


def test_estimate_per_stage_for_an_8b_model_on_cpu_and_on_gpus():
    cpu = estimate(LLAMA_3_1_8B, 2, [QuantFormat.fp8], 512, 512, host_total=256 * GiB, host_available=200 * GiB)
    weights = 8_030_261_248 * 2
    by_stage = {s.stage: s for s in cpu.stages}
    assert set(by_stage) == {"quantize (calibrate)", "quantize (export)", "validate"}
    assert all(s.gpu_bytes == 0 for s in cpu.stages)
    # Export holds the bf16 model, the FP8 state dict and its serialised copy: 2.1-2.3x the weights, as
    # bench/scale.py measured for ModelOpt's own calls (2.26x at 1.07B).
    assert 2.1 * weights < by_stage["quantize (export)"].host_bytes < 2.3 * weights
    # Validation holds one model, never two.
    assert weights < by_stage["validate"].host_bytes < 1.2 * weights
    assert cpu.peak.stage == "quantize (export)" and cpu.fits()

    # Two 80 GB GPUs at 0.8: the weights go there, the host keeps the runtime and the export state.
    gpus = estimate(LLAMA_3_1_8B, 2, [QuantFormat.fp8], 512, 512, 64 * GiB, 60 * GiB, (int(0.8 * 80 * GiB),) * 2)
    calibrate = next(s for s in gpus.stages if s.stage == "quantize (calibrate)")
    assert calibrate.gpu_bytes > weights and calibrate.host_bytes < 1 * GiB


def test_a_70b_model_that_cannot_fit_even_with_offload_is_refused():
    small_host = estimate(LLAMA_3_3_70B, 2, [QuantFormat.int4_awq], 512, 512, 24 * GiB, 20 * GiB)
    assert not small_host.fits()
    message = small_host.refusal("r.yaml")
    import re

    needed = float(re.match(r"r\.yaml: the model \(70\.55B parameters\) needs about ([0-9.]+) GB at its peak", message)[1])
    assert 1.5 * 141 < needed < 1.7 * 141   # bf16 weights, then twice the INT4 export state (4.25 bits a weight)
    assert "this host has 25.8 GB of memory and no GPU" in message and "(fix:" in message
    # Eight 80 GB GPUs take it, with the host holding what is offloaded.
    assert estimate(LLAMA_3_3_70B, 2, [QuantFormat.int4_awq], 512, 512, 24 * GiB, 20 * GiB,
                    (int(0.8 * 80 * GiB),) * 8).fits()


def test_check_and_build_refuse_a_model_this_host_cannot_hold(tmp_path, kiln_home):
    hf_home = tmp_path / "hf"
    seed_hub_cache(hf_home, "kiln-tests/llama-70b-shape", {"config.json": json.dumps(LLAMA_3_3_70B).encode()})
    recipe = write_recipe(tmp_path, "hf://kiln-tests/llama-70b-shape", model={"revision": COMMIT})
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    for command in ("check", "build"):
        result = run_kiln(command, recipe, env=env)
        assert result.returncode == 2, (command, result.stderr)
        line = next(l for l in result.stderr.splitlines() if "70.55B parameters" in l)
        assert "GB at its peak (quantize (export):" in line and "of memory and no GPU" in line, line
        assert "Traceback" not in result.stderr
    assert not (kiln_home / "cache" / "quantize").exists()

    plan = run_kiln("plan", recipe, "--json", env=env)
    assert plan.returncode == 0, plan.stderr
    memory = json.loads(plan.stdout)["memory"]
    assert memory["params"] == 70_553_706_496 and memory["fits"] is False
    assert [s["stage"] for s in memory["stages"]] == ["quantize (calibrate)", "quantize (export)", "validate"]


def test_plan_and_doctor_print_the_estimate_for_a_local_model(tmp_path, test_model, kiln_home):
    recipe = write_recipe(tmp_path, str(test_model))
    plan = run_kiln("plan", recipe)
    assert plan.returncode == 0, plan.stderr
    assert "estimated peak memory" in plan.stdout and "fits:" in plan.stdout
    doctor = run_kiln("doctor", recipe, "--json")
    assert doctor.returncode == 0, doctor.stderr
    memory = json.loads(doctor.stdout)["memory"][str(recipe)]
    params = ModelShape.from_config(json.loads((test_model / "config.json").read_text())).params
    assert memory["params"] == params and memory["fits"] is True


# -- placement: what transformers and accelerate get, for GPUs that are not here --

H100 = 85_520_809_984   # bytes torch reports for an H100 80GB HBM3


def test_cpu_placement_hands_transformers_nothing():
    for device, gpus in (("cpu", [VisibleGpu(0, "NVIDIA H100 80GB HBM3", H100)]), ("auto", [])):
        placement = plan_placement(device, gpus, 0.8, 64 * GiB)
        assert placement == Placement("cpu")
        assert placement.load_kwargs() == {} and placement.dispatch_kwargs() == {}
        assert placement.record() == {"device": "cpu", "gpus": [], "offload": "none"}


def test_auto_takes_every_visible_gpu_with_caps_and_cpu_offload():
    gpus = [VisibleGpu(0, "NVIDIA H100 80GB HBM3", H100), VisibleGpu(1, "NVIDIA H100 80GB HBM3", H100)]
    placement = plan_placement("auto", gpus, 0.8, 512 * GiB)
    assert placement.device == "cuda"
    assert placement.load_kwargs() == {
        "device_map": "auto",
        "max_memory": {0: int(H100 * 0.8), 1: int(H100 * 0.8), "cpu": 512 * GiB - HOST_RESERVE_BYTES},
    }
    assert placement.dispatch_kwargs() == {"max_memory": placement.load_kwargs()["max_memory"]}
    assert placement.record() == {"device": "cuda", "gpus": ["NVIDIA H100 80GB HBM3"] * 2, "offload": "none"}
    # The caps follow the recipe's fraction, per GPU, whatever their sizes.
    mixed = plan_placement("cuda", [VisibleGpu(0, "A", 40 * GiB), VisibleGpu(1, "B", 80 * GiB)], 0.5, 8 * GiB)
    assert mixed.max_memory == {0: 20 * GiB, 1: 40 * GiB, "cpu": 6 * GiB}


def test_cuda_without_a_gpu_is_an_input_error_naming_the_fix():
    with pytest.raises(ValueError, match=r"calibration.device is cuda, but torch sees no CUDA GPU.*\(fix: set calibration.device: auto or cpu"):
        plan_placement("cuda", [], 0.8, 64 * GiB)


@pytest.mark.slow   # a build that loads the model before it refuses the device (10-20 s; make test-fast keeps its 3 minutes)
def test_build_with_device_cuda_on_a_cpu_host_exits_2(tmp_path, test_model, kiln_home):
    recipe = write_recipe(tmp_path, str(test_model))
    text = recipe.read_text().replace("calibration:\n", "calibration:\n  device: cuda\n")
    recipe.write_text(text)
    result = run_kiln("build", recipe)
    assert result.returncode == 2, result.stderr
    assert "calibration.device is cuda, but torch sees no CUDA GPU" in result.stderr
    assert not list((kiln_home / "cache").glob("quantize/*/kiln.json"))


def test_where_calibration_runs_is_not_part_of_the_stage_keys(tmp_path, test_model, kiln_home):
    """The device and the GPU-memory share say where the same computation runs, not what it computes;
    the device used is recorded in kiln.json instead (see the quantize stage)."""
    keys = []
    for device, fraction in (("auto", 0.8), ("cpu", 0.8), ("cuda", 0.5)):
        recipe = write_recipe(tmp_path, str(test_model), name=f"k{len(keys)}")
        recipe.write_text(recipe.read_text().replace(
            "calibration:\n", f"calibration:\n  device: {device}\n  gpu_memory_fraction: {fraction}\n"))
        plan = run_kiln("plan", recipe, "--json")
        assert plan.returncode == 0, plan.stderr
        keys.append({(s["stage"], s["target"]): s["key"] for s in json.loads(plan.stdout)["stages"]
                     if s["stage"] in ("quantize", "validate")})
    assert keys[0] == keys[1] == keys[2]
