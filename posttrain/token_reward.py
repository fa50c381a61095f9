"""The preference-grounded token-level reward of seed 001 (huggingface.co/papers/2306.00398).

A per-token scalar head r_phi(s_t, a_t) on the policy's backbone (LlamaForTokenClassification, 1 label), whose
aggregate over a response's tokens e_phi(x, y) = f(r_1..r_T) reproduces sequence-level preferences:
    f = average:      (1/T) sum_t r_t
        soft-maximum: tau log sum_t exp(r_t / tau)
        soft-minimum: -tau log sum_t exp(-r_t / tau)
trained with Bradley-Terry, L = -log sigma(e(x, y_w) - e(x, y_l)), on the labelled pairs. Training is the
transformers Trainer with only `compute_loss` replaced.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Trainer


def average(r: Tensor, mask: Tensor, tau: float = 1.0) -> Tensor:
    """(B, T) token rewards, (B, T) mask -> (B,) mean over the response tokens."""
    return (r * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def soft_max(r: Tensor, mask: Tensor, tau: float = 1.0) -> Tensor:
    return tau * torch.logsumexp((r / tau).masked_fill(mask == 0, float("-inf")), dim=-1)


def soft_min(r: Tensor, mask: Tensor, tau: float = 1.0) -> Tensor:
    return -tau * torch.logsumexp((-r / tau).masked_fill(mask == 0, float("-inf")), dim=-1)


AGGREGATORS: dict[str, Callable[..., Tensor]] = {"average": average, "soft_max": soft_max, "soft_min": soft_min}


def bradley_terry(e_chosen: Tensor, e_rejected: Tensor) -> Tensor:
    """Per-pair -log sigma(e_w - e_l): (B,)."""
    return -F.logsigmoid(e_chosen - e_rejected)


def build(causal_lm, head_init_std: float = 0.0):
    """A token-classification model (one scalar per token) sharing the causal LM's backbone weights."""
    from transformers import AutoModelForTokenClassification

    config = causal_lm.config
    config.num_labels = 1
    model = AutoModelForTokenClassification.from_config(config)
    model.model.load_state_dict(causal_lm.model.state_dict())
    torch.nn.init.normal_(model.score.weight, std=head_init_std) if head_init_std else torch.nn.init.zeros_(
        model.score.weight)
    return model.to(causal_lm.device, causal_lm.dtype)


def token_rewards(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) r_phi at each position: the reward of token a_t given s_t (its hidden state sees both)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


class TokenRewardTrainer(Trainer):
    """Trainer whose loss is Bradley-Terry on aggregated token rewards; batch is [chosen, rejected]."""

    def __init__(self, *args, aggregator: str, tau: float, **kwargs):
        self.aggregator, self.tau = AGGREGATORS[aggregator], tau
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        r = token_rewards(model, inputs["input_ids"], inputs["attention_mask"])
        e = self.aggregator(r, inputs["completion_mask"].float(), self.tau)
        e_w, e_l = e.chunk(2, dim=0)
        loss = bradley_terry(e_w, e_l).mean()
        return (loss, {"rewards": e}) if return_outputs else loss


def backbone(path: str | Path) -> str:
    """The causal-LM model (checkpoint or chain) a trained token reward model was built on."""
    return json.loads((Path(path) / "backbone.json").read_text())["model"]


def save(model, out: str | Path, backbone_model: str, resolved: dict) -> None:
    """Only the head is trained: write `head.safetensors` + `backbone.json` (a few KB, not a 0.5 GB checkpoint)."""
    import yaml
    from safetensors.torch import save_file

    from posttrain import io, training

    with io.atomic_dir(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.score.state_dict().items()},
                  str(tmp / "head.safetensors"))
        (tmp / "backbone.json").write_text(json.dumps({"model": str(backbone_model)}) + "\n")
        (tmp / "hyperparameters.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    training.finish(out)


def load(path: str | Path, device: torch.device):
    """A trained token reward model: the backbone named in backbone.json (a causal-LM chain) + the trained head."""
    from safetensors.torch import load_file

    from posttrain import modeling

    model = build(modeling.load_chain(backbone(path), device))
    model.score.load_state_dict(load_file(str(Path(path) / "head.safetensors")))
    return model.to(device).eval()
