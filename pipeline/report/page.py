"""`kiln report`: one self-contained HTML page of what a recipe published, read from the registry.

Sections: accuracy against size (the newest version of each variant), the variants at a glance, gates
and failures, each variant's metrics over its versions, engines per SM, and which runtimes load each
variant. Figures are inline PNGs (data: URIs) and the style is inline: the page needs no network.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.pipeline.report.figures import SizePoint, accuracy_size_png, candidate_points, kl_history_png
from kiln.pipeline.run.results import format_label
from kiln.registry import tags as t

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1080px; color: #212121; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 30px; border-bottom: 1px solid #ddd; }
.meta { color: #616161; font-size: 12.5px; } figure { margin: 12px 0; } figure img { max-width: 100%; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f5f5f5; } .pass { color: #2e7d32; font-weight: 600; } .fail { color: #c62828; font-weight: 600; }
.none { color: #9e9e9e; } ul { margin: 4px 0; }
"""


@dataclass(frozen=True)
class Version:
    """One registry version of the recipe, as the page shows it."""

    name: str
    number: int
    variant: str
    aliases: list[str]
    created_ms: int
    tags: dict[str, str]

    @classmethod
    def of(cls, row: dict) -> "Version":
        return cls(row["name"], int(row["version"]), row["tags"].get(t.VARIANT, "?"), row["aliases"],
                   int(row["created"] or 0), row["tags"])

    @property
    def label(self) -> str:
        return f"{self.name}/{self.number}"

    @property
    def metrics(self) -> dict[str, float]:
        return t.metrics_of(self.tags)

    @property
    def format(self) -> str:
        return format_label(self.tags.get(t.QUANT), self.tags.get(t.KV_CACHE), self.tags.get(t.BACKEND),
                            self.tags.get(t.AUTO_BITS))

    @property
    def passed(self) -> bool:
        return self.tags.get(t.GATE) == "pass"


def _e(value) -> str:
    return html.escape(str(value))


def _num(value, spec: str) -> str:
    return '<td class="n">' + ("-" if value is None else format(value, spec)) + "</td>"


def _gate(value: str | None) -> str:
    css = {"pass": "pass", "fail": "fail"}.get(value or "", "none")
    return f'<td class="{css}">{_e(value or "-")}</td>'


def _table(header: list[str], rows: list[str]) -> str:
    if not rows:
        return '<p class="none">none</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>{''.join(f'<tr>{r}</tr>' for r in rows)}</table>"


def _img(png: bytes, alt: str, element_id: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<figure id="{element_id}"><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></figure>'


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000)) if ms else "-"


def newest_per_variant(versions: list[Version]) -> dict[str, Version]:
    newest: dict[str, Version] = {}
    for version in sorted(versions, key=lambda v: (v.created_ms, v.number)):
        newest[version.variant] = version
    return newest


def size_points(recipe, newest: dict[str, Version]) -> list[SizePoint]:
    points = []
    for variant, version in newest.items():
        gates = recipe.variants[variant].gates if variant in recipe.variants else None
        metrics = version.metrics
        points.append(SizePoint(variant, version.format, metrics.get("bits_per_weight"), metrics.get("mean_kl"),
                                version.passed, gates.max_kl if gates else None))
        points += candidate_points(variant, t.search_candidates(version.tags))
    return points


def _summary(newest: dict[str, Version]) -> str:
    rows = []
    for variant, v in newest.items():
        m = v.metrics
        size = m.get("checkpoint_bytes")
        rows.append(f"<td>{_e(variant)}</td><td>{_e(v.label)}</td><td>{_e(', '.join(v.aliases) or '-')}</td>"
                    f"<td>{_e(v.format)}</td>{_num(m.get('bits_per_weight'), '.3f')}"
                    f"{_num(size / 2**20 if size else None, '.2f')}{_num(m.get('ppl_increase_pct'), '+.3f')}"
                    f"{_num(m.get('mean_kl'), '.5f')}{_num(m.get('top1_agreement'), '.4f')}{_gate(v.tags.get(t.GATE))}")
    return _table(["variant", "newest version", "aliases", "format", "bits/weight", "checkpoint MiB", "ppl change %",
                   "KL", "top-1 agree", "gate"], rows)


def _gates(recipe, newest: dict[str, Version]) -> str:
    rows = []
    for variant, spec in recipe.variants.items():
        gates = spec.gates
        version = newest.get(variant)
        if version is None:
            outcome = '<td class="none">never published (failed its gates, or not built yet)</td>'
        else:
            failures = t.gate_failures(version.tags)
            outcome = (f'<td class="fail">{_e("; ".join(failures))}</td>' if failures
                       else f'<td class="pass">every gate passed ({_e(version.label)})</td>')
        rows.append(f"<td>{_e(variant)}</td>{_num(gates.max_ppl_increase_pct, 'g')}{_num(gates.max_kl, 'g')}"
                    f"{_num(gates.min_top1_agreement, 'g')}{outcome}")
    return _table(["variant", "max ppl change %", "max KL", "min top-1", "newest version"], rows)


def _structure(newest: dict[str, Version]) -> str:
    rows = []
    for variant, v in newest.items():
        checks = v.tags.get(t.STRUCTURE)
        outcome, _, checked = (checks or "").partition("; checked ")
        css = "pass" if outcome == "passed" else "fail" if outcome.startswith("failed") else "none"
        rows.append(f"<td>{_e(variant)}</td><td>{_e(v.label)}</td>"
                    f'<td class="{css}">{_e(outcome or "not recorded (published before structure checks)")}</td>'
                    f"<td>{_e(checked or '-')}</td><td>{_e(v.tags.get(t.EXPERTS, '-'))}</td>")
    return _table(["variant", "newest version", "structure checks", "items checked", "experts (MoE)"], rows)


def _tasks(recipe, newest: dict[str, Version]) -> str:
    """Each task's score on the newest version of each variant, the baseline's and the drop in points with its
    paired standard error (recorded as task.<name>.<metric>* metrics)."""
    if not recipe.evaluation.tasks:
        return ('<p class="none">no tasks: name lm-evaluation-harness tasks in <code>evaluation.tasks</code> '
                '(README, "Task evaluation")</p>')
    rows = []
    for variant, v in newest.items():
        spec = recipe.variants.get(variant)
        bounds = (spec.gates.max_task_drop or {}) if spec else {}
        for task in recipe.evaluation.tasks:
            prefix = next((k[: -len("_drop_points")] for k in v.metrics
                           if k.startswith(f"task.{task.name}.") and k.endswith("_drop_points")), None)
            if prefix is None:
                continue
            m = {key[len(prefix):]: value for key, value in v.metrics.items() if key.startswith(prefix)}
            drop, se = m.get("_drop_points", float("nan")), m.get("_drop_stderr_points", float("nan"))
            noise = 0 < se and abs(drop) <= se
            undecided = not (drop + se <= bounds.get(task.name, float("inf")))   # NaN is undecided too
            verdict = ("within noise" if noise else "-") if task.name not in bounds else \
                "FAIL" if undecided else "pass, within noise" if noise else "pass"
            rows.append(f"<td>{_e(variant)}</td><td>{_e(v.label)}</td><td>{_e(task.name)}</td>"
                        f"<td>{_e(prefix.rsplit('.', 1)[-1])}</td>{_num(_points(m.get('')), '.1f')}"
                        f"{_num(_points(m.get('_baseline')), '.1f')}<td>{drop:+.2f} ± {se:.2f}</td>"
                        f"{_num(bounds.get(task.name), 'g')}<td>{_e(verdict)}</td>")
    return _table(["variant", "version", "task", "metric", "score", "baseline", "drop ± se (points)",
                   "max drop", "gate"], rows)


def _points(fraction: float | None) -> float | None:
    return None if fraction is None else fraction * 100


def _history(versions: list[Version]) -> str:
    rows = []
    for v in sorted(versions, key=lambda v: (v.variant, v.number)):
        m = v.metrics
        rows.append(f"<td>{_e(v.variant)}</td><td>{_e(v.label)}</td><td>{_e(_when(v.created_ms))}</td>"
                    f"<td>{_e(', '.join(v.aliases) or '-')}</td>{_num(m.get('ppl_increase_pct'), '+.3f')}"
                    f"{_num(m.get('mean_kl'), '.5f')}{_num(m.get('top1_agreement'), '.4f')}"
                    f"{_num(m.get('bits_per_weight'), '.3f')}{_gate(v.tags.get(t.GATE))}"
                    f"<td>{_e(v.tags.get(t.RECIPE_DIGEST, '')[:12])}</td>")
    return _table(["variant", "version", "created", "aliases", "ppl change %", "KL", "top-1 agree", "bits/weight",
                   "gate", "recipe digest"], rows)


def _engines(versions: list[Version]) -> str:
    rows = []
    for v in sorted(versions, key=lambda v: (v.variant, v.number)):
        for sm in t.held_sms(v.tags):
            m = t.metrics_of(v.tags, sm)
            tool = v.tags.get(t.sm_tag(sm, t.SM_TENSORRT)) or "-"
            rows.append(f"<td>{_e(v.label)}</td><td>{_e(sm)}</td><td>{_e(v.tags.get(t.sm_tag(sm, t.SM_TARGET), '-'))}</td>"
                        f"<td>{_e(v.tags.get(t.sm_tag(sm, t.SM_GPU), '-'))}</td>"
                        f"<td>{_e(tool)} / {_e(v.tags.get(t.sm_tag(sm, t.SM_TENSORRT_LLM), '-'))}</td>"
                        f"{_num(m.get('ppl_increase_pct'), '+.3f')}{_num(m.get('mean_kl'), '.5f')}"
                        f"{_num(m.get('top1_agreement'), '.4f')}{_num(m.get('build_seconds'), '.1f')}"
                        f"{_gate(v.tags.get(t.sm_tag(sm, t.SM_GATE)))}")
    if not rows:
        return ('<p class="none">no engines yet: a GPU host adds them with <code>kiln build --gpu SM</code> '
                '(see <code>kiln doctor</code>)</p>')
    return _table(["version", "sm", "target", "gpu", "TensorRT / TensorRT-LLM", "ppl change %", "KL", "top-1 agree",
                   "build s", "gate"], rows)


def _runtimes(newest: dict[str, Version]) -> str:
    names = sorted({r for v in newest.values() for r in t.runtimes_of(v.tags)})
    rows = []
    for variant, v in newest.items():
        cells = t.runtimes_of(v.tags)
        shown = []
        for runtime in names:
            cell = cells.get(runtime, "-")
            answer = cell.split(" ", 1)[0]
            css = {"yes": "pass", "no": "fail"}.get(answer, "none")
            shown.append(f'<td class="{css}" title="{_e(cell)}">{_e(answer)}</td>')
        checks = []
        for runtime in t.checked_runtimes(v.tags):
            measured = t.check_metrics_of(v.tags, runtime)
            checks.append(f"{runtime}: KL {measured.get('mean_kl', float('nan')):.5f}, greedy agreement "
                          f"{measured.get(t.CHECK_GREEDY, float('nan')):.2f}, gate "
                          f"{v.tags.get(t.check_tag(runtime, t.CHECK_GATE), '-')}")
        rows.append(f"<td>{_e(variant)}</td>{''.join(shown)}<td>{_e('; '.join(checks) or '-')}</td>")
    return _table(["variant", *names, "measured in the runtime"], rows)


def render(recipe, registry_uri: str, rows: list[dict]) -> str:
    """The page for `recipe` (a Recipe) from `rows` (registry.recipe_versions)."""
    versions = [Version.of(row) for row in rows]
    newest = newest_per_variant(versions)
    points = size_points(recipe, newest)
    figure = accuracy_size_png(f"{recipe.name}: accuracy against size (newest version of each variant)", points)
    series = {}
    for v in versions:
        if "mean_kl" in v.metrics:
            series.setdefault(v.variant, []).append((v.number, v.metrics["mean_kl"]))
    history = kl_history_png(f"{recipe.name}: mean KL over registry versions", series)
    unpublished = [name for name in recipe.variants if name not in newest]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kiln report: {_e(recipe.name)}</title>
<style>{_STYLE}</style></head><body>
<h1>kiln report: {_e(recipe.name)}</h1>
<p class="meta">model {_e(recipe.model.source)} &middot; registry {_e(registry_uri)} &middot; {len(versions)} version(s)
of {len(newest)} variant(s) &middot; written {_e(_when(int(time.time() * 1000)))}</p>
<h2>Accuracy against size</h2>
{_img(figure, f"{recipe.name}: mean KL against bits per weight for each variant", "accuracy-vs-size")}
{'<p class="none">not published: ' + _e(', '.join(unpublished)) + '</p>' if unpublished else ''}
<h2>Variants</h2>
{_summary(newest)}
<h2>Gates and failures</h2>
{_gates(recipe, newest)}
<h2>Structure checks</h2>
<p class="meta">What the exported files hold, checked before any metric: scales finite, positive and normal; per-layer
formats as planned; what the format leaves alone bit-identical to the source; tokenizer, chat template and configs
equal to the source's; for mixture-of-experts models, the calibration tokens each expert received
(<code>kiln diff</code> shows every problem and the whole table).</p>
{_structure(newest)}
<h2>Tasks</h2>
<p class="meta">lm-evaluation-harness tasks scored on the exported checkpoint and on the unquantized model; a drop
within its standard error is reported as such, neither a pass nor a fail.</p>
{_tasks(recipe, newest)}
<h2>History</h2>
{_img(history, "mean KL of each variant over its registry versions", "kl-history")}
{_history(versions)}
<h2>Engines per SM</h2>
{_engines(versions)}
<h2>Runtimes</h2>
<p class="meta">Which runtimes load each variant's checkpoint (hover a cell for the version checked and the
evidence), and what a runtime check measured in that runtime.</p>
{_runtimes(newest)}
</body></html>
"""


def write_report(recipe, registry_uri: str, rows: list[dict], out: Path) -> Path:
    from kiln.common.fsutil import atomic_write_text

    out = Path(out)
    atomic_write_text(out, render(recipe, registry_uri, rows))
    return out
