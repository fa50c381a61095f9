"""report: one table of every evaluated model, win rates against a reference model, the alignment-tax trade-off.

    dvc repro report
    python -m stages.report --evals reports/evaluate --out reports

Reads `reports/evaluate/<model>/{answers,metrics}.jsonl`; writes `report.md`, `scores.png`, `pareto.png` and
`metrics.json` (for `dvc metrics show`): per model the gold pass rate, mean gold score and win rate against
`report.reference` (per prompt: win 1 / tie 0.5 / loss 0 on the gold score), each with a 95% bootstrap interval,
and the alignment tax: general-text perplexity relative to `report.tax_reference`'s, minus 1.

`pareto.png` puts each model at (alignment tax, gold pass rate): the WiSE-FT sweep (linear merges, from the other
endpoint at alpha 0 to the aligned model at alpha 1) as a line, every other merge method as a labelled point.
`report.md` names the model to ship by the rule: the highest gold pass rate among models whose general-text
perplexity is at most `ship_max_ppl_increase` above the reference model's (ties: higher mean score, then lower
perplexity).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from posttrain import cli, io, stats


@dataclass
class ReportParams:
    reference: str = "sft"
    """The model every other is compared with, per prompt, for the win rate."""
    order: list[str] | None = None
    """Row order in the table (default: base, sft, then the rest by name)."""
    tax_reference: str = "base"
    """Alignment tax = a model's general-text perplexity / this model's - 1 (the model before post-training)."""
    ship_max_ppl_increase: float = 0.05
    """Ship rule: the best pass rate among models whose general perplexity is <= (1 + this) x the reference's."""

    def __post_init__(self) -> None:
        if self.ship_max_ppl_increase < 0:
            raise ValueError(f"ship_max_ppl_increase must be >= 0, got {self.ship_max_ppl_increase}")


def _fmt(v: float, ci) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def build(evals: Path, reference: str, n_boot: int, seed: int) -> dict[str, dict]:
    answers = {d.name: io.read_jsonl(d / "answers.jsonl", "answers") for d in sorted(evals.iterdir())
               if (d / "answers.jsonl").exists()}
    if reference not in answers:
        raise io.InputError(f"{evals}: no answers for the reference model {reference!r}; have {sorted(answers)}")
    ref = {a["id"]: a["score"] for a in answers[reference]}
    table = {}
    for name, rows in answers.items():
        ids = [a["id"] for a in rows]
        if set(ids) != set(ref):
            raise io.InputError(f"{evals / name / 'answers.jsonl'}: prompt ids differ from {reference!r}'s")
        wins = stats.win_values([a["score"] for a in rows], [ref[i] for i in ids])
        table[name] = stats.summarise(rows, n_boot, seed) | {
            f"win_rate_vs_{reference}": sum(wins) / len(rows),
            f"win_rate_vs_{reference}_ci": stats.bootstrap_ci(wins, n_boot, seed)}
        metrics = evals / name / "metrics.json"
        if metrics.exists():  # what evaluate measured beyond the answers: general_ppl, the model, its merge
            m = json.loads(metrics.read_text())
            table[name] |= {k: m[k] for k in ("general_ppl", "model", "merge") if k in m}
    return table


def add_tax(table: dict[str, dict], tax_reference: str, evals: Path) -> None:
    """alignment_tax = general_ppl / the tax reference's general_ppl - 1, for every model that has one."""
    ref = table.get(tax_reference, {}).get("general_ppl")
    if ref is None:
        raise io.InputError(f"{evals / tax_reference / 'metrics.json'}: no general_ppl for report.tax_reference "
                            f"{tax_reference!r}: evaluate it, or name another model; have {sorted(table)}")
    for r in table.values():
        if "general_ppl" in r:
            r["alignment_tax"] = r["general_ppl"] / ref - 1


def ship(table: dict[str, dict], reference: str, max_increase: float) -> str | None:
    """The highest pass rate among models with general_ppl <= (1 + max_increase) x the reference's."""
    limit = table[reference].get("general_ppl", float("nan")) * (1 + max_increase)
    eligible = [n for n, r in table.items() if r.get("general_ppl", float("inf")) <= limit]
    return max(eligible, key=lambda n: (table[n]["pass_rate"], table[n]["mean_score"], -table[n]["general_ppl"]),
               default=None)


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


def pareto_plot(table: dict[str, dict], names: list[str], tax_reference: str, shipped: str | None,
                path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if "alignment_tax" in table[n]]
    x = {n: 100 * table[n]["alignment_tax"] for n in names}
    y = {n: table[n]["pass_rate"] for n in names}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    on_line = set()
    for line in wise_lines({n: table[n] for n in names}):
        ax.plot([x[n] for n in line], [y[n] for n in line], "-o", color="#4c72b0", label="WiSE-FT (linear) sweep")
        on_line |= set(line)
    markers = iter("s^DvP*Xh")
    methods: dict[str, str] = {}
    for n in names:
        m = table[n].get("merge")
        err = [[y[n] - table[n]["pass_rate_ci"][0]], [table[n]["pass_rate_ci"][1] - y[n]]]
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
    ax.set_ylabel("gold pass rate (95% CI)")
    ax.set_title("pass rate against alignment tax")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def plot(table: dict[str, dict], names: list[str], reference: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.4 * len(names) * 2), 3.6))
    for ax, key, title in ((axes[0], "pass_rate", "gold pass rate"),
                           (axes[1], f"win_rate_vs_{reference}", f"win rate vs {reference}")):
        vals = [table[n][key] for n in names]
        lo = [v - table[n][f"{key}_ci"][0] for n, v in zip(names, vals, strict=True)]
        hi = [table[n][f"{key}_ci"][1] - v for n, v in zip(names, vals, strict=True)]
        ax.bar(names, vals, yerr=[lo, hi], capsize=4, color="#4c72b0")
        ax.set_title(f"{title} (95% CI)")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def run(common, params: ReportParams, args) -> dict:
    evals, out = Path(args.evals), Path(args.out)
    table = build(evals, params.reference, 1000, common.seed)
    first = [n for n in (params.order or ["base", "sft"]) if n in table]
    names = first + sorted(n for n in table if n not in first)
    add_tax(table, params.tax_reference, evals)
    shipped = ship(table, params.reference, params.ship_max_ppl_increase)
    wr = f"win_rate_vs_{params.reference}"
    lines = ["# posttrain report", "", f"Gold verifiers on {table[names[0]]['n']} held-out prompts; 95% bootstrap "
             f"intervals; win rate per prompt against `{params.reference}` (win 1 / tie 0.5 / loss 0). General ppl: "
             "perplexity on a general-English text (`posttrain/data/general.txt`); alignment tax: that perplexity "
             f"relative to `{params.tax_reference}`'s.", "",
             f"| model | pass rate | mean score | win rate vs {params.reference} | mean length | general ppl "
             f"| tax vs {params.tax_reference} |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        r = table[n]
        ppl = (f"{r['general_ppl']:.2f} | {100 * r['alignment_tax']:+.1f}%" if "general_ppl" in r else "- | -")
        lines.append(f"| {n} | {_fmt(r['pass_rate'], r['pass_rate_ci'])} | {_fmt(r['mean_score'], r['mean_score_ci'])}"
                     f" | {_fmt(r[wr], r[wr + '_ci'])} | {r['mean_length']:.1f} | {ppl} |")
    rule = (f"the highest gold pass rate among models whose general-text perplexity is at most "
            f"{100 * params.ship_max_ppl_increase:g}% above `{params.reference}`'s (ties: higher mean score, then "
            "lower perplexity)")
    lines += ["", "![scores](scores.png)", "",
              f"**Ship: {shipped or 'none'}**. Rule: {rule}. Pass-rate differences inside the intervals above are "
              "not significant.", "", "![alignment tax](pareto.png)", ""]
    if args.label_stats:
        st = json.loads(Path(args.label_stats).read_text())
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(st["dropped"].items())) or "none"
        lines += [f"Preference data: {st['prompts']} prompts sampled, {st['pairs']} pairs kept; dropped by rule "
                  f"(see stages/label.py): {drops}.", ""]
    out.mkdir(parents=True, exist_ok=True)
    plot(table, names, params.reference, out / "scores.png")
    pareto_plot(table, names, params.tax_reference, shipped, out / "pareto.png")
    if shipped:
        import mlflow

        mlflow.set_tag("ship", shipped)
    io.write_text(out / "report.md", "\n".join(lines))
    io.write_json(out / "metrics.json", table)
    print(f"report: {out / 'report.md'}")
    return {f"{n}.{k}": v for n, r in table.items() for k, v in r.items() if isinstance(v, float)}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--evals", required=True, help="folder of evaluate outputs, one sub-folder per model")
    p.add_argument("--out", required=True, help="output folder for report.md, scores.png, metrics.json")
    p.add_argument("--label-stats", help="the label stage's stats.json, to report what was dropped and why")
    return cli.execute("report", ReportParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
