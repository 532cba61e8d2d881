"""Progress bars on stderr, so stdout stays clean for tables and JSON."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

stderr_console = Console(stderr=True, highlight=False)


class _Task:
    def __init__(self, progress: Progress | None, task_id):
        self._progress, self._id = progress, task_id

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._id, amount)


class ProgressReporter:
    """`with reporter.task("calibrate fp8", total=64) as task: task.advance()`."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_Task]:
        if not self.enabled:
            yield _Task(None, None)
            return
        columns = [TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=stderr_console, transient=False) as progress:
            task_id = progress.add_task(description, total=total)
            yield _Task(progress, task_id)
            progress.update(task_id, completed=total)

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


SILENT = ProgressReporter(enabled=False)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep library chatter (ModelOpt prints, HF progress bars, warnings) off stdout and out of the way.

    kiln's own progress bars report the work; stdout stays reserved for tables and JSON.
    With `kiln --debug` the chatter goes to stderr instead of nowhere.
    """
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    debug = os.environ.get("KILN_DEBUG") == "1"
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stderr if debug else devnull), \
                warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(previous)
