"""Human tables (stdout) and JSON documents for plan, build and ls."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from kiln.pipeline.plan.dag import Plan
from kiln.pipeline.run.results import BuildResult, format_label

# Wide enough for the summary when stdout is a file or a CI log, not a terminal.
stdout_console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"plan: {plan.loaded.recipe.name}", title_justify="left")
    for column in ("stage", "target", "key", "status"):
        table.add_column(column)
    for instance in plan.instances:
        table.add_row(instance.stage, str(instance.target), instance.key[:12], str(instance.status))
    return table


def family_line(plan: Plan) -> str | None:
    family = plan.family_summary()
    if family is None:
        return None
    return f"model family {family['title']} ({family['model_type']}): each variant publishes {family['publishes']}"


def plan_document(plan: Plan) -> dict:
    return {
        "recipe": plan.loaded.recipe.name,
        "recipe_path": str(plan.loaded.path),
        "recipe_digest": plan.loaded.digest,
        "registry": plan.registry_uri,
        "stages": [instance.as_dict() for instance in plan.instances],
        "family": plan.family_summary(),
        "notes": plan.notes(),
        "quantize_paths": plan.quantize_paths(),
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def build_table(result: BuildResult) -> Table:
    table = Table(title=f"build: {result.plan.loaded.recipe.name}", title_justify="left")
    for column, justify in (("variant", "left"), ("format", "left"), ("ppl change %", "right"), ("KL", "right"),
                            ("top-1 agree", "right"), ("gate", "left"), ("registry version", "left"),
                            ("ran", "left")):
        table.add_column(column, justify=justify)
    table.caption = _work_summary(result)
    table.caption_justify = "left"
    for v in result.variants:
        m = v.metrics
        ran = [i.stage + (f"@{i.target.bits:g}b" if i.target.bits is not None else "") for i in result.ran
               if i.target.variant == v.variant and i.target.sm is None and i.target.runtime is None]
        table.add_row(
            v.variant,
            v.format,
            _fmt(m and m.ppl_increase_pct, "+.3f"),
            _fmt(m and m.mean_kl, ".5f"),
            _fmt(m and m.top1_agreement, ".4f"),
            v.gate.summary() if v.gate else "-",
            f"{v.published.name}/{v.published.version}" if v.published else "not published",
            ", ".join(ran) if ran else "cached",
        )
    return table


def _work_summary(result: BuildResult) -> str:
    """Whether this build computed anything: a cached rebuild says so in as many words."""
    if not result.ran:
        return ("nothing was recomputed: every stage came from the verified cache and every version was "
                "confirmed in the registry")
    seconds = sum(i.seconds or 0 for i in result.ran)
    return f"ran {len(result.ran)} stage(s) in {seconds:.0f} s; the rest came from the verified cache"


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


def tasks_table(result: BuildResult) -> Table:
    """One row per (variant, task): its score, the baseline's, the drop with its paired standard error, and
    what the gate made of it (a drop within its standard error is said to be so, not called a pass or a fail)."""
    table = Table(title="tasks (lm-evaluation-harness, percentage points)", title_justify="left")
    for column, justify in (("variant", "left"), ("task", "left"), ("metric", "left"), ("score", "right"),
                            ("baseline", "right"), ("drop ± se", "right"), ("n", "right"), ("gate", "left")):
        table.add_column(column, justify=justify)
    for v in result.variants:
        bounds = result.plan.loaded.recipe.variants[v.variant].gates.max_task_drop or {}
        for name, drop in (v.tasks or {}).items():
            failed = any(f.startswith(f"max_task_drop.{name}:") for f in (v.gate.failures if v.gate else ()))
            verdict = ("FAIL" if failed else "pass, within noise" if drop.within_noise else "pass") if name in bounds \
                else ("within noise" if drop.within_noise else "-")
            bound = f" (max {bounds[name]:g})" if name in bounds else ""
            table.add_row(v.variant, name, drop.metric, f"{drop.value * 100:.1f}", f"{drop.baseline * 100:.1f}",
                          f"{drop.drop_points:+.2f} ± {drop.drop_stderr_points:.2f}", str(drop.n), verdict + bound)
    return table


def candidates_table(result: BuildResult) -> Table:
    """A quant-auto size search's frontier: every candidate budget, smallest first, with ModelOpt's estimate from
    the scores (solved for each budget without building it) and, for each candidate built, what validate measured
    and how far it was from its gates; the first that passed is the one published."""
    table = Table(title="size search (quant auto): the frontier, smallest budget first", title_justify="left")
    for column, justify in (("variant", "left"), ("effective_bits", "right"), ("est. bits", "right"),
                            ("est. score", "right"), ("measured bits", "right"), ("ppl change %", "right"),
                            ("KL", "right"), ("top-1 agree", "right"), ("gate", "left")):
        table.add_column(column, justify=justify)
    for v in result.variants:
        built = {c.bits: c for c in v.candidates}
        estimates = {point["effective_bits"]: point for point in v.frontier}
        passed = next((c.bits for c in v.candidates if c.gate.passed), None)
        for bits in sorted(set(built) | set(estimates)):
            point, c = estimates.get(bits, {}), built.get(bits)
            score = c.estimated_score if c and c.estimated_score is not None else point.get("estimated_score")
            estimate = (_fmt(point.get("estimated_bits"), ".3f"), _fmt(score, ".5f")) if point.get("feasible", True) \
                else ("infeasible", "-")
            if c is None:
                reason = "not built" + (f": {bits:g}b is past {passed:g}b, which passed" if passed is not None else "")
                table.add_row(v.variant, f"{bits:g}", *estimate, "-", "-", "-", "-", reason)
                continue
            m = c.metrics
            verdict = "pass: published" if c.gate.passed and v.published else c.gate.summary()
            table.add_row(v.variant, f"{c.bits:g}", *estimate, _fmt(c.size.bits_per_weight, ".3f"),
                          _fmt(m.ppl_increase_pct, "+.3f"), _fmt(m.mean_kl, ".5f"), _fmt(m.top1_agreement, ".4f"),
                          verdict)
    return table


def runtime_checks_table(result: BuildResult) -> Table:
    """One row per (variant, runtime check): the metrics measured in that runtime, greedy agreement with the
    reference runtime, the gate, or why the check was skipped."""
    table = Table(title="runtime checks", title_justify="left")
    for column, justify in (("variant", "left"), ("runtime", "left"), ("status", "left"), ("KL", "right"),
                            ("top-1 agree", "right"), ("greedy = reference", "right"), ("gate", "left")):
        table.add_column(column, justify=justify)
    for v in result.variants:
        for c in v.runtime_checks:
            m = c.report.metrics if c.report else None
            runtime = f"{c.runtime} {c.report.version} ({c.report.device})" if c.report else c.runtime
            table.add_row(v.variant, runtime, c.status, _fmt(m and m.mean_kl, ".5f"), _fmt(m and m.top1_agreement, ".4f"),
                          _fmt(c.report and c.report.greedy_agreement, ".2f"), c.gate.summary() if c.gate else "-")
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
                            ("engines", "left"), ("runtimes", "left"), ("ppl change %", "right"), ("KL", "right"), ("top-1 agree", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        fmt = format_label(row["quant"], row["kv_cache"], row.get("backend"), row.get("effective_bits"))
        table.add_row(row["name"], row["version"], ", ".join(row["aliases"]) or "-", fmt, ", ".join(row["sms"]) or "-",
                      ", ".join(row["runtimes"]) or "-",
                      _fmt(row["ppl_increase_pct"], "+.3f"), _fmt(row["mean_kl"], ".5f"),
                      _fmt(row["top1_agreement"], ".4f"))
    return table


def diff_tables(document: dict) -> list[Table]:
    """`kiln diff`: one table per section that changed; a line saying so for those that did not."""
    first, second = document["versions"]
    tables = []
    sections = [("recipe", "recipe field"), ("tools", "tool"), ("gates", "gate"), ("structure", "structure check"),
                ("files", "file (sha256)")]
    if document.get("layers"):   # quant auto's layers whose format changed
        sections.insert(3, ("layers", "layer format"))
    if document.get("experts"):   # MoE: the blocks whose experts' calibration tokens changed
        sections.insert(-1, ("experts", "MoE block: tokens per expert"))
    for key, label in sections[:-1]:
        changes = document[key]
        table = Table(title=f"{document['name']} {first} -> {second}: {key}", title_justify="left")
        for column in (label, first, second):
            table.add_column(column)
        if isinstance(changes, str):
            table.add_row(changes, "", "")
        for field, (a, b) in (changes.items() if isinstance(changes, dict) else []):
            table.add_row(field, _shown(a), _shown(b))
        if changes == {}:
            table.add_row("(unchanged)", "", "")
        tables.append(table)
    metrics = Table(title=f"{document['name']} {first} -> {second}: metrics", title_justify="left")
    for column in ("metric", first, second, "change"):
        metrics.add_column(column, justify="right" if column != "metric" else "left")
    for field, (a, b, delta) in document["metrics"].items():
        metrics.add_row(field, _fmt(a, ".5g"), _fmt(b, ".5g"), _fmt(delta, "+.5g"))
    tables.append(metrics)
    sms = document["sms"]
    held = Table(title=f"{document['name']} {first} -> {second}: SMs", title_justify="left")
    for column in ("only in " + first, "only in " + second, "in both"):
        held.add_column(column)
    held.add_row(", ".join(sms["only_in_first"]) or "-", ", ".join(sms["only_in_second"]) or "-",
                 ", ".join(sms["both"]) or "-")
    tables.append(held)
    files = Table(title=f"{document['name']} {first} -> {second}: files ({len(document['same_bytes'])} identical)",
                  title_justify="left")
    for column in (sections[-1][1], first, second):
        files.add_column(column)
    for rel, (a, b) in document["files"].items():
        files.add_row(rel, (a or "-")[:12], (b or "-")[:12])
    tables.append(files)
    return tables


def _shown(value) -> str:
    return "-" if value is None else str(value)


def changes_table(document: dict) -> Table:
    """`kiln plan --changed-since`: one row per invalidated stage instance."""
    table = Table(title=f"changed since {document['since']} ({document['commit'][:12]})", title_justify="left")
    for column in ("recipe", "stage", "target", "why", "status"):
        table.add_column(column)
    for recipe in document["recipes"]:
        for instance in recipe["invalidated"]:
            table.add_row(recipe["path"], instance["stage"], instance["target"], instance["why"], instance["status"])
    for path in document["unchanged"]:
        table.add_row(path, "-", "-", "unchanged", "-")
    return table
