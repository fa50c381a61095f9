"""Step-level preference pairs (Step-DPO, huggingface.co/papers/2406.18629) from the step verifier of worked tasks.

A sampled worked answer whose first wrong step k the verifier locates (`tasks.steps`) splits into the correct steps
before k (the prefix) and the rest, from step k on (the rejected response). The pair's prompt is the task prompt
plus the prefix, as the start of the assistant turn: a last `assistant` message that the completions continue
(`preference.encode` renders it with the chat template's `continue_final_message`, so the model sees its own turn
open, exactly as when it sampled those steps, and only the tokens from step k on are trained). An answer wrong at
step 0 has no prefix: its prompt is the task prompt alone. (Written into both responses instead, the prefix would
cancel in DPO, its tokens being the same in both, but not in SimPO's length normalisation, TGDPO's paper form,
ORPO, KTO or an NLL term, and every cache would cover it.) The chosen response is a correct continuation from the
same point:

- `own_sample`: the first of the policy's own correct samples for the prompt whose text starts with that exact
  prefix (the paper finds self-generated corrections beat GPT-4-written ones: in distribution);
- `policy_sample`: else (`complete`, with `label.step_samples` > 0) the first right one of n samples the policy
  draws from the pair's prompt, its own turn left open after the prefix: the paper's own source, on-policy. The
  sampler strips a continuation, so it is read from the next line on (prefix + continuation is the answer the
  verifier checks, and the text trained);
- `solver`: else the task's solver (`tasks.solve`) from step k on. Every step of the prefix is right, so the
  answer's written results so far are the gold ones and the solver's later lines continue it.

Caps, so that the prompts a policy gets most wrong do not swamp the rest: one pair per distinct first mistake
(prefix + the text of the first wrong step; the first such sample is kept, and identical pairs are a special
case), then at most `per_prompt` pairs per prompt, `own_sample` ones first, then by sample order.
"""

from __future__ import annotations

import json
from collections import Counter

from posttrain import tasks

SOURCES = ("own_sample", "policy_sample", "solver")
"""Where a step pair's chosen continuation comes from, in order of preference."""


def of_row(row: dict) -> tuple[list[dict], Counter]:
    """All step pairs of one samples row (`id`, `messages`, `verifier`, `samples`), uncapped and not deduplicated
    across rows: one per wrong sample whose first wrong step is present, in sample order. Each pair has `id`
    (`<row id>.step<k>.<sample index>`), `prompt`, `chosen`, `rejected`, `chosen_score` and `rejected_score` (gold
    scores of the whole answers, prefix included), `source` (a key of `SOURCES`), `step` (k) and `mistake` (the
    first wrong step's text). Returns the pairs and the samples left out, by reason."""
    spec, dropped = row["verifier"], Counter()
    if spec is None or spec.get("type") not in tasks.PLANS:
        dropped["not_a_worked_task"] += 1
        return [], dropped
    texts = [s for s in row["samples"] if s.strip()]
    dropped["empty_response"] += len(row["samples"]) - len(texts)
    judged = [tasks.steps(spec, s) for s in texts]
    right = [s for s, j in zip(texts, judged, strict=True) if j.first_wrong_span is None]
    pairs = []
    for i, (text, j) in enumerate(zip(texts, judged, strict=True)):
        if j.first_wrong_span is None:
            continue
        start, end = j.first_wrong_span
        if start == len(text):  # the answer stops before its first wrong step: no text from that step on to reject
            dropped["wrong_step_missing"] += 1
            continue
        k = j.step_scores.index(False)
        prefix = text[:start]
        own = next((s for s in right if s.startswith(prefix)), None)
        chosen = own[len(prefix):] if own is not None else "\n".join(tasks.solve(spec).split("\n")[k:])
        prompt = row["messages"] + ([{"role": "assistant", "content": prefix}] if prefix else [])
        pairs.append({"id": f"{row['id']}.step{k}.{i}", "prompt": prompt, "chosen": chosen, "rejected": text[start:],
                      "chosen_score": tasks.score(spec, prefix + chosen), "rejected_score": tasks.score(spec, text),
                      "source": "own_sample" if own is not None else "solver", "step": k,
                      "mistake": text[start:end], "verifier": spec})
    return pairs, +dropped


def make(rows: list[dict], per_prompt: int) -> tuple[list[dict], dict[str, int], Counter]:
    """Step pairs of every samples row, capped (see the module docstring). Returns the pairs, their count by
    source, and what was left out by reason: samples (`empty_response`, `wrong_step_missing`), prompts
    (`not_a_worked_task`) and pairs (`same_first_mistake`, `over_cap`)."""
    out, dropped, seen = [], Counter(), set()  # `+dropped` below: reasons that never happened are left out
    for row in rows:
        pairs, why = of_row(row)
        dropped.update(why)
        kept = []
        for p in pairs:
            key = json.dumps([p["prompt"], p["mistake"]], sort_keys=True)
            if key in seen:
                dropped["same_first_mistake"] += 1
                continue
            seen.add(key)
            kept.append(p)
        kept.sort(key=lambda p: SOURCES.index(p["source"]))  # stable: sample order within a source
        dropped["over_cap"] += max(0, len(kept) - per_prompt)
        out += kept[:per_prompt]
    return out, count(out), +dropped


def count(pairs: list[dict]) -> dict[str, int]:
    """Step pairs by source, every source named."""
    return {s: sum(p["source"] == s for p in pairs) for s in SOURCES}


def complete(pairs: list[dict], sample, n: int) -> tuple[list[dict], int]:
    """`pairs` with each `solver` pair's chosen replaced by the first right one of `n` policy samples from its prompt
    (`sample(prompts, n)` -> n strings a prompt, as `sampling.sample`), source `policy_sample`; the others as they
    were. Right: prefix + sample scores 1.0 (every step and the answer). Returns the pairs and how many prompts were
    sampled."""
    todo = [i for i, p in enumerate(pairs) if p["source"] == "solver"]
    if not todo or n < 1:
        return pairs, 0
    drawn = sample([pairs[i]["prompt"] for i in todo], n)
    out = list(pairs)
    for i, samples in zip(todo, drawn, strict=True):
        p = pairs[i]
        prefix = p["prompt"][-1]["content"] if p["prompt"][-1]["role"] == "assistant" else ""
        right = next((s for s in samples if s.strip() and tasks.score(p["verifier"], prefix + s) == 1.0), None)
        if right is not None:
            out[i] = p | {"chosen": right, "chosen_score": 1.0, "source": "policy_sample"}
    return out, len(todo)
