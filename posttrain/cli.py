"""The few lines every stage's `main` shares: parse params, open the stage's MLflow run, log what `run` returns."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

from posttrain import config, tracking


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def execute(stage: str, params_cls: type, args: argparse.Namespace, fn: Callable[..., dict[str, Any]],
            run_name: str | None = None, block: Any = None) -> dict[str, Any]:
    """Load `common` + the stage's block, run `fn(common, params, args)` inside an MLflow run, log its metrics.

    Errors about bad input or params end the process with exit code 2 and the message alone (no traceback): they
    name the file, row and field, which is all the user needs.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        common, params = config.load(params_cls, stage, args.params) if block is None else block(args)
    except config.ParamsError as e:
        sys.exit(f"error: {e}")
    paths = {k: str(v) for k, v in vars(args).items() if k != "params"}
    cfg = tracking.resolved_config(stage, common, params, paths)
    from posttrain.io import InputError

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
    return metrics
