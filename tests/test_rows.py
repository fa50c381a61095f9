"""Each row of params.yaml's dpo.variants trains with the loss it names: the trainer the dpo stage builds for the row
computes that row's LOSSES function with that row's params, on a hand-built batch and the tiny base model."""

import pytest
import torch
import yaml

from posttrain import config, losses, modeling, preference
from stages import dpo
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def hand_batch(workdir, tmp_path_factory):
    """Two pairs on the tiny base model with hand-written caches, built so that every distinct row of params.yaml
    gives another loss: reference log-probs 0 (the chosen log-ratio is negative, so DPOP's penalty acts), r_hat
    varying per token and equal on both sides of the shared prefix (pair `a` shares `47 + 38 = 8`)."""
    tmp = tmp_path_factory.mktemp("hand")
    tok = modeling.load_tokenizer(workdir / "models/base", padding_side="right")
    q = [{"role": "user", "content": "What is 47 + 38?"}]
    pairs = [{"id": "a", "prompt": q, "chosen": "47 + 38 = 85", "rejected": "47 + 38 = 86, I think"},
             {"id": "b", "prompt": q, "chosen": "85", "rejected": "It is 86"}]
    rows, _ = preference.encoded_rows(tok, pairs, 96, "hand")
    shared = [modeling.common_prefix(r["chosen_ids"], r["rejected_ids"]) for r in rows]
    assert shared[0] >= 5 and shared[1] == 0
    rhat = lambda n, k, sign: [0.5 - 0.2 * t if t < k else sign * (1.0 + 0.3 * t) for t in range(n)]  # noqa: E731
    ref, guide = [], []
    for r, k in zip(rows, shared, strict=True):
        nc, nr = len(r["chosen_ids"]), len(r["rejected_ids"])
        ref.append({"id": r["id"], "chosen": [0.0] * nc, "rejected": [-0.5] * nr})
        guide.append({"id": r["id"], "chosen": rhat(nc, k, 1.0), "rejected": rhat(nr, k, -1.0)})
    (tmp / "reference").mkdir()
    (tmp / "guidance").mkdir()
    preference.write_token_values(tmp / "reference/logps.jsonl", ref)
    preference.write_token_values(tmp / "guidance/rhat.jsonl", guide)
    return {"tok": tok, "pairs": pairs, "dir": tmp, "ref": ref, "rhat": guide}


PARAMS_ROWS = sorted(yaml.safe_load((ROOT / "params.yaml").read_text())["dpo"]["variants"])


def _row_loss(hand, variant: str, model):
    """params.yaml's row `variant` resolved, its dataset and batch, and its LOSSES function on the batch's per-token
    log-probs under `model`, assembled here from the hand-written caches."""
    common, params = config.load(dpo.DpoParams, "dpo", ROOT / "params.yaml")
    vp = dpo.resolve(params, variant, "params.yaml")
    data, _ = dpo.build_dataset(hand["tok"], hand["pairs"], vp, common.max_len, hand["dir"] / "reference",
                                hand["dir"] / "guidance", "hand")
    batch = preference.PairCollator(hand["tok"].pad_token_id)([data[i] for i in range(len(data))])
    logps = preference.pair_logps(model, batch).detach().double()  # (2B, C): batch is [chosen; rejected]
    n, c = len(hand["pairs"]), logps.size(1)

    def pad(rows: list[dict], side: str) -> torch.Tensor:
        return torch.tensor([r[side] + [0.0] * (c - len(r[side])) for r in rows], dtype=torch.float64)

    mask = batch["completion_mask"].double()
    b = losses.PairBatch(logps[:n], logps[n:], pad(hand["ref"], "chosen"), pad(hand["ref"], "rejected"), mask[:n],
                         mask[n:], pad(hand["rhat"], "chosen"), pad(hand["rhat"], "rejected"),
                         batch["shared_mask"].double())
    return (common, vp, data, batch), losses.LOSSES[vp.loss].fn(b, vp.loss_params)[0].mean()


@pytest.mark.parametrize("variant", PARAMS_ROWS)
def test_every_params_row_trains_with_its_own_loss(workdir, hand_batch, variant):
    """The trainer built for each row of params.yaml's dpo.variants computes that row's LOSSES function with that
    row's params, on the same per-token log-probs (LoRA B starts at 0: the policy is the base model)."""
    model = modeling.load_chain(workdir / "models/base")
    (common, vp, data, batch), expected = _row_loss(hand_batch, variant, model)
    trainer = dpo.make_trainer(model, hand_batch["tok"], data, vp, common, torch.device("cpu"),
                               str(hand_batch["dir"] / variant))
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch).double(), expected, atol=1e-5, rtol=1e-5)


def test_the_hand_batch_tells_every_row_apart(workdir, hand_batch):
    """Rows with another loss or other loss params give other values here, so a row trained with any other row's
    loss (every row trained as plain DPO, say) fails the test above."""
    model = modeling.load_chain(workdir / "models/base")
    values = {}
    for v in PARAMS_ROWS:
        (_, vp, _, _), expected = _row_loss(hand_batch, v, model)
        values[(vp.loss, repr(vp.loss_params))] = float(expected)
    ordered = sorted(values.values())
    assert min(b - a for a, b in zip(ordered, ordered[1:], strict=False)) > 1e-3, values


def test_dpo_defaults_seed_seeds_the_trainer_and_the_lora_initialisation(workdir, hand_batch):
    """dpo.defaults.seed, not common.seed (the data's), reaches TRL: its args and the LoRA A matrices it draws."""
    common, _ = config.load(dpo.DpoParams, "dpo", ROOT / "params.yaml")
    lora_a = {}
    for seed in (3, 3, 4):
        vp = dpo.resolve(dpo.DpoParams(defaults=dpo.TrainParams(seed=seed)), "dpo", "p.yaml")
        data, _ = dpo.build_dataset(hand_batch["tok"], hand_batch["pairs"], vp, common.max_len,
                                    hand_batch["dir"] / "reference", hand_batch["dir"] / "guidance", "hand")
        trainer = dpo.make_trainer(modeling.load_chain(workdir / "models/base"), hand_batch["tok"], data, vp, common,
                                   torch.device("cpu"), str(hand_batch["dir"] / f"seed{seed}"))
        assert trainer.args.seed == seed
        weights = [p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n]
        if seed in lora_a:
            assert all(torch.equal(a, b) for a, b in zip(lora_a[seed], weights, strict=True))
        lora_a[seed] = weights
    assert not all(torch.equal(a, b) for a, b in zip(lora_a[3], lora_a[4], strict=True))
