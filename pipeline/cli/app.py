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
)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library output.")) -> None:
    set_debug(debug)


for _name, _command in (
    ("check", cli_recipes.check), ("plan", cli_recipes.plan), ("build", cli_recipes.build),
    ("ls", cli_registry.list_registry), ("pull", cli_registry.pull), ("doctor", cli_recipes.doctor),
    ("families", cli_recipes.families), ("triton-repo", cli_serve.triton_repo), ("serve", cli_serve.serve),
    ("promote", cli_registry.promote), ("diff", cli_registry.diff), ("report", cli_registry.report),
):
    app.command(_name)(_command)
app.add_typer(cli_registry.registry_app, name="registry")
app.add_typer(cache_app, name="cache")


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
