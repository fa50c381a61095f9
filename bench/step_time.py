"""Time a training step of TGDPO against DPO (both the `dpo` stage's trainer, reading the cached reference), and
against TRL's DPOTrainer with its defaults (reference forward at every step, concatenated prompt + completion
forward), on the same model, LoRA config and batches, in one run.

    python -m bench.step_time                       # default: the pipeline's SFT model and pairs
    python -m bench.step_time --steps 8 --repeats 3 --batch-size 8

The three trainers run `--repeats` times, interleaved, in a rotating order, so drift of the machine (other load,
thermal, allocator) hits all of them alike; each figure is the median over every timed step. Tokens are counted
as TRL counts them (prompt + chosen, prompt + rejected, no padding), the same for all three, so tokens/s ratios
equal step-time ratios. Needs `dvc repro reference guidance` first (models/sft, data/label/prefs.jsonl,
data/reference, data/guidance/dpo). Writes bench/results/step_time.json: median seconds per step and tokens/s for
each trainer, the ratio TGDPO/DPO (target <= 1.10) and the ratio of the dpo stage's tokens/s to TRL's (>= 1.0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations import MLflowCallback

from bench import machine
from posttrain import config, io, modeling, preference
from stages import dpo


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def _trl_rows(pairs: list[dict]) -> list[dict]:
    return [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]


def _trl_trainer(model, tok, pairs, common, device, params, steps, out):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from posttrain import training

    cfg = DPOConfig(output_dir=out, learning_rate=params.learning_rate, beta=params.loss_params.beta, max_steps=steps,
                    per_device_train_batch_size=params.batch_size, max_length=common.max_len, logging_steps=1000,
                    save_strategy="no", seed=common.seed, precompute_ref_log_probs=False,
                    **{k: v for k, v in training.device_args(device).items() if k not in ("save_strategy",
                                                                                         "report_to")},
                    report_to=[])
    return DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(_trl_rows(pairs)),
                      processing_class=tok, peft_config=training.lora_config(params.lora_params))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--model", default="models/sft")
    p.add_argument("--prefs", default="data/label/prefs.jsonl")
    p.add_argument("--reference", default="data/reference")
    p.add_argument("--guidance", default="data/guidance/dpo")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="bench/results/step_time.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)

    common, all_params = config.load(dpo.DpoParams, "dpo", args.params)
    pairs = io.read_jsonl(args.prefs, "prefs")[: args.steps * args.batch_size]
    device = modeling.device_for(common.device)
    base, _ = modeling.model_chain(args.model)
    tok = modeling.load_tokenizer(base, padding_side="right")
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                 for r in preference.encoded_rows(tok, pairs, common.max_len, args.prefs)[0])
    names = ["dpo", "tgdpo", "trl_dpo_defaults"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for name in names[rep % 3:] + names[: rep % 3]:
            params = config.parse(dpo.VariantParams, {**config.to_dict(all_params.defaults),
                                                      "loss": "tgdpo" if name == "tgdpo" else "dpo",
                                                      "batch_size": args.batch_size}, "bench")
            model = modeling.load_chain(args.model, device)
            timer = StepTimer()
            if name == "trl_dpo_defaults":
                trainer = _trl_trainer(model, tok, pairs, common, device, params, args.steps, f"/tmp/bench_{name}")
            else:
                dataset, _ = dpo.build_dataset(tok, pairs, params, common.max_len, Path(args.reference),
                                               Path(args.guidance), args.prefs)
                trainer = dpo.make_trainer(model, tok, dataset, params, common, device, f"/tmp/bench_{name}")
                trainer.args.max_steps, trainer.args.save_strategy = args.steps, "no"
                trainer.remove_callback(MLflowCallback)  # added at init from report_to: no run in the user's store
            trainer.add_callback(timer)
            trainer.train()
            times[name] += timer.times[1:]  # the first step pays for allocator warm-up
            print(f"repeat {rep} {name}: median step {statistics.median(timer.times[1:]):.3f} s")
    results = {}
    for name in names:
        step = statistics.median(times[name])
        results[name] = {"median_step_s": step, "steps_timed": len(times[name]),
                         "tokens_per_s": tokens / args.steps / step}
    d = results["dpo"]["median_step_s"]
    out = {"model": args.model, "batch_size_pairs": args.batch_size,
           "max_len": common.max_len, "steps": args.steps, "repeats": args.repeats,
           "tokens_per_step_trl_count": tokens / args.steps, "results": results,
           "ratio_tgdpo_over_dpo": results["tgdpo"]["median_step_s"] / d,
           "ratio_dpo_stage_over_trl_tokens_per_s": results["trl_dpo_defaults"]["median_step_s"] / d}
    out = machine.write_results(args.out, out, machine.module_command("bench.step_time", argv), args.allow_dirty)
    print(json.dumps({k: v for k, v in out.items() if k.startswith("ratio")}, indent=2))
    return out


if __name__ == "__main__":
    main()
