"""The main job end to end: `dvc repro` wall time, each stage's wall time and peak resident memory, then a
second `dvc repro` with nothing changed.

    python -m bench.pipeline                  # in a repo whose outputs are not built yet (a fresh clone)
    python -m bench.pipeline --repo /path/to/clone --out bench/results/pipeline.json
    python -m bench.pipeline --since 1795000000   # also list stage runs since then (a repro done in parts)

Per-stage times and memory come from the stage runs' MLflow records (start/end time, metric peak_rss_mb), so
they are the runs the pipeline itself made. Writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import machine
from posttrain import config, io


def repro(repo: Path) -> tuple[float, str]:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def stage_table(repo: Path, since_ms: int) -> list[dict]:
    import mlflow

    common = config.parse(config.Common, config.read_yaml(repo / "params.yaml").get("common"), "common")
    uri = common.mlflow_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{repo / uri.removeprefix('sqlite:///')}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[common.mlflow_experiment], filter_string=f"start_time >= {since_ms}")
    rows: dict[str, dict] = {}  # a stage that ran twice (its code changed in between) counts once: its last run
    for _, r in runs.sort_values("start_time").iterrows():
        rows.pop(r["tags.mlflow.runName"], None)
        rows[r["tags.mlflow.runName"]] = {
            "stage": r["tags.mlflow.runName"], "wall_s": round((r["end_time"] - r["start_time"]).total_seconds(), 1),
            "peak_rss_mb": round(float(r.get("metrics.peak_rss_mb", float("nan"))), 0)}
    return list(rows.values())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=".")
    p.add_argument("--out", default="bench/results/pipeline.json")
    p.add_argument("--since", type=float, default=None,
                   help="epoch seconds: list every stage run since then, for a first repro run in parts")
    p.add_argument("--collect-only", action="store_true",
                   help="with --since: no first repro, only the table of runs since then and the no-op repro")
    args = p.parse_args(argv)
    repo = Path(args.repo).resolve()
    since = int((args.since or time.time()) * 1000)
    total, log = (0.0, "") if args.collect_only else repro(repo)
    stages = stage_table(repo, since)
    noop, log2 = repro(repo)
    out = {"machine": machine.describe(), "dvc_repro_s": round(total, 1), "stages": stages,
           "stages_ran": len(stages), "sum_stage_wall_s": round(sum(s["wall_s"] for s in stages), 1),
           "noop_dvc_repro_s": round(noop, 2), "noop_ran_a_stage": "Running stage" in log2}
    io.write_json(args.out, out)
    for s in stages:
        print(f"{s['stage']:<24} {s['wall_s']:>7.1f} s  {s['peak_rss_mb']:>6.0f} MB")
    print(f"dvc repro: {total:.0f} s; no-op dvc repro: {noop:.1f} s")
    return out


if __name__ == "__main__":
    main()
