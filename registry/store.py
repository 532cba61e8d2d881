"""MLflow model registry access: the only module that imports mlflow.

Embedded default: SQLite plus a local artifact root under $KILN_HOME/registry.
MLFLOW_TRACKING_URI points kiln at a team server instead.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from kiln.common.errors import KilnError
from kiln.registry import tags

EXPERIMENT = "kiln"
ARTIFACT_PATH = "artifact"
PUBLISH_KEY_TAG = tags.PUBLISH_KEY
MANIFEST_TAG = tags.MANIFEST


@dataclass
class Transfer:
    """What a publish sent and what it found already stored."""

    files: int = 0
    bytes: int = 0
    reused_files: int = 0
    reused_bytes: int = 0
    repaired_files: int = 0     # stored blobs whose bytes did not match their sha256, uploaded again

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PublishedVersion:
    name: str
    version: str
    run_id: str
    created: bool = True   # False when an identical earlier publish was found instead
    transfer: Transfer | None = None   # bytes sent and reused (kiln.registry.blobs), when known

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}


# What MLFLOW_TRACKING_URI may name: a registry server, or a database MLflow opens itself.
_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")
# A registry that does not answer must fail in seconds, not after MLflow's default of 7 retries with
# exponential backoff (about 270 s per request). The user's own settings win.
# Each request waits at most 20 s for a byte and is tried twice: a server that stalls mid-command ends it
# within a minute, and the first call that times out ends it (unreachable() below), not every later call.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def tracking_uri(home: Path) -> str:
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if not configured:
        return f"sqlite:///{(Path(home) / 'registry' / 'mlflow.db').resolve()}"
    scheme = configured.split("://", 1)[0].split("+", 1)[0].lower() if "://" in configured else ""
    if scheme not in _SCHEMES:
        from kiln.common.errors import UserInputError

        raise UserInputError(f"MLFLOW_TRACKING_URI={configured}: not a registry kiln can use (fix: "
                             "http://HOST:PORT of a `kiln registry serve`, or unset it for the embedded registry "
                             "in $KILN_HOME)")
    return configured


def home_registry(home: Path) -> bool:
    """Whether kiln uses $KILN_HOME's own embedded registry (not one MLFLOW_TRACKING_URI names, which may be
    another home's database: its paths are that home's, never rebased or assumed here)."""
    return tracking_uri(home) == f"sqlite:///{(Path(home) / 'registry' / 'mlflow.db').resolve()}"


def artifact_root(home: Path) -> str:
    """Where the embedded registry keeps files: always under the current $KILN_HOME."""
    return (Path(home) / "registry" / "artifacts").resolve().as_uri()


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def client(home: Path):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Against a server MLflow prints run links on stdout, where kiln's tables and JSON go.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for variable, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(variable, value)
    from mlflow.tracking import MlflowClient

    # MLflow sets its own loggers to INFO on import; its schema-migration chatter is not news here.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    uri = tracking_uri(home)
    if not is_embedded(uri):
        require_reachable(uri)
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    if uri not in _initialised:
        from kiln.registry.embedded import open_database

        open_database(Path(uri[len("sqlite:///"):]), _migrate, _empty_database(), EXPERIMENT,
                      home_root=artifact_root(home) if home_registry(home) else None)
        _initialised.add(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _migrate(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow_client.search_experiments(max_results=1)          # the tracking store migrates on first use
    mlflow_client.search_registered_models(max_results=1)    # and so does the model registry


def _empty_database() -> Path:
    """Where this MLflow's migrated empty database is kept (kiln.registry.embedded): its version and migration
    scripts name it."""
    import hashlib

    import mlflow

    from kiln.common.fsutil import user_cache

    migrations = sorted(p.name for p in (Path(mlflow.__file__).parent / "store" / "db_migrations").rglob("*.py"))
    key = hashlib.sha256(json.dumps([mlflow.__version__, migrations]).encode()).hexdigest()[:16]
    return user_cache("registry", f"empty-mlflow-{mlflow.__version__}-{key}.db")


def require_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """A registry server answers /health and one small API call within seconds, or the command stops here
    with one line: a server that answered /health but stalled on its API took three 60 s timeouts."""
    if not uri.startswith(("http://", "https://")) or uri in _reachable:
        return
    import urllib.error
    import urllib.request

    base = uri.rstrip("/")
    for path, what in (("/health", None), (f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}",
                                           "its API")):
        try:
            with urllib.request.urlopen(base + path, timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            pass   # it answered: a proxy, an older server without /health, an experiment not created yet
        except (OSError, ValueError) as exc:
            cause = f"{what} did not answer within {timeout_s:.0f} s, though /health did" if what else exc
            raise RegistryUnreachable(uri, cause) from None
    _reachable.add(uri)


_reachable: set[str] = set()


class RegistryUnreachable(KilnError):
    exit_code = 1

    def __init__(self, uri: str, cause: object):
        reason = getattr(cause, "reason", None) or cause
        super().__init__(f"the registry at {uri} is unreachable ({reason}) (fix: start it with `kiln registry "
                         "serve`, or point MLFLOW_TRACKING_URI at a running one)")


def unreachable(exc: BaseException) -> KilnError | None:
    """A connection failure deep inside MLflow, as the one line kiln prints; None for anything else."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.startswith(("http://", "https://")):
        return None
    text = f"{type(exc).__name__}: {exc}"
    markers = ("Max retries exceeded", "Connection refused", "ConnectionError", "Connection aborted",
               "RemoteDisconnected", "Read timed out", "ConnectTimeout")
    if any(marker in text for marker in markers):
        return RegistryUnreachable(uri, text.splitlines()[0][:200])
    return None


_initialised: set[str] = set()


def experiment_id(mlflow_client, home: Path) -> str:
    existing = mlflow_client.get_experiment_by_name(EXPERIMENT)
    if existing is not None:
        return existing.experiment_id
    location = None
    if is_embedded(tracking_uri(home)):
        # Without an explicit location MLflow would write ./mlruns under the current directory.
        location = artifact_root(home)
    try:
        return mlflow_client.create_experiment(EXPERIMENT, artifact_location=location)
    except Exception:  # created concurrently by another publisher
        return mlflow_client.get_experiment_by_name(EXPERIMENT).experiment_id


def ensure_registered_model(mlflow_client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise


def upload_manifest(mlflow_client, run_id: str, manifest: dict, rel: str) -> None:
    """Write a manifest into the run's artifact folder at `rel` (manifest.json, engines/<sm>/manifest-<sha>.json)."""
    with tempfile.TemporaryDirectory(prefix="kiln-manifest-") as scratch:
        path = Path(scratch) / rel.rsplit("/", 1)[-1]
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        mlflow_client.log_artifact(run_id, str(path), "/".join([ARTIFACT_PATH] + rel.split("/")[:-1]))


def create_model_version(mlflow_client, name: str, source: str, run_id: str, tags: dict[str, str], attempts: int = 8):
    """create_model_version, retried: concurrent creators on one database can collide on the next number."""
    import random
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))


def log_batch(mlflow_client, run_id: str, metrics: dict[str, float], params: dict[str, str]) -> None:
    """Metrics (step 0, now) and params on a run, in batches MLflow accepts (100 params each)."""
    import time

    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metric_list = [Metric(key, value, now, 0) for key, value in metrics.items()]
    param_list = [Param(key, value) for key, value in params.items()]
    for start in range(0, max(len(metric_list), len(param_list)), 100):
        mlflow_client.log_batch(run_id, metrics=metric_list[start:start + 100], params=param_list[start:start + 100])


def is_missing(exc: BaseException) -> bool:
    """An MlflowException that says the model, version or alias does not exist (not a failing server)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or "not found" in str(exc).lower()


def refused_by_mlflow(exc: BaseException) -> bool:
    """MLflow answered, and refused (a deleted run, a missing version): not a failing server or a bug."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException)


def artifact_repository(home: Path, uri: str):
    """MLflow's artifact store at `uri` (a folder, or a server's proxied artifacts)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(uri, tracking_uri=tracking_uri(home))


def download_file(home: Path, artifact_uri: str, dest: Path) -> Path:
    """One artifact file, saved as `dest` (whatever its stored name)."""
    with tempfile.TemporaryDirectory(prefix="kiln-get-", dir=Path(dest).parent) as scratch:
        os.replace(download(home, artifact_uri, Path(scratch)), dest)
    return Path(dest)


def download(home: Path, artifact_uri: str, dst: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=tracking_uri(home)))
