"""evaluate: greedy answers of one model on the held-out prompts, scored by the gold verifiers where they exist.

    dvc repro evaluate                 # every model in evaluate.models
    python -m stages.evaluate --name sft --model models/sft --prompts data/prepare/eval.jsonl \
        --heldout data/prepare/heldout_prefs.jsonl --general posttrain/data/general.txt --out reports/evaluate/sft

One DVC stage per model (`foreach` over `evaluate.models`), so a new DPO variant is evaluated without re-running
the others. Writes `answers.jsonl` (id, task, response, score, passed, length) and `metrics.json`: gold pass rate
(score 1.0) and mean gold score over the prompts that have a verifier (`n_gold` of them), and the response length
over all, each with a 95% bootstrap interval. A prompt with no verifier (a user's data set) gets its response and
length recorded with `score` and `passed` null: no gold metric is made up for it. Win rates against a reference
model are computed from these answers by `report`.

Held-out preference pairs (`--heldout`, prepare's heldout_prefs.jsonl; empty unless `prepare.pairs: dataset`):
`heldout_chosen_ppl` and `heldout_rejected_ppl`, the model's perplexity of the chosen / rejected responses given
their prompts, and `heldout_pref_accuracy`, the share of pairs whose chosen response has the higher mean per-token
log-prob. They measure a model with no verifier; pairs too long for `common.max_len` are dropped and counted.
metrics.json's `heldout_logps` keeps each pair's summed log-probs (`id`, `chosen`, `rejected`), from which `report`
computes the implicit-reward accuracy against the reference model (log pi - log pi_ref orders chosen over rejected:
TRL's rewards/accuracies).

With `evaluate.reward_model: true`, each answer also gets `reward`, the `reward_model` stage's score of it (one
reward-model forward per answer), and metrics.json its mean with a 95% interval; `report` turns the rewards into a
win rate against the reference model.

The alignment tax: `general_ppl`, the model's perplexity on a small general-English text shipped with the repo
(`posttrain/data/general.txt`, ~4 KB of self-written prose on nothing the tasks ask), in non-overlapping windows of
`general_window` tokens. A post-trained model that forgot English shows it here. `metrics.json` also records the
evaluated folder (`model`) and, for a merged model, its `merge.json` (method, alpha, endpoints) for `report`.
`summary.json` holds the few scalars `dvc metrics show` lists, one row per model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain import cli, io, modeling, preference, sampling, stats, tasks

GENERAL_TEXT = Path(__file__).resolve().parents[1] / "posttrain" / "data" / "general.txt"


@dataclass
class EvaluateParams:
    models: dict[str, str] | None = None
    """Name -> model folder; dvc.yaml makes one stage per entry (the stage itself reads only its own)."""
    max_new_tokens: int = 24
    batch_size: int = 64
    n_bootstrap: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    general_window: int = 256
    """Tokens per window of the general-text perplexity (each window starts without context)."""
    reward_model: bool = False
    """Score every answer with the reward_model stage's model (`--reward-model`): for data with no verifier."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.n_bootstrap < 100:
            raise ValueError("max_new_tokens and batch_size must be >= 1, n_bootstrap >= 100")
        if self.general_window < 2:
            raise ValueError(f"general_window must be >= 2, got {self.general_window}")


@torch.no_grad()
def perplexity(model, tok, text: str, window: int) -> tuple[float, int]:
    """exp(mean next-token NLL) over `text` cut into non-overlapping windows; and the number of tokens scored."""
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    device = next(model.parameters()).device
    model.eval()
    nll, n = 0.0, 0
    for chunk in ids.split(window):
        if len(chunk) < 2:
            continue
        logits = model(chunk[None].to(device)).logits[0, :-1].float()  # (T-1, V)
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:].to(device), reduction="sum"))
        n += len(chunk) - 1
    return math.exp(nll / n), n


def heldout_pairs(model, tok, pairs: list[dict], max_len: int, batch_size: int, source: str, n_boot: int,
                  seed: int) -> tuple[dict, list[dict]]:
    """Perplexity of the chosen and the rejected responses of held-out pairs (each with its 95% interval over
    pairs), and how often the chosen one has the
    higher mean per-token log-prob (with its 95% interval); and per pair the summed log-probs of both sides."""
    rows, dropped = preference.encoded_rows(tok, pairs, max_len, source)
    logps = preference.completion_logps(model, tok, rows, batch_size)
    out: dict = {"heldout_pairs": len(rows)} | {f"heldout_dropped_{k}": v for k, v in dropped.items()}
    for side in ("chosen", "rejected"):
        n = sum(len(r[side]) for r in logps)
        out[f"heldout_{side}_ppl"] = math.exp(-sum(sum(r[side]) for r in logps) / n)
        out[f"heldout_{side}_ppl_ci"] = stats.ratio_ppl_ci([-sum(r[side]) for r in logps],
                                                           [len(r[side]) for r in logps], n_boot, seed)
    wins = [float(sum(r["chosen"]) / len(r["chosen"]) > sum(r["rejected"]) / len(r["rejected"])) for r in logps]
    out |= {"heldout_pref_accuracy": sum(wins) / len(wins),
            "heldout_pref_accuracy_ci": stats.bootstrap_ci(wins, n_boot, seed)}
    return out, [{"id": r["id"], "chosen": sum(r["chosen"]), "rejected": sum(r["rejected"])} for r in logps]


def run(common, params: EvaluateParams, args) -> dict:
    prompts = io.read_jsonl(args.prompts, "prompts")
    heldout = args.heldout and Path(args.heldout).is_file() and Path(args.heldout).read_text(encoding="utf-8").strip()
    pairs = io.read_jsonl(args.heldout, "prefs") if heldout else []
    text = Path(args.general).read_text(encoding="utf-8") if Path(args.general).is_file() else ""
    if not text.strip():
        raise io.InputError(f"{args.general}: missing or empty: no general text to score the alignment tax on")
    device = modeling.device_for(common.device)
    tok = modeling.stage_tokenizer(args.model)
    model = modeling.load_chain(args.model, device, common.trust_remote_code)
    responses = sampling.sample_hf(model, tok, [p["messages"] for p in prompts], n=1, temperature=0.0,
                                   max_new_tokens=params.max_new_tokens, batch_size=params.batch_size,
                                   seed=common.seed)
    answers = []
    for p, (r,) in zip(prompts, responses, strict=True):
        s = None if p["verifier"] is None else tasks.score(p["verifier"], r)
        answers.append({"id": p["id"], "task": p["task"], "response": r, "score": s,
                        "passed": None if s is None else s == 1.0,
                        "length": len(tok(r, add_special_tokens=False).input_ids)})
    ppl, n_tokens = perplexity(model, tok, text, params.general_window)
    gold = [a for a in answers if a["score"] is not None]
    lengths = [a["length"] for a in answers]
    metrics = (stats.summarise(gold, params.n_bootstrap, common.seed) if gold else {}) | {
        "n": len(answers), "n_gold": len(gold), "mean_length": sum(lengths) / len(lengths),
        "mean_length_ci": stats.bootstrap_ci(lengths, params.n_bootstrap, common.seed),
        "general_ppl": ppl, "general_tokens": n_tokens, "model": str(args.model)}
    per_pair = []
    if pairs:
        held, per_pair = heldout_pairs(model, tok, pairs, common.max_len, params.batch_size, args.heldout,
                                       params.n_bootstrap, common.seed)
        metrics |= held
    if params.reward_model:
        from posttrain import judges

        del model  # the reward model takes its place in memory
        rm = judges.make("reward_model", reward_model=args.reward_model, device=device, max_len=common.max_len,
                         batch_size=params.batch_size, trust_remote_code=common.trust_remote_code)
        rewards = rm.scores(prompts, [[a["response"]] for a in answers])
        for a, (r,) in zip(answers, rewards, strict=True):
            a["reward"] = r
        values = [a["reward"] for a in answers]
        metrics |= {"mean_reward": sum(values) / len(values),
                    "mean_reward_ci": stats.bootstrap_ci(values, params.n_bootstrap, common.seed)}
    merge_info = Path(args.model) / "merge.json"
    if merge_info.exists():
        metrics["merge"] = json.loads(merge_info.read_text())
    # `dvc metrics show` lists summary.json, a row per model: a few flat scalars (metrics.json keeps the rest)
    keys = ("pass_rate", "mean_score", "heldout_pref_accuracy", "mean_reward", "mean_length", "general_ppl")
    summary = {k: metrics[k] for k in keys if k in metrics}
    if "pass_rate_ci" in metrics:
        summary |= {"pass_rate_lo": metrics["pass_rate_ci"][0], "pass_rate_hi": metrics["pass_rate_ci"][1]}
    with io.atomic_dir(args.out) as tmp:
        io.write_jsonl(tmp / "answers.jsonl", answers)
        io.write_json(tmp / "metrics.json", metrics | ({"heldout_logps": per_pair} if per_pair else {}))
        io.write_json(tmp / "summary.json", summary)
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--name", required=True, help="the model's name in evaluate.models")
    p.add_argument("--model", required=True, help="checkpoint or adapter chain")
    p.add_argument("--prompts", required=True, help="held-out prompts (JSONL, schema `prompts`)")
    p.add_argument("--heldout", help="held-out preference pairs (JSONL, schema `prefs`; empty or absent: none)")
    p.add_argument("--reward-model", default="models/reward_model",
                   help="the reward_model stage's output, read with evaluate.reward_model: true")
    p.add_argument("--general", default=str(GENERAL_TEXT), help="plain text for the general-English perplexity "
                   "(default: the one shipped in posttrain/data)")
    p.add_argument("--out", required=True, help="output folder: answers.jsonl, heldout.jsonl, metrics.json, "
                   "summary.json")
    args = p.parse_args(argv)
    return cli.execute("evaluate", EvaluateParams, args, run, run_name=f"evaluate@{args.name}")


if __name__ == "__main__":
    main()
