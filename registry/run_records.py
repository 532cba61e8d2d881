"""MLflow-native records on a version's run: metrics and params that MLflow's UI charts and compares.

The version's tags stay the registry's contract (kiln.registry.tags); these are the same facts in the
form MLflow's compare view reads, so the team's MLflow UI can chart versions and variants with no kiln
code. Metric names: the checkpoint's plainly (mean_kl), an SM's engine check under `<sm>/`, a runtime
check under `<runtime>/`. Params: the format, how it was calibrated, the recipe digest, `tool/<package>`.

Logging is idempotent: a name the run already holds is left alone, so a republish or a backfill of a
version published by an older kiln adds only what is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from kiln.registry import tags as t
from kiln.registry.tags import FIGURE, RUN_RECORDS, RUN_RECORDS_VERSION

FROM_TAGS = "tags"   # RUN_RECORDS on a version whose records were derived from its tags (kiln registry backfill)

FIGURE_PATH = "figures"                   # on the run, beside the artifact/ folder the version points at
FIGURE_FILE = "accuracy-vs-size.png"


@dataclass(frozen=True)
class RunRecords:
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


def _numbers(metrics: Mapping[str, object], prefix: str = "") -> dict[str, float]:
    """Finite numbers only: MLflow stores NaN, but a chart of it helps nobody."""
    found = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        found[f"{prefix}{name}"] = float(value)
    return found


def checkpoint_records(*, metrics: Mapping[str, object], size: Mapping[str, object], recipe: str, recipe_digest: str,
                       variant: str, quant: str, kv_cache: str, backend: str, group_size: int | None, algorithm: str,
                       calibration_samples: int, calibration_seq_len: int, tools: Mapping[str, str]) -> RunRecords:
    """What a variant's run carries: validation's metrics and the checkpoint's size; its format and provenance."""
    params = {"recipe": recipe, "recipe_digest": recipe_digest, "variant": variant, "format": quant,
              "kv_format": kv_cache, "backend": backend, "group_size": str(group_size or "none"),
              "algorithm": algorithm, "calibration_samples": str(calibration_samples),
              "calibration_seq_len": str(calibration_seq_len),
              **{f"tool/{name}": version for name, version in sorted(tools.items())}}
    return RunRecords(_numbers({**metrics, **size}), params)


def prefixed_metrics(prefix: str, metrics: Mapping[str, object]) -> RunRecords:
    """An SM's engine-check metrics and build seconds (sm90/mean_kl), or a runtime check's (vllm/mean_kl)."""
    return RunRecords(_numbers(metrics, f"{prefix}/"))


def log_records(mlflow_client, run_id: str, records: RunRecords) -> int:
    """Log what the run lacks of `records`; returns how many metrics and params were added."""
    from kiln.registry.store import log_batch

    data = mlflow_client.get_run(run_id).data
    metrics = {key: value for key, value in records.metrics.items() if key not in data.metrics}
    params = {key: value for key, value in records.params.items() if key not in data.params}
    log_batch(mlflow_client, run_id, metrics, params)
    return len(metrics) + len(params)


def recorded_tags() -> dict[str, str]:
    """The version tag saying its run holds kiln's records (a version from an older kiln lacks it)."""
    return {RUN_RECORDS: RUN_RECORDS_VERSION}


def ensure_records(home, version, records: RunRecords, tags: Mapping[str, str]) -> bool:
    """Give a version published by an older kiln its run records, and those of `tags` it lacks (its size);
    nothing it already holds changes. False when it had them."""
    from kiln.registry.store import client

    mlflow = client(home)
    current = mlflow.get_model_version(version.name, version.version)
    if current.tags.get(RUN_RECORDS) == RUN_RECORDS_VERSION:
        return False
    for key, value in tags.items():
        if key not in current.tags:
            mlflow.set_model_version_tag(version.name, version.version, key, value)
    log_records(mlflow, version.run_id, records)
    mlflow.set_model_version_tag(version.name, version.version, RUN_RECORDS, RUN_RECORDS_VERSION)   # last
    return True


def records_from_tags(tags: Mapping[str, str]) -> RunRecords:
    """An older version's run records, read back from its tags: its metrics, each SM's and each runtime
    check's, its format and tools. Its size and calibration are not in its tags; a build adds them."""
    metrics = dict(t.metrics_of(tags))
    for sm in t.held_sms(tags):
        metrics.update(prefixed_metrics(sm, t.metrics_of(tags, sm)).metrics)
    for runtime in t.checked_runtimes(tags):
        metrics.update(prefixed_metrics(runtime, t.check_metrics_of(tags, runtime)).metrics)
    params = {"recipe": tags.get(t.RECIPE), "recipe_digest": tags.get(t.RECIPE_DIGEST), "variant": tags.get(t.VARIANT),
              "format": tags.get(t.QUANT), "kv_format": tags.get(t.KV_CACHE), "backend": tags.get(t.BACKEND, "modelopt"),
              "group_size": tags.get(t.GROUP_SIZE) or "none", "algorithm": tags.get(t.ALGORITHM),
              **{f"tool/{name}": version for name, version in t.tools_of(tags).items() if "." not in name}}
    return RunRecords(_numbers(metrics), {key: value for key, value in params.items() if value})


def backfill(home) -> list[tuple[str, int | str]]:
    """Run records for every kiln version of the registry that has none, from its tags:
    [(name/version, metrics and params added, or why it was skipped)]. A version whose run was deleted
    (MLflow refuses writes to it) is skipped and named; the others are still filled."""
    from kiln.registry.store import client, refused_by_mlflow

    mlflow = client(home)
    done: list[tuple[str, int | str]] = []
    for model in mlflow.search_registered_models():
        for version in mlflow.search_model_versions(f"name='{model.name}'"):
            if t.RECIPE not in version.tags or version.tags.get(RUN_RECORDS):
                continue
            label = f"{model.name}/{version.version}"
            try:
                added = log_records(mlflow, version.run_id, records_from_tags(version.tags))
            except Exception as exc:
                if not refused_by_mlflow(exc):
                    raise
                done.append((label, f"skipped: its run {version.run_id} cannot take records "
                                    f"({str(exc).splitlines()[0][:160]})"))
                continue
            mlflow.set_model_version_tag(model.name, version.version, RUN_RECORDS, FROM_TAGS)
            done.append((label, added))
    return sorted(done, key=lambda item: item[0])


def attach_figure(home, version, digest: str, render) -> bool:
    """Log the accuracy-against-size figure (PNG bytes from `render()`) on the version's run as
    figures/<FIGURE_FILE>, replacing an older one; False, without rendering, when the run already shows
    this very figure (the version's FIGURE tag names the data it was drawn from)."""
    import tempfile

    from kiln.registry.lookup import version_tag
    from kiln.registry.store import client

    if version_tag(home, version.name, version.version, FIGURE) == digest:
        return False
    mlflow = client(home)
    if mlflow.get_model_version(version.name, version.version).tags.get(FIGURE) == digest:
        return False
    with tempfile.TemporaryDirectory(prefix="kiln-figure-") as scratch:
        png = Path(scratch) / FIGURE_FILE
        png.write_bytes(render())
        mlflow.log_artifact(version.run_id, str(png), FIGURE_PATH)
    mlflow.set_model_version_tag(version.name, version.version, FIGURE, digest)
    return True
