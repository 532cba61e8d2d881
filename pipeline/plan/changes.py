"""`kiln plan --changed-since REF`: the recipes and stage instances a merge invalidates.

Each recipe is planned twice, as it is now and as it was at REF (its text from git, planned
from the same folder so relative paths mean the same); an instance whose key differs, or that
is new, is invalidated. Stage keys already cover recipe edits and the model. Version changes
come from the repository's pyproject.toml at both ends: a new kiln version invalidates every
stage but fetch, a new pin of a stage's tool (ModelOpt, transformers, torch) that stage onward.
CI turns `matrix` (recipe x GPU) into jobs.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from kiln.common.errors import KilnError, UserInputError
from kiln.pipeline.plan.runtimes import RUNTIME_CHECKS

# Stages that a tool pin feeds, and the ones downstream of them (their keys chain).
_CHECKS = tuple(check.stage for check in RUNTIME_CHECKS.values())
_DOWNSTREAM = {
    "quantize": ("quantize", "validate", "size", "publish", "compile", "engine-check", *_CHECKS),
    "validate": ("task-baseline", "validate", "publish", "engine-check", *_CHECKS),
}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserInputError(f"--changed-since: git {' '.join(args)}: {done.stderr.strip() or 'failed'} "
                             "(fix: name a commit, branch or tag of this repository, e.g. origin/main)")
    return done.stdout


def _versions(pyproject: str | None) -> tuple[str | None, dict[str, str]]:
    """(kiln's version if this is kiln's own pyproject, {distribution: pin}) from pyproject.toml text."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    if not pyproject:
        return None, {}
    project = tomllib.loads(pyproject).get("project", {})
    pins = {}
    for line in project.get("dependencies", []):
        requirement = Requirement(line)
        pins[canonicalize_name(requirement.name)] = str(requirement.specifier)
    return (project.get("version") if project.get("name") == "kiln" else None), pins


def _stage_tools() -> dict[str, tuple[str, ...]]:
    from packaging.utils import canonicalize_name

    from kiln import quantize, validate

    return {"quantize": tuple(canonicalize_name(t) for t in quantize.TOOLS),
            "validate": tuple(canonicalize_name(t) for t in validate.TOOLS)}


def _keys(plan) -> dict[tuple[str, str], object]:
    return {(i.stage, str(i.target)): i for i in plan.instances}


def changed_since(ref: str, recipes: list[Path], make_plan_for) -> dict:
    """`make_plan_for(path)` plans one recipe file; recipes default to recipes/*.yaml in the repository."""
    root = Path(_git(Path.cwd(), "rev-parse", "--show-toplevel").strip())
    commit = _git(root, "rev-parse", "--verify", f"{ref}^{{commit}}").strip()
    if not recipes:
        listed = _git(root, "ls-files", "recipes/*.yaml", "recipes/*.yml").split()
        recipes = [root / rel for rel in listed]
    old_version, old_pins = _versions(_show(root, commit, "pyproject.toml"))
    new_version, new_pins = _versions(_read(root / "pyproject.toml"))
    kiln_changed = old_version is not None and new_version is not None and old_version != new_version
    moved = {name: [old_pins.get(name), new_pins.get(name)] for name in sorted(set(old_pins) | set(new_pins))
             if old_pins.get(name) != new_pins.get(name)}
    stale_stages: set[str] = set()
    for stage, tools in _stage_tools().items():
        if any(tool in moved for tool in tools):
            stale_stages |= set(_DOWNSTREAM[stage])

    reports, matrix = [], []
    for path in sorted(Path(p).resolve() for p in recipes):
        report = _recipe_changes(root, commit, path, make_plan_for, kiln_changed, stale_stages, moved)
        reports.append(report)
        matrix += [{"recipe": report["path"], "gpu": gpu, "runner": "cpu" if gpu == "cpu" else f"gpu-{gpu}"}
                   for gpu in report["gpus"]]
    return {
        "since": ref, "commit": commit,
        "kiln_version": [old_version, new_version] if kiln_changed else None,
        "pins": moved,
        "recipes": [r for r in reports if r["invalidated"]],
        "unchanged": [r["path"] for r in reports if not r["invalidated"]],
        "matrix": matrix,
    }


def _recipe_changes(root: Path, commit: str, path: Path, make_plan_for, kiln_changed: bool, stale_stages: set[str],
                    moved: dict) -> dict:
    rel = path.relative_to(root).as_posix()
    now = make_plan_for(path)
    reasons, before = [], {}
    old_text = _show(root, commit, rel)
    if old_text is None:
        reasons.append("new recipe")
    else:
        if old_text != path.read_text():
            reasons.append("recipe edited")
        before = _plan_text_at(path, old_text, make_plan_for, reasons)
    if kiln_changed:
        reasons.append("kiln version changed")
    if stale_stages:
        reasons.append("tool pins changed: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in moved.items()))
    invalidated, sms = [], set()
    for (stage, target), instance in _keys(now).items():
        earlier = before.get((stage, target))
        why = ("new" if earlier is None else "key changed" if earlier.key != instance.key
               else "kiln version" if kiln_changed and stage != "fetch"
               else "tool pins" if stage in stale_stages else None)
        if why:
            invalidated.append({"stage": stage, "target": target, "key": instance.key, "why": why,
                                "status": str(instance.status)})
            if instance.target.sm:
                sms.add(instance.target.sm)
    # GPU jobs per SM; a vLLM check runs in the CPU job (on a runner where KILN_VLLM_PYTHON is set).
    gpus = sorted(sms)
    if invalidated and not gpus:
        gpus = ["cpu"]    # only CPU stages changed: one CPU job quantizes, validates and publishes
    return {"path": rel, "name": now.loaded.recipe.name, "reasons": reasons, "invalidated": invalidated, "gpus": gpus}


def _plan_text_at(path: Path, text: str, make_plan_for, reasons: list[str]) -> dict:
    """Plan the recipe's REF text from the recipe's own folder; {} (all new) if it no longer plans."""
    twin = path.with_name(f".kiln-changed-since-{path.name}")
    try:
        twin.write_text(text)
        return _keys(make_plan_for(twin))
    except KilnError as exc:
        reasons.append(f"the recipe at the ref does not plan ({str(exc).splitlines()[0]})")
        return {}
    finally:
        twin.unlink(missing_ok=True)


def _show(root: Path, commit: str, rel: str) -> str | None:
    done = subprocess.run(["git", "-C", str(root), "show", f"{commit}:{rel}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None
