"""DPO against both TGDPO variants over several training seeds, on the default model and data.

    python -m bench.seeds --repo ../run --seeds 0 1 2   # from a clean checkout; ../run: where `dvc repro` ran

What varies with the seed is training only (LoRA initialisation and batch order, `dpo.defaults.seed`); the SFT model,
the sampled pairs, the reference cache and the learned token reward are the pipeline's, shared by every seed, so the
spread is the optimiser's alone. Each other seed is `dvc exp run -S dpo.defaults.seed=<s>` on the pipeline repo's
three evaluations (evaluate@dpo, evaluate@tgdpo, evaluate@tgdpo_token): DVC re-runs dpo@dpo -> guidance@dpo (from
this seed's DPO model) -> dpo@tgdpo, and dpo@tgdpo_token (the pipeline's token reward), nothing else; the experiments
stay listed in `dvc exp show`. The pipeline's own seed reads its answers. The workspace gets the pipeline's params
and outputs back at the end.

Writes bench/results/seeds.json: per variant and seed the gold pass rate and win rate vs the SFT model (per
prompt: win 1 / tie 0.5 / loss 0 on the gold score); per variant the mean and a 95% t-interval over seeds; and
the paired per-seed difference of each TGDPO variant against DPO, with its t-interval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import machine
from posttrain import config, io, stats

VARIANTS = ("dpo", "tgdpo", "tgdpo_token")
DVC = [sys.executable, "-m", "dvc"]
ENV = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
"""The stages' `python` is this environment's."""
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(xs: list[float]) -> dict:
    """Mean and 95% Student-t interval of a handful of per-seed figures."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": m, "ci": [m, m], "n": len(xs)}
    half = T_975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))
    return {"mean": m, "ci": [m - half, m + half], "n": len(xs)}


def answers(path: Path) -> dict[str, float]:
    return {a["id"]: a["score"] for a in io.read_jsonl(path, "answers")}


def run_seed(repo: Path, seed: int, baseline: int, variants: list[str]) -> dict[str, dict[str, float]]:
    """Each variant's per-prompt gold scores at training seed `seed`: the pipeline's own answers for its seed, else
    those of a DVC experiment that sets `dpo.defaults.seed` and reproduces the variants' evaluations (DVC re-runs
    what depends on that param: the three dpo rows, guidance@dpo, their evaluations), its MLflow runs in the
    `bench-seeds` experiment."""
    if seed != baseline:
        subprocess.run([*DVC, "exp", "run", "--name", f"seed-{seed}", "-S", f"dpo.defaults.seed={seed}",
                        "-S", "common.mlflow_experiment=bench-seeds", *[f"evaluate@{v}" for v in variants]],
                       cwd=repo, env=ENV, check=True)
    return {v: answers(repo / f"reports/evaluate/{v}/answers.jsonl") for v in variants}


def snapshot(repo: Path) -> dict[str, bytes]:
    """What an experiment overwrites and `dvc checkout` cannot bring back: params.yaml, dvc.lock and the files DVC
    does not cache (the evaluations' metrics.json and summary.json, `cache: false`), every file under reports/."""
    files = [repo / "params.yaml", repo / "dvc.lock", *(f for f in (repo / "reports").rglob("*") if f.is_file())]
    return {str(f.relative_to(repo)): f.read_bytes() for f in files}


def restore(repo: Path, saved: dict[str, bytes]) -> None:
    """The `snapshot` back in the workspace, then the cached outputs its dvc.lock names (an experiment leaves its
    own there)."""
    for name, data in saved.items():
        (repo / name).write_bytes(data)
    subprocess.run([*DVC, "checkout", "--force", "--quiet"], cwd=repo, env=ENV, check=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=".", help="a repo where `dvc repro` has run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="dpo.variants rows; dpo first (the others "
                   "are paired with it)")
    p.add_argument("--out", default="bench/results/seeds.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    repo = Path(args.repo).resolve()
    sft = answers(repo / "reports/evaluate/sft/answers.jsonl")
    ids = sorted(sft)
    baseline = config.read_yaml(repo / "params.yaml")["dpo"]["defaults"].get("seed", 0)
    per_seed: dict[str, dict[int, dict]] = {v: {} for v in args.variants}
    t0 = time.perf_counter()
    saved = snapshot(repo)
    try:
        runs = {seed: run_seed(repo, seed, baseline, args.variants) for seed in args.seeds}
    finally:
        restore(repo, saved)
    for seed, got_all in runs.items():
        for variant, got in got_all.items():
            scores = [got[i] for i in ids]
            per_seed[variant][seed] = {
                "pass_rate": sum(s == 1.0 for s in scores) / len(ids),
                "win_rate_vs_sft": statistics.fmean(stats.win_values(scores, [sft[i] for i in ids]))}
    summary = {v: {k: t_interval([per_seed[v][s][k] for s in args.seeds]) for k in ("pass_rate", "win_rate_vs_sft")}
               for v in args.variants}
    paired = {f"{v}_minus_dpo": {k: t_interval([per_seed[v][s][k] - per_seed["dpo"][s][k] for s in args.seeds])
                                 for k in ("pass_rate", "win_rate_vs_sft")} for v in args.variants if v != "dpo"}
    sft_pass = sum(s == 1.0 for s in sft.values()) / len(sft)
    out = {"seeds": args.seeds, "pipeline": machine.repo_state(repo), "eval_prompts": len(ids),
           "sft_pass_rate": sft_pass, "per_seed": per_seed, "summary": summary, "paired_vs_dpo": paired,
           "wall_s": round(time.perf_counter() - t0, 1)}
    out = machine.write_results(args.out, out, machine.module_command("bench.seeds", argv), args.allow_dirty)
    print(json.dumps({"summary": summary, "paired_vs_dpo": paired}, indent=1))
    return out


if __name__ == "__main__":
    main()
