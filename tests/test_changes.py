"""`kiln plan --changed-since`: what a merge invalidates when kiln's version or a tool pin moves."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import run_kiln, write_recipe

PYPROJECT = '[project]\nname = "kiln"\nversion = "{version}"\ndependencies = ["nvidia-modelopt=={modelopt}", "typer>=0.15"]\n'


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture()
def repo(tmp_path, test_model):
    repo = tmp_path / "repo"
    (repo / "recipes").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "ci@example.invalid")
    git(repo, "config", "user.name", "ci")
    (repo / "pyproject.toml").write_text(PYPROJECT.format(version="0.1.0", modelopt="0.47.0"))
    write_recipe(repo / "recipes", str(test_model), {"fp8": {"quant": "fp8", "gpus": ["sm90"]}}, name="c")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "base")
    return repo


def changes(repo, env) -> dict:
    done = run_kiln("plan", "--changed-since", "HEAD~1", "--json", cwd=repo, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def commit(repo, **versions):
    (repo / "pyproject.toml").write_text(PYPROJECT.format(**{"version": "0.1.0", "modelopt": "0.47.0", **versions}))
    git(repo, "commit", "-q", "-am", "bump")


def test_a_new_kiln_version_invalidates_every_stage_but_fetch(repo, kiln_home):
    commit(repo, version="0.2.0")
    document = changes(repo, {"KILN_HOME": str(kiln_home)})
    assert document["kiln_version"] == ["0.1.0", "0.2.0"] and document["pins"] == {}
    (recipe,) = document["recipes"]
    assert recipe["reasons"] == ["kiln version changed"]
    assert {(i["stage"], i["why"]) for i in recipe["invalidated"]} == {
        ("quantize", "kiln version"), ("validate", "kiln version"), ("size", "kiln version"), ("publish", "kiln version"),
        ("compile", "kiln version"), ("engine-check", "kiln version"), ("vllm-check", "kiln version")}
    assert document["matrix"] == [{"recipe": "recipes/c.yaml", "gpu": "sm90", "runner": "gpu-sm90"}]


def test_a_moved_quantizer_pin_invalidates_quantize_onward_and_an_unrelated_pin_nothing(repo, kiln_home):
    commit(repo, modelopt="0.48.0")
    document = changes(repo, {"KILN_HOME": str(kiln_home)})
    assert document["pins"] == {"nvidia-modelopt": ["==0.47.0", "==0.48.0"]}
    (recipe,) = document["recipes"]
    assert {i["stage"] for i in recipe["invalidated"]} == {"quantize", "validate", "size", "publish", "compile",
                                                           "engine-check", "vllm-check"}
    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text().replace("typer>=0.15", "typer>=0.16"))
    git(repo, "commit", "-q", "-am", "typer")
    unrelated = changes(repo, {"KILN_HOME": str(kiln_home)})
    assert unrelated["recipes"] == [] and unrelated["unchanged"] == ["recipes/c.yaml"] and unrelated["matrix"] == []


def test_a_ref_git_does_not_know_is_one_clear_line(repo, kiln_home):
    done = run_kiln("plan", "--changed-since", "no-such-branch", cwd=repo, env={"KILN_HOME": str(kiln_home)})
    assert done.returncode == 2 and done.stderr.startswith("kiln: --changed-since: git rev-parse")
    assert "Traceback" not in done.stderr
