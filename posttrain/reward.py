"""The Bradley-Terry sequence reward model: a scalar head on the last token of a causal LM's backbone.

`build` turns a causal LM (the SFT model) into `AutoModelForSequenceClassification` with one label and the same
backbone weights; TRL's RewardTrainer trains it on (prompt, chosen, rejected) with -log sigma(r_w - r_l). Only the
head is saved (`head.safetensors` + `backbone.json`, a few KB), like the token reward model. `score` gives the
reward of whole conversations; the `label` stage uses it as a judge where no verifier exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def build(causal_lm, pad_token_id: int):
    """A sequence-classification model (one scalar per sequence, read at its last non-pad token) sharing the causal
    LM's backbone weights; the head starts at zero so every reward starts equal."""
    from transformers import AutoModelForSequenceClassification

    config = causal_lm.config
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    model = AutoModelForSequenceClassification.from_config(config)
    model.model.load_state_dict(causal_lm.model.state_dict())
    torch.nn.init.zeros_(model.score.weight)
    return model.to(causal_lm.device, causal_lm.dtype)


def save(model, out: str | Path, backbone_model: str, resolved: dict) -> None:
    """Only the head is trained: `head.safetensors` + `backbone.json`, written as the token reward model's are."""
    from posttrain import token_reward

    token_reward.save(model, out, backbone_model, resolved)


def load(path: str | Path, device: torch.device, trust_remote_code: bool = False):
    """(model, tokenizer) of a trained reward model: the backbone named in backbone.json + the trained head."""
    from safetensors.torch import load_file

    from posttrain import io, modeling

    if (Path(path) / "untrained.json").exists():
        raise io.InputError(f"{path}: {json.loads((Path(path) / 'untrained.json').read_text())['reason']}")
    backbone = json.loads((Path(path) / "backbone.json").read_text())["model"]
    tok = modeling.load_tokenizer(modeling.model_chain(backbone)[0], padding_side="right")
    model = build(modeling.load_chain(backbone, device, trust_remote_code), tok.pad_token_id)
    model.score.load_state_dict(load_file(str(Path(path) / "head.safetensors")))
    return model.to(device).eval(), tok


@torch.no_grad()
def score(model, tok, conversations: list[list[dict]], batch_size: int = 32, max_len: int = 512) -> list[float]:
    """Reward of each full conversation (prompt messages + the assistant turn), through the chat template."""
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(conversations), batch_size):
        ids = [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"][:max_len]
               for c in conversations[start : start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tok.pad_token_id)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        out += logits[:, 0].float().cpu().tolist()
    return out
