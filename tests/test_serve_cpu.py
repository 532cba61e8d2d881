"""The real tritonserver (nvidia-pytriton's) serving kiln artifacts on the CPU, driven with tritonclient."""

from __future__ import annotations

import ast
import json
import os
import queue
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln.common.progress import ProgressReporter
from kiln.serve import TritonServer, write_repository
from kiln.serve.generation import ReferenceGenerator, greedy_without_cache
from kiln.serve.pbtxt import read_config
from tests.conftest import run_kiln, seed_home, write_recipe

pytestmark = pytest.mark.slow

GATES = {"max_ppl_increase_pct": 10, "max_kl": 0.1, "min_top1_agreement": 0.7}
VARIANTS = {"fp8": {"quant": "fp8", "kv_cache": "fp8", "gates": GATES}, "int4-awq": {"quant": "int4_awq", "gates": GATES}}
PROMPTS = ["def add(a, b):", "The os module", "import sys\n", "Return the", "class Foo:", "A list is"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def home(tmp_path_factory, test_model, spine_cache):
    """A home with both spine variants published; the session's spine cache holds their checkpoints."""
    root = tmp_path_factory.mktemp("serve")
    home = seed_home(root / "kiln-home", spine_cache)
    recipe = write_recipe(root, str(test_model), VARIANTS, name="s", publish={"aliases": ["candidate"]})
    built = run_kiln("build", recipe, "--json", env={"KILN_HOME": str(home)})
    assert built.returncode == 0, built.stderr
    assert sorted(json.loads(built.stdout)["ran"]) == ["publish:fp8", "publish:int4-awq"]
    os.environ["KILN_HOME"] = str(home)  # for this process's registry client
    return home


def expected_tokens(repo_path: Path, prompt: str) -> list[int]:
    """Greedy tokens from the reference runtime called directly, recomputing the sequence (no KV cache)."""
    generator = ReferenceGenerator(repo_path / "artifact" / "hf")
    return greedy_without_cache(generator.model, generator.encode(prompt), MAX_TOKENS, generator.eos_token_id)


@pytest.fixture(scope="module")
def fp8_server(home, tmp_path_factory):
    repo = write_repository(home, "s-fp8@candidate", tmp_path_factory.mktemp("repo") / "fp8", "cpu", ProgressReporter())
    server = TritonServer(repo.path, home, repo.models).start()
    yield server, repo
    server.stop()


def _inputs(module, prompt: str, stream: bool | None = None):
    text = module.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    limit = module.InferInput("max_tokens", [1, 1], "INT32")
    limit.set_data_from_numpy(np.array([[MAX_TOKENS]], dtype=np.int32))
    inputs = [text, limit]
    if stream is not None:
        flag = module.InferInput("stream", [1, 1], "BOOL")
        flag.set_data_from_numpy(np.array([[stream]]))
        inputs.append(flag)
    return inputs


def test_repository_configs_parse_against_tritons_schema(fp8_server):
    _, repo = fp8_server
    plain = read_config(repo.path / "kiln_llm" / "config.pbtxt")
    streaming = read_config(repo.path / "kiln_llm_stream" / "config.pbtxt")
    assert plain.backend == streaming.backend == "python" and plain.max_batch_size == 8
    assert not plain.model_transaction_policy.decoupled and streaming.model_transaction_policy.decoupled
    assert plain.dynamic_batching.max_queue_delay_microseconds == 1000
    assert [i.name for i in streaming.input] == ["text_input", "max_tokens", "stream"]
    assert plain.parameters["artifact"].string_value == "../artifact"
    assert (repo.path / "artifact" / "manifest.json").is_file()


def test_ready_and_metadata_over_http_and_grpc(fp8_server):
    server, repo = fp8_server
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.http}") as http:
        assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("kiln_llm")
        metadata = http.get_model_metadata("kiln_llm")
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {"text_input": "BYTES", "max_tokens": "INT32"}
    assert {o["name"]: o["datatype"] for o in metadata["outputs"]} == {"text_output": "BYTES", "output_ids": "INT32"}
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.grpc}") as grpc:
        assert grpc.is_server_ready() and grpc.is_model_ready("kiln_llm_stream")
        assert grpc.get_model_metadata("kiln_llm_stream").platform == "python"


def test_one_request_gives_the_reference_runtimes_greedy_tokens(fp8_server):
    server, repo = fp8_server
    expected = expected_tokens(repo.path, PROMPTS[0])
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.http}") as http:
        over_http = http.infer("kiln_llm", _inputs(httpclient, PROMPTS[0]))
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.grpc}") as grpc:
        over_grpc = grpc.infer("kiln_llm", _inputs(grpcclient, PROMPTS[0]))
    assert over_http.as_numpy("output_ids")[0].tolist() == expected
    assert over_grpc.as_numpy("output_ids")[0].tolist() == expected
    generator = ReferenceGenerator(repo.path / "artifact" / "hf")
    assert over_http.as_numpy("text_output")[0][0].decode() == generator.tokenizer.decode(expected, skip_special_tokens=True)


def test_streaming_sends_one_response_per_token(fp8_server):
    server, repo = fp8_server
    responses: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.grpc}") as grpc:
        grpc.start_stream(callback=lambda result, error: responses.put((result, error)))
        grpc.async_stream_infer("kiln_llm_stream", _inputs(grpcclient, PROMPTS[1], stream=True),
                                enable_empty_final_response=True)
        tokens, pieces = [], []
        while True:
            result, error = responses.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param and not response.outputs:
                break
            tokens += result.as_numpy("output_ids")[0].tolist()
            pieces.append(result.as_numpy("text_output")[0][0].decode())
        grpc.stop_stream()
    expected = expected_tokens(repo.path, PROMPTS[1])
    assert tokens == expected and len(pieces) == len(expected)
    generator = ReferenceGenerator(repo.path / "artifact" / "hf")
    assert "".join(pieces) == generator.tokenizer.decode(expected, skip_special_tokens=True)


def test_concurrent_clients_each_get_their_own_tokens_and_metrics_count_them(fp8_server):
    server, repo = fp8_server
    before = _successes(server, "kiln_llm")
    results: dict[int, list[int]] = {}

    def ask(index: int) -> None:
        module = httpclient if index % 2 else grpcclient
        port = server.endpoints.http if index % 2 else server.endpoints.grpc
        with module.InferenceServerClient(f"127.0.0.1:{port}") as client:
            results[index] = client.infer("kiln_llm", _inputs(module, PROMPTS[index])).as_numpy("output_ids")[0].tolist()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert {i: results.get(i) for i in range(len(PROMPTS))} == {i: expected_tokens(repo.path, p) for i, p in enumerate(PROMPTS)}
    assert _successes(server, "kiln_llm") - before == len(PROMPTS)


def test_a_bad_request_is_an_error_response_and_the_server_stays_up(fp8_server):
    server, _ = fp8_server
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.http}") as http:
        inputs = _inputs(httpclient, "x")
        inputs[1].set_data_from_numpy(np.array([[0]], dtype=np.int32))
        with pytest.raises(InferenceServerException, match=r"max_tokens is 0; with this \d+-token prompt it must "
                                                           r"be 1 to \d+ \(build.max_seq_len"):
            http.infer("kiln_llm", inputs)
        assert http.is_model_ready("kiln_llm")


def _successes(server, model: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.endpoints.metrics}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    match = re.search(rf'nv_inference_request_success\{{model="{model}",version="1"\}} (\d+)', text)
    return int(match[1]) if match else 0


def test_int4_awq_serves_too_and_shutdown_leaves_no_process(home, tmp_path):
    repo = write_repository(home, "s-int4-awq/1", tmp_path / "repo", "cpu", ProgressReporter())
    server = TritonServer(repo.path, home, repo.models).start()
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.grpc}") as grpc:
            tokens = grpc.infer("kiln_llm", _inputs(grpcclient, PROMPTS[2])).as_numpy("output_ids")[0].tolist()
        assert tokens == expected_tokens(repo.path, PROMPTS[2])
    finally:
        code = server.stop()
    assert code == 0
    with pytest.raises(ProcessLookupError):
        os.killpg(server.process.pid, 0)   # neither the server nor a python stub is left


def test_kiln_serve_answers_a_prompt_and_stops(home, fp8_server):
    _, repo = fp8_server
    result = run_kiln("serve", "s-fp8@candidate", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                      "--prompt", PROMPTS[3], "--max-tokens", str(MAX_TOKENS), env={"KILN_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert "serving s-fp8/1 (cpu): HTTP http://127.0.0.1:" in result.stdout
    completion = ast.literal_eval(re.search(r"completion: (.*)", result.stdout)[1])
    generator = ReferenceGenerator(repo.path / "artifact" / "hf")
    assert completion == generator.tokenizer.decode(expected_tokens(repo.path, PROMPTS[3]), skip_special_tokens=True)
    assert "tritonserver stopped (exit 0)" in result.stderr
    assert not list((home / "tmp").iterdir())   # the temporary repository is gone


def test_kiln_serve_refuses_an_empty_prompt_and_too_many_tokens_in_one_line(home):
    """Issue 24.5: both were tracebacks."""
    ports = ("--http-port", "0", "--grpc-port", "0", "--metrics-port", "0")
    empty = run_kiln("serve", "s-fp8@candidate", *ports, "--prompt", " ", env={"KILN_HOME": str(home)})
    assert empty.returncode == 2 and empty.stderr.strip() == (
        "kiln: --prompt is empty: nothing to send (fix: give the prompt text, or leave --prompt out to serve until "
        "Ctrl-C)")
    many = run_kiln("serve", "s-fp8@candidate", *ports, "--prompt", PROMPTS[0], "--max-tokens", "5000",
                    env={"KILN_HOME": str(home)})
    assert many.returncode == 2 and "Traceback" not in many.stderr
    assert re.search(r"^kiln: --prompt/--max-tokens: the model refused the request: max_tokens is 5000; with this "
                     r"\d+-token prompt it must be 1 to \d+ \(build.max_seq_len", many.stderr, re.M)


def _http_error(server, inputs) -> InferenceServerException:
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.http}") as http:
        with pytest.raises(InferenceServerException) as failed:
            http.infer("kiln_llm", inputs)
        assert http.is_model_ready("kiln_llm")
    return failed.value


def test_requests_past_the_artifacts_limits_are_client_errors(fp8_server):
    """Issue 13.6: max_tokens 1e9 or a 100,000-token prompt held the only instance for minutes."""
    server, repo = fp8_server
    config = read_config(repo.path / "kiln_llm" / "config.pbtxt")
    max_input_len = int(config.parameters["max_input_len"].string_value)
    max_seq_len = int(config.parameters["max_seq_len"].string_value)
    assert 0 < max_input_len < max_seq_len <= 2048
    huge = _inputs(httpclient, "x")
    huge[1].set_data_from_numpy(np.array([[1_000_000_000]], dtype=np.int32))
    error = _http_error(server, huge)
    assert error.status() == "400" and "max_tokens is 1000000000; with this" in error.message()
    long_prompt = _inputs(httpclient, "word " * (max_input_len + 8))   # over in tokens, not in bytes
    error = _http_error(server, long_prompt)
    assert error.status() == "400"
    assert re.search(rf"text_input is \d+ tokens; this artifact takes at most {max_input_len} ", error.message())


def test_a_100_mb_prompt_is_refused_by_its_size_and_the_next_request_is_answered(fp8_server):
    """Issue 24.4: a 100 MB prompt grew the worker to 20 GB until the OOM killer ended it, and every request
    after it failed while the server said ready; 10-50 MB prompts held every other client for minutes."""
    server, repo = fp8_server
    generator = ReferenceGenerator(repo.path / "artifact" / "hf")
    max_input_len = int(read_config(repo.path / "kiln_llm" / "config.pbtxt").parameters["max_input_len"].string_value)
    limit = generator.max_prompt_bytes(max_input_len)
    # The bound is sound: the longest vocabulary entry repeated max_input_len times is within it.
    longest = max(generator.tokenizer.get_vocab(), key=lambda t: len(t.encode()))
    assert len(generator.tokenizer.convert_tokens_to_string([longest] * max_input_len).encode()) <= limit
    error = _http_error(server, _inputs(httpclient, "x" * (100 * 2**20)))
    assert error.status() == "400"
    assert (f"text_input is {100 * 2**20} bytes; this artifact takes at most {max_input_len} tokens (its recipe's "
            f"build.max_input_len), and no text over {limit} bytes fits") in error.message()
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.http}") as http:
        tokens = http.infer("kiln_llm", _inputs(httpclient, PROMPTS[0])).as_numpy("output_ids")[0].tolist()
    assert tokens == expected_tokens(repo.path, PROMPTS[0])


def test_a_worker_that_dies_is_restarted_and_answers_again(fp8_server):
    """Issue 24.4: after the kernel killed the worker, ready stayed 200 and every request got 500 'Stub process
    is not healthy'. kiln's server watches its stubs and reloads the model."""
    from kiln.serve.workers import stub_instances

    server, repo = fp8_server
    os.kill(stub_instances(server.process.pid)["kiln_llm_0_0"].pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.http}") as http:
        while "kiln_llm" not in server.watch.restarts and time.monotonic() < deadline:
            time.sleep(0.5)
        assert server.watch.restarts == ["kiln_llm"]
        tokens = http.infer("kiln_llm", _inputs(httpclient, PROMPTS[1])).as_numpy("output_ids")[0].tolist()
    assert tokens == expected_tokens(repo.path, PROMPTS[1])
    assert {s.model for s in stub_instances(server.process.pid).values() if s.alive} == {"kiln_llm", "kiln_llm_stream"}


@pytest.mark.parametrize("text, message", [(b"", "text_input is empty: send the prompt text"),
                                           (b"caf\xe9", "text_input is not UTF-8 text (byte 3)")])
def test_empty_or_non_utf8_text_is_a_client_error_with_a_clear_message(fp8_server, text, message):
    """Issue 13.9: both were 500 errors carrying kiln's internal exception."""
    server, _ = fp8_server
    inputs = _inputs(httpclient, "x")
    inputs[0].set_data_from_numpy(np.array([[text]], dtype=np.object_))
    error = _http_error(server, inputs)
    assert error.status() == "400" and message in error.message()
    assert "Traceback" not in error.message() and "kiln." not in error.message()


def test_every_prompt_of_a_batched_request_is_answered(fp8_server):
    """Issue 13.7: a request with two prompts returned one output."""
    server, repo = fp8_server
    pair = [PROMPTS[0], PROMPTS[4]]
    text = grpcclient.InferInput("text_input", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[p.encode()] for p in pair], dtype=np.object_))
    limit = grpcclient.InferInput("max_tokens", [2, 1], "INT32")
    limit.set_data_from_numpy(np.array([[MAX_TOKENS], [3]], dtype=np.int32))
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.grpc}") as grpc:
        result = grpc.infer("kiln_llm", [text, limit])
    ids = result.as_numpy("output_ids").tolist()
    texts = [row[0].decode() for row in result.as_numpy("text_output")]
    first = expected_tokens(repo.path, pair[0])
    second = expected_tokens(repo.path, pair[1])[:3]
    assert len(ids) == len(texts) == 2
    assert ids[0][:len(first)] == first and ids[1][:len(second)] == second
    assert set(ids[0][len(first):] + ids[1][len(second):]) <= {-1}   # rows padded to one length
    generator = ReferenceGenerator(repo.path / "artifact" / "hf")
    assert texts == [generator.tokenizer.decode(t, skip_special_tokens=True) for t in (first, second)]


def test_a_cancelled_request_stops_generating(fp8_server):
    """Issue 13.6: a client that has gone no longer holds the instance."""
    import time

    server, repo = fp8_server
    config = read_config(repo.path / "kiln_llm" / "config.pbtxt")
    room = int(config.parameters["max_seq_len"].string_value) - 8
    inputs = _inputs(grpcclient, PROMPTS[5])
    inputs[1].set_data_from_numpy(np.array([[room]], dtype=np.int32))
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.endpoints.grpc}") as grpc:
        call = grpc.async_infer("kiln_llm", inputs, callback=lambda result, error: answers.put((result, error)))
        time.sleep(1.0)
        call.cancel()
        _, error = answers.get(timeout=60)
        assert error is not None and "cancel" in str(error).lower()
        log = server.log_path
        deadline = time.monotonic() + 120
        while "request cancelled after" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    generated = int(re.findall(r"request cancelled after (\d+) tokens", log.read_text())[-1])
    assert generated < room


def test_kiln_serve_refuses_a_port_another_program_answers_on(home, tmp_path):
    """Issue 13.8: with another program answering /v2/health/ready, kiln said "serving" for a server that had
    exited 1, and pointed at a log file it had already deleted."""
    import http.server

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    impostor = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=impostor.serve_forever, daemon=True)
    thread.start()
    try:
        port = impostor.server_address[1]
        result = run_kiln("serve", "s-fp8@candidate", "--http-port", port, "--grpc-port", "0", "--metrics-port", "0",
                          "--prompt", "x", env={"KILN_HOME": str(home)})
    finally:
        impostor.shutdown()
    assert result.returncode == 2, result.stderr
    assert f"the HTTP port 127.0.0.1:{port} is taken (Address already in use) (fix:" in result.stderr
    assert "serving" not in result.stdout and "Traceback" not in result.stderr


def test_the_serve_front_door_starts_answers_and_cleans_up(home, fp8_server):
    """kiln.serve.start_server: pulled, laid out, started and ready; ask() answers; leaving stops it all."""
    from kiln.common.progress import SILENT
    from kiln.serve import start_server

    _, repo = fp8_server
    with start_server(home, "s-fp8@candidate", "cpu", SILENT, (0, 0, 0)) as running:
        assert running.server.process.poll() is None and running.scratch.is_dir()
        answer = running.ask(PROMPTS[3], MAX_TOKENS)
        # Issue 36.6: a 16 MB body killed tritonserver 2.51's HTTP server (SIGSEGV; about 5 MB and more, JSON or
        # not); kiln's gate refuses it (413) before any of it reaches Triton, and the next request is answered,
        # with the same tokens, through the gate, on one connection after another.
        port = running.server.endpoints.http
        assert port != running.server.triton_http and running.repo.http_body_limit == 2 << 20
        status, body = _post(port, "/v2/models/kiln_llm/generate", json.dumps({"text_input": "x" * (16 << 20)}).encode())
        assert status == 413 and "request body of 16777234 bytes; kiln serve takes at most a full batch" in body
        status, body = _post(port, "/v2/models/kiln_llm/generate", b"{" + b" " * (6 << 20) + b"}")
        assert status == 413 and running.server.process.poll() is None
        status, body = _post(port, "/v2/models/kiln_llm/generate",
                             json.dumps({"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS}).encode())
        assert status == 200 and json.loads(body)["output_ids"] == expected_tokens(repo.path, PROMPTS[0])
        with httpclient.InferenceServerClient(f"127.0.0.1:{port}") as http:   # keep-alive requests through the gate
            for prompt in PROMPTS[1:3]:
                tokens = http.infer("kiln_llm", _inputs(httpclient, prompt)).as_numpy("output_ids")[0].tolist()
                assert tokens == expected_tokens(repo.path, prompt)
    generator = ReferenceGenerator(repo.path / "artifact" / "hf")
    assert answer == generator.tokenizer.decode(expected_tokens(repo.path, PROMPTS[3]), skip_special_tokens=True)
    assert running.server.process.returncode == 0 and not running.scratch.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(running.server.process.pid, 0)


def _post(port: int, path: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_kiln_serve_fails_in_one_line_when_its_server_dies(home):
    """Issue 36.6: after tritonserver died, `kiln serve` kept its endpoints printed with nothing behind them and
    exited 0 on Ctrl-C (pipeline/cli/serve.py never looked)."""
    import subprocess

    from tests.recipes import KILN

    serve = subprocess.Popen([str(KILN), "serve", "s-fp8@candidate", "--http-port", "0", "--grpc-port", "0",
                              "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "KILN_HOME": str(home)}, start_new_session=True)
    try:
        line = serve.stdout.readline()   # "serving ..." once ready
        assert line.startswith("serving s-fp8/1 (cpu)"), (line, serve.stderr.read() if serve.poll() else "")
        server = next(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _is_tritonserver(int(pid), serve.pid))
        os.kill(server, signal.SIGKILL)
        out, err = serve.communicate(timeout=30)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    assert serve.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("kiln: tritonserver died while serving (signal SIGKILL); its "
                                                   "endpoints are closed (its log: ")


def _is_tritonserver(pid: int, session: int) -> bool:
    try:
        return os.getsid(pid) != session and Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(
            b"/bin/tritonserver") and _ancestor(pid, session)
    except OSError:
        return False


def _ancestor(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return False
