"""Plain DPO's learning rate on the default task: at the default 1e-4 the `dpo` row collapses (0.130 against SFT's
0.440, bench/results/default_pipeline.json); does a lower rate keep it up?

    python -m bench.dpo_knobs --repo bench/work/pipeline --rates 1e-4 3e-5 1e-5

For each rate, the pipeline's `dpo` row is trained from its SFT model on its pairs and reference cache (all
shared), with `dpo.defaults.learning_rate` set to that rate and nothing else changed, and evaluated greedily on its
eval split, as `dpo@dpo` and `evaluate@dpo` would be (bench/seeds.py does the same per seed). Writes
bench/results/dpo_knobs.json: per rate the gold pass rate with its 95% bootstrap interval, mean length, and the
trainer's final log-probs of the chosen and rejected answers (likelihood displacement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import yaml

from bench import machine
from posttrain import config
from stages import dpo, evaluate


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="a repo where the default `dvc repro` has run")
    p.add_argument("--rates", type=float, nargs="+", default=[1e-4, 3e-5, 1e-5])
    p.add_argument("--work", default="bench/work/dpo_knobs", help="scratch folder (models, answers)")
    p.add_argument("--out", default="bench/results/dpo_knobs.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    repo, work = Path(args.repo).resolve(), Path(args.work).resolve()
    base = config.read_yaml(repo / "params.yaml")
    results = {}
    with contextlib.chdir(repo):  # its adapter chains name their base relative to the repo (chain.json)
        for rate in args.rates:
            results[f"{rate:g}"] = one_rate(repo, work, base, rate)
    out = {"pipeline": machine.repo_state(repo), "row": base["dpo"]["variants"]["dpo"],
           "defaults": base["dpo"]["defaults"], "results": results}
    return machine.write_results(args.out, out, machine.module_command("bench.dpo_knobs", argv), args.allow_dirty)


def one_rate(repo: Path, work: Path, base: dict, rate: float) -> dict:
    """Train and evaluate the `dpo` row at learning rate `rate`."""
    r = lambda rel: str(repo / rel)  # noqa: E731
    params = json.loads(json.dumps(base))
    params["dpo"]["defaults"]["learning_rate"] = rate
    params["common"]["mlflow_uri"] = f"sqlite:///{work / 'mlflow.db'}"
    params["common"]["mlflow_experiment"] = "bench-dpo-knobs"
    d = work / f"lr_{rate:g}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pf = str(d / "params.yaml")
    trained = dpo.main(["--params", pf, "--variant", "dpo", "--model", r("models/sft"), "--prefs",
                        r("data/label/prefs.jsonl"), "--step-prefs", r("data/label/step_prefs.jsonl"),
                        "--reference", r("data/reference"), "--guidance", r("data/reference"),
                        "--out", str(d / "model")])
    evaluate.main(["--params", pf, "--name", f"dpo-lr{rate:g}", "--model", str(d / "model"), "--prompts",
                   r("data/prepare/eval.jsonl"), "--general", r("posttrain/data/general.txt"),
                   "--out", str(d / "evaluate")])
    m = json.loads((d / "evaluate" / "metrics.json").read_text())
    got = {"pass_rate": m["pass_rate"], "pass_rate_ci": m["pass_rate_ci"], "mean_length": m["mean_length"],
           "pairs": trained["pairs"], "final_logps_chosen": trained.get("final_logps_chosen"),
           "final_logps_rejected": trained.get("final_logps_rejected")}
    print(f"lr {rate:g}: {got}", flush=True)
    return got


if __name__ == "__main__":
    main()
