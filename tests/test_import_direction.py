"""The house's import rules (issue 14): kiln.common imports no other part of kiln; no stage imports
kiln.pipeline; a stage uses another stage only through that stage's entry point (`from kiln.quantize
import X`, never `from kiln.quantize.formats import X`)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

STAGES = ("quantize", "compile", "validate", "registry", "serve")


def kiln_imports(folder: Path) -> list[tuple[str, int, str]]:
    """(file, line, imported kiln module) for every import anywhere in the folder's modules, lazy ones too."""
    return [found for found in _imports(folder) if found[2].split(".")[0] == "kiln"]


def violations() -> list[str]:
    problems = []
    for file, line, module in kiln_imports(REPO / "common"):
        if not module.startswith("kiln.common"):
            problems.append(f"{file}:{line}: kiln.common imports {module}")
    for stage in STAGES:
        for file, line, module in kiln_imports(REPO / stage):
            parts = module.split(".")
            if parts[1] == "pipeline":
                problems.append(f"{file}:{line}: the {stage} stage imports {module} (the pipeline imports stages, "
                                "not the other way round; shared code belongs in kiln.common)")
            elif parts[1] in STAGES and parts[1] != stage and len(parts) > 2:
                problems.append(f"{file}:{line}: {module} reaches past the {parts[1]} stage's entry point "
                                f"(import from kiln.{parts[1]}, and export the name there)")
    return problems


def test_imports_point_one_way():
    assert violations() == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The rule can fail: a stage module that imports the pipeline, or another stage's internals, is reported."""
    fake = tmp_path / "repo"
    for folder in ("common", *STAGES):
        (fake / folder).mkdir(parents=True)
    (fake / "serve" / "bad.py").write_text("from kiln.pipeline.recipe.schema import Recipe\n"
                                           "def f():\n    from kiln.validate.runtime import load_reference_model\n")
    (fake / "common" / "bad.py").write_text("import kiln.registry\n")
    monkeypatch.setattr("tests.test_import_direction.REPO", fake)
    assert violations() == [
        "common/bad.py:1: kiln.common imports kiln.registry",
        "serve/bad.py:1: the serve stage imports kiln.pipeline.recipe.schema (the pipeline imports stages, not the other "
        "way round; shared code belongs in kiln.common)",
        "serve/bad.py:3: kiln.validate.runtime reaches past the validate stage's entry point (import from "
        "kiln.validate, and export the name there)",
    ]


def test_only_the_registry_store_imports_mlflow():
    """registry/store.py says it is the one module that imports MLflow (a 3 s import, and its API in one place)."""
    importers = sorted({file for folder in ("common", "pipeline", *STAGES) for file, _, module in
                        _imports(REPO / folder) if module.split(".")[0] == "mlflow"})
    assert importers == ["registry/store.py"]


def _imports(folder: Path) -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((str(path.relative_to(REPO)), node.lineno, node.module))
            elif isinstance(node, ast.Import):
                found += [(str(path.relative_to(REPO)), node.lineno, alias.name) for alias in node.names]
    return found
