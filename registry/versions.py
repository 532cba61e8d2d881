"""A registered model's versions: publish (find, never duplicate), pull verified, list, and who owns a name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.common.errors import UserInputError, VerificationError
from kiln.common.fsutil import atomic_dir, require_empty_folder
from kiln.registry.confirm import fetch_manifest
from kiln.registry.engines import SM_ROOT, sm_manifest
from kiln.registry.tags import (
    AUTO_BITS, BACKEND, KV_CACHE, QUANT, RECIPE, REGISTERED_MODEL, SM_MANIFEST, SM_TENSORRT, VARIANT, held_sms,
    loading_runtimes_of, metrics_of, sm_tag,
)
from kiln.registry.manifest import MANIFEST, build_manifest, manifest_digest, verify_tree
from kiln.registry.refs import resolve
from kiln.registry.run_records import (
    RunRecords, ensure_records, log_records,
    recorded_tags,
)
from kiln.registry.blobs import STORAGE, STORAGE_TAG, Transfer, download_blobs, upload_blobs
from kiln.registry.store import (
    ARTIFACT_PATH, MANIFEST_TAG, PUBLISH_KEY_TAG, PublishedVersion, client, create_model_version, download,
    ensure_registered_model, experiment_id, upload_manifest,
)


@dataclass(frozen=True)
class PulledArtifact:
    name: str
    version: str
    path: Path
    files: int
    bytes: int
    sm: str | None = None


def publish(home: Path, name: str, files: dict[str, Path], tags: dict[str, str], aliases, progress,
            share_name: bool = False, records: RunRecords | None = None) -> PublishedVersion:
    """Upload `files` (artifact path -> local file) plus manifest.json as a version of `name`.

    A version with the same publish key (tags[PUBLISH_KEY_TAG]) is found, not duplicated; when two
    publishers race, both create one and the lowest version number wins: the other is deleted.
    A name whose versions another recipe/variant published (tags kiln.recipe, kiln.variant) is refused
    unless `share_name`. `records` go on the version's run as MLflow metrics and params (run_records); a
    version found from an older kiln gets them then.
    """
    publish_key = tags[PUBLISH_KEY_TAG]
    if not share_name:
        check_owner(home, name, tags.get(RECIPE_TAG), tags.get(VARIANT_TAG))
    existing = find_version(home, name, publish_key)
    if existing is not None:
        if records is not None:
            ensure_records(home, existing, records, tags)
        set_aliases(home, name, existing.version, aliases)
        return PublishedVersion(existing.name, existing.version, existing.run_id, created=False, transfer=Transfer())
    mlflow = client(home)
    manifest = build_manifest(files)
    run = mlflow.create_run(experiment_id(mlflow, home), run_name=name, tags={REGISTERED_MODEL: name})
    run_id = run.info.run_id
    try:
        # The bytes first (only those the store lacks), then the manifest, then the version that names them.
        transfer = upload_blobs(mlflow, home, files, manifest["files"], progress, f"upload {name}")
        upload_manifest(mlflow, run_id, manifest, MANIFEST)
        if records is not None:
            log_records(mlflow, run_id, records)
        ensure_registered_model(mlflow, name)
        version_tags = {**tags, MANIFEST_TAG: manifest_digest(manifest), STORAGE_TAG: STORAGE,
                        **(recorded_tags() if records is not None else {})}
        version = create_model_version(mlflow, name, f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id, version_tags)
        # MLflow's run list and compare charts label runs by name: name/version says which version it holds.
        mlflow.set_tag(run_id, "mlflow.runName", f"{name}/{version.version}")
        mlflow.set_terminated(run_id, "FINISHED")
    except BaseException:
        mlflow.set_terminated(run_id, "FAILED")
        raise
    winner = _converge(mlflow, name, publish_key, str(version.version))
    set_aliases(home, name, winner.version, aliases)
    return PublishedVersion(winner.name, winner.version, winner.run_id, winner.created, transfer)


def repair_blobs(home: Path, files: dict[str, Path], progress) -> Transfer:
    """Upload again whatever of `files` the blob store lacks or holds altered (verified like a publish)."""
    manifest = build_manifest(files)
    return upload_blobs(client(home), home, files, manifest["files"], progress, "repair blobs")


def _converge(mlflow, name: str, publish_key: str, mine: str) -> PublishedVersion:
    """Of the versions carrying this publish key, keep the lowest; delete ours if it is not that one."""
    twins = sorted((v for v in mlflow.search_model_versions(f"name='{name}'")
                    if v.tags.get(PUBLISH_KEY_TAG) == publish_key), key=lambda v: int(v.version))
    winner = twins[0]
    if str(winner.version) != mine:
        lost = next(v for v in twins if str(v.version) == mine)
        mlflow.delete_model_version(name, mine)
        if lost.run_id != winner.run_id:
            # The losing run stayed FINISHED with metrics, so MLflow's compare charts showed a version that is
            # gone: say which version holds its checkpoint, then delete it (MLflow keeps it, hidden, until gc).
            mlflow.set_tag(lost.run_id, SUPERSEDED_TAG, f"{name}/{winner.version}")
            mlflow.delete_run(lost.run_id)
    return PublishedVersion(name, str(winner.version), winner.run_id, created=str(winner.version) == mine)


RECIPE_TAG, VARIANT_TAG = RECIPE, VARIANT   # who owns a registered model's name
SUPERSEDED_TAG = "kiln.superseded_by"       # on the run of a publish that lost a race: the version that won


def check_owner(home: Path, name: str, recipe: str | None, variant: str | None) -> None:
    """Refuse to publish into `name` when its versions came from another recipe or variant.

    Names are <recipe>-<variant>, so recipe `a-b` with variant `c` and recipe `a` with variant `b-c`
    both map to `a-b-c`; without this check the second would move the first's aliases to its format.
    """
    if recipe is None:
        return
    for version in client(home).search_model_versions(f"name='{name}'"):
        owner = (version.tags.get(RECIPE_TAG), version.tags.get(VARIANT_TAG))
        if owner[0] is not None and owner != (recipe, variant):
            raise UserInputError(
                f"registry model '{name}' belongs to recipe '{owner[0]}' variant '{owner[1]}' ({name}/{version.version});"
                f" recipe '{recipe}' variant '{variant}' would publish into it (fix: rename the recipe or the "
                "variant, or pass --share-registry-name to publish there anyway)")


def held_sms_of(home: Path, version: PublishedVersion) -> list[str]:
    return held_sms(client(home).get_model_version(version.name, version.version).tags)


def checkpoint_digest(home: Path, version: PublishedVersion) -> str:
    """The digest of the version's own manifest: names the checkpoint bytes it holds."""
    return client(home).get_model_version(version.name, version.version).tags[MANIFEST_TAG]


def find_version(home: Path, name: str, publish_key: str) -> PublishedVersion | None:
    """The version of `name` that a publish with this stage key created, if it still exists."""
    mlflow = client(home)
    # The lowest: while publishers race, a higher twin exists until its publisher deletes it (_converge), and
    # a third publisher that found it reported a version that was gone a moment later.
    found = [v for v in mlflow.search_model_versions(f"name='{name}'") if v.tags.get(PUBLISH_KEY_TAG) == publish_key]
    if not found:
        return None
    version = min(found, key=lambda v: int(v.version))
    return PublishedVersion(name, str(version.version), version.run_id)


def set_aliases(home: Path, name: str, version: str, aliases) -> None:
    mlflow = client(home)
    for alias in aliases:
        mlflow.set_registered_model_alias(name, alias, version)


def pull(home: Path, ref: str, out: Path, progress, sm: str | None = None,
         installed_tensorrt: str | None = None) -> PulledArtifact:
    """Download a version (checkpoint, reports and, with `sm`, that SM's engines only) and verify every file.

    Nothing lands in `out` unless all files match their manifests. Refuses an SM the version does not
    hold, and engines built with another TensorRT than `installed_tensorrt` (when one is installed).
    """
    out = require_empty_folder(out)
    mlflow = client(home)
    version = resolve(mlflow, ref)
    label = f"{version.name}/{version.version}"
    if sm is not None:
        _check_sm_pullable(label, version.tags, sm, installed_tensorrt)
    try:
        with atomic_dir(out, shared=False) as root:
            if version.tags.get(STORAGE_TAG) == STORAGE:
                _download_from_blobs(mlflow, home, version, root, sm, progress, label)
            else:
                _download_run_files(mlflow, home, version, root, sm, progress, label)
            manifest = verify_tree(root, version.tags.get(MANIFEST_TAG), excluded_scopes=(SM_ROOT,))
            files = dict(manifest["files"])
            if sm is not None:
                files.update(verify_tree(root, version.tags.get(sm_tag(sm, SM_MANIFEST)),
                                         scope=f"{SM_ROOT}/{sm}")["files"])
    except VerificationError as exc:
        raise VerificationError(f"{label}: {exc}; nothing was written to {out}") from None
    return PulledArtifact(version.name, str(version.version), out, len(files), sum(f["size"] for f in files.values()), sm)


def _download_from_blobs(mlflow, home: Path, version, root: Path, sm: str | None, progress, label: str) -> None:
    """The version's manifests from its run, checked against their tags, then every file they list."""
    manifests = [(MANIFEST, MANIFEST, version.tags.get(MANIFEST_TAG))]
    if sm is not None:
        digest = version.tags.get(sm_tag(sm, SM_MANIFEST))
        manifests.append((sm_manifest(sm, digest), f"{SM_ROOT}/{sm}/{MANIFEST}", digest))
    wanted: dict[str, dict] = {}
    for stored, rel, digest in manifests:
        manifest = fetch_manifest(home, version.source, stored, digest, root / rel, rel)
        wanted.update(manifest["files"])
    download_blobs(mlflow, home, wanted, root, progress, f"download {label}" + (f" ({sm})" if sm else ""))


def _download_run_files(mlflow, home: Path, version, root: Path, sm: str | None, progress, label: str) -> None:
    """Versions published before the blob store hold their files in their own run."""
    entries = [e.path.rsplit("/", 1)[-1] for e in mlflow.list_artifacts(version.run_id, ARTIFACT_PATH)]
    wanted = [(e, root) for e in entries if e != SM_ROOT]
    if sm is not None:
        wanted.append((f"{SM_ROOT}/{sm}", root / SM_ROOT))
    with progress.task(f"download {label}" + (f" ({sm})" if sm else ""), total=len(wanted)) as task:
        for entry, dst in wanted:
            dst.mkdir(parents=True, exist_ok=True)
            download(home, f"{version.source}/{entry}", dst)
            task.advance()


def check_pullable(home: Path, ref: str, sm: str, installed_tensorrt: str | None) -> None:
    """What `pull(..., sm=sm)` refuses before it downloads (a missing SM, another TensorRT), without pulling."""
    version = resolve(client(home), ref)
    _check_sm_pullable(f"{version.name}/{version.version}", version.tags, sm, installed_tensorrt)


def _check_sm_pullable(label: str, tags: dict[str, str], sm: str, installed_tensorrt: str | None) -> None:
    held = held_sms(tags)
    if sm not in held:
        has = f"it holds {', '.join(held)}" if held else "it holds no engines yet"
        raise UserInputError(f"{label} has no engines for {sm}; {has} (fix: pull with --gpu "
                             f"{held[0] if held else 'none'}, or build them on an {sm} host with `kiln build --gpu {sm}`)")
    built_with = tags.get(sm_tag(sm, SM_TENSORRT))
    if built_with and installed_tensorrt and built_with != installed_tensorrt:
        raise UserInputError(f"{label}: the {sm} engines were built with TensorRT {built_with}, but this host has "
                             f"TensorRT {installed_tensorrt}; TensorRT engines run only on the version that built "
                             f"them (fix: install TensorRT {built_with}, or rebuild with `kiln build --gpu {sm}` here)")


def _versions(mlflow):
    """(registered model, version, its aliases) for every version in the registry, oldest first per name."""
    for model in mlflow.search_registered_models():
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        for version in sorted(mlflow.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version)):
            yield model.name, version, sorted(aliases_by_version.get(str(version.version), []))


def list_versions(home: Path) -> list[dict]:
    rows = []
    for name, version, aliases in _versions(client(home)):
        tags = version.tags
        metrics = metrics_of(tags)
        rows.append({
            "name": name,
            "version": str(version.version),
            "aliases": aliases,
            "sms": held_sms(tags),
            "quant": tags.get(QUANT),
            "kv_cache": tags.get(KV_CACHE),
            "backend": tags.get(BACKEND, "modelopt"),
            "runtimes": loading_runtimes_of(tags),
            "ppl_increase_pct": metrics.get("ppl_increase_pct"),
            "mean_kl": metrics.get("mean_kl"),
            "top1_agreement": metrics.get("top1_agreement"),
            "created": version.creation_timestamp,
            **({"effective_bits": float(tags[AUTO_BITS])} if AUTO_BITS in tags else {}),
        })
    return rows


def named_version(home: Path, ref: str) -> tuple[str, str]:
    """(name, version) that NAME/VERSION or NAME@ALIAS names (an alias is read from the registry)."""
    from kiln.registry.refs import checked_version, parse_ref

    name, alias, version = parse_ref(ref)
    if version is not None:
        return name, checked_version(name, version)
    return name, str(resolve(client(home), ref).version)


def version_recipes(home: Path) -> dict[tuple[str, str], str | None]:
    """(name, version) -> the recipe that published it (tag kiln.recipe), for every version in the registry."""
    return {(name, str(version.version)): version.tags.get(RECIPE) for name, version, _ in _versions(client(home))}


def recipe_versions(home: Path, recipe: str) -> list[dict]:
    """Every version that `recipe` published (tag kiln.recipe), with its tags: what `kiln report` shows."""
    return [{"name": name, "version": str(version.version), "aliases": aliases, "run_id": version.run_id,
             "created": version.creation_timestamp, "tags": dict(version.tags)}
            for name, version, aliases in _versions(client(home)) if version.tags.get(RECIPE) == recipe]
