"""Temporary files that a kill cannot pile up.

Each kiln process keeps its temporary files in $KILN_HOME/tmp/<pid>-<start time>/ and removes that
folder when it exits (Ctrl-C and SIGTERM included). After a SIGKILL the next kiln process finds the
folder of a process that no longer runs and removes it. The same owner token names the partial
folders of cache entries (`.tmp-<key>-<owner>-…`), so a build reclaims those of dead builds at once
instead of after a day. The start time tells a reused pid from the process that made the folder.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

SCRATCH = "tmp"
LOGS = "logs"   # logs kept for the user to read: $KILN_HOME/logs


# Characters a URI gives meaning to: the embedded registry is the URI sqlite:///<home>/registry/mlflow.db, and
# SQLAlchemy would read `?` as the start of a query, `#` as a fragment and `%` as an escape, and so open (or
# create) a database outside the home.
_URI_SPECIAL = "?#%"


def kiln_home() -> Path:
    """$KILN_HOME, or ~/.kiln; refused (one line) when the path holds a character a URI gives meaning to."""
    home = Path(os.environ.get("KILN_HOME") or Path.home() / ".kiln").expanduser()
    special = sorted({c for c in str(home) if c in _URI_SPECIAL})
    if special:
        from kiln.common.errors import UserInputError

        raise UserInputError(f"KILN_HOME={home}: holds {' and '.join(repr(c) for c in special)}, which the registry's "
                             "URI would read as a query, fragment or escape and so write outside the home; nothing "
                             "was written (fix: choose a path without ?, # or %)")
    _refuse_overlong(home)
    return home


# Room kept below the system's path limit for what kiln writes inside the home: registry run folders, cache keys
# and engine manifests reach about 250 characters under it.
_DEEPEST_INSIDE = 512


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
        return True
    except OSError:   # missing, or a name too long to look up
        return False


def _refuse_overlong(home: Path) -> None:
    """A home whose own path, or the paths kiln writes in it, the system cannot hold: one line, not an OSError."""
    existing = next((p for p in (*home.parents, ) if _exists(p)), Path("/"))
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    longest = max((len(os.fsencode(part)) for part in home.parts), default=0)
    size = len(os.fsencode(str(home.absolute())))
    if longest > name_max or size + _DEEPEST_INSIDE > path_max:
        from kiln.common.errors import UserInputError

        shown = str(home) if len(str(home)) <= 80 else f"{str(home)[:60]}…({len(str(home))} characters)"
        raise UserInputError(f"KILN_HOME={shown}: longer than this system allows for the files kiln keeps in it "
                             f"(folder names up to {name_max} bytes, paths up to {path_max - _DEEPEST_INSIDE} bytes for "
                             "the home itself); nothing was written (fix: choose a shorter path)")
_OWNER = re.compile(r"(?P<pid>\d+)-(?P<start>\d+)(?:-(?P<boot>[0-9a-f]{8}))?")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None when it does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]   # field 22; the name in parentheses may hold spaces


@lru_cache(maxsize=1)
def owner_token() -> str:
    """`<pid>-<start time>-<boot>` of this process: unique across the hosts that share a KILN_HOME (the nodes of a
    distributed calibration), each of which can judge only its own processes."""
    return f"{os.getpid()}-{_start_time(os.getpid()) or 0}-{_this_boot()}"


def owner_alive(token: str) -> bool:
    """False only for a process of this host (this boot) that no longer runs: another host's may run still."""
    match = _OWNER.fullmatch(token)
    if match is None or (match["boot"] or _this_boot()) != _this_boot():
        return True   # not ours to judge
    start = _start_time(int(match["pid"]))
    return start is not None and (match["start"] == "0" or start == match["start"])


def owner_in(name: str) -> str | None:
    """The owner token inside a temporary name such as `.tmp-<key>-<pid>-<start>-<boot>-abc123` (older kilns:
    no `-<boot>`)."""
    found = (re.search(r"-(\d+-\d+-[0-9a-f]{8})-[^-]*$", name) or re.search(r"-(\d+-\d+)-[^-]*$", name))
    return found[1] if found else None


@lru_cache(maxsize=1)
def _this_boot() -> str:
    """8 hex digits naming this host's current boot (its pids and start times mean nothing elsewhere)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        import hashlib
        import socket

        return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def process_scratch(home: Path) -> Path:
    """This process's own temporary folder under $KILN_HOME/tmp, removed when it exits."""
    mine = Path(home) / SCRATCH / owner_token()
    if not mine.is_dir():
        mine.mkdir(parents=True, exist_ok=True)
        atexit.register(shutil.rmtree, mine, True)
    return mine


def reclaim_dead(home: Path) -> int:
    """Remove the temporary folders of kiln processes that no longer run; returns how many."""
    removed = 0
    root = Path(home) / SCRATCH
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name != owner_token() and not owner_alive(folder.name):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def use_private_tempdir(home: Path) -> Path:
    """Send every `tempfile` of this process (kiln's, MLflow's) to its own folder, after clearing the folders
    that killed processes left."""
    reclaim_dead(home)
    tempfile.tempdir = str(process_scratch(home))
    return Path(tempfile.tempdir)
