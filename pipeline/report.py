"""Human tables (stdout) and JSON documents for plan, build and ls."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from kiln.pipeline.plan import Plan
from kiln.pipeline.runner import BuildResult

# Wide enough for the summary when stdout is a file or a CI log, not a terminal.
stdout_console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"plan: {plan.loaded.recipe.name}", title_justify="left")
    for column in ("stage", "target", "key", "status"):
        table.add_column(column)
    for instance in plan.instances:
        table.add_row(instance.stage, instance.target, instance.key[:12], instance.status)
    return table


def plan_document(plan: Plan) -> dict:
    return {
        "recipe": plan.loaded.recipe.name,
        "recipe_path": str(plan.loaded.path),
        "recipe_digest": plan.loaded.digest,
        "registry": plan.registry_uri,
        "stages": [instance.as_dict() for instance in plan.instances],
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def build_table(result: BuildResult) -> Table:
    table = Table(title=f"build: {result.plan.loaded.recipe.name}", title_justify="left")
    for column, justify in (("variant", "left"), ("format", "left"), ("ppl change %", "right"), ("KL", "right"),
                            ("top-1 agree", "right"), ("gate", "left"), ("registry version", "left")):
        table.add_column(column, justify=justify)
    for v in result.variants:
        m = v.metrics
        table.add_row(
            v.variant,
            v.format,
            _fmt(m and m.ppl_increase_pct, "+.3f"),
            _fmt(m and m.mean_kl, ".5f"),
            _fmt(m and m.top1_agreement, ".4f"),
            v.gate.summary() if v.gate else "-",
            f"{v.published.name}/{v.published.version}" if v.published else "not published",
        )
    return table


def engines_table(result: BuildResult) -> Table:
    """One row per (variant, SM): the engine check's metrics and gate, or why the SM was skipped."""
    table = Table(title=f"engines ({result.plan.loaded.recipe.build.target.value})", title_justify="left")
    for column, justify in (("variant", "left"), ("sm", "left"), ("status", "left"), ("ppl change %", "right"),
                            ("KL", "right"), ("top-1 agree", "right"), ("gate", "left"), ("registry", "left")):
        table.add_column(column, justify=justify)
    for v in result.variants:
        for e in v.engines:
            m = e.metrics
            where = f"{v.published.name}/{v.published.version}" if e.published and v.published else "not published"
            table.add_row(v.variant, e.sm, e.status, _fmt(m and m.ppl_increase_pct, "+.3f"), _fmt(m and m.mean_kl, ".5f"),
                          _fmt(m and m.top1_agreement, ".4f"), e.gate.summary() if e.gate else "-", where)
    return table


def build_document(result: BuildResult) -> dict:
    return {
        **plan_document(result.plan),
        "ran": [f"{i.stage}:{i.target}" for i in result.ran],
        "variants": [v.as_dict() for v in result.variants],
        "exit_code": result.exit_code,
    }


def versions_table(rows: list[dict]) -> Table:
    table = Table(title="registry", title_justify="left")
    for column, justify in (("name", "left"), ("version", "right"), ("aliases", "left"), ("format", "left"),
                            ("engines", "left"), ("ppl change %", "right"), ("KL", "right"), ("top-1 agree", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        fmt = (row["quant"] or "-") + ("" if row["kv_cache"] in (None, "none") else f" + kv {row['kv_cache']}")
        table.add_row(row["name"], row["version"], ", ".join(row["aliases"]) or "-", fmt, ", ".join(row["sms"]) or "-",
                      _fmt(row["ppl_increase_pct"], "+.3f"), _fmt(row["mean_kl"], ".5f"),
                      _fmt(row["top1_agreement"], ".4f"))
    return table
