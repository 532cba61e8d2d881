"""Tags written by the publish side are read back by promote, diff and ls (issue 14.1): both sides use
kiln.registry.tags, the functions the runner calls to tag a variant's version and an SM's engines."""

from __future__ import annotations

import pytest

from kiln.common.digest import file_sha256
from kiln.common.errors import GateFailed
from kiln.common.progress import SILENT
from kiln.registry import add_sm, diff, list_versions, promote, publish
from kiln.registry.tags import checkpoint_tags, engine_tags, gate_failures, held_sms


def _checkpoint(tmp_path, key: str, payload: bytes, passed: bool, kl: float):
    folder = tmp_path / key
    folder.mkdir()
    (folder / "w.bin").write_bytes(payload)
    tags = checkpoint_tags(
        publish_key=key, recipe="r", recipe_digest="d" * 64, variant="fp8", source="local:abc", revision="abc",
        quant="fp8", kv_cache="fp8", algorithm="max", export_quant_algo="FP8", group_size="",
        metrics={"ppl_increase_pct": 1.5, "mean_kl": kl, "top1_agreement": 0.97},
        tools={"nvidia-modelopt": "0.47.0", "kiln": key}, passed=passed,
        failures=[] if passed else [f"mean KL {kl} > 0.05"])
    return folder / "w.bin", tags


def test_tags_written_for_a_build_are_read_by_promote_diff_and_ls(kiln_home, tmp_path):
    weights, tags = _checkpoint(tmp_path, "k1", b"first", passed=False, kl=0.08)
    first = publish(kiln_home, "r-fp8", {"hf/w.bin": weights}, tags, [], SILENT)
    with pytest.raises(GateFailed, match=r"checkpoint: mean KL 0.08 > 0.05"):
        promote(kiln_home, "r-fp8", first.version, "production")

    weights, tags = _checkpoint(tmp_path, "k2", b"second", passed=True, kl=0.01)
    second = publish(kiln_home, "r-fp8", {"hf/w.bin": weights}, tags, [], SILENT)
    assert promote(kiln_home, "r-fp8", second.version, "candidate").alias == "candidate"

    engine = tmp_path / "engine.bin"
    engine.write_bytes(b"engine")
    sm_tags = engine_tags("sm90", target="trtllm-engine", tensorrt="10.14.1", tensorrt_llm="1.2.0", gpu="H100",
                          metrics={"mean_kl": 0.2}, passed=False, failures=["mean KL 0.2 > 0.05"])
    add_sm(kiln_home, second, "sm90", {"engines/sm90/rank0.engine": engine}, sm_tags, "p-sm90",
           {"inputs": {"hf/w.bin": file_sha256(weights)}}, SILENT)
    with pytest.raises(GateFailed, match=r"sm90: mean KL 0.2 > 0.05"):
        promote(kiln_home, "r-fp8", second.version, "production")

    rows = {row["version"]: row for row in list_versions(kiln_home)}
    assert rows["2"]["quant"] == "fp8" and rows["2"]["kv_cache"] == "fp8" and rows["2"]["sms"] == ["sm90"]
    assert (rows["1"]["mean_kl"], rows["2"]["mean_kl"], rows["2"]["top1_agreement"]) == (0.08, 0.01, 0.97)
    assert rows["2"]["aliases"] == ["candidate"]

    changes = diff(kiln_home, "r-fp8", "1", "2")
    assert changes["metrics"]["checkpoint.mean_kl"][:2] == [0.08, 0.01]
    assert changes["metrics"]["sm90.mean_kl"] == [None, 0.2, None]
    assert changes["gates"] == {"checkpoint": ["fail", "pass"], "sm90": [None, "fail"]}
    assert changes["tools"] == {"kiln": ["k1", "k2"], "sm90.tensorrt": [None, "10.14.1"],
                                "sm90.tensorrt_llm": [None, "1.2.0"]}


def test_gate_failures_names_each_unpassed_gate():
    tags = {**engine_tags("sm90", target="t", tensorrt="", tensorrt_llm="1", gpu="g", metrics={}, passed=True,
                          failures=[]), "kiln.sm.sm90.manifest_sha256": "x"}
    assert held_sms(tags) == ["sm90"]
    assert gate_failures(tags) == ["checkpoint: no gate result recorded"]


def test_diff_shows_only_what_the_manifests_verify(kiln_home, tmp_path):
    """Issue 24.7: a truncated recipe.json gave a traceback; one rewritten with max_kl 999 was shown as fact. And
    issue 13.11: `kiln diff NAME V1 V2` from the command line failed for every pair (TypeError: PosixPath / int)."""
    import json

    from kiln.common.progress import SILENT
    from kiln.registry import PUBLISH_KEY_TAG
    from tests.conftest import run_kiln

    for key, max_kl in (("a", 0.05), ("b", 0.1)):
        folder = tmp_path / key
        folder.mkdir()
        (folder / "w.bin").write_bytes(key.encode())
        (folder / "recipe.json").write_text(json.dumps({"gates": {"max_kl": max_kl}}))
        publish(kiln_home, "m", {"hf/w.bin": folder / "w.bin", "recipe.json": folder / "recipe.json"},
                {PUBLISH_KEY_TAG: key}, [], SILENT)
    env = {"KILN_HOME": str(kiln_home)}
    shown = run_kiln("diff", "m", "1", "2", "--json", env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["recipe"] == {"gates.max_kl": [0.05, 0.1]}
    assert "Traceback" not in shown.stderr and "hf/w.bin" in shown.stdout   # the files that differ are listed
    # Issue 37.6: the references pull and serve take name the same versions (the older NAME V1 V2 still works).
    from kiln.registry import set_aliases

    set_aliases(kiln_home, "m", "2", ["candidate"])
    by_refs = run_kiln("diff", "m/1", "m@candidate", "--json", env=env)   # both reference forms in one call
    assert json.loads(by_refs.stdout) == json.loads(shown.stdout), by_refs.stderr
    for refs, line in ((("m/1",), "give 2 reference(s)"), (("m/1", "n/2"), "versions of one registered model only")):
        refused = run_kiln("diff", *refs, env=env)
        assert refused.returncode == 2 and line in refused.stderr and len(refused.stderr.splitlines()) == 1

    blob = next(p for p in (kiln_home / "registry" / "artifacts" / "blobs").glob("*/*")
                if p.read_bytes() == json.dumps({"gates": {"max_kl": 0.1}}).encode())
    for altered in (b'{"gates": {"max_k', json.dumps({"gates": {"max_kl": 999}}).encode()):
        blob.write_bytes(altered)
        refused = run_kiln("diff", "m", "1", "2", "--json", env=env)
        assert refused.returncode == 1 and refused.stdout == "" and "Traceback" not in refused.stderr
        reason = "size" if len(altered) < 20 else "sha256"
        assert refused.stderr.startswith(f"kiln: m/2: recipe.json: {reason} ")
    stored = sorted((kiln_home / "registry" / "artifacts").glob("*/artifacts/artifact/manifest.json"))
    for path in stored:
        path.write_text(path.read_text().replace('"format": 1', '"format": 2'))
    refused = run_kiln("diff", "m", "1", "2", env=env)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        "kiln: m/1: manifest.json was altered: its digest differs from the one recorded at publish time")


def test_every_forced_promotion_keeps_its_own_record(kiln_home, tmp_path, monkeypatch):
    """Issue 24.12: a second forced promote of one version and alias overwrote the first reason and time."""
    from kiln.registry import client
    from kiln.registry.promotion import promotion_history

    weights, tags = _checkpoint(tmp_path, "k1", b"first", passed=False, kl=0.08)
    version = publish(kiln_home, "r-fp8", {"hf/w.bin": weights}, tags, [], SILENT).version
    for who, why in (("ana", "hotfix for incident 12"), ("bo", "rollback test")):
        monkeypatch.setenv("KILN_ACTOR", who)
        assert promote(kiln_home, "r-fp8", version, "production", force=True, reason=why).forced
    stored = client(kiln_home).get_model_version("r-fp8", version).tags
    history = promotion_history(stored, "production")
    assert [(r["by"], r["reason"], r["forced"]) for r in history] == [
        ("ana", "hotfix for incident 12", "true"), ("bo", "rollback test", "true")]
    assert history[0]["at"] <= history[1]["at"] and history[1]["from"] == version
    assert stored["kiln.promotion.production.reason"] == "rollback test"   # the latest, as before
