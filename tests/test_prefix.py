"""The training forwards that run a batch's shared prefix once give TRL's own losses and gradients: the SFT
trainer's (columns every row shares run once) against TRL's SFTTrainer on the same batch."""

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
