"""Restart a python-backend worker that died, so that a dead model never looks ready.

Triton 2.51 keeps a model "ready" after its python stub process died (killed by the kernel's OOM
killer, a segfault in a native library): every request then gets `Stub process ... is not healthy`
while /v2/health/ready answers 200, and a load balancer keeps sending traffic. Newer Triton releases
check the stub in the readiness answer; this one does not, so kiln watches the stubs of the server it
started and reloads a model whose worker is gone (explicit model control: `load` starts a new stub).
"""

from __future__ import annotations

import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

_STUB = "triton_python_b"   # the kernel's 15-character name of triton_python_backend_stub


class Stub(NamedTuple):
    model: str
    alive: bool
    pid: int


def stub_instances(server_pid: int) -> dict[str, Stub]:
    """instance name (kiln_llm_0_0) -> its Stub, for each python stub the server started.

    A dead stub stays a zombie child of tritonserver (it never reaps it); a restarted instance has a
    new, live stub under the same name, which wins."""
    instances: dict[str, Stub] = {}
    for pid in _children(server_pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
        if name != _STUB:
            continue
        alive = state not in "ZX"
        if len(args) > 8:   # stub <repo>/<model>/<version>/model.py <shm> <sizes>... <instance name> <kind>
            model, instance = Path(args[1].decode()).parts[-3], args[-3].decode()
        else:               # a zombie's command line is empty: known only by what it was while alive
            continue
        if alive or instance not in instances:
            instances[instance] = Stub(model, alive, pid)
    return instances


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


class WorkerWatch:
    """A daemon thread that reloads the model of any stub that died, every `interval_s`."""

    def __init__(self, server_pid: int, http_port: int, interval_s: float = 1.0):
        self.server_pid, self.http_port, self.interval_s = server_pid, http_port, interval_s
        self.known: dict[str, str] = {}   # instance -> model, remembered while alive (a zombie has no cmdline)
        self.restarts: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-worker-watch", daemon=True)

    def start(self) -> "WorkerWatch":
        self.check()   # learn the stubs now: one that dies before the first interval is still known
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> list[str]:
        """Reload each model with an instance whose stub is gone; returns those models."""
        live = {instance: stub.model for instance, stub in stub_instances(self.server_pid).items() if stub.alive}
        gone = [instance for instance in self.known if instance not in live]
        dead = sorted({self.known.pop(instance) for instance in gone})   # one reload each; its new stub is known anew
        self.known.update(live)
        for model in dead:
            print(f"kiln: the worker of model {model} died (the server log or the kernel's log says why); "
                  "reloading it", file=sys.stderr, flush=True)
            self._load(model)
            self.restarts.append(model)
        return dead

    def _load(self, model: str) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/v2/repository/models/{model}/load",
                                         data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=600):
                pass
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            print(f"kiln: reloading model {model} failed ({exc}); it stays unavailable", file=sys.stderr, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
