"""Servers kiln starts (tritonserver, mlflow server): waiting until one answers."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request


def wait_until_ready(process: subprocess.Popen, url: str, timeout_s: float) -> str:
    """Poll `url` until it answers 200 while `process` runs: "ready", "exited" or "timeout"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return "exited"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return "ready"
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    return "timeout"
