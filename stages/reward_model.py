"""reward_model: a Bradley-Terry sequence reward model, trained with TRL's RewardTrainer.

    dvc repro reward_model
    python -m stages.reward_model --model models/sft --prefs data/prepare/rm_prefs.jsonl \
        --samples data/generate/samples.jsonl --out models/reward_model --metrics reports/reward_model/metrics.json

The SFT model with a LoRA adapter (`lora: false`: every weight), a scalar head on its last token's hidden state and
a learned multiple of its own log-likelihood of the conversation (`posttrain.reward.RewardModel`: why the
likelihood term, and what it starts from, is said there), trained with TRL's RewardTrainer on the offline pairs of
`prepare` (rm_prefs.jsonl: the role a human-labelled preference set plays in RLHF) minus a held-out slice
(`heldout_fraction`, by id hash). Measured, in metrics.json:
- `heldout_accuracy`: r(chosen) > r(rejected) on the held-out pairs; `heldout_accuracy_initial` the same before
  training (the SFT model's own likelihood), so what training adds shows;
- `verifier_agreement`: on the policy's own samples (the first `agreement_prompts` prompts of samples.jsonl), the
  share of response pairs with different gold scores that the reward model orders the same way as the verifier;
- `best_of_n_pass_rate` vs `mean_pass_rate`: gold pass rate of the reward model's top pick among each prompt's
  samples, against a random pick. This is what `label.judge: reward_model` will rely on.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain import cli, config, io, modeling, preference, reward, tasks, training


@dataclass
class RewardModelParams:
    heldout_fraction: float = 0.2
    lora: bool = True
    """Train a LoRA adapter of the SFT model (a few MB saved); false trains every weight (a 0.5 GB output)."""
    lora_params: training.LoraParams = field(default_factory=training.LoraParams)
    learning_rate: float = 1.0e-4
    epochs: float = 1.0
    batch_size: int = 8
    agreement_prompts: int = 100
    """Prompts of samples.jsonl scored for the verifier-agreement and best-of-N figures (0 = skip)."""
    logging_steps: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.learning_rate <= 0 or self.epochs <= 0:
            raise ValueError("learning_rate and epochs must be > 0")
        if self.agreement_prompts < 0:
            raise ValueError(f"agreement_prompts must be >= 0, got {self.agreement_prompts}")


def _conversation(pair: dict, side: str) -> list[dict]:
    return pair["prompt"] + [{"role": "assistant", "content": pair[side]}]


def heldout_accuracy(model, tok, pairs: list[dict], max_len: int) -> float:
    chosen = reward.score(model, tok, [_conversation(p, "chosen") for p in pairs], max_len=max_len)
    rejected = reward.score(model, tok, [_conversation(p, "rejected") for p in pairs], max_len=max_len)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(len(pairs), 1)


def agreement(model, tok, rows: list[dict], max_len: int, seed: int) -> dict[str, float]:
    """Pairwise ordering agreement with the gold verifier, and best-of-N by reward vs a random pick."""
    rng = random.Random(seed)
    groups = [(row, [s for s in row["samples"] if s.strip()]) for row in rows if row["verifier"] is not None]
    groups = [(row, texts) for row, texts in groups if texts]
    flat = [row["messages"] + [{"role": "assistant", "content": s}] for row, texts in groups for s in texts]
    rewards = iter(reward.score(model, tok, flat, max_len=max_len))  # one batched pass over every sample
    agree = total = 0
    best = mean = 0.0
    for row, texts in groups:
        gold = [tasks.score(row["verifier"], s) for s in texts]
        r = [next(rewards) for _ in texts]
        for i, j in itertools.combinations(range(len(texts)), 2):
            if gold[i] != gold[j]:
                total += 1
                agree += (gold[i] > gold[j]) == (r[i] > r[j])
        top = max(range(len(texts)), key=lambda k: (r[k], -k))
        best += gold[top] == 1.0
        mean += gold[rng.randrange(len(texts))] == 1.0
    n = max(len(groups), 1)
    return {"verifier_agreement": agree / max(total, 1), "agreement_pairs": total,
            "best_of_n_pass_rate": best / n, "mean_pass_rate": mean / n, "agreement_prompts": len(groups)}


def run(common, params: RewardModelParams, args) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    empty = Path(args.prefs).is_file() and not Path(args.prefs).read_text(encoding="utf-8").strip()
    pairs = [] if empty else io.read_jsonl(args.prefs, "prefs")
    if not pairs:  # a user's chat data brings no pairs: nothing to train, and label.judge: verifier needs none
        note = (f"{args.prefs} holds no preference pairs (prepare writes them for the builtin tasks only): no reward "
                "model was trained; point --prefs at your own prompt/chosen/rejected pairs to use label.judge: "
                "reward_model")
        with io.atomic_dir(args.out) as tmp:
            io.write_json(tmp / "untrained.json", {"reason": note})
        metrics = {"train_pairs": 0}
        io.write_json(args.metrics, metrics)
        return metrics
    samples = io.read_jsonl(args.samples, "samples")[: params.agreement_prompts]
    device = modeling.device_for(common.device)
    tok = modeling.stage_tokenizer(args.model, padding_side="right")
    train = [p for p in pairs if not preference.is_heldout(p["id"], params.heldout_fraction)]
    held = [p for p in pairs if preference.is_heldout(p["id"], params.heldout_fraction)]
    torch.manual_seed(common.seed)
    model = reward.build(modeling.load_chain(args.model, device, common.trust_remote_code),
                         params.lora_params if params.lora else None)
    initial = heldout_accuracy(model.eval(), tok, held, common.max_len)
    data = Dataset.from_list([{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in train])
    cfg = RewardConfig(
        output_dir=str(training.ckpt_dir(args.out)), learning_rate=params.learning_rate,
        num_train_epochs=params.epochs, per_device_train_batch_size=params.batch_size, max_length=common.max_len,
        logging_steps=params.logging_steps, seed=common.seed,
        **training.device_args(device) | {"save_strategy": "no"})  # a few minutes; a checkpoint would be the whole LM
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                            callbacks=[training.StopOnNaN()])
    result = trainer.train()
    model.eval()
    metrics = {"heldout_accuracy": heldout_accuracy(model, tok, held, common.max_len),
               "heldout_accuracy_initial": initial, "scale": float(model.scale.detach()), "train_pairs": len(train),
               "heldout_pairs": len(held), "train_loss": result.training_loss}
    metrics |= agreement(model, tok, samples, common.max_len, common.seed)
    resolved = {"reward_model": config.to_dict(params), "common": config.to_dict(common)}
    reward.save(model, args.out, args.model, resolved)
    io.write_json(args.metrics, metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="backbone: the SFT model (checkpoint or adapter chain)")
    p.add_argument("--prefs", required=True, help="training pairs (JSONL, schema `prefs`)")
    p.add_argument("--samples", required=True, help="the policy's samples (JSONL, schema `samples`), for agreement")
    p.add_argument("--out", required=True, help="output folder: adapter/, head.safetensors, backbone.json")
    p.add_argument("--metrics", required=True, help="metrics.json path")
    return cli.execute("reward_model", RewardModelParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
