"""The house's seams for the next runtimes (issue 26.2): a serving stack is a class plus a row in
kiln.serve.stacks.STACKS, and a runtime check a validate entry point plus a row in
kiln.pipeline.plan.runtimes.RUNTIME_CHECKS. Each test registers a stand-in and watches kiln use it
through the same paths the real ones take; nothing else is edited."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from kiln.common.errors import UserInputError
from kiln.common.progress import SILENT
from kiln.pipeline.plan.runtimes import RUNTIME_CHECKS, RuntimeCheck
from kiln.pipeline.plan.stages import Target
from kiln.quantize import Runtime
from kiln.serve.stack import Repository, ServeFlags, Stack
from kiln.serve.stacks import STACKS, StackRow
from kiln.serve.server import Endpoints, ServerProcess
from kiln.validate import Metrics, RuntimeReport
from tests.conftest import run_kiln, seed_home, write_recipe

# Both tests start from a published build (about 40 s together): the slow tier, beside test_serve_cpu.
pytestmark = pytest.mark.slow

GATES = {"max_kl": 0.1, "min_top1_agreement": 0.7}

# The stand-in server: answers /health, and POST /ask with the served model's family and the prompt reversed,
# read from the repository it was given (so an answer proves the artifact was pulled and laid out).
_ECHO_SERVER = """
import http.server, json, pathlib, sys
port, repo = int(sys.argv[1]), pathlib.Path(sys.argv[2])
family = json.loads((repo / "artifact" / "hf" / "config.json").read_text())["model_type"]
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
        body = json.dumps({"text": family + ":" + prompt[::-1]}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Answer).serve_forever()
"""


class _EchoServer(ServerProcess):
    what = "echo server"

    def __init__(self, repo: Path, home: Path, endpoints: Endpoints, log_path: Path):
        super().__init__(home, endpoints, log_path)
        self.repo = repo

    def command(self) -> list[str]:
        return [sys.executable, "-c", _ECHO_SERVER, str(self.endpoints.http), str(self.repo)]


class EchoStack(Stack):
    """A stand-in serving stack: what a new one (SGLang) would implement."""

    name = "echo"
    start_timeout_s = 30
    log_name = "echo"

    def write(self, staging: Path, artifact: Path, registered: str, final_root: Path, flags: ServeFlags, sm):
        (staging / "echo").mkdir()
        (staging / "echo" / "settings.json").write_text(json.dumps({"max_tokens": flags.max_tokens}))
        return {"models": ("echo",), "entry_model": "echo", "stream_model": None}

    def server(self, repo: Repository, home: Path, endpoints: Endpoints, log: Path):
        return _EchoServer(repo.path, home, endpoints, log)

    def ask(self, repo: Repository, endpoints: Endpoints, prompt: str, max_tokens: int) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{endpoints.http}/ask",
                                         json.dumps({"prompt": prompt}).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())["text"]

    def interpreter(self):
        return "echo", {"python": sys.executable, "env": "KILN_ECHO_PYTHON", "version": "0.1"}

    def written_lines(self, repo: Repository, ref: str) -> list[str]:
        return [f"start it with: kiln serve {ref} --stack echo"]

    def serving_lines(self, repo: Repository, endpoints: Endpoints) -> list[str]:
        return [f"echoing {repo.name}/{repo.version} on {endpoints.http}"]


@pytest.fixture(scope="module")
def home(tmp_path_factory, test_model, spine_cache):
    """A home with the spine's fp8 variant published (its checkpoint from the session's spine cache)."""
    root = tmp_path_factory.mktemp("seams")
    home = seed_home(root / "kiln-home", spine_cache)
    recipe = write_recipe(root, str(test_model), {"fp8": {"quant": "fp8", "kv_cache": "fp8", "gates": GATES}},
                          name="seam", publish={"aliases": ["candidate"]})
    built = run_kiln("build", recipe, "--json", env={"KILN_HOME": str(home)})
    assert built.returncode == 0, built.stderr
    return home, recipe


@pytest.fixture()
def echo_stack(monkeypatch):
    # It serves through SGLang's loader: the runtimes table gates what it may serve, once, for every stack.
    monkeypatch.setitem(STACKS, "echo", StackRow("echo", "a stand-in that echoes.", "tests.test_seams:EchoStack",
                                                 loader=Runtime.sglang))


def test_a_registered_stack_is_written_started_asked_and_stopped(home, echo_stack, tmp_path, monkeypatch):
    from kiln.compile import Host
    from kiln.pipeline.cli.doctor import doctor_document
    from kiln.quantize.runtimes import WEIGHT_LOADERS, Cell, Evidence, Loads
    from kiln.serve import stack_help, start_server, write_repository

    home, _ = home
    monkeypatch.setenv("KILN_HOME", str(home))
    repo = write_repository(home, "seam-fp8@candidate", tmp_path / "repo", "echo", SILENT, ServeFlags(max_tokens=7))
    assert (repo.stack, repo.models, repo.version) == ("echo", ("echo",), "1")
    assert json.loads((repo.path / "echo" / "settings.json").read_text()) == {"max_tokens": 7}
    assert (repo.path / "artifact" / "hf" / "config.json").is_file()
    with start_server(home, "seam-fp8@candidate", "echo", SILENT, (0, 0, 0)) as running:
        assert running.ask("def f(x):", 4) == "llama:" + ":)x(f fed"
        assert running.serving_lines() == [f"echoing seam-fp8/1 on {running.endpoints.http}"]
    assert running.server.process.returncode is not None and not running.scratch.exists()
    assert "echo: a stand-in that echoes." in stack_help()
    assert doctor_document(Host(), [])["interpreters"]["echo"]["env"] == "KILN_ECHO_PYTHON"
    with pytest.raises(UserInputError, match=f"--stack sglang: not one of {', '.join(STACKS)}"):
        write_repository(home, "seam-fp8@candidate", tmp_path / "other", "sglang", SILENT)
    # Where its loader does not load the artifact, nothing is written and the line names the loader's cell.
    refused = Cell(Loads.no, Evidence("SGLang test", "a planted cell", "source"))
    monkeypatch.setitem(WEIGHT_LOADERS, "FP8", {**WEIGHT_LOADERS["FP8"], Runtime.sglang: refused})
    with pytest.raises(UserInputError, match=r"--stack echo: sglang does not load fp8 with a fp8 KV cache \(SGLang test"):
        write_repository(home, "seam-fp8@candidate", tmp_path / "gated", "echo", SILENT)
    assert not (tmp_path / "gated").exists() or not any((tmp_path / "gated").iterdir())


def _stand_in_check(hf_dir, model_dir, samples, progress, label, max_model_len, trust_remote_code):
    """A runtime that sees the checkpoint's hf/ and reports what it read: agreement falls with its size in
    bytes, so the gate below fails on it (a number kiln did not choose)."""
    size = sum(p.stat().st_size for p in Path(hf_dir).glob("*.safetensors"))
    metrics = Metrics(int(samples.numel()), 10.0, 10.0, 0.0, 0.0, top1_agreement=1.0 / (1.0 + size / 1e6))
    return RuntimeReport("sglang", "0.1-standin", f"stand-in ({label}, max_model_len {max_model_len})", metrics, 0.5, [])


def test_a_registered_runtime_check_is_planned_run_gated_and_cached(home, monkeypatch):
    from kiln.pipeline.plan.cache import StageCache
    from kiln.pipeline.plan.dag import make_plan
    from kiln.pipeline.recipe.loader import load_recipe
    from kiln.pipeline.run.runner import run_plan
    from kiln.registry import tracking_uri

    home, recipe = home
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.setitem(RUNTIME_CHECKS, Runtime.sglang, RuntimeCheck(
        Runtime.sglang, lambda: "0.1-standin", "needs the stand-in", lambda host, variant, installed: None,
        _stand_in_check, RuntimeReport.from_dict))

    def build():
        cache = StageCache(home / "cache")
        plan = make_plan(load_recipe(recipe), home, cache, tracking_uri(home))
        return plan, run_plan(plan, cache, SILENT)

    plan, result = build()
    check = plan.instance("sglang-check", Target("fp8", runtime="sglang"))
    assert (str(check.target), check.material["tools"]["sglang"]) == ("fp8@sglang", "0.1-standin")
    checked = next(c for c in result.variants[0].runtime_checks if c.runtime == "sglang")
    assert checked.status == "checked" and checked.report.device.startswith("stand-in (fp8@sglang")
    assert 0 < checked.metrics.top1_agreement < 0.7 and not checked.gate.passed and not checked.published
    assert checked.gate.failures[0].startswith("min_top1_agreement: ") and result.exit_code == 3
    _, again = build()
    assert next(c for c in again.variants[0].runtime_checks if c.runtime == "sglang").status == "cached"


def test_a_vllm_report_cached_before_reports_were_runtime_neutral_still_reads():
    """A build whose vllm-check entry predates RuntimeReport reads it from the cache instead of running vLLM again."""
    metrics = {"tokens": 8, "baseline_ppl": 2.0, "quantized_ppl": 2.1, "ppl_increase_pct": 5.0, "mean_kl": 0.01,
               "top1_agreement": 0.9}
    old = {"metrics": metrics, "greedy_agreement": 1.0, "greedy": [{"prompt": [1], "vllm": [2], "reference": [2]}],
           "vllm": "0.32.0", "device": "cpu"}
    report = RuntimeReport.from_dict(old)
    assert (report.runtime, report.version, report.device, report.metrics.mean_kl) == ("vllm", "0.32.0", "cpu", 0.01)
    assert report.greedy == [{"prompt": [1], "served": [2], "reference": [2]}]
    assert RuntimeReport.from_dict(report.as_dict()) == report
