"""Programs that tried to escape kiln's audit-hook sandbox (issue 36.2), for tests/test_sandbox.py and
bench/hostile_trust.py: each one's harm is looked for from the host (no pytest here: bench imports it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Ways to take the audit hook out of the way (the reviewer's three), each followed by a write outside the folder.
DISABLE_HOOK = {
    "replace __main__._refuse": "import __main__; __main__._refuse = lambda what: None\n",
    "reset _ROOT": "import __main__; __main__._ROOT = '/'\n",
    "patch _hook through gc": ("import gc\nfor f in gc.get_objects():\n"
                               "    if getattr(f, '__name__', '') == '_hook' and hasattr(f, '__code__'):\n"
                               "        f.__code__ = (lambda event, args: None).__code__\n"),
}


def host_write_attempts(target: Path) -> dict[str, str]:
    """Programs that each try to create `target`, a path on the host outside the scratch folder."""
    folder, name = str(target.parent), target.name
    attempts = {f"{way}, then open()": code + f"open({str(target)!r}, 'w').write('escaped')\n"
                for way, code in DISABLE_HOOK.items()}
    attempts.update({
        "_posixsubprocess.fork_exec": (
            "import _posixsubprocess, os\n"
            f"args = [b'/bin/sh', b'-c', b'echo escaped > {target}']\n"
            "pid = _posixsubprocess.fork_exec(args, [b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1,"
            " *os.pipe(), False, False, -1, None, None, None, -1, None, False)\n"
            "os.waitpid(pid, 0)\n"),
        "os.open(dir_fd=)": (f"import os\nd = os.open({folder!r}, os.O_RDONLY)\n"
                             f"os.write(os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=d), b'escaped')\n"),
        "os.chdir, then a relative path": f"import os\nos.chdir({folder!r})\nopen({name!r}, 'w').write('escaped')\n",
        "sqlite3.connect": f"import sqlite3\nsqlite3.connect({str(target)!r}).execute('create table t (x)')\n",
        "mmap of a file opened through dir_fd": (
            f"import mmap, os\nd = os.open({folder!r}, os.O_RDONLY)\n"
            f"fd = os.open({name!r}, os.O_RDWR | os.O_CREAT, dir_fd=d)\nos.ftruncate(fd, 7)\n"
            "m = mmap.mmap(fd, 7)\nm[:] = b'escaped'\nm.flush()\n"),
        "os.rename(dst_dir_fd=)": (f"import os\nopen('mine', 'w').write('escaped')\nd = os.open({folder!r}, "
                                   f"os.O_RDONLY)\nos.rename('mine', {name!r}, dst_dir_fd=d)\n"),
        "mkfifo": f"import os\nos.mkfifo({str(target)!r})\n",
        "mknod": f"import os, stat\nos.mknod({str(target)!r}, 0o600 | stat.S_IFREG)\n",
        "setxattr on the host's folder, then a write": (
            f"import os\nos.setxattr({folder!r}, 'user.kiln', b'escaped')\nopen({str(target)!r}, 'w')\n"),
        "cffi from the build's site-packages": (
            f"import sys\nsys.path.append({_site_packages()!r})\nimport cffi\nffi = cffi.FFI()\n"
            "ffi.cdef('int creat(const char *, int);')\nlibc = ffi.dlopen(None)\n"
            f"assert libc.creat({str(target).encode()!r}, 0o644) >= 0\n"),
    })
    return attempts


def _site_packages() -> str:
    return next(p for p in sys.path if p.endswith("site-packages"))


def spawn_detached(seconds: float) -> str:
    """A program whose grandchild detaches (new session) and sleeps, holding stdout; the program exits at once."""
    return (DISABLE_HOOK["patch _hook through gc"] +
            "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/usr/bin/sleep', ['sleep', '{seconds}'])\n    os._exit(0)\n"
            "os.wait()\n")


def sleepers(seconds: float) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", str(seconds).encode()]:
                found.append(int(pid))
        except OSError:
            continue
    return found
