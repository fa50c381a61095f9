"""dpo: preference optimisation of the SFT policy, one DVC stage per variant (`foreach` over `dpo.variants`).

    dvc repro dpo                      # every variant
    dvc repro dpo@tgdpo                # one variant
    python -m stages.dpo --variant dpo --model models/sft --prefs data/label/prefs.jsonl \
        --reference data/reference --guidance data/reference --out models/dpo/dpo

Each variant is `dpo.defaults` overridden by its row in `dpo.variants`; `loss` names a function of
`posttrain.losses.LOSSES`. Training is TRL's DPOTrainer subclassed in
`posttrain.preference` (only the loss is replaced); the reference per-token log-probs come from the `reference`
stage's cache and TGDPO's token guidance from `--guidance` (a `guidance` stage's folder; other losses ignore it).
The policy is a fresh LoRA adapter on the merged SFT weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from posttrain import cli, config, io, losses, modeling, preference, training


@dataclass
class VariantParams:
    loss: str = "dpo"
    """A key of posttrain.losses.LOSSES."""
    guidance: str = "data/reference"
    """TGDPO only: the guidance stage folder holding rhat.jsonl (dvc.yaml passes it; other losses ignore it)."""
    beta: float = 0.1
    """KL strength (DPO/TGDPO/KTO), 1/(2 tau) target (IPO), reward scale (SimPO), lambda (ORPO)."""
    alpha: float = 0.5
    """TGDPO: how strongly token guidance reshapes each token's beta; 0 is DPO exactly."""
    gamma: float = 0.5
    """SimPO: target reward margin."""
    length_normalize: bool = True
    """SimPO: average the log-prob over tokens."""
    desirable_weight: float = 1.0
    """KTO: weight of the desirable (chosen) term, lambda_D."""
    undesirable_weight: float = 1.0
    """KTO: weight of the undesirable (rejected) term, lambda_U."""
    dpop_lambda: float = 5.0
    """DPOP: weight of the penalty on the chosen log-ratio falling below 0 (outside beta, as seed 002 writes it)."""
    sft_weight: float = 0.5
    """Weight of an NLL term on the chosen responses (RPO); > 0 counters likelihood displacement."""
    learning_rate: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lora: bool = True
    lora_params: training.LoraParams = field(default_factory=training.LoraParams)
    save_steps: int = 20
    logging_steps: int = 5

    def __post_init__(self) -> None:
        if self.loss not in losses.LOSSES:
            raise ValueError(f"loss {self.loss!r} is not one of {sorted(losses.LOSSES)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.alpha <= 10:
            raise ValueError(f"alpha must be in [0, 10], got {self.alpha}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if min(self.sft_weight, self.desirable_weight, self.undesirable_weight, self.dpop_lambda) < 0:
            raise ValueError("sft_weight, desirable_weight, undesirable_weight and dpop_lambda must be >= 0")


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


def build_dataset(tok, pairs: list[dict], params: VariantParams, max_len: int, reference: Path, guidance: Path,
                  source: str):
    """Encoded pairs with their cached per-token reference log-probs (and r_hat for TGDPO) as columns."""
    from datasets import Dataset

    rows, dropped = preference.encoded_rows(tok, pairs, max_len, source)
    ref = preference.read_token_values(reference / "logps.jsonl")
    rhat = preference.read_token_values(guidance / "rhat.jsonl") if params.loss == "tgdpo" else None
    data = []
    for r in rows:
        if r["id"] not in ref or (rhat is not None and r["id"] not in rhat):
            raise io.InputError(f"{reference}: no cached values for pair id {r['id']!r}: re-run the reference and "
                                "guidance stages on this prefs file")
        row = r | {"ref_chosen_tok": ref[r["id"]]["chosen"], "ref_rejected_tok": ref[r["id"]]["rejected"]}
        if rhat is not None:
            row |= {"rhat_chosen_tok": rhat[r["id"]]["chosen"], "rhat_rejected_tok": rhat[r["id"]]["rejected"]}
        data.append(row)
    return Dataset.from_list(data), dropped


def make_trainer(model, tok, dataset, params: VariantParams, common, device, output_dir: str):
    from trl import DPOConfig

    cfg = DPOConfig(
        output_dir=output_dir, learning_rate=params.learning_rate, beta=params.beta,
        num_train_epochs=params.epochs, per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum, max_length=common.max_len, logging_steps=params.logging_steps,
        save_steps=params.save_steps, seed=common.seed, lr_scheduler_type="cosine", remove_unused_columns=False,
        **training.device_args(device))
    kwargs = {k: getattr(params, k) for k in losses.hyperparameters(params.loss)}
    return preference.PreferenceTrainer(
        model=model, args=cfg, train_dataset=dataset, processing_class=tok,
        data_collator=preference.PairCollator(pad_token_id=tok.pad_token_id),
        peft_config=training.lora_config(params.lora_params) if params.lora else None,
        callbacks=[training.StopOnNaN()], loss=params.loss, loss_kwargs=kwargs, sft_weight=params.sft_weight)


def run(common, params: VariantParams, args) -> dict:
    pairs = io.read_jsonl(args.prefs, "prefs")
    device = modeling.device_for(common.device)
    model, base, parents = training.policy_for_training(args.model, device, common.trust_remote_code)
    tok = modeling.stage_tokenizer(base, padding_side="right")
    dataset, dropped = build_dataset(tok, pairs, params, common.max_len, Path(args.reference),
                                      Path(args.guidance), args.prefs)
    trainer = make_trainer(model, tok, dataset, params, common, device, str(training.ckpt_dir(args.out)))
    result = trainer.train(resume_from_checkpoint=training.resume_from(args.out))
    training.save(trainer.model, args.out, base, parents,
                  {"dpo": config.to_dict(params), "variant": args.variant, "common": config.to_dict(common)})
    log = training.train_log(trainer)
    keep = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    return {"train_loss": result.training_loss, "pairs": len(dataset), "steps": result.global_step,
            "train_runtime_s": result.metrics.get("train_runtime", 0.0)} | {
        f"dropped_{k}": v for k, v in dropped.items()} | {
        f"final_{k.replace('/', '_')}": log[-1][k] for k in keep if log and k in log[-1]}


def _block(args):
    common, params = config.load(DpoParams, "dpo", args.params)
    return common, resolve(params, args.variant, args.params)


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--variant", required=True, help="a key of dpo.variants")
    p.add_argument("--model", required=True, help="policy to start from (and reference): checkpoint or chain")
    p.add_argument("--prefs", required=True, help="preference pairs (JSONL, schema `prefs`)")
    p.add_argument("--reference", required=True, help="the reference stage's folder (logps.jsonl)")
    p.add_argument("--guidance", required=True, help="TGDPO: a guidance stage's folder (rhat.jsonl)")
    p.add_argument("--out", required=True, help="output adapter / checkpoint folder")
    args = p.parse_args(argv)
    return cli.execute("dpo", VariantParams, args, run, run_name=f"dpo@{args.variant}", block=_block)


if __name__ == "__main__":
    main()
