"""Preference training on TRL's DPOTrainer with per-token reference log-probs and token guidance read from a cache.

One tokenisation (`encode`) serves both the cache (`completion_logps`, run once per data set by the `reference`
and `guidance` stages) and training, so cached per-token values line up with the trained tokens by construction.
`stages.dpo.PreferenceTrainer` subclasses TRL's DPOTrainer and replaces only its loss with `pair_logps` here and a
loss of `posttrain.losses.LOSSES`. TRL is not imported here: the stages that only read log-probs (reference,
guidance, evaluate, credit) start ~5 s sooner without it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain import io, modeling, progress

TOKEN_COLUMNS = ("ref_chosen_tok", "ref_rejected_tok", "rhat_chosen_tok", "rhat_rejected_tok")


def encode(tok, pair: dict, max_len: int) -> dict[str, list[int]]:
    """Token ids of prompt, chosen and rejected through the chat template (as TRL does for conversational data),
    with each completion cut so that prompt + completion fits `max_len` (the collator's keep_start truncation).
    A prompt ending in an assistant message is a partial answer (`posttrain.step_pairs`): that turn stays open
    and both completions continue it, rendered as the whole answer in one turn would be."""
    prompt, start = pair["prompt"], ""
    if prompt[-1]["role"] == "assistant":
        p = tok.apply_chat_template(prompt, continue_final_message=True, tokenize=True, return_dict=True)["input_ids"]
        prompt, start = prompt[:-1], prompt[-1]["content"]
    else:
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    out = {}
    full = {}
    for side in ("chosen", "rejected"):
        full[side] = tok.apply_chat_template(prompt + [{"role": "assistant", "content": start + pair[side]}],
                                             tokenize=True, return_dict=True)["input_ids"]
    n = min(modeling.common_prefix(p, full["chosen"]), modeling.common_prefix(p, full["rejected"]))
    out["prompt_ids"] = p[:n]
    for side in ("chosen", "rejected"):
        out[f"{side}_ids"] = full[side][n:][: max(0, max_len - n)]
    return out


def is_heldout(pair_id: str, fraction: float) -> bool:
    """A fixed share of pairs, picked by a hash of the id (stable across runs, stages and row order)."""
    return int(hashlib.sha256(pair_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def encoded_rows(tok, pairs: list[dict], max_len: int, source: str) -> tuple[list[dict], Counter]:
    """Encode every pair. Dropped and counted: a pair whose chosen and rejected texts are equal (no preference to
    learn), and one whose prompt leaves no room for a completion within `max_len`."""
    rows, dropped = [], Counter()
    for pair in pairs:
        if pair["chosen"].strip() == pair["rejected"].strip():
            dropped["chosen_equals_rejected"] += 1
            continue
        enc = encode(tok, pair, max_len)
        if not enc["chosen_ids"] or not enc["rejected_ids"]:
            dropped["too_long"] += 1
            continue
        rows.append({"id": pair["id"], **enc})
    if not rows:
        raise io.InputError(f"{source}: no usable pair (dropped: {dict(dropped)}; common.max_len={max_len})")
    return rows, dropped


@dataclass
class PairCollator:
    """Batches encoded pairs for `pair_logps`: each prompt once, (B, P) laid out by `modeling.shared_prefix_batch`
    (the tokens every prompt shares, `prefix_len` of them, then left padding, then each prompt's own); the chosen
    and rejected completions right-padded to (2B, C) as [chosen; rejected]; cached per-token columns (`ref_*_tok`,
    `rhat_*_tok`) laid out like the completions, as `ref_tok` / `rhat_tok` (2B, C); and `shared_mask` (B, C),
    1 on the completion tokens a pair's chosen and rejected share from the first (same ids at the same places:
    after the shared prompt, the same context, so the same log-probs and guidance on both sides)."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        b = len(examples)
        prompts = [e["prompt_ids"] for e in examples]
        comps = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        c = max(map(len, comps))
        k, prompt_ids, prompt_mask = modeling.shared_prefix_batch(prompts, self.pad_token_id)
        out = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "prefix_len": k,
               "completion_ids": torch.full((2 * b, c), self.pad_token_id),
               "completion_mask": torch.zeros(2 * b, c, dtype=torch.long)}
        for i, ids in enumerate(comps):
            out["completion_ids"][i, : len(ids)] = torch.tensor(ids)
            out["completion_mask"][i, : len(ids)] = 1
        out["shared_mask"] = torch.zeros(b, c, dtype=torch.long)
        for i, e in enumerate(examples):
            out["shared_mask"][i, : modeling.common_prefix(e["chosen_ids"], e["rejected_ids"])] = 1
        for name in ("ref", "rhat"):
            if f"{name}_chosen_tok" not in examples[0]:
                continue
            rows = [e[f"{name}_chosen_tok"] for e in examples] + [e[f"{name}_rejected_tok"] for e in examples]
            full = torch.zeros(2 * b, c, dtype=torch.float32)
            for i, (values, ids) in enumerate(zip(rows, comps, strict=True)):
                if len(values) != len(ids):
                    raise ValueError(f"cached {name} values cover {len(values)} tokens, the completion has "
                                     f"{len(ids)}: the cache was built with another tokenizer or max_len")
                full[i, : len(ids)] = torch.tensor(values, dtype=torch.float32)
            out[f"{name}_tok"] = full
        return out


def pair_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log-probs (2B, C) of the [chosen; rejected] completions of a `PairCollator` batch, 0 on padding:
    `modeling.completions_forward`, each prompt run once for its two completions (and the tokens every prompt of the
    batch shares, `prefix_len`, once for the batch)."""
    return modeling.completions_forward(model, *pair_inputs(model, batch))[0]


def pair_inputs(model, batch: dict[str, torch.Tensor]) -> tuple:
    """A `PairCollator` batch as `modeling.completions_forward`'s arguments (on the model's device): completion i
    of the [chosen; rejected] 2B continues prompt i mod B."""
    device = next(model.parameters()).device
    b = batch["prompt_ids"].size(0)
    return (batch["prompt_ids"].to(device), batch["prompt_mask"].to(device), int(batch.get("prefix_len", 0)),
            batch["completion_ids"].to(device), batch["completion_mask"].to(device),
            torch.cat([torch.arange(b), torch.arange(b)]).to(device))


@torch.no_grad()
def completion_logps(model, tok, rows: list[dict], batch_size: int) -> list[dict]:
    """Per-token log-probs of each encoded row's chosen and rejected completion tokens under `model`
    (`encode` already cut every completion to fit max_len)."""
    model.eval()
    collate = PairCollator(pad_token_id=tok.pad_token_id)
    out = []
    with progress.Progress("log-probs", len(rows), "pair") as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = collate([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in chunk])
            logps = pair_logps(model, batch).cpu()
            n = len(chunk)
            for i, r in enumerate(chunk):
                out.append({"id": r["id"], "chosen": logps[i, : len(r["chosen_ids"])].tolist(),
                            "rejected": logps[n + i, : len(r["rejected_ids"])].tolist()})
            bar.update(n, int(batch["prompt_mask"].sum() + batch["completion_mask"].sum()))
    return out


def write_token_values(path: str | Path, rows: list[dict]) -> None:
    io.write_jsonl(path, rows)


def read_token_values(path: str | Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r for r in rows}
