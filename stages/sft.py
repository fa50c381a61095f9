"""sft: supervised fine-tuning with TRL's SFTTrainer, loss on the assistant tokens only.

    dvc repro sft
    python -m stages.sft --model models/base --data data/prepare/sft.jsonl --out models/sft

Rows are TRL prompt-completion pairs (prompt = the conversation up to the last assistant turn, completion = that
turn), rendered by the tokenizer's chat template, so the loss covers the answer and its end-of-turn token only.
With `sft.lora: true` the output is a LoRA adapter plus `chain.json` (a few MB instead of a 0.5 GB checkpoint).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from trl import SFTTrainer

from posttrain import cli, config, io, modeling, training


@dataclass
class SftParams:
    seed: int = 0
    """Seeds LoRA initialisation and batch order; `common.seed` drives the data."""
    lora: bool = True
    """LoRA adapter (small DVC output) or full fine-tune (a whole checkpoint)."""
    lora_params: training.LoraParams = field(default_factory=training.LoraParams)
    learning_rate: float = 3e-4
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    save_steps: int = 20
    """Checkpoint every N optimizer steps, so an interrupted run resumes from there."""
    logging_steps: int = 5

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.epochs <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("epochs must be > 0, batch_size and grad_accum >= 1")


def to_prompt_completion(rows: list[dict], tok, max_len: int) -> tuple[list[dict], Counter, int]:
    """TRL prompt-completion rows; dropped and counted: no final assistant turn, an empty one, longer than max_len
    (truncating would teach the model to stop mid-answer). Also the longest row's tokens: the max_len all need."""
    out, dropped, longest = [], Counter(), 0
    for r in rows:
        msgs = r["messages"]
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            dropped["no_assistant_answer"] += 1
            continue
        n = len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
        longest = max(longest, n)
        if n > max_len:
            dropped["too_long"] += 1
            continue
        out.append({"prompt": msgs[:-1], "completion": [msgs[-1]]})
    return out, dropped, longest


def shared_columns(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
    """How many leading columns of a right-padded batch every row has, with the same ids (the system prompt and
    template of a chat batch), and no label among them, so the first label is still predicted from the prefix's
    last position. 0 when fewer than 2 (nothing worth sharing) or for a single row."""
    if input_ids.size(0) < 2:
        return 0
    same = ((input_ids == input_ids[:1]) & (attention_mask == 1) & (labels == -100)).all(0)
    k = int(same.long().cumprod(0).sum())
    return k if k >= 2 else 0


class PrefixSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer whose forward runs the columns every row of a batch shares (`shared_columns`: the system
    prompt and template, about half of a default demo) once for the batch (`modeling.shared_cache`), the rest per
    row. The loss is TRL's negative log-likelihood of the completion tokens over `num_items_in_batch` (or the
    batch's completion tokens), so results equal TRL's forward up to float rounding; TRL's own path runs where this
    one does not apply (no shared columns, label smoothing, another loss_type, a custom loss, MoE aux loss,
    padding-free batches)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
        plain = (return_outputs or mask is None or labels is None or self.aux_loss_enabled
                 or self.compute_loss_func is not None or self.label_smoother is not None
                 or self.args.loss_type != "nll")
        k = 0 if plain else shared_columns(ids, mask, labels)
        if not k:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        cache, first = modeling.shared_cache(model, ids[:1, :k], ids.size(0))
        positions = torch.arange(k, ids.size(1), device=ids.device).expand(ids.size(0), -1)
        rest = model(input_ids=ids[:, k:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=False)
        # column j >= k is predicted by column j - 1: the prefix's last for j = k
        logits = torch.cat([first.expand(ids.size(0), -1, -1), rest.logits[:, :-1]], dim=1).float()
        target, valid = labels[:, k:], labels[:, k:] != -100
        logp = logits.log_softmax(-1)
        token_logp = torch.gather(logp, 2, target.clamp(min=0)[..., None]).squeeze(-1) * valid
        n = valid.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -token_logp.sum() / torch.as_tensor(n).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        with torch.no_grad():  # TRL's metrics: entropy and top-1 accuracy on the completion tokens
            n_valid = self.accelerator.gather_for_metrics(valid.sum()).sum()
            entropy = self.accelerator.gather_for_metrics((-(logp.exp() * logp).sum(-1) * valid).sum()).sum()
            correct = self.accelerator.gather_for_metrics(((logits.argmax(-1) == target) & valid).sum()).sum()
            m = self._metrics[mode]
            m["entropy"].append((entropy / n_valid).item() if n_valid > 0 else 0.0)
            m["mean_token_accuracy"].append((correct / n_valid).item() if n_valid > 0 else 0.0)
            if mode == "train":
                self._total_train_tokens += self.accelerator.gather_for_metrics(mask.sum()).sum().item()
            m["num_tokens"] = [self._total_train_tokens]
        return loss


def run(common, params: SftParams, args) -> dict:
    from datasets import Dataset
    from trl import SFTConfig

    rows = io.read_jsonl(args.data, "sft")
    device = modeling.device_for(common.device)
    tok = modeling.stage_tokenizer(args.model, padding_side="right")
    data, dropped, longest = to_prompt_completion(rows, tok, common.max_len)
    io.check_drops(args.data, len(rows), dropped, common.max_drop_share,
                   f"raise common.max_len from {common.max_len} to {longest} to keep every row (too_long)"
                   if dropped["too_long"] else "give each demo a non-empty final assistant turn")
    if not data:
        raise io.InputError(f"{args.data}: no usable row (dropped: {dict(dropped)}): each needs a non-empty final "
                            f"assistant turn within common.max_len={common.max_len} tokens")
    model, base, parents = training.policy_for_training(args.model, device, common.trust_remote_code)
    resolved = {"sft": config.to_dict(params), "common": config.to_dict(common)}
    ckpts = training.run_dir(args.out, resolved, [base, *parents, args.model, args.data, __file__, common.launcher])
    cfg = SFTConfig(
        output_dir=str(ckpts), learning_rate=params.learning_rate,
        num_train_epochs=params.epochs, per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum, max_length=common.max_len, completion_only_loss=True,
        logging_steps=params.logging_steps, save_steps=params.save_steps, seed=params.seed,
        lr_scheduler_type="cosine", **training.device_args(device))
    trainer = PrefixSFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok,
                               peft_config=training.lora_config(params.lora_params) if params.lora else None,
                               callbacks=[training.StopOnNaN()])
    training.log_lines(trainer, "sft")
    result = trainer.train(resume_from_checkpoint=training.resume_from(ckpts))
    training.save(trainer.model, args.out, base, parents, resolved)
    return {"train_loss": result.training_loss, "rows": len(data), "steps": result.global_step,
            "train_runtime_s": result.metrics.get("train_runtime", 0.0)} | {
        f"dropped_{k}": v for k, v in dropped.items()}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="input model: a checkpoint or an adapter chain")
    p.add_argument("--data", required=True, help="SFT demonstrations (JSONL, schema `sft`)")
    p.add_argument("--out", required=True, help="output adapter / checkpoint folder")
    return cli.execute("sft", SftParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
