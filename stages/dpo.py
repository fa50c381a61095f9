"""dpo: preference optimisation of the SFT policy, one DVC stage per variant (`foreach` over `dpo.variants`).

    dvc repro dpo                      # every variant
    dvc repro dpo@dpo                  # one variant
    python -m stages.dpo --variant dpo --model models/sft --prefs data/label/prefs.jsonl --out models/dpo/dpo

Each variant is `dpo.defaults` overridden by its row in `dpo.variants`. Training is TRL's DPOTrainer with the
reference log-probs precomputed once before the first step; the policy starts from the SFT model, which is also
the reference (a fresh LoRA adapter on the merged SFT weights: disabling it gives the reference back).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from posttrain import cli, config, io, modeling, training

LOSS_TYPES = {"dpo": ["sigmoid"]}


@dataclass
class VariantParams:
    loss: Literal["dpo"] = "dpo"
    beta: float = 0.1
    """KL strength: higher keeps the policy nearer the reference."""
    sft_weight: float = 0.0
    """Weight of an NLL term on the chosen responses (RPO); > 0 counters likelihood displacement."""
    learning_rate: float = 5e-5
    epochs: float = 2.0
    batch_size: int = 8
    grad_accum: int = 1
    lora: bool = True
    lora_params: training.LoraParams = field(default_factory=training.LoraParams)
    save_steps: int = 20
    logging_steps: int = 5

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")


@dataclass
class DpoParams:
    defaults: VariantParams = field(default_factory=VariantParams)
    variants: dict[str, dict] = field(default_factory=lambda: {"dpo": {}})
    """Variant name -> overrides of `defaults`; each becomes the DVC stage dpo@<name>."""


def resolve(params: DpoParams, variant: str, where: str) -> VariantParams:
    if variant not in params.variants:
        raise config.ParamsError(f"{where}: dpo.variants: no variant {variant!r}; known: {sorted(params.variants)}")
    merged = dataclasses.asdict(params.defaults) | (params.variants[variant] or {})
    return config.parse(VariantParams, merged, f"{where}: dpo.variants.{variant}")


def to_trl_rows(pairs: list[dict]) -> list[dict]:
    return [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]


def run(common, params: VariantParams, args) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = io.read_jsonl(args.prefs, "prefs")
    device = modeling.device_for(common.device)
    model, base, parents = training.policy_for_training(args.model, device, common.trust_remote_code)
    tok = modeling.load_tokenizer(base, padding_side="right")
    modeling.check_template(tok)
    losses = LOSS_TYPES[params.loss] + (["sft"] if params.sft_weight > 0 else [])
    weights = [1.0] + ([params.sft_weight] if params.sft_weight > 0 else [])
    cfg = DPOConfig(
        output_dir=str(training.ckpt_dir(args.out)), learning_rate=params.learning_rate, beta=params.beta,
        loss_type=losses, loss_weights=weights, num_train_epochs=params.epochs,
        per_device_train_batch_size=params.batch_size, gradient_accumulation_steps=params.grad_accum,
        max_length=common.max_len, precompute_ref_log_probs=True, logging_steps=params.logging_steps,
        save_steps=params.save_steps, seed=common.seed, lr_scheduler_type="cosine",
        **training.device_args(device))
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(to_trl_rows(pairs)),
                         processing_class=tok,
                         peft_config=training.lora_config(params.lora_params) if params.lora else None,
                         callbacks=[training.StopOnNaN()])
    result = trainer.train(resume_from_checkpoint=training.resume_from(args.out))
    training.save(trainer.model, args.out, base, parents,
                  {"dpo": config.to_dict(params), "variant": args.variant, "common": config.to_dict(common)})
    last = training.train_log(trainer)[-1] if training.train_log(trainer) else {}
    keep = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    return {"train_loss": result.training_loss, "pairs": len(pairs), "steps": result.global_step,
            "train_runtime_s": result.metrics.get("train_runtime", 0.0)} | {
        f"final_{k.replace('/', '_')}": last[k] for k in keep if k in last}


def _block(args):
    common, params = config.load(DpoParams, "dpo", args.params)
    return common, resolve(params, args.variant, args.params)


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--variant", required=True, help="a key of dpo.variants")
    p.add_argument("--model", required=True, help="policy to start from (and reference): checkpoint or chain")
    p.add_argument("--prefs", required=True, help="preference pairs (JSONL, schema `prefs`)")
    p.add_argument("--out", required=True, help="output adapter / checkpoint folder")
    args = p.parse_args(argv)
    return cli.execute("dpo", VariantParams, args, run, run_name=f"dpo@{args.variant}", block=_block)


if __name__ == "__main__":
    main()
