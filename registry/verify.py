"""`kiln registry verify`: can every version be pulled? Checked without changing anything.

For each version: its manifests (the base one and each SM's) match the digests its tags record, and
every blob they list is in the store with the bytes its sha256 names (hashed in place on the embedded
store, downloaded and hashed from a server). Blobs shared by versions are checked once.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.common.errors import VerificationError
from kiln.registry.blobs import STORAGE, STORAGE_TAG, _blob_store, _intact, _stored
from kiln.registry.confirm import fetch_manifest
from kiln.registry.engines import SM_ROOT, sm_manifest
from kiln.registry.manifest import MANIFEST
from kiln.registry.store import MANIFEST_TAG, client
from kiln.registry.tags import SM_MANIFEST, held_sms, sm_tag


@dataclass(frozen=True)
class VersionCheck:
    label: str                # name/version
    files: int
    bytes: int
    problem: str | None       # None: a pull of it verifies
    note: str = ""            # why a version was not checked

    def as_dict(self) -> dict:
        return {"version": self.label, "files": self.files, "bytes": self.bytes, "pullable": self.problem is None,
                "problem": self.problem, "note": self.note}


def verify_registry(home: Path, progress) -> list[VersionCheck]:
    from kiln.registry import _versions

    mlflow = client(home)
    versions = list(_versions(mlflow))
    store = _blob_store(mlflow, home) if versions else None
    intact: dict[str, bool] = {}
    checks = []
    with progress.task("verify registry versions", total=len(versions)) as task, \
            tempfile.TemporaryDirectory(prefix="kiln-verify-") as scratch:
        for index, (name, version, _) in enumerate(versions):
            label = f"{name}/{version.version}"
            checks.append(_check(home, store, version, label, Path(scratch) / str(index), intact))
            task.advance()
    return checks


def _check(home: Path, store, version, label: str, scratch: Path, intact: dict[str, bool]) -> VersionCheck:
    tags = version.tags
    if tags.get(STORAGE_TAG) != STORAGE:
        return VersionCheck(label, 0, 0, None, note="its files are in its own run (published before the blob "
                                                   "store, or not by kiln): not checked here; kiln pull verifies them")
    manifests = [(MANIFEST, tags.get(MANIFEST_TAG), MANIFEST)] + [
        (sm_manifest(sm, tags[sm_tag(sm, SM_MANIFEST)]), tags[sm_tag(sm, SM_MANIFEST)], f"{SM_ROOT}/{sm}/{MANIFEST}")
        for sm in held_sms(tags)]
    listed: dict[str, dict] = {}
    try:
        for index, (stored, digest, shown) in enumerate(manifests):
            listed.update(fetch_manifest(home, version.source, stored, digest, scratch / f"{index}.json",
                                         shown)["files"])
    except VerificationError as exc:
        return VersionCheck(label, 0, 0, str(exc))
    sizes = {info["sha256"]: info["size"] for info in listed.values()}
    unknown = set(sizes) - set(intact)
    present = _stored(store, unknown) if unknown else set()
    for sha in sorted(unknown):
        intact[sha] = sha in present and _intact(store, sha, sizes[sha])
    damaged = sorted(rel for rel, info in listed.items() if not intact[info["sha256"]])
    total = sum(info["size"] for info in listed.values())
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        return VersionCheck(label, len(listed), total, f"{damaged[0]}{more}: missing from the blob store or altered "
                                                       "(fix: rebuild its recipe with `kiln build`, which uploads "
                                                       "them again from its verified cache)")
    return VersionCheck(label, len(listed), total, None)
