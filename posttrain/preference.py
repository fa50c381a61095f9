"""Preference training on TRL's DPOTrainer with per-token reference log-probs and token guidance read from a cache.

One tokenisation (`encode`) serves both the cache (`completion_logps`, run once per data set by the `reference`
and `guidance` stages) and training, so cached per-token values line up with the trained tokens by construction.
`PreferenceTrainer` subclasses TRL's DPOTrainer and replaces only its loss: a step costs one policy forward and
backward, like DPO with precomputed reference log-probs, whatever the loss in `posttrain.losses.LOSSES`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from trl import DPOTrainer

from posttrain import io, losses, progress

TOKEN_COLUMNS = ("ref_chosen_tok", "ref_rejected_tok", "rhat_chosen_tok", "rhat_rejected_tok")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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
    n = min(_common_prefix(p, full["chosen"]), _common_prefix(p, full["rejected"]))
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
    """Batches encoded pairs for `pair_logps`: each prompt once, left-padded to (B, P); the chosen and rejected
    completions right-padded to (2B, C) as [chosen; rejected]; cached per-token columns (`ref_*_tok`,
    `rhat_*_tok`) laid out like the completions, as `ref_tok` / `rhat_tok` (2B, C); and `shared_mask` (B, C),
    1 on the completion tokens a pair's chosen and rejected share from the first (same ids at the same places:
    after the shared prompt, the same context, so the same log-probs and guidance on both sides)."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        b = len(examples)
        prompts = [e["prompt_ids"] for e in examples]
        comps = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        p, c = max(map(len, prompts)), max(map(len, comps))
        out = {"prompt_ids": torch.full((b, p), self.pad_token_id), "prompt_mask": torch.zeros(b, p, dtype=torch.long),
               "completion_ids": torch.full((2 * b, c), self.pad_token_id),
               "completion_mask": torch.zeros(2 * b, c, dtype=torch.long)}
        for i, ids in enumerate(prompts):
            out["prompt_ids"][i, p - len(ids):] = torch.tensor(ids)
            out["prompt_mask"][i, p - len(ids):] = 1
        for i, ids in enumerate(comps):
            out["completion_ids"][i, : len(ids)] = torch.tensor(ids)
            out["completion_mask"][i, : len(ids)] = 1
        out["shared_mask"] = torch.zeros(b, c, dtype=torch.long)
        for i, e in enumerate(examples):
            out["shared_mask"][i, : _common_prefix(e["chosen_ids"], e["rejected_ids"])] = 1
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
    """Per-token log-probs (2B, C) of the [chosen; rejected] completions of a `PairCollator` batch, 0 on padding.

    The prompt, shared by both completions, runs once (its KV cache is repeated for the two), instead of twice as
    in TRL's concatenated forward; with prompts ~10x longer than answers this halves a step. Gradients flow
    through the cache, so the result (and its gradient) equals the concatenated forward up to float rounding.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)
    comp_ids, comp_mask = batch["completion_ids"].to(device), batch["completion_mask"].to(device)
    b = prompt_ids.size(0)
    pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    first = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True,
                  logits_to_keep=1)
    cache = first.past_key_values
    twice = torch.cat([torch.arange(b), torch.arange(b)]).to(device)
    cache.reorder_cache(twice)  # (B, ...) -> (2B, ...) as [prompt; prompt]
    comp_pos = prompt_mask.sum(-1, keepdim=True)[twice] + torch.arange(comp_ids.size(1), device=device)
    rest = model(input_ids=comp_ids, attention_mask=torch.cat([prompt_mask[twice], comp_mask], dim=1),
                 position_ids=comp_pos, past_key_values=cache, use_cache=False)
    # token j of a completion is predicted by the previous position: the prompt's last for j = 0
    logits = torch.cat([first.logits[:, -1:][twice], rest.logits[:, :-1]], dim=1).float()
    logps = torch.gather(logits.log_softmax(-1), 2, comp_ids[..., None]).squeeze(-1)
    return logps * comp_mask


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


class PreferenceTrainer(DPOTrainer):
    """TRL's DPOTrainer with the loss taken from `posttrain.losses.LOSSES` and the reference read from the cache.

    The dataset is already encoded (`encode`) and carries per-token `ref_*_tok` (and for TGDPO `rhat_*_tok`)
    columns; only the policy runs at each step. The step's loss is `LOSSES[loss].fn` with `loss_params` (an
    instance of that row's params dataclass), and nothing else: a row is the loss its name says.
    """

    def __init__(self, *args, loss: str, loss_params: Any, **kwargs):
        self.loss_name, self.loss_params = loss, loss_params
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # encoded by posttrain.preference.encode, the same function that built the cache

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", *TOKEN_COLUMNS]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        logps = pair_logps(model, inputs)  # (2B, C): batch is [chosen, rejected]
        mask = inputs["completion_mask"].to(logps.dtype)
        ref = inputs["ref_tok"].to(logps.dtype) if "ref_tok" in inputs else torch.zeros_like(logps)
        rhat = inputs["rhat_tok"].to(logps.dtype) if "rhat_tok" in inputs else None
        c = lambda t: t.chunk(2, dim=0)  # noqa: E731
        (pc, pr), (rc, rr), (mc, mr) = c(logps), c(ref), c(mask)
        rhat_c, rhat_r = c(rhat) if rhat is not None else (None, None)
        batch = losses.PairBatch(pc, pr, rc, rr, mc, mr, rhat_c, rhat_r, inputs["shared_mask"].to(logps))
        per_example, chosen_rewards, rejected_rewards = losses.LOSSES[self.loss_name].fn(batch, self.loss_params)
        loss = per_example.mean()
        m = self._metrics[mode]
        m["rewards/chosen"].append(chosen_rewards.mean().item())
        m["rewards/rejected"].append(rejected_rewards.mean().item())
        m["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        m["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        # likelihood displacement (seed 002 section 6.8): watch the chosen log-prob fall along with the rejected
        m["logps/chosen"].append(pc.sum(-1).mean().item())
        m["logps/rejected"].append(pr.sum(-1).mean().item())
        if mode == "train":  # tokens as TRL counts them: prompt + chosen, prompt + rejected
            self._total_train_tokens += int(2 * inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
        m["num_tokens"] = [self._total_train_tokens]
        return (loss, SimpleNamespace(logits=logps)) if return_outputs else loss
