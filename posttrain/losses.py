"""Preference losses, one pure function each, over per-token log-probs and completion masks.

Every function takes `PairBatch` (per-token tensors of shape (B, T), B pairs; masks are 1 on completion tokens
and 0 on prompt and padding) and its params dataclass, and returns per-example `(losses, chosen_rewards,
rejected_rewards)`, each (B,). The caller takes `.mean()`. `LOSSES` is the only list of names: each row holds the
function, its params dataclass (the hyper-parameters it reads, each default written there and nowhere else) and
whether it reads token guidance. The dpo stage, params validation, error messages and the tests read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    shared: Tensor | None = None  # (B, T) 1 on the tokens y_w and y_l share from the first (same ids, same places)

    def logratios(self) -> tuple[Tensor, Tensor]:
        """sum_t m_t (log pi_theta - log pi_ref) for chosen and rejected: (B,) each."""
        return (((self.policy_chosen - self.ref_chosen) * self.chosen_mask).sum(-1),
                ((self.policy_rejected - self.ref_rejected) * self.rejected_mask).sum(-1))

    def seq_logps(self) -> tuple[Tensor, Tensor]:
        return (self.policy_chosen * self.chosen_mask).sum(-1), (self.policy_rejected * self.rejected_mask).sum(-1)

    def lengths(self) -> tuple[Tensor, Tensor]:
        return self.chosen_mask.sum(-1).clamp(min=1), self.rejected_mask.sum(-1).clamp(min=1)


Out = tuple[Tensor, Tensor, Tensor]


@dataclass
class DPOParams:
    beta: float = 0.1
    """KL strength: the implicit reward is beta x the log-ratio to the reference."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


def dpo(b: PairBatch, p: DPOParams) -> Out:
    """DPO (huggingface.co/papers/2305.18290):
    L = -log sigma(beta * [sum_t m_t (logp_theta - logp_ref)]_w - beta * [...]_l)."""
    cw, cl = b.logratios()
    return -F.logsigmoid(p.beta * (cw - cl)), p.beta * cw.detach(), p.beta * cl.detach()


@dataclass
class RPOParams(DPOParams):
    nll_weight: float = 0.5
    """lambda on the chosen response's per-token NLL; > 0 keeps chosen log-probs from falling with the rejected
    ones. 0.5 is what every row of this pipeline added before it had a row of its own (the paper uses 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")


def rpo(b: PairBatch, p: RPOParams) -> Out:
    """RPO (huggingface.co/papers/2404.19733): DPO plus the NLL of the chosen response, per token (as TRL's
    rpo_alpha): L = -log sigma(beta [sum_t m_t (logp_theta - logp_ref)]_w - beta [...]_l)
                    - lambda / |y_w| sum_t m_t logp_theta_t[w].
    lambda = 0 is DPO exactly (tested)."""
    losses, chosen_rewards, rejected_rewards = dpo(b, p)
    return losses + p.nll_weight * chosen_nll(b), chosen_rewards, rejected_rewards


def chosen_nll(b: PairBatch) -> Tensor:
    """The chosen response's NLL per token, -1/|y_w| sum_t m_t logp_theta_t[w]: (B,)."""
    sw, _ = b.seq_logps()
    lw, _ = b.lengths()
    return -sw / lw


@dataclass
class TGDPOParams(DPOParams):
    alpha: float = 0.5
    """How strongly token guidance reshapes each token's beta; 0 is DPO exactly. The paper's default."""
    cancel_shared_prefix: bool = False
    """Weight beta on both sides for the tokens y_w and y_l share from the start, so they cancel as in DPO and the
    guidance acts from the first token where the two differ (not in the paper; issue 22)."""
    cap_rejected: bool = False
    """Keep rejected-token weights in [0, beta] (cDPO-style, huggingface.co/papers/2411.19943): guidance may push a
    rejected token less than DPO does, never more."""
    nll_weight: float = 0.0
    """lambda on the chosen response's per-token NLL, as in `rpo` (not in the paper; issue 22): the anchor that keeps
    chosen log-probs from falling, so a guided row can be set against `rpo` at equal anchoring. 0 is the paper."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 10:
            raise ValueError(f"alpha must be in [0, 10], got {self.alpha}")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")


def tgdpo(b: PairBatch, p: TGDPOParams) -> Out:
    """TGDPO, practical form (huggingface.co/papers/2506.14574), each token with its own effective beta:
    L = -log sigma( sum_t m_t w_t[w] (logp_theta_t - logp_ref_t)[w] - sum_t m_t w_t[l] (logp_theta_t - logp_ref_t)[l] )
    with w_t[w] = beta (1 + alpha beta rhat_t[w]) and w_t[l] = beta (1 - alpha beta rhat_t[l]) in the paper.
    alpha = 0 (or rhat = 0) is DPO exactly. A token both responses share at the same place after the same tokens
    has the same log-ratio d and r_hat in both, so the paper's form leaves 2 alpha beta^2 r_hat d of it in the
    margin; `cancel_shared_prefix` sets w = beta on those tokens (b.shared, (B, T)) on both sides, where
    they cancel, `cap_rejected` clamps w_t[l] to [0, beta], and `nll_weight` lambda adds lambda x the chosen
    response's per-token NLL (as `rpo`). With all three off this is the paper's form."""
    if b.rhat_chosen is None or b.rhat_rejected is None:
        raise ValueError("tgdpo needs token-level guidance rhat_chosen / rhat_rejected")
    wc = p.beta * (1 + p.alpha * p.beta * b.rhat_chosen)  # (B, T)
    wl = p.beta * (1 - p.alpha * p.beta * b.rhat_rejected)
    if p.cap_rejected:
        wl = wl.clamp(0, p.beta)
    if p.cancel_shared_prefix:
        if b.shared is None:
            raise ValueError("tgdpo with cancel_shared_prefix needs the shared-prefix mask `shared`")
        keep = b.shared.bool()
        wc, wl = wc.masked_fill(keep, p.beta), wl.masked_fill(keep, p.beta)
    sc = (wc * (b.policy_chosen - b.ref_chosen) * b.chosen_mask).sum(-1)
    sl = (wl * (b.policy_rejected - b.ref_rejected) * b.rejected_mask).sum(-1)
    cw, cl = b.logratios()
    return -F.logsigmoid(sc - sl) + p.nll_weight * chosen_nll(b), p.beta * cw.detach(), p.beta * cl.detach()


@dataclass
class IPOParams(DPOParams):
    """beta is tau: the target log-ratio margin is 1/(2 tau); smaller tau, larger margin."""


def ipo(b: PairBatch, p: IPOParams) -> Out:
    """IPO (huggingface.co/papers/2310.12036): (h - 1/(2 tau))^2 with h the log-ratio margin, tau = beta.
    h uses per-token means (as TRL and the IPO authors do), so the target margin does not scale with length."""
    cw, cl = b.logratios()
    lw, ll = b.lengths()
    h = cw / lw - cl / ll
    return (h - 1 / (2 * p.beta)) ** 2, p.beta * cw.detach(), p.beta * cl.detach()


@dataclass
class SimPOParams(DPOParams):
    beta: float = 2.0
    """Reward scale on the (length-normalised) log-prob; the paper's range is 2-2.5."""
    gamma: float = 0.5
    """Target reward margin."""
    length_normalize: bool = True
    """Average the log-prob over tokens (the paper's form)."""


def simpo(b: PairBatch, p: SimPOParams) -> Out:
    """SimPO (huggingface.co/papers/2405.14734), reference-free:
    L = -log sigma(beta/|y_w| logp(y_w) - beta/|y_l| logp(y_l) - gamma).
    With gamma = 0 and no length normalisation it is DPO with a uniform reference (tested)."""
    sw, sl = b.seq_logps()
    if p.length_normalize:
        lw, ll = b.lengths()
        sw, sl = sw / lw, sl / ll
    rw, rl = p.beta * sw, p.beta * sl
    return -F.logsigmoid(rw - rl - p.gamma), rw.detach(), rl.detach()


@dataclass
class ORPOParams(DPOParams):
    """beta is lambda, the weight of the odds-ratio term against the SFT NLL (TRL calls it beta too)."""


def orpo(b: PairBatch, p: ORPOParams) -> Out:
    """ORPO (huggingface.co/papers/2403.07691), reference-free: SFT NLL on y_w + lambda * odds-ratio loss, lambda=beta:
    L = -logp(y_w)/|y_w| - lambda log sigma(log odds(y_w) - log odds(y_l)), odds(y) = p/(1-p), p = exp(mean logp).
    The NLL is the loss's own and counted once."""
    sw, sl = b.seq_logps()
    lw, ll = b.lengths()
    mw, ml = sw / lw, sl / ll  # mean token log-prob, < 0

    def log_odds(m: Tensor) -> Tensor:
        return m - torch.log1p(-torch.exp(m).clamp(max=1 - 1e-6))

    ratio = log_odds(mw) - log_odds(ml)
    return -mw - p.beta * F.logsigmoid(ratio), p.beta * mw.detach(), p.beta * ml.detach()


@dataclass
class KTOParams(DPOParams):
    desirable_weight: float = 1.0
    """lambda_D, the weight of the desirable (chosen) term; equal to lambda_U as the pairs are balanced."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of the undesirable (rejected) term."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.desirable_weight, self.undesirable_weight) < 0:
            raise ValueError("desirable_weight and undesirable_weight must be >= 0")


def kto(b: PairBatch, p: KTOParams) -> Out:
    """KTO (huggingface.co/papers/2402.01306) on pairs read as unpaired labels (y_w desirable, y_l undesirable):
    L = lambda_D (1 - sigma(beta (r_w - z))) + lambda_U (1 - sigma(beta (z - r_l))), r = sum_t log-ratio,
    z = max(0, batch mean of the log-ratios), detached (the KL reference point of seed 002 section 7.2)."""
    cw, cl = b.logratios()
    z = torch.cat([cw, cl]).mean().clamp(min=0).detach()
    losses = p.desirable_weight * (1 - torch.sigmoid(p.beta * (cw - z))) + p.undesirable_weight * (
        1 - torch.sigmoid(p.beta * (z - cl)))
    return losses, p.beta * cw.detach(), p.beta * cl.detach()


@dataclass
class DPOPParams(DPOParams):
    dpop_lambda: float = 5.0
    """Weight of the penalty on the chosen log-ratio falling below 0, outside beta as seed 002 writes it: the
    paper's lambda 50 inside beta 0.1."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dpop_lambda < 0:
            raise ValueError(f"dpop_lambda must be >= 0, got {self.dpop_lambda}")


def dpop(b: PairBatch, p: DPOPParams) -> Out:
    """DPOP / DPO-Positive (huggingface.co/papers/2402.13228), as seed 002 section 6.8 writes it: DPO with a penalty
    once the chosen log-prob falls below the reference's (likelihood displacement),
    L = -log sigma(beta [sum_t m_t (logp_theta - logp_ref)]_w - beta [...]_l - lambda max(0, [sum_t m_t (logp_ref -
    logp_theta)]_w)). lambda = 0 is DPO exactly (tested)."""
    cw, cl = b.logratios()
    penalty = p.dpop_lambda * (-cw).clamp(min=0)
    return -F.logsigmoid(p.beta * (cw - cl) - penalty), p.beta * cw.detach(), p.beta * cl.detach()


@dataclass(frozen=True)
class Loss:
    fn: Callable[[PairBatch, Any], Out]
    params: type
    """Its hyper-parameters: a dataclass whose defaults are the loss's; a params.yaml row overrides them by name."""
    guided: bool = False
    """Reads token guidance r_hat: the dpo stage loads the row's `guidance` folder (rhat.jsonl)."""


LOSSES: dict[str, Loss] = {
    "dpo": Loss(dpo, DPOParams),
    "rpo": Loss(rpo, RPOParams),
    "tgdpo": Loss(tgdpo, TGDPOParams, guided=True),
    "ipo": Loss(ipo, IPOParams),
    "simpo": Loss(simpo, SimPOParams),
    "orpo": Loss(orpo, ORPOParams),
    "kto": Loss(kto, KTOParams),
    "dpop": Loss(dpop, DPOPParams),
}
