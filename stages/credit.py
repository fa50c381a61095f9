"""credit: where token guidance puts the blame on worked answers, and how far each trained policy moved their correct
steps (seed 000/001's mechanism, measured on the pipeline's own pairs; `posttrain/credit.py` defines both figures).

    dvc repro credit
    python -m stages.credit --model models/sft --prefs data/label/prefs.jsonl --reference data/reference \
        --guidance data/guidance --policies models/dpo --out reports/credit

Reads the pairs of worked tasks (`tasks.PLANS`: a rejected answer whose first wrong step the verifier locates; label
writes each pair with its prompt's verifier):
- blame localisation, for each guidance source (`data/guidance/<source>/rhat.jsonl`, those there are; dvc.yaml
  does not list the folder, which a DPO-only recipe lacks: the guidance TGDPO trained with reaches this stage
  through `models/dpo`): the share of rejected answers
  whose lowest-r_hat token lies in the first wrong step, against chance (step tokens / response tokens), and the
  mean r_hat before that step and in it (below zero before it, TGDPO pushes the correct steps down harder than DPO);
- shared-prefix displacement, for each trained policy (every row's `models/dpo/<row>`, whatever its loss or pairs:
  rpo, tgdpo_cancel*, step_dpo too): the mean change from the reference of the log-probs of the rejected answers'
  tokens before their first wrong step, and each minus `dpo`'s, paired by answer. Measured on the response-level
  pairs for every row, so a `pairs: step` row (whose prompts hold those correct steps) is compared on the same
  answers: what its training did to the correct steps of whole answers.
Writes `metrics.json` and `pairs.png` (a few rejected answers, each token coloured by each source's r_hat, the
first wrong step boxed). With no worked-task pairs (the default task's answers are a number) it writes `n: 0`
and a picture that says so, without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posttrain import cli, credit, io, modeling, preference


@dataclass
class CreditParams:
    examples: int = 3
    """Rejected answers drawn in pairs.png: the first by id whose first wrong step is not their first line."""
    n_bootstrap: int = 1000
    """Resamples for the 95% intervals (over answers)."""
    batch_size: int = 16
    """Pairs per forward pass when reading a policy's log-probs."""

    def __post_init__(self) -> None:
        if self.examples < 0 or self.n_bootstrap < 1 or self.batch_size < 1:
            raise ValueError(f"examples must be >= 0, n_bootstrap and batch_size >= 1; got {self}")


def folders(root: str, name: str) -> dict[str, Path]:
    """Sub-folder name -> path, for the sub-folders of `root` holding `name` (or any, when name is ''); none when
    `root` does not exist (no guidance.sources: a DPO-only recipe has no guidance folder)."""
    if not Path(root).is_dir():
        return {}
    return {d.name: d for d in sorted(Path(root).iterdir()) if d.is_dir() and (not name or (d / name).exists())}


def policies(root: str) -> dict[str, Path]:
    """The trained policies under `root`: its sub-folders holding a model as `modeling.model_chain` reads one
    (chain.json or config.json). A killed dpo run's resume checkpoints (`<row>.ckpt`) and temp folder
    (`.<row>.tmp-<pid>`) are none."""
    return {n: d for n, d in folders(root, "").items()
            if not n.startswith(".") and ((d / "chain.json").exists() or (d / "config.json").exists())}


def shifts(located: list[dict], ref: dict, policies: dict[str, Path], tok, pairs: list[dict], common,
           params: CreditParams, source: str) -> dict[str, dict]:
    """Shared-prefix displacement under each policy (one forward pass over the located pairs each)."""
    ids = {r["id"] for r in located}
    rows, _ = preference.encoded_rows(tok, [p for p in pairs if p["id"] in ids], common.max_len, source)
    device = modeling.device_for(common.device)
    out = {}
    for name, path in policies.items():
        model = modeling.load_chain(path, device, common.trust_remote_code)
        logps = {h["id"]: h for h in preference.completion_logps(model, tok, rows, params.batch_size)}
        del model
        out[name] = credit.displacement(credit.attach(credit.attach(located, logps, "logp"), ref, "ref"),
                                        params.n_bootstrap, common.seed)
    return out


def run(common, params: CreditParams, args) -> dict:
    pairs = io.read_jsonl(args.prefs, "prefs")
    specs = {p["id"]: p.get("verifier") or {} for p in pairs}  # a user's pairs have none: no worked task
    tok = modeling.stage_tokenizer(args.model, padding_side="right")
    located, skipped = credit.locate(tok, pairs, specs, common.max_len)
    ref = preference.read_token_values(Path(args.reference) / "logps.jsonl")
    cached = [r for r in located if r["id"] in ref]  # the reference stage drops pairs that do not fit max_len
    if len(cached) < len(located):
        skipped["not_in_reference_cache"] += len(located) - len(cached)
    located = cached
    sources = folders(args.guidance, "rhat.jsonl")
    rhat = {s: preference.read_token_values(d / "rhat.jsonl") for s, d in sources.items()} if located else {}
    blame = {s: credit.blame(credit.attach(located, v, "rhat"), params.n_bootstrap, common.seed)
             for s, v in rhat.items()}
    shift = shifts(located, ref, policies(args.policies), tok, pairs, common, params, args.prefs) if located else {}
    minus_dpo = {n: credit.paired_difference(s["values"], shift["dpo"]["values"], params.n_bootstrap, common.seed)
                 for n, s in shift.items() if n != "dpo" and "dpo" in shift}
    panels = [credit.panel(f"{ex['id']} rejected, r_hat of {s}", ex["text"], ex["spans"], v[ex["id"]]["rejected"],
                           ex["wrong"])
              for ex in credit.pick_examples(located, params.examples) for s, v in rhat.items()]
    metrics = {"pairs": len(pairs), "n": len(located), "skipped": dict(skipped), "blame": blame,
               "displacement": {n: {k: v for k, v in s.items() if k != "values"} for n, s in shift.items()},
               "displacement_minus_dpo": minus_dpo}
    with io.atomic_dir(args.out) as tmp:
        credit.plot_pairs(panels, tmp / "pairs.png", "token guidance on rejected worked answers (boxed: the first "
                          "wrong step)" if panels else "no pairs of worked tasks: nothing to draw")
        io.write_json(tmp / "metrics.json", metrics)
    flat = {"n": float(len(located))}
    flat |= {f"blame_lift_{s}": b["lift"]["mean"] for s, b in blame.items() if b["n"]}
    flat |= {f"displacement_{n}": s["mean"] for n, s in shift.items() if s["n"]}
    return flat


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="the SFT model: its tokenizer lays out the cached tokens")
    p.add_argument("--prefs", required=True, help="preference pairs (JSONL, schema `prefs`)")
    p.add_argument("--reference", required=True, help="the reference stage's folder (logps.jsonl)")
    p.add_argument("--guidance", required=True, help="folder of guidance sources, each with rhat.jsonl")
    p.add_argument("--policies", required=True, help="folder of trained policies (dpo's variants)")
    p.add_argument("--out", required=True, help="output folder: metrics.json, pairs.png")
    return cli.execute("credit", CreditParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
