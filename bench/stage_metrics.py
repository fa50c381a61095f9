"""The figures a reproduced pipeline's stages measured, copied with the pipeline's revision and profile: the eval
table (report), the labelled pairs (label), the reward models, and token credit on worked answers (credit).

    cp profiles/long.yaml params.yaml && dvc repro                       # in a scratch clone: the pipeline
    python -m bench.stage_metrics --repo ../run --out bench/results/long_pipeline.json   # from a clean checkout

Copies the files the stages wrote (not computed here) into one results file, with `pipeline` (the repo's git
revision, its changed files and which profile its params.yaml is: `machine.repo_state`) beside this script's own
provenance. A file a stage did not write (no `credit` stage at the repo's revision) is listed under `missing`.
`stage_seconds`: each stage's own run time as MLflow recorded it (the latest finished run of each name in the
workspace, not in a `dvc exp run`; from start to end of the stage's MLflow run, so without the few seconds of process
start, imports and DVC's hashing around it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import machine
from posttrain import config, tracking

FILES = {"report": "reports/metrics.json", "label": "data/label/stats.json", "prepare": "data/prepare/stats.json",
         "reward_model": "reports/reward_model/metrics.json", "token_reward": "reports/token_reward/metrics.json",
         "credit": "reports/credit/metrics.json"}
"""Results key -> the file a stage writes, relative to the repo."""


def stage_seconds(repo: Path) -> dict[str, float]:
    """Run name -> seconds of the latest finished workspace run of that name in the repo's MLflow experiment
    (common.mlflow_uri and mlflow_experiment of its params.yaml); {} where the store or experiment is missing."""
    common = config.read_yaml(repo / "params.yaml").get("common", {})
    uri, name = common.get("mlflow_uri"), common.get("mlflow_experiment")
    if not uri or not name or (uri.startswith("sqlite:///") and not (repo / uri.removeprefix("sqlite:///")).exists()):
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.resolve_uri(uri, repo))
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], "tags.dvc_experiment = 'workspace' and attributes.status = "
                              "'FINISHED'", order_by=["attributes.start_time ASC"], max_results=50000)
    return {r.info.run_name: round((r.info.end_time - r.info.start_time) / 1000, 1) for r in runs}  # latest wins


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="a repo where `dvc repro` ran")
    p.add_argument("--out", required=True, help="results file, e.g. bench/results/long_pipeline.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    repo = Path(args.repo).resolve()
    if not (repo / FILES["report"]).is_file():
        raise SystemExit(f"error: {repo / FILES['report']}: missing: run `dvc repro` in {repo} first")
    results: dict = {"repo": str(repo), "pipeline": machine.repo_state(repo), "missing": []}
    for key, rel in FILES.items():
        path = repo / rel
        if path.is_file():
            results[key] = json.loads(path.read_text())
        else:
            results["missing"].append(rel)
    results["stage_seconds"] = stage_seconds(repo)
    machine.write_results(args.out, results, argv=machine.module_command("bench.stage_metrics", argv),
                          allow_dirty=args.allow_dirty)
    print(json.dumps({k: v for k, v in results.items() if k in ("pipeline", "missing")}, indent=1))
    return results


if __name__ == "__main__":
    main()
