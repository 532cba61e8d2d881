"""Contract tests of the whole GPU path on stand-ins: compile, engine check, per-SM publish, pull by SM.

The stand-ins (tests/conftest.py GpuHost) make this CPU machine look like a host with the given
GPUs and TensorRT-LLM; everything after `trtllm-build` runs for real: engine.json, the engine
check's metrics and gates, manifests, the MLflow registry, pull. They prove kiln's side only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from pathlib import Path

from kiln.registry.manifest import verify_tree
from tests.conftest import HUNG_S, KILN, GpuHost, run_kiln, seed_home, write_recipe

pytestmark = pytest.mark.slow

GATES = {"max_ppl_increase_pct": 5, "max_kl": 0.05, "min_top1_agreement": 0.8}
VARIANTS = {"fp8": {"quant": "fp8", "kv_cache": "fp8", "gpus": ["sm89", "sm90"], "gates": GATES}}


@pytest.fixture(scope="module")
def world(tmp_path_factory, test_model, spine_cache):
    """A kiln home whose quantize and validate entries are already built (on this CPU host): the session's spine
    cache holds them, and a CPU host's build of this recipe confirms it (it runs nothing but publish)."""
    root = tmp_path_factory.mktemp("compile")
    home = seed_home(root / "kiln-home", spine_cache)
    recipe = write_recipe(root, str(test_model), VARIANTS, name="t", publish={"aliases": ["candidate"]})
    warm = run_kiln("build", recipe, "--json", env={"KILN_HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert warm.returncode == 0, warm.stderr
    assert json.loads(warm.stdout)["ran"] == ["publish:fp8"]
    return {"root": root, "home": home, "recipe": recipe, "model": test_model}


def host_env(world, name: str, sms=("sm89", "sm90"), tensorrt="10.14.1", home: Path | None = None,
             foreign_python: bool = False, **extra) -> tuple[GpuHost, dict]:
    """A stand-in GPU host with a registry of its own and a kiln home holding only the CPU stages' entries."""
    host = GpuHost(world["root"] / name, sms, tensorrt=tensorrt, model=world["model"], foreign_python=foreign_python)
    registry = world["root"] / name / "mlflow.db"
    if home is None:
        home = world["root"] / name / "kiln-home"
        for stage in ("fetch", "quantize", "validate"):
            if (world["home"] / "cache" / stage).is_dir():
                shutil.copytree(world["home"] / "cache" / stage, home / "cache" / stage, copy_function=os.link)
    return host, {**host.env, "KILN_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{registry}", **extra}


def listed(env) -> dict:
    rows = json.loads(run_kiln("ls", "--json", env=env).stdout)
    return {(r["name"], r["version"]): r for r in rows}


def test_gpu_host_builds_checks_and_publishes_each_sm(world, tmp_path):
    host, env = host_env(world, "both")
    built = run_kiln("build", world["recipe"], "--json", env=env)
    assert built.returncode == 0, built.stderr
    variant = json.loads(built.stdout)["variants"][0]
    engines = {e["sm"]: e for e in variant["engines"]}
    assert set(engines) == {"sm89", "sm90"}
    for engine in engines.values():
        assert engine["status"] == "built" and engine["gate"]["passed"] and engine["published"]
        # The stand-in engine runs the exported checkpoint through the reference runtime: same numbers.
        assert engine["metrics"]["mean_kl"] == pytest.approx(variant["metrics"]["mean_kl"], rel=1e-6)
        assert engine["metrics"]["tokens"] == variant["metrics"]["tokens"]

    calls = host.calls("trtllm-build")
    assert [c["cuda_visible_devices"] for c in calls] == ["0", "1"]   # each SM's build sees only its GPU
    assert len(host.calls("ModelRunnerCpp.from_dir")) == 2
    assert listed(env)[("t-fp8", "1")]["sms"] == ["sm89", "sm90"]

    out = tmp_path / "pulled"
    pulled = run_kiln("pull", "t-fp8@candidate", "--out", out, "--gpu", "sm90", "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["sm"] == "sm90"
    assert sorted(p.name for p in (out / "engines").iterdir()) == ["sm90"]
    assert verify_tree(out, scope="engines/sm90")["files"]
    record = json.loads((out / "engines" / "sm90" / "engine.json").read_text())
    assert record["sm"] == "sm90" and record["gpu"] == "NVIDIA H100 80GB HBM3" and record["target"] == "trtllm-engine"
    assert (record["tensorrt"], record["tensorrt_llm"]) == ("10.14.1", "1.2.0")
    assert record["command"][1:] == calls[1]["argv"] and record["build_seconds"] >= 0
    # TensorRT-LLM's own from_hugging_face (the stand-in's Llama row) agreed on every field first.
    assert record["trtllm_config_checked"]["rotary_base"] == 500000.0
    assert record["trtllm_config_checked"]["rotary_scaling"]["rope_type"] == "llama3"
    assert record["trtllm_config_checked"]["head_size"] == 64 and record["trtllm_config_checked"]["attn_bias"] is False
    trtllm_files = {f"trtllm/{p.name}" for p in (out / "trtllm").iterdir()}
    assert set(record["inputs"]) == trtllm_files
    report = json.loads((out / "engines" / "sm90" / "validation.json").read_text())
    assert report["mean_kl"] == engines["sm90"]["metrics"]["mean_kl"]
    assert (out / "engines" / "sm90" / "rank0.engine").is_file() and (out / "hf" / "tokenizer.json").is_file()

    # Each SM's engine-check metrics and build seconds are on the version's run, for MLflow's charts.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    run = mlflow.get_run(mlflow.get_model_version("t-fp8", "1").run_id).data.metrics
    for sm in ("sm89", "sm90"):
        assert run[f"{sm}/mean_kl"] == pytest.approx(engines[sm]["metrics"]["mean_kl"])
        assert run[f"{sm}/build_seconds"] >= 0
    assert run["sm90/build_seconds"] == record["build_seconds"]

    again = run_kiln("build", world["recipe"], "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["ran"] == []
    assert len(host.calls("trtllm-build")) == 2 and list(listed(env)) == [("t-fp8", "1")]


@pytest.fixture(scope="module")
def sm90_host(world) -> dict:
    """An sm90 host's environment after it built and published t-fp8 with sm90 engines."""
    _, env = host_env(world, "sm90-only", sms=("sm90",))
    built = run_kiln("build", world["recipe"], "--gpu", "sm90", env=env)
    assert built.returncode == 0, built.stderr
    return env


def test_pull_refuses_a_missing_sm_and_a_tensorrt_mismatch(world, sm90_host, tmp_path):
    env = sm90_host
    missing = run_kiln("pull", "t-fp8@candidate", "--out", tmp_path / "a", "--gpu", "sm89", env=env)
    assert missing.returncode == 2
    assert "t-fp8/1 has no engines for sm89; it holds sm90" in missing.stderr
    _, other_trt = host_env(world, "refusals-old-trt", sms=("sm90",), tensorrt="10.9.0", home=Path(env["KILN_HOME"]))
    other_trt["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    mismatch = run_kiln("pull", "t-fp8@candidate", "--out", tmp_path / "b", env=other_trt)  # default: this host's SM
    assert mismatch.returncode == 2
    assert "built with TensorRT 10.14.1, but this host has TensorRT 10.9.0" in mismatch.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    checkpoint_only = run_kiln("pull", "t-fp8@candidate", "--out", tmp_path / "c", "--gpu", "none", env=other_trt)
    assert checkpoint_only.returncode == 0 and not (tmp_path / "c" / "engines").exists()


def test_gpu_option_builds_one_sm_and_a_second_run_adds_the_other(world):
    _, env = host_env(world, "one-by-one")
    first = run_kiln("build", world["recipe"], "--gpu", "sm90", "--json", env=env)
    assert first.returncode == 0, first.stderr
    engines = {e["sm"]: e for e in json.loads(first.stdout)["variants"][0]["engines"]}
    assert engines["sm89"]["status"] == "skipped: not selected (--gpu sm90)" and not engines["sm89"]["published"]
    assert engines["sm90"]["published"]
    assert listed(env)[("t-fp8", "1")]["sms"] == ["sm90"]
    second = run_kiln("build", world["recipe"], "--gpu", "sm89", env=env)
    assert second.returncode == 0, second.stderr
    assert list(listed(env)) == [("t-fp8", "1")] and listed(env)[("t-fp8", "1")]["sms"] == ["sm89", "sm90"]


def test_an_engine_failing_its_gate_is_not_published(world):
    _, env = host_env(world, "noisy", KILN_STANDIN_LOGIT_NOISE="4.0")
    result = run_kiln("build", world["recipe"], "--json", env=env)
    assert result.returncode == 3, result.stderr
    engines = json.loads(result.stdout)["variants"][0]["engines"]
    assert all(not e["gate"]["passed"] and not e["published"] for e in engines)
    assert any("max_kl" in f for f in engines[0]["gate"]["failures"])
    assert listed(env)[("t-fp8", "1")]["sms"] == []   # the checkpoint itself passed and is published


def test_a_failed_trtllm_build_names_its_log_and_publishes_nothing_for_it(world):
    _, env = host_env(world, "broken", sms=("sm90",), KILN_STANDIN_BUILD_FAIL="1")
    result = run_kiln("build", world["recipe"], "--gpu", "sm90", env=env)
    assert result.returncode == 1
    assert "trtllm-build for sm90 exited 1" in result.stderr and "stand-in asked to fail" in result.stderr
    assert "build.log" in result.stderr and "Traceback" not in result.stderr


def test_pytorch_target_publishes_llm_api_options_per_sm(world, tmp_path):
    recipe = write_recipe(tmp_path, str(world["model"]), VARIANTS, name="t",
                          build={"target": "trtllm-pytorch", "kv_cache_reuse": True})
    host, env = host_env(world, "pytorch", sms=("sm90",))
    built = run_kiln("build", recipe, "--json", env=env)
    assert built.returncode == 0, built.stderr
    out = tmp_path / "pulled"
    assert run_kiln("pull", "t-fp8/1", "--out", out, "--gpu", "sm90", env=env).returncode == 0
    import yaml

    options = yaml.safe_load((out / "engines" / "sm90" / "llm_api_options.yaml").read_text())
    assert options["kv_cache_config"] == {"dtype": "fp8", "enable_block_reuse": True, "free_gpu_memory_fraction": 0.9}
    (llm_call,) = host.calls("LLM")
    assert llm_call["kwargs"] == options and llm_call["model"].endswith("/hf")
    record = json.loads((out / "engines" / "sm90" / "engine.json").read_text())
    assert record["command"] == ["trtllm-serve", "hf", "--backend", "pytorch", "--extra_llm_api_options",
                                 "engines/sm90/llm_api_options.yaml"]
    assert record["tensorrt"] is None and not list((out / "engines" / "sm90").glob("*.engine"))

    repo = tmp_path / "repo"
    made = run_kiln("triton-repo", "t-fp8/1", "--runtime", "gpu", "--gpu", "sm90", "--templates", TEMPLATES,
                    "--out", repo, env=env)
    assert made.returncode == 0, made.stderr
    model_yaml = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert {k: model_yaml[k] for k in options} == options   # the published options, unchanged
    assert model_yaml["model"] == str(repo / "artifact" / "hf") and model_yaml["backend"] == "pytorch"


def test_two_concurrent_publishers_of_different_sms_end_in_one_version(world):
    """Two CI runners (an sm89 host and an sm90 host) publish the same variant at once to a new registry."""
    _, env89 = host_env(world, "race-89", sms=("sm89",))
    _, env90 = host_env(world, "race-90", sms=("sm90",))   # separate hosts: separate caches, one registry
    env90["MLFLOW_TRACKING_URI"] = env89["MLFLOW_TRACKING_URI"]
    runners = [subprocess.Popen([str(KILN), "build", str(world["recipe"]), "--gpu", sm], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for sm, env in (("sm89", env89), ("sm90", env90))]
    for runner in runners:
        _, stderr = runner.communicate(timeout=HUNG_S)
        assert runner.returncode == 0, stderr
    versions = listed(env89)
    assert list(versions) == [("t-fp8", "1")], versions   # one version, and the lowest number (see _converge)
    assert versions[("t-fp8", "1")]["sms"] == ["sm89", "sm90"]


def test_tensorrt_llm_in_another_python(world):
    """kiln's environment has no tensorrt_llm; KILN_TRTLLM_PYTHON has it (as in NVIDIA's container)."""
    host, env = host_env(world, "foreign", sms=("sm90",), foreign_python=True)
    doctor = json.loads(run_kiln("doctor", "--json", env=env).stdout)
    assert doctor["host"]["tensorrt_llm"] == "1.2.0"
    assert any("KILN_TRTLLM_PYTHON" in note for note in doctor["host"]["notes"])
    built = run_kiln("build", world["recipe"], "--gpu", "sm90", "--json", env=env)
    assert built.returncode == 0, built.stderr
    engines = {e["sm"]: e for e in json.loads(built.stdout)["variants"][0]["engines"]}
    assert engines["sm90"]["published"] and engines["sm90"]["gate"]["passed"]
    assert len(host.calls("ModelRunnerCpp.from_dir")) == 1   # the engine check ran in the other Python
    assert len(host.calls("trtllm-python")) >= 3             # doctor's and build's version probes, the check


def _alter_quantize_entry(home: Path) -> None:
    """Make this host's checkpoint differ from the published one, as another CPU's rounding might."""
    from kiln.pipeline.plan.cache import ENTRY_FILE
    from kiln.common.digest import file_sha256

    (entry,) = [e for e in (home / "cache" / "quantize").iterdir()   # the fp8 checkpoint (the spine also has int4)
                if json.loads((e / "kiln.json").read_text())["quant"] == "fp8"]
    config = entry / "trtllm" / "config.json"
    altered = json.loads(config.read_text()) | {"kiln_test_marker": 1}
    fresh = config.with_suffix(".new")
    fresh.write_text(json.dumps(altered))
    os.replace(fresh, config)  # a new inode: the world's hard-linked copy stays as it was
    record = json.loads((entry / ENTRY_FILE).read_text())
    record["files"]["trtllm/config.json"] = {"size": config.stat().st_size, "sha256": file_sha256(config)}
    (entry / ENTRY_FILE).unlink()
    (entry / ENTRY_FILE).write_text(json.dumps(record))


def test_an_sm_is_built_from_the_registry_checkpoint_when_this_host_quantized_differently(world, tmp_path):
    _, env89 = host_env(world, "first-runner", sms=("sm89",))
    assert run_kiln("build", world["recipe"], "--gpu", "sm89", env=env89).returncode == 0
    _, env90 = host_env(world, "second-runner", sms=("sm90",))
    env90["MLFLOW_TRACKING_URI"] = env89["MLFLOW_TRACKING_URI"]
    _alter_quantize_entry(Path(env90["KILN_HOME"]))
    result = run_kiln("build", world["recipe"], "--gpu", "sm90", env=env90)
    assert result.returncode == 0, result.stderr
    assert "t-fp8/1 already holds this checkpoint" in result.stderr
    assert "building sm90 from the checkpoint in the registry instead" in result.stderr
    assert list(listed(env89)) == [("t-fp8", "1")] and listed(env89)[("t-fp8", "1")]["sms"] == ["sm89", "sm90"]
    out = tmp_path / "pulled"
    assert run_kiln("pull", "t-fp8/1", "--out", out, "--gpu", "sm90", env=env90).returncode == 0
    from kiln.common.digest import file_sha256

    record = json.loads((out / "engines" / "sm90" / "engine.json").read_text())
    assert record["inputs"]["trtllm/config.json"] == file_sha256(out / "trtllm" / "config.json")
    assert "kiln_test_marker" not in (out / "trtllm" / "config.json").read_text()


TEMPLATES = Path(__file__).parent / "fixtures" / "trtllm_templates"


def test_triton_repo_for_engines_and_serve_refuses_engines_this_host_cannot_run(world, sm90_host, tmp_path):
    from kiln.serve.pbtxt import read_config

    env = sm90_host
    out = tmp_path / "repo"
    made = run_kiln("triton-repo", "t-fp8@candidate", "--runtime", "gpu", "--templates", TEMPLATES, "--out", out,
                    "--decoupled", "--json", env=env)   # --gpu defaults to this host's SM
    assert made.returncode == 0, made.stderr
    answer = json.loads(made.stdout)
    assert (answer["sm"], answer["entry_model"], answer["world_size"]) == ("sm90", "ensemble", 1)
    engine_dir = out / "artifact" / "engines" / "sm90"
    assert (engine_dir / "rank0.engine").is_file() and verify_tree(out / "artifact", scope="engines/sm90")["files"]
    engine_config = json.loads((engine_dir / "config.json").read_text())
    trtllm = read_config(out / "tensorrt_llm" / "config.pbtxt")
    assert trtllm.max_batch_size == engine_config["build_config"]["max_batch_size"]
    assert trtllm.parameters["gpt_model_path"].string_value == str(engine_dir)
    assert trtllm.parameters["enable_kv_cache_reuse"].string_value == "false"   # the recipe's default
    assert read_config(out / "preprocessing" / "config.pbtxt").parameters["tokenizer_dir"].string_value == \
        str(out / "artifact" / "hf")
    assert answer["container_command"].startswith("docker run --rm --gpus all")
    text = run_kiln("triton-repo", "t-fp8@candidate", "--runtime", "gpu", "--templates", TEMPLATES,
                    "--out", tmp_path / "again", env=env)
    assert "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3 mpirun --allow-run-as-root -n 1" in text.stdout
    assert "whose TensorRT-LLM is 1.2.0" in text.stdout

    refused = {
        "no templates": run_kiln("triton-repo", "t-fp8@candidate", "--runtime", "gpu", "--out", tmp_path / "a",
                                 env={**env, "KILN_TRTLLM_TEMPLATES": ""}),
        "no sm89 engines": run_kiln("triton-repo", "t-fp8@candidate", "--runtime", "gpu", "--gpu", "L4",
                                    "--templates", TEMPLATES, "--out", tmp_path / "b", env=env),
    }
    assert refused["no templates"].returncode == 2 and "--branch v1.2.0" in refused["no templates"].stderr
    assert refused["no sm89 engines"].returncode == 2
    assert "t-fp8/1 has no engines for sm89; it holds sm90" in refused["no sm89 engines"].stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    registry = {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"], "KILN_HOME": env["KILN_HOME"]}
    serve = ("serve", "t-fp8@candidate", "--runtime", "gpu", "--templates", TEMPLATES, "--http-port", "0")
    _, l4_host = host_env(world, "serve-l4", sms=("sm89",), **registry)
    _, old_trt = host_env(world, "serve-old-trt", sms=("sm90",), tensorrt="10.9.0", **registry)
    _, same = host_env(world, "serve-same", sms=("sm90",), **registry)
    other_sm, other_trt = run_kiln(*serve, env=l4_host), run_kiln(*serve, env=old_trt)
    assert other_sm.returncode == 2 and "has no engines for sm89; it holds sm90" in other_sm.stderr
    assert other_trt.returncode == 2 and "built with TensorRT 10.14.1, but this host has TensorRT 10.9.0" in \
        other_trt.stderr
    no_server = run_kiln(*serve, env={**same, "KILN_TRITONSERVER": str(tmp_path / "none")})
    assert no_server.returncode == 1 and "no tritonserver at" in no_server.stderr
    assert "download" not in no_server.stderr   # refused before any engine was fetched
    no_gpu = run_kiln(*serve, env={**registry, "PATH": "/usr/bin:/bin"})
    assert no_gpu.returncode == 2 and "this host has no NVIDIA GPU" in no_gpu.stderr
    scratch = Path(env["KILN_HOME"]) / "tmp"
    assert not scratch.exists() or not list(scratch.iterdir())   # no repository left behind


def test_an_offloaded_build_gets_its_tensorrt_llm_checkpoint_from_tensorrt_llm_on_the_compile_host(world, tmp_path):
    """calibration.offload: disk exports hf/ only (ModelOpt's TensorRT-LLM exporter assembles the whole state dict).
    For trtllm-engine, the compile host hands hf/ to TensorRT-LLM's own converter, as its LLM API loads a
    pre-quantized checkpoint (in KILN_TRTLLM_PYTHON, with transformers 4's RoPE keys), then builds from what it
    wrote; the engine records hf/ as its inputs and the converter's command."""
    import yaml

    recipe = write_recipe(tmp_path, str(world["model"]), {"fp8": {**VARIANTS["fp8"], "gpus": ["sm90"]}}, name="off")
    text = yaml.safe_load(recipe.read_text())
    text["calibration"].update({"offload": "disk", "max_host_memory": "2MiB"})
    recipe.write_text(json.dumps(text))
    host, env = host_env(world, "offloaded", sms=("sm90",), home=tmp_path / "home", foreign_python=True)
    built = run_kiln("build", recipe, "--json", env=env)
    assert built.returncode == 0, built.stderr
    [variant] = json.loads(built.stdout)["variants"]
    [engine] = variant["engines"]
    assert engine["status"] == "built" and engine["published"]
    # The stand-in engine runs the HF export through the reference runtime: the validated numbers.
    assert engine["metrics"]["mean_kl"] == pytest.approx(variant["metrics"]["mean_kl"], rel=1e-6)

    [convert] = host.calls("from_hugging_face")
    assert convert["dtype"] == "bfloat16" and convert["kwargs"] == {"load_model_on_cpu": True}
    assert convert["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1, "rank": 0}
    assert convert["quant_config"]["quant_algo"] == "FP8" and convert["quant_config"]["kv_cache_quant_algo"] == "FP8"
    assert convert["config_json"]["rope_theta"] == 500000.0   # transformers 4's key, beside rope_parameters
    [build] = host.calls("trtllm-build")
    converted = build["argv"][build["argv"].index("--checkpoint_dir") + 1]
    assert "kiln-trtllm-convert-" in converted and not Path(converted).exists()   # scratch, gone with the stage

    out = tmp_path / "pulled"
    assert run_kiln("pull", "off-fp8/1", "--out", out, "--gpu", "sm90", env=env).returncode == 0
    assert not (out / "trtllm").exists() and (out / "engines" / "sm90" / "rank0.engine").is_file()
    record = json.loads((out / "engines" / "sm90" / "engine.json").read_text())
    assert set(record["inputs"]) == {f"hf/{p.name}" for p in (out / "hf").iterdir()}
    assert record["converted_by"][1:3] == ["-m", "kiln.compile.trtllm_convert"]
    assert record["converted_by"][-2:] == ["bfloat16", "1"] and record["command"][1:] == build["argv"]
    assert record["trtllm_config_checked"]["rotary_base"] == 500000.0
