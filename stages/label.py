"""label: turn sampled responses into preference pairs with a judge (the gold verifier by default).

    dvc repro label
    python -m stages.label --samples data/generate/samples.jsonl --reward-model models/reward_model \
        --policy models/sft --out data/label

Per prompt, every sample is scored by the judge `label.judge`, a key of posttrain.judges.JUDGES: the gold
`verifier` (default); the `reward_model` stage's Bradley-Terry model; or an `llm` judge (`label.llm`: a local
causal LM comparing the samples pairwise, both orders asked, each sample scored by its mean probability of beating
the others). The best becomes `chosen` and the worst `rejected` when they differ by at least `label.margin` in
verifier score; with the reward model, when it prefers the best with probability sigma(r_best - r_worst) >=
`label.min_prob` and, with `label.reward_floor`, the best's reward is at least the reward model's calibrated floor
(stages/reward_model.py); with the LLM judge, when their scores differ by at least 2 min_prob - 1 (for two samples: the
judge prefers the best with probability >= min_prob). Dropped, and counted in
`stats.json`: prompts whose samples all tie (or differ by less than the gap), pairs whose chosen response is below
the floor, pairs whose two texts are equal,
empty responses, and repeated prompts. With the reward model as judge, `stats.json` also gives `gold_agreement`:
the share of kept pairs whose chosen response the gold verifier also scores higher (where verifiers exist), and
`gold_breakdown` (the function of that name): right over wrong, reversed, or two wrong answers.

With `prepare.pairs: dataset` nothing is judged: the data set's train pairs (`--pairs`, prepare's prefs.jsonl) are
copied to `prefs.jsonl` (judge `dataset` in stats.json; prepare counted their drops) and the samples are not read.

With `label.step_pairs`, the samples of worked tasks also give step-level pairs (Step-DPO, `posttrain.step_pairs`:
the correct steps before a wrong answer's first wrong step move into the prompt), judged by the gold step verifier
whatever `label.judge` is, written to `step_prefs.jsonl` (same schema, plus `source` and `step`) and counted by
source and drop reason under `step_pairs` in `stats.json`. No pair, no file: an empty DVC output only draws
warnings, and a stage that trains on the file fails on its absence as it would on no rows. With
`label.step_samples` n > 0, a step pair with no right sample of the policy's own to take its chosen continuation
from gets n samples of the policy (`--policy`, the model generate sampled) from that point, and the first right one
instead of the solver's steps (on-policy, as Step-DPO's own corrections).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from posttrain import cli, formats, io, judges, step_pairs, tasks


@dataclass
class LabelParams:
    judge: str = "verifier"
    """A key of posttrain.judges.JUDGES: 'verifier' (each prompt's gold spec), 'reward_model' (the reward_model
    stage), 'llm' (a local LM judge, `llm`)."""
    margin: float = 0.5
    """Verifier judge: minimum score gap between chosen and rejected; 0.5 keeps only clear wins."""
    min_prob: float = 0.9
    """Reward-model and LLM judges: keep a pair the judge prefers with at least this probability."""
    reward_floor: bool = True
    """Reward-model judge: also drop a pair whose chosen response's reward is below the reward model's calibrated
    floor (models/reward_model/calibration.json: the reward that best tells its held-out chosen responses from the
    rejected ones). A preference between two bad answers is mostly noise; this is the judge's own sign of one."""
    batch_size: int = 32
    """Sequences a batch: the judge's, and the policy's for `step_samples`."""
    llm: judges.LlmJudgeParams = field(default_factory=judges.LlmJudgeParams)
    """The LLM judge (read only with judge: llm)."""
    step_pairs: bool = False
    """Also write step-level pairs of worked tasks (`step_prefs.jsonl`); needs sampled answers (prepare.pairs:
    on_policy)."""
    step_pairs_per_prompt: int = 2
    """At most this many step pairs a prompt (besides one per distinct first mistake)."""
    step_samples: int = 0
    """Samples of the policy (`--policy`) from a step pair's prefix where no own sample gives its chosen
    continuation: the first right one is chosen (source `policy_sample`); 0: the solver's steps."""
    step_temperature: float = 0.8
    """Their sampling temperature (generate's default)."""
    step_max_new_tokens: int = 64
    """Their length cap: room for the rest of the longest worked answer."""

    def __post_init__(self) -> None:
        if self.judge not in judges.JUDGES:
            raise ValueError(f"judge {self.judge!r} is not one of {sorted(judges.JUDGES)}")
        if not 0 <= self.margin <= 1:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")
        if not 0.5 <= self.min_prob < 1:
            raise ValueError(f"min_prob must be in [0.5, 1), got {self.min_prob}")
        if self.step_pairs_per_prompt < 1:
            raise ValueError(f"step_pairs_per_prompt must be >= 1, got {self.step_pairs_per_prompt}")
        if self.step_samples < 0 or self.step_temperature < 0 or self.step_max_new_tokens < 1:
            raise ValueError("step_samples and step_temperature must be >= 0, step_max_new_tokens >= 1")

    def gap(self) -> float:
        """The score gap a pair needs, in the judge's units (its JUDGES row's `gap`)."""
        return judges.JUDGES[self.judge].gap(self.margin, self.min_prob)


def make_pairs(rows: list[dict], scores: list[list[float]], gap: float,
               floor: float | None = None) -> tuple[list[dict], Counter]:
    dropped: Counter = Counter()
    seen: set[str] = set()
    pairs = []
    for row, row_scores in zip(rows, scores, strict=True):
        key = io.prompt_key(row)
        if key in seen:
            dropped["duplicate_prompt"] += 1
            continue
        seen.add(key)
        candidates = [(x, s) for x, s in zip(row_scores, row["samples"], strict=True) if s.strip()]
        dropped["empty_response"] += len(row["samples"]) - len(candidates)
        if len(candidates) < 2:
            dropped["fewer_than_two_responses"] += 1
            continue
        scored = sorted(candidates, key=lambda t: -t[0])
        (best, chosen), (worst, rejected) = scored[0], scored[-1]
        if best <= worst or best - worst < gap:
            dropped["tie"] += 1
            continue
        if floor is not None and best < floor:
            dropped["chosen_below_floor"] += 1
            continue
        if chosen.strip() == rejected.strip():
            dropped["chosen_equals_rejected"] += 1
            continue
        pairs.append({"id": row["id"], "prompt": row["messages"], "chosen": chosen, "rejected": rejected,
                      "chosen_score": best, "rejected_score": worst, "verifier": row["verifier"]})
    return pairs, dropped


def gold_breakdown(gold: list[tuple[float, float]]) -> dict[str, int]:
    """Kept pairs by their gold scores (chosen, rejected), a pass being a score of 1.0: `right_over_wrong` (the pairs
    a verifier with a 0.5 margin would keep too), `wrong_over_right` (reversed), `both_right`, and pairs of two wrong
    answers, split by whether the verifier's partial credit orders them the same way (`both_wrong_agree`), ties them
    or reverses them."""
    out = Counter()
    for c, r in gold:
        if c == 1.0 or r == 1.0:
            out["both_right" if c == r else "right_over_wrong" if c == 1.0 else "wrong_over_right"] += 1
        else:
            out["both_wrong_" + ("agree" if c > r else "tie" if c == r else "reversed")] += 1
    return dict(sorted(out.items()))


def policy_sampler(common, params: LabelParams, policy: str):
    """`sample(prompts, n)` from the policy, as generate samples (its HF or vLLM backend for the device)."""
    from posttrain import modeling, sampling

    device = modeling.device_for(common.device)
    tok = modeling.stage_tokenizer(policy)
    model = modeling.load_chain(policy, device, common.trust_remote_code)
    backend = sampling.backend_for("auto", device)
    return lambda prompts, n: sampling.sample(model, tok, prompts, n=n, temperature=params.step_temperature,
                                              max_new_tokens=params.step_max_new_tokens,
                                              batch_size=params.batch_size, seed=common.seed, backend=backend)


def run(common, params: LabelParams, args) -> dict:
    if formats.pairs_mode(args.params) == "dataset":
        if not args.pairs:
            raise io.InputError("label: prepare.pairs is 'dataset' but no --pairs file (prepare's prefs.jsonl) given")
        if params.step_pairs:
            raise io.InputError("label: step_pairs needs sampled answers, and prepare.pairs is 'dataset' (nothing "
                                "is sampled): set label.step_pairs: false")
        pairs = io.read_jsonl(args.pairs, "prefs")
        stats = {"judge": "dataset", "prompts": len(pairs), "pairs": len(pairs), "dropped": {}}
        with io.atomic_dir(args.out) as tmp:
            io.write_jsonl(tmp / "prefs.jsonl", pairs)
            io.write_json(tmp / "stats.json", stats)
        return {"pairs": len(pairs), "passed_through": 1}
    if params.step_pairs and params.step_samples and not args.policy:  # before the judge's pass, not after
        raise io.InputError("label: label.step_samples > 0 needs --policy, the model generate sampled from "
                            "(models/sft in dvc.yaml)")
    rows = io.read_jsonl(args.samples, "samples")
    from posttrain import modeling

    judge = judges.make(params.judge, reward_model=args.reward_model, device=modeling.device_for(common.device),
                        max_len=common.max_len, batch_size=params.batch_size, llm=params.llm,
                        trust_remote_code=common.trust_remote_code)
    try:
        scores = judge.scores(rows, [r["samples"] for r in rows])
    except ValueError as e:  # the verifier judge names the row and field
        raise io.InputError(f"{args.samples}: {e}") from e
    row = judges.JUDGES[params.judge]
    floor = judge.floor if row.floor and params.reward_floor else None
    if row.floor and params.reward_floor and floor is None:
        raise io.InputError(f"{args.reward_model}: no calibration.json (the reward_model stage writes it when it has "
                            "held-out pairs): set label.reward_floor: false, or give it held-out pairs")
    pairs, dropped = make_pairs(rows, scores, params.gap(), floor)
    if not pairs:
        raise io.InputError(f"{args.samples}: no preference pair survived (dropped: {dict(dropped)}); sample more "
                            "responses per prompt, raise the temperature or lower label.margin / label.min_prob")
    stats = {"judge": params.judge, "prompts": len(rows), "pairs": len(pairs), "dropped": dict(dropped)}
    if floor is not None:
        stats["reward_floor"] = floor
    steps, step_metrics = [], {}
    if params.step_pairs:
        steps, by_source, step_dropped = step_pairs.make(rows, params.step_pairs_per_prompt)
        sampled = 0
        if params.step_samples and by_source["solver"]:
            steps, sampled = step_pairs.complete(steps, policy_sampler(common, params, args.policy),
                                                 params.step_samples)
            by_source = step_pairs.count(steps)
        stats["step_pairs"] = {"pairs": len(steps), "by_source": by_source, "dropped": dict(step_dropped)}
        if params.step_samples:
            stats["step_pairs"]["prefixes_sampled"] = sampled
        step_metrics = {"step_pairs": len(steps)} | {f"step_pairs_{k}": v for k, v in by_source.items()}
    verifiers = {r["id"]: r["verifier"] for r in rows}
    if not row.gold and all(verifiers[p["id"]] for p in pairs):  # how often the judge was right
        gold = [(tasks.score(verifiers[p["id"]], p["chosen"]), tasks.score(verifiers[p["id"]], p["rejected"]))
                for p in pairs]
        stats["gold_agreement"] = sum(c > r for c, r in gold) / len(pairs)
        stats["gold_breakdown"] = gold_breakdown(gold)
    with io.atomic_dir(args.out) as tmp:
        io.write_jsonl(tmp / "prefs.jsonl", pairs)
        if steps:
            io.write_jsonl(tmp / "step_prefs.jsonl", steps)
        io.write_json(tmp / "stats.json", stats)
    return {k: v for k, v in stats.items() if k not in ("judge", "dropped", "step_pairs")} | step_metrics | {
        f"dropped_{k}": v for k, v in dropped.items()}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--samples", required=True, help="sampled responses (JSONL, schema `samples`)")
    p.add_argument("--reward-model", default="models/reward_model", help="reward_model stage output (judge)")
    p.add_argument("--pairs", help="prepare's train pairs (prefs.jsonl), copied when prepare.pairs is 'dataset'")
    p.add_argument("--policy", help="the model generate sampled from: label.step_samples samples it from step "
                                    "prefixes")
    p.add_argument("--out", required=True, help="output folder: prefs.jsonl, stats.json, step_prefs.jsonl")
    return cli.execute("label", LabelParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
