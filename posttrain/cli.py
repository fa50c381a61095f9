"""The few lines every stage's `main` shares: parse params, open the stage's MLflow run, log what `run` returns.

With `common.launcher` naming an accelerate config, a training stage (`LAUNCHED`) first re-executes itself as
`accelerate launch --config_file <config> -m stages.<name> <its arguments>`: dvc.yaml's commands stay plain
`python -m stages.<name> ...` and the same stage runs on one CPU, one GPU or several GPUs and machines. Under a
launcher every process runs the stage; only the main one opens the MLflow run and writes the outputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from posttrain import config, tracking

LAUNCHED = ("sft", "dpo")
"""Stages that go through `common.launcher`: each trains with a transformers Trainer and saves via
`training.save` (gathered weights, main process only). Evaluation, sampling (vLLM splits a model over GPUs itself,
`generate.tensor_parallel_size`) and the reward models (a LoRA adapter and a head, saved by `reward.save`) run as
one process."""

MARKER = "POSTTRAIN_LAUNCHED"
"""Set in the environment of the re-executed command, so a stage never launches itself twice."""


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def under_launcher(env: Mapping[str, str]) -> bool:
    """True inside a process started by `accelerate launch` / torchrun (or by our own re-execution)."""
    return MARKER in env or "LOCAL_RANK" in env or "ACCELERATE_MIXED_PRECISION" in env


def is_main_process(env: Mapping[str, str] = os.environ) -> bool:
    """Rank 0 of all processes of all machines (torchrun's RANK), or the only process."""
    return int(env.get("RANK", "0")) == 0


def relaunches(stage: str, launcher: str, env: Mapping[str, str]) -> bool:
    return bool(launcher) and stage in LAUNCHED and not under_launcher(env)


def stage_argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that parse back into `args` (every stage option is `--name value`)."""
    argv: list[str] = []
    for dest, value in vars(args).items():
        if value is None:
            continue
        if not isinstance(value, (str, int, float, Path)) or isinstance(value, bool):
            raise TypeError(f"--{dest}: cannot pass {value!r} on to the relaunched stage")
        argv += [f"--{dest.replace('_', '-')}", str(value)]
    return argv


def launch_command(stage: str, args: argparse.Namespace, launcher: str) -> list[str]:
    """`accelerate launch` (from this interpreter's environment) running `python -m stages.<stage>` on `args`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launcher, "-m", f"stages.{stage}",
            *stage_argv(args)]


def _relaunch(stage: str, args: argparse.Namespace, launcher: str) -> None:
    """Replace this process by the launched command (signals from dvc or Prefect then reach accelerate)."""
    if not Path(launcher).is_file():
        sys.exit(f"error: {args.params}: common.launcher: {launcher}: no such accelerate config file")
    cmd = launch_command(stage, args, launcher)
    logging.getLogger(__name__).info("relaunching: %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, {**os.environ, MARKER: "1"})


def _use_local_gpu() -> None:
    """Under a multi-process launcher, 'cuda' means this process's GPU (LOCAL_RANK), not GPU 0 for every rank."""
    if "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


QUIET = (("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning),)
"""(action, message regex, category) of warnings a user can do nothing about, filtered at every stage's entry:
transformers 5 deprecates an attribute that TRL and peft still read, in every training stage."""

SUMMARY_SKIP = ("_ci", "_lo", "_hi", "_initial", "peak_rss_mb")
"""Metric-name endings left out of a stage's summary line (intervals, before-training values): MLflow has them."""


def _fmt(v: Any) -> str:
    return str(v) if isinstance(v, (int, str)) else f"{v:.4g}"


def summary(name: str, metrics: Mapping[str, Any], seconds: float, limit: int = 10) -> str:
    """One line saying what a stage did: its counts (rows in and out, drops by reason, steps), then its measures,
    at most `limit` of them, and the time it took."""
    shown = [(k, v) for k, v in metrics.items() if not k.endswith(SUMMARY_SKIP) and not isinstance(v, bool)
             and isinstance(v, (int, float, str))]
    shown.sort(key=lambda kv: not isinstance(kv[1], int))  # counts first; stable within each kind
    more = f" (+{len(shown) - limit} more in MLflow)" if len(shown) > limit else ""
    body = ", ".join(f"{k} {_fmt(v)}" for k, v in shown[:limit])
    return f"{name} done in {seconds:.1f} s" + (f": {body}{more}" if body else "")


def execute(stage: str, params_cls: type, args: argparse.Namespace, fn: Callable[..., dict[str, Any]],
            run_name: str | None = None, block: Any = None) -> dict[str, Any]:
    """Load `common` + the stage's block, run `fn(common, params, args)` inside an MLflow run, log its metrics.

    Errors about bad input or params end the process with exit status 1 and the message alone (no traceback): they
    name the file, row and field, which is all the user needs. With `common.launcher` set, a stage of `LAUNCHED`
    does not return: it becomes `accelerate launch ... -m stages.<stage>` with the same arguments.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for action, message, category in QUIET:
        warnings.filterwarnings(action, message=message, category=category)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    try:
        common, params = config.load(params_cls, stage, args.params) if block is None else block(args)
    except config.ParamsError as e:
        sys.exit(f"error: {e}")
    if relaunches(stage, common.launcher, os.environ):
        _relaunch(stage, args, common.launcher)
    _use_local_gpu()
    from posttrain.io import InputError

    if not is_main_process():  # the other ranks train alongside; rank 0 records the run
        try:
            return fn(common, params, args)
        except InputError as e:
            sys.exit(f"error: {e}")
    paths = {k: str(v) for k, v in vars(args).items() if k != "params"}
    cfg = tracking.resolved_config(stage, common, params, paths)
    with tracking.stage_run(run_name or stage, cfg, common.mlflow_uri, common.mlflow_experiment):
        try:
            metrics = fn(common, params, args)
        except InputError as e:
            import mlflow

            mlflow.set_tag("error", str(e)[:500])
            mlflow.end_run(status="FAILED")
            sys.exit(f"error: {e}")
        # peak resident memory of this stage's process, for bench/pipeline.py
        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tracking.log_metrics(metrics)
    logging.getLogger(__name__).info("%s", summary(run_name or stage, metrics, time.perf_counter() - t0))
    return metrics
