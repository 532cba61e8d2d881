"""Registry stage: publish verified artifacts to MLflow, list them, pull them back verified.

Public entry points:
  publish(home, name, files, tags, aliases, progress) -> PublishedVersion   (finds, never duplicates)
  add_sm(home, version, sm, files, tags, publish_key, progress)            one SM's engines into a version
  add_runtime_check(home, version, runtime, tags, publish_key)              a runtime check's result (vllm-check)
  ensure_records(home, version, records, tags) / attach_figure(home, version, png, digest)
                                            MLflow-native metrics and params, the accuracy-against-size figure
  recipe_versions(home, recipe) -> list[dict]                               every version a recipe published
  backfill(home) -> [(name/version, added)]  run records, from their tags, for versions an older kiln published
  find_version(home, name, publish_key) -> PublishedVersion | None
  version_confirmed(home, name, version, publish_key, aliases) -> bool | None   without importing MLflow
  pull(home, ref, out, progress, sm=..., installed_tensorrt=...) -> PulledArtifact
  list_versions(home) -> list[dict]
  promote(home, name, version, alias, force, reason) -> Promotion   only past the gates, or forced with a reason
  diff(home, name, v1, v2) -> dict                                   recipe, tools, metrics, gates, SMs, files

Layout of a version's artifact: the checkpoint, reports and recipe.json with
manifest.json at the top; one folder per SM under engines/, each with its own
manifest, added by whichever host built it, and tagged kiln.sm.<sm>.* on the
version. The version's run holds the manifests; the bytes they list live in the
blob store by sha256 (kiln.registry.blobs).
"""

from __future__ import annotations

from kiln.registry.blobs import embedded_damage, Transfer
from kiln.registry.confirm import confirm_manifest, ManifestLost, retire, UNPULLABLE_TAG
from kiln.registry.engines import add_runtime_check, add_sm, CheckpointMismatch
from kiln.registry.lookup import version_confirmed
from kiln.registry.promotion import diff, promote, Promotion, RECIPE_FILE
from kiln.registry.refs import parse_ref
from kiln.registry.run_records import (
    attach_figure, backfill, checkpoint_records, ensure_records, FIGURE_FILE, FIGURE_PATH, prefixed_metrics,
    recorded_tags, RunRecords,
)
from kiln.registry.store import client, MANIFEST_TAG, PUBLISH_KEY_TAG, PublishedVersion, tracking_uri, unreachable
from kiln.registry.tags import gate_failures, held_sms, sm_tag
from kiln.registry.versions import (
    check_owner, check_pullable, checkpoint_digest, find_version, held_sms_of, list_versions, publish,
    pull, RECIPE_TAG, recipe_versions, repair_blobs, set_aliases, VARIANT_TAG, version_recipes,
    named_version,
)

__all__ = ["tags", "publish", "check_owner", "embedded_damage", "repair_blobs", "RECIPE_TAG", "VARIANT_TAG", "add_sm",
           "add_runtime_check", "held_sms_of", "checkpoint_digest", "find_version", "version_confirmed", "pull",
           "check_pullable",
           "list_versions",
           "parse_ref", "tracking_uri", "unreachable",
           "PublishedVersion", "held_sms", "sm_tag", "PUBLISH_KEY_TAG", "CheckpointMismatch", "MANIFEST_TAG",
           "Transfer", "RECIPE_FILE", "Promotion", "promote", "diff", "gate_failures", "RunRecords",
           "checkpoint_records", "prefixed_metrics", "ensure_records", "recorded_tags", "attach_figure", "FIGURE_FILE",
           "FIGURE_PATH", "recipe_versions", "backfill", "confirm_manifest", "ManifestLost", "retire",
           "UNPULLABLE_TAG", "client", "set_aliases", "version_recipes",
           "named_version"]
