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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.registry.blobs import Transfer

EXPERIMENT = "kiln"
ARTIFACT_PATH = "artifact"
PUBLISH_KEY_TAG = "kiln.publish_key"
MANIFEST_TAG = "kiln.manifest_sha256"


@dataclass(frozen=True)
class PublishedVersion:
    name: str
    version: str
    run_id: str
    created: bool = True   # False when an identical earlier publish was found instead
    transfer: Transfer | None = None   # bytes sent and reused (kiln.registry.blobs), when known

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}


def tracking_uri(home: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(home) / 'registry' / 'mlflow.db').resolve()}"


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def client(home: Path):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Against a server MLflow prints run links on stdout, where kiln's tables and JSON go.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    # MLflow sets its own loggers to INFO on import; its schema-migration chatter is not news here.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    uri = tracking_uri(home)
    if not is_embedded(uri) or uri in _initialised:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    # Create or migrate the SQLite schema under a file lock: two first-time publishers would otherwise
    # run MLflow's migrations at once and one fails. Later writes rely on SQLite's own locking.
    import fcntl

    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with database.with_name(database.name + ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        mlflow_client.search_experiments(max_results=1)          # the tracking store migrates on first use
        mlflow_client.search_registered_models(max_results=1)    # and so does the model registry
    _initialised.add(uri)
    return mlflow_client


_initialised: set[str] = set()


def experiment_id(mlflow_client, home: Path) -> str:
    existing = mlflow_client.get_experiment_by_name(EXPERIMENT)
    if existing is not None:
        return existing.experiment_id
    location = None
    if is_embedded(tracking_uri(home)):
        # Without an explicit location MLflow would write ./mlruns under the current directory.
        location = (Path(home) / "registry" / "artifacts").resolve().as_uri()
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


def download_file(home: Path, artifact_uri: str, dest: Path) -> Path:
    """One artifact file, saved as `dest` (whatever its stored name)."""
    with tempfile.TemporaryDirectory(prefix="kiln-get-", dir=Path(dest).parent) as scratch:
        os.replace(download(home, artifact_uri, Path(scratch)), dest)
    return Path(dest)


def download(home: Path, artifact_uri: str, dst: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=tracking_uri(home)))
