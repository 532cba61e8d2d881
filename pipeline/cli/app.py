"""The `kiln` command line: the root that registers every command and turns failures into one line.

Commands live in cli.recipes (check, plan, build, doctor, families), cli.registry (ls, pull, promote,
diff, report, registry …) and cli.serve (triton-repo, serve); what they share is in cli.common.
Data (tables, JSON) goes to stdout; progress, warnings and errors to stderr.
Exit codes: 0 ok, 1 failure (including verification), 2 bad input, 3 a gate failed.
"""

from __future__ import annotations

import functools

import typer

from kiln.pipeline.cli import recipes as cli_recipes
from kiln.pipeline.cli.cache import cache_app
from kiln.pipeline.cli import registry as cli_registry
from kiln.pipeline.cli import serve as cli_serve
from kiln.pipeline.cli.common import report_failure, set_debug, terminate_like_ctrl_c

app = typer.Typer(
    name="kiln",
    help="Quantize Hugging Face models, check their accuracy, and publish verified artifacts.\n\n"
    "Start with `kiln check recipes/demo.yaml`, then `kiln plan` and `kiln build`. "
    "`kiln doctor` says what this host can build.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,   # click's own help: it rewraps docstrings to the terminal and shows flags without <bool>
)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library output.")) -> None:
    set_debug(debug)


# Each command's line in `kiln --help`: a whole sentence within 80 columns (click cuts longer ones with "...").
for _name, _command, _short in (
    ("check", cli_recipes.check, "Find what a recipe cannot build, before anything runs."),
    ("plan", cli_recipes.plan, "Every stage with its key, status and peak memory."),
    ("build", cli_recipes.build, "Quantize, validate, compile and publish what the plan needs."),
    ("ls", cli_registry.list_registry, "Registered models, their versions, aliases and metrics."),
    ("pull", cli_registry.pull, "Download a version and verify every file."),
    ("doctor", cli_recipes.doctor, "What this host can build, and each recipe's memory."),
    ("families", cli_recipes.families, "The model-family table and where each fact comes from."),
    ("triton-repo", cli_serve.triton_repo, "Write a Triton model repository for an artifact."),
    ("serve", cli_serve.serve, "Serve an artifact on 127.0.0.1 until Ctrl-C."),
    ("promote", cli_registry.promote, "Point an alias at a version that passed its gates."),
    ("diff", cli_registry.diff, "What changed between two versions."),
    ("report", cli_registry.report, "One offline HTML page of what a recipe published."),
):
    app.command(_name, short_help=_short)(_command)
app.add_typer(cli_registry.registry_app, name="registry", short_help="Run a team registry (PostgreSQL, mlflow server).")
app.add_typer(cache_app, name="cache", short_help="See and prune the stage cache.")


def _reported(command):
    """The command, with any failure printed as kiln's one line (cli.common.report_failure) and its exit code."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            raise typer.Exit(report_failure(exc)) from None
    return run


# Errors are formatted here, once, for every command (not with a handler in each).
for _app in (app, cli_registry.registry_app, cache_app):
    for _info in _app.registered_commands:
        _info.callback = _reported(_info.callback)


def main() -> None:
    terminate_like_ctrl_c()
    app()


if __name__ == "__main__":
    main()
