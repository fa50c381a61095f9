"""report: one table of every evaluated model, win rates against a reference model, the alignment-tax trade-off.

    dvc repro report
    python -m stages.report --evals reports/evaluate --out reports

Reads `reports/evaluate/<model>/{answers.jsonl,metrics.json}`; writes `report.md`, `scores.png`, `pareto.png` and
`metrics.json` (every figure of the table per model; `posttrain.table` prints it): the gold pass rate, mean gold
score and win rate against `report.reference` (per prompt: win 1 / tie 0.5 / loss 0 on the gold score), the win
rates by the judges `report.judges` names, each with a 95% bootstrap interval, and the alignment tax: general-text
perplexity relative to `report.tax_reference`'s, minus 1. The table shows the columns that apply.

`pareto.png` puts each model at (alignment tax, gold pass rate): the WiSE-FT sweep (linear merges, from the other
endpoint at alpha 0 to the aligned model at alpha 1) as a line, every other merge method as a labelled point.
`report.md` names the model to ship by the rule: the highest gold pass rate among models whose general-text
perplexity is at most `ship_max_ppl_increase` above the reference model's (ties: higher mean score, then lower
perplexity).

With no gold verifier (a user's preference data set, `prepare.pairs: dataset`) there is no pass rate to rank by:
the table shows what `evaluate` measured instead (held-out chosen / rejected perplexity, the share of held-out pairs
whose chosen response the model prefers, mean response length, general perplexity and the alignment tax),
`scores.png` plots held-out preference accuracy and chosen perplexity, `pareto.png` puts each model at (alignment
tax, held-out preference accuracy), and no model is shipped by rule. `--prepare-stats` adds the data set's format
and the rows prepare dropped, by reason. `--credit` adds the `credit` stage's token-credit tables (blame
localisation, shared-prefix displacement) and its picture, or one line saying no pair is of a worked task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from posttrain import cli, io, plots, stats
from posttrain.judges import JUDGES, LlmJudgeParams, make


@dataclass
class ReportParams:
    reference: str = "sft"
    """The model every other is compared with, per prompt, for the win rate."""
    judges: list[str] = field(default_factory=lambda: ["verifier"])
    """Keys of posttrain.judges.JUDGES whose win rate against `reference` the table shows: 'verifier' (gold scores,
    where verifiers exist), 'reward_model' (needs evaluate.reward_model: true), 'llm' (the `llm` judge compares every
    model's answer with the reference's, both orders: 2 forward passes per answer)."""
    llm: LlmJudgeParams = field(default_factory=LlmJudgeParams)
    """The LLM judge (read only when `judges` names 'llm')."""
    order: list[str] | None = None
    """Rows to put first (default: base, sft); the rest follow as `row_order` derives them, so a new variant or
    merge row needs no entry here."""
    tax_reference: str = "base"
    """Alignment tax = a model's general-text perplexity / this model's - 1 (the model before post-training)."""
    ship_max_ppl_increase: float = 0.05
    """Ship rule: the best pass rate among models whose general perplexity is <= (1 + this) x the reference's."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.judges) - set(JUDGES))
        if unknown:
            raise ValueError(f"judges: {unknown} not in {sorted(JUDGES)}")
        if self.ship_max_ppl_increase < 0:
            raise ValueError(f"ship_max_ppl_increase must be >= 0, got {self.ship_max_ppl_increase}")


def _fmt(v: float, ci, digits: int = 3) -> str:
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


HELDOUT = ("heldout_pref_accuracy", "heldout_pref_accuracy_ci", "heldout_chosen_ppl", "heldout_chosen_ppl_ci",
           "heldout_rejected_ppl", "heldout_rejected_ppl_ci", "heldout_pairs")
"""evaluate's measures on held-out preference pairs: what the table shows when there is no gold verifier."""


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
        gold = [a for a in rows if a["score"] is not None]  # prompts with a verifier (none for a user's data set)
        lengths = [a["length"] for a in rows]
        table[name] = {"n": len(rows), "n_gold": len(gold), "mean_length": sum(lengths) / len(lengths)}
        if gold:
            table[name] |= stats.summarise(gold, n_boot, seed) | {
                "n": len(rows), "mean_length": sum(lengths) / len(lengths)}
        metrics = evals / name / "metrics.json"
        if metrics.exists():  # what evaluate measured beyond the answers: general_ppl, held-out pairs, the model
            m = json.loads(metrics.read_text())
            table[name] |= {k: m[k] for k in ("general_ppl", "model", "merge", *HELDOUT) if k in m}
    return table


def _mean_ci(values: list[float], n_boot: int, seed: int) -> tuple[float, tuple[float, float]]:
    return sum(values) / len(values), stats.bootstrap_ci(values, n_boot, seed)


def add_judged(table: dict[str, dict], evals: Path, params: ReportParams, prompts: str | None, common,
               n_boot: int) -> None:
    """Each judge of `report.judges` (a row of posttrain.judges.JUDGES) adds its win rate against the reference
    under the row's column: from the value evaluate stored for each answer where the row names one (gold score,
    reward), else by asking the judge per prompt. Also the mean reward where evaluate stored rewards, and the
    held-out implicit-reward accuracy (share of held-out pairs where log pi - log pi_ref is larger for chosen than
    for rejected)."""
    ref = params.reference
    rows = {n: io.read_jsonl(evals / n / "answers.jsonl", "answers") for n in table}
    answers = {n: {a["id"]: a for a in r} for n, r in rows.items()}
    ids = sorted(answers[ref])
    for name in params.judges:
        judge, column = JUDGES[name], JUDGES[name].column.format(ref=ref)
        if judge.stored:
            for n in table:  # every model first: the reference's values enter every win rate
                missing = next((i for i, a in enumerate(rows[n], start=1) if judge.stored not in a), None)
                if missing:
                    raise io.InputError(f"{evals / n / 'answers.jsonl'}: row {missing}: field '{judge.stored}': "
                                        f"missing: set {judge.needs} for report.judges '{name}'")
            both = [i for i in ids if all(answers[n][i][judge.stored] is not None for n in table)]
            for n in table if both else ():  # no prompt with a value (a verifier on none): no column
                values = [judge.compare(answers[n][i][judge.stored], answers[ref][i][judge.stored]) for i in both]
                table[n][column], table[n][f"{column}_ci"] = _mean_ci(values, n_boot, common.seed)
            continue
        from posttrain import modeling

        if not prompts:
            raise io.InputError(f"report: report.judges names '{name}' but no --prompts file was given")
        by_id = {r["id"]: r for r in io.read_jsonl(prompts, "prompts")}
        asked = make(name, llm=params.llm, device=modeling.device_for(common.device),
                     trust_remote_code=common.trust_remote_code)
        for n in table:
            if n == ref:
                continue
            p = asked.prefer([by_id[i] for i in ids], [answers[n][i]["response"] for i in ids],
                             [answers[ref][i]["response"] for i in ids])
            table[n][column], table[n][f"{column}_ci"] = _mean_ci(p, n_boot, common.seed)
    if all("reward" in a for n in table for a in rows[n]):  # evaluate.reward_model: true
        for n in table:
            table[n]["mean_reward"], table[n]["mean_reward_ci"] = _mean_ci(
                [answers[n][i]["reward"] for i in ids], n_boot, common.seed)
    held = {n: {r["id"]: r for r in io.check_rows(evals / n / "metrics.json", logps, "logp_sums")}
            for n, logps in _heldout_logps(evals, table).items()}
    if ref in held:
        for n in held:
            if n == ref or held[n].keys() != held[ref].keys():
                continue
            right = [float(r["chosen"] - held[ref][i]["chosen"] > r["rejected"] - held[ref][i]["rejected"])
                     for i, r in sorted(held[n].items())]
            table[n]["implicit_accuracy"], table[n]["implicit_accuracy_ci"] = _mean_ci(right, n_boot, common.seed)


def _heldout_logps(evals: Path, table: dict) -> dict[str, list[dict]]:
    """Model -> its held-out pairs' summed log-probs, which evaluate keeps in metrics.json (`heldout_logps`)."""
    out = {}
    for n in table:
        path = evals / n / "metrics.json"
        if path.is_file() and (logps := json.loads(path.read_text()).get("heldout_logps")):
            out[n] = logps
    return out


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
    eligible = [n for n, r in table.items() if r.get("general_ppl", float("inf")) <= limit and "pass_rate" in r]
    return max(eligible, key=lambda n: (table[n]["pass_rate"], table[n]["mean_score"], -table[n]["general_ppl"]),
               default=None)


def columns(params: ReportParams) -> list[tuple[str, str, str]]:
    """(key, header, format) of every column the table may show; a column shows when some model has its key.
    Format 'ci' ('ci2': to 2 decimals) prints the value with its 95% interval (the key + '_ci')."""
    ref, tax = params.reference, params.tax_reference
    judged = [(j.column.format(ref=ref), j.header.format(ref=ref), "ci") for j in JUDGES.values()]
    return [("pass_rate", "pass rate", "ci"), ("mean_score", "mean score", "ci"), *judged,
            ("mean_reward", "mean reward", "ci"),
            ("implicit_accuracy", f"held-out implicit-reward accuracy vs {ref}", "ci"),
            ("heldout_pref_accuracy", "held-out pref accuracy (likelihood)", "ci"),
            ("heldout_chosen_ppl", "held-out chosen ppl", "ci2"),
            ("heldout_rejected_ppl", "held-out rejected ppl", "ci2"),
            ("mean_length", "mean length", ".1f"), ("general_ppl", "general ppl", ".2f"),
            ("alignment_tax", f"tax vs {tax}", "pct")]


def _cell(r: dict, key: str, fmt: str) -> str:
    if key not in r:
        return "-"
    if fmt in ("ci", "ci2"):  # the value with its 95% interval, to 3 (or 2) decimals
        digits = 3 if fmt == "ci" else 2
        return _fmt(r[key], r[key + "_ci"], digits) if key + "_ci" in r else f"{r[key]:.{digits}f}"
    return f"{100 * r[key]:+.1f}%" if fmt == "pct" else format(r[key], fmt)


def table_lines(table: dict[str, dict], names: list[str], params: ReportParams) -> list[str]:
    shown = [c for c in columns(params) if any(c[0] in table[n] for n in names)]
    lines = ["| model | " + " | ".join(h for _, h, _ in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    return lines + [f"| {n} | " + " | ".join(_cell(table[n], k, f) for k, _, f in shown) + " |" for n in names]


def _intro(table: dict[str, dict], names: list[str], params: ReportParams, gold: bool) -> str:
    ref = params.reference
    n_pairs = next((table[n]["heldout_pairs"] for n in names if "heldout_pairs" in table[n]), 0)
    parts = [f"Gold verifiers on {table[names[0]]['n_gold']} held-out prompts; win rate per prompt against `{ref}` "
             "(win 1 / tie 0.5 / loss 0)." if gold else
             f"No gold verifier on these {table[names[0]]['n']} held-out prompts (a user's data set): no pass rate "
             "or ship rule."]
    parts += [j.about.format(ref=ref, llm=params.llm.model) for j in JUDGES.values()
              if j.about and any(j.column.format(ref=ref) in table[n] for n in names)]
    if n_pairs:
        parts.append(f"On {n_pairs} held-out preference pairs: implicit-reward accuracy = share where log pi - log "
                     f"pi_{ref} is larger for the chosen response; pref accuracy = share whose chosen response has "
                     "the higher mean per-token log-prob; chosen / rejected ppl = the model's perplexity of them.")
    parts.append("95% bootstrap intervals. General ppl: perplexity on a general-English text (`posttrain/data/"
                 f"general.txt`); alignment tax: that perplexity relative to `{params.tax_reference}`'s.")
    return " ".join(parts)


def _ship_lines(shipped: str | None, params: ReportParams, gold: bool) -> list[str]:
    if not gold:
        return ["**Ship: none** (no gold verifier to rank by)."]
    rule = (f"the highest gold pass rate among models whose general-text perplexity is at most "
            f"{100 * params.ship_max_ppl_increase:g}% above `{params.reference}`'s (ties: higher mean score, then "
            "lower perplexity)")
    return [f"**Ship: {shipped or 'none'}**. Rule: {rule}. Pass-rate differences inside the intervals above are not "
            "significant."]


def _data_lines(label_stats: str | None, prepare_stats: str | None) -> list[str]:
    lines = []
    if prepare_stats:
        st = json.loads(Path(prepare_stats).read_text())
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(st.get("dropped", {}).items())) or "none"
        lines += [f"Data: source `{st.get('source')}` (format {st.get('format')}, pairs {st.get('pairs')}); "
                  f"{st['n_train']} train / {st['n_eval']} eval prompts, {st['n_sft']} SFT demos, {st['n_prefs']} "
                  f"train / {st['n_heldout_prefs']} held-out pairs; rows dropped by prepare (see "
                  f"posttrain/formats.py): {drops}.", ""]
    if label_stats:
        st = json.loads(Path(label_stats).read_text())
        if st["judge"] == "dataset":
            lines += [f"Preference data: the data set's own {st['pairs']} train pairs (prepare.pairs: dataset; "
                      "nothing sampled or judged).", ""]
        else:
            drops = ", ".join(f"{k}: {v}" for k, v in sorted(st["dropped"].items())) or "none"
            lines += [f"Preference data: {st['prompts']} prompts sampled, {st['pairs']} pairs kept; dropped by rule "
                      f"(see stages/label.py): {drops}.", ""]
    return lines


def credit_lines(path: str | None) -> list[str]:
    """The `credit` stage's figures: blame localisation per guidance source, displacement per policy."""
    if not path:
        return []
    m = json.loads(Path(path).read_text())
    if not m["n"]:
        return [f"Token credit: none of the {m['pairs']} pairs is of a worked task (an answer of steps the verifier "
                "checks one by one), so there is no wrong step to blame; `profiles/long.yaml` has them.", ""]
    ci = lambda d: _fmt(d["mean"], d["ci"])  # noqa: E731
    lines = ["## Token credit on worked answers", "",
             f"{m['n']} pairs of worked tasks. Blame: the share of rejected answers whose lowest-r_hat token lies in "
             "their first wrong step, against chance (step tokens / answer tokens). Displacement: the mean change "
             "from the reference of the log-probs of the rejected answers' tokens before their first wrong step "
             "(sequence-level DPO pushes these correct steps down too; token guidance should push them less).", "",
             "| guidance | answers | blame | chance | lift |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {b['n']} | {ci(b['hit_rate'])} | {ci(b['chance'])} | {ci(b['lift'])} |"
              for s, b in m["blame"].items() if b["n"]]
    lines += ["", "| policy | answers | displacement | minus dpo's (paired) |", "|---|---|---|---|"]
    diff = m["displacement_minus_dpo"]
    lines += [f"| {n} | {d['n']} | {ci(d)} | {ci(diff[n]) if n in diff and diff[n]['n'] else '-'} |"
              for n, d in m["displacement"].items() if d["n"]]
    return lines + ["", "![token credit](credit/pairs.png)", ""]


def row_order(table: dict[str, dict], order: list[str] | None) -> list[str]:
    """`order` (default base, sft), then the trained models by name, then the merges by method and alpha."""
    first = [n for n in (order or ["base", "sft"]) if n in table]
    rest = [n for n in table if n not in first]
    merged = sorted((n for n in rest if "merge" in table[n]),
                    key=lambda n: (table[n]["merge"]["method"], table[n]["merge"]["alpha"], n))
    return first + sorted(n for n in rest if "merge" not in table[n]) + merged


def run(common, params: ReportParams, args) -> dict:
    evals, out = Path(args.evals), Path(args.out)
    table = build(evals, params.reference, 1000, common.seed)
    names = row_order(table, params.order)
    add_tax(table, params.tax_reference, evals)
    gold = "pass_rate" in table[params.reference]
    shipped = ship(table, params.reference, params.ship_max_ppl_increase) if gold else None
    add_judged(table, evals, params, args.prompts, common, 1000)
    lines = ["# posttrain report", "", _intro(table, names, params, gold), "", *table_lines(table, names, params),
             "", "![scores](scores.png)", "", *_ship_lines(shipped, params, gold), "", "![alignment tax](pareto.png)",
             ""]
    lines += _data_lines(args.label_stats, args.prepare_stats) + credit_lines(args.credit)
    out.mkdir(parents=True, exist_ok=True)
    wr = f"win_rate_vs_{params.reference}"
    if gold:
        panels = [("pass_rate", "gold pass rate"), (wr, f"win rate vs {params.reference}")]
    elif "heldout_pref_accuracy" in table[params.reference]:
        panels = [("heldout_pref_accuracy", "held-out pref accuracy"), ("heldout_chosen_ppl", "held-out chosen ppl")]
    else:  # a user's prompts with neither verifiers nor held-out pairs: only lengths and perplexity were measured
        panels = [("mean_length", "mean response length"), ("general_ppl", "general ppl")]
    plots.scores(table, names, panels, out / "scores.png", shipped)
    plots.pareto(table, names, params.tax_reference, shipped, out / "pareto.png", panels[0][0])
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
    p.add_argument("--prepare-stats", help="the prepare stage's stats.json: the data set's format and its drops")
    p.add_argument("--prompts", help="the evaluated prompts (eval.jsonl), for report.judges 'llm'")
    p.add_argument("--credit", help="the credit stage's metrics.json: token credit on worked answers")
    return cli.execute("report", ReportParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
