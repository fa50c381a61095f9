"""recipe: the DVC pipeline as a Prefect flow, one task per dvc.yaml stage in the DAG's order.

    python -m flows.recipe                 # run it (an ephemeral Prefect API unless PREFECT_API_URL is set)
    prefect server start --host 127.0.0.1  # then open http://127.0.0.1:4200 to watch flow runs

Each task is `dvc repro --single-item <stage>`, so DVC's lock and cache stay the truth: an unchanged stage is
skipped by DVC, not by the flow. The flow opens an MLflow parent run; every stage run nests under it
(MLFLOW_PARENT_RUN_ID). Before each stage DVC will run, the flow's log says "stage k of N", the time spent and
an estimate of the time left (`posttrain.run`, from the last run's stage times). At the end it publishes the
report table as a Prefect markdown artifact with a link to each stage's MLflow run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from posttrain import config, run, tracking
from posttrain.run import stage_order  # noqa: F401 (tests and users import it from here too)


@task(retries=2, retry_delay_seconds=5, task_run_name="{stage}")
def run_stage(stage: str, repo_dir: str, parent_run_id: str | None) -> str:
    """Reproduce one stage; 'skipped' when DVC finds it unchanged."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    if parent_run_id:
        env["MLFLOW_PARENT_RUN_ID"] = parent_run_id
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=repo_dir, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    ran = f"Running stage '{stage}'" in proc.stdout + proc.stderr
    get_run_logger().info("%s: %s", stage, "ran" if ran else "unchanged, skipped by DVC")
    return "ran" if ran else "skipped"


def _runs_table(uri: str, experiment: str, parent: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    if runs.empty:
        return "No stage ran in this flow run (every stage was up to date)."
    base = uri.removeprefix("sqlite:///")
    lines = ["| stage | MLflow run |", "|---|---|"]
    for _, r in runs.sort_values("start_time").iterrows():
        lines.append(f"| {r['tags.mlflow.runName']} | `{r['run_id']}` (`mlflow ui --backend-store-uri "
                     f"sqlite:///{base}`, experiment {experiment}) |")
    return "\n".join(lines)


@flow(name="recipe", log_prints=True)
def recipe(repo_dir: str = ".", params: str = "params.yaml") -> dict[str, str]:
    """Run every dvc.yaml stage in order; returns {stage: 'ran' | 'skipped'}."""
    import mlflow

    repo_dir = str(Path(repo_dir).resolve())
    common = config.parse(config.Common, config.read_yaml(Path(repo_dir) / params).get("common"), "common")
    uri = tracking.resolve_uri(common.mlflow_uri, repo_dir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(common.mlflow_experiment)
    will = run.to_run(repo_dir)
    own, prior, cpu = run.known_times(Path(repo_dir))
    times, started, t0 = dict(own), [], time.perf_counter()
    outcome = {}
    with mlflow.start_run(run_name="recipe", tags={"flow": "recipe"}) as parent:
        for s in stage_order(repo_dir):
            if s in will:  # stage k of N and the time left, in the flow run's log (the UI shows it)
                started.append(s)
                get_run_logger().info(run.line(started, will, time.perf_counter() - t0, times, prior, cpu))
            begun = time.perf_counter()
            outcome[s] = run_stage(s, repo_dir, parent.info.run_id)
            if outcome[s] == "ran":
                times[s] = time.perf_counter() - begun
    if times != own:
        run.save_times(Path(repo_dir), times)
    report = Path(repo_dir) / "reports" / "report.md"
    table = report.read_text() if report.exists() else "(no report yet)"
    create_markdown_artifact(key="recipe-report", markdown=table + "\n\n## Stage runs\n\n" + _runs_table(
        uri, common.mlflow_experiment, parent.info.run_id), description="posttrain recipe: eval table and runs")
    return outcome


if __name__ == "__main__":
    print(recipe())
