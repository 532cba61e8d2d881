"""Progress bars on stderr, so stdout stays clean for tables and JSON."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
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

    def restart(self, description: str) -> None:
        """The same work again (another pass over the same samples): count from zero under a new name."""
        if self._progress is not None:
            self._progress.reset(self._id, description=description)


class _PlainTask:
    """Where stderr is a CI log, not a terminal: a line when the task starts, one at least every
    `interval_s` while it runs (whether or not it advanced), and one when it ends."""

    def __init__(self, description: str, total: float | None, interval_s: float):
        self.description, self.total, self.completed = description, total, 0.0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval_s,), daemon=True)

    def advance(self, amount: float = 1) -> None:
        self.completed += amount

    def restart(self, description: str) -> None:
        self.description, self.completed = description, 0.0
        print(f"{description}: started", file=sys.stderr, flush=True)

    def _line(self, state: str) -> str:
        done = f" {self.completed:.0f}/{self.total:.0f}" if self.total else ""
        return f"{self.description}:{done} {state} {time.monotonic() - self._started:.0f} s"

    def _beat(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            print(self._line("after"), file=sys.stderr, flush=True)

    def __enter__(self) -> "_PlainTask":
        print(f"{self.description}: started", file=sys.stderr, flush=True)
        self._thread.start()
        return self

    def __exit__(self, kind, *_) -> None:
        self._stop.set()
        self._thread.join()
        if kind is None:
            self.completed = self.total or self.completed
            print(self._line("done in"), file=sys.stderr, flush=True)


def _plain_interval_s() -> float:
    return float(os.environ.get("KILN_PROGRESS_INTERVAL_S", "30"))


class ProgressReporter:
    """`with reporter.task("calibrate fp8", total=64) as task: task.advance()`."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_Task]:
        if not self.enabled:
            yield _Task(None, None)
            return
        if not stderr_console.is_terminal:
            with _PlainTask(description, total, _plain_interval_s()) as plain:
                yield plain
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
