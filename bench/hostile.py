"""Replay issues 24's and 36's hostile inputs end to end, as a user would type them, and print what held.

    python bench/hostile.py [--keep]          (make hostile)

Builds the test model's fp8 and int4-awq variants into a temporary KILN_HOME, starts a real
`mlflow server` (SQLite backend, proxied artifacts) on a loopback port and publishes there too,
serves the fp8 version with the real tritonserver, then tries each numbered failure of issue 24
through the `kiln` command (and tritonclient, for the server). Each row says what was tried, what
kiln must do, and whether it did. Exit 1 when any attempt did not hold. About 4 minutes on 2 cores.
Every item also has its own test in tests/; this script is the end-to-end evidence the README cites.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]   # bench/hostile_trust.py, and the suite's helpers (no pytest)

import hostile_trust  # noqa: E402
KILN = Path(sys.executable).with_name("kiln")
ROWS: list[tuple[str, str, bool, str]] = []


def kiln(*args, env: dict | None = None, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(KILN), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line(result: subprocess.CompletedProcess, code: int) -> bool:
    """Exit `code`, no traceback, and the failure is kiln's own line."""
    return (result.returncode == code and "Traceback" not in result.stderr
            and result.stderr.strip().splitlines()[-1].startswith("kiln: "))


def row(item: str, attempt: str, held: bool, seen: str) -> None:
    ROWS.append((item, attempt, held, seen.strip().splitlines()[-1][:150] if seen.strip() else ""))
    print(f"{'held' if held else 'FAILED':6} {item:5} {attempt}", file=sys.stderr, flush=True)


def recipe_for(root: Path, model: Path, name: str, variants: dict) -> Path:
    import yaml

    data = {"kiln": 1, "name": name, "model": {"source": str(model)},
            "calibration": {"builtin": "python-docs-train", "samples": 8, "seq_len": 64},
            "evaluation": {"builtin": "python-docs-heldout", "samples": 8, "seq_len": 64},
            "variants": variants, "publish": {"aliases": ["candidate"]}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def writes(root: Path, env: dict, recipe: Path) -> None:
    if os.geteuid() == 0:
        null = root / "null"
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        result = kiln("report", recipe, "--out", null, env=env)
        row("24.1", "report --out <a /dev/null device node>", result.returncode == 0
            and stat.S_ISCHR(os.lstat(null).st_mode), result.stderr or "still a character device")
    result = kiln("report", recipe, "--out", "/dev/stdout", env=env)
    row("24.1", "report --out /dev/stdout", result.returncode == 0 and result.stdout.startswith("<!doctype html>"),
        "the page streamed to stdout" if result.returncode == 0 else result.stderr)
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(root / "sock"))
        result = kiln("report", recipe, "--out", root / "sock", env=env)
        row("24.1", "report --out <a unix socket>", one_line(result, 2) and stat.S_ISSOCK(os.lstat(root / "sock").st_mode),
            result.stderr)

    (root / "empty").mkdir()
    (root / "link").symlink_to(root / "empty")
    result = kiln("pull", "h-fp8/1", "--out", root / "link", "--gpu", "none", env=env)
    row("24.2", "pull --out <a link to an empty folder>", result.returncode == 0 and
        (root / "empty" / "manifest.json").is_file(), result.stdout or result.stderr)
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda ref: kiln("pull", ref, "--out", root / "shared", "--gpu", "none", env=env),
                             ["h-fp8/1", "h-int4-awq/1"]))
    winners = [r for r in both if r.returncode == 0]
    manifest = json.loads((root / "shared" / "manifest.json").read_text()) if (root / "shared").is_dir() else {}
    verified = len(winners) == 1 and winners[0].stdout.split(":")[1].strip().startswith(f"{len(manifest['files'])}")
    row("24.2", "two pulls into one new --out at once", verified and all(one_line(r, 1) for r in both if r not in winners),
        "; ".join((r.stdout or r.stderr).strip().splitlines()[-1][:70] for r in both))

    for special in "?#":
        parent = root / f"uri{ord(special)}"
        parent.mkdir()
        result = kiln("ls", env={"KILN_HOME": str(parent / f"a{special}b")})
        row("24.3", f"KILN_HOME with {special!r}: kiln ls", one_line(result, 2) and not any(parent.iterdir())
            and not (root / "a").exists(), result.stderr)

    result = kiln("triton-repo", "h-fp8@candidate", "--stack", "vllm", "--out", "vr2", "--json", env=env, cwd=root)
    document = json.loads(result.stdout) if result.returncode == 0 else {}
    model_json = json.loads(next((root / "vr2").glob("*/1/model.json")).read_text()) if document else {}
    row("24.14", "triton-repo --stack vllm --out vr2 (relative)", bool(document) and
        model_json["model"].startswith(str(root.resolve())) and f" {root.resolve() / 'vr2'}:" in
        document["container_command"], json.dumps(model_json.get("model")))


def server(root: Path, env: dict, home: Path) -> None:
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from kiln.common.progress import SILENT
    from kiln.serve import start_server
    from kiln.serve.workers import stub_instances

    os.environ["KILN_HOME"] = str(home)
    running = start_server(home, "h-fp8@candidate", "cpu", SILENT, (0, 0, 0))
    try:
        def ask(text: str):
            inputs = [httpclient.InferInput("text_input", [1, 1], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
            with httpclient.InferenceServerClient(f"127.0.0.1:{running.endpoints.http}", network_timeout=600) as c:
                return c.infer("kiln_llm", inputs).as_numpy("text_output")[0][0].decode()

        started = time.monotonic()
        try:
            ask("x" * (100 * 2**20))
            refused = "answered"
        except InferenceServerException as exc:
            refused = f"[{exc.status()}] {exc.message()}"
        took = time.monotonic() - started
        after = ask("def parse_args(argv):")
        # Since issue 36, kiln serve's HTTP gate refuses it by its body size before Triton reads it.
        row("24.4", "a 100 MB prompt, then a normal one", refused.startswith("[413] request body of 104857")
            and bool(after), f"refused in {took:.1f} s: {refused[:90]}; next request answered")
        os.kill(stub_instances(running.server.process.pid)["kiln_llm_0_0"].pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not running.server.watch.restarts and time.monotonic() < deadline:
            time.sleep(0.5)
        answered = ask("def parse_args(argv):") if running.server.watch.restarts else ""
        row("24.4", "the worker killed (SIGKILL, as the OOM killer does)", bool(answered),
            f"restarted: {running.server.watch.restarts}; next request answered")
    finally:
        running.stop()
    ports = ("--http-port", "0", "--grpc-port", "0", "--metrics-port", "0")
    for extra in (("--prompt", ""), ("--prompt", "def f", "--max-tokens", "5000")):
        result = kiln("serve", "h-fp8@candidate", *ports, *extra, env=env)
        row("24.5", "serve " + " ".join(repr(e) if e == "" else e for e in extra), one_line(result, 2), result.stderr)


def registry(root: Path, env: dict, home: Path, recipe: Path, team: str) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home / 'registry' / 'mlflow.db'}"
    mlflow = MlflowClient(tracking_uri=uri, registry_uri=uri)
    manifests = sorted((home / "registry" / "artifacts").glob("*/artifacts/artifact/manifest.json"))
    fp8_source = mlflow.get_model_version("h-fp8", "1").source[len("file://"):]
    manifest = Path(fp8_source) / "manifest.json"
    assert manifest in manifests
    manifest.unlink()
    pulled = kiln("pull", "h-fp8/1", "--out", root / "p-nomanifest", "--gpu", "none", env=env)
    rebuilt = kiln("build", recipe, env=env)
    again = kiln("pull", "h-fp8/1", "--out", root / "p-repaired", "--gpu", "none", env=env)
    row("24.6", "manifest.json deleted: pull, build, pull", one_line(pulled, 1) and rebuilt.returncode == 0 and
        "wrote it again from this build's verified files" in rebuilt.stderr and again.returncode == 0,
        again.stdout or again.stderr)
    team_env = {**env, "MLFLOW_TRACKING_URI": team}
    team_client = MlflowClient(tracking_uri=team, registry_uri=team)
    stored = team_client.get_model_version("h-fp8", "1").source
    team_manifest = next(p for p in (root / "team-artifacts").rglob("manifest.json") if
                         stored.rstrip("/").split("/")[-3] in str(p))
    team_manifest.write_text(team_manifest.read_text().replace('"format": 1', '"format": 2'))
    rebuilt = kiln("build", recipe, env=team_env)
    again = kiln("pull", "h-fp8/1", "--out", root / "p-team", "--gpu", "none", env=team_env)
    row("24.6", "manifest.json altered on the mlflow server: build, pull", rebuilt.returncode == 0 and
        "was altered; wrote it again" in rebuilt.stderr and again.returncode == 0, again.stdout or again.stderr)

    sha = json.loads(manifest.read_text())["files"]["recipe.json"]["sha256"]
    recipe_blob = home / "registry" / "artifacts" / "blobs" / sha[:2] / sha
    original = recipe_blob.read_bytes()
    assert b"0.05" in original
    recipe_blob.write_bytes(original.replace(b"0.05", b"999"))   # the fp8 variant's max_kl gate
    result = kiln("diff", "h-fp8", "1", "1", env=env)
    recipe_blob.write_bytes(original)
    row("24.7", "diff with recipe.json rewritten to max_kl 999", one_line(result, 1) and "999" not in result.stdout,
        result.stderr)

    broken = root / "broken-home"
    shutil.copytree(home / "registry", broken / "registry", ignore=shutil.ignore_patterns("artifacts"))
    database = broken / "registry" / "mlflow.db"
    database.write_bytes(database.read_bytes()[: database.stat().st_size // 3])
    before = database.read_bytes()
    result = kiln("ls", env={"KILN_HOME": str(broken)})
    row("24.8", "mlflow.db truncated: kiln ls", one_line(result, 1) and database.read_bytes() == before, result.stderr)

    # A version as an older kiln published it (tags, no run records), whose run was then deleted.
    from kiln.common.progress import SILENT
    from kiln.registry import PUBLISH_KEY_TAG, publish

    tags = {k: v for k, v in mlflow.get_model_version("h-int4-awq", "1").tags.items() if not k.startswith("kiln.run")}
    (root / "old.bin").write_bytes(b"an older kiln's checkpoint")
    old = publish(home, "h-old", {"hf/w.bin": root / "old.bin"}, {**tags, PUBLISH_KEY_TAG: "older-kiln"}, [], SILENT)
    mlflow.delete_run(old.run_id)
    result = kiln("registry", "backfill", env=env)
    row("24.9", "registry backfill after a run was deleted", result.returncode == 0 and
        "h-old/1: skipped: its run" in result.stdout, " ".join(result.stdout.split()))

    for force in ("first reason", "second reason"):
        kiln("promote", "h-int4-awq", "1", "--alias", "production", "--force", "--reason", force, env=env)
    events = [k for k in mlflow.get_model_version("h-int4-awq", "1").tags if ".production.event." in k]
    row("24.12", "two forced promotions of one version", len(events) == 2, f"{len(events)} promotion records")

    # h-old's run was deleted above: since issue 36 verify reports it (mlflow gc would remove its files), and only it.
    result = kiln("registry", "verify", env=env)
    refused = [line for line in result.stdout.splitlines() if "not pullable" in line]
    row("24.8", "registry verify after the repairs (embedded; h-old's run deleted)", result.returncode == 1 and
        len(refused) == 1 and refused[0].startswith("h-old/1: not pullable: its run"), " ".join(refused))
    result = kiln("registry", "verify", env=team_env)
    row("24.8", "registry verify after the repairs (mlflow server)", result.returncode == 0 and
        "every one can be pulled" in result.stdout, result.stdout or result.stderr)

    huge = "99999999999999999999999"
    results = [kiln("pull", f"h-fp8/{huge}", "--out", root / "p-huge", "--gpu", "none", env=env),
               kiln("promote", "h-fp8", huge, "--alias", "x", env=env), kiln("diff", "h-fp8", "1", huge, env=env)]
    row("24.15", "pull, promote and diff of version 99999999999999999999999", all(one_line(r, 2) for r in results),
        results[0].stderr)


def stalling_registry(root: Path) -> None:
    import http.server

    release = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/health":
                release.wait(300)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    stall = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    stall.daemon_threads = True
    threading.Thread(target=stall.serve_forever, daemon=True).start()
    started = time.monotonic()
    result = kiln("ls", env={"KILN_HOME": str(root / "stall-home"),
                             "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{stall.server_address[1]}"})
    took = time.monotonic() - started
    release.set()
    stall.shutdown()
    row("24.10", "a registry that answers /health and stalls on its API", one_line(result, 1) and took < 30,
        f"{took:.1f} s: {result.stderr}")


def smaller(root: Path, env: dict, model: Path, team_env: dict) -> None:
    dollar = root / "m$1 $x$"
    dollar.symlink_to(model, target_is_directory=True)
    recipe = recipe_for(root, dollar, "d", {"fp8": {"quant": "fp8"}})
    first, second = kiln("build", recipe, env=env), kiln("build", recipe, env=env)
    report = kiln("report", recipe, "--out", root / "d.html", env=env)
    row("24.11", "a model path with $: build twice, report", first.returncode == second.returncode ==
        report.returncode == 0, (report.stderr or report.stdout))

    # Two publishers of one checkpoint at once, against the mlflow server: one version stays, and every run
    # that is not behind it is deleted, not left FINISHED beside it.
    from mlflow.tracking import MlflowClient

    script = ("import sys; from pathlib import Path; from kiln.common.progress import SILENT; "
              "from kiln.registry import PUBLISH_KEY_TAG, publish; "
              "print(publish(Path(sys.argv[1]), sys.argv[3], {'hf/w.bin': Path(sys.argv[2])}, "
              "{PUBLISH_KEY_TAG: 'k-race'}, [], SILENT).version)")
    (root / "w.bin").write_bytes(os.urandom(1 << 20))
    team = MlflowClient(tracking_uri=team_env["MLFLOW_TRACKING_URI"], registry_uri=team_env["MLFLOW_TRACKING_URI"])
    outcomes = []
    for round_ in range(3):   # a race is not forced; three rounds of three give it chances
        name = f"race-{round_}"
        racers = [subprocess.Popen([sys.executable, "-c", script, str(root / "race-home"), str(root / "w.bin"), name],
                                   env={**os.environ, **team_env}, stdout=subprocess.PIPE, text=True)
                  for _ in range(3)]
        reported = {p.communicate()[0].strip() for p in racers}
        kept = team.search_model_versions(f"name='{name}'")
        runs = team.search_runs([e.experiment_id for e in team.search_experiments()],
                                f"tags.`kiln.registered_model` = '{name}'")
        outcomes.append((len(kept) == 1 and reported == {str(kept[0].version)} and
                         [r.info.run_id for r in runs] == [kept[0].run_id], sorted(reported), len(runs)))
    row("24.13", "three publishers of one checkpoint at once, three rounds (mlflow server)",
        all(held for held, _, _ in outcomes), "; ".join(f"reported {'/'.join(versions)}, {runs} active run(s)"
                                                        for _, versions, runs in outcomes))

    flat = root / "flat.txt"
    with flat.open("wb") as handle:
        handle.truncate(2 * 2**30)   # 2 GB, sparse: no blank line anywhere
    recipe = recipe_for(root, model, "c", {"fp8": {"quant": "fp8"}})
    recipe.write_text(recipe.read_text().replace("builtin: python-docs-train", f"file: {flat}"))
    result = kiln("check", recipe, env=env)
    row("24.16", "check with a 2 GB calibration file without a blank line", one_line(result, 2) and
        "no blank line between paragraphs" in result.stderr, result.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print it")
    args = parser.parse_args()

    from tests.testmodel import ensure_test_model
    from kiln.registry.team import MlflowServer
    from kiln.serve.triton import free_port

    root = Path(tempfile.mkdtemp(prefix="kiln-hostile-")).resolve()
    home = root / "home"
    env = {"KILN_HOME": str(home), "MLFLOW_TRACKING_URI": "", "KILN_PROGRESS_INTERVAL_S": "3600"}
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    team = MlflowServer(f"sqlite:///{root / 'team.db'}", str(root / "team-artifacts"), port=free_port(),
                        workers=2, log_path=root / "mlflow-server.log")
    try:
        model = ensure_test_model()
        recipe = recipe_for(root, model, "h", {"fp8": {"quant": "fp8", "gates": {"max_kl": 0.05}},
                                               "int4-awq": {"quant": "int4_awq"}})
        print(f"building {recipe.name} into {home} (the test model; fp8 and int4-awq)", file=sys.stderr, flush=True)
        built = kiln("build", recipe, env={**env, "KILN_PROGRESS_INTERVAL_S": "1"})   # a CI log's lines, often
        if built.returncode != 0:
            print(built.stderr, file=sys.stderr)
            return 1
        counts = [line.split(":")[1].split()[0] for line in built.stderr.splitlines()
                  if line.startswith("calibrate") and "/" in line.split(":")[1].split()[0]]
        row("24.17", "build int4-awq: calibration progress lines", all(
            int(c.split("/")[0]) <= int(c.split("/")[1]) for c in counts) and any("(pass 2)" in line for line in
                                                                                   built.stderr.splitlines()),
            ", ".join(counts))
        team.start()
        team_env = {**env, "MLFLOW_TRACKING_URI": team.uri}
        published = kiln("build", recipe, env=team_env)
        if published.returncode != 0:
            print(published.stderr, file=sys.stderr)
            return 1
        writes(root, env, recipe)
        server(root, env, home)
        registry(root, env, home, recipe, team.uri)
        stalling_registry(root)
        smaller(root, env, model, team_env)
        print("issue 36's attempts", file=sys.stderr, flush=True)
        hostile_trust.run(root, env, home, model, SimpleNamespace(kiln=kiln, row=row, one_line=one_line,
                                                                  recipe_for=recipe_for))
    finally:
        team.stop()
        if args.keep:
            print(f"kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    width = max(len(attempt) for _, attempt, _, _ in ROWS)
    print(f"| item  | attempt{' ' * (width - 7)} | held | what kiln did |")
    print(f"|-------|{'-' * (width + 2)}|------|---------------|")
    for item, attempt, held, seen in sorted(ROWS, key=lambda r: [int(n) for n in r[0].split(".")]):
        print(f"| {item:5} | {attempt:{width}} | {'yes' if held else 'NO':4} | {seen.replace('|', '/')} |")
    failed = [r for r in ROWS if not r[2]]
    print(f"\n{len(ROWS) - len(failed)} of {len(ROWS)} attempts held")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
