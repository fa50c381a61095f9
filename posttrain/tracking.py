"""MLflow: one run per stage execution, named after the stage, with flattened params, metrics and the git revision.

The store is `common.mlflow_uri` (an embedded SQLite file by default). When a Prefect flow sets
`MLFLOW_PARENT_RUN_ID`, stage runs nest under the flow's run. Runs are tagged with their DVC experiment, and
evaluation runs with their model, so they group and compare in the UI.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from posttrain.config import Common, flatten, to_dict

# MLflow caps param values (6000 chars in 3.x; 250 in old servers: transformers #9210); long ones go in the artifact.
MAX_PARAM_LEN = 500

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3's UI opens an experiment without this tag on the GenAI traces overview; with it, on the runs table
(the tag and its values are read by the UI's experiment page, mlflow/server/js: `ExperimentKind`)."""


def dvc_experiment(env: Mapping[str, str] = os.environ) -> str:
    """The DVC experiment a stage runs in: `dvc exp run` sets DVC_EXP_NAME; a plain `dvc repro` is the workspace."""
    return env.get("DVC_EXP_NAME") or "workspace"


def run_tags(stage: str, revision: str, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Tags of a stage run: stage, code revision, DVC experiment; an `evaluate@<name>` run also its model's name,
    so evaluation runs group and compare by model and by experiment."""
    tags = {"stage": stage, "git_revision": revision, "dvc_experiment": dvc_experiment(env)}
    if stage.startswith("evaluate@"):
        tags["model"] = stage.split("@", 1)[1]
    if env.get("MLFLOW_PARENT_RUN_ID"):
        tags["mlflow.parentRunId"] = env["MLFLOW_PARENT_RUN_ID"]
    return tags


def use_experiment(uri: str, experiment: str) -> None:
    """Point MLflow at `uri` and `experiment` (created if new), marked as a model-training experiment."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    mlflow.set_experiment_tags(EXPERIMENT_KIND)


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_hyperparameters(folder: str | Path, resolved: dict) -> None:
    """`hyperparameters.yaml` beside a model: the resolved params it was made with and the code revision (the one
    writer, for trained adapters, reward models and merges)."""
    text = yaml.safe_dump(resolved | {"git_revision": git_revision()}, sort_keys=False)
    (Path(folder) / "hyperparameters.yaml").write_text(text, encoding="utf-8")


def resolved_config(stage: str, common: Common, params: Any, paths: dict[str, str]) -> dict:
    """What a stage ran with: its params, the common block, its paths and the code revision."""
    return {"stage": stage, "common": to_dict(common), stage: to_dict(params), "paths": paths,
            "git_revision": git_revision()}


@contextlib.contextmanager
def stage_run(stage: str, config: dict, uri: str, experiment: str) -> Iterator[Any]:
    """Start an MLflow run named `stage`, log `config` as params and as `config.yaml`, yield the run."""
    import mlflow

    use_experiment(uri, experiment)
    with mlflow.start_run(run_name=stage, tags=run_tags(stage, config.get("git_revision", "unknown"))) as run:
        flat = {k: str(v) for k, v in flatten({k: v for k, v in config.items() if k != "git_revision"}).items()}
        mlflow.log_params({k: v[:MAX_PARAM_LEN] for k, v in flat.items()})
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "config.yaml"
            p.write_text(yaml.safe_dump(config, sort_keys=False))
            mlflow.log_artifact(str(p))
        yield run


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    import mlflow

    numeric = {k: float(v) for k, v in flatten(metrics).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def resolve_uri(uri: str, repo: str | Path) -> str:
    """A relative SQLite store (`sqlite:///mlflow.db`) as an absolute one under `repo`, so a flow or benchmark run
    from elsewhere reads the repo's store; any other URI unchanged."""
    path = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(path).is_absolute():
        return f"sqlite:///{Path(repo).resolve() / path}"
    return uri


def _source(client, path: str, run_id: str) -> str:
    """What a registry version of model folder `path` points at: the folder itself when run `run_id` keeps its
    artifacts on this machine (a SQLite or file store), else a copy logged to that run's artifacts, since a tracking
    server refuses a local path outside its artifact store (and a teammate could not read it)."""
    from mlflow.utils.uri import is_local_uri

    if is_local_uri(client.get_run(run_id).info.artifact_uri, is_tracking_or_registry_uri=False):
        return str(Path(path).resolve())
    client.log_artifacts(run_id, path, f"registry/{path}")
    return f"runs:/{run_id}/registry/{path}"


def model_version(client, name: str, path: str, run_id: str | None, tags: dict, via_run: str) -> str:
    """The Model Registry version of model folder `path` (its tag `path`) under `name`, created on first use with the
    folder (or its copy in run `via_run`'s artifacts, on a tracking server: `_source`) as its source; the registered
    model is created if needed."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="posttrain policies; alias 'champion' = current champion")
    for v in client.search_model_versions(f"name='{name}'"):
        if v.tags.get("path") == path:
            return v.version
    source = _source(client, path, via_run)
    if source.startswith("runs:/"):  # a server accepts a run's artifacts as source only together with that run
        run_id = via_run
    v = client.create_model_version(name, source=source, run_id=run_id,
                                    tags={"path": path} | {k: str(x) for k, x in tags.items()})
    return v.version
