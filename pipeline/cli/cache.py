"""`kiln cache ls` and `kiln cache prune`: what $KILN_HOME/cache holds, who needs it, and making room."""

from __future__ import annotations

import re

import typer

from kiln.common.errors import UserInputError
from kiln.pipeline.cli.common import emit_json, json_option, kiln_home

cache_app = typer.Typer(help="See and prune the stage cache ($KILN_HOME/cache): what each entry is, its size and "
                             "last use, and which published versions still need it.", no_args_is_help=True)

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_UNITS_B = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
            "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' -> seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not found:
        raise UserInputError(f"--older-than {text!r}: not a duration (fix: a number and a unit of s, m, h, d or w, "
                             "e.g. 30d)")
    return float(found[1]) * _UNITS_S[found[2]]


def parse_size(text: str) -> int:
    """'50GB', '500MiB', '1024' -> bytes."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text.lower())
    if not found:
        raise UserInputError(f"--max-size {text!r}: not a size (fix: a number with B, KB, MB, GB, TB or KiB, MiB, "
                             "GiB, TiB, e.g. 50GB)")
    return int(float(found[1]) * _UNITS_B[found[2] or ""])


def human_bytes(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def when(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def _entries(with_references: bool = True):
    from kiln.pipeline.plan.cache_entries import cache_entries, mark_references
    from kiln.registry import version_recipes

    home = kiln_home()
    entries = cache_entries(home / "cache")
    if with_references and any(e.published for e in entries):
        mark_references(entries, version_recipes(home))
    return home, entries


def _table(entries, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("stage", "key", "size", "last used", "needed by"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for e in entries:
        needed = ", ".join(f"{n}/{v}" for n, v in sorted(e.versions)) or "-"
        table.add_row(e.stage, e.key[:12], human_bytes(e.size), when(e.last_used), needed)
    return table


@cache_app.command("ls", short_help="Cache entries: size, last use, who needs them.")
def list_cache(as_json: bool = json_option()) -> None:
    """List cache entries by stage: size, last use, and the published versions (and recipes) that need them."""
    from kiln.pipeline.report.tables import stdout_console

    _, entries = _entries()
    entries = sorted(entries, key=lambda e: (e.stage, -e.last_used))
    if as_json:
        emit_json([e.document() for e in entries])
        return
    total = sum(e.size for e in entries)
    stdout_console.print(_table(entries, f"{len(entries)} cache entries, {human_bytes(total)}"))


@cache_app.command("prune", short_help="Remove entries by age or size, never held ones.")
def prune(
    older_than: str = typer.Option(None, "--older-than", show_default=False,
                                   help="Remove entries unused for longer than this (30d, 12h, 90m)."),
    max_size: str = typer.Option(None, "--max-size", show_default=False,
                                 help="Then remove the least recently used until the cache fits (50GB, 500MiB)."),
    keep_referenced: bool = typer.Option(True, "--keep-referenced/--include-referenced",
                                         help="Keep entries a published version needs to be rebuilt or repaired "
                                              "from (the default), or let them go too."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; remove nothing."),
    as_json: bool = json_option(),
) -> None:
    """Remove cache entries by age or total size, never one a running build holds.

    An entry leaves whole or not at all: a prune that is killed leaves a temporary folder the next build removes.
    """
    from kiln.pipeline.plan.cache import StageCache, held_keys
    from kiln.pipeline.plan.cache_entries import PruneRules, choose, remove_entry
    from kiln.pipeline.report.tables import stdout_console

    if older_than is None and max_size is None:
        raise UserInputError("kiln cache prune: nothing to prune by (fix: give --older-than, --max-size or both)")
    rules = PruneRules(parse_duration(older_than) if older_than else None, parse_size(max_size) if max_size else None,
                       keep_referenced)
    home, entries = _entries(with_references=keep_referenced)
    cache = StageCache(home / "cache")
    chosen = choose(entries, rules, held_keys(cache.root))
    removed = chosen if dry_run else [e for e in chosen if remove_entry(cache, e)]
    if as_json:
        emit_json({"dry_run": dry_run, "removed": [e.document() for e in removed],
                   "freed": sum(e.size for e in removed)})
        return
    title = f"{'would remove' if dry_run else 'removed'} {len(removed)} entries, {human_bytes(sum(e.size for e in removed))}"
    stdout_console.print(_table(removed, title) if removed else title)
