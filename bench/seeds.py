"""DPO against both TGDPO variants over several training seeds, on the default model and data.

    python -m bench.seeds --repo .                  # after `dvc repro` (needs its models/sft, prefs, caches)
    python -m bench.seeds --repo . --seeds 0 1 2

What varies with the seed is training only (LoRA initialisation and batch order, `dpo.defaults.seed`); the SFT model,
the sampled pairs, the reference cache and the learned token reward are the pipeline's, shared by every seed, so the
spread is the optimiser's alone. For each seed: dpo@dpo -> guidance@dpo (from this seed's DPO model) -> dpo@tgdpo,
and dpo@tgdpo_token (guidance from the pipeline's token reward model), each evaluated greedily on the eval split.
Seed = `dpo.defaults.seed` of the pipeline is the pipeline's own run, reused when its outputs exist.

Writes bench/results/seeds.json: per variant and seed the gold pass rate and win rate vs the SFT model (per
prompt: win 1 / tie 0.5 / loss 0 on the gold score); per variant the mean and a 95% t-interval over seeds; and
the paired per-seed difference of each TGDPO variant against DPO, with its t-interval.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import yaml

from bench import machine
from posttrain import io, stats
from stages import dpo, evaluate, guidance

VARIANTS = ("dpo", "tgdpo", "tgdpo_token")
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


def run_seed(repo: Path, seed: int, work: Path) -> dict[str, Path]:
    """Train and evaluate the three variants for one seed; returns each variant's answers file."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    if seed == params["dpo"]["defaults"]["seed"] and all((repo / f"reports/evaluate/{v}/answers.jsonl").exists()
                                                for v in VARIANTS):
        return {v: repo / f"reports/evaluate/{v}/answers.jsonl" for v in VARIANTS}
    params["dpo"]["defaults"]["seed"] = seed
    uri = params["common"]["mlflow_uri"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        params["common"]["mlflow_uri"] = f"sqlite:///{repo / uri.removeprefix('sqlite:///')}"
    params["common"]["mlflow_experiment"] = "bench-seeds"
    work.mkdir(parents=True, exist_ok=True)
    p = work / "params.yaml"
    p.write_text(yaml.safe_dump(params, sort_keys=False))
    r = lambda rel: str(repo / rel)  # noqa: E731
    w = lambda rel: str(work / rel)  # noqa: E731
    common = ["--params", str(p), "--model", r("models/sft"), "--prefs", r("data/label/prefs.jsonl"),
              "--reference", r("data/reference")]
    guide = {"dpo": r("data/reference"), "tgdpo": w("guidance/dpo"), "tgdpo_token": r("data/guidance/token_reward")}
    out = {}
    for variant in VARIANTS:
        if variant == "tgdpo" and not (work / "guidance/dpo").exists():
            guidance.main(["--params", str(p), "--name", "dpo", "--model", w("models/dpo"), "--prefs",
                           r("data/label/prefs.jsonl"), "--reference", r("data/reference"), "--out",
                           w("guidance/dpo")])
        if not (work / f"models/{variant}").exists():
            dpo.main([*common, "--variant", variant, "--guidance", guide[variant], "--out", w(f"models/{variant}")])
        if not (work / f"evaluate/{variant}/answers.jsonl").exists():
            evaluate.main(["--params", str(p), "--name", f"{variant}-seed{seed}", "--model", w(f"models/{variant}"),
                           "--prompts", r("data/prepare/eval.jsonl"), "--general", r("posttrain/data/general.txt"),
                           "--out", w(f"evaluate/{variant}")])
        out[variant] = work / f"evaluate/{variant}/answers.jsonl"
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=".", help="a repo where `dvc repro` has run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", default="bench/work/seeds", help="scratch folder (per-seed models, answers)")
    p.add_argument("--out", default="bench/results/seeds.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    repo = Path(args.repo).resolve()
    sft = answers(repo / "reports/evaluate/sft/answers.jsonl")
    ids = sorted(sft)
    per_seed: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for variant, path in run_seed(repo, seed, Path(args.work) / f"seed_{seed}").items():
            got = answers(path)
            scores = [got[i] for i in ids]
            per_seed[variant][seed] = {
                "pass_rate": sum(s == 1.0 for s in scores) / len(ids),
                "win_rate_vs_sft": statistics.fmean(stats.win_values(scores, [sft[i] for i in ids]))}
    summary = {v: {k: t_interval([per_seed[v][s][k] for s in args.seeds]) for k in ("pass_rate", "win_rate_vs_sft")}
               for v in VARIANTS}
    paired = {f"{v}_minus_dpo": {k: t_interval([per_seed[v][s][k] - per_seed["dpo"][s][k] for s in args.seeds])
                                 for k in ("pass_rate", "win_rate_vs_sft")} for v in VARIANTS if v != "dpo"}
    sft_pass = sum(s == 1.0 for s in sft.values()) / len(sft)
    out = {"seeds": args.seeds, "eval_prompts": len(ids), "sft_pass_rate": sft_pass,
           "per_seed": per_seed, "summary": summary, "paired_vs_dpo": paired,
           "wall_s": round(time.perf_counter() - t0, 1)}
    out = machine.write_results(args.out, out, machine.module_command("bench.seeds", argv), args.allow_dirty)
    print(json.dumps({"summary": summary, "paired_vs_dpo": paired}, indent=1))
    return out


if __name__ == "__main__":
    main()
