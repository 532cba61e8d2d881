"""A team registry for real: Debian's PostgreSQL and `mlflow server` with proxied artifacts, both
started here on loopback ports, and kiln pointed at them through MLFLOW_TRACKING_URI only.

Bytes on the wire are counted from the server's own access log (one PUT per uploaded file) and
from its artifact folder, not from what kiln says it sent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kiln.common.progress import SILENT
from kiln.registry.team import LocalPostgres, MlflowServer
from kiln.serve.triton import free_port
from tests.conftest import run_kiln, seed_home, write_recipe

pytestmark = pytest.mark.slow

GATES = {"max_ppl_increase_pct": 5, "max_kl": 0.05, "min_top1_agreement": 0.8}
VARIANTS = {"fp8": {"quant": "fp8", "kv_cache": "fp8", "gates": GATES}}
UPLOAD = '"PUT /api/2.0/mlflow-artifacts/artifacts/'


class TeamRegistry:
    def __init__(self, root: Path):
        # PostgreSQL runs as the `postgres` user when tests run as root: its folder must not sit
        # under pytest's private (0700) temporary root.
        self.database = LocalPostgres(Path(tempfile.mkdtemp(prefix="kiln-pg-")), free_port()).start()
        self.artifacts = root / "artifacts"
        self.log = root / "mlflow-server.log"
        self.server = MlflowServer(self.database.uri, str(self.artifacts), port=free_port(), workers=2,
                                   log_path=self.log).start()
        self.uri = self.server.uri

    def uploads(self) -> int:
        return self.log.read_text().count(UPLOAD)

    def stored(self) -> tuple[int, int]:
        files = [p for p in self.artifacts.rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)

    def blobs(self) -> list[Path]:
        return sorted(p for p in self.artifacts.rglob("blobs/*/*") if p.is_file())

    def query(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.database.uri) as conn:
            return conn.execute(sql).fetchall()

    def close(self) -> None:
        self.server.stop()
        self.database.stop()
        shutil.rmtree(self.database.data, ignore_errors=True)


@pytest.fixture(scope="module")
def team(tmp_path_factory, test_model, spine_cache):
    root = tmp_path_factory.mktemp("team")
    registry = TeamRegistry(root)
    recipe = write_recipe(root, str(test_model), VARIANTS, name="tm", publish={"aliases": ["candidate"]})
    yield {"registry": registry, "root": root, "recipe": recipe, "model": test_model, "spine": spine_cache}
    registry.close()


def runner_env(team, name: str, seed_from: Path | None = None) -> dict:
    """A CI runner: its own kiln home, seeded with another runner's CPU stages (`seed_from`, a kiln home) or, the
    first time, with the session's spine cache (quantize and validate of this recipe's variant), and the team's
    registry."""
    home = team["root"] / name
    if not home.exists():
        seed_home(home, seed_from / "cache" if seed_from is not None else team["spine"])
    return {"KILN_HOME": str(home), "MLFLOW_TRACKING_URI": team["registry"].uri}


def build_json(recipe: Path, env: dict) -> dict:
    built = run_kiln("build", recipe, "--json", env=env)
    assert built.returncode == 0, built.stderr
    return json.loads(built.stdout)   # stdout is JSON only: MLflow's run links must not land there


def test_publish_ls_pull_against_postgres_and_an_mlflow_server(team, tmp_path):
    registry = team["registry"]
    first = build_json(team["recipe"], runner_env(team, "runner-a"))
    (variant,) = first["variants"]
    assert variant["registry"]["version"] == "1"
    assert variant["upload"]["reused_files"] == 0 and variant["upload"]["files"] > 0
    # every blob, the version's manifest, and the accuracy-against-size figure on its run
    assert registry.uploads() == variant["upload"]["files"] + 2
    assert registry.query("SELECT name, version FROM model_versions") == [("tm-fp8", 1)]
    assert registry.query("SELECT name, alias, version FROM registered_model_aliases") == [("tm-fp8", "candidate", 1)]

    # The cached-rebuild check reads the server's REST API without MLflow, and decides as MLflow would.
    from kiln.registry import version_confirmed

    key = next(s["key"] for s in first["stages"] if s["stage"] == "publish")
    home = Path(runner_env(team, "runner-a")["KILN_HOME"])
    os.environ["MLFLOW_TRACKING_URI"] = registry.uri
    try:
        assert version_confirmed(home, "tm-fp8", "1", key, ["candidate"]) is True
        assert version_confirmed(home, "tm-fp8", "1", "0" * 64, ["candidate"]) is False
        assert version_confirmed(home, "tm-fp8", "1", key, ["production"]) is None   # an alias to move: MLflow's job
        assert version_confirmed(home, "tm-fp8", "7", key, []) is False
        # So does the manifest check (issue 24.6): the proxied manifest, against the digest in the version's tags.
        from kiln.registry.confirm import _stored_without_mlflow
        from kiln.registry.manifest import manifest_digest

        manifest, digest, _, trouble = _stored_without_mlflow(home, "tm-fp8", "1")
        assert trouble == "" and manifest_digest(manifest) == digest
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]

    env = runner_env(team, "reader")
    rows = json.loads(run_kiln("ls", "--json", env=env).stdout)
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [("tm-fp8", "1", ["candidate"])]
    pulled = run_kiln("pull", "tm-fp8@candidate", "--out", tmp_path / "pulled", "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    listed = json.loads((tmp_path / "pulled" / "manifest.json").read_text())["files"]
    answer = json.loads(pulled.stdout)
    assert answer["verified"] and answer["files"] == len(listed)
    assert answer["bytes"] == sum(f["size"] for f in listed.values()) >= variant["upload"]["bytes"]


def first_runner(team) -> Path:
    """runner-a's kiln home, after it published version 1 (tests may run alone)."""
    seed = Path(runner_env(team, "runner-a")["KILN_HOME"])
    if not (seed / "cache" / "publish").is_dir():
        build_json(team["recipe"], runner_env(team, "runner-a"))
    return seed


def test_republishing_identical_artifacts_creates_no_version_and_uploads_nothing(team):
    registry = team["registry"]
    seed = first_runner(team)
    before = (registry.uploads(), registry.stored(), registry.query("SELECT count(*) FROM model_versions"))
    again = build_json(team["recipe"], runner_env(team, "runner-b", seed_from=seed))   # fresh cache, same bytes
    (variant,) = again["variants"]
    assert again["ran"] == ["publish:fp8"] and variant["registry"]["version"] == "1"
    assert variant["upload"] == {"files": 0, "bytes": 0, "reused_files": 0, "reused_bytes": 0, "repaired_files": 0}
    after = (registry.uploads(), registry.stored(), registry.query("SELECT count(*) FROM model_versions"))
    assert after == before   # no PUT reached the server, no byte was stored, no version was made

    # A new version whose files are all stored already (only the gates changed): no blob is sent again.
    stricter = team["root"] / "stricter" / "tm.yaml"
    stricter.parent.mkdir()
    stricter.write_text(team["recipe"].read_text().replace("max_kl: 0.05", "max_kl: 0.04"))
    blobs_before, uploads_before = registry.blobs(), registry.uploads()
    (variant,) = build_json(stricter, runner_env(team, "runner-c", seed_from=seed))["variants"]
    assert variant["registry"]["version"] == "2"
    # Only its recipe.json is new (the gate edit); the checkpoint, tokenizer and report are reused.
    assert variant["upload"]["files"] == 1 and variant["upload"]["reused_files"] >= 9
    (new_blob,) = set(registry.blobs()) - set(blobs_before)
    assert json.loads(new_blob.read_text())["variants"]["fp8"]["gates"]["max_kl"] == 0.04
    # that blob, the version's manifest, and the figure on its run (the gate line in it moved)
    assert registry.uploads() == uploads_before + 3


def test_two_times_twenty_concurrent_publishes_lose_and_duplicate_nothing(team, tmp_path):
    """20 different artifacts of 4 registered models (recipes) that do not exist yet, each artifact
    published by two publishers at once: 40 concurrent publishes."""
    from kiln.registry import PUBLISH_KEY_TAG, list_versions, publish, pull

    registry = team["registry"]
    shared = tmp_path / "tokenizer.json"
    shared.write_bytes(os.urandom(256 * 1024))
    artifacts = []
    for index in range(20):
        folder = tmp_path / f"a{index}"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(os.urandom(32 * 1024))
        artifacts.append((f"crowd-{index % 4}", f"key-{index:02d}",
                          {"hf/tokenizer.json": shared, "hf/weights.bin": folder / "weights.bin"}))
    jobs = [job for job in artifacts for _ in range(2)]
    os.environ["MLFLOW_TRACKING_URI"] = registry.uri
    home = tmp_path / "home"
    blobs_before = len(registry.blobs())
    try:
        with ThreadPoolExecutor(40) as pool:
            results = list(pool.map(lambda job: publish(home, job[0], job[2], {PUBLISH_KEY_TAG: job[1]}, [], SILENT),
                                    jobs))
        versions = [(row["name"], row["version"]) for row in list_versions(home) if row["name"].startswith("crowd-")]
        assert len(versions) == 20   # nothing lost, nothing duplicated
        assert sorted({name for name, _ in versions}) == ["crowd-0", "crowd-1", "crowd-2", "crowd-3"]
        by_key: dict[str, set] = {}
        for (name, key, _), result in zip(jobs, results):
            by_key.setdefault(key, set()).add((result.name, result.version))
        assert all(len(found) == 1 for found in by_key.values())   # both publishers of a key got one version
        assert sorted(v for found in by_key.values() for v in found) == sorted(versions)
        # The database agrees: one live version per key (MLflow keeps deleted versions' rows, marked so).
        tagged = registry.query(
            "SELECT t.value FROM model_version_tags t JOIN model_versions v ON v.name = t.name AND "
            "v.version = t.version WHERE t.key = 'kiln.publish_key' AND t.name LIKE 'crowd-%' AND "
            "v.current_stage != 'Deleted_Internal' ORDER BY t.value")
        assert [t[0] for t in tagged] == [key for _, key, _ in artifacts]
        # Each distinct file stored once: the shared tokenizer once, plus one weights file per artifact.
        assert len(registry.blobs()) - blobs_before == 21
        for name, key, files in artifacts[:4]:
            ((_, version),) = by_key[key]
            out = tmp_path / "pulled" / key
            pull(home, f"{name}/{version}", out, SILENT)
            assert (out / "hf" / "weights.bin").read_bytes() == files["hf/weights.bin"].read_bytes()
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_promotion_is_refused_on_a_failed_gate_and_a_forced_one_is_recorded(team):
    seed = first_runner(team)
    impossible = team["root"] / "impossible" / "tm.yaml"
    impossible.parent.mkdir()
    impossible.write_text(team["recipe"].read_text().replace("max_kl: 0.05", "max_kl: 1.0e-05"))
    env = runner_env(team, "runner-d", seed_from=seed)
    failed = run_kiln("build", impossible, "--publish-failed", "--json", env=env)
    assert failed.returncode == 3, failed.stderr   # a failed gate still fails the build
    (variant,) = json.loads(failed.stdout)["variants"]
    bad = variant["registry"]["version"]
    rows = {r["version"]: r for r in json.loads(run_kiln("ls", "--json", env=env).stdout) if r["name"] == "tm-fp8"}
    assert rows[bad]["aliases"] == []   # a failed version gets no alias from the recipe

    assert run_kiln("promote", "tm-fp8", "1", "--alias", "production", env=env).returncode == 0
    refused = run_kiln("promote", "tm-fp8", bad, "--alias", "production", env=env)
    assert refused.returncode == 3 and f"tm-fp8/{bad} is not promoted to production: checkpoint: max_kl:" in \
        refused.stderr
    no_reason = run_kiln("promote", "tm-fp8", bad, "--alias", "production", "--force", env=env)
    assert no_reason.returncode == 2 and "--force needs --reason" in no_reason.stderr
    rows = {r["version"]: r for r in json.loads(run_kiln("ls", "--json", env=env).stdout) if r["name"] == "tm-fp8"}
    assert rows["1"]["aliases"] == ["candidate", "production"] or "production" in rows["1"]["aliases"]

    forced = run_kiln("promote", "tm-fp8", bad, "--alias", "production", "--force", "--reason", "hotfix INC-42",
                      "--json", env={**env, "KILN_ACTOR": "ci-bot"})
    assert forced.returncode == 0, forced.stderr
    answer = json.loads(forced.stdout)
    assert answer["forced"] and answer["previous"] == "1" and answer["overridden"][0].startswith("checkpoint: max_kl:")
    tags = dict(team["registry"].query(
        f"SELECT key, value FROM model_version_tags WHERE name = 'tm-fp8' AND version = {int(bad)} "
        "AND key LIKE 'kiln.promotion.production.%'"))
    assert tags["kiln.promotion.production.by"] == "ci-bot"
    assert tags["kiln.promotion.production.reason"] == "hotfix INC-42"
    assert tags["kiln.promotion.production.forced"] == "true" and tags["kiln.promotion.production.from"] == "1"
    assert "max_kl" in tags["kiln.promotion.production.overrode"]
    assert team["registry"].query("SELECT version FROM registered_model_aliases WHERE name = 'tm-fp8' AND "
                                  "alias = 'production'") == [(int(bad),)]

    compared = run_kiln("diff", "tm-fp8", "1", bad, "--json", env=env)
    assert compared.returncode == 0, compared.stderr
    changes = json.loads(compared.stdout)
    assert changes["recipe"] == {"variants.fp8.gates.max_kl": [0.05, 1e-05]}
    assert changes["gates"] == {"checkpoint": ["pass", "fail"]} and changes["tools"] == {}
    assert changes["metrics"] == {}   # the same checkpoint, measured the same
    assert set(changes["files"]) == {"recipe.json"} and "hf/model.safetensors" in changes["same_bytes"]
    shown = run_kiln("diff", "tm-fp8", "1", bad, env=env)
    assert shown.returncode == 0 and "variants.fp8.gates.max_kl" in shown.stdout


def test_run_metrics_params_and_figure_through_mlflows_rest_api(team):
    """Issue 16: what MLflow's UI charts is on the version's run, read the way the UI reads it."""
    import io
    import urllib.parse
    import urllib.request

    from PIL import Image

    built = build_json(team["recipe"], runner_env(team, "runner-a"))   # cached when the first test ran
    (variant,) = built["variants"]
    uri = team["registry"].uri

    def get(endpoint: str, **query) -> bytes:
        with urllib.request.urlopen(f"{uri}/{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as response:
            return response.read()

    version = json.loads(get("api/2.0/mlflow/model-versions/get", name="tm-fp8",
                             version=variant["registry"]["version"]))["model_version"]
    run = json.loads(get("api/2.0/mlflow/runs/get", run_id=version["run_id"]))["run"]["data"]
    metrics = {m["key"]: m["value"] for m in run["metrics"]}
    params = {p["key"]: p["value"] for p in run["params"]}
    for name, value in variant["metrics"].items():
        assert metrics[name] == pytest.approx(value), name
    assert 7.9 < metrics["bits_per_weight"] < 8.1 and metrics["checkpoint_bytes"] == variant["size"]["checkpoint_bytes"]
    assert (params["format"], params["kv_format"], params["variant"], params["recipe"]) == ("fp8", "fp8", "fp8", "tm")
    assert params["recipe_digest"] == built["recipe_digest"] and params["tool/nvidia-modelopt"] == "0.47.0"

    listed = json.loads(get("api/2.0/mlflow/artifacts/list", run_id=version["run_id"], path="figures"))["files"]
    assert [(f["path"], f["is_dir"]) for f in listed] == [("figures/accuracy-vs-size.png", False)]
    png = get("get-artifact", path="figures/accuracy-vs-size.png", run_uuid=version["run_id"])
    assert len(png) == int(listed[0]["file_size"]) > 10_000
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size[0] >= 900 and len(set(image.getdata())) > 50
