"""`dvc repro` on the tiny profile end to end, in a fresh git + DVC repo: every output, no-op re-run, and
an `evaluate` param change re-running only `evaluate@*` and `report`."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml


def _run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


@pytest.mark.slow
def test_dvc_repro_tiny_end_to_end(clean_copy):
    repo = clean_copy
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo)
    _run(dvc + ["init", "-q"], repo)
    log = _run(dvc + ["repro"], repo)
    stages = {"prepare", "base", "sft", "generate", "label", "dpo@dpo", "evaluate@base", "evaluate@sft",
              "evaluate@dpo", "report"}
    assert _ran(log) == stages
    table = json.loads((repo / "reports/metrics.json").read_text())
    assert set(table) == {"base", "sft", "dpo"}
    assert (repo / "reports/report.md").exists() and (repo / "reports/scores.png").exists()
    assert (repo / "models/dpo/dpo/adapter_model.safetensors").exists()

    t0 = time.perf_counter()
    log = _run(dvc + ["repro"], repo)
    assert _ran(log) == set(), "nothing changed, nothing may run"
    assert time.perf_counter() - t0 < 15

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["n_bootstrap"] = 300  # changes every metrics.json, so report must follow
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    log = _run(dvc + ["repro"], repo)
    assert _ran(log) == {"evaluate@base", "evaluate@sft", "evaluate@dpo", "report"}

    metrics = _run(dvc + ["metrics", "show", "--json"], repo)
    assert "pass_rate" in metrics
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["posttrain"])
    assert set(runs["tags.mlflow.runName"]) == stages
    assert (runs["tags.mlflow.runName"] == "report").sum() == 2  # the report ran twice
