"""TGDPO against DPO where token-level credit can matter: long worked answers, 3 training seeds, and the mechanism.

    cp profiles/long.yaml params.yaml && dvc repro     # the pipeline this reads (about an hour on 2 CPU cores)
    python -m bench.long_answers --repo .               # then this (about 2 hours on 2 CPU cores)

That run's tree is dirty (params.yaml is the profile), so for a results file with a clean revision run a clean
checkout's script from the pipeline repo's root, with only that checkout on the import path:
    cd run && PYTHONPATH=/path/to/clean python /path/to/clean/bench/long_answers.py --repo . --out /path/to/clean/...
    python -m bench.long_answers --repo . --seeds 0 1 2 --scales 1 4 10

Methods, each trained from the pipeline's SFT model on the pipeline's pairs (data/label/prefs.jsonl) with its
reference cache, and evaluated greedily on its held-out prompts (data/prepare/eval.jsonl, >= `--min-eval`):
- `dpo`;
- `tgdpo`: guidance = this seed's DPO model's induced reward, log pi_dpo - log pi_ref per token (the paper's recipe);
- `tgdpo_token_x<k>`: guidance = the pipeline's learned token reward (seed 001), standardised, times k for each
  `--scales` k. With alpha 0.5 and beta 0.1 a token's beta moves by 0.05 k r_hat: k = 1 is the pipeline's row
  (`tgdpo_token`), k = 10 lets the guidance halve or double a token's weight.
What varies with the seed is training only (LoRA initialisation, batch order), as in bench/seeds.py; the seed equal
to the pipeline's `dpo.defaults.seed` reuses the pipeline's dpo, tgdpo and tgdpo_token models and answers where they
exist.

Measured:
- end scores: gold pass rate and mean step score (share of right steps, `tasks.step_share`) per method, the mean
  over seeds with a 95% bootstrap interval over prompts (of the seed-averaged per-prompt figure) and a 95%
  t-interval over seeds; each TGDPO method minus DPO, paired by prompt and seed, both ways; and whether the goal
  (TGDPO - DPO >= +3 pass-rate points, paired interval above 0) is met;
- blame localisation (`posttrain.credit.blame`) on the pairs' rejected responses: for the DPO-induced guidance of
  each seed, and for the learned token reward trained with each aggregator (average, soft_max, soft_min; the
  pipeline's head, plus heads trained here for the others), against the chance rate;
- shared-prefix displacement (`posttrain.credit.displacement`) per method and seed: the mean change from the
  reference of the log-probs of the rejected responses' tokens before their first wrong step, and each method minus
  DPO paired by response (averaged over seeds);
- a picture of a few pairs, each token coloured by r_hat (`--plot`).

Writes `--out` (bench/results/long_answers.json) through `bench.machine.write_results`, and `--plot`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

from bench import machine
from bench.seeds import t_interval
from posttrain import credit, io, modeling, preference, stats, tasks
from posttrain import token_reward as tr
from stages import dpo, evaluate, guidance, token_reward

VARIANTS = {"dpo": {"loss": "dpo", "guidance": "data/reference"},
            "tgdpo": {"loss": "tgdpo", "guidance": "data/guidance/dpo"},
            "tgdpo_token": {"loss": "tgdpo", "guidance": "data/guidance/token_reward"}}
"""The dpo variants every method trains as (the guidance folder is passed per run), whatever the profile lists."""

CODE = Path(__file__).resolve().parents[1]
"""This checkout; the provenance (revision, dirty flag) is its own, not the pipeline repo's (whose params.yaml is the
long profile, so dirty by construction): run the script of a clean checkout from the pipeline repo's root."""

GOAL = 0.03
"""The issue's bar: TGDPO - DPO >= +3 pass-rate points, with the paired 95% interval above 0."""


def method_names(scales: list[float]) -> list[str]:
    return ["dpo", "tgdpo"] + [f"tgdpo_token_x{k:g}" for k in scales]


def bench_params(repo: Path, params: dict, seed: int, **blocks) -> dict:
    """The pipeline's params with `dpo.defaults.seed` = seed, MLflow runs into the repo's store under their own
    experiment, and `blocks` merged over their blocks (one level deep)."""
    out = copy.deepcopy(params)
    out["dpo"]["defaults"]["seed"] = seed
    uri = out["common"]["mlflow_uri"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        out["common"]["mlflow_uri"] = f"sqlite:///{repo / uri.removeprefix('sqlite:///')}"
    out["common"]["mlflow_experiment"] = "bench-long-answers"
    for block, values in blocks.items():
        out[block] = {**out[block], **values}
    return out


def write_params(path: Path, params: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


def end_scores(answers: list[dict], specs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per answered prompt: `pass` (gold score 1.0) and `step_score` (share of right steps), for worked tasks."""
    out = {}
    for a in answers:
        spec = specs[a["id"]]
        if spec.get("type") in tasks.PLANS:
            out[a["id"]] = {"pass": float(a["passed"]), "step_score": tasks.step_share(spec, a["response"])}
    return out


def seed_average(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """{seed: {id: x}} -> {id: mean over seeds}, over the ids every seed has."""
    ids = set.intersection(*(set(v) for v in per_seed.values()))
    return {i: statistics.fmean(v[i] for v in per_seed.values()) for i in sorted(ids)}


def compare(per_seed: dict[int, dict[str, float]], base: dict[int, dict[str, float]] | None, n_boot: int) -> dict:
    """A method's figure (minus the baseline's, paired by prompt and seed, when `base` is given): the mean, a 95%
    bootstrap interval over prompts of the seed-averaged per-prompt figure, and a 95% t-interval over seeds."""
    seeds = sorted(per_seed)
    if base is not None:
        per_seed = {s: {i: x - base[s][i] for i, x in per_seed[s].items() if i in base[s]} for s in seeds}
    by_prompt = list(seed_average(per_seed).values())
    per_seed_means = [statistics.fmean(per_seed[s].values()) for s in seeds]
    return {"mean": statistics.fmean(by_prompt), "ci_prompts": list(stats.bootstrap_ci(by_prompt, n_boot)),
            "prompts": len(by_prompt), "per_seed": dict(zip(seeds, per_seed_means, strict=True)),
            "seeds": t_interval(per_seed_means)}


def goal_met(diff: dict) -> bool:
    return diff["mean"] >= GOAL and diff["ci_prompts"][0] > 0


def _train(p: str, variant: str, repo: Path, guide: Path, out: Path) -> None:
    if not out.exists():
        dpo.main(["--params", p, "--variant", variant, "--model", str(repo / "models/sft"), "--prefs",
                  str(repo / "data/label/prefs.jsonl"), "--reference", str(repo / "data/reference"), "--guidance",
                  str(guide), "--out", str(out)])


def _guidance(p: str, name: str, model: Path, repo: Path, out: Path) -> Path:
    if not out.exists():
        guidance.main(["--params", p, "--name", name, "--model", str(model), "--prefs",
                       str(repo / "data/label/prefs.jsonl"), "--reference", str(repo / "data/reference"), "--out",
                       str(out)])
    return out / "rhat.jsonl"


def learned_guidance(repo: Path, params: dict, scales: list[float], work: Path) -> tuple[dict, dict, dict]:
    """The token reward heads (the pipeline's, and one trained here for each other aggregator), their r_hat at
    scale 1 for blame localisation, and the pipeline head's r_hat at each scale for training; shared by seeds."""
    seed = params["dpo"]["defaults"]["seed"]
    own = params["token_reward"]["aggregator"]
    heads, accuracy, blame_rhat = {}, {}, {}
    for agg in tr.AGGREGATORS:
        head = repo / "models/token_reward" if agg == own else work / f"token_reward/{agg}"
        metrics = repo / "reports/token_reward/metrics.json" if agg == own else work / f"token_reward/{agg}.json"
        if not head.exists():
            p = write_params(work / f"params/token_reward_{agg}.yaml",
                             bench_params(repo, params, seed, token_reward={"aggregator": agg}))
            token_reward.main(["--params", p, "--model", str(repo / "models/sft"), "--prefs",
                               str(repo / "data/label/prefs.jsonl"), "--out", str(head), "--metrics", str(metrics)])
        heads[agg] = head
        accuracy[agg] = json.loads(metrics.read_text()).get(f"heldout_accuracy_{agg}") if metrics.exists() else None
    by_scale = {}
    for k in sorted({1.0, *scales}):
        source = {"token_reward": {"kind": "token_reward", "model": str(heads[own]), "scale": float(k)}}
        p = write_params(work / f"params/guidance_x{k:g}.yaml",
                         bench_params(repo, params, seed, guidance={"sources": source}))
        by_scale[k] = _guidance(p, "token_reward", heads[own], repo, work / f"guidance/token_reward_{own}_x{k:g}")
    for agg in tr.AGGREGATORS:
        if agg == own:
            blame_rhat[agg] = by_scale[1.0]
            continue
        source = {"token_reward": {"kind": "token_reward", "model": str(heads[agg]), "scale": 1.0}}
        p = write_params(work / f"params/guidance_{agg}.yaml",
                         bench_params(repo, params, seed, guidance={"sources": source}))
        blame_rhat[agg] = _guidance(p, "token_reward", heads[agg], repo, work / f"guidance/token_reward_{agg}_x1")
    return by_scale, blame_rhat, accuracy


def reusable(repo: Path, params: dict, seed: int, scales: list[float]) -> dict[str, str]:
    """Method -> the pipeline's dpo variant trained exactly as the method would be here, for the pipeline's own
    seed: dpo, tgdpo (DPO-induced guidance) and tgdpo_token at the pipeline's guidance scale; those present."""
    if seed != params["dpo"]["defaults"]["seed"]:
        return {}
    scale = params["guidance"]["sources"].get("token_reward", {}).get("scale", 1.0)
    same = {"dpo": "dpo", "tgdpo": "tgdpo"} | ({f"tgdpo_token_x{scale:g}": "tgdpo_token"} if scale in scales else {})
    return {m: v for m, v in same.items() if (repo / f"models/dpo/{v}").exists()}


def run_seed(repo: Path, params: dict, seed: int, scales: list[float], learned: dict, work: Path) -> dict:
    """Train and evaluate every method for one seed. Returns per method its model and answers file, and the
    path of this seed's DPO-induced r_hat."""
    reused = reusable(repo, params, seed, scales)
    model_of = lambda m: repo / f"models/dpo/{reused[m]}" if m in reused else work / f"models/{m}"  # noqa: E731
    p = write_params(work / "params.yaml", bench_params(
        repo, params, seed, dpo={"variants": VARIANTS},
        guidance={"sources": {"dpo": {"kind": "dpo", "model": str(model_of("dpo"))}}}))
    _train(p, "dpo", repo, repo / "data/reference", model_of("dpo"))
    theirs = repo / "data/guidance/dpo"
    dpo_rhat = _guidance(p, "dpo", model_of("dpo"), repo,
                         theirs if "dpo" in reused and theirs.exists() else work / "guidance/dpo")
    _train(p, "tgdpo", repo, dpo_rhat.parent, model_of("tgdpo"))
    for k in scales:
        _train(p, "tgdpo_token", repo, learned[k].parent, model_of(f"tgdpo_token_x{k:g}"))
    out = {}
    for method in method_names(scales):
        model = model_of(method)
        answers = work / f"evaluate/{method}/answers.jsonl"
        if method in reused and (repo / f"reports/evaluate/{reused[method]}/answers.jsonl").exists():
            answers = repo / f"reports/evaluate/{reused[method]}/answers.jsonl"
        elif not answers.exists():
            evaluate.main(["--params", p, "--name", f"{method}-seed{seed}", "--model", str(model),
                           "--prompts", str(repo / "data/prepare/eval.jsonl"),
                           "--general", str(repo / "posttrain/data/general.txt"), "--out", str(answers.parent)])
        out[method] = {"model": model, "answers": answers}
    return {"methods": out, "dpo_rhat": dpo_rhat}


def policy_logps(model_dir: Path, tok, rows: list[dict], common: dict, cache: Path) -> dict[str, dict]:
    """Per-token log-probs of every pair's completions under a trained policy, cached as JSONL."""
    if not cache.exists():
        model = modeling.load_chain(model_dir, modeling.device_for(common["device"]), common["trust_remote_code"])
        preference.write_token_values(cache, preference.completion_logps(model, tok, rows, common["batch_size"]))
    return preference.read_token_values(cache)


def end_results(runs: dict, methods: list[str], specs: dict[str, dict], n_boot: int) -> tuple[dict, dict]:
    """Per method the pass rate and mean step score; per TGDPO method its difference from DPO, paired."""
    seeds = sorted(runs)
    scores = {m: {s: end_scores(io.read_jsonl(runs[s]["methods"][m]["answers"], "answers"), specs) for s in seeds}
              for m in methods}
    metric = lambda m, key: {s: {i: v[key] for i, v in scores[m][s].items()} for s in seeds}  # noqa: E731
    end = {m: {k: compare(metric(m, k), None, n_boot) for k in ("pass", "step_score")} for m in methods}
    paired = {m: {k: compare(metric(m, k), metric("dpo", k), n_boot) for k in ("pass", "step_score")}
              for m in methods if m != "dpo"}
    return end, paired


def mechanism(repo: Path, params: dict, runs: dict, methods: list[str], blame_rhat: dict, accuracy: dict,
              located: list[dict], tok, work: Path, n_boot: int) -> tuple[dict, dict]:
    """Blame localisation for each guidance source, and shared-prefix displacement for each method."""
    seeds = sorted(runs)
    ref = preference.read_token_values(repo / "data/reference/logps.jsonl")
    located = [r for r in located if r["id"] in ref]  # the caches cover the pairs the reference stage encoded
    blame = {f"dpo_induced_seed{s}": credit.blame(credit.attach(
        located, preference.read_token_values(runs[s]["dpo_rhat"]), "rhat"), n_boot) for s in seeds}
    blame["dpo_induced_mean_over_seeds"] = {k: t_interval([blame[f"dpo_induced_seed{s}"][k]["mean"] for s in seeds])
                                            for k in ("hit_rate", "chance", "lift")}
    for agg, path in blame_rhat.items():
        blame[f"token_reward_{agg}"] = credit.blame(credit.attach(
            located, preference.read_token_values(path), "rhat"), n_boot) | {"heldout_accuracy": accuracy[agg]}
    pairs = [pr for pr in io.read_jsonl(repo / "data/label/prefs.jsonl", "prefs") if pr["id"] in ref]
    rows, _ = preference.encoded_rows(tok, pairs, params["common"]["max_len"], str(repo / "data/label/prefs.jsonl"))
    common = params["common"] | {"batch_size": params["reference"]["batch_size"]}
    shift: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for s in seeds:
        for m in methods:
            logps = policy_logps(runs[s]["methods"][m]["model"], tok, rows, common, work / f"seed_{s}/logps/{m}.jsonl")
            shift[m][s] = credit.displacement(credit.attach(credit.attach(located, logps, "logp"), ref, "ref"), n_boot)
    displacement = {m: {"per_seed": {s: {k: v for k, v in shift[m][s].items() if k != "values"} for s in seeds},
                        "mean_over_seeds": t_interval([shift[m][s]["mean"] for s in seeds])} for m in methods}
    pooled = {m: seed_average({s: shift[m][s]["values"] for s in seeds}) for m in methods}
    for m in methods[1:]:
        displacement[m]["minus_dpo_by_response"] = credit.paired_difference(pooled[m], pooled["dpo"], n_boot)
    return blame, displacement


def picture(pairs: list[dict], located: list[dict], dpo_rhat: Path, learned_rhat: Path, label: str, tok,
            max_len: int, n: int, path: str) -> bool:
    """A few pairs: the chosen answer under the DPO-induced r_hat, the rejected one under it and under the learned
    token reward. False when no rejected answer has a correct first step."""
    induced, learned = preference.read_token_values(dpo_rhat), preference.read_token_values(learned_rhat)
    by_id = {pr["id"]: pr for pr in pairs}
    panels = []
    for ex in credit.pick_examples([r for r in located if r["id"] in induced and r["id"] in learned], n):
        pair, i = by_id[ex["id"]], ex["id"]
        panels += [credit.panel(f"{i} chosen, DPO-induced r_hat", pair["chosen"],
                                credit.token_spans(tok, pair, "chosen", max_len), induced[i]["chosen"], None),
                   credit.panel("rejected, DPO-induced r_hat", ex["text"], ex["spans"], induced[i]["rejected"],
                                ex["wrong"]),
                   credit.panel(f"rejected, {label}", ex["text"], ex["spans"], learned[i]["rejected"], ex["wrong"])]
    if panels:
        credit.plot_pairs(panels, path, "token guidance on worked answers (boxed: the first wrong step)")
    return bool(panels)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=".", help="a repo where `dvc repro` has run with profiles/long.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0, 10.0],
                   help="learned-guidance scales (r_hat is standardised, then multiplied by each)")
    p.add_argument("--min-eval", type=int, default=500, help="refuse fewer held-out prompts of worked tasks")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--examples", type=int, default=3, help="pairs in the picture")
    p.add_argument("--work", default="bench/work/long_answers", help="scratch folder (models, answers, caches)")
    p.add_argument("--out", default="bench/results/long_answers.json")
    p.add_argument("--plot", default="bench/results/long_answers_pairs.png")
    p.add_argument("--allow-dirty", action="store_true", help="write results from a tree with uncommitted changes")
    args = p.parse_args(argv)
    repo, work = Path(args.repo).resolve(), Path(args.work).resolve()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    sft_base, _ = modeling.model_chain(repo / "models/sft")
    if not sft_base.exists():  # adapter chains name their base relative to the repo root, as dvc ran them
        sys.exit(f"error: {repo / 'models/sft/chain.json'} names {sft_base}, not found from {Path.cwd()}: run this "
                 "from the repo's root")
    eval_rows = io.read_jsonl(repo / "data/prepare/eval.jsonl", "prompts")
    train_rows = io.read_jsonl(repo / "data/prepare/train.jsonl", "prompts")
    specs = {r["id"]: r["verifier"] or {} for r in eval_rows + train_rows}
    worked_eval = [r for r in eval_rows if specs[r["id"]].get("type") in tasks.PLANS]
    if len(worked_eval) < args.min_eval:
        sys.exit(f"error: {repo / 'data/prepare/eval.jsonl'}: {len(worked_eval)} held-out prompts of worked tasks, "
                 f"--min-eval {args.min_eval}: reproduce the repo with profiles/long.yaml")
    t0 = time.perf_counter()
    learned, blame_rhat, accuracy = learned_guidance(repo, params, args.scales, work / "shared")
    runs = {s: run_seed(repo, params, s, args.scales, learned, work / f"seed_{s}") for s in args.seeds}
    methods = method_names(args.scales)
    end, paired = end_results(runs, methods, specs, args.n_boot)

    tok = modeling.load_tokenizer(sft_base, padding_side="right")
    max_len = params["common"]["max_len"]
    pairs = io.read_jsonl(repo / "data/label/prefs.jsonl", "prefs")
    located, skipped = credit.locate(tok, pairs, specs, max_len)
    blame, displacement = mechanism(repo, params, runs, methods, blame_rhat, accuracy, located, tok, work,
                                    args.n_boot)
    own = params["token_reward"]["aggregator"]
    drawn = picture(pairs, located, runs[args.seeds[0]]["dpo_rhat"], blame_rhat[own],
                    f"learned token reward ({own})", tok, max_len, args.examples, args.plot)

    goal = {m: goal_met(d["pass"]) for m, d in paired.items()}
    results = {"repo": str(repo), "pipeline": machine.repo_state(repo), "seeds": args.seeds, "scales": args.scales,
               "methods": methods,
               "eval_prompts": len(worked_eval), "pairs": len(pairs), "pairs_located": len(located),
               "pairs_skipped": dict(skipped), "goal": {"tgdpo_minus_dpo_pass_at_least": GOAL, "met": goal},
               "end_scores": end, "paired_vs_dpo": paired, "blame": blame, "displacement": displacement,
               "plot": args.plot if drawn else None, "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out).resolve()
    with contextlib.chdir(CODE):  # provenance names the code that ran, which may sit outside the pipeline's repo
        machine.write_results(out, results, argv=machine.module_command("bench.long_answers", argv),
                              allow_dirty=args.allow_dirty)
    print(json.dumps({"paired_vs_dpo": paired, "goal_met": goal}, indent=1))
    return results


if __name__ == "__main__":
    main()
