"""Token- and step-level credit against plain DPO on long worked answers: several training seeds as DVC experiments,
with the mechanism as the pipeline's own credit stage measures it.

    cp profiles/long.yaml params.yaml          # in a scratch clone, with the edits under Size (>= 400 pairs)
    dvc repro                                   # the pipeline this reads
    python -m bench.long_answers --repo ../run --rows dpo rpo tgdpo tgdpo_cancel tgdpo_cancel_token step_dpo \
        --aggregators average --credit-seeds own  # from a clean checkout (its revision: the figures' provenance)

Every figure comes from the pipeline's stages, run by DVC; nothing here restates dvc.yaml:
- each training seed but the pipeline's own (`dpo.defaults.seed`) is one experiment on the pipeline repo,
  `dvc exp run -S dpo.defaults.seed=<s> evaluate@<row>... credit`: DVC re-runs every row's dpo stage, guidance@dpo
  (from that seed's DPO model) and what reads them. The SFT model, the samples, the pairs, the reference cache and
  the learned token reward are the pipeline's, shared by every seed, so the spread is training's alone;
- each further learned-guidance scale k (`--scales`) is one more experiment a seed,
  `-S guidance.sources.<token source>.scale=k`, which re-runs the token-guided rows (method `<row>_x<k>`);
- each further DPO learning rate x (`--learning-rates`) is one more experiment a seed,
  `-S dpo.defaults.learning_rate=x`, which re-runs every row (method `<row>_lr<x>`, paired with `dpo_lr<x>`);
- each token-reward aggregator but the pipeline's (`--aggregators`) is one experiment,
  `-S token_reward.aggregator=<a> guidance@<token source>`, whose r_hat the credit stage scores for blame alone.
Each experiment's stage runs go to MLflow's `bench-long-answers` experiment and `dvc exp show` lists them; at the end
the workspace has the pipeline's params and outputs back (bench.seeds.snapshot / restore).

Rows (`--rows`, default profiles/long.yaml's, `dpo` first: the others are paired with it): `dpo` (plain DPO), `rpo`
(DPO + NLL), `tgdpo` (the paper's form, DPO-induced guidance), `tgdpo_cancel` (shared prefix cancelled), their
learned-guidance forms `tgdpo_token` and `tgdpo_cancel_token`, `step_dpo` (plain DPO on the step verifier's
Step-DPO pairs), and `tgdpo_cancel_token_nll` and `step_rpo`, which add rpo's chosen-NLL anchor to a token- and a
step-level row and so are paired with `rpo` too. Each is a `dpo.variants` row with an `evaluate.models` row of the
same name.

Measured:
- end scores, from each row's `reports/evaluate/<row>/answers.jsonl`: gold pass rate and, on worked tasks, the mean
  step score (share of right steps, `tasks.step_share`); per method the mean over seeds with a 95% bootstrap
  interval over prompts (of the seed-averaged per-prompt figure) and a 95% t-interval over seeds; every method
  minus `dpo` at its learning rate, paired by prompt and seed (an anchored row minus `rpo` as well); and whether
  the goal (a token- or step-level method - DPO >= +3 pass-rate points, paired interval above 0) is met, and for an
  anchored row whether it holds against `rpo`;
- training: each row's final reward accuracy and margin on its own pairs (the dpo stage's train_metrics.json);
- from `reports/credit/metrics.json` (stages/credit.py): blame localisation for each guidance source and seed (with
  the mean r_hat before and in the first wrong step: below zero before it, TGDPO pushes the correct steps down
  harder than DPO), and
  shared-prefix displacement for each method and seed, with its difference from `dpo` paired by answer; the mean
  of the per-seed figures with a t-interval over seeds;
- the picture: the pipeline's `reports/credit/pairs.png`, copied to `--plot`;
- the pairs: the label stage's stats.json (pairs dropped by rule; the step pairs by source of their chosen step).

Size (issue 22 asks for >= 400 response-level training pairs; `--min-pairs` refuses fewer). A prompt gives at most one
response-level pair, and only when some samples are right and some wrong: at 500 prompts of profiles/long.yaml's
mix, 4 samples each, 145 pairs (bench/results/long_pipeline.json, at 3301a06), because mul_steps, half the mix,
passes ~0.01 under SFT: its prompts give almost no pair and its held-out half no signal. The acceptance run
(bench/results/long_answers.json; its `params` is the pipeline's whole params.yaml) therefore edits the profile to
`prepare.task_mix: {chain_add: 1.0}`, `prepare.n_train: 900` (497 pairs and 720 step pairs),
`label.step_pairs_per_prompt: 1`, and keeps issue 22's six rows in `dpo.variants` and `evaluate.models` (the
others cost a training and an evaluation a seed each); `--aggregators average` (the pipeline's own) skips the other
token-reward heads, one token_reward training each, and `--credit-seeds own` measures blame and displacement on the
pipeline's own seed alone (the credit stage reads every pair under every policy: ~8 minutes a seed). That pipeline
and this benchmark fit one session on 2 Intel Xeon cores (`bench/results/long_pipeline_accept.json` has the stages'
seconds, this file's `wall_s` the two further seeds).
An interrupted run resumes: the same command again re-runs the experiments, and every stage an earlier one finished
comes back from DVC's run cache; interrupt it with Ctrl-C (SIGINT), so that the workspace gets the pipeline's
params and outputs back.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import machine, seeds
from bench.seeds import t_interval
from posttrain import config, io, stats, tasks
from posttrain import token_reward as tr

ROWS = ("dpo", "rpo", "tgdpo", "tgdpo_token", "tgdpo_cancel", "tgdpo_cancel_token", "tgdpo_cancel_token_nll",
        "step_dpo", "step_rpo")
"""profiles/long.yaml's dpo rows (a test checks): the ones issue 22 compares."""

SEQUENCE_LEVEL = ("dpo", "rpo")
"""Rows with neither token guidance nor step pairs: the goal is for the others."""

EXPERIMENT = "bench-long-answers"
"""The MLflow experiment the benchmark's stage runs go to."""

GOAL = 0.03
"""The issue's bar: a token- or step-level method - DPO >= +3 pass-rate points, with the paired 95% interval above
0, at equal training prompts."""


ANCHOR = "rpo"
"""The sequence-level row with the chosen-NLL anchor: a token- or step-level row with an anchor of its own
(`nll_weight` > 0) is also paired with it, so a gain the anchor alone brings is not read as credit's."""


def nll_weight(params: dict, row: str) -> float:
    """A dpo.variants row's chosen-NLL weight, as the dpo stage resolves it (its own, else its loss's default), or 0
    for a loss without one."""
    from stages import dpo

    resolved = dpo.resolve(config.parse(dpo.DpoParams, params["dpo"], "dpo"), row, "params.yaml")
    return getattr(resolved.loss_params, "nll_weight", 0.0)


def anchored(params: dict, rows: list[str]) -> list[str]:
    """The token- or step-level rows with a chosen-NLL anchor, each paired with `rpo` too (when it is a row)."""
    return [r for r in rows if r not in SEQUENCE_LEVEL and ANCHOR in rows and nll_weight(params, r) > 0]


def token_source(params: dict) -> str | None:
    """The guidance source that reads the learned token reward (kind token_reward), if any."""
    return next((k for k, v in params["guidance"]["sources"].items() if v["kind"] == "token_reward"), None)


def variants(rows: list[str], params: dict, scales: list[float], lrs: list[float]) -> dict[str, dict]:
    """Experiment tag -> the knobs it moves (-S) and the rows they reach; tag "" is the pipeline's own settings.
    A learned-guidance scale `x<k>` reaches the rows guided by the token source, a DPO learning rate `lr<x>` every
    row."""
    source = token_source(params)
    guided = [r for r in rows if source and params["dpo"]["variants"][r]["guidance"] == f"data/guidance/{source}"]
    out = {"": {"knobs": {}, "rows": list(rows)}}
    out |= {f"x{k:g}": {"knobs": {f"guidance.sources.{source}.scale": k}, "rows": guided} for k in scales if guided}
    out |= {f"lr{x:g}": {"knobs": {"dpo.defaults.learning_rate": x}, "rows": list(rows)} for x in lrs}
    return out


def method_rows(variants_: dict[str, dict]) -> dict[str, tuple[str, str]]:
    """Method -> (its dpo row, its experiment tag): a row under the pipeline's own settings keeps its name, under a
    variant it is `<row>_<tag>`."""
    return {(f"{r}_{tag}" if tag else r): (r, tag) for tag, v in variants_.items() for r in v["rows"]}


def check_rows(params: dict, rows: list[str], where: str) -> None:
    """Each row is a dpo.variants row evaluated under its own name; `dpo` comes first."""
    if not rows or rows[0] != "dpo":
        raise SystemExit(f"error: --rows must start with dpo (the others are paired with it), got {rows}")
    for r in rows:
        if r not in params["dpo"]["variants"]:
            raise SystemExit(f"error: {where}: dpo.variants has no row {r!r}")
        if params["evaluate"]["models"].get(r) != f"models/dpo/{r}":
            raise SystemExit(f"error: {where}: evaluate.models.{r} must be models/dpo/{r}")


def end_scores(answers: list[dict], specs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per answered prompt with a gold verdict: `pass` (gold score 1.0) and, on worked tasks, `step_score` (share of
    right steps)."""
    out = {}
    for a in answers:
        if a["passed"] is None:
            continue
        spec = specs[a["id"]]
        out[a["id"]] = {"pass": float(a["passed"])}
        if spec.get("type") in tasks.PLANS:
            out[a["id"]]["step_score"] = tasks.step_share(spec, a["response"])
    return out


def seed_average(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """{seed: {id: x}} -> {id: mean over seeds}, over the ids every seed has."""
    ids = set.intersection(*(set(v) for v in per_seed.values()))
    return {i: statistics.fmean(v[i] for v in per_seed.values()) for i in sorted(ids)}


def compare(per_seed: dict[int, dict[str, float]], base: dict[int, dict[str, float]] | None, n_boot: int) -> dict:
    """A method's figure (minus the baseline's, paired by prompt and seed, when `base` is given): the mean, a 95%
    bootstrap interval over prompts of the seed-averaged per-prompt figure, and a 95% t-interval over seeds."""
    seeds_ = sorted(per_seed)
    if base is not None:
        per_seed = {s: {i: x - base[s][i] for i, x in per_seed[s].items() if i in base[s]} for s in seeds_}
    by_prompt = list(seed_average(per_seed).values())
    per_seed_means = [statistics.fmean(per_seed[s].values()) for s in seeds_]
    return {"mean": statistics.fmean(by_prompt), "ci_prompts": list(stats.bootstrap_ci(by_prompt, n_boot)),
            "prompts": len(by_prompt), "per_seed": dict(zip(seeds_, per_seed_means, strict=True)),
            "seeds": t_interval(per_seed_means)}


def goal_met(diff: dict) -> bool:
    return diff["mean"] >= GOAL and diff["ci_prompts"][0] > 0


def prompt_of(pair_id: str) -> str:
    """The training prompt a pair comes from: a step pair's id is `<prompt id>.step<k>.<sample>` (step_pairs)."""
    return pair_id.rsplit(".step", 1)[0]


def experiment(repo: Path, name: str, settings: dict, targets: list[str]) -> None:
    """One `dvc exp run` on the pipeline repo with `settings` as -S (every knob the benchmark moves is set each
    time: an experiment starts from the workspace the last one left). A stage whose deps and params DVC has seen
    before (another seed's guidance at the pipeline's scale) comes back from DVC's run cache, outputs and all."""
    sets = [a for k, v in (settings | {"common.mlflow_experiment": EXPERIMENT}).items() for a in ("-S", f"{k}={v}")]
    subprocess.run([*seeds.DVC, "exp", "run", "--name", name, *sets, *targets], cwd=repo, env=seeds.ENV, check=True)


def read_state(repo: Path, methods: dict[str, str], specs: dict[str, dict], credit: bool = True) -> dict:
    """What the workspace's stages wrote, per method named after its row: end scores and credit's figures (None and
    no blame where the experiment did not run credit: its metrics.json is another seed's)."""
    metrics = json.loads((repo / "reports/credit/metrics.json").read_text()) if credit else {
        "displacement": {}, "displacement_minus_dpo": {}, "blame": {}}
    return {"scores": {m: end_scores(io.read_jsonl(repo / f"reports/evaluate/{r}/answers.jsonl", "answers"), specs)
                       for m, r in methods.items()},
            "displacement": {m: metrics["displacement"].get(r) for m, r in methods.items()},
            "minus_dpo": {m: metrics["displacement_minus_dpo"].get(r) for m, r in methods.items()},
            "blame": metrics["blame"], "trained": {m: trained(repo / f"models/dpo/{r}") for m, r in methods.items()}}


def trained(model: Path) -> dict | None:
    """What the dpo stage wrote beside the model (train_metrics.json: final reward accuracy and margin on its own
    pairs, its pair and step counts); None for a model trained before the stage wrote it."""
    path = model / "train_metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def over_seeds(per_seed: dict[int, dict | None], keys=("mean",)) -> dict:
    """Credit's per-seed figures and, where every seed has one, the t-interval of each key's mean over seeds (a key
    the pipeline's credit stage does not write, one older than the key, has none)."""
    out = {"per_seed": per_seed}
    if per_seed and all(v and v.get("n") for v in per_seed.values()):
        for k in (k for k in keys if all(k in v for v in per_seed.values())):
            means = [v[k]["mean"] if isinstance(v[k], dict) else v[k] for v in per_seed.values()]
            if all(math.isfinite(m) for m in means):  # NaN: a figure with no answer to average (its own n 0)
                out[f"{k}_over_seeds"] = t_interval(means)
    return out


def run_benchmark(repo: Path, params: dict, args, specs: dict[str, dict]) -> dict:
    """Every experiment in turn, each read as soon as it ran (the pipeline's own seed and scale first: its
    workspace as it stands); the caller restores the workspace."""
    tags = variants(args.rows, params, args.scales, args.learning_rates)
    methods = method_rows(tags)
    own_seed, source = params["dpo"]["defaults"]["seed"], token_source(params)
    own_scale = params["guidance"]["sources"][source].get("scale", 1.0) if source else None
    own_agg = params["token_reward"]["aggregator"]
    scale_knob = f"guidance.sources.{source}.scale"
    own = {"token_reward.aggregator": own_agg,
           "dpo.defaults.learning_rate": params["dpo"]["defaults"]["learning_rate"]}
    own |= {scale_knob: own_scale} if source else {}
    stamp = time.strftime("%m%d%H%M")
    states: dict[int, dict] = {}
    for s in sorted(args.seeds, key=lambda s: s != own_seed):
        states[s] = {}
        for tag, v in tags.items():
            names = {m: r for m, (r, t) in methods.items() if t == tag}
            credit = s == own_seed or args.credit_seeds == "all"
            if s != own_seed or tag:
                targets = [f"evaluate@{r}" for r in v["rows"]] + (["credit"] if credit else [])
                experiment(repo, f"long-{stamp}-seed{s}" + (f"-{tag}" if tag else ""),
                           own | {"dpo.defaults.seed": s} | v["knobs"], targets)
            states[s][tag] = read_state(repo, names, specs, credit)
    held = json.loads((repo / "reports/token_reward/metrics.json").read_text())  # not re-run by any seed
    first = states[next(iter(states))][""]["blame"] if states else {}
    blame_agg = {}
    if source in first:
        blame_agg[own_agg] = first[source] | {"heldout_accuracy": held.get(f"heldout_accuracy_{own_agg}")}
    for agg in args.aggregators if source else []:
        if agg == own_agg:
            continue
        experiment(repo, f"long-{stamp}-{agg}", own | {"dpo.defaults.seed": own_seed, "token_reward.aggregator": agg},
                   [f"guidance@{source}"])
        with tempfile.TemporaryDirectory() as tmp:  # no policies: the credit stage's blame alone
            (Path(tmp) / "none").mkdir()
            subprocess.run([sys.executable, "-m", "stages.credit", "--model", "models/sft", "--prefs",
                            "data/label/prefs.jsonl", "--reference", "data/reference", "--guidance",
                            "data/guidance", "--policies", f"{tmp}/none",
                            "--out", f"{tmp}/credit"], cwd=repo, env=seeds.ENV, check=True)
            blame = json.loads(Path(f"{tmp}/credit/metrics.json").read_text())["blame"].get(source, {})
        held = json.loads((repo / "reports/token_reward/metrics.json").read_text())
        blame_agg[agg] = blame | {"heldout_accuracy": held.get(f"heldout_accuracy_{agg}")}
    return {"methods": methods, "variants": tags, "states": states, "blame_by_aggregator": blame_agg,
            "anchored": anchored(params, args.rows)}


def summarise(got: dict, seeds_: list[int], n_boot: int) -> dict:
    """End scores and their differences from `dpo`; credit's figures over seeds."""
    methods, states = got["methods"], got["states"]
    state = {m: {s: states[s][tag] for s in seeds_} for m, (_, tag) in methods.items()}
    metric = lambda m, key: {s: {i: v[key] for i, v in state[m][s]["scores"][m].items() if key in v}  # noqa: E731
                             for s in seeds_}
    keys = [k for k in ("pass", "step_score") if all(metric("dpo", k)[s] for s in seeds_)]
    end = {m: {k: compare(metric(m, k), None, n_boot) for k in keys} for m in methods}
    base = {m: next((b for b, (r, t) in methods.items() if r == "dpo" and t == tag and b != m), "dpo")
            for m, (_, tag) in methods.items()}  # dpo at the same learning rate; dpo_lr<x> against dpo
    paired = {m: {k: compare(metric(m, k), metric(base[m], k), n_boot) for k in keys} | {"baseline": base[m]}
              for m in methods if base[m] != m}
    goal = {m: goal_met(d["pass"]) for m, d in paired.items() if methods[m][0] not in SEQUENCE_LEVEL}
    anchor = {m: next(b for b, (r, t) in methods.items() if r == ANCHOR and t == tag)
              for m, (r, tag) in methods.items() if r in got["anchored"]}  # rpo at the same learning rate
    paired_anchor = {m: {k: compare(metric(m, k), metric(b, k), n_boot) for k in keys} | {"baseline": b}
                     for m, b in anchor.items()}
    sources = sorted({b for s in seeds_ for b in states[s][""]["blame"]})
    return {"end_scores": end, "paired_vs_dpo": paired, "paired_vs_rpo": paired_anchor,
            "goal": {"minus_dpo_pass_at_least": GOAL, "met": goal, "any": any(goal.values()),
                     "met_vs_rpo": {m: goal_met(d["pass"]) for m, d in paired_anchor.items()}},
            "training": {m: {s: state[m][s]["trained"][m] for s in seeds_} for m in methods},
            "blame": {b: over_seeds({s: states[s][""]["blame"].get(b) for s in seeds_},
                                    ("hit_rate", "chance", "lift", "rhat_before_wrong_step", "rhat_in_wrong_step"))
                      for b in sources},
            "blame_by_aggregator": got["blame_by_aggregator"],
            "displacement": {m: over_seeds({s: state[m][s]["displacement"][m] for s in seeds_}) for m in methods},
            "displacement_minus_dpo": {m: over_seeds({s: state[m][s]["minus_dpo"][m] for s in seeds_})
                                       for m in methods if base[m] != m}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="a repo where `dvc repro` has run with profiles/long.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=list(ROWS), help="dpo.variants rows, dpo first")
    p.add_argument("--scales", type=float, nargs="*", default=[],
                   help="learned-guidance scales besides the pipeline's (r_hat is standardised, then multiplied)")
    p.add_argument("--learning-rates", type=float, nargs="*", default=[],
                   help="DPO learning rates besides the pipeline's (dpo.defaults.learning_rate): every row again")
    p.add_argument("--aggregators", nargs="*", default=list(tr.AGGREGATORS), choices=list(tr.AGGREGATORS),
                   help="token-reward aggregators whose heads are scored for blame localisation")
    p.add_argument("--credit-seeds", choices=("all", "own"), default="all",
                   help="seeds whose experiments run the credit stage (blame, displacement): own = the pipeline's "
                        "own seed alone, which saves one credit run (~8 min at 497 pairs on 2 cores) a further seed")
    p.add_argument("--min-eval", type=int, default=500, help="refuse fewer held-out prompts with a gold verdict")
    p.add_argument("--min-pairs", type=int, default=400, help="refuse fewer response-level training pairs")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", default="bench/results/long_answers.json")
    p.add_argument("--plot", default="bench/results/long_answers_pairs.png")
    p.add_argument("--allow-dirty", action="store_true", help="write results from a tree with uncommitted changes")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    repo = Path(args.repo).resolve()
    params = config.read_yaml(repo / "params.yaml")
    check_rows(params, args.rows, str(repo / "params.yaml"))
    eval_rows = io.read_jsonl(repo / "data/prepare/eval.jsonl", "prompts")
    train_rows = io.read_jsonl(repo / "data/prepare/train.jsonl", "prompts")
    specs = {r["id"]: r["verifier"] or {} for r in eval_rows}
    gold_eval = [r for r in eval_rows if r["verifier"]]
    if len(gold_eval) < max(args.min_eval, 1):  # pass rates need a gold verdict on at least one prompt
        sys.exit(f"error: {repo / 'data/prepare/eval.jsonl'}: {len(gold_eval)} held-out prompts with a verifier, "
                 f"--min-eval {args.min_eval}: reproduce the repo with profiles/long.yaml")
    pairs = io.read_jsonl(repo / "data/label/prefs.jsonl", "prefs")
    if len(pairs) < args.min_pairs:
        sys.exit(f"error: {repo / 'data/label/prefs.jsonl'}: {len(pairs)} response-level pairs, --min-pairs "
                 f"{args.min_pairs}: raise prepare.n_train (this script's docstring, Size) and reproduce the repo")
    step_file = repo / "data/label/step_prefs.jsonl"
    step_pairs = io.read_jsonl(step_file, "prefs") if step_file.exists() else []
    step_rows = [r for r in args.rows if params["dpo"]["variants"][r].get("pairs") == "step"]
    if step_rows and not step_pairs:
        sys.exit(f"error: {step_file}: no step pairs for {', '.join(step_rows)}: reproduce the repo with "
                 "label.step_pairs: true (profiles/long.yaml)")
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=repo, capture_output=True).returncode:
        sys.exit(f"error: {repo}: no git commit: a DVC experiment starts from one (git add -A && git commit there)")
    if subprocess.run([*seeds.DVC, "status", "--quiet"], cwd=repo, env=seeds.ENV).returncode:
        sys.exit(f"error: {repo}: `dvc status` shows changed stages: run `dvc repro` there first (the pipeline's own "
                 "seed is read from its workspace as it stands)")
    for f in ("reports/credit/metrics.json", "reports/credit/pairs.png"):
        if not (repo / f).is_file():
            sys.exit(f"error: {repo / f}: missing: the pipeline's revision has no credit stage; reproduce it at this "
                     "checkout's revision")
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo / "reports/credit/pairs.png", args.plot)
    t0 = time.perf_counter()
    saved = seeds.snapshot(repo)
    try:
        got = run_benchmark(repo, params, args, specs)
    finally:
        seeds.restore(repo, saved)
    results = {"repo": str(repo), "pipeline": machine.repo_state(repo), "seeds": args.seeds, "rows": args.rows,
               "scales": args.scales, "learning_rates": args.learning_rates,
               "methods": {m: {"row": r, "variant": tag, "knobs": got["variants"][tag]["knobs"]}
                           for m, (r, tag) in got["methods"].items()},
               "settings": {"prepare": params["prepare"], "dpo": params["dpo"]["defaults"],
                            "guidance": params["guidance"]["sources"]},
               "params": params,  # the pipeline's whole params.yaml: its repo is a scratch clone
               "eval_prompts": len(gold_eval), "training_prompts": len(train_rows), "pairs": len(pairs),
               "step_pairs": len(step_pairs), "label": json.loads((repo / "data/label/stats.json").read_text()),
               "prompts_with_pairs": {
                   "response": len({pr["id"] for pr in pairs}),
                   "step": len({prompt_of(pr["id"]) for pr in step_pairs})},
               **summarise(got, args.seeds, args.n_boot), "plot": args.plot,
               "wall_s": round(time.perf_counter() - t0, 1)}
    machine.write_results(args.out, results, argv=machine.module_command("bench.long_answers", argv),
                          allow_dirty=args.allow_dirty)
    print(json.dumps({k: results[k] for k in ("paired_vs_dpo", "paired_vs_rpo", "goal")}, indent=1))
    return results


if __name__ == "__main__":
    main()
