"""report: one table of every evaluated model, win rates against a reference model, and a plot.

    dvc repro report
    python -m stages.report --evals reports/evaluate --out reports

Reads `reports/evaluate/<model>/answers.jsonl`; writes `report.md`, `scores.png` and `metrics.json` (for
`dvc metrics show`): per model the gold pass rate, mean gold score and win rate against `report.reference`
(per prompt: win 1 / tie 0.5 / loss 0 on the gold score), each with a 95% bootstrap interval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain import cli, io, stats


@dataclass
class ReportParams:
    reference: str = "sft"
    """The model every other is compared with, per prompt, for the win rate."""
    order: list[str] | None = None
    """Row order in the table (default: base, sft, then the rest by name)."""


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
    return table


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
    wr = f"win_rate_vs_{params.reference}"
    lines = ["# posttrain report", "", f"Gold verifiers on {table[names[0]]['n']} held-out prompts; 95% bootstrap "
             f"intervals; win rate per prompt against `{params.reference}` (win 1 / tie 0.5 / loss 0).", "",
             f"| model | pass rate | mean score | win rate vs {params.reference} | mean length |",
             "|---|---|---|---|---|"]
    for n in names:
        r = table[n]
        lines.append(f"| {n} | {_fmt(r['pass_rate'], r['pass_rate_ci'])} | {_fmt(r['mean_score'], r['mean_score_ci'])}"
                     f" | {_fmt(r[wr], r[wr + '_ci'])} | {r['mean_length']:.1f} |")
    lines += ["", "![scores](scores.png)", ""]
    if args.label_stats:
        st = json.loads(Path(args.label_stats).read_text())
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(st["dropped"].items())) or "none"
        lines += [f"Preference data: {st['prompts']} prompts sampled, {st['pairs']} pairs kept; dropped by rule "
                  f"(see stages/label.py): {drops}.", ""]
    out.mkdir(parents=True, exist_ok=True)
    plot(table, names, params.reference, out / "scores.png")
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
