"""Preference losses, one pure function each, over per-token log-probs and completion masks.

Every function takes `PairBatch` (per-token tensors of shape (B, T), B pairs; masks are 1 on completion tokens
and 0 on prompt and padding) plus its own hyper-parameters, and returns per-example `(losses, chosen_rewards,
rejected_rewards)`, each (B,). The caller takes `.mean()`. `LOSSES` is the only list of names: params validation,
error messages and the tests read it. A loss's hyper-parameters are its keyword arguments (`hyperparameters`
reads them off its signature), so a variant's params feed a loss by name and a loss refuses a keyword it does not
take.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PairBatch:
    policy_chosen: Tensor  # (B, T) log pi_theta per token of y_w
    policy_rejected: Tensor  # (B, T) ... of y_l
    ref_chosen: Tensor  # (B, T) log pi_ref per token of y_w (zeros where unused)
    ref_rejected: Tensor  # (B, T)
    chosen_mask: Tensor  # (B, T) 1 on y_w's tokens
    rejected_mask: Tensor  # (B, T)
    rhat_chosen: Tensor | None = None  # (B, T) token-level reward guidance r_hat_t for y_w (TGDPO)
    rhat_rejected: Tensor | None = None  # (B, T)

    def logratios(self) -> tuple[Tensor, Tensor]:
        """sum_t m_t (log pi_theta - log pi_ref) for chosen and rejected: (B,) each."""
        return (((self.policy_chosen - self.ref_chosen) * self.chosen_mask).sum(-1),
                ((self.policy_rejected - self.ref_rejected) * self.rejected_mask).sum(-1))

    def seq_logps(self) -> tuple[Tensor, Tensor]:
        return (self.policy_chosen * self.chosen_mask).sum(-1), (self.policy_rejected * self.rejected_mask).sum(-1)

    def lengths(self) -> tuple[Tensor, Tensor]:
        return self.chosen_mask.sum(-1).clamp(min=1), self.rejected_mask.sum(-1).clamp(min=1)


Out = tuple[Tensor, Tensor, Tensor]


def dpo(b: PairBatch, beta: float = 0.1) -> Out:
    """DPO (huggingface.co/papers/2305.18290):
    L = -log sigma(beta * [sum_t m_t (logp_theta - logp_ref)]_w - beta * [...]_l)."""
    cw, cl = b.logratios()
    return -F.logsigmoid(beta * (cw - cl)), beta * cw.detach(), beta * cl.detach()


def tgdpo(b: PairBatch, beta: float = 0.1, alpha: float = 0.5) -> Out:
    """TGDPO, practical form (huggingface.co/papers/2506.14574), each token with its own effective beta:
    L = -log sigma( sum_t m_t beta (1 + alpha beta rhat_t[w]) (logp_theta_t - logp_ref_t)[w]
                  - sum_t m_t beta (1 - alpha beta rhat_t[l]) (logp_theta_t - logp_ref_t)[l] ).
    alpha = 0 (or rhat = 0) is DPO exactly."""
    if b.rhat_chosen is None or b.rhat_rejected is None:
        raise ValueError("tgdpo needs token-level guidance rhat_chosen / rhat_rejected")
    wc = beta * (1 + alpha * beta * b.rhat_chosen)  # (B, T)
    wl = beta * (1 - alpha * beta * b.rhat_rejected)
    sc = (wc * (b.policy_chosen - b.ref_chosen) * b.chosen_mask).sum(-1)
    sl = (wl * (b.policy_rejected - b.ref_rejected) * b.rejected_mask).sum(-1)
    cw, cl = b.logratios()
    return -F.logsigmoid(sc - sl), beta * cw.detach(), beta * cl.detach()


def ipo(b: PairBatch, beta: float = 0.1) -> Out:
    """IPO (huggingface.co/papers/2310.12036): (h - 1/(2 tau))^2 with h the log-ratio margin, tau = beta.
    h uses per-token means (as TRL and the IPO authors do), so the target margin does not scale with length."""
    cw, cl = b.logratios()
    lw, ll = b.lengths()
    h = cw / lw - cl / ll
    return (h - 1 / (2 * beta)) ** 2, beta * cw.detach(), beta * cl.detach()


def simpo(b: PairBatch, beta: float = 2.0, gamma: float = 0.5, length_normalize: bool = True) -> Out:
    """SimPO (huggingface.co/papers/2405.14734), reference-free:
    L = -log sigma(beta/|y_w| logp(y_w) - beta/|y_l| logp(y_l) - gamma).
    With gamma = 0 and no length normalisation it is DPO with a uniform reference (tested)."""
    sw, sl = b.seq_logps()
    if length_normalize:
        lw, ll = b.lengths()
        sw, sl = sw / lw, sl / ll
    rw, rl = beta * sw, beta * sl
    return -F.logsigmoid(rw - rl - gamma), rw.detach(), rl.detach()


def orpo(b: PairBatch, beta: float = 0.1) -> Out:
    """ORPO (huggingface.co/papers/2403.07691), reference-free: SFT NLL on y_w + lambda * odds-ratio loss, lambda=beta:
    L = -logp(y_w)/|y_w| - lambda log sigma(log odds(y_w) - log odds(y_l)), odds(y) = p/(1-p), p = exp(mean logp)."""
    sw, sl = b.seq_logps()
    lw, ll = b.lengths()
    mw, ml = sw / lw, sl / ll  # mean token log-prob, < 0
    def log_odds(m: Tensor) -> Tensor:
        return m - torch.log1p(-torch.exp(m).clamp(max=1 - 1e-6))

    ratio = log_odds(mw) - log_odds(ml)
    return -mw - beta * F.logsigmoid(ratio), beta * mw.detach(), beta * ml.detach()


def kto(b: PairBatch, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Out:
    """KTO (huggingface.co/papers/2402.01306) on pairs read as unpaired labels (y_w desirable, y_l undesirable):
    L = lambda_D (1 - sigma(beta (r_w - z))) + lambda_U (1 - sigma(beta (z - r_l))), r = sum_t log-ratio,
    z = max(0, batch mean of the log-ratios), detached (the KL reference point of seed 002 section 7.2)."""
    cw, cl = b.logratios()
    z = torch.cat([cw, cl]).mean().clamp(min=0).detach()
    losses = desirable_weight * (1 - torch.sigmoid(beta * (cw - z))) + undesirable_weight * (
        1 - torch.sigmoid(beta * (z - cl)))
    return losses, beta * cw.detach(), beta * cl.detach()


def dpop(b: PairBatch, beta: float = 0.1, dpop_lambda: float = 5.0) -> Out:
    """DPOP / DPO-Positive (huggingface.co/papers/2402.13228), as seed 002 section 6.8 writes it: DPO with a penalty
    once the chosen log-prob falls below the reference's (likelihood displacement),
    L = -log sigma(beta [sum_t m_t (logp_theta - logp_ref)]_w - beta [...]_l - lambda max(0, [sum_t m_t (logp_ref -
    logp_theta)]_w)). lambda stands outside beta here, so the paper's lambda 50 at beta 0.1 is 5.
    lambda = 0 is DPO exactly (tested)."""
    cw, cl = b.logratios()
    penalty = dpop_lambda * (-cw).clamp(min=0)
    return -F.logsigmoid(beta * (cw - cl) - penalty), beta * cw.detach(), beta * cl.detach()


LOSSES: dict[str, Callable[..., Out]] = {"dpo": dpo, "tgdpo": tgdpo, "ipo": ipo, "simpo": simpo, "orpo": orpo,
                                          "kto": kto, "dpop": dpop}


def hyperparameters(name: str) -> list[str]:
    """The keyword arguments loss `name` takes (every parameter after the batch)."""
    return list(inspect.signature(LOSSES[name]).parameters)[1:]
