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


def heldout_pairs(model, tok, pairs: list[dict], max_len: int, batch_size: int, source: str) -> dict:
    """Perplexity of the chosen and the rejected responses of held-out pairs, and how often the chosen one has the
    higher mean per-token log-prob."""
    rows, dropped = preference.encoded_rows(tok, pairs, max_len, source)
    logps = preference.completion_logps(model, tok, rows, batch_size)
    out: dict = {"heldout_pairs": len(rows)} | {f"heldout_dropped_{k}": v for k, v in dropped.items()}
    for side in ("chosen", "rejected"):
        n = sum(len(r[side]) for r in logps)
        out[f"heldout_{side}_ppl"] = math.exp(-sum(sum(r[side]) for r in logps) / n)
    wins = [sum(r["chosen"]) / len(r["chosen"]) > sum(r["rejected"]) / len(r["rejected"]) for r in logps]
    return out | {"heldout_pref_accuracy": sum(wins) / len(wins)}


def run(common, params: EvaluateParams, args) -> dict:
    prompts = io.read_jsonl(args.prompts, "prompts")
    heldout = args.heldout and Path(args.heldout).is_file() and Path(args.heldout).read_text(encoding="utf-8").strip()
    pairs = io.read_jsonl(args.heldout, "prefs") if heldout else []
    text = Path(args.general).read_text(encoding="utf-8") if Path(args.general).is_file() else ""
    if not text.strip():
        raise io.InputError(f"{args.general}: missing or empty: no general text to score the alignment tax on")
    device = modeling.device_for(common.device)
    base, _ = modeling.model_chain(args.model)
    tok = modeling.load_tokenizer(base)
    modeling.check_template(tok)
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
    if pairs:
        metrics |= heldout_pairs(model, tok, pairs, common.max_len, params.batch_size, args.heldout)
    merge_info = Path(args.model) / "merge.json"
    if merge_info.exists():
        metrics["merge"] = json.loads(merge_info.read_text())
    # `dvc metrics show` lists summary.json, a row per model: a few flat scalars (metrics.json keeps the rest)
    lo, hi = metrics["pass_rate_ci"]
    summary = {k: metrics[k] for k in ("pass_rate", "mean_score", "mean_length", "general_ppl")} | {
        "pass_rate_lo": lo, "pass_rate_hi": hi}
    with io.atomic_dir(args.out) as tmp:
        io.write_jsonl(tmp / "answers.jsonl", answers)
        io.write_json(tmp / "metrics.json", metrics)
        io.write_json(tmp / "summary.json", summary)
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--name", required=True, help="the model's name in evaluate.models")
    p.add_argument("--model", required=True, help="checkpoint or adapter chain")
    p.add_argument("--prompts", required=True, help="held-out prompts (JSONL, schema `prompts`)")
    p.add_argument("--heldout", help="held-out preference pairs (JSONL, schema `prefs`; empty or absent: none)")
    p.add_argument("--general", default=str(GENERAL_TEXT), help="plain text for the general-English perplexity "
                   "(default: the one shipped in posttrain/data)")
    p.add_argument("--out", required=True, help="output folder: answers.jsonl, metrics.json")
    args = p.parse_args(argv)
    return cli.execute("evaluate", EvaluateParams, args, run, run_name=f"evaluate@{args.name}")


if __name__ == "__main__":
    main()
