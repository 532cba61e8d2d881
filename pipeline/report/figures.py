"""The pictures people choose a format from: accuracy against size, and each variant's KL over versions.

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display): a build logs the
accuracy-against-size PNG on every published variant's run, and `kiln report` inlines both.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

from kiln.common.digest import canonical_digest

UNQUANTIZED_BITS = 16.0   # the reference point: the 16-bit model validation compares against
_FAIL = "#c62828"
_PALETTE = ["#1565c0", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037", "#ad1457", "#455a64", "#9e9d24",
            "#283593", "#00695c", "#d84315"]
_MARKERS = ["o", "s", "D", "^", "v", "P", "p", "h"]


@dataclass(frozen=True)
class SizePoint:
    """One variant on the accuracy-against-size figure."""

    variant: str
    label: str                       # its format, as tables show it
    bits_per_weight: float | None    # None: its size is unknown (published by an older kiln)
    mean_kl: float | None
    passed: bool
    max_kl: float | None             # its KL gate, if it has one
    candidate: bool = False          # a size search's candidate the variant did not publish (quant auto)


def figure_digest(title: str, points: list[SizePoint]) -> str:
    """Names the figure's content: a run shows a new figure only when this changes."""
    drawn = [{k: v for k, v in asdict(p).items() if k != "candidate" or v} for p in points]   # digests predate it
    return canonical_digest({"title": title, "points": drawn, "kind": "accuracy-vs-size/1"})


def candidate_points(variant: str, candidates: list[dict]) -> list[SizePoint]:
    """A size search's candidates that failed their gates (the one published is the variant's own point)."""
    return [SizePoint(f"{variant}@{c['effective_bits']:g}b", "search candidate", c["bits_per_weight"], c["mean_kl"],
                      False, None, candidate=True) for c in candidates if not c["passed"]]


def frontier(points: list[SizePoint]) -> list[SizePoint]:
    """The published points no other beats on both size and KL, smallest first: the best accuracy each size buys."""
    placed = sorted((p for p in points if p.passed and not p.candidate and p.bits_per_weight is not None
                     and p.mean_kl is not None and math.isfinite(p.mean_kl)),
                    key=lambda p: (p.bits_per_weight, p.mean_kl))
    best: list[SizePoint] = []
    for point in placed:
        if not best or point.mean_kl < best[-1].mean_kl:
            best.append(point)
    return best


def _size_searches(points: list[SizePoint]) -> dict[str, list[SizePoint]]:
    """Each quant-auto variant's candidates with the point it published (or failed with), smallest first: the
    search's own frontier, for variants that built more than one budget."""
    searched = {p.variant.split("@")[0] for p in points if p.candidate}
    lines = {v: sorted((p for p in points if p.variant == v or (p.candidate and p.variant.split("@")[0] == v)),
                       key=lambda p: p.bits_per_weight) for v in searched}
    return {v: line for v, line in lines.items() if len(line) > 1}


def _plain(text: str) -> str:
    """Text from recipes (names, paths, tags) drawn as written: matplotlib reads $...$ as math, and a `$` in a
    model path made every rebuild's figure fail after its version was published."""
    return text.replace("$", r"\$")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def accuracy_size_png(title: str, points: list[SizePoint]) -> bytes:
    return _png(accuracy_size_figure(title, points)[0])


def accuracy_size_figure(title: str, points: list[SizePoint]):
    """(figure, axes, {variant: the colour its marker is drawn in}).
    x: bits per weight of the decoder's linear layers; y: mean KL against the 16-bit model (log).
    Each KL gate is a dashed line; a variant that failed its gates is a red cross, a size search's candidate
    that failed a small hollow one, dotted to the others its search built; the frontier joins the variants no
    other beats on both size and KL; the unquantized model sits at 16 bits on the bottom edge (its KL is 0, which
    a log axis cannot show). Variants are named in the legend, in order of size, so that formats of equal size stay readable."""
    figure = _figure(9.0, 4.6)
    axes = figure.add_subplot()
    # A KL that could not be measured (NaN: a checkpoint the structure checks refused) has no place on the axes.
    everything = sorted((p for p in points if p.bits_per_weight is not None and p.mean_kl is not None
                         and math.isfinite(p.mean_kl)), key=lambda p: (p.bits_per_weight, p.mean_kl))
    placed = [p for p in everything if not p.candidate]
    kls = [max(p.mean_kl, 1e-9) for p in everything] + [p.max_kl for p in points if p.max_kl]
    low, high = (min(kls) / 8, max(kls) * 4) if kls else (1e-5, 1e-1)
    colours = {}
    for index, point in enumerate(placed):
        name = _plain(point.variant if point.label in (point.variant, "") else f"{point.variant} ({point.label})")
        colours[point.variant] = _PALETTE[index % len(_PALETTE)] if point.passed else _FAIL
        if point.passed:
            axes.scatter([point.bits_per_weight], [max(point.mean_kl, low)], s=70, zorder=3,
                         marker=_MARKERS[index % len(_MARKERS)], color=colours[point.variant],
                         edgecolors="white", linewidths=0.6, label=f"{name}: {point.bits_per_weight:.2f} bits")
        else:
            axes.scatter([point.bits_per_weight], [max(point.mean_kl, low)], s=110, zorder=4, marker="X",
                         color=_FAIL, edgecolors="white", linewidths=0.6,
                         label=f"{name}: {point.bits_per_weight:.2f} bits, FAILED its gates")
    for point in (p for p in everything if p.candidate):
        axes.scatter([point.bits_per_weight], [max(point.mean_kl, low)], s=45, zorder=3, marker="X",
                     facecolors="none", edgecolors=_FAIL, linewidths=1.0,
                     label=_plain(f"{point.variant}: {point.bits_per_weight:.2f} bits, a search candidate that failed"))
    for variant, searched in _size_searches(everything).items():
        axes.plot([p.bits_per_weight for p in searched], [max(p.mean_kl, low) for p in searched], color="#bdbdbd",
                  linestyle=":", linewidth=1.2, zorder=2,
                  label=_plain(f"{variant}: its size search, bits against KL for each budget built"))
    best = frontier(points)
    if len(best) > 1:
        axes.plot([p.bits_per_weight for p in best], [max(p.mean_kl, low) for p in best], color="#9e9e9e",
                  linewidth=1, zorder=2, label="frontier: the least KL each size bought")
    for gate in sorted({p.max_kl for p in points if p.max_kl}):
        owners = _plain(", ".join(p.variant for p in points if p.max_kl == gate))
        axes.axhline(gate, color="#757575", linestyle="--", linewidth=1, zorder=1)
        axes.annotate(f"gate max_kl {gate:g} ({owners})", (0.3, gate), textcoords="offset points", xytext=(0, 3),
                      fontsize=7.5, color="#616161")
    axes.set_yscale("log")
    axes.set_ylim(low, high)
    axes.set_xlim(0, UNQUANTIZED_BITS + 1.5)
    axes.scatter([UNQUANTIZED_BITS], [low], s=150, marker="*", color="black", zorder=5, clip_on=False,
                 label="unquantized 16-bit model (KL 0)")
    axes.set_xticks([2, 4, 6, 8, 10, 12, 14, 16])
    axes.set_xlabel("bits per weight (decoder linear layers, scales included)")
    axes.set_ylabel("mean KL vs the 16-bit model (nats, log)")
    axes.set_title(_plain(title), fontsize=10, loc="left")
    axes.grid(True, which="major", alpha=0.3)
    unplaced = [p.variant for p in points if p not in everything]
    if unplaced:
        axes.plot([], [], " ", label=_plain(f"not shown (size or KL unknown): {', '.join(unplaced)}"))
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=False, borderaxespad=0)
    return figure, axes, colours


def kl_history_png(title: str, series: dict[str, list[tuple[int, float]]]) -> bytes:
    """Each variant's mean KL over its registry versions (x: version number)."""
    figure = _figure(7.2, 3.2)
    axes = figure.add_subplot()
    series = {variant: [(v, kl) for v, kl in values if math.isfinite(kl)] for variant, values in series.items()}
    series = {variant: values for variant, values in series.items() if values}
    for variant, values in sorted(series.items()):
        values = [(v, max(kl, 1e-9)) for v, kl in values]
        axes.plot([v for v, _ in values], [kl for _, kl in values], marker="o", label=_plain(variant))
    axes.set_yscale("log")
    axes.set_xlabel("registry version")
    axes.set_ylabel("mean KL (log)")
    axes.set_title(_plain(title), fontsize=10, loc="left")
    axes.grid(True, alpha=0.3)
    numbers = [v for values in series.values() for v, _ in values]
    if numbers:
        axes.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
        axes.set_xticks(range(min(numbers), max(numbers) + 1, max(1, (max(numbers) - min(numbers)) // 10 + 1)))
    if series:
        axes.legend(fontsize=8)
    return _png(figure)

