"""Adding a format at run time: a plugin's row, or a test's throw-away one.

The row is the whole change (every stage and recipe reads the formats table), so the row is checked here
against the tables that read it: a matrix column no family table lists would make a format no family takes.
"""

from __future__ import annotations

from dataclasses import replace

from kiln.quantize.families import MATRIX_COLUMNS
from kiln.quantize.formats import FORMATS, FormatSpec, QuantFormat


def row_problems(spec: FormatSpec) -> list[str]:
    """What in a format's row the other tables cannot read (empty when every fact resolves)."""
    problems = []
    if spec.trtllm is not None and spec.trtllm.matrix not in MATRIX_COLUMNS:
        problems.append(f"trtllm.matrix '{spec.trtllm.matrix}' is not a column the family table reads "
                        f"(one of {', '.join(sorted(MATRIX_COLUMNS))}; a new column goes into quantize/families.py "
                        "MATRIX_COLUMNS and the families whose sources list it)")
    if spec.default_group_size is not None and spec.default_group_size not in spec.group_sizes:
        problems.append(f"default_group_size {spec.default_group_size} is not one of group_sizes {spec.group_sizes}")
    return problems


def register_format(spec: FormatSpec) -> QuantFormat:
    """Add `spec` as a format under its name and give the name back; refuses a name the table has and a row
    the other tables cannot read."""
    name = str(spec.name)
    if name in FORMATS:
        raise ValueError(f"format '{name}' is already in the formats table")
    problems = row_problems(spec)
    if problems:
        raise ValueError(f"format '{name}': " + "; ".join(problems))
    spec = replace(spec, name=QuantFormat._named(name))
    FORMATS[spec.name] = spec
    return spec.name


def unregister_format(quant: QuantFormat) -> None:
    """Remove a format `register_format` added (tests restore the table this way)."""
    FORMATS.pop(quant, None)
