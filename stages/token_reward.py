"""token_reward: a preference-grounded token-level reward model (seed 001) trained on the labelled pairs.

    dvc repro token_reward
    python -m stages.token_reward --model models/sft --prefs data/label/prefs.jsonl --out models/token_reward

A per-token reward on the SFT model (a LoRA adapter, a scalar head on each token's hidden state and a learned
multiple of the token's log-prob: posttrain.reward.RewardModel.token_rewards), trained so that the aggregate of its
token rewards (`token_reward.aggregator`: average, soft_max or soft_min) orders chosen over rejected
(Bradley-Terry). A held-out slice of the pairs (`heldout_fraction`, picked by id hash) measures pair accuracy under
each aggregator, before and after training, written to `metrics.json`. The model feeds TGDPO through
`guidance@token_reward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from posttrain import cli, config, io, modeling, preference, reward, training
from posttrain import token_reward as tr


@dataclass
class TokenRewardParams:
    aggregator: Literal["average", "soft_max", "soft_min"] = "average"
    """f in e_phi = f(r_1..r_T); averaging avoids a length bias (seed 001)."""
    tau: float = 1.0
    """Temperature of soft_max / soft_min."""
    heldout_fraction: float = 0.2
    lora: bool = True
    """Train a LoRA adapter of the SFT model (a few MB saved); false trains every weight (a 0.5 GB output)."""
    lora_params: training.LoraParams = field(default_factory=training.LoraParams)
    learning_rate: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 8
    logging_steps: int = 5

    def __post_init__(self) -> None:
        if self.tau <= 0 or self.learning_rate <= 0:
            raise ValueError("tau and learning_rate must be > 0")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@torch.no_grad()
def accuracy(model, tok, rows: list[dict], tau: float, batch_size: int = 16) -> dict[str, float]:
    """Held-out pair accuracy of e_phi(chosen) > e_phi(rejected) under each aggregator."""
    collate = preference.PairCollator(pad_token_id=tok.pad_token_id)
    right = {name: 0 for name in tr.AGGREGATORS}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        b = collate([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in chunk])
        r = tr.token_rewards(model, b)
        mask = b["completion_mask"].to(r.device).float()
        for name, f in tr.AGGREGATORS.items():
            e_w, e_l = f(r, mask, tau).chunk(2)
            right[name] += int((e_w > e_l).sum())
    return {f"heldout_accuracy_{k}": v / max(len(rows), 1) for k, v in right.items()}


def run(common, params: TokenRewardParams, args) -> dict:
    from datasets import Dataset
    from transformers import TrainingArguments

    pairs = io.read_jsonl(args.prefs, "prefs")
    device = modeling.device_for(common.device)
    tok = modeling.stage_tokenizer(args.model, padding_side="right")
    rows, dropped = preference.encoded_rows(tok, pairs, common.max_len, args.prefs)
    train = [r for r in rows if not preference.is_heldout(r["id"], params.heldout_fraction)]
    held = [r for r in rows if preference.is_heldout(r["id"], params.heldout_fraction)]
    torch.manual_seed(common.seed)
    model = reward.build(modeling.load_chain(args.model, device, common.trust_remote_code),
                         params.lora_params if params.lora else None)
    initial = accuracy(model.eval(), tok, held, params.tau)
    targs = TrainingArguments(
        output_dir=str(training.ckpt_dir(args.out)), learning_rate=params.learning_rate,
        num_train_epochs=params.epochs, per_device_train_batch_size=params.batch_size,
        logging_steps=params.logging_steps, seed=common.seed, remove_unused_columns=False,
        **training.device_args(device) | {"save_strategy": "no"})  # a few minutes; a checkpoint would be the whole LM
    trainer = tr.TokenRewardTrainer(
        model=model, args=targs, train_dataset=Dataset.from_list(train),
        data_collator=preference.PairCollator(pad_token_id=tok.pad_token_id),
        callbacks=[training.StopOnNaN()], aggregator=params.aggregator, tau=params.tau)
    training.log_lines(trainer, "token_reward")
    result = trainer.train()
    metrics = accuracy(model.eval(), tok, held, params.tau) | {
        f"{k}_initial": v for k, v in initial.items()} | {"scale": float(model.scale.detach())}
    resolved = {"token_reward": config.to_dict(params), "common": config.to_dict(common)}
    reward.save(model, args.out, args.model, resolved)
    metrics |= {"train_loss": result.training_loss, "train_pairs": len(train), "heldout_pairs": len(held)} | {
        f"dropped_{k}": v for k, v in dropped.items()}
    io.write_json(args.metrics, metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="backbone: the SFT model (checkpoint or adapter chain)")
    p.add_argument("--prefs", required=True, help="preference pairs (JSONL, schema `prefs`)")
    p.add_argument("--out", required=True, help="output folder: head.safetensors, backbone.json")
    p.add_argument("--metrics", required=True, help="metrics.json path")
    return cli.execute("token_reward", TokenRewardParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
