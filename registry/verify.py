"""`kiln registry verify`: can every version be pulled? Checked without changing anything.

For each version: its run still exists (a version whose run was deleted is lost at `mlflow gc`); its
manifests (the base one and each SM's) match the digests its tags record; every file they list has the
bytes its sha256 names: in the blob store (hashed in place on the embedded store, downloaded and hashed
from a server) or, for versions that hold their files in their own run, downloaded as a pull would; and
the metrics its tags show (`kiln ls`, `kiln diff`) equal the validation.json and tasks.json it holds.
A version verify cannot check (no manifest digest: not published by kiln) is counted apart, never as
pullable. A missing or emptied embedded database is reported, never created.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.common.errors import KilnError, VerificationError
from kiln.common.progress import SILENT
from kiln.registry.blobs import STORAGE, STORAGE_TAG, _blob_store, _intact, _stored, download_blobs
from kiln.registry.confirm import fetch_manifest
from kiln.registry.engines import SM_ROOT, sm_manifest
from kiln.registry.manifest import MANIFEST, verify_files, verify_tree
from kiln.registry.store import ARTIFACT_PATH, MANIFEST_TAG, artifact_root, client, download, is_embedded, tracking_uri
from kiln.registry.tags import METRIC, SM_MANIFEST, held_sms, sm_tag

# Files of a version whose numbers its metric tags repeat (published as kiln.metric.<name>).
VALIDATION_FILE, TASKS_FILE = "validation.json", "tasks.json"


@dataclass(frozen=True)
class VersionCheck:
    label: str                # name/version
    files: int
    bytes: int
    problem: str | None       # None: a pull of it verifies (unless unchecked)
    note: str = ""            # why a version was not checked
    unchecked: bool = False   # verify could not check it: neither pullable nor broken as far as it knows
    structure: dict | None = None   # what the caller's re-check of its stored files found (verify_registry's recheck)

    @property
    def pullable(self) -> bool:
        return self.problem is None and not self.unchecked

    def as_dict(self) -> dict:
        document = {"version": self.label, "files": self.files, "bytes": self.bytes, "pullable": self.pullable,
                    "checked": not self.unchecked, "problem": self.problem, "note": self.note}
        if self.structure is not None:
            document["structure"] = self.structure
        return document


class RegistryMissing(KilnError):
    exit_code = 1


def require_database(home: Path) -> bool:
    """False where the embedded registry was never created (nothing to verify); RegistryMissing where its
    database was deleted or emptied under published files. Nothing is created either way."""
    uri = tracking_uri(home)
    if not is_embedded(uri):
        return True
    database = Path(uri[len("sqlite:///"):])
    artifacts = Path(artifact_root(home)[len("file://"):])
    held = artifacts.is_dir() and any(artifacts.iterdir())
    if database.is_file() and database.stat().st_size > 0:
        return True
    if not database.exists() and not held:
        return False
    state = "is empty" if database.exists() else "is missing"
    beside = f", while {artifacts} holds published files" if held else ""
    raise RegistryMissing(f"{database}: the registry database {state}{beside}; verify changed nothing (fix: restore it "
                          "from a backup, or set MLFLOW_TRACKING_URI to the registry you meant)")


def verify_registry(home: Path, progress, recheck=None) -> list[VersionCheck]:
    """Every version's check. `recheck(tags, folder)`, where given, sees each version whose blobs verified, with
    its checkpoint's files (not its engines) laid out in `folder` (links into the embedded store, downloads from a
    server), and returns what goes into the check's `structure`."""
    from kiln.registry.versions import _versions

    if not require_database(home):
        return []
    mlflow = client(home)
    versions = list(_versions(mlflow))
    store = _blob_store(mlflow, home) if versions else None
    intact: dict[str, bool] = {}
    checks = []
    with progress.task("verify registry versions", total=len(versions)) as task, \
            tempfile.TemporaryDirectory(prefix="kiln-verify-") as scratch:
        for index, (name, version, _) in enumerate(versions):
            label = f"{name}/{version.version}"
            checks.append(_check(home, mlflow, store, version, label, Path(scratch) / str(index), intact, recheck))
            task.advance()
    return checks


def _check(home: Path, mlflow, store, version, label: str, scratch: Path, intact: dict[str, bool],
           recheck=None) -> VersionCheck:
    tags = version.tags
    deleted = _deleted_run(mlflow, version.run_id)
    if deleted:
        return VersionCheck(label, 0, 0, deleted)
    if not tags.get(MANIFEST_TAG):
        return VersionCheck(label, 0, 0, None, note="it records no manifest digest (not published by kiln): verify "
                                                   "cannot check it", unchecked=True)
    try:
        structure = None
        if tags.get(STORAGE_TAG) == STORAGE:
            files, total, reports, listed = _check_blobs(home, store, version, scratch, intact)
            if recheck is not None:
                structure = recheck(tags, _lay_out(home, store, listed, scratch / "checkpoint"))
        else:
            files, total, reports = _check_own_run(home, mlflow, version, scratch)
            if recheck is not None:
                structure = {"rechecked": False, "note": "published before the blob store: not re-checked"}
    except VerificationError as exc:
        return VersionCheck(label, 0, 0, str(exc))
    forged = _metric_tags_disagree(tags, reports)
    return VersionCheck(label, files, total, forged, structure=structure)


def _lay_out(home: Path, store, listed: dict[str, dict], out: Path) -> Path:
    """A version's checkpoint files (what its base manifest lists but the TensorRT-LLM checkpoint), verified just
    before: links to the embedded store's blobs, or downloaded from a server's."""
    wanted = {rel: info for rel, info in listed.items() if not rel.startswith((f"{SM_ROOT}/", "trtllm/"))}
    local_root = getattr(store, "artifact_dir", None)
    if local_root is None:
        download_blobs(None, home, wanted, out, SILENT, "checkpoint", store=store)
        verify_files(out, wanted, "checkpoint")
        return out
    for rel, info in wanted.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).symlink_to(Path(local_root) / info["sha256"][:2] / info["sha256"])
    return out


def _deleted_run(mlflow, run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        run = mlflow.get_run(run_id)
    except Exception:   # the run is gone from the database entirely
        return f"its run {run_id} no longer exists, so its files cannot be pulled (fix: rebuild its recipe)"
    if run.info.lifecycle_stage == "deleted":
        return (f"its run {run_id} is deleted in MLflow, and `mlflow gc` would remove the version's files (fix: "
                f"`mlflow runs restore --run-id {run_id}`, or rebuild its recipe)")
    return None


def _check_blobs(home: Path, store, version, scratch: Path, intact: dict[str, bool]):
    tags = version.tags
    manifests = [(MANIFEST, tags.get(MANIFEST_TAG), MANIFEST)] + [
        (sm_manifest(sm, tags[sm_tag(sm, SM_MANIFEST)]), tags[sm_tag(sm, SM_MANIFEST)], f"{SM_ROOT}/{sm}/{MANIFEST}")
        for sm in held_sms(tags)]
    listed: dict[str, dict] = {}
    for index, (stored, digest, shown) in enumerate(manifests):
        listed.update(fetch_manifest(home, version.source, stored, digest, scratch / f"{index}.json", shown)["files"])
    sizes = {info["sha256"]: info["size"] for info in listed.values()}
    unknown = set(sizes) - set(intact)
    present = _stored(store, unknown) if unknown else set()
    for sha in sorted(unknown):
        intact[sha] = sha in present and _intact(store, sha, sizes[sha])
    damaged = sorted(rel for rel, info in listed.items() if not intact[info["sha256"]])
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        raise VerificationError(f"{damaged[0]}{more}: missing from the blob store or altered (fix: rebuild its recipe "
                                "with `kiln build`, which uploads them again from its verified cache)")
    reports = {rel: _blob_json(store, listed[rel]["sha256"], scratch / rel) for rel in (VALIDATION_FILE, TASKS_FILE)
               if rel in listed}
    return len(listed), sum(info["size"] for info in listed.values()), reports, listed


def _blob_json(store, sha: str, dest: Path) -> dict:
    """A verified blob's JSON (hashed just before; read where it lies on the embedded store)."""
    local_root = getattr(store, "artifact_dir", None)
    if local_root is not None:
        return json.loads((Path(local_root) / sha[:2] / sha).read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    return json.loads(Path(store.download_artifacts(f"{sha[:2]}/{sha}", dst_path=str(dest.parent))).read_text())


def _check_own_run(home: Path, mlflow, version, scratch: Path):
    """A version published before the blob store (kiln.storage other than blobs-1): its run's files downloaded
    as a pull downloads them, then verified against its manifests."""
    root = scratch / "files"
    root.mkdir(parents=True)
    try:
        entries = [e.path.rsplit("/", 1)[-1] for e in mlflow.list_artifacts(version.run_id, ARTIFACT_PATH)]
        for entry in entries:
            download(home, f"{version.source}/{entry}", root)
    except Exception as exc:   # MLflow's "No such artifact", a missing run folder
        raise VerificationError(f"its files cannot be read from its run ({str(exc)[:160]})") from None
    files = dict(verify_tree(root, version.tags.get(MANIFEST_TAG), excluded_scopes=(SM_ROOT,))["files"])
    for sm in held_sms(version.tags):
        files.update(verify_tree(root, version.tags.get(sm_tag(sm, SM_MANIFEST)), scope=f"{SM_ROOT}/{sm}")["files"])
    reports = {rel: json.loads((root / rel).read_text()) for rel in (VALIDATION_FILE, TASKS_FILE) if rel in files}
    return len(files), sum(info["size"] for info in files.values()), reports


def _metric_tags_disagree(tags: dict[str, str], reports: dict[str, dict]) -> str | None:
    """The first checkpoint metric tag whose number differs from the version's own validation.json / tasks.json.
    (Size tags such as bits_per_weight are measured against the source model's headers, which no stored file
    holds: they are not compared.)"""
    from kiln.validate import TaskDrop, task_metrics

    stored = {k: v for k, v in reports.get(VALIDATION_FILE, {}).items() if isinstance(v, (int, float))}
    stored.update(task_metrics({name: TaskDrop(**d) for name, d in reports.get(TASKS_FILE, {}).items()}))
    for name, truth in sorted(stored.items()):
        key = f"{METRIC}{name}"
        if key not in tags:
            continue
        try:
            shown = float(tags[key])
        except ValueError:
            shown = None
        if shown is None or not (shown == float(truth) or (math.isnan(shown) and math.isnan(float(truth)))):
            where = TASKS_FILE if name.startswith("task.") else VALIDATION_FILE
            return (f"its tag {key}={tags[key]} disagrees with the files it holds (its {where} says {truth!r}): the "
                    "tags `kiln ls` shows were altered (fix: rebuild its recipe; `kiln diff` reads the stored files)")
    return None
