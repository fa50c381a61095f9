"""Every loss on one hand-worked pair, plus the identities that tie them together.

The pair (B=1, T=3, the last position padding with garbage that the masks must hide):
  policy_chosen  = [-1.0, -2.0 | 9]   ref_chosen   = [-1.5, -2.5 | 9]  -> chosen log-ratio   r_w = 0.5 + 0.5 = 1.0
  policy_rejected= [-1.0, -1.0 | 9]   ref_rejected = [-0.5, -1.0 | 9]  -> rejected log-ratio r_l = -0.5 + 0 = -0.5
"""

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain import losses
from posttrain.losses import PairBatch


def softplus_neg(x: float) -> float:
    """-log sigma(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def pair(rhat_chosen=None, rhat_rejected=None) -> PairBatch:
    t = lambda *v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    mask = t(1, 1, 0)
    return PairBatch(t(-1.0, -2.0, 9), t(-1.0, -1.0, 9), t(-1.5, -2.5, 9), t(-0.5, -1.0, 9), mask, mask.clone(),
                     None if rhat_chosen is None else t(*rhat_chosen, 9),
                     None if rhat_rejected is None else t(*rhat_rejected, 9))


HAND = {
    # DPO: -log sigma(0.1 * (1.0 - (-0.5))) = log(1 + e^-0.15)
    "dpo": (losses.DPOParams(beta=0.1), {}, softplus_neg(0.15)),
    # RPO, lambda 0.5: DPO's value + 0.5 * the chosen NLL per token, -(-1 - 2)/2 = 1.5
    "rpo": (losses.RPOParams(beta=0.1, nll_weight=0.5), {}, softplus_neg(0.15) + 0.75),
    # TGDPO, rhat_w = [2, 0], rhat_l = [-2, 0], beta 0.1, alpha 0.5 -> token betas w: 0.1(1 + 0.05 * [2, 0]) =
    # [0.11, 0.10], l: 0.1(1 - 0.05 * [-2, 0]) = [0.11, 0.10]; margin = (0.11*0.5 + 0.1*0.5) - (0.11*-0.5 + 0) = 0.16
    "tgdpo": (losses.TGDPOParams(beta=0.1, alpha=0.5), {"rhat_chosen": [2, 0], "rhat_rejected": [-2, 0]},
              softplus_neg(0.16)),
    # IPO, tau = 0.1: h = 1.0/2 - (-0.5)/2 = 0.75 (per-token means); (0.75 - 1/0.2)^2 = (-4.25)^2
    "ipo": (losses.IPOParams(beta=0.1), {}, 18.0625),
    # SimPO, beta 2, gamma 0.5: 2 * (-3/2) - 2 * (-2/2) - 0.5 = -1.5 -> log(1 + e^1.5)
    "simpo": (losses.SimPOParams(beta=2.0, gamma=0.5), {}, softplus_neg(-1.5)),
    # ORPO, lambda 0.1: mean logps m_w = -1.5, m_l = -1.0; log odds m - log(1 - e^m): -1.24752, -0.54132;
    # 1.5 + 0.1 * log(1 + e^0.70620)
    "orpo": (losses.ORPOParams(beta=0.1), {}, 1.5 + 0.1 * softplus_neg(-1.24752 + 0.54132)),
    # KTO, beta 0.1: z = max(0, (1.0 - 0.5)/2) = 0.25; (1 - sigma(0.1 * 0.75)) + (1 - sigma(0.1 * 0.75))
    "kto": (losses.KTOParams(beta=0.1), {}, 2 * (1 - 1 / (1 + math.exp(-0.075)))),
    # DPOP: the chosen log-ratio r_w = 1.0 > 0, so the penalty max(0, -r_w) is 0 and the loss is DPO's
    "dpop": (losses.DPOPParams(beta=0.1, dpop_lambda=5.0), {}, softplus_neg(0.15)),
}


def test_every_loss_has_a_hand_worked_value():
    assert set(HAND) == set(losses.LOSSES)
    assert all(type(params) is losses.LOSSES[name].params for name, (params, _, _) in HAND.items())


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_hand_worked_value(name):
    params, extra, expected = HAND[name]
    loss, chosen_reward, rejected_reward = losses.LOSSES[name].fn(pair(**extra), params)
    assert_close(loss, torch.tensor([expected], dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert chosen_reward.shape == rejected_reward.shape == (1,)


def _random_batch(seed=0, B=4, T=7) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    r = lambda: -torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # noqa: E731
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[:, 0] = 1
    return PairBatch(r(), r(), r(), r(), mask, mask.flip(-1).clone().index_fill_(1, torch.tensor([0]), 1.0),
                     torch.randn(B, T, generator=g, dtype=torch.float64),
                     torch.randn(B, T, generator=g, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64))


def test_dpop_penalises_a_chosen_log_ratio_below_zero():
    """policy_chosen [-2, -3] vs ref [-1.5, -2.5]: r_w = -1.0, r_l = -0.5 (as in `pair`); DPO's margin
    0.1 * (-1.0 + 0.5) = -0.05, penalty 5 * max(0, 1.0) = 5 -> -log sigma(-5.05)."""
    b = pair()
    b.policy_chosen = torch.tensor([[-2.0, -3.0, 9]], dtype=torch.float64)
    assert_close(losses.dpop(b, losses.DPOPParams(beta=0.1, dpop_lambda=5.0))[0],
                 torch.tensor([softplus_neg(-5.05)], dtype=torch.float64))
    assert_close(losses.dpop(b, losses.DPOPParams(beta=0.1, dpop_lambda=0.0))[0],
                 losses.dpo(b, losses.DPOParams(beta=0.1))[0])


def test_rpo_with_no_nll_weight_is_dpo():
    b = _random_batch(4)
    assert_close(losses.rpo(b, losses.RPOParams(beta=0.2, nll_weight=0.0))[0],
                 losses.dpo(b, losses.DPOParams(beta=0.2))[0])


def test_each_loss_reads_its_params_class_and_default_values_live_there_only():
    """A row's params are its loss's dataclass: every field has its default there, a bad value is refused, and no
    name is also a training knob of the dpo stage (a row's keys go to one or the other by name)."""
    import dataclasses

    from stages import dpo

    train = {f.name for f in dataclasses.fields(dpo.TrainParams)} | {"loss", "guidance"}
    for name, row in losses.LOSSES.items():
        fields = {f.name for f in dataclasses.fields(row.params)}
        assert "beta" in fields and not fields & train, name
        row.params()  # every field has a default
        with pytest.raises(ValueError, match="beta must be > 0"):
            row.params(beta=0.0)
    assert [f.name for f in dataclasses.fields(losses.KTOParams)] == ["beta", "desirable_weight", "undesirable_weight"]


def test_tgdpo_with_alpha_zero_is_dpo():
    b = _random_batch()
    dpo = losses.dpo(b, losses.DPOParams(beta=0.3))[0]
    assert_close(losses.tgdpo(b, losses.TGDPOParams(beta=0.3, alpha=0.0))[0], dpo)
    b.shared[:, :2] = 1
    assert_close(losses.tgdpo(b, losses.TGDPOParams(beta=0.3, alpha=0.0, cancel_shared_prefix=True))[0], dpo)


def test_tgdpo_nll_anchor_by_hand():
    """The `tgdpo` pair of HAND (margin 0.16) with lambda 0.5: + 0.5 x the chosen NLL per token, -(-1 - 2)/2 = 1.5."""
    b = pair(rhat_chosen=[2, 0], rhat_rejected=[-2, 0])
    assert_close(losses.tgdpo(b, losses.TGDPOParams(beta=0.1, alpha=0.5, nll_weight=0.5))[0],
                 torch.tensor([softplus_neg(0.16) + 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="nll_weight must be >= 0"):
        losses.TGDPOParams(nll_weight=-0.1)


def test_tgdpo_with_alpha_zero_and_an_nll_anchor_is_rpo():
    b = _random_batch(6)
    b.shared[:, :2] = 1
    rpo = losses.rpo(b, losses.RPOParams(beta=0.3, nll_weight=0.7))[0]
    assert not torch.allclose(rpo, losses.dpo(b, losses.DPOParams(beta=0.3))[0])
    for cancel in (False, True):
        p = losses.TGDPOParams(beta=0.3, alpha=0.0, nll_weight=0.7, cancel_shared_prefix=cancel)
        assert_close(losses.tgdpo(b, p)[0], rpo)


def test_tgdpo_with_zero_guidance_is_dpo():
    b = _random_batch(1)
    b.rhat_chosen, b.rhat_rejected = torch.zeros_like(b.rhat_chosen), torch.zeros_like(b.rhat_rejected)
    assert_close(losses.tgdpo(b, losses.TGDPOParams(beta=0.2, alpha=0.7))[0],
                 losses.dpo(b, losses.DPOParams(beta=0.2))[0])


def test_simpo_without_margin_or_normalisation_is_reference_free_dpo():
    b = _random_batch(2)
    b.ref_chosen, b.ref_rejected = torch.zeros_like(b.ref_chosen), torch.zeros_like(b.ref_rejected)
    assert_close(losses.simpo(b, losses.SimPOParams(beta=0.5, gamma=0.0, length_normalize=False))[0],
                 losses.dpo(b, losses.DPOParams(beta=0.5))[0])


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_padding_is_ignored(name):
    b = _random_batch(3)
    row = losses.LOSSES[name]
    before = row.fn(b, row.params())[0]
    for t in (b.policy_chosen, b.ref_chosen, b.rhat_chosen):
        t.masked_fill_(b.chosen_mask == 0, 123.0)
    for t in (b.policy_rejected, b.ref_rejected, b.rhat_rejected):
        t.masked_fill_(b.rejected_mask == 0, -77.0)
    assert_close(row.fn(b, row.params())[0], before)


def test_tgdpo_pushes_rewarded_chosen_tokens_harder():
    """A chosen token with high r_hat gets a larger gradient than under DPO; alpha scales it."""
    grads = {}
    for alpha in (0.0, 1.0):
        b = pair(rhat_chosen=[5, 0], rhat_rejected=[0, 0])
        b.policy_chosen.requires_grad_(True)
        losses.tgdpo(b, losses.TGDPOParams(beta=0.1, alpha=alpha))[0].sum().backward()
        grads[alpha] = b.policy_chosen.grad[0].clone()
    assert grads[1.0][0].abs() > grads[0.0][0].abs()
    assert grads[1.0][2] == grads[0.0][2] == 0  # padding gets no gradient


def shared_pair(shared_logp: torch.Tensor | None = None) -> PairBatch:
    """One pair whose first token is shared (same id after the same prompt: same log-probs and r_hat both sides):
      policy_chosen   = [-1.0, -2.0]   ref_chosen   = [-1.5, -2.5]  -> d_w = [0.5, 0.5]
      policy_rejected = [-1.0, -1.0]   ref_rejected = [-1.5, -1.0]  -> d_l = [0.5, 0.0]
      rhat_chosen = [-2, 2], rhat_rejected = [-2, -2], shared = [1, 0]
    `shared_logp` (a leaf, shape (1, 1)) stands for the first token's policy log-prob on both sides, as one model
    output does, so its gradient is what the shared token receives."""
    t = lambda *v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    s = t(-1.0) if shared_logp is None else shared_logp
    mask = t(1, 1)
    return PairBatch(torch.cat([s, t(-2.0)], 1), torch.cat([s, t(-1.0)], 1), t(-1.5, -2.5), t(-1.5, -1.0), mask,
                     mask.clone(), t(-2, 2), t(-2, -2), t(1, 0))


def test_tgdpo_shared_prefix_cancellation_by_hand():
    """beta 0.1, alpha 0.5 (alpha beta = 0.05).
    Paper form: w_w = 0.1(1 + 0.05[-2, 2]) = [0.09, 0.11], w_l = 0.1(1 - 0.05[-2, -2]) = [0.11, 0.11];
      margin = (0.09*0.5 + 0.11*0.5) - (0.11*0.5 + 0.11*0) = 0.045.
    Cancelled: the shared token weighs 0.1 on both sides: w_w = [0.1, 0.11], w_l = [0.1, 0.11];
      margin = (0.05 + 0.055) - (0.05 + 0) = 0.055.
    The difference, -0.01, is the shared token's 2 alpha beta^2 r_hat d = 2 * 0.5 * 0.01 * -2 * 0.5."""
    paper = losses.TGDPOParams(beta=0.1, alpha=0.5)
    cancel = losses.TGDPOParams(beta=0.1, alpha=0.5, cancel_shared_prefix=True)
    assert_close(losses.tgdpo(shared_pair(), paper)[0], torch.tensor([softplus_neg(0.045)], dtype=torch.float64))
    assert_close(losses.tgdpo(shared_pair(), cancel)[0], torch.tensor([softplus_neg(0.055)], dtype=torch.float64))


def test_tgdpo_cancellation_leaves_the_shared_prefix_no_gradient():
    """d L / d s, s the shared token's log-prob: 0 cancelled (as DPO); under the paper's form
    -sigma(-m) (w_w - w_l) = -sigma(-0.045) * (0.09 - 0.11)."""
    grads = {}
    for cancel in (True, False):
        s = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
        p = losses.TGDPOParams(beta=0.1, alpha=0.5, cancel_shared_prefix=cancel)
        losses.tgdpo(shared_pair(s), p)[0].sum().backward()
        grads[cancel] = float(s.grad)
    s = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    losses.dpo(shared_pair(s), losses.DPOParams(beta=0.1))[0].sum().backward()
    assert grads[True] == float(s.grad) == 0.0
    assert grads[False] == pytest.approx(0.02 / (1 + math.exp(0.045)), rel=1e-9)


def test_tgdpo_cancellation_without_a_shared_prefix_is_the_paper_form():
    b = _random_batch(5)
    paper = losses.tgdpo(b, losses.TGDPOParams(beta=0.2, alpha=0.7))[0]
    assert_close(losses.tgdpo(b, losses.TGDPOParams(beta=0.2, alpha=0.7, cancel_shared_prefix=True))[0], paper)
    b.shared[:, 0] = 1
    assert not torch.allclose(
        losses.tgdpo(b, losses.TGDPOParams(beta=0.2, alpha=0.7, cancel_shared_prefix=True))[0], paper)


def test_tgdpo_cancellation_needs_the_shared_mask():
    b = shared_pair()
    b.shared = None
    with pytest.raises(ValueError, match="shared-prefix mask"):
        losses.tgdpo(b, losses.TGDPOParams(cancel_shared_prefix=True))


def test_tgdpo_rejected_cap_by_hand():
    """d_w = [0.5, 0.5], d_l = [-0.5, -1.0], rhat_w = [0, 0], rhat_l = [30, -4]; beta 0.1, alpha 0.5.
    w_l = 0.1(1 - 0.05[30, -4]) = [-0.05, 0.12]; capped to [0, beta]: [0, 0.1]. sum w_w d_w = 0.1.
    Paper: 0.1 - (-0.05*-0.5 + 0.12*-1.0) = 0.1 + 0.095 = 0.195. Capped: 0.1 - (0 + 0.1*-1.0) = 0.2."""
    t = lambda *v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    b = PairBatch(t(-1.0, -2.0), t(-1.0, -2.0), t(-1.5, -2.5), t(-0.5, -1.0), t(1, 1), t(1, 1), t(0, 0), t(30, -4))
    paper = losses.tgdpo(b, losses.TGDPOParams(beta=0.1, alpha=0.5))[0]
    capped = losses.tgdpo(b, losses.TGDPOParams(beta=0.1, alpha=0.5, cap_rejected=True))[0]
    assert_close(paper, torch.tensor([softplus_neg(0.195)], dtype=torch.float64))
    assert_close(capped, torch.tensor([softplus_neg(0.2)], dtype=torch.float64))


def test_the_collator_marks_the_tokens_chosen_and_rejected_share_from_the_start():
    from posttrain.preference import PairCollator

    rows = [{"prompt_ids": [1], "chosen_ids": [5, 6, 7, 8], "rejected_ids": [5, 6, 9]},
            {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 3]},
            {"prompt_ids": [1], "chosen_ids": [5, 6], "rejected_ids": [5, 6, 7]}]
    shared = PairCollator(pad_token_id=0)(rows)["shared_mask"]
    assert shared.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
