"""Preference training on TRL's DPOTrainer with per-token reference log-probs and token guidance read from a cache.

One tokenisation (`encode`) serves both the cache (`completion_logps`, run once per data set by the `reference`
and `guidance` stages) and training, so cached per-token values line up with the trained tokens by construction.
`PreferenceTrainer` subclasses TRL's DPOTrainer and replaces only its loss: a step costs one policy forward and
backward, like DPO with precomputed reference log-probs, whatever the loss in `posttrain.losses.LOSSES`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from posttrain import io, losses

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
    with each completion cut so that prompt + completion fits `max_len` (the collator's keep_start truncation)."""
    prompt = pair["prompt"]
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    out = {}
    full = {}
    for side in ("chosen", "rejected"):
        full[side] = tok.apply_chat_template(prompt + [{"role": "assistant", "content": pair[side]}], tokenize=True,
                                             return_dict=True)["input_ids"]
    n = min(_common_prefix(p, full["chosen"]), _common_prefix(p, full["rejected"]))
    out["prompt_ids"] = p[:n]
    for side in ("chosen", "rejected"):
        out[f"{side}_ids"] = full[side][n:][: max(0, max_len - n)]
    return out


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
class TokenCollator(DataCollatorForPreference):
    """TRL's preference collator, plus per-token cached columns laid out like `completion_mask`: (2B, T)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        mask = out["completion_mask"]  # (2B, T), batch is [chosen, rejected]
        for name in ("ref", "rhat"):
            if f"{name}_chosen_tok" not in examples[0]:
                continue
            rows = [e[f"{name}_chosen_tok"] for e in examples] + [e[f"{name}_rejected_tok"] for e in examples]
            full = torch.zeros(mask.shape, dtype=torch.float32)
            for i, values in enumerate(rows):
                pos = mask[i].nonzero().squeeze(-1)
                if len(values) < len(pos):
                    raise ValueError(f"cached {name} values cover {len(values)} tokens, the completion has "
                                     f"{len(pos)}: the cache was built with another tokenizer or max_len")
                full[i, pos] = torch.tensor(values[: len(pos)], dtype=torch.float32)
            out[f"{name}_tok"] = full
        return out


@torch.no_grad()
def completion_logps(model, tok, rows: list[dict], batch_size: int, max_len: int) -> list[dict]:
    """Per-token log-probs of each encoded row's chosen and rejected completion tokens under `model`."""
    model.eval()
    device = next(model.parameters()).device
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_len)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collate([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in chunk])
        ids, attn, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logps = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)  # (2B, T-1)
        shift = mask[:, 1:].bool()
        n = len(chunk)
        for i, r in enumerate(chunk):
            out.append({"id": r["id"], "chosen": logps[i][shift[i]].tolist(),
                        "rejected": logps[n + i][shift[n + i]].tolist()})
    return out


def write_token_values(path: str | Path, rows: list[dict]) -> None:
    io.write_jsonl(path, rows)


def read_token_values(path: str | Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


class PreferenceTrainer(DPOTrainer):
    """TRL's DPOTrainer with the loss taken from `posttrain.losses.LOSSES` and the reference read from the cache.

    The dataset is already encoded (`encode`) and carries per-token `ref_*_tok` (and for TGDPO `rhat_*_tok`)
    columns; only the policy runs at each step.
    """

    def __init__(self, *args, loss: str, loss_kwargs: dict[str, Any], sft_weight: float = 0.0, **kwargs):
        self.loss_name, self.loss_kwargs, self.sft_weight = loss, loss_kwargs, sft_weight
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # encoded by posttrain.preference.encode, the same function that built the cache

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", *TOKEN_COLUMNS]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                        use_cache=False, fused_lm_head=True)
        shift = mask[:, 1:].float()  # (2B, T-1)
        logps = outputs.log_probs[:, -shift.size(1):] * shift
        ref = inputs["ref_tok"][:, 1:] if "ref_tok" in inputs else torch.zeros_like(logps)
        rhat = inputs["rhat_tok"][:, 1:] if "rhat_tok" in inputs else None
        c = lambda t: t.chunk(2, dim=0)  # noqa: E731  batch is [chosen, rejected]
        (pc, pr), (rc, rr), (mc, mr) = c(logps), c(ref.to(logps.dtype)), c(shift)
        batch = losses.PairBatch(pc, pr, rc, rr, mc, mr, *(c(rhat.to(logps.dtype)) if rhat is not None else ()))
        per_example, chosen_rewards, rejected_rewards = losses.LOSSES[self.loss_name](batch, **self.loss_kwargs)
        loss = per_example.mean()
        if self.sft_weight > 0:  # RPO: NLL of the chosen completions, against likelihood displacement
            loss = loss + self.sft_weight * -(pc.sum() / mc.sum().clamp(min=1))
        m = self._metrics[mode]
        m["rewards/chosen"].append(chosen_rewards.mean().item())
        m["rewards/rejected"].append(rejected_rewards.mean().item())
        m["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        m["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        # likelihood displacement (seed 002 section 6.8): watch the chosen log-prob fall along with the rejected
        m["logps/chosen"].append(pc.sum(-1).mean().item())
        m["logps/rejected"].append(pr.sum(-1).mean().item())
        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum().item())
        m["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
