"""reward_model: a Bradley-Terry sequence reward model, trained with TRL's RewardTrainer.

    dvc repro reward_model
    python -m stages.reward_model --model models/sft --prefs data/prepare/rm_prefs.jsonl \
        --rm-samples data/generate/rm_samples.jsonl --samples data/generate/samples.jsonl \
        --out models/reward_model --metrics reports/reward_model/metrics.json

The SFT model with a LoRA adapter (`lora: false`: every weight), a scalar head on its last token's hidden state and
a learned multiple of its own log-likelihood of the conversation (`posttrain.reward.RewardModel`: why the
likelihood term, and what it starts from, is said there), trained with TRL's RewardTrainer on the pairs that play
the part of RLHF's human-labelled preference set, minus a held-out slice (`heldout_fraction`, by a hash of the prompt's
id):
- the SFT policy's own samples on the reward model's prompts (`--rm-samples`, from `generate`), ranked by the gold
  verifier as InstructGPT's labellers ranked their SFT model's outputs (`ranked_pairs`: every two responses to a
  prompt whose scores differ by at least `margin`). The judge thus learns the mistakes the policy makes, the ones
  `label` must tell apart (trained on solver answers over near misses instead, 0.72 of the pairs it kept agreed
  with the gold verifier: `git show 9f8a266:bench/results/label_reward_model.json`, measured at f042e70);
- and the offline pairs of `prepare` (`--prefs`, rm_prefs.jsonl: a user's own pairs, or near misses, `n_rm`).
Measured, in metrics.json:
- `heldout_accuracy`: r(chosen) > r(rejected) on the held-out pairs; `heldout_accuracy_initial` the same before
  training (the SFT model's own likelihood), so what training adds shows;
- `floor`: the reward that best tells the held-out chosen responses from the rejected ones (`reward.calibrate`,
  saved as calibration.json), and `floor_accuracy` the share of them it sorts right. `label` drops a pair whose
  chosen response scores below it (`label.reward_floor`): the judge's sign that both answers are bad;
- `verifier_agreement`: on the policy's own samples (the first `agreement_prompts` prompts of samples.jsonl), the
  share of response pairs with different gold scores that the reward model orders the same way as the verifier;
- `best_of_n_pass_rate` vs `mean_pass_rate`: gold pass rate of the reward model's top pick among each prompt's
  samples, against a random pick. This is what `label.judge: reward_model` will rely on.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from trl import RewardConfig, RewardTrainer

from posttrain import cli, config, io, modeling, preference, reward, tasks, training


@dataclass
class RewardModelParams:
    heldout_fraction: float = 0.2
    margin: float = 0.5
    """Ranked samples: a pair needs verifier scores this far apart (0.5: a right answer over a wrong one)."""
    lora: bool = True
    """Train a LoRA adapter of the SFT model (a few MB saved); false trains every weight (a 0.5 GB output)."""
    lora_params: training.LoraParams = field(default_factory=training.LoraParams)
    learning_rate: float = 3.0e-4
    epochs: float = 2.0
    batch_size: int = 8
    agreement_prompts: int = 100
    """Prompts of samples.jsonl scored for the verifier-agreement and best-of-N figures (0 = skip)."""
    logging_steps: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.learning_rate <= 0 or self.epochs <= 0:
            raise ValueError("learning_rate and epochs must be > 0")
        if self.agreement_prompts < 0:
            raise ValueError(f"agreement_prompts must be >= 0, got {self.agreement_prompts}")


def ranked_pairs(rows: list[dict], margin: float) -> tuple[list[dict], Counter]:
    """Preference pairs from sampled responses ranked by each prompt's gold verifier: every two distinct responses
    (by stripped text) whose scores differ by at least `margin`, the higher chosen. Each pair's `group` is its
    prompt's id, so all pairs of a prompt fall on the same side of the held-out split. Counted: rows without a
    verifier, empty responses, repeated responses, and prompts that gave no pair. A verifier spec that cannot score
    is a ValueError naming its row (1-based) and field."""
    pairs, counts = [], Counter()
    for i, row in enumerate(rows, start=1):
        if row.get("verifier") is None:
            counts["no_verifier"] += 1
            continue
        texts = [s for s in row["samples"] if s.strip()]
        counts["empty_response"] += len(row["samples"]) - len(texts)
        scored = {}
        for t in texts:
            if t.strip() in scored:
                counts["repeated_response"] += 1
                continue
            try:
                scored[t.strip()] = (tasks.score(row["verifier"], t), t)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"row {i}: field 'verifier': {e!r}") from e
        before = len(pairs)
        for (a, ta), (b, tb) in itertools.combinations(scored.values(), 2):
            if abs(a - b) >= margin:
                (hi, th), (lo, tl) = ((a, ta), (b, tb)) if a > b else ((b, tb), (a, ta))
                pairs.append({"id": f"{row['id']}:{len(pairs) - before}", "group": row["id"],
                              "prompt": row["messages"], "chosen": th, "rejected": tl, "chosen_score": hi,
                              "rejected_score": lo})
        counts["prompt_without_pair"] += len(pairs) == before
    return pairs, counts


def split_heldout(pairs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a hash of each pair's `group` (its prompt's id; the pair's own id where it has none)."""
    held = [preference.is_heldout(p.get("group", p["id"]), fraction) for p in pairs]
    return [p for p, h in zip(pairs, held, strict=True) if not h], [p for p, h in zip(pairs, held, strict=True) if h]


def _conversation(pair: dict, side: str) -> list[dict]:
    return pair["prompt"] + [{"role": "assistant", "content": pair[side]}]


def heldout_rewards(model, tok, pairs: list[dict], max_len: int) -> tuple[list[float], list[float]]:
    """(chosen rewards, rejected rewards), scored side by side so that a pair's prompt runs once for both."""
    r = reward.score(model, tok, [_conversation(p, s) for p in pairs for s in ("chosen", "rejected")], max_len=max_len)
    return r[0::2], r[1::2]


def accuracy(chosen: list[float], rejected: list[float]) -> float:
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(len(chosen), 1)


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


class PairRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer on `posttrain.preference.PairCollator` batches of `preference.encode`d pairs: the
    RewardModel's forward runs each prompt once for its chosen and rejected answers (TRL's own runs it twice, as two
    whole sequences), and the rewards leave the prompt's log-probs out, which cancel in r_chosen - r_rejected. The
    loss is TRL's, -log sigma(r_chosen - r_rejected)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # already encoded by preference.encode

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(**inputs)
        chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        m = self._metrics[mode]
        if mode == "train":  # tokens as TRL counts them: prompt + chosen, prompt + rejected
            self._total_train_tokens += int(2 * inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
        m["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            m["mean_reward"].append(outputs.logits.mean().item())
            m["accuracy"].append((chosen > rejected).float().mean().item())
            m["margin"].append((chosen - rejected).mean().item())
        return (loss, outputs) if return_outputs else loss


def run(common, params: RewardModelParams, args) -> dict:
    from datasets import Dataset

    offline = io.read_jsonl(args.prefs, "prefs", allow_empty=True)
    rm_rows = io.read_jsonl(args.rm_samples, "samples", allow_empty=True) if args.rm_samples else []
    try:
        ranked, counts = ranked_pairs(rm_rows, params.margin)
    except ValueError as e:
        raise io.InputError(f"{args.rm_samples}: {e}") from e
    pairs = ranked + offline
    if not pairs:  # a user's chat data brings no pairs: nothing to train, and label.judge: verifier needs none
        note = (f"{args.prefs} holds no preference pairs and the reward model's samples "
                f"({args.rm_samples or 'none given'}) gave none (they need verifiers): no reward model was trained; "
                "point --prefs at your own prompt/chosen/rejected pairs to use label.judge: reward_model")
        with io.atomic_dir(args.out) as tmp:
            io.write_json(tmp / "untrained.json", {"reason": note})
        metrics = {"train_pairs": 0}
        io.write_json(args.metrics, metrics)
        return metrics
    samples = io.read_jsonl(args.samples, "samples")[: params.agreement_prompts]
    device = modeling.device_for(common.device)
    tok = modeling.stage_tokenizer(args.model, padding_side="right")
    train, held = split_heldout(pairs, params.heldout_fraction)
    torch.manual_seed(common.seed)
    model = reward.build(modeling.load_chain(args.model, device, common.trust_remote_code),
                         params.lora_params if params.lora else None)
    initial = accuracy(*heldout_rewards(model.eval(), tok, held, common.max_len))
    try:
        rows, dropped = preference.encoded_rows(tok, train, common.max_len, args.rm_samples or args.prefs)
    except io.InputError as e:
        raise io.InputError(f"{e} (reward_model: the training pairs of --prefs and --rm-samples)") from e
    cfg = RewardConfig(
        output_dir=str(training.ckpt_dir(args.out)), learning_rate=params.learning_rate,
        num_train_epochs=params.epochs, per_device_train_batch_size=params.batch_size, max_length=common.max_len,
        logging_steps=params.logging_steps, seed=common.seed, remove_unused_columns=False,
        **training.device_args(device) | {"save_strategy": "no"})  # a few minutes; a checkpoint would be the whole LM
    trainer = PairRewardTrainer(
        model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
        data_collator=preference.PairCollator(pad_token_id=tok.pad_token_id), callbacks=[training.StopOnNaN()])
    training.log_lines(trainer, "reward_model")
    result = trainer.train()
    model.eval()
    chosen, rejected = heldout_rewards(model, tok, held, common.max_len)
    calibration = reward.calibrate(chosen, rejected) if held else None
    metrics = {"heldout_accuracy": accuracy(chosen, rejected), "heldout_accuracy_initial": initial,
               "scale": float(model.scale.detach()), "train_pairs": len(rows), "heldout_pairs": len(held),
               "ranked_pairs": len(ranked), "offline_pairs": len(offline),
               "train_loss": result.training_loss} | {f"ranked_{k}": v for k, v in counts.items()} | {
                   f"dropped_{k}": v for k, v in dropped.items()}
    metrics |= agreement(model, tok, samples, common.max_len, common.seed)
    resolved = {"reward_model": config.to_dict(params), "common": config.to_dict(common)}
    if calibration:
        metrics |= {"floor": calibration["threshold"], "floor_accuracy": calibration["accuracy"]}
    reward.save(model, args.out, args.model, resolved, calibration)
    io.write_json(args.metrics, metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="backbone: the SFT model (checkpoint or adapter chain)")
    p.add_argument("--prefs", required=True, help="offline training pairs (JSONL, schema `prefs`; may be empty)")
    p.add_argument("--rm-samples", help="the SFT policy's samples on the reward model's prompts (JSONL, schema "
                   "`samples`), ranked by their verifiers into training pairs")
    p.add_argument("--samples", required=True, help="the policy's samples (JSONL, schema `samples`), for agreement")
    p.add_argument("--out", required=True, help="output folder: adapter/, head.safetensors, backbone.json")
    p.add_argument("--metrics", required=True, help="metrics.json path")
    return cli.execute("reward_model", RewardModelParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
