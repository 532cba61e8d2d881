"""Model-written code runs in bubblewrap: every escape a hostile review found in the audit-hook sandbox (issue 36.2)
is tried here, and its harm is looked for from the host: a file written outside the scratch folder, a host
listener reached, a secret of the build's environment returned, a host process signalled, a process that
outlived the run, a limit stretched, output read unbounded, or an early exit counted as a pass."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kiln.validate import sandbox
from kiln.validate.sandbox import OUTPUT_TAIL_BYTES, run_program
from tests.recipes import KILN, run_kiln, write_recipe
from tests.sandbox_escapes import DISABLE_HOOK, host_write_attempts, sleepers, spawn_detached

pytestmark = pytest.mark.skipif(sandbox.unavailable() is not None, reason=str(sandbox.unavailable()))

def test_no_write_reaches_the_host(tmp_path):
    target = tmp_path / "escaped"
    for attempt, program in host_write_attempts(target).items():
        result = run_program(program, timeout_s=5)
        assert not target.exists() and not target.is_symlink(), f"{attempt}: wrote {target} ({result})"
        assert not os.listxattr(tmp_path), attempt
    # The scratch folder is writable, and the program's own checks decide.
    assert run_program("open('inside.txt', 'w').write('x'); assert open('inside.txt').read() == 'x'").passed


def test_the_root_is_read_only_and_holds_no_host_files():
    probe = run_program("import os\nfor p in ('/usr/escaped', '/etc/escaped'):\n"
                        "    try:\n        open(p, 'w')\n        print('WROTE', p)\n    except OSError:\n        pass\n"
                        "print('SEEN', sorted(os.listdir('/')), os.path.exists(os.path.expanduser('~root/.cache')))")
    assert probe.passed and "WROTE" not in probe.output
    assert not Path("/usr/escaped").exists()
    assert "SEEN ['bin', 'dev', 'lib'" in probe.output and "'etc'" not in probe.output


def test_no_secret_of_the_build_reaches_the_program():
    """The build's environment (HF_TOKEN, KILN_HOME) through /proc/<ppid>/environ, bwrap's /proc/1/environ or any
    process the program can see: the build runs here as a process started with the secret in its environment."""
    program = ("import os\nfound = []\nfor pid in [os.getppid(), 1] + [p for p in os.listdir('/proc') "
               "if p.isdigit()]:\n    try:\n        found.append(open(f'/proc/{pid}/environ', 'rb').read())\n"
               "    except OSError:\n        pass\n"
               "print(b''.join(found), dict(os.environ))")
    build = subprocess.run([sys.executable, "-c", "import sys; from kiln.validate.sandbox import run_program; "
                            "r = run_program(sys.stdin.read()); print(r.passed, r.output)"], input=program,
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "HF_TOKEN": "hf_kiln_secret_token", "KILN_HOME": "/kiln-secret-home"})
    assert build.returncode == 0, build.stderr
    assert build.stdout.startswith("True") and "LANG" in build.stdout   # what it was given: the few variables kiln sets
    assert "hf_kiln_secret_token" not in build.stdout and "kiln-secret-home" not in build.stdout


def test_no_host_listener_is_reached(tmp_path):
    path = tmp_path / "host.sock"
    with socket.socket(socket.AF_UNIX) as unix, socket.socket(socket.AF_UNIX) as abstract, socket.socket() as tcp:
        unix.bind(str(path))
        abstract.bind("\0kiln-sandbox-test")
        tcp.bind(("127.0.0.1", 0))
        listeners = [unix, abstract, tcp]
        reached = []
        for listener in listeners:
            listener.listen(1)
            listener.settimeout(3)
            threading.Thread(target=lambda s=listener: reached.append(_accept(s)), daemon=True).start()
        port = tcp.getsockname()[1]
        program = DISABLE_HOOK["patch _hook through gc"] + (
            "import _socket\n"
            "for family, address in ((_socket.AF_UNIX, %r), (_socket.AF_UNIX, '\\0kiln-sandbox-test'), "
            "(_socket.AF_INET, ('127.0.0.1', %d))):\n"
            "    s = _socket.socket(family, _socket.SOCK_STREAM)\n    s.settimeout(1)\n"
            "    try:\n        s.connect(address)\n        print('REACHED', address)\n    except OSError:\n        pass\n"
            % (str(path), port))
        result = run_program(program)
        time.sleep(3.2)
    assert "REACHED" not in result.output, result
    assert reached == [False, False, False]


def test_no_host_process_can_be_signalled():
    victim = subprocess.Popen(["sleep", "60"])
    try:
        run_program(DISABLE_HOOK["patch _hook through gc"] +
                    f"import os, signal\nfd = os.pidfd_open({victim.pid})\n"
                    "signal.pidfd_send_signal(fd, signal.SIGKILL)\n")
        run_program(DISABLE_HOOK["patch _hook through gc"] + f"import os\nos.kill({victim.pid}, 9)\n")
        time.sleep(0.2)
        assert victim.poll() is None, "the sandboxed program killed a host process"
    finally:
        victim.kill()
        victim.wait()


def test_detached_grandchildren_end_with_the_run_and_do_not_stretch_its_limit():
    started = time.monotonic()
    result = run_program(spawn_detached(37.25) + "import time\ntime.sleep(30)\n", timeout_s=2)
    took = time.monotonic() - started
    assert not result.passed and result.reason == "timed out after 2 s"
    assert took < 8, f"a 2 s limit took {took:.1f} s"
    time.sleep(0.5)
    assert sleepers(37.25) == [], "a grandchild outlived the run"
    # The program exits at once while its grandchild holds stdout: the run ends with the program.
    started = time.monotonic()
    run_program(spawn_detached(38.25), timeout_s=10)
    assert time.monotonic() - started < 8
    time.sleep(0.5)
    assert sleepers(38.25) == []


def test_shared_memory_segments_do_not_outlive_the_run():
    name = f"kiln-sandbox-{os.getpid()}"
    run_program(DISABLE_HOOK["patch _hook through gc"] +
                f"import _posixshmem, os\nfd = _posixshmem.shm_open('/{name}', os.O_CREAT | os.O_RDWR, 0o600)\n"
                "os.write(fd, b'escaped')\n")
    assert not Path("/dev/shm", name).exists()


def test_output_is_read_bounded():
    result = run_program("import sys\nsys.stdout.write('x' * (64 << 20))\nsys.stdout.flush()\n")
    assert not result.passed   # past the file-size limit the program is stopped
    assert len(result.output) <= 2 * OUTPUT_TAIL_BYTES


def test_an_exit_status_is_not_a_pass():
    """os._exit(0) or sys.exit(0) before the checks run, or an exception swallowed by exiting: never a pass."""
    checks = "\n\ndef check(f):\n    assert f(2) == 4\n\ncheck(double)\n"
    assert run_program("def double(x):\n    return 2 * x\n" + checks).passed
    for early in ("import os\n    os._exit(0)", "import sys\n    sys.exit(0)", "raise SystemExit"):
        result = run_program(f"def double(x):\n    {early}\n" + checks)
        assert not result.passed, early
    result = run_program("import os\nos._exit(0)\n" + checks)
    assert not result.passed and result.reason == "exit 0 before its checks ran to the end: not a pass"


def test_without_bubblewrap_code_execution_is_refused(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.unavailable.cache_clear()
    try:
        assert "bubblewrap (bwrap) is not installed" in sandbox.unavailable()
        with pytest.raises(PermissionError, match="will not run model-written code here"):
            run_program("print(1)")
    finally:
        monkeypatch.undo()
        sandbox.unavailable.cache_clear()


def test_kiln_check_refuses_code_execution_where_no_sandbox_can_be_built(tmp_path, test_model):
    recipe = write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8"}}, evaluation={
        "builtin": "python-docs-heldout", "samples": 4, "seq_len": 64, "tasks": [{"name": "humaneval"}],
        "allow_code_execution": True})
    assert run_kiln("check", recipe).returncode == 0
    without = run_kiln("check", recipe, env={"PATH": str(KILN.parent)})   # no bwrap on this PATH
    assert without.returncode == 2 and "Traceback" not in without.stderr
    assert without.stderr.strip().splitlines() == [
        f"kiln: {recipe}: evaluation.allow_code_execution: bubblewrap (bwrap) is not installed, and kiln runs "
        "model-written code only inside it (fix: apt-get install bubblewrap)"]
    # A build refuses it too, before anything is calibrated.
    built = run_kiln("build", recipe, env={"PATH": str(KILN.parent), "KILN_HOME": str(tmp_path / "home")})
    assert built.returncode == 2 and built.stderr.strip().splitlines()[-1] == without.stderr.strip()
    assert not (tmp_path / "home" / "cache").exists()


def _accept(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except OSError:
        return False
