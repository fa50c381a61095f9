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


def pareto(table: dict[str, dict], names: list[str], tax_reference: str, shipped: str | None,
                path: Path, y_key: str = "pass_rate") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if "alignment_tax" in table[n] and y_key in table[n]]
    x = {n: 100 * table[n]["alignment_tax"] for n in names}
    y = {n: table[n][y_key] for n in names}
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
        ax.annotate(n + (" (ship)" if n == shipped else ""), (x[n], y[n]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8, fontweight="bold" if n == shipped else "normal")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    ax.set_xlabel(f"alignment tax: general-text perplexity vs {tax_reference} (%)")
    label = "gold pass rate (95% CI)" if y_key == "pass_rate" else y_key.replace("_", " ")
    ax.set_ylabel(label)
    ax.set_title(f"{label.split(' (')[0]} against alignment tax")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def scores(table: dict[str, dict], names: list[str], panels: list[tuple[str, str]], path: Path) -> None:
    """One bar chart per (key, title) panel over `names`, with the 95% interval where the table has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 1.4 * len(names) * len(panels)), 3.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        shown = [n for n in names if key in table[n]]
        vals = [table[n][key] for n in shown]
        if all(f"{key}_ci" in table[n] for n in shown):
            lo = [v - table[n][f"{key}_ci"][0] for n, v in zip(shown, vals, strict=True)]
            hi = [table[n][f"{key}_ci"][1] - v for n, v in zip(shown, vals, strict=True)]
            ax.bar(shown, vals, yerr=[lo, hi], capsize=4, color="#4c72b0")
            title += " (95% CI)"
        else:
            ax.bar(shown, vals, color="#4c72b0")
        ax.set_title(title)
        if key.endswith(("rate", "accuracy")):
            ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
