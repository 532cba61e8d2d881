"""ci/github/kiln-build.yml, parsed and run: its shell steps' kiln commands execute here on a CPU.

A temporary git repository with one recipe gets a merge (a gate edited and a variant added);
the workflow's plan job must list exactly what changed, its build job (one per matrix entry)
publishes the checkpoints while kiln skips the GPU stages with their reason, and its promote
job moves `candidate` to what passed. Steps that only install kiln or move files between jobs
(`uses:` actions) are emulated, and every ${{ }} expression must be one this test knows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_kiln, write_recipe

pytestmark = pytest.mark.slow

WORKFLOW = REPO / "ci" / "github" / "kiln-build.yml"
GATES = {"max_ppl_increase_pct": 5, "max_kl": 0.05, "min_top1_agreement": 0.8}
EXPRESSION = re.compile(r"\$\{\{\s*(.+?)\s*\}\}")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def resolve(text: str, context: dict[str, str]) -> str:
    def value(match):
        assert match[1] in context, f"the workflow uses ${{{{ {match[1]} }}}}, which this test does not provide"
        return context[match[1]]
    return EXPRESSION.sub(value, text)


def run_job(job: dict, repo: Path, context: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    """Run a job's shell steps in `repo`; returns what they wrote to $GITHUB_OUTPUT."""
    outputs = repo / ".github-output"
    outputs.write_text("")
    for step in job["steps"]:
        if "uses" in step:
            continue                       # checkout: we are in the repo; artifacts: moved by the test
        if "make venv" in step["run"]:
            continue                       # kiln is installed in this test's environment
        step_env = {k: resolve(str(v), context) for k, v in step.get("env", {}).items()}
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", resolve(step["run"], context)], cwd=repo,
                              env={**env, **step_env, "GITHUB_OUTPUT": str(outputs)}, capture_output=True, text=True)
        assert done.returncode == 0, f"step {step.get('name')}: {done.stderr}"
    return dict(line.split("=", 1) for line in outputs.read_text().splitlines() if "=" in line)


def test_the_ci_workflow_plans_builds_and_promotes_what_a_merge_changed(tmp_path, test_model):
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    on = workflow.get("on", workflow.get(True))   # YAML 1.1 reads the key `on` as True
    assert on["push"]["branches"] == ["main"]
    assert jobs["build"]["needs"] == "plan" and set(jobs["promote"]["needs"]) == {"plan", "build"}
    assert jobs["build"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"

    repo = tmp_path / "recipes-repo"
    (repo / "recipes").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "ci@example.invalid")
    git(repo, "config", "user.name", "ci")
    variants = {"fp8": {"quant": "fp8", "kv_cache": "fp8", "gpus": ["sm90"], "gates": GATES}}
    recipe = write_recipe(repo / "recipes", str(test_model), variants, name="wf")
    untouched = write_recipe(repo / "recipes", str(test_model), variants, name="other")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "before")
    before = git(repo, "rev-parse", "HEAD")
    edited = yaml.safe_load(recipe.read_text())
    edited["variants"]["fp8"]["gates"]["max_kl"] = 0.06
    edited["variants"]["int4-awq"] = {"quant": "int4_awq", "gpus": ["sm89"], "gates": {"max_ppl_increase_pct": 50}}
    recipe.write_text(yaml.safe_dump(edited, sort_keys=False))
    git(repo, "commit", "-q", "-am", "merge: looser fp8 gate, an int4 variant")

    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    context = {"vars.KILN_REGISTRY_URI": registry, "github.workspace": str(repo), "github.event.before": before}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin"}
    env.update({k: resolve(str(v), context) for k, v in workflow["env"].items()})

    planned = run_job(jobs["plan"], repo, context, env)
    assert planned["any"] == "true"
    matrix = json.loads(planned["matrix"])["include"]
    assert matrix == [{"recipe": "recipes/wf.yaml", "gpu": "sm89", "runner": "gpu-sm89"},
                      {"recipe": "recipes/wf.yaml", "gpu": "sm90", "runner": "gpu-sm90"}]
    plan = json.loads((repo / "plan.json").read_text())
    assert plan["unchanged"] == ["recipes/other.yaml"] and untouched.is_file()
    (changed,) = plan["recipes"]
    assert changed["reasons"] == ["recipe edited"]
    stale = {(i["stage"], i["target"]): i["why"] for i in changed["invalidated"]}
    assert stale[("publish", "fp8")] == "key changed"          # the gate edit changes the recipe digest
    assert ("quantize", "fp8") not in stale                    # the fp8 checkpoint itself is unchanged
    assert stale[("quantize", "int4-awq")] == "new" and stale[("compile", "int4-awq@sm89")] == "new"

    builds = repo / "builds"
    for index, entry in enumerate(matrix):
        job_context = {**context, **{f"matrix.{k}": v for k, v in entry.items()}, "strategy.job-index": str(index)}
        run_job(jobs["build"], repo, job_context, env)
        result = json.loads((repo / "build.json").read_text())
        (builds / f"build-{index}").mkdir(parents=True)
        shutil.move(repo / "build.json", builds / f"build-{index}" / "build.json")
        for variant in result["variants"]:
            for engine in variant["engines"]:   # this CPU host builds no engines and says why
                assert engine["status"].startswith(f"skipped: needs an {engine['sm']} GPU host") or \
                    engine["status"].startswith("skipped: not selected")

    run_job(jobs["promote"], repo, context, env)
    rows = json.loads(run_kiln("ls", "--json", env={"KILN_HOME": env["KILN_HOME"],
                                                     "MLFLOW_TRACKING_URI": registry}).stdout)
    assert {(r["name"], r["version"], tuple(r["aliases"])) for r in rows} == {
        ("wf-fp8", "1", ("candidate",)), ("wf-int4-awq", "1", ("candidate",))}
