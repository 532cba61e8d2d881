"""What every `kiln` command module shares: where KILN_HOME is, JSON output, GPU selection, temporary
folders, and the one place where a failure becomes the line and exit code a person sees.

The command modules (cli.recipes, cli.registry, cli.serve) import this; the root (cli.app) imports them and
registers their commands. Nothing here imports a command module.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from kiln.common.errors import KilnError, RecipeErrors
from kiln.common.scratch import kiln_home  # noqa: F401  (the command modules import it from here)

_state = {"debug": False}

# Options several commands share, defined once (help text included).
JSON_HELP = "Print one JSON document on stdout instead of the human output."
REF_HELP = "A registry version: NAME/VERSION or NAME@ALIAS, e.g. demo-fp8/3 or demo-fp8@candidate."


def json_option():
    import typer

    return typer.Option(False, "--json", help=JSON_HELP)


def set_debug(debug: bool) -> None:
    _state["debug"] = debug
    if debug:
        os.environ["KILN_DEBUG"] = "1"
    else:   # libraries' own tqdm bars (ModelOpt's layer-at-a-time calibration): kiln's progress reports that work.
        os.environ.setdefault("TQDM_DISABLE", "1")   # read when tqdm is first imported, which is later


def emit_json(document) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def private_tempdir() -> None:
    """Temporary files of commands that write go to $KILN_HOME/tmp/<this process>, removed at exit, and
    those that killed kiln processes left are removed first."""
    from kiln.common.scratch import use_private_tempdir

    use_private_tempdir(kiln_home())


def selected_sm(gpu: str | None, host) -> str | None:
    """--gpu as an SM (sm90, H100, ...); default: this host's first GPU's SM, or None without one."""
    from kiln.common.errors import UserInputError
    from kiln.compile import resolve_gpu

    if gpu is None:
        return host.sms[0] if host.sms else None
    try:
        return resolve_gpu(gpu).sm
    except ValueError as exc:
        raise UserInputError(f"--gpu: {exc}") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM (CI cancellation, `timeout`, `kill`), unwound like Ctrl-C: partial folders are discarded."""


def terminate_like_ctrl_c() -> None:
    def _terminate(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second SIGTERM ends the process at once
        raise Terminated()

    signal.signal(signal.SIGTERM, _terminate)


def report_failure(exc: BaseException) -> int:
    """Print what went wrong as kiln's one line per problem (--debug adds the traceback) and return the exit
    code; anything that is not a known failure is a bug and is raised again with its traceback."""
    if isinstance(exc, KeyboardInterrupt):
        what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        print(f"kiln: {what}; completed cache entries are kept, partial ones discarded", file=sys.stderr)
        return code
    known = exc if isinstance(exc, KilnError) else None
    if known is None and isinstance(exc, Exception):
        from kiln.pipeline.cli.failures import known_failure

        known = known_failure(exc)
    if known is None:
        raise exc
    if _state["debug"]:
        traceback.print_exception(exc)
    for line in known.problems if isinstance(known, RecipeErrors) else [str(known)]:
        print(f"kiln: {line}", file=sys.stderr)
    return known.exit_code
