"""How well a judge labels the policy's samples where a gold verifier can check it: the `label` stage run with
`label.judge` set to another judge on a reproduced pipeline's samples, against the gold verifier.

    python -m bench.label_judge --repo bench/work/pipeline --judge reward_model   # after `dvc repro` there
    python -m bench.label_judge --repo bench/work/pipeline --judge reward_model --min-prob 0.95

Writes bench/results/label_<judge>[_p<min_prob>].json: the pairs the judge kept, their `gold_agreement` (the share
whose chosen response the verifier also scores higher: stages/label.py), the drop counts, and the same for the
verifier judge from the pipeline's own `data/label/stats.json`, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import yaml

from bench import machine
from posttrain import config


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="a repo where `dvc repro` ran (samples, reward model)")
    p.add_argument("--judge", default="reward_model", help="a key of posttrain.judges.JUDGES")
    p.add_argument("--min-prob", type=float, default=None, help="label.min_prob (default: the repo's)")
    p.add_argument("--out", default=None, help="results file (default bench/results/label_<judge>[_p<min_prob>].json)")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    from stages import label

    repo = Path(args.repo).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        params = config.read_yaml(repo / "params.yaml")
        params["label"]["judge"] = args.judge
        if args.min_prob is not None:
            params["label"]["min_prob"] = args.min_prob
        params["common"]["mlflow_uri"] = f"sqlite:///{tmp}/mlflow.db"  # the repo's own store stays as it was
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
        t0 = time.perf_counter()
        with contextlib.chdir(repo):  # chain.json files name their base relative to the repo
            label.main(["--params", f"{tmp}/params.yaml", "--samples", "data/generate/samples.jsonl",
                        "--reward-model", "models/reward_model", "--out", f"{tmp}/label"])
        seconds = time.perf_counter() - t0
        judged = json.loads((Path(tmp) / "label" / "stats.json").read_text())
    gold = json.loads((repo / "data" / "label" / "stats.json").read_text())
    results = {"judge": args.judge, "label_params": params["label"], "seconds": round(seconds, 1), "judged": judged,
               "verifier": gold}
    out = args.out or f"bench/results/label_{args.judge}{'' if args.min_prob is None else f'_p{args.min_prob}'}.json"
    machine.write_results(out, results, allow_dirty=args.allow_dirty)
    print(f"{args.judge}: {judged['pairs']} pairs kept, gold agreement {judged.get('gold_agreement')}; "
          f"verifier: {gold['pairs']} pairs")
    return results


if __name__ == "__main__":
    main()
