"""The preference-grounded token-level reward of seed 001 (huggingface.co/papers/2306.00398).

A per-token reward r_phi(s_t, a_t) (posttrain.reward.RewardModel.token_rewards: a scalar head on the LoRA-trained
SFT model's hidden state at a_t, plus a learned multiple of log p_phi(a_t | s_t)), whose aggregate over a
response's tokens e_phi(x, y) = f(r_1..r_T) reproduces sequence-level preferences:
    f = average:      (1/T) sum_t r_t
        soft-maximum: tau log sum_t exp(r_t / tau)
        soft-minimum: -tau log sum_t exp(-r_t / tau)
trained with Bradley-Terry, L = -log sigma(e(x, y_w) - e(x, y_l)), on the labelled pairs. Training is the
transformers Trainer with only `compute_loss` replaced.
"""

from __future__ import annotations

from collections.abc import Callable

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


def token_rewards(model, batch: dict[str, Tensor]) -> Tensor:
    """(2B, C) r_phi of each [chosen; rejected] completion token of a `posttrain.preference.PairCollator` batch
    (0 on padding), on the model's device: the reward of token a_t given s_t, each prompt run once for both
    completions. The batch's tensors are moved there first (a Trainer has done so already)."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).token_rewards


class TokenRewardTrainer(Trainer):
    """Trainer whose loss is Bradley-Terry on aggregated token rewards; a PairCollator batch, [chosen, rejected]."""

    def __init__(self, *args, aggregator: str, tau: float, **kwargs):
        self.aggregator, self.tau = AGGREGATORS[aggregator], tau
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        r = token_rewards(model, inputs)
        e = self.aggregator(r, inputs["completion_mask"].float(), self.tau)
        e_w, e_l = e.chunk(2, dim=0)
        loss = bradley_terry(e_w, e_l).mean()
        return (loss, {"rewards": e}) if return_outputs else loss
