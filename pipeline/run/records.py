"""What a build records for people to look at: MLflow-native metrics and params, and the figure.

The runner calls these at publish time; the registry stores them (kiln.registry.run_records).
"""

from __future__ import annotations

import math

from kiln import quantize, registry
from kiln.pipeline.report.figures import SizePoint, accuracy_size_png, candidate_points, figure_digest
from kiln.pipeline.run.results import VariantResult


def size_metrics(size: quantize.CheckpointSize | None) -> dict[str, float]:
    """The checkpoint's size as metrics (tags and run metrics): bits per decoder weight, bytes."""
    if size is None:
        return {}
    found = {"checkpoint_bytes": size.checkpoint_bytes}
    if size.bits_per_weight is not None:
        found["bits_per_weight"] = size.bits_per_weight
    return found


def variant_records(loaded, name: str, record: quantize.CheckpointRecord, metrics: dict,
                    size: quantize.CheckpointSize | None, tools: dict[str, str]) -> registry.RunRecords:
    """A variant's run: validation's metrics and the size; its format, calibration, recipe digest, tools."""
    return registry.checkpoint_records(
        metrics=metrics, size=size_metrics(size), recipe=loaded.recipe.name, recipe_digest=loaded.digest,
        variant=name, quant=record.quant, kv_cache=record.kv_cache, backend=record.backend,
        group_size=record.group_size, algorithm=record.algorithm, calibration_samples=record.calibration_samples,
        calibration_seq_len=record.calibration_seq_len, tools=tools)


def size_points(loaded, results: list[VariantResult]) -> list[SizePoint]:
    """Every variant of this build on the accuracy-against-size figure, published or not."""
    points = []
    for result in results:
        gates = loaded.recipe.variants[result.variant].gates
        points.append(SizePoint(
            variant=result.variant, label=result.format,
            bits_per_weight=result.size.bits_per_weight if result.size else None,
            # None where it was not measured (a checkpoint that failed its structure checks records NaN)
            mean_kl=result.metrics.mean_kl if result.metrics and math.isfinite(result.metrics.mean_kl) else None,
            passed=bool(result.gate and result.gate.passed), max_kl=gates.max_kl))
        points += candidate_points(result.variant, [c.summary() for c in result.candidates])
    return points



def figure_title(loaded) -> str:
    return f"{loaded.recipe.name}: accuracy against size ({loaded.recipe.model.source})"


def log_figures(home, loaded, results: list[VariantResult]) -> int:
    """The figure of this build's variants on every published variant's run; how many runs got a new one."""
    points = size_points(loaded, results)
    title = figure_title(loaded)
    digest = figure_digest(title, points)
    rendered: list[bytes] = []

    def render() -> bytes:
        if not rendered:
            rendered.append(accuracy_size_png(title, points))
        return rendered[0]

    return sum(registry.attach_figure(home, result.published, digest, render)
               for result in results if result.published is not None)
