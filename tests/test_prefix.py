"""The forwards that run what a batch shares once give what the plain forwards give: the SFT trainer's loss and
gradients against TRL's SFTTrainer, the preference pair's against TRL's concatenated forward, the sampler's tokens
against `generate` on the repeated, left-padded prompts. (The reward models': tests/test_reward.py.)"""

import pytest
import torch

from posttrain import modeling, training


def test_prefix_sft_trainer_equals_trls_loss_and_gradients(workdir, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stages import sft

    tok = modeling.load_tokenizer(workdir / "models/base", padding_side="right")
    system = {"role": "system", "content": "You are a careful calculator. Reply with only the number."}
    demos = [("What is 2 + 2?", "4"), ("What is 123 + 456?", "579"), ("Add 7 and 8, please.", "It is 15"),
             ("What is 10 + 5?", "15")]
    data = [{"prompt": [system, {"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in demos]
    torch.manual_seed(0)
    model = modeling.load_chain(workdir / "models/base")
    cfg = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_length=96,
                    completion_only_loss=True, **training.device_args(torch.device("cpu")))
    trainer = sft.PrefixSFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok,
                                   peft_config=training.lora_config(training.LoraParams(r=4, alpha=8)))
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # LoRA B starts at 0: make the adapter act, so its A gets a gradient
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    k = sft.shared_columns(batch["input_ids"], batch["attention_mask"], batch["labels"])
    first_label = int((batch["labels"] != -100).long().argmax(1).min())
    assert 10 < k <= first_label and len(set(batch["attention_mask"].sum(1).tolist())) > 1  # shared, padded

    def loss_and_grads(compute):
        trainer.model.zero_grad()
        loss = compute(trainer, trainer.model, dict(batch), num_items_in_batch=torch.tensor(7))
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    got, got_grads = loss_and_grads(sft.PrefixSFTTrainer.compute_loss)
    want, want_grads = loss_and_grads(SFTTrainer.compute_loss)
    assert got == pytest.approx(want, rel=1e-5) and got > 0
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 4
    for n, g in got_grads.items():
        assert float(g.abs().max()) > 0, n
        torch.testing.assert_close(g, want_grads[n], atol=1e-6, rtol=1e-3)
    # its metrics are TRL's: the same token accuracy as TRL logged for the batch
    m = trainer._metrics["train"]
    assert m["mean_token_accuracy"][0] == pytest.approx(m["mean_token_accuracy"][1], abs=1e-6)
    assert m["entropy"][0] == pytest.approx(m["entropy"][1], rel=1e-4)


def test_shared_columns_stop_at_a_difference_a_pad_or_a_label():
    from stages import sft

    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 3, 9, 5, 6], [1, 2, 3, 4, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    none = torch.full(ids.shape, -100)
    assert sft.shared_columns(ids, mask, none) == 3  # column 3 differs (4, 9, 4)
    labels = none.clone()
    labels[2, 2] = 3
    assert sft.shared_columns(ids, mask, labels) == 2  # a label at column 2: it must be predicted from column 1
    assert sft.shared_columns(ids[:, :4], torch.tensor([[1, 0, 0, 0]] * 3), none[:, :4]) == 0  # 1 column: none
    assert sft.shared_columns(ids[:1], mask[:1], none[:1]) == 0  # one row: nothing to share


def test_shared_prompt_forward_equals_the_concatenated_forward(workdir):
    """pair_logps runs each prompt once (KV cache repeated for both completions): same log-probs and gradients
    as TRL's concatenated [prompt + chosen; prompt + rejected] forward, with prompts of different lengths."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from posttrain import preference

    tok = modeling.load_tokenizer(workdir / "models/base", padding_side="right")
    model = modeling.load_chain(workdir / "models/base")
    pairs = [{"id": str(i), "prompt": [{"role": "user", "content": "What is 1 + 2?" + " Go on." * i}],
              "chosen": "3", "rejected": f"It is {i} or so"} for i in range(3)]
    rows, _ = preference.encoded_rows(tok, pairs, 96, "x")
    plain = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=96)(
        [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
    logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits[:, :-1]
    want = torch.gather(logits.log_softmax(-1), 2, plain["input_ids"][:, 1:, None]).squeeze(-1)
    shift = plain["completion_mask"][:, 1:].bool()
    want.masked_fill(~shift, 0).sum().backward()
    grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    model.zero_grad()
    batch = preference.PairCollator(tok.pad_token_id)([{k: r[k] for k in ("prompt_ids", "chosen_ids",
                                                                          "rejected_ids")} for r in rows])
    assert batch["prompt_mask"].sum(-1).unique().numel() == 3, "prompts of three lengths (left padding)"
    assert batch["prefix_len"] > 5, "the template and question the prompts share run once"
    got = preference.pair_logps(model, batch)
    for i in range(len(rows) * 2):
        n = int(batch["completion_mask"][i].sum())
        assert torch.allclose(got[i, :n], want[i][shift[i]], atol=1e-5)
    got.sum().backward()
    for k, v in model.named_parameters():  # float rounding only: relative to each tensor's largest entry
        assert (v.grad - grads[k]).abs().max() <= 1e-5 * grads[k].abs().max(), k


def test_shared_prefill_sampling_matches_plain_generate(workdir):
    """Prefilling what the prompts share once, each prompt's own tokens once, and repeating the cache gives the
    tokens generate gives for the repeated, left-padded prompts."""
    from posttrain import sampling

    tok = modeling.load_tokenizer(workdir / "models/base")
    model = modeling.load_chain(workdir / "models/base")
    prompts = [[{"role": "user", "content": "What is 12 + 30?"}], [{"role": "user", "content": "Hi"}]]
    texts = [modeling.render_prompt(tok, p) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for n in (1, 3):
        rows = tok(texts, add_special_tokens=False).input_ids
        shared, width = sampling._generate_shared_prefill(model, rows, tok.pad_token_id, n, **kw)
        plain = model.generate(input_ids=enc.input_ids.repeat_interleave(n, 0),
                               attention_mask=enc.attention_mask.repeat_interleave(n, 0), **kw)
        assert width == enc.input_ids.shape[1] and torch.equal(shared[:, width:], plain[:, width:])
