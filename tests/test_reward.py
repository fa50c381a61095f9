"""posttrain.reward.RewardModel on the tiny model: its rewards recomputed by hand from the language model's own
outputs, padding ignored, and a LoRA-trained model saved and loaded back to the same rewards."""

import pytest
import torch

from posttrain import modeling, reward, training


@pytest.fixture()
def batch():
    """Two sequences, right-padded: lengths 5 and 3 (pad id 2 on the second one's last two positions)."""
    ids = torch.tensor([[1, 17, 300, 42, 2], [1, 9, 77, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return ids, mask


def _by_hand(model: reward.RewardModel, ids, mask):
    """Per position: the head on the final hidden state, and log p(token_t | tokens_<t) (0 at t = 0, on padding)."""
    out = model.lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    head = (out.hidden_states[-1] @ model.score.weight[0]).float()
    logp = torch.zeros(ids.shape)
    for b in range(ids.shape[0]):
        for t in range(1, int(mask[b].sum())):
            logp[b, t] = out.logits[b, t - 1].float().log_softmax(-1)[ids[b, t]]
    return head, logp


def test_rewards_are_head_plus_scaled_log_likelihood(workdir, batch):
    torch.manual_seed(0)
    model = reward.build(modeling.load_chain(workdir / "models/base")).eval()
    ids, mask = batch
    with torch.no_grad():
        # at the start (head 0, scale 1) the sequence reward is the LM's log-likelihood of the sequence
        _, logp = _by_hand(model, ids, mask)
        torch.testing.assert_close(model(ids, mask).logits[:, 0], logp.sum(-1), atol=1e-4, rtol=1e-4)
        torch.nn.init.normal_(model.score.weight, std=0.5)
        model.scale.fill_(0.3)
        head, logp = _by_hand(model, ids, mask)
        want_tokens = head + 0.3 * logp
        torch.testing.assert_close(model.token_rewards(ids, mask), want_tokens, atol=1e-4, rtol=1e-4)
        # the sequence reward reads the head at the last real token (4 and 2), the log-probs summed over the rest
        want_seq = torch.stack([head[0, 4], head[1, 2]]) + 0.3 * logp.sum(-1)
        torch.testing.assert_close(model(ids, mask).logits[:, 0], want_seq, atol=1e-4, rtol=1e-4)


def test_a_lora_reward_model_saves_and_loads_to_the_same_rewards(workdir, tmp_path, batch):
    torch.manual_seed(0)
    model = reward.build(modeling.load_chain(workdir / "models/base"), training.LoraParams(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and "scale" in trainable and any("lora_B" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable), "the backbone itself stays frozen under LoRA"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n == "score.weight":
                p.normal_(0, 0.05)
        model.scale.fill_(1.7)
    ids, mask = batch
    want = model.eval()(ids, mask).logits
    reward.save(model, tmp_path / "rm", str(workdir / "models/base"), {"note": "test"})
    assert sorted(p.name for p in (tmp_path / "rm").iterdir()) == ["adapter", "backbone.json", "head.safetensors",
                                                                   "hyperparameters.yaml"]
    assert reward.threshold(tmp_path / "rm") is None  # saved without a calibration
    loaded, tok = reward.load(tmp_path / "rm", torch.device("cpu"))
    torch.testing.assert_close(loaded(ids, mask).logits, want, atol=1e-4, rtol=1e-4)
    assert tok.padding_side == "right" and float(loaded.scale) == pytest.approx(1.7)


def _scoring_model(workdir):
    """(reward model, right-padded tokenizer) on the tiny base: a random head (std 0.5) and scale 0.3, so both terms
    of the reward count."""
    torch.manual_seed(0)
    model = reward.build(modeling.load_chain(workdir / "models/base")).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.score.weight, std=0.5)
        model.scale.fill_(0.3)
    return model, modeling.load_tokenizer(workdir / "models/base", padding_side="right")


def test_score_leaves_out_the_prompts_log_probs(workdir):
    """reward.score = head at the last token + scale * the response tokens' log-probs; a forward()'s reward minus
    score is the scaled log-likelihood of the templated prompt, the same for every answer to it."""
    model, tok = _scoring_model(workdir)
    q = [{"role": "user", "content": "What is 2 + 2?"}]
    convs = [q + [{"role": "assistant", "content": a}] for a in ("4", "five or so")]
    got = reward.score(model, tok, convs)
    prompt = tok.apply_chat_template(q, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = []
    for c, g in zip(convs, got, strict=True):
        ids = torch.tensor([tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]])
        assert ids[0, : len(prompt)].tolist() == prompt
        with torch.no_grad():
            head, logp = _by_hand(model, ids, torch.ones_like(ids))
            full.append(float(model(ids, torch.ones_like(ids)).logits[0, 0]))
        want = float(head[0, -1] + 0.3 * logp[0, len(prompt):].sum())
        assert g == pytest.approx(want, abs=1e-4)
        assert full[-1] - g == pytest.approx(float(0.3 * logp[0, : len(prompt)].sum()), abs=1e-4)
    assert full[0] - got[0] == pytest.approx(full[1] - got[1], abs=1e-4) and got[0] != got[1]


def test_calibrate_picks_the_lowest_best_threshold():
    """chosen 1, 3; rejected 0, 2. t = 0: 2 + 0 right; t = 1: 2 + 1; t = 2: 1 + 1; t = 3: 1 + 2. Best 3 of 4, at
    t = 1 and t = 3: the lower is kept (it keeps more pairs)."""
    assert reward.calibrate([1.0, 3.0], [0.0, 2.0]) == {"threshold": 1.0, "accuracy": 0.75, "pairs": 2}
    assert reward.calibrate([5.0], [-1.0])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        reward.calibrate([1.0], [])


def _pairs(tok):
    """Three pairs whose prompts differ in length (so the batch pads them) and whose answers share a first token."""
    qs = ["What is 2 + 2?", "What is 123 + 456? Reply with only the number, please.", "Hi"]
    answers = [("4", "5"), ("579", "57 and more"), ("Hello there", "Hello")]
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r}
            for i, (q, (c, r)) in enumerate(zip(qs, answers, strict=True))]


def test_the_pair_forward_equals_whole_sequences_and_trains_the_same(workdir):
    """The reward stages' forward over a PairCollator batch (each prompt once, its cache shared by both answers and
    the batch's common prefix run once) gives the whole-sequence forward's token rewards on every answer token, the
    same r_chosen - r_rejected per pair (the prompt's log-probs, left out, cancel), so the same Bradley-Terry loss
    and the same gradients on the head, the scale and the LoRA weights."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from posttrain import preference

    torch.manual_seed(0)
    model = reward.build(modeling.load_chain(workdir / "models/base"), training.LoraParams(r=4, alpha=8))
    tok = modeling.load_tokenizer(workdir / "models/base", padding_side="right")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n == "score.weight":
                p.normal_(0, 0.05)
        model.scale.fill_(0.7)
    rows = [preference.encode(tok, p, 96) for p in _pairs(tok)]
    pair = preference.PairCollator(pad_token_id=tok.pad_token_id)(rows)
    assert pair["prefix_len"] > 0 and len(set(map(len, (r["prompt_ids"] for r in rows)))) == 3
    whole = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=96)(rows)

    def loss_and_grads(out_logits):
        c, r = out_logits.squeeze(-1).chunk(2)
        loss = -torch.nn.functional.logsigmoid(c - r).mean()
        model.zero_grad()
        loss.backward()
        return loss.detach(), c.detach() - r.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.requires_grad}

    got = model(**pair)
    want_tokens = model.token_rewards(whole["input_ids"], whole["attention_mask"]).detach()
    mask = whole["completion_mask"].bool()
    for i in range(6):  # [chosen; rejected]: the same token rewards on the answer's tokens
        n = int(pair["completion_mask"][i].sum())
        torch.testing.assert_close(got.token_rewards[i, :n].detach(), want_tokens[i][mask[i]], atol=1e-4, rtol=1e-4)
    loss, margin, grads = loss_and_grads(got.logits)
    want_loss, want_margin, want_grads = loss_and_grads(model(whole["input_ids"], whole["attention_mask"]).logits)
    torch.testing.assert_close(margin, want_margin, atol=1e-4, rtol=1e-4)
    assert float(loss) == pytest.approx(float(want_loss), abs=1e-5)
    assert {"score.weight", "scale"} <= set(grads) and len(grads) > 2
    for n, g in grads.items():
        assert float(g.abs().max()) > 0, n
        torch.testing.assert_close(g, want_grads[n], atol=1e-5, rtol=1e-3)


def test_score_of_a_batch_equals_each_answer_scored_alone(workdir):
    """reward.score groups a batch's answers by prompt and pads prompts of different lengths: each reward equals the
    same conversation scored alone."""
    model, tok = _scoring_model(workdir)
    convs = [p["prompt"] + [{"role": "assistant", "content": p[side]}]
             for p in _pairs(tok) for side in ("chosen", "rejected")]
    together = reward.score(model, tok, convs)
    alone = [reward.score(model, tok, [c])[0] for c in convs]
    assert together == pytest.approx(alone, abs=1e-4)
    assert len({round(x, 3) for x in together}) == 6
