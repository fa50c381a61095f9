"""The figures a reproduced pipeline's stages measured, copied with the pipeline's revision and profile: the eval
table (report), the labelled pairs (label), the reward models, and token credit on worked answers (credit).

    cp profiles/long.yaml params.yaml && dvc repro                       # in a scratch clone: the pipeline
    python -m bench.stage_metrics --repo ../run --out bench/results/long_pipeline.json   # from a clean checkout

Copies the files the stages wrote (not computed here) into one results file, with `pipeline` (the repo's git
revision, its changed files and which profile its params.yaml is: `machine.repo_state`) beside this script's own
provenance. A file a stage did not write (no `credit` stage at the repo's revision) is listed under `missing`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import machine

FILES = {"report": "reports/metrics.json", "label": "data/label/stats.json", "prepare": "data/prepare/stats.json",
         "reward_model": "reports/reward_model/metrics.json", "token_reward": "reports/token_reward/metrics.json",
         "credit": "reports/credit/metrics.json"}
"""Results key -> the file a stage writes, relative to the repo."""


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
    machine.write_results(args.out, results, argv=machine.module_command("bench.stage_metrics", argv),
                          allow_dirty=args.allow_dirty)
    print(json.dumps({k: v for k, v in results.items() if k in ("pipeline", "missing")}, indent=1))
    return results


if __name__ == "__main__":
    main()
