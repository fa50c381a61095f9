"""The reward models of a reproduced pipeline, as its stages measured them: held-out pair accuracy before and after
training, verifier agreement and best-of-N (reward_model), accuracy per aggregator (token_reward).

    python -m bench.reward_models --repo bench/work/pipeline     # after `python -m bench.pipeline` made it

Copies `reports/reward_model/metrics.json` and `reports/token_reward/metrics.json` of that repo (written by the
stages, not by this script) into bench/results/reward_models.json with the revision the repo was at
(`measured_revision`) beside this script's own provenance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from bench import machine


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="a repo where `dvc repro` ran")
    p.add_argument("--out", default="bench/results/reward_models.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    repo = Path(args.repo).resolve()
    revision = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    results = {"repo": str(repo), "measured_revision": revision}
    for stage in ("reward_model", "token_reward"):
        path = repo / "reports" / stage / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"error: {path}: missing: run `dvc repro` in {repo} first")
        results[stage] = json.loads(path.read_text())
    machine.write_results(args.out, results, allow_dirty=args.allow_dirty)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
