"""dpo: preference optimisation of the SFT policy, one DVC stage per variant (`foreach` over `dpo.variants`).

    dvc repro dpo                      # every variant
    dvc repro dpo@tgdpo                # one variant
    python -m stages.dpo --variant dpo --model models/sft --prefs data/label/prefs.jsonl \
        --step-prefs data/label/step_prefs.jsonl --reference data/reference --guidance data/reference \
        --out models/dpo/dpo

Each row of `dpo.variants` names a `loss` of `posttrain.losses.LOSSES` and gives that loss's hyper-parameters
(parsed into the loss's own params dataclass, whose defaults fill the rest); the training knobs every row shares
are `dpo.defaults`. dvc.yaml makes dpo@<row> depend on `dpo.defaults` and its own row only. Training is TRL's
DPOTrainer subclassed here (`PreferenceTrainer`: only the loss is replaced); the reference per-token log-probs come
from the `reference` stage's cache and a guided loss's token guidance from `--guidance` (a `guidance` stage's
folder; other losses ignore it). The policy is a fresh LoRA adapter on the merged SFT weights, seeded by
`dpo.defaults.seed`. A row's `pairs` chooses what it trains on: `response` (label's prefs.jsonl, the default) or
`step` (label's Step-DPO pairs, step_prefs.jsonl, with the reference stage's step_logps.jsonl). Beside the adapter
the model folder holds `train_metrics.json`: the final reward accuracy and margin on its own pairs, the pair and step
counts (DVC's run cache restores it with the model, so a benchmark reads it from any experiment).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, get_args

import torch
from trl import DPOTrainer

from posttrain import cli, config, io, losses, modeling, preference, training

PairsName = Literal["response", "step"]
PAIRS: tuple[str, ...] = get_args(PairsName)
"""What a row trains on (`pairs`): label's response-level pairs, or its Step-DPO pairs."""


@dataclass
class TrainParams:
    """The training knobs every row shares (`dpo.defaults`); a row may override any of them."""

    seed: int = 0
    """Seeds LoRA initialisation and batch order; `common.seed` drives the data. Multi-seed runs vary this one
    (`dvc exp run -S dpo.defaults.seed=1`): every row re-trains on the same pairs and caches."""
    learning_rate: float = 3e-5
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lora: bool = True
    lora_params: training.LoraParams = field(default_factory=training.LoraParams)
    save_steps: int = 20
    logging_steps: int = 5

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.epochs <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("epochs must be > 0, batch_size and grad_accum >= 1")


@dataclass
class VariantParams(TrainParams):
    """One row of `dpo.variants`, resolved: what dpo@<row> trains with."""

    loss: str = "dpo"
    """A key of posttrain.losses.LOSSES."""
    guidance: str = "data/reference"
    """A guided loss's guidance stage folder holding rhat.jsonl (dvc.yaml passes it; other losses ignore it)."""
    loss_params: Any = None
    """An instance of LOSSES[loss].params; None takes that loss's defaults."""
    pairs: PairsName = "response"
    """`response`: label's response-level pairs (--prefs); `step`: its Step-DPO pairs (--step-prefs), prompts
    ending in the correct steps before the first wrong one."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in losses.LOSSES:
            raise ValueError(f"loss {self.loss!r} is not one of {sorted(losses.LOSSES)}")
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {list(PAIRS)}, got {self.pairs!r}")
        if self.pairs == "step" and losses.LOSSES[self.loss].guided:
            raise ValueError(f"loss {self.loss!r} reads token guidance, and no guidance stage covers the step pairs: "
                             "a `pairs: step` row takes an unguided loss")
        cls = losses.LOSSES[self.loss].params
        if self.loss_params is None:
            self.loss_params = cls()
        if type(self.loss_params) is not cls:
            raise ValueError(f"loss_params of loss {self.loss!r} must be a {cls.__name__}, got {self.loss_params!r}")


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainParams))


@dataclass
class DpoParams:
    defaults: TrainParams = field(default_factory=TrainParams)
    """The training knobs every row shares."""
    variants: dict[str, dict] = field(default_factory=lambda: {"dpo": {"loss": "dpo", "guidance": "data/reference"}})
    """Row name -> `loss` (a key of LOSSES), `guidance`, `pairs` (response | step), and that loss's
    hyper-parameters where they differ from its params dataclass (or a training knob of this row); each row becomes
    the DVC stage dpo@<name>."""


def resolve(params: DpoParams, variant: str, where: str) -> VariantParams:
    """Row `variant` of `params`: its loss's params dataclass parsed from the row's own keys, its training knobs
    the shared block's with the row's overrides. A key neither its loss nor training reads is refused."""
    if variant not in params.variants:
        raise config.ParamsError(f"{where}: dpo.variants: no variant {variant!r}; known: {sorted(params.variants)}")
    at = f"{where}: dpo.variants.{variant}"
    row = dict(params.variants[variant] or {})
    name = row.pop("loss", None)
    if name not in losses.LOSSES:
        raise config.ParamsError(f"{at}.loss: {name!r} is not one of {sorted(losses.LOSSES)}")
    guidance = row.pop("guidance", "data/reference")
    pairs = row.pop("pairs", "response")
    if pairs not in PAIRS:
        raise config.ParamsError(f"{at}.pairs: {pairs!r} is not one of {list(PAIRS)}")
    if pairs == "step" and losses.LOSSES[name].guided:
        raise config.ParamsError(f"{at}: loss {name!r} reads token guidance, and no guidance stage covers the step "
                                 "pairs: a `pairs: step` row takes an unguided loss")
    cls = losses.LOSSES[name].params
    loss_keys = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(row) - set(loss_keys) - set(TRAIN_KEYS))
    if unknown:
        raise config.ParamsError(f"{at}: unknown key(s) {unknown}; loss {name!r} reads {loss_keys}, and a row may "
                                 f"override the training knobs {list(TRAIN_KEYS)}")
    hyper = config.parse(cls, {k: v for k, v in row.items() if k in loss_keys}, at)
    train = config.parse(TrainParams, config.to_dict(params.defaults) | {
        k: v for k, v in row.items() if k in TRAIN_KEYS}, at)
    return VariantParams(**vars(train), loss=name, guidance=guidance, loss_params=hyper, pairs=pairs)


def build_dataset(tok, pairs: list[dict], params: VariantParams, max_len: int, reference: Path, guidance: Path,
                  source: str):
    """Encoded pairs with their cached per-token reference log-probs (and r_hat for a guided loss) as columns; a
    `pairs: step` row's from the reference stage's step_logps.jsonl."""
    from datasets import Dataset

    rows, dropped = preference.encoded_rows(tok, pairs, max_len, source)
    cache = reference / ("step_logps.jsonl" if params.pairs == "step" else "logps.jsonl")
    if params.pairs == "step" and not cache.exists():
        raise io.InputError(f"{cache}: no such file: re-run the reference stage with --step-prefs on label's "
                            "step_prefs.jsonl")
    ref = preference.read_token_values(cache)
    guided = losses.LOSSES[params.loss].guided
    rhat = preference.read_token_values(guidance / "rhat.jsonl") if guided else None
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


class PreferenceTrainer(DPOTrainer):
    """TRL's DPOTrainer with the loss taken from `posttrain.losses.LOSSES` and the reference read from the cache.

    The dataset is already encoded (`encode`) and carries per-token `ref_*_tok` (and for TGDPO `rhat_*_tok`)
    columns; only the policy runs at each step. The step's loss is `LOSSES[loss].fn` with `loss_params` (an
    instance of that row's params dataclass), and nothing else: a row is the loss its name says.
    """

    def __init__(self, *args, loss: str, loss_params: Any, **kwargs):
        self.loss_name, self.loss_params = loss, loss_params
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # encoded by posttrain.preference.encode, the same function that built the cache

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", *preference.TOKEN_COLUMNS]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        logps = preference.pair_logps(model, inputs)  # (2B, C): batch is [chosen, rejected]
        mask = inputs["completion_mask"].to(logps.dtype)
        ref = inputs["ref_tok"].to(logps.dtype) if "ref_tok" in inputs else torch.zeros_like(logps)
        rhat = inputs["rhat_tok"].to(logps.dtype) if "rhat_tok" in inputs else None
        c = lambda t: t.chunk(2, dim=0)  # noqa: E731
        (pc, pr), (rc, rr), (mc, mr) = c(logps), c(ref), c(mask)
        rhat_c, rhat_r = c(rhat) if rhat is not None else (None, None)
        batch = losses.PairBatch(pc, pr, rc, rr, mc, mr, rhat_c, rhat_r, inputs["shared_mask"].to(logps))
        per_example, chosen_rewards, rejected_rewards = losses.LOSSES[self.loss_name].fn(batch, self.loss_params)
        loss = per_example.mean()
        m = self._metrics[mode]
        m["rewards/chosen"].append(chosen_rewards.mean().item())
        m["rewards/rejected"].append(rejected_rewards.mean().item())
        m["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        m["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        # likelihood displacement (seed 002 section 6.8): watch the chosen log-prob fall along with the rejected
        m["logps/chosen"].append(pc.sum(-1).mean().item())
        m["logps/rejected"].append(pr.sum(-1).mean().item())
        if mode == "train":  # tokens as TRL counts them: prompt + chosen, prompt + rejected
            self._total_train_tokens += int(2 * inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
        m["num_tokens"] = [self._total_train_tokens]
        return (loss, SimpleNamespace(logits=logps)) if return_outputs else loss


def make_trainer(model, tok, dataset, params: VariantParams, common, device, output_dir: str):
    from trl import DPOConfig

    cfg = DPOConfig(
        output_dir=output_dir, learning_rate=params.learning_rate, num_train_epochs=params.epochs,
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum, max_length=common.max_len, logging_steps=params.logging_steps,
        save_steps=params.save_steps, seed=params.seed, lr_scheduler_type="cosine", remove_unused_columns=False,
        **training.device_args(device))
    return PreferenceTrainer(
        model=model, args=cfg, train_dataset=dataset, processing_class=tok,
        data_collator=preference.PairCollator(pad_token_id=tok.pad_token_id),
        peft_config=training.lora_config(params.lora_params) if params.lora else None,
        callbacks=[training.StopOnNaN()], loss=params.loss, loss_params=params.loss_params)


def run(common, params: VariantParams, args) -> dict:
    prefs = _prefs_file(params, args)
    pairs = io.read_jsonl(prefs, "prefs")
    device = modeling.device_for(common.device)
    model, base, parents = training.policy_for_training(args.model, device, common.trust_remote_code)
    tok = modeling.stage_tokenizer(base, padding_side="right")
    dataset, dropped = build_dataset(tok, pairs, params, common.max_len, Path(args.reference),
                                      Path(args.guidance), prefs)
    resolved = {"dpo": config.to_dict(params), "variant": args.variant, "common": config.to_dict(common)}
    ckpts = training.run_dir(args.out, resolved, [base, *parents, args.model, prefs, args.reference,
                                                  args.guidance, __file__, common.launcher])
    trainer = make_trainer(model, tok, dataset, params, common, device, str(ckpts))
    training.log_lines(trainer, f"dpo@{args.variant}")
    result = trainer.train(resume_from_checkpoint=training.resume_from(ckpts))
    log = training.train_log(trainer)
    keep = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    summary = {"train_loss": result.training_loss, "pairs": len(dataset), "steps": result.global_step} | {
        f"dropped_{k}": v for k, v in dropped.items()} | {
        f"final_{k.replace('/', '_')}": log[-1][k] for k in keep if log and k in log[-1]}
    training.save(trainer.model, args.out, base, parents, resolved, summary)
    return summary | {"train_runtime_s": result.metrics.get("train_runtime", 0.0)}


def _prefs_file(params: VariantParams, args) -> str:
    """The pairs this row trains on: --prefs, or for a `pairs: step` row --step-prefs, which label writes only with
    label.step_pairs and at least one step pair."""
    if params.pairs == "response":
        return args.prefs
    if args.step_prefs is None or not Path(args.step_prefs).exists():
        raise io.InputError(f"dpo@{args.variant}: pairs: step, and there are no step pairs ({args.step_prefs}): "
                            "set label.step_pairs: true on worked tasks (profiles/long.yaml), or drop this row")
    return args.step_prefs


def _block(args):
    common, params = config.load(DpoParams, "dpo", args.params)
    return common, resolve(params, args.variant, args.params)


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--variant", required=True, help="a key of dpo.variants")
    p.add_argument("--model", required=True, help="policy to start from (and reference): checkpoint or chain")
    p.add_argument("--prefs", required=True, help="preference pairs (JSONL, schema `prefs`)")
    p.add_argument("--step-prefs", help="step-level pairs (label's step_prefs.jsonl): what a `pairs: step` row reads")
    p.add_argument("--reference", required=True, help="the reference stage's folder (logps.jsonl, step_logps.jsonl)")
    p.add_argument("--guidance", required=True, help="a guided loss (TGDPO): a guidance stage's folder (rhat.jsonl)")
    p.add_argument("--out", required=True, help="output adapter / checkpoint folder")
    args = p.parse_args(argv)
    return cli.execute("dpo", VariantParams, args, run, run_name=f"dpo@{args.variant}", block=_block)


if __name__ == "__main__":
    main()
