"""What the training stages share: TrainingArguments defaults per device, LoRA, resume, a NaN guard, saving.

Checkpoints go to `<out>.ckpt/<key>/` beside the stage's output (not a DVC output), the key a hash of the params and
inputs (`run_dir`): a re-run of an interrupted stage with the same ones resumes from the last checkpoint, one with
other params starts afresh, and a finished stage deletes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from posttrain import io, modeling, progress, tracking

log = logging.getLogger(__name__)


@dataclass
class LoraParams:
    r: int = 16
    """Rank; adapter size and capacity grow linearly with it."""
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"


def lora_config(p: LoraParams):
    from peft import LoraConfig

    return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules,
                      task_type="CAUSAL_LM")


def ckpt_dir(out: str | Path) -> Path:
    return Path(f"{out}.ckpt")


def run_dir(out: str | Path, resolved: dict, inputs: list[str | Path]) -> Path:
    """Where this run's checkpoints go: `<out>.ckpt/<key>/`, the key a hash of the resolved params, the process count
    (WORLD_SIZE) and the size and modification time of every file under `inputs` (the caller's: its model chain, data,
    stage module and launcher config; '' is skipped) and of posttrain's code. A re-run of an interrupted stage with
    the same ones finds its checkpoints and resumes; a run with other params (another seed, `dvc exp run -S ...`),
    inputs (an upstream stage re-ran) or code gets a fresh folder, and the main process deletes the other runs'
    checkpoints, saying so, instead of resuming a training the params no longer describe. Files are keyed by the
    input's position and their path inside it, so every rank and machine gets the same folder however it spells
    the paths. A false mismatch (the same file re-written by `dvc checkout`) costs a restart, never a wrong resume.
    `run.json` in the folder is what it hashes."""
    def stat(path: Path, pattern: str) -> dict[str, list[int]]:
        found = sorted(path.rglob(pattern)) if path.is_dir() else [path]
        return {("" if f == path else str(f.relative_to(path))): [f.stat().st_size, f.stat().st_mtime_ns]
                for f in found if f.is_file()}

    files = {f"{i}/{name}": v for i, path in enumerate(Path(x) for x in inputs if str(x))
             for name, v in stat(path, "*").items()}
    files |= {f"posttrain/{name}": v for name, v in stat(Path(__file__).parent, "*.py").items()}
    key = {"params": resolved, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "inputs": files}
    d = ckpt_dir(out) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    from posttrain import cli

    if cli.is_main_process():
        stale = [p for p in ckpt_dir(out).glob("*") if p != d]
        n = sum(1 if p.name.startswith("checkpoint-") else len(list(p.glob("checkpoint-*")))
                for p in stale if p.is_dir())  # a checkpoint-N straight under <out>.ckpt: an older layout's
        if n:
            log.warning("%s: %d checkpoint(s) of a run with other params or inputs: deleted, not resumed",
                        ckpt_dir(out), n)
        for p in stale:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        d.mkdir(parents=True, exist_ok=True)
        io.write_json(d / "run.json", key)
    return d


def resume_from(d: str | Path) -> str | None:
    """The newest complete checkpoint in the run folder `d` (`run_dir`), or None. The Trainer writes
    `trainer_state.json` after the weights, optimizer and RNG state, so a checkpoint without it was cut off mid-write
    (a kill during a save): it is deleted and the one before it is used."""
    d = Path(d)
    if not d.is_dir():
        return None
    found = sorted((p for p in d.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        try:
            step = json.loads((ckpt / "trainer_state.json").read_text()).get("global_step")
        except (OSError, ValueError):
            shutil.rmtree(ckpt, ignore_errors=True)
            continue
        log.info("resuming from %s (step %s)", ckpt, step)
        return str(ckpt)
    return None


def device_args(device: torch.device) -> dict:
    """TRL 1.16 defaults to bf16 and gradient checkpointing: on CPU both make a step take minutes.

    `logging_nan_inf_filter` is off: with the transformers default a NaN step loss is replaced in the logged
    average by the finite losses before it, so `StopOnNaN` would never see it and training would go on with NaN
    weights."""
    cuda = device.type == "cuda"
    return {"bf16": cuda, "gradient_checkpointing": False, "use_cpu": not cuda, "report_to": ["mlflow"],
            "save_strategy": "steps", "save_total_limit": 1, "disable_tqdm": True, "dataloader_num_workers": 0,
            "logging_nan_inf_filter": False}


class StopOnNaN(TrainerCallback):
    """Stop with a clear error when the logged loss is NaN or infinite, or when a checkpoint is about to be saved
    from non-finite trainable weights (a NaN step between two logs), so the last checkpoint on disk is a good one."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # runs after the Trainer decided to save this step and before it saves; under FSDP each process checks its
        # own shard (`to_local`), under ZeRO-3 a partitioned parameter is empty here and passes
        if control.should_save and model is not None:
            bad = next((n for n, p in model.named_parameters() if p.requires_grad
                        and not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()), None)
            if bad is not None:
                raise FloatingPointError(f"weight {bad} is not finite at step {state.global_step}; not saving it: "
                                         f"the last good checkpoint is kept in {args.output_dir}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {state.global_step}; the last good "
                                     f"checkpoint is kept in {args.output_dir}")


class LogLine(TrainerCallback):
    """One line per logging step, numbers at fixed width, with the step out of all, the time spent and an estimate
    of the time left (by the mean step so far): in place of the Trainer's printed dict."""

    SKIP = ("epoch", "total_flos", "step")

    def __init__(self, name: str = "train"):
        self.name, self.t0 = name, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.start_step = time.perf_counter(), state.global_step  # a resumed run counts from its checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        spent = time.perf_counter() - (self.t0 or time.perf_counter())
        done = max(state.global_step - getattr(self, "start_step", 0), 1)
        left = spent / done * max(state.max_steps - state.global_step, 0)
        nums = "  ".join(f"{k} {v:>9.4g}" for k, v in logs.items()
                         if k not in self.SKIP and isinstance(v, (int, float)) and not isinstance(v, bool))
        width = len(str(state.max_steps))
        print(f"{self.name} step {state.global_step:>{width}}/{state.max_steps}  {nums}  "
              f"[{progress.clock(spent)} spent, ~{progress.clock(left)} left]", flush=True)


def log_lines(trainer, name: str) -> None:
    """Swap the Trainer's printed log dicts (transformers' PrinterCallback) for `LogLine`."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogLine(name))


def full_state_dict(model) -> dict | None:
    """The whole weights of a model sharded by `accelerate launch` (ZeRO-3, FSDP), on the main process; None when
    every process holds them whole (one process, DDP). Every process must call it: the gather is collective."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        import deepspeed

        from posttrain import cli

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            full = model.state_dict() if cli.is_main_process() else {}
            return {k: v.detach().cpu().clone() for k, v in full.items()}
    return None


def save(model, out: str | Path, base: str | Path, parents: list[str | Path], resolved: dict,
         summary: dict | None = None) -> None:
    """Write the trained adapter (or full model) with `chain.json`, the resolved params and, when given, the
    training `summary` (train_metrics.json: what a benchmark reads back from a DVC experiment), atomically.

    Under `accelerate launch` every process calls this; the weights are gathered and the main process writes."""
    from posttrain import cli

    out = Path(out)
    state_dict = full_state_dict(model)
    if not cli.is_main_process():
        return
    with io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if (tmp / "adapter_config.json").exists():
            chain = {"base": str(base), "adapters": [str(p) for p in parents] + [str(out)]}
            (tmp / "chain.json").write_text(json.dumps(chain, indent=2) + "\n")
        tracking.write_hyperparameters(tmp, resolved)
        if summary is not None:
            io.write_json(tmp / "train_metrics.json", summary)
    finish(out)


def finish(out: str | Path) -> None:
    """After a model is in place: drop the resume checkpoints and log the model to the active MLflow run."""
    shutil.rmtree(ckpt_dir(out), ignore_errors=True)
    _log_model(Path(out))


def _log_model(out: Path, limit_mb: int = 100) -> None:
    """Log a small trained model (an adapter) to the active MLflow run; a full checkpoint stays a DVC output."""
    import mlflow

    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if mlflow.active_run() is not None and size < limit_mb * 2**20:
        mlflow.log_artifacts(str(out), artifact_path="model")


def train_log(trainer) -> list[dict]:
    return [r for r in trainer.state.log_history if "loss" in r]


def policy_for_training(model_path: str | Path, device: torch.device, trust_remote_code: bool):
    """Load a stage's input model merged (base + adapters), and the chain parents to record under a new adapter."""
    base, adapters = modeling.model_chain(model_path)
    return modeling.load_model(base, adapters, device, trust_remote_code), base, adapters
