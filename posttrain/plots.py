"""The report's pictures: scores with their 95% intervals, and pass rate against the alignment tax (the WiSE-FT
sweep as a line, other merges as labelled points). Written atomically (a temp file, then a rename)."""

from __future__ import annotations

import os
from pathlib import Path


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def wise_lines(table: dict[str, dict]) -> list[list[str]]:
    """Each WiSE-FT sweep, ordered by alpha: the other endpoint (alpha 0), the linear merges, the aligned model."""
    sweeps: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for n, r in table.items():
        m = r.get("merge")
        if m and m["method"] == "linear":
            sweeps.setdefault((m["aligned"], m["other"]), []).append((m["alpha"], n))
    lines = []
    for (aligned, other), points in sorted(sweeps.items()):
        for alpha, path in ((0.0, other), (1.0, aligned)):
            points += [(alpha, n) for n, r in table.items() if "model" in r and _same(r["model"], path)]
        lines.append([n for _, n in sorted(points)])
    return lines


MAX_WIDTH_IN = 18.0
DPI = 110
"""Pictures at most MAX_WIDTH_IN x DPI = 1980 pixels wide: a screen shows one whole."""


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI)
    tmp.replace(path)


def label_column(ys: list[float], gap: float, low: float = 0.0, high: float = 1.0) -> list[float]:
    """Heights (axes fraction) for labels set in one column beside the plot, each as near its point's height `ys`
    as it can be with at least `gap` between neighbours, all within [low, high]: labels in a column never overlap.
    With more labels than fit, they are spaced evenly over the whole range."""
    order = sorted(range(len(ys)), key=lambda i: -ys[i])
    if len(ys) > 1 and (len(ys) - 1) * gap > high - low:
        gap = (high - low) / (len(ys) - 1)
    placed: dict[int, float] = {}
    prev = None
    for i in order:  # top down: never above the previous label minus the gap
        y = min(max(ys[i], low), high)
        placed[i] = y if prev is None else min(y, prev - gap)
        prev = placed[i]
    overflow = low - min(placed.values(), default=low)
    if overflow > 0:  # the bottom ran out: move the lowest labels up, keeping the gaps
        prev = None
        for i in reversed(order):
            placed[i] = max(placed[i], low) if prev is None else max(placed[i], prev + gap)
            prev = placed[i]
    return [placed[i] for i in range(len(ys))]


def pareto(table: dict[str, dict], names: list[str], tax_reference: str, shipped: str | None,
           path: Path, y_key: str = "pass_rate") -> list:
    """Score against alignment tax, one point per model; the names stand in a column right of the plot, each joined
    to its point by a thin line, so that no two overlap however close the points are. Returns the name labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if "alignment_tax" in table[n] and y_key in table[n]]
    x = {n: 100 * table[n]["alignment_tax"] for n in names}
    y = {n: table[n][y_key] for n in names}
    fig, ax = plt.subplots(figsize=(10, max(4.5, 0.22 * len(names) + 1.5)))
    fig.subplots_adjust(left=0.09, right=0.68, top=0.92, bottom=0.12)
    on_line = set()
    for line in wise_lines({n: table[n] for n in names}):
        ax.plot([x[n] for n in line], [y[n] for n in line], "-o", color="#4c72b0", label="WiSE-FT (linear) sweep")
        on_line |= set(line)
    markers = iter("s^DvP*Xh")
    methods: dict[str, str] = {}
    for n in names:
        m = table[n].get("merge")
        if f"{y_key}_ci" in table[n]:
            err = [[y[n] - table[n][f"{y_key}_ci"][0]], [table[n][f"{y_key}_ci"][1] - y[n]]]
            ax.errorbar(x[n], y[n], yerr=err, fmt="none", ecolor="#bbbbbb", capsize=3, zorder=1)
        if m and n not in on_line:
            marker = methods.setdefault(m["method"], next(markers, "o"))
            ax.plot(x[n], y[n], marker, color="#dd8452", markersize=8, label=f"{m['method']} merge")
        elif n not in on_line:
            ax.plot(x[n], y[n], "o", color="#55a868", label="trained / base")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    ax.set_xlabel(f"alignment tax: general-text perplexity vs {tax_reference} (%)")
    label = "gold pass rate (95% CI)" if y_key == "pass_rate" else y_key.replace("_", " ")
    ax.set_ylabel(label)
    ax.set_title(f"{label.split(' (')[0]} against alignment tax")
    ax.margins(0.08)
    fig.canvas.draw()  # final limits: the labels' heights follow their points'
    to_axes = ax.transAxes.inverted()
    at = [to_axes.transform(ax.transData.transform((x[n], y[n])))[1] for n in names]
    gap = 1.35 * 8 / (ax.get_window_extent().height * 72 / fig.dpi)  # 8-point text, in axes fraction
    texts = []
    for n, h in zip(names, label_column(at, gap), strict=True):
        texts.append(ax.annotate(n + (" (ship)" if n == shipped else ""), (x[n], y[n]), xytext=(1.03, h),
                                 textcoords="axes fraction", va="center", fontsize=8, annotation_clip=False,
                                 fontweight="bold" if n == shipped else "normal",
                                 arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.5}))
    _save(fig, path)
    return texts


def scores(table: dict[str, dict], names: list[str], panels: list[tuple[str, str]], path: Path,
           shipped: str | None = None) -> None:
    """One horizontal bar chart per (key, title) panel, the models sorted by the first panel's score (best on
    top), with the 95% interval where the table has one; the shipped model's bars in another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = panels[0][0]
    rows = sorted(names, key=lambda n: table[n].get(first, float("-inf")))  # barh draws the first at the bottom
    width = min(MAX_WIDTH_IN, 1.6 + 4.2 * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 1.2 + 0.3 * len(rows)), sharey=True, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        vals = [table[n].get(key, float("nan")) for n in rows]
        colors = ["#dd8452" if n == shipped else "#4c72b0" for n in rows]
        if all(f"{key}_ci" in table[n] for n in rows if key in table[n]):
            lo = [v - table[n][f"{key}_ci"][0] if key in table[n] else 0 for n, v in zip(rows, vals, strict=True)]
            hi = [table[n][f"{key}_ci"][1] - v if key in table[n] else 0 for n, v in zip(rows, vals, strict=True)]
            ax.barh(rows, vals, xerr=[lo, hi], capsize=3, color=colors, error_kw={"ecolor": "#555555"})
            title += " (95% CI)"
        else:
            ax.barh(rows, vals, color=colors)
        ax.set_title(title, fontsize=10)
        if key.endswith(("rate", "accuracy")):
            ax.set_xlim(0, 1)
        ax.grid(axis="x", color="#dddddd")
        ax.set_axisbelow(True)
    axes[0][0].set_yticks(range(len(rows)), [n + (" (ship)" if n == shipped else "") for n in rows])
    fig.tight_layout()
    _save(fig, path)
