"""The one way kiln reads tool versions: what cache keys hash and what records and tags report.

A package that is not installed reads "absent" (a key still forms, and changes when it is installed).
In another Python (KILN_*_PYTHON) the versions are read there, by a probe that imports nothing.
"""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import PackageNotFoundError, version

from kiln.common.foreign_python import is_foreign

ABSENT = "absent"

_PROBE = ("import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\nfound = {}\n"
          "for name in sys.argv[1:]:\n    try: found[name] = version(name)\n"
          "    except PackageNotFoundError: found[name] = 'absent'\nprint(json.dumps(found))")


def installed_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return ABSENT


def installed_versions(packages, python: str | None = None) -> dict[str, str]:
    """{package: version or "absent"} as `python` (kiln's own by default) sees them, without importing them."""
    if python is None or not is_foreign(python):
        return {name: installed_version(name) for name in packages}
    try:
        answer = subprocess.run([python, "-c", _PROBE, *packages], capture_output=True, text=True, timeout=60)
        return json.loads(answer.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return {name: ABSENT for name in packages}


def tool_versions(packages=()) -> dict[str, str]:
    """The versions a stage's key and records carry: its tools and kiln itself."""
    return installed_versions((*packages, "kiln"))


__all__ = ["ABSENT", "installed_version", "installed_versions", "tool_versions"]
