"""A team registry: `mlflow server` on PostgreSQL with proxied artifact storage.

kiln itself talks to it through MLFLOW_TRACKING_URI only; this module starts the pieces:
  LocalPostgres   Debian's PostgreSQL in a data folder of its own, on a loopback port
  MlflowServer    `mlflow server` with --serve-artifacts, so clients need no storage credentials
Both are used by `kiln registry postgres|serve` and by the integration tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kiln.common.errors import KilnError, UserInputError
from kiln.common.processes import wait_until_ready

DATABASE = "mlflow"
_PG_USER = "kiln"


def _postgres_bin(tool: str) -> str:
    """initdb/pg_ctl from PATH, else Debian's versioned folder."""
    found = shutil.which(tool)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / tool).is_file():
            return str(folder / tool)
    raise UserInputError(f"no {tool}: the team registry's database is PostgreSQL (fix: apt-get install postgresql)")


def _as_server_user(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user."""
    if os.geteuid() != 0:
        return argv
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise UserInputError("running as root, and there is no `postgres` user to run PostgreSQL as "
                             "(fix: apt-get install postgresql, or run as an ordinary user)") from None
    return ["runuser", "-u", "postgres", "--", *argv]


@dataclass(frozen=True)
class LocalPostgres:
    data: Path
    port: int = 5432
    host: str = "127.0.0.1"

    @property
    def uri(self) -> str:
        return f"postgresql://{_PG_USER}@{self.host}:{self.port}/{DATABASE}"

    def start(self) -> "LocalPostgres":
        """initdb on first use, start the server on host:port, create the MLflow database."""
        self.data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
        if not (self.data / "PG_VERSION").is_file():
            self._run(_postgres_bin("initdb"), "-D", str(self.data), "-U", _PG_USER, "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.data} -c listen_addresses={self.host}"
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.data / "server.log"),
                  "-o", options, "-w", "start")
        self._create_database()
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(f"postgresql://{_PG_USER}@{self.host}:{self.port}/postgres", autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
            if not exists:
                conn.execute(f"CREATE DATABASE {DATABASE}")

    def _run(self, *argv: str) -> None:
        done = subprocess.run(_as_server_user(list(argv)), capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise KilnError(f"{Path(argv[0]).name} failed (exit {done.returncode}): {' '.join(last)}; "
                            f"log: {self.data / 'server.log'}")


def _check_driver(backend_store_uri: str) -> None:
    if backend_store_uri.startswith("postgresql"):
        try:
            import psycopg  # noqa: F401  SQLAlchemy's default PostgreSQL driver
        except ImportError:
            raise UserInputError("--backend-store-uri is PostgreSQL, but its driver is not installed "
                                 "(fix: pip install 'kiln[team]')") from None


class MlflowServer:
    """`mlflow server` in its own process group; stop() ends all its workers."""

    def __init__(self, backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
                 port: int = 5000, workers: int = 4, log_path: Path | None = None):
        self.backend_store_uri, self.artifacts_destination = backend_store_uri, artifacts_destination
        self.host, self.port, self.workers = host, port, workers
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
                "--serve-artifacts", "--artifacts-destination", self.artifacts_destination,
                "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]

    def start(self, timeout_s: float = 120) -> "MlflowServer":
        _check_driver(self.backend_store_uri)
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        if self.log_path:
            log.close()
        state = wait_until_ready(self.process, f"{self.uri}/health", timeout_s)
        if state == "ready":
            return self
        if state == "exited":
            raise KilnError(f"mlflow server exited {self.process.returncode} while starting"
                            + (f"; log: {self.log_path}" if self.log_path else ""))
        self.stop()
        raise KilnError(f"mlflow server was not healthy after {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 20) -> int | None:
        if self.process is None:
            return None
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout_s)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        return self.process.returncode
