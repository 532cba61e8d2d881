"""Issue 36's hostile attempts (trust, third pass), replayed end to end by bench/hostile.py.

Each function tries one item's failures as a user (or a model's completion) would, through the `kiln`
command where there is one, and records a row: what was tried, and whether kiln held. `run` is called
by hostile.py with its helpers (kiln, row, one_line, recipe_for) and a home holding the published h-fp8
and h-int4-awq versions.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def run(root: Path, env: dict, home: Path, model: Path, h) -> None:
    """`h`: hostile.py's helpers (kiln, row, one_line, recipe_for)."""
    gates(root, env, model, h)
    sandbox(h)
    task_configs(root, env, model, h)
    verify(root, env, home, h)
    offload(root, env, model, h)
    rest(root, env, home, model, h)


def gates(root: Path, env: dict, model: Path, h) -> None:
    from kiln.validate import Metrics, TaskDrop, evaluate_gates

    nan = Metrics(tokens=1, baseline_ppl=1, quantized_ppl=math.nan, ppl_increase_pct=math.nan, mean_kl=math.nan,
                  top1_agreement=math.nan)
    result = evaluate_gates(nan, max_ppl_increase_pct=5, max_kl=0.05, min_top1_agreement=0.8)
    h.row("36.1", "NaN ppl, KL and top-1 against every gate", not result.passed and len(result.failures) == 3,
          result.failures[0] if result.failures else "passed")
    one = {"t": TaskDrop("t", "acc", 1.0, 0.0, 0.0, 100.0, math.inf, 1)}
    result = evaluate_gates(nan.__class__(1, 1, 1, 0, 0, 1), max_task_drop={"t": 5}, tasks=one)
    h.row("36.1", "a 100-point task drop scored on one document", not result.passed,
          result.failures[0] if result.failures else "passed")

    import torch
    from safetensors.torch import load_file, save_file

    poisoned = root / "nan-model"
    shutil.copytree(model, poisoned)
    [shard] = poisoned.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = torch.nan
    save_file(tensors, shard, metadata={"format": "pt"})
    result = h.kiln("build", h.recipe_for(root, poisoned, "nan", {"fp8": {"quant": "fp8"}}), env=env)
    h.row("36.1", "build a source whose weights hold a NaN", h.one_line(result, 2) and
          "tensor model.layers.0.self_attn.q_proj.weight holds 1 NaN" in result.stderr, result.stderr)


def sandbox(h) -> None:
    import tempfile

    from kiln.validate.sandbox import run_program
    from tests.sandbox_escapes import DISABLE_HOOK, host_write_attempts, sleepers, spawn_detached

    with tempfile.TemporaryDirectory(prefix="kiln-hostile-host-") as folder:
        target = Path(folder) / "escaped"
        for attempt, program in host_write_attempts(target).items():
            result = run_program(program, timeout_s=5)
            h.row("36.2", f"write outside the sandbox: {attempt}", not target.exists() and not os.listxattr(folder),
                  f"{result.reason}; nothing written on the host" if not target.exists() else "WROTE the host file")
    result = run_program("import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read(), "
                         "open('/proc/1/environ', 'rb').read(), os.listdir('/proc'))")
    h.row("36.2", "read the build's environment through /proc/<ppid> and /proc/1", "HOME=/root" not in result.output
          and "KILN_HOME" not in result.output, result.output.strip()[:140])
    victim = subprocess.Popen(["sleep", "60"])
    run_program(DISABLE_HOOK["patch _hook through gc"] + f"import os, signal\nsignal.pidfd_send_signal("
                f"os.pidfd_open({victim.pid}), signal.SIGKILL)\n")
    time.sleep(0.2)
    h.row("36.2", "SIGKILL a host process with pidfd_send_signal", victim.poll() is None, "the host process lives")
    victim.kill()
    victim.wait()
    started = time.monotonic()
    result = run_program(spawn_detached(39.25) + "import time\ntime.sleep(30)\n", timeout_s=10)
    took = time.monotonic() - started
    time.sleep(0.5)
    h.row("36.2", "a detached grandchild holding stdout, past a 10 s limit", took < 15 and not sleepers(39.25),
          f"{result.reason}; ended after {took:.1f} s, no process left")
    result = run_program("import sys\nsys.stdout.write('x' * (400 << 20))\n")
    h.row("36.2", "400 MiB on stdout", not result.passed and len(result.output) <= 8192, result.reason)
    result = run_program("import os\nos._exit(0)\nassert False\n")
    h.row("36.2", "os._exit(0) before the checks", not result.passed, result.reason)


def task_configs(root: Path, env: dict, model: Path, h) -> None:
    import yaml

    folder = root / "tasks"
    folder.mkdir()
    (folder / "items.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n')
    marker = root / "task-code-ran"
    (folder / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef text(doc):\n    return 'a'\n")
    base = ("task: mine\ndataset_path: json\ndataset_kwargs: {data_files: {test: items.jsonl}}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: label\n")
    cases = {"!function without allow_task_code": base + "doc_to_text: !function utils.text\n",
             "include: a YAML outside the task's folder": base + "doc_to_text: context\ninclude: ../outside.yaml\n",
             "a YAML bomb (aliases)": base + "doc_to_text: context\na: &a [x, x, x, x, x, x, x, x]\nb: [*a, *a, *a]\n"}
    (root / "outside.yaml").write_text("doc_to_text: context\n")
    for attempt, text in cases.items():
        (folder / "mine.yaml").write_text(text)
        result = h.kiln("check", _task_recipe(root, model, h), env=env)
        h.row("36.3", f"check a task with {attempt}", h.one_line(result, 2) and not marker.exists(), result.stderr)
    (folder / "mine.yaml").write_text(base + "doc_to_text: context\n")
    (folder / "items.jsonl").unlink()
    os.mkfifo(folder / "items.jsonl")
    result = h.kiln("check", _task_recipe(root, model, h), env=env, timeout=120)
    h.row("36.3", "check a task whose data file is a FIFO", h.one_line(result, 2), result.stderr)
    data = yaml.safe_load(_task_recipe(root, model, h).read_text())
    data["evaluation"]["tasks"][0]["max_new_tokens"] = 10 ** 6
    (root / "long.yaml").write_text(yaml.safe_dump(data))
    (folder / "items.jsonl").unlink()
    (folder / "items.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n')
    result = h.kiln("check", root / "long.yaml", env=env)
    h.row("36.3", "max_new_tokens past the model's context", h.one_line(result, 2), result.stderr)


def _task_recipe(root: Path, model: Path, h) -> Path:
    import yaml

    path = h.recipe_for(root, model, "tk", {"fp8": {"quant": "fp8"}})
    data = yaml.safe_load(path.read_text())
    data["evaluation"]["tasks"] = [{"name": "mine", "config": "tasks/mine.yaml"}]
    path.write_text(yaml.safe_dump(data))
    return path


def verify(root: Path, env: dict, home: Path, h) -> None:
    from mlflow.tracking import MlflowClient

    copy = root / "verify-home"
    shutil.copytree(home, copy)
    uri = f"sqlite:///{copy / 'registry' / 'mlflow.db'}"
    mlflow = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_model_version_tag("h-fp8", "1", "kiln.metric.mean_kl", "1e-07")
    mlflow.delete_run(mlflow.get_model_version("h-int4-awq", "1").run_id)
    result = h.kiln("registry", "verify", "--json", env={**env, "KILN_HOME": str(copy)})
    rows = {r["version"]: r for r in json.loads(result.stdout)} if result.stdout.strip() else {}
    forged, deleted = rows.get("h-fp8/1", {}), rows.get("h-int4-awq/1", {})
    h.row("36.4", "verify a forged kiln.metric.mean_kl tag", result.returncode == 1 and not forged.get("pullable", True)
          and "disagrees with the files it holds" in (forged.get("problem") or ""), forged.get("problem") or "")
    h.row("36.4", "verify a version whose run was deleted", not deleted.get("pullable", True) and
          "is deleted in MLflow" in (deleted.get("problem") or ""), deleted.get("problem") or "")
    database = copy / "registry" / "mlflow.db"
    database.write_bytes(b"")
    result = h.kiln("registry", "verify", env={**env, "KILN_HOME": str(copy)})
    h.row("36.4", "verify an emptied mlflow.db", h.one_line(result, 1) and database.stat().st_size == 0, result.stderr)


def offload(root: Path, env: dict, model: Path, h) -> None:
    import yaml

    path = h.recipe_for(root, model, "off", {"fp8": {"quant": "fp8"}})
    data = yaml.safe_load(path.read_text())
    data["calibration"].update({"offload": "disk", "max_host_memory": "6GiB"})
    data["build"] = {"target": "trtllm-pytorch"}
    path.write_text(yaml.safe_dump(data))
    result = h.kiln("build", path, env={**env, "KILN_HOME": str(root / "offload-home")})
    h.row("36.5", "build with offload: disk and the README's max_host_memory: 6GiB", result.returncode == 0,
          next((line for line in result.stderr.splitlines() if "disk offload" in line), result.stderr))


def rest(root: Path, env: dict, home: Path, model: Path, h) -> None:
    recipe = h.recipe_for(root, model, "h", {"fp8": {"quant": "fp8", "gates": {"max_kl": 0.05}},
                                             "int4-awq": {"quant": "int4_awq"}})
    fifo = root / "report.fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    result = h.kiln("report", recipe, "--out", fifo, env=env, timeout=120)
    h.row("36.6", "report --out a FIFO nobody reads", h.one_line(result, 2) and time.monotonic() - started < 60,
          result.stderr)
    _serve(env, h)
    import yaml

    for field, value in (("limit", True), ("score_samples", "8"), ("max_host_memory", True)):
        data = yaml.safe_load(recipe.read_text())
        if field == "limit":
            data["evaluation"]["tasks"] = [{"name": "next-line", "limit": value}]
        elif field == "score_samples":
            data["variants"]["int4-awq"] = {"quant": "auto", "auto": {"formats": ["fp8"], "effective_bits": 8,
                                                                      "score_samples": value}}
        else:
            data["calibration"].update({"offload": "disk", "max_host_memory": value})
        (root / f"strict-{field}.yaml").write_text(yaml.safe_dump(data))
        result = h.kiln("check", root / f"strict-{field}.yaml", env=env)
        h.row("36.6", f"{field}: {value!r} in a recipe", h.one_line(result, 2) and field in result.stderr, result.stderr)
    long_home = root / ("a" * 300)
    result = h.kiln("ls", env={**env, "KILN_HOME": str(long_home)})
    h.row("36.6", "kiln ls with a KILN_HOME past NAME_MAX", h.one_line(result, 2), result.stderr)
    copy = root / "copied-home"
    shutil.copytree(home, copy)
    for manifest in (copy / "registry" / "artifacts").rglob("manifest.json"):
        manifest.unlink()
    result = h.kiln("build", recipe, env={**env, "KILN_HOME": str(copy)})
    pulled = h.kiln("pull", "h-fp8/1", "--out", root / "copied-pull", "--gpu", "none",
                    env={**env, "KILN_HOME": str(copy)})
    h.row("36.6", "a copied KILN_HOME with its manifests deleted: build, then pull", result.returncode == 0 and
          "wrote it again" in result.stderr and pulled.returncode == 0, pulled.stdout or pulled.stderr)


def _serve(env: dict, h) -> None:
    from tests.recipes import KILN

    serve = subprocess.Popen([str(KILN), "serve", "h-fp8@candidate", "--http-port", "0", "--grpc-port", "0",
                              "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **env}, start_new_session=True)
    try:
        found = re.search(r"HTTP http://127\.0\.0\.1:(\d+)", serve.stdout.readline())
        port = int(found[1]) if found else 0
        body = json.dumps({"text_input": "x" * (16 << 20)}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/kiln_llm/generate", data=body)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            status = str(exc)
        triton = [int(p) for p in os.listdir("/proc") if p.isdigit() and _child_tritonserver(int(p), serve.pid)]
        alive = bool(triton)
        h.row("36.6", "a 16 MB request to /v2/models/kiln_llm/generate", status == 413 and alive,
              f"HTTP {status}; tritonserver {'alive' if alive else 'gone'}")
        for pid in triton:
            os.kill(pid, signal.SIGKILL)
        _, err = serve.communicate(timeout=60)
        h.row("36.6", "tritonserver killed under kiln serve", serve.returncode == 1 and "died while serving" in err,
              err.strip().splitlines()[-1] if err.strip() else "")
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


def _child_tritonserver(pid: int, ancestor: int) -> bool:
    try:
        if not Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/bin/tritonserver"):
            return False
        while pid > 1:
            if pid == ancestor:
                return True
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return False
    return False
