"""compare: iterative DPO rounds side by side, read from the MLflow store (each round's latest decision).

    python -m flows.iterative compare           # prints the table, writes reports/rounds/{rounds.png,rounds.md}

One row per round: the candidate's and the champion's gold pass rate on the eval split (95% intervals), the paired
pass-rate gain on the selection split that promotion decided on, whether it was promoted, its registry version.
"""

from __future__ import annotations

from pathlib import Path


def markdown(table) -> str:
    """A pandas DataFrame as a markdown table."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _decisions(uri: str, experiment: str) -> dict:
    """Round -> the MLflow run data of its latest decision (a resumed round: its last one)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="metrics.promoted >= 0",
                              order_by=["attributes.start_time ASC"]) if exp else []
    return {int(r.data.tags["iterative_round"]): r.data for r in runs}


def write_curve(uri: str, experiment: str, out: Path) -> Path | None:
    """The eval curve over rounds: `out/rounds.png` (champion and candidate gold pass rate with 95% intervals)
    and `out/rounds.md` (the compare table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = _decisions(uri, experiment)
    if not latest:
        return None
    ks = sorted(latest)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, shift in (("champion_pass_rate", "champion (start of round)", -0.05),
                              ("candidate_pass_rate", "candidate", 0.05)):
        y = [latest[k].metrics[key] for k in ks]
        err = [[y[i] - latest[k].metrics[key + "_lo"] for i, k in enumerate(ks)],
               [latest[k].metrics[key + "_hi"] - y[i] for i, k in enumerate(ks)]]
        ax.errorbar([k + shift for k in ks], y, yerr=err, marker="o", capsize=3, label=label)
    for k in ks:
        if latest[k].metrics["promoted"]:
            ax.annotate("promoted", (k + 0.05, latest[k].metrics["candidate_pass_rate"]), fontsize=8)
    ax.set_xticks(ks)
    ax.set_xlabel("round")
    ax.set_ylabel("gold pass rate (eval split, 95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=120)
    plt.close(fig)
    (out / "rounds.md").write_text("# Iterative DPO rounds\n\n![eval curve](rounds.png)\n\n"
                                   + markdown(compare_table(uri, experiment)) + "\n")
    return out / "rounds.png"


def compare_table(uri: str, experiment: str):
    """One row per round (its latest decision): candidate and champion pass rate with 95% CI, gain CI, promoted."""
    import pandas as pd

    latest = _decisions(uri, experiment)

    def ci(m: dict, key: str, fmt: str = ".3f") -> str:
        return f"{m[key]:{fmt}} [{m[key + '_lo']:{fmt}}, {m[key + '_hi']:{fmt}}]"

    rows = [{"round": k, "candidate": ci(m.metrics, "candidate_pass_rate"),
             "champion": ci(m.metrics, "champion_pass_rate"), "gain": ci(m.metrics, "gain", "+.3f"),
             "promoted": bool(m.metrics["promoted"]), "version": m.tags.get("model_version")}
            for k, m in sorted(latest.items())]
    return pd.DataFrame(rows, columns=["round", "candidate", "champion", "gain", "promoted", "version"])
