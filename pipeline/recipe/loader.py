"""Load recipe YAML into a `Recipe`, reporting every problem as one line.

Each line names the file, the line where the YAML has one, the field, and
what to do: `recipes/x.yaml:12: variants.fp8.quant: ... (fix: ...)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kiln.common.digest import canonical_digest
from kiln.common.errors import RecipeErrors
from kiln.pipeline.recipe.schema import Recipe


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    digest: str  # of the validated recipe, so formatting and comments do not count

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str) -> Path:
        """A path from the recipe, relative to the recipe's own folder."""
        return (self.base_dir / Path(relative).expanduser()).resolve()


def _line_index(node: yaml.Node, path: tuple = (), index: dict | None = None) -> dict[tuple, int]:
    """Map each key path in the document to its 1-based line."""
    index = {} if index is None else index
    index.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            index[path + (key,)] = key_node.start_mark.line + 1
            _line_index(value_node, path + (key,), index)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index[path + (i,)] = item.start_mark.line + 1
            _line_index(item, path + (i,), index)
    return index


def _duplicate_keys(node: yaml.Node, where: str, path: tuple = ()) -> list[str]:
    """YAML keeps the last of two equal keys without a word: two `fp8:` variants would silently become one."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            dotted = ".".join(str(p) for p in path + (key,))
            if key in first_line:
                problems.append(f"{where}:{line}: {dotted}: duplicate key; YAML would silently drop the one at line "
                                f"{first_line[key]} (fix: rename or remove one)")
            first_line.setdefault(key, line)
            problems += _duplicate_keys(value_node, where, path + (key,))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, where, path + (i,))
    return problems


_FIXES = {
    "extra_forbidden": "remove it, or check its spelling against the recipe reference in README.md",
    "missing": "add it",
    "string_pattern_mismatch": "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit",
    "greater_than": "use a positive number",
    "int_type": "write a whole number, without quotes",
    "float_type": "write a number, without quotes",
    "bool_type": "write true or false",
    "byte_size_type": "write a size such as 6GiB",
    "enum": None,  # pydantic's message already lists the allowed values
    "literal_error": None,
}


def _format_problem(where: str, loc: tuple, error: dict, lines: dict[tuple, int]) -> str:
    field = ".".join(str(part) for part in loc) or "(top level)"
    line = None
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            line = lines[loc[:cut]]
            break
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    fix = _FIXES.get(error["type"])
    suffix = f" (fix: {fix})" if fix else ""
    position = f"{where}:{line}" if line else where
    return f"{position}: {field}: {message}{suffix}"


def _strip_model_suffix(loc: tuple) -> tuple:
    # pydantic adds the tagged-union / enum member name in some locs; keep real keys only.
    return tuple(part for part in loc if not (isinstance(part, str) and part.startswith("function-")))


_MAX_RECIPE_BYTES = 2**20


class RecipeYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-3` as the number YAML 1.2 says it is (PyYAML's 1.1 rules make it a string,
    which the schema's strict numbers would then refuse)."""


RecipeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_recipe(path: Path) -> LoadedRecipe:
    """Parse and validate one recipe; raise RecipeErrors listing every problem."""
    path = Path(path)
    where = str(path)
    try:
        if path.exists() and not path.is_file():   # /dev/zero, a FIFO, a folder: never read whole
            raise RecipeErrors([f"{where}: not a regular file (fix: pass a recipe .yaml file)"])
        if path.stat().st_size > _MAX_RECIPE_BYTES:
            raise RecipeErrors([f"{where}: {path.stat().st_size} bytes; a recipe is a short YAML file (at most "
                                f"{_MAX_RECIPE_BYTES // 2**20} MiB) (fix: pass the recipe, not a data file)"])
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeErrors([f"{where}: file not found (fix: check the path)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeErrors([f"{where}: cannot read: {exc}"]) from None
    try:
        node = yaml.compose(text, Loader=RecipeYamlLoader)
        data: Any = yaml.load(text, Loader=RecipeYamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeErrors([f"{where}{line}: not valid YAML: {problem} (fix: check indentation and quoting)"]) from None
    if not isinstance(data, dict):
        raise RecipeErrors([f"{where}:1: a recipe is a mapping starting with `kiln: 1` (fix: see recipes/demo.yaml)"])
    duplicates = _duplicate_keys(node, where) if node is not None else []
    if duplicates:
        raise RecipeErrors(duplicates)
    lines = _line_index(node) if node is not None else {}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [
            _format_problem(where, _strip_model_suffix(tuple(err["loc"])), err, lines) for err in exc.errors()
        ]
        raise RecipeErrors(problems) from None
    digest = canonical_digest(recipe.model_dump(mode="json"))
    return LoadedRecipe(recipe=recipe, path=path.resolve(), digest=digest)
