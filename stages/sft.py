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


def run(common, params: SftParams, args) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

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
    cfg = SFTConfig(
        output_dir=str(training.ckpt_dir(args.out)), learning_rate=params.learning_rate,
        num_train_epochs=params.epochs, per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum, max_length=common.max_len, completion_only_loss=True,
        logging_steps=params.logging_steps, save_steps=params.save_steps, seed=params.seed,
        lr_scheduler_type="cosine", **training.device_args(device))
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok,
                         peft_config=training.lora_config(params.lora_params) if params.lora else None,
                         callbacks=[training.StopOnNaN()])
    training.log_lines(trainer, "sft")
    result = trainer.train(resume_from_checkpoint=training.resume_from(args.out))
    training.save(trainer.model, args.out, base, parents,
                  {"sft": config.to_dict(params), "common": config.to_dict(common)})
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
