"""Promotion past the gates, and what changed between two versions.

promote(): an alias moves to a version only if its checkpoint and every SM it holds passed
their gates (tags kiln.gate and kiln.sm.<sm>.gate); --force with a reason overrides, and who,
when, why and what was overridden stay on the version as kiln.promotion.<alias>.* tags.
diff(): recipe fields (recipe.json), tool versions, metrics, gates, SMs and file digests.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kiln.common.errors import GateFailed, UserInputError
from kiln.common.progress import SILENT
from kiln.registry.blobs import STORAGE, STORAGE_TAG, download_blobs
from kiln.registry.engines import sm_manifest
from kiln.registry.tags import (
    SM_MANIFEST, gate_failures, gates_of, held_sms, metrics_of, promotion_tag, sm_tag, tools_of,
)
from kiln.registry.manifest import MANIFEST, verify_files
from kiln.registry.refs import stored_version
from kiln.registry.store import MANIFEST_TAG, client

RECIPE_FILE = "recipe.json"      # the recipe as it applies to the version's variant
STRUCTURE_FILE = "structure.json"   # what the structure checks found (the validate stage's report)
_ALIAS = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")   # what NAME@ALIAS references can name


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    alias: str
    previous: str | None
    forced: bool
    overridden: tuple[str, ...]


def actor() -> str:
    """Who promotes: KILN_ACTOR, else the CI system's user, else the login name."""
    return os.environ.get("KILN_ACTOR") or os.environ.get("GITHUB_ACTOR") or os.environ.get("GITLAB_USER_LOGIN") \
        or getpass.getuser()


def promote(home: Path, name: str, version: str, alias: str, force: bool = False,
            reason: str | None = None) -> Promotion:
    if not _ALIAS.fullmatch(alias):
        raise UserInputError(f"--alias {alias!r}: an alias is lower-case letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit (fix: e.g. --alias production)")
    mlflow = client(home)
    found = stored_version(mlflow, name, version=version)
    if force and not (reason or "").strip():
        raise UserInputError("--force needs --reason \"why\": the reason is recorded on the version")
    failures = gate_failures(found.tags)
    if failures and not force:
        raise GateFailed(f"{name}/{version} is not promoted to {alias}: {'; '.join(failures)} (fix: promote a "
                         "version that passed, or override with --force --reason \"why\")")
    try:
        previous = str(mlflow.get_model_version_by_alias(name, alias).version)
    except Exception:  # no such alias yet
        previous = None
    now = datetime.now(timezone.utc)
    record = {"by": actor(), "at": now.isoformat(timespec="seconds"),
              "from": previous or "", "forced": "true" if force and failures else "false"}
    if force and failures:
        record.update({"reason": reason.strip(), "overrode": "; ".join(failures)})
    # Every promotion keeps its own record (event.<UTC time to the microsecond>); the plain fields say the latest.
    # A second forced promotion had overwritten the first one's reason and time.
    event = promotion_tag(alias, f"event.{now.strftime('%Y%m%dT%H%M%S%fZ')}")
    mlflow.set_model_version_tag(name, version, event, json.dumps(record, sort_keys=True)[:4900])
    for field in ("reason", "overrode"):   # the latest fields describe the latest promotion only
        if field not in record and promotion_tag(alias, field) in found.tags:
            mlflow.delete_model_version_tag(name, version, promotion_tag(alias, field))
    for field, value in record.items():
        mlflow.set_model_version_tag(name, version, promotion_tag(alias, field), value)
    mlflow.set_registered_model_alias(name, alias, version)   # last: the record is in place first
    return Promotion(name, version, alias, previous, bool(force and failures), tuple(failures))


CHECKPOINT_RECORD = "kiln.json"   # what quantize wrote beside the checkpoint: its format, per layer for quant auto


def _artifact(mlflow, home: Path, found, scratch: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """A version's files (base and every SM it holds: path -> sha256, size), and its recipe.json, kiln.json and
    structure.json where it holds them (downloaded and verified: what is shown as fact must be what was stored)."""
    from kiln.registry.confirm import fetch_manifest

    label = f"{found.name}/{found.version}"
    files: dict[str, dict] = {}
    stored = [(MANIFEST, found.tags.get(MANIFEST_TAG))] + [
        (sm_manifest(sm, found.tags[sm_tag(sm, SM_MANIFEST)]), found.tags[sm_tag(sm, SM_MANIFEST)])
        for sm in held_sms(found.tags)]
    for index, (rel, digest) in enumerate(stored):
        dst = scratch / str(found.version) / f"manifest-{index}.json"
        files.update(fetch_manifest(home, found.source, rel, digest, dst, f"{label}: {rel}")["files"])
    wanted = {rel: files[rel] for rel in (RECIPE_FILE, CHECKPOINT_RECORD, STRUCTURE_FILE) if rel in files}
    documents = {}
    if wanted and found.tags.get(STORAGE_TAG) == STORAGE:
        out = scratch / str(found.version) / "files"
        download_blobs(mlflow, home, wanted, out, SILENT, "recipe")
        verify_files(out, wanted, label)
        documents = {rel: json.loads((out / rel).read_text()) for rel in wanted}
    return files, documents


def _structure_fields(report: dict) -> dict[str, object]:
    fields = {f"checked {name}": count for name, count in report.get("checked", {}).items()}
    fields["problems"] = "; ".join(report.get("problems", ())) or "none"
    return fields


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        flat: dict[str, object] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _changed(a: dict, b: dict) -> dict[str, list]:
    return {key: [a.get(key), b.get(key)] for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def promotion_history(tags: dict[str, str], alias: str) -> list[dict]:
    """Every promotion of this version to `alias`, oldest first."""
    prefix = promotion_tag(alias, "event.")
    return [json.loads(tags[key]) for key in sorted(k for k in tags if k.startswith(prefix))]


def diff(home: Path, name: str, first: str, second: str) -> dict:
    mlflow = client(home)
    a, b = stored_version(mlflow, name, version=first), stored_version(mlflow, name, version=second)
    with tempfile.TemporaryDirectory(prefix="kiln-diff-") as scratch:
        files_a, documents_a = _artifact(mlflow, home, a, Path(scratch) / "a")
        files_b, documents_b = _artifact(mlflow, home, b, Path(scratch) / "b")
    recipe_a, recipe_b = documents_a.get(RECIPE_FILE), documents_b.get(RECIPE_FILE)
    layers_a, layers_b = ((d.get(CHECKPOINT_RECORD) or {}).get("layer_formats") or {} for d in (documents_a, documents_b))

    def metrics(tags):
        found = {f"checkpoint.{k}": v for k, v in metrics_of(tags).items()}
        for sm in held_sms(tags):
            found.update({f"{sm}.{k}": v for k, v in metrics_of(tags, sm).items()})
        return found

    structure_a, structure_b = documents_a.get(STRUCTURE_FILE), documents_b.get(STRUCTURE_FILE)
    experts_a, experts_b = ({block: " ".join(map(str, counts)) for block, counts in
                             ((d.get(CHECKPOINT_RECORD) or {}).get("expert_tokens") or {}).items()}
                            for d in (documents_a, documents_b))
    sms_a, sms_b = set(held_sms(a.tags)), set(held_sms(b.tags))
    return {
        "name": name, "versions": [first, second],
        "recipe": (_changed(_flatten(recipe_a), _flatten(recipe_b)) if recipe_a is not None and recipe_b is not None
                   else "not recorded for both versions"),
        "tools": _changed(tools_of(a.tags), tools_of(b.tags)),
        "metrics": {k: [x, y, None if x is None or y is None else y - x]
                    for k, (x, y) in _changed(metrics(a.tags), metrics(b.tags)).items()},
        "gates": _changed(gates_of(a.tags), gates_of(b.tags)),
        # quant auto: the layers whose format changed ("none": kept 16-bit; absent: a single-format version)
        "layers": _changed(layers_a, layers_b) if layers_a or layers_b else {},
        # the structure checks (counts checked, each problem) and, for MoE, each block's calibration tokens per expert
        "structure": (_changed(_structure_fields(structure_a), _structure_fields(structure_b))
                      if structure_a is not None and structure_b is not None else "not recorded for both versions"),
        "experts": _changed(experts_a, experts_b) if experts_a or experts_b else {},
        "sms": {"only_in_first": sorted(sms_a - sms_b), "only_in_second": sorted(sms_b - sms_a),
                "both": sorted(sms_a & sms_b)},
        "files": _changed({k: v["sha256"] for k, v in files_a.items()}, {k: v["sha256"] for k, v in files_b.items()}),
        "same_bytes": sorted(k for k in set(files_a) & set(files_b) if files_a[k]["sha256"] == files_b[k]["sha256"]),
    }
