"""A fully cached rebuild confirms its registry versions without importing MLflow (or torch), and still
notices a version that was deleted: it then publishes again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kiln.registry import version_confirmed
from tests.conftest import HUNG_S, write_recipe

pytestmark = pytest.mark.slow

VARIANTS = {"fp8": {"quant": "fp8", "gates": {"max_kl": 0.05}}}
# Runs the CLI in this interpreter and reports, at exit, which heavy libraries the run imported.
PROBE = ("import atexit, sys\n"
         "atexit.register(lambda: print('imported:', sorted(m for m in ('mlflow', 'torch', 'modelopt') if m in sys.modules),"
         " file=sys.stderr))\n"
         "sys.argv = ['kiln', *sys.argv[1:]]\n"
         "from kiln.pipeline.cli.app import main\n"
         "main()\n")


def kiln_probed(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=HUNG_S)


def test_cached_rebuild_skips_mlflow_and_republishes_a_deleted_version(tmp_path, test_model, kiln_home):
    recipe = write_recipe(tmp_path, str(test_model), VARIANTS, name="cr", samples=8, seq_len=128,
                          publish={"aliases": ["candidate"]})
    first = kiln_probed("build", recipe, "--json")
    assert first.returncode == 0, first.stderr
    key = next(s["key"] for s in json.loads(first.stdout)["stages"] if s["stage"] == "publish")

    assert version_confirmed(kiln_home, "cr-fp8", "1", key, ["candidate"]) is True
    assert version_confirmed(kiln_home, "cr-fp8", "1", "0" * 64, ["candidate"]) is False
    assert version_confirmed(kiln_home, "cr-fp8", "1", key, ["production"]) is None

    cached = kiln_probed("build", recipe, "--json")
    assert cached.returncode == 0, cached.stderr
    assert json.loads(cached.stdout)["ran"] == []
    assert "imported: []" in cached.stderr, cached.stderr

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{kiln_home / 'registry' / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).delete_model_version("cr-fp8", "1")
    assert version_confirmed(kiln_home, "cr-fp8", "1", key, ["candidate"]) is False
    again = kiln_probed("build", recipe, "--json")
    assert again.returncode == 0, again.stderr
    assert "cr-fp8/1 is gone from the registry; publishing again" in again.stderr
    (variant,) = json.loads(again.stdout)["variants"]
    assert variant["registry"]["version"] == "2"


def test_a_cached_rebuild_says_so_verifies_the_stored_blobs_and_plan_verifies_the_cache(tmp_path, test_model,
                                                                                        kiln_home):
    """Issue 13.18: the cached table looked like a fresh build's. 13.1: an unchanged recipe's rebuild did not
    notice a corrupt blob. 13.17: `kiln plan` said `cached` for a damaged entry."""
    from kiln.common.digest import file_sha256
    from tests.conftest import run_kiln

    recipe = write_recipe(tmp_path, str(test_model), VARIANTS, name="cv", samples=8, seq_len=128)
    first = run_kiln("build", recipe)
    assert first.returncode == 0, first.stderr
    assert "ran 4 stage(s)" in first.stdout and "quantize, validate, size, publish" in first.stdout

    cached = run_kiln("build", recipe)
    assert cached.returncode == 0, cached.stderr
    assert "nothing was recomputed: every stage came from the verified cache" in cached.stdout
    assert "cached" in cached.stdout.split("cv-fp8/1")[1].splitlines()[0]

    blobs = sorted((kiln_home / "registry" / "artifacts" / "blobs").glob("*/*"), key=lambda p: p.stat().st_size)
    biggest = blobs[-1]
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    repaired = run_kiln("build", recipe)
    assert repaired.returncode == 0, repaired.stderr
    assert "1 stored blob(s) of cv-fp8/1 are missing or no longer match their sha256" in repaired.stderr
    assert file_sha256(biggest) == biggest.name
    pulled = run_kiln("pull", "cv-fp8/1", "--out", tmp_path / "pulled", "--gpu", "none")
    assert pulled.returncode == 0, pulled.stderr

    # Issue 24.6: a deleted or altered manifest.json left the version unpullable while rebuilds said confirmed.
    (manifest,) = (kiln_home / "registry" / "artifacts").glob("*/artifacts/artifact/manifest.json")
    stored = manifest.read_text()
    manifest.unlink()
    unpullable = run_kiln("pull", "cv-fp8/1", "--out", tmp_path / "p2", "--gpu", "none")
    assert unpullable.returncode == 1 and "Traceback" not in unpullable.stderr
    assert unpullable.stderr.strip().splitlines()[-1] == (
        "kiln: cv-fp8/1: manifest.json is missing from the registry, so no file can be verified (fix: rebuild its "
        f"recipe with `kiln build`, which writes it again, or pull another version); nothing was written to "
        f"{tmp_path / 'p2'}")
    for damage in ("missing", "altered"):
        rebuilt = run_kiln("build", recipe)
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert (f"cv-fp8/1: its manifest.json was {damage}; wrote it again from this build's verified files"
                in rebuilt.stderr)
        assert json.loads(manifest.read_text()) == json.loads(stored)
        assert run_kiln("pull", "cv-fp8/1", "--out", tmp_path / f"p-{damage}", "--gpu", "none").returncode == 0
        manifest.write_text(stored.replace('"format": 1', '"format": 2'))
    from kiln.registry import MANIFEST_TAG, client

    client(kiln_home).set_model_version_tag("cv-fp8", "1", MANIFEST_TAG, "0" * 64)   # no build reproduces it
    republished = run_kiln("build", recipe, "--json")
    assert republished.returncode == 0, republished.stderr
    assert "cv-fp8/1: its manifest.json was altered, and this build's files do not reproduce" in republished.stderr
    assert json.loads(republished.stdout)["variants"][0]["registry"]["version"] == "2"
    assert client(kiln_home).get_model_version("cv-fp8", "1").tags["kiln.unpullable"].startswith("cv-fp8/1: its")

    weights = next((kiln_home / "cache" / "quantize").glob("*/hf/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    plan = run_kiln("plan", recipe, "--json")
    assert plan.returncode == 0, plan.stderr
    statuses = {s["stage"]: s["status"] for s in json.loads(plan.stdout)["stages"]}
    assert statuses["quantize"] == "will run" and statuses["validate"] == "cached"
    assert f"hf/{weights.name} was altered); a build discards it and runs the stage again" in plan.stderr
    assert weights.exists(), "plan writes nothing, not even a removal"
