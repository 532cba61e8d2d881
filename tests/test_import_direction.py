"""The house's import rules (issue 14): kiln.common imports no other part of kiln; no stage imports
kiln.pipeline; a stage uses another stage only through that stage's entry point (`from kiln.quantize
import X`, never `from kiln.quantize.formats import X`). And no import loop (issue 37), not even one that a
function-local import hides: between modules (kiln's and bench's), or between stages."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

STAGES = ("quantize", "compile", "validate", "registry", "serve")
KILN_FOLDERS = ("common", "pipeline", *STAGES)


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


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules it imports, for kiln's folders (as kiln.<folder>...) and bench/ (as bench.<name>, which
    its scripts import by bare name). Every import counts, function-local ones too; `from package import name`
    points at the submodule when `name` is one, else at the package."""
    files = {".".join(("kiln", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
             for folder in KILN_FOLDERS if (root / folder).is_dir() for p in (root / folder).rglob("*.py")}
    files.update({f"bench.{p.stem}": p for p in (root / "bench").glob("*.py")} if (root / "bench").is_dir() else {})
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                target = f"bench.{target}" if name.startswith("bench.") and f"bench.{target}" in files else target
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one node (Tarjan), each as sorted names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def stage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """kiln.<stage> -> the other stages its modules import (any module of them)."""
    def stage(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if parts[0] == "kiln" and parts[1] in STAGES else None

    edges: dict[str, set[str]] = {s: set() for s in STAGES}
    for module, targets in graph.items():
        for target in targets:
            if stage(module) and stage(target) and stage(module) != stage(target):
                edges[stage(module)].add(stage(target))
    return edges


def test_no_import_loops():
    graph = import_graph(REPO)
    assert len(graph) > 100 and any(name.startswith("bench.") for name in graph)
    assert import_cycles(graph) == []
    assert import_cycles(stage_graph(graph)) == []


def test_the_loop_check_sees_a_hidden_loop(tmp_path):
    """Loops the old rule missed: one closed by a function-local import, one through `from package import module`,
    and one between stages."""
    for folder in ("common", "serve", "quantize", "validate", "bench"):
        (tmp_path / folder).mkdir()
    (tmp_path / "serve" / "a.py").write_text("from kiln.serve.b import thing\n")
    (tmp_path / "serve" / "b.py").write_text("def thing():\n    from kiln.serve import a\n")
    (tmp_path / "quantize" / "__init__.py").write_text("")
    (tmp_path / "quantize" / "auto.py").write_text("def f():\n    from kiln.validate import numerics\n")
    (tmp_path / "validate" / "__init__.py").write_text("from kiln.quantize import auto\n")
    (tmp_path / "validate" / "numerics.py").write_text("")
    (tmp_path / "bench" / "one.py").write_text("import two\n")
    (tmp_path / "bench" / "two.py").write_text("def f():\n    from one import x\n")
    graph = import_graph(tmp_path)
    assert import_cycles(graph) == [["bench.one", "bench.two"], ["kiln.serve.a", "kiln.serve.b"]]
    assert import_cycles(stage_graph(graph)) == [["quantize", "validate"]]
