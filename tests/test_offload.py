"""calibration.offload: disk: what kiln hands accelerate, the recipes it refuses, and a build whose layers are read
from disk that measures what the in-memory build measures, leaves no offload folder, and is cleaned up after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from kiln.quantize.placement import HOST_RESERVE_BYTES, Placement, VisibleGpu, offload_device_map, plan_placement
from tests.conftest import SPINE_VARIANTS, run_kiln, write_recipe
from tests.recipes import KILN

GIB = 1 << 30
H100 = VisibleGpu(0, "NVIDIA H100 80GB HBM3", 80 * GIB)
L40S = VisibleGpu(1, "NVIDIA L40S", 48 * GIB)


def test_the_placement_kiln_hands_accelerate():
    # A GPU host: each GPU at its fraction, then host memory at the recipe's cap, then disk.
    disk = plan_placement("auto", [H100, L40S], 0.5, 64 * GIB, "disk", 6 * GIB)
    assert disk == Placement("cuda", (H100, L40S), {0: 40 * GIB, 1: 24 * GIB, "cpu": 6 * GIB}, "disk")
    assert disk.load_kwargs({"model.layers.0": 0}, "/x") == {"device_map": {"model.layers.0": 0}, "offload_folder": "/x"}
    # Without a cap, host memory less the reserve.
    assert plan_placement("auto", [H100], 0.8, 64 * GIB, "disk").max_memory["cpu"] == 64 * GIB - HOST_RESERVE_BYTES
    # CPU offload on a GPU host is today's placement: accelerate's auto map over the caps.
    cpu = plan_placement("auto", [H100], 0.8, 64 * GIB, "cpu")
    assert cpu.load_kwargs() == {"device_map": "auto", "max_memory": {0: int(80 * GIB * 0.8), "cpu": 62 * GIB}}
    # A CPU-only host: host memory, then disk; `cpu` and `none` have nothing to offload to.
    assert plan_placement("auto", [], 0.8, 24 * GIB, "disk", GIB) == Placement("cpu", (), {"cpu": GIB}, "disk")
    assert plan_placement("auto", [], 0.8, 24 * GIB, "cpu") == Placement("cpu")
    assert plan_placement("cpu", [H100], 0.8, 24 * GIB, "none").load_kwargs() == {}


def test_the_device_map_on_a_cpu_host_fills_the_host_budget_then_disk():
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4)
    with init_empty_weights():
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    layer = 2 * (4 * 256 * 256 + 3 * 256 * 1024 + 2 * 256)   # bf16 bytes of one decoder layer
    embedding = 2 * 4096 * 256
    # accelerate keeps room for the largest layer it offloads: the budget holds the embedding and two layers.
    budget = embedding + 3 * layer + 4096
    device_map = offload_device_map(model, plan_placement("auto", [], 0.8, 24 * GIB, "disk", budget))
    assert device_map["model.embed_tokens"] == "cpu"
    assert [device_map[f"model.layers.{i}"] for i in range(6)] == ["cpu", "cpu"] + ["disk"] * 4
    assert device_map["lm_head"] == "disk"
    # A budget smaller than the embedding: it stays in host memory all the same (model.device, where ModelOpt's
    # export sends its dummy input, is the embedding's device), everything else goes to disk.
    # (accelerate maps the whole model to "" then: kiln splits it along the embedding's ancestors).
    device_map = offload_device_map(model, plan_placement("auto", [], 0.8, 24 * GIB, "disk", embedding // 2))

    def where(name):
        return device_map[max((k for k in device_map if k == name or name.startswith(k + ".")), key=len)]

    assert where("model.embed_tokens") == "cpu"
    assert {where(f"model.layers.{i}") for i in range(6)} == {where("lm_head")} == {where("model.norm")} == {"disk"}


@pytest.mark.parametrize("calibration, variants, build, message", [
    ({"offload": "disk"}, {"awq": {"quant": "int4_awq", "backend": "llmcompressor"}}, {"target": "trtllm-pytorch"},
     "variants.awq: backend llmcompressor does not run under calibration.offload: disk (fix: offload: none, or a "
     "ModelOpt format)"),
    ({"max_host_memory": "6GiB"}, {"fp8": {"quant": "fp8"}}, {},
     "max_host_memory caps the weights in host memory under offload: disk, but offload is none (fix: set offload: "
     "disk, or remove max_host_memory)"),
    ({"offload": "tape"}, {"fp8": {"quant": "fp8"}}, {}, "calibration.offload"),
    ({"offload": "disk", "max_host_memory": "six"}, {"fp8": {"quant": "fp8"}}, {"target": "trtllm-pytorch"},
     "calibration.max_host_memory"),
])
def test_recipes_offload_cannot_build_are_refused(tmp_path, calibration, variants, build, message):
    recipe = write_recipe(tmp_path, "/nonexistent/model", variants, **({"build": build} if build else {}))
    text = json.loads(json.dumps(__import__("yaml").safe_load(recipe.read_text())))
    text["calibration"].update(calibration)
    recipe.write_text(json.dumps(text))
    result = run_kiln("check", recipe)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _offload_recipe(tmp_path, test_model, budget: str, name: str = "spine"):
    recipe = write_recipe(tmp_path, str(test_model), SPINE_VARIANTS, name=name, build={"target": "trtllm-pytorch"})
    text = __import__("yaml").safe_load(recipe.read_text())
    text["calibration"].update({"offload": "disk", "max_host_memory": budget})
    recipe.write_text(json.dumps(text))
    return recipe


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, "6GiB"])
def test_offload_disk_builds_on_its_default_budget_and_the_readmes(tmp_path, test_model, budget):
    """Issue 36.5: on 9edec45 every model that fit the host budget crashed (`'LlamaForCausalLM' object has no
    attribute 'hf_device_map'`): with the default budget (available memory less 2 GiB) and the README's 6GiB, both
    larger than the demo model. It builds, nothing is read from disk, and the log says so."""
    recipe = write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8"}}, name="fits", samples=4, seq_len=32,
                          build={"target": "trtllm-pytorch"})
    text = __import__("yaml").safe_load(recipe.read_text())
    text["calibration"].update({"offload": "disk", **({"max_host_memory": budget} if budget else {})})
    recipe.write_text(json.dumps(text))
    home = tmp_path / "home"
    result = run_kiln("build", recipe, "--json", env={"KILN_HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "disk offload: the model fits the host budget" in result.stderr and "nothing is read from disk" in \
        result.stderr
    [checkpoint] = (home / "cache" / "quantize").iterdir()
    placement = json.loads((checkpoint / "kiln.json").read_text())["placement"]
    assert placement["offload"] == "disk" and placement["on_disk"] == []
    [variant] = json.loads(result.stdout)["variants"]
    assert 0 < variant["metrics"]["mean_kl"] < 0.05


@pytest.mark.slow
def test_a_build_from_disk_measures_what_the_in_memory_build_measured(tmp_path, test_model, spine_cache):
    """The demo model's spine variants (FP8 + FP8-KV, INT4-AWQ) with a 2 MiB host budget: all but the embedding's
    neighbours are read from disk while ModelOpt calibrates, AWQ's rewritten layers go back to the offload folder
    and its scales are folded a layer at a time, ModelOpt's streaming writer exports, validation runs one layer at
    a time. The quantize key does not hold the offload (a placement, like calibration.device: same values), so the
    in-memory build of the same variants (the shared spine cache) sits under the same keys to compare with."""
    from safetensors.torch import load_file

    import torch

    home = tmp_path / "home"
    env = {"KILN_HOME": str(home)}
    result = run_kiln("build", _offload_recipe(tmp_path, test_model, "2MiB"), "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert "disk offload: 5 of 8 modules read from disk as they run (host budget 2 MiB)" in result.stderr
    assert "evaluate fp8 (layer by layer)" in result.stderr and "evaluate int4-awq (layer by layer)" in result.stderr
    assert "int4_awq: pre-quant scales folded a decoder layer at a time" in result.stderr
    metrics = {v["variant"]: v["metrics"] for v in json.loads(result.stdout)["variants"]}
    assert sorted(metrics) == sorted(SPINE_VARIANTS)
    for entry in (home / "cache" / "validate").iterdir():
        in_memory = json.loads((spine_cache / "validate" / entry.name / "report.json").read_text())
        mine = json.loads((entry / "report.json").read_text())
        for field in ("baseline_ppl", "quantized_ppl", "mean_kl", "top1_agreement", "ppl_increase_pct"):
            assert abs(mine[field] - in_memory[field]) <= 1e-4 * abs(in_memory[field]), (entry.name, field)
        assert any(mine["quantized_ppl"] == m["quantized_ppl"] for m in metrics.values())
    checkpoints = list((home / "cache" / "quantize").iterdir())
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        record = json.loads((checkpoint / "kiln.json").read_text())
        assert record["placement"]["offload"] == "disk" and len(record["placement"]["on_disk"]) == 5
        assert record["trtllm_checkpoint"] is False and not (checkpoint / "trtllm").exists()
        # AWQ rewrote the 4 offloaded layers (calibration, then the scale folding): they went to disk, not memory.
        rewrote = record["quant"] == "int4_awq"
        assert (record["placement"]["written_back_bytes"] > 0) == rewrote, record["placement"]
        # The same quantized bytes as the in-memory export, tensor by tensor.
        mine, theirs = (load_file(c / "hf" / "model.safetensors")
                        for c in (checkpoint, spine_cache / "quantize" / checkpoint.name))
        assert mine.keys() == theirs.keys()
        assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine), record["quant"]
        if rewrote:   # AWQ's pre-quant scales of q/k/v and gate/up went into the norms, as in memory
            assert not any(k.endswith("q_proj.pre_quant_scale") for k in mine)
            assert any(k.endswith("o_proj.pre_quant_scale") for k in mine)
    assert list((home / "tmp").iterdir()) == []   # the offload folder went with the build
    for name in SPINE_VARIANTS:
        pulled = run_kiln("pull", f"spine-{name}/1", "--out", tmp_path / "pulled" / name, env=env)
        assert pulled.returncode == 0 and "all verified" in pulled.stdout, pulled.stderr


@pytest.mark.slow
def test_a_mixture_of_experts_builds_from_disk_as_it_builds_in_memory(tmp_path, family_models):
    """Mixtral, FP8 + FP8-KV: calibrated with its layers (experts and router) read from disk, streamed out, and
    validated one layer at a time, each layer's experts fused from the source's per-expert tensors as
    transformers 5 loads them: the in-memory build's bytes and metrics."""
    import torch
    from safetensors.torch import load_file

    variants = {"fp8": {"quant": "fp8", "kv_cache": "fp8"}}
    built = {}
    for offload in ("none", "disk"):
        (tmp_path / offload).mkdir()
        recipe = write_recipe(tmp_path / offload, str(family_models["mixtral"]), variants, name="moe", samples=8,
                              seq_len=128, build={"target": "trtllm-pytorch"})
        text = __import__("yaml").safe_load(recipe.read_text())
        # Every expert calibrated on every token (layer 1's expert 3 gets none of this text), through the
        # offload hooks too.
        text["calibration"]["all_experts"] = True
        if offload == "disk":
            text["calibration"].update({"offload": "disk", "max_host_memory": "1MiB"})
        recipe.write_text(json.dumps(text))
        home = tmp_path / offload / "home"
        result = run_kiln("build", recipe, "--json", env={"KILN_HOME": str(home)})
        assert result.returncode == 0, result.stderr[-3000:]
        [variant] = json.loads(result.stdout)["variants"]
        [checkpoint] = (home / "cache" / "quantize").iterdir()
        built[offload] = variant["metrics"], checkpoint, result.stderr
    (in_memory, theirs, _), (from_disk, mine, log) = built["none"], built["disk"]
    assert "read from disk as they run" in log and "evaluate fp8 (layer by layer)" in log
    assert json.loads((mine / "kiln.json").read_text())["placement"]["on_disk"]
    for field in ("baseline_ppl", "quantized_ppl", "mean_kl", "top1_agreement", "ppl_increase_pct"):
        assert abs(from_disk[field] - in_memory[field]) <= 1e-4 * abs(in_memory[field]) + 1e-9, field
    ours, reference = load_file(mine / "hf" / "model.safetensors"), load_file(theirs / "hf" / "model.safetensors")
    assert ours.keys() == reference.keys() and any(".experts.3.w2." in k for k in ours)
    assert all(ours[k].dtype == reference[k].dtype and torch.equal(ours[k], reference[k]) for k in ours)


@pytest.mark.slow
def test_a_killed_offloaded_build_leaves_its_offload_folder_to_the_next_kiln(tmp_path, test_model):
    """SIGKILL runs no clean-up: the folder stays until the next build, which removes what dead processes left
    under KILN_HOME/tmp (kiln.common.scratch) before it starts, then builds and removes its own."""
    home = tmp_path / "home"
    recipe = _offload_recipe(tmp_path, test_model, "2MiB", name="killed")
    build = subprocess.Popen([str(KILN), "build", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "KILN_HOME": str(home)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((home / "tmp").glob("*/kiln-offload-*")):
        assert build.poll() is None, "the build ended before its offload folder was seen"
        time.sleep(0.05)
    [folder] = list((home / "tmp").glob("*/kiln-offload-*"))
    build.send_signal(signal.SIGKILL)
    build.communicate(timeout=60)
    assert folder.is_dir()   # nothing of the killed process ran to remove it
    again = run_kiln("build", recipe, env={"KILN_HOME": str(home)})   # the next kiln that writes clears it first
    assert again.returncode == 0, again.stderr
    assert not folder.exists() and list((home / "tmp").iterdir()) == []


def _llama_70b_config() -> dict:
    return {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "vocab_size": 128256,
            "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672}


def test_the_plan_under_disk_offload_counts_one_layer_resident_and_the_rest_read_from_disk():
    from kiln.pipeline.plan.memory import DiskOffload, estimate
    from kiln.quantize import QuantFormat

    offload = DiskOffload(host_budget=6 * GIB, evaluation_tokens=32 * 512, shard_bytes=GIB, writes_folder=False,
                          folder_free=100 * GIB)
    plan = estimate(_llama_70b_config(), 2, [QuantFormat.fp8], 512, 512, 24 * GIB, 20 * GIB, (), offload)
    calibrate, export, validate = plan.stages
    weights = plan.shape.params * 2
    assert calibrate.disk_bytes == export.disk_bytes == weights - 6 * GIB   # 141 GB of a 70B model on disk
    layer = plan.shape.linear_params // 80 * 2
    # Read in place, the 6 GiB kept in host memory are memory-mapped file pages: resident are one layer + runtime.
    assert layer < calibrate.host_bytes < layer + 2 * GIB and "6.44 GB of weights memory-mapped" in calibrate.detail
    # Validation: the 4.2 GB embeddings and head, one layer and its widest linear in float32, 32 x 512 hidden states.
    assert 7 * GIB < validate.host_bytes < 9 * GIB and plan.fits() and plan.refusal("r.yaml") is None
    # The same model in a 4 GiB host: even one layer with the embeddings and the hidden states does not fit.
    small = estimate(_llama_70b_config(), 2, [QuantFormat.fp8], 512, 512, 4 * GIB, 3 * GIB, (), offload)
    assert not small.fits()
    assert small.refusal("r.yaml").startswith("r.yaml: under calibration.offload: disk the smallest resident set "
                                              "still needs about")
    # A source that must be converted first needs the offload folder's disk.
    converting = DiskOffload(6 * GIB, 32 * 512, GIB, writes_folder=True, folder_free=10 * GIB)
    converted = estimate(_llama_70b_config(), 2, [QuantFormat.fp8], 512, 512, 24 * GIB, 20 * GIB, (), converting)
    # Converted, the weights kept in host memory are the process's own: budget + one layer + runtime.
    assert converted.stages[0].host_bytes == calibrate.host_bytes + 6 * GIB
    refusal = converted.refusal("r.yaml")
    assert refusal.startswith("r.yaml: disk offload writes 1") and "whose filesystem has 10.74 GB free" in refusal
    assert "(converted weights)" in refusal


def test_the_plan_under_disk_offload_counts_rewritten_layers_and_gptq_layer_state():
    """AWQ rewrites the layers it reads from disk and writes them back to the offload folder: as many bytes as
    were read, which the folder's filesystem must hold even when the source is read in place. GPTQ, run a layer
    at a time, holds that layer's Hessians and every calibration window's inputs to it."""
    from kiln.pipeline.plan.memory import DiskOffload, estimate
    from kiln.quantize import QuantFormat

    config = _llama_70b_config()
    offload = DiskOffload(6 * GIB, 32 * 512, GIB, writes_folder=False, folder_free=200 * GIB,
                          calibration_tokens=128 * 512)
    fp8, awq, gptq = (estimate(config, 2, [q], 512, 512, 24 * GIB, 20 * GIB, (), offload)
                      for q in (QuantFormat.fp8, QuantFormat.int4_awq, QuantFormat.int4_gptq))
    on_disk = fp8.stages[0].disk_bytes
    assert fp8.folder_bytes == 0 and awq.folder_bytes == gptq.folder_bytes == on_disk
    # The layer being rewritten: read back from its files and rewritten in float32, calibrating and exporting.
    layer = fp8.shape.linear_params // 80 * 2
    assert awq.stages[0].host_bytes == fp8.stages[0].host_bytes + 3 * layer
    # (exporting, beside a smaller exported layer than FP8's)
    assert awq.stages[1].host_bytes > fp8.stages[1].host_bytes + 2 * layer
    assert "GB of the layer being rewritten" in awq.stages[1].detail
    # A 4-bit checkpoint's widest linear decodes through two float32 temporaries besides its result.
    assert awq.stages[2].host_bytes == fp8.stages[2].host_bytes + 2 * 4 * 8192 * 28672
    # 6 x 8192^2 + 28672^2 float32 Hessians (4.9 GB) and 2 x 65536 tokens x 8192 x 2 bytes of layer inputs (2.1 GB)
    extra = gptq.stages[0].host_bytes - awq.stages[0].host_bytes
    assert extra == 4 * (6 * 8192 ** 2 + 28672 ** 2) + 2 * 128 * 512 * 8192 * 2
    assert "GPTQ Hessians" in gptq.stages[0].detail and gptq.fits()
    small_disk = DiskOffload(6 * GIB, 32 * 512, GIB, writes_folder=False, folder_free=100 * GIB)   # < 135 GB
    refusal = estimate(config, 2, [QuantFormat.int4_awq], 512, 512, 24 * GIB, 20 * GIB, (), small_disk) \
        .refusal("r.yaml")
    assert refusal.startswith(f"r.yaml: disk offload writes {on_disk / 1e9:.2f} GB (the layers calibration rewrites)")


FREED = """
import ctypes, re, sys
import torch
if sys.argv[1] == "fixed":
    from kiln.common.allocator import return_freed_memory
    assert return_freed_memory()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
def anon():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) >> 10
big = torch.ones(4 << 20); del big        # a freed 16 MB block raises glibc's dynamic mmap threshold
before = anon()
blocks = [torch.ones(3 << 20) for _ in range(40)]      # 12 MB each
mapped = libc.mallinfo2().hblkhd >> 20                   # MB of blocks in their own mappings
del blocks
print(mapped, anon() - before)
"""


def test_freed_tensors_leave_the_process_under_disk_offload():
    """What kept an offloaded 1.07B build's export 1.15 GB over its budget (kiln.common.allocator): once glibc has
    raised its threshold, 12 MB tensors come from the heap, where freed memory may stay with the process; with
    kiln's fixed threshold each has its own mapping, and freeing them gives every byte back."""
    import sys

    mapped, kept = {}, {}
    for mode in ("dynamic", "fixed"):
        out = subprocess.run([sys.executable, "-c", FREED, mode], capture_output=True, text=True, check=True).stdout
        mapped[mode], kept[mode] = map(int, out.split())
    assert mapped["dynamic"] < 16 and mapped["fixed"] >= 480, mapped
    assert kept["fixed"] <= 4, kept


def test_a_memory_cgroups_limit_is_the_memory_kiln_plans_with(tmp_path):
    """In a container or under a hard cap the host's numbers overstate what the process may use: kiln plans with the
    cgroup's limit (v1 memory.limit_in_bytes here; v2 memory.max read the same way)."""
    from kiln.quantize.placement import cgroup_memory_limit

    v1 = tmp_path / "memory" / "ci" / "job"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(3 * GIB))
    (tmp_path / "cgroup").write_text("9:name=systemd:/\n8:memory:/ci/job\n0::/\n")
    assert cgroup_memory_limit(str(tmp_path / "cgroup"), str(tmp_path)) == 3 * GIB
    (v1 / "memory.limit_in_bytes").write_text(str(9223372036854771712))    # v1's "no limit"
    assert cgroup_memory_limit(str(tmp_path / "cgroup"), str(tmp_path)) is None
    (tmp_path / "ci.v2").mkdir()
    (tmp_path / "ci.v2" / "memory.max").write_text(f"{2 * GIB}\n")
    (tmp_path / "cgroup").write_text("0::/ci.v2\n")
    assert cgroup_memory_limit(str(tmp_path / "cgroup"), str(tmp_path)) == 2 * GIB
    (tmp_path / "ci.v2" / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(str(tmp_path / "cgroup"), str(tmp_path)) is None
    if os.geteuid() != 0 or not os.path.exists("/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        return
    group = f"/sys/fs/cgroup/memory/kiln-test-{os.getpid()}"   # the real thing, where this host lets root make one
    os.mkdir(group)
    try:
        with open(f"{group}/memory.limit_in_bytes", "w") as f:
            f.write(str(3 * GIB))
        import sys

        probe = subprocess.run(
            [sys.executable, "-c", f"import os; open('{group}/cgroup.procs', 'w').write(str(os.getpid())); "
             "from kiln.quantize.placement import host_memory; print(*host_memory())"],
            capture_output=True, text=True, check=True)
        total, available = map(int, probe.stdout.split())
        assert total == 3 * GIB and available <= 3 * GIB
    finally:
        os.rmdir(group)


def test_rewritten_weights_go_to_files_and_come_back_as_written(tmp_path):
    """What ModelOpt writes back into an offload loader's state dict (AWQ's scaled weights) lands in a file, not
    host memory; accelerate reads it back from there (the loader gives the state dict priority over the source)."""
    import torch

    from kiln.quantize.offload_writeback import WrittenBack

    resident = torch.ones(3)
    written = WrittenBack(tmp_path / "wb", {"kept": resident})
    weight = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    written["layer.weight"] = weight * 2
    assert written.bytes_written == 24 and len(list((tmp_path / "wb").iterdir())) == 1
    back = written["layer.weight"]
    assert back.dtype == torch.bfloat16 and back.shape == (3, 4) and torch.equal(back, weight * 2)
    assert back.data_ptr() != weight.data_ptr() and written["kept"] is resident
    written["layer.weight"] = weight   # a second rewrite replaces the file
    assert torch.equal(written["layer.weight"], weight) and len(list((tmp_path / "wb").iterdir())) == 1
    assert set(written) == {"kept", "layer.weight"} and "layer.weight" in written and "other" not in written
    written["kept"] = resident * 3    # a resident entry, rewritten, leaves memory for a file too
    assert len(list((tmp_path / "wb").iterdir())) == 2 and torch.equal(written["kept"], resident * 3)
    del written["layer.weight"]
    assert "layer.weight" not in written and len(written) == 1 and len(list((tmp_path / "wb").iterdir())) == 1
    with pytest.raises(KeyError):
        written["layer.weight"]


FROZEN = """
import gc, json, weakref
import torch, transformers
from kiln.common.allocator import freeze_imported_objects
from kiln.quantize import release_memory

class Layer(torch.nn.Module):          # a cycle, as hooks that hold their module make one
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1 << 20))
        self.me = [self]

walked_before = len(gc.get_objects())              # what a full collection walks
kept = Layer(); kept_ref = weakref.ref(kept)       # alive when frozen: what no caller may hold then
freeze_imported_objects(); freeze_imported_objects()
frozen = gc.get_freeze_count()
made = Layer(); made_ref = weakref.ref(made)       # a model loaded after the freeze
del kept, made
release_memory()
print(json.dumps({"frozen": frozen, "again": gc.get_freeze_count(), "made_freed": made_ref() is None,
                  "kept_freed": kept_ref() is None, "walked_before": walked_before, "walked_after": len(gc.get_objects())}))
"""


def test_objects_frozen_before_a_model_are_not_walked_and_a_later_model_is_still_freed():
    """kiln.common.allocator.freeze_imported_objects: after torch and transformers are imported, a full collection
    walks a twentieth of the objects it walked before or less, a model-like cycle made afterwards is still collected, and one
    alive at the freeze is not (why callers freeze before any model loads). Frozen once per process."""
    import sys

    out = subprocess.run([sys.executable, "-c", FROZEN], capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["frozen"] > 100_000 and result["again"] == result["frozen"], result
    assert result["made_freed"] and not result["kept_freed"], result
    assert result["walked_after"] < result["walked_before"] / 20, result
