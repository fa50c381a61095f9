"""Token- and step-level credit against plain DPO on long worked answers: 3 training seeds, and the mechanism.

    cp profiles/long.yaml params.yaml          # then set prepare.n_train: 1600 in it (>= 400 pairs: see Size)
    dvc repro                                   # the pipeline this reads (about 2.2 hours on 2 CPU cores at 1600)
    python -m bench.long_answers --repo .       # then this (about 3 hours on 2 CPU cores at 1600)

That run's tree is dirty (params.yaml is the profile), so for a results file with a clean revision run a clean
checkout's script from the pipeline repo's root, with only that checkout on the import path:
    cd run && PYTHONPATH=/path/to/clean python /path/to/clean/bench/long_answers.py --repo . --out /path/to/clean/...
    python -m bench.long_answers --repo . --seeds 0 1 2 --scales 1 4 10

Methods (`method_rows`), each trained from the pipeline's SFT model as a row of `VARIANTS` (profiles/long.yaml's rows
of the same names) on pairs from the same samples of the same training prompts (data/prepare/train.jsonl), and
evaluated greedily on its held-out prompts (data/prepare/eval.jsonl, >= `--min-eval`):
- `dpo` (plain DPO) and `rpo` (DPO + NLL of the chosen answer) on label's response-level pairs (prefs.jsonl);
- `tgdpo`: the paper's form, guidance = this seed's DPO model's induced reward, log pi_dpo - log pi_ref per token;
- `tgdpo_cancel`: the same with `cancel_shared_prefix` (the tokens chosen and rejected share from the start get
  beta on both sides and cancel, as in DPO);
- `tgdpo_token_x<k>` and `tgdpo_cancel_token_x<k>`: both forms with the pipeline's learned token reward (seed 001),
  standardised, times k for each `--scales` k (default 1, the pipeline's rows `tgdpo_token`, `tgdpo_cancel_token`).
  With alpha 0.5 and beta 0.1 a token's beta moves by 0.05 k r_hat: k = 10 lets the guidance halve or double it;
- `step_dpo`: plain DPO on label's Step-DPO pairs (step_prefs.jsonl, all-wrong prompts included), with the
  reference stage's step_logps.jsonl: the pipeline's where its reference ran with `--step-prefs` (dvc.yaml), else
  made here the same way (`step_reference`).
What varies with the seed is training only (LoRA initialisation, batch order), as in bench/seeds.py; the seed equal
to the pipeline's `dpo.defaults.seed` reuses the pipeline's models and answers of the rows whose params equal
`VARIANTS`'s (`reusable`).

Measured:
- end scores: gold pass rate and mean step score (share of right steps, `tasks.step_share`) per method, the mean
  over seeds with a 95% bootstrap interval over prompts (of the seed-averaged per-prompt figure) and a 95%
  t-interval over seeds; every other method minus plain DPO, paired by prompt and seed, both ways; and whether the
  goal (a token- or step-level method - DPO >= +3 pass-rate points, paired interval above 0) is met;
- training: each method's final reward accuracy and margin on its own training pairs (are step pairs learned?),
  for the runs trained here;
- blame localisation (`posttrain.credit.blame`) on the pairs' rejected responses: for the DPO-induced guidance of
  each seed, and for the learned token reward trained with each aggregator (average, soft_max, soft_min; the
  pipeline's head, plus heads trained here for the others), against the chance rate;
- shared-prefix displacement (`posttrain.credit.displacement`) per method and seed, Step-DPO included: the mean
  change from the reference of the log-probs of the response-level pairs' rejected tokens before their first wrong
  step, and each method minus DPO paired by response (averaged over seeds);
- a picture of a few pairs, each token coloured by r_hat (`--plot`).

Size (issue 22 asks for >= 400 response-level training pairs; `--min-pairs` refuses fewer): the knob is the
number of training prompts, `prepare.n_train`, not samples. A prompt gives at most one response-level pair, and
only when one of its samples is right: the one long run (bench/results/long_pipeline.json, 500 prompts x 4
samples) gave 134 pairs (0.27 a prompt: mul_steps, half the mix, passes 0.008, so its prompts give almost none),
which more samples cannot lift past the ~250 chain_add prompts. `prepare.n_train: 1600` gives ~430 at that rate
(~830 at the profile's planned 0.52), with ~2 step pairs a prompt (label.step_pairs_per_prompt) besides.
Estimated cost on 2 CPU cores, profiles/long.yaml's per-stage comments scaled by prompts and pairs: the pipeline
generate ~720 s -> ~2300 s, reference ~60 s -> ~7 min (the step pairs too), a response-level dpo row ~150 s ->
~245 s (54 steps), step_dpo ~14 min (~2700 shorter pairs), evaluate unchanged (~200 s a model): ~2.2 hours in all.
This script, at the default `--scales 1` (7 methods): a fresh seed ~75 minutes (7 trainings ~38 min, 7 evaluations
~23 min, 7 policy passes for displacement ~12 min), the pipeline's own seed ~12 minutes (its models reused), the
token-reward heads and their guidance ~10 minutes: ~3 hours for 3 seeds; each further scale adds ~35 minutes a
fresh seed.

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
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench import machine
from bench.seeds import t_interval
from posttrain import config, credit, io, modeling, preference, stats, tasks
from posttrain import token_reward as tr
from stages import dpo, evaluate, guidance, reference, token_reward

VARIANTS = {"dpo": {"loss": "dpo", "guidance": "data/reference"},
            "rpo": {"loss": "rpo", "guidance": "data/reference"},
            "tgdpo": {"loss": "tgdpo", "guidance": "data/guidance/dpo"},
            "tgdpo_token": {"loss": "tgdpo", "guidance": "data/guidance/token_reward"},
            "tgdpo_cancel": {"loss": "tgdpo", "guidance": "data/guidance/dpo", "cancel_shared_prefix": True},
            "tgdpo_cancel_token": {"loss": "tgdpo", "guidance": "data/guidance/token_reward",
                                   "cancel_shared_prefix": True},
            "step_dpo": {"loss": "dpo", "guidance": "data/reference", "pairs": "step"}}
"""The dpo rows every method trains as (the guidance folder is passed per run), whatever the profile lists:
profiles/long.yaml's rows of these names, as a test checks."""

SEQUENCE_LEVEL = ("dpo", "rpo")
"""Methods with neither token guidance nor step pairs: the goal is for the others."""

CODE = Path(__file__).resolve().parents[1]
"""This checkout; the provenance (revision, dirty flag) is its own, not the pipeline repo's (whose params.yaml is the
long profile, so dirty by construction): run the script of a clean checkout from the pipeline repo's root."""

GOAL = 0.03
"""The issue's bar: a token- or step-level method - DPO >= +3 pass-rate points, with the paired 95% interval above
0, at equal training prompts."""


@dataclass(frozen=True)
class Method:
    variant: str
    """A key of VARIANTS."""
    guidance: str
    """`reference` (an unguided loss), `dpo` (this seed's DPO-induced r_hat) or `token` (the learned token reward
    at `scale`)."""
    scale: float | None = None


def method_rows(scales: list[float]) -> dict[str, Method]:
    """Method name -> how it trains, in the order of the results (plain DPO first: the others are paired with it)."""
    out = {"dpo": Method("dpo", "reference"), "rpo": Method("rpo", "reference"), "tgdpo": Method("tgdpo", "dpo"),
           "tgdpo_cancel": Method("tgdpo_cancel", "dpo")}
    for k in scales:
        out[f"tgdpo_token_x{k:g}"] = Method("tgdpo_token", "token", k)
        out[f"tgdpo_cancel_token_x{k:g}"] = Method("tgdpo_cancel_token", "token", k)
    return out | {"step_dpo": Method("step_dpo", "reference")}


def method_names(scales: list[float]) -> list[str]:
    return list(method_rows(scales))


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


def prompt_of(pair_id: str) -> str:
    """The training prompt a pair comes from: a step pair's id is `<prompt id>.step<k>.<sample>` (step_pairs)."""
    return pair_id.rsplit(".step", 1)[0]


def train_argv(p: str, variant: str, repo: Path, guide: Path, ref: Path, out: Path) -> list[str]:
    """dpo's arguments for one method, as dvc.yaml gives them: label's response and step pairs (a row reads the
    ones its `pairs` names), the reference folder (`ref`: step_dpo's holds step_logps.jsonl) and the guidance."""
    return ["--params", p, "--variant", variant, "--model", str(repo / "models/sft"), "--prefs",
            str(repo / "data/label/prefs.jsonl"), "--step-prefs", str(repo / "data/label/step_prefs.jsonl"),
            "--reference", str(ref), "--guidance", str(guide), "--out", str(out)]


def _train(argv: list[str], out: Path, record: Path) -> dict | None:
    """Train unless `out` exists. The stage's metrics (final reward accuracy and margin on its own training pairs)
    are kept in `record`; None for a model trained elsewhere (the pipeline's)."""
    if not out.exists():
        io.write_json(record, dpo.main(argv))
    return json.loads(record.read_text()) if record.exists() else None


def step_reference(repo: Path, p: str, work: Path) -> Path:
    """The reference folder step_dpo trains with: the pipeline's where its reference stage cached label's step pairs
    (dvc.yaml passes --step-prefs), else one made here by the same stage with --step-prefs."""
    if (repo / "data/reference/step_logps.jsonl").exists():
        return repo / "data/reference"
    out = work / "reference"
    if not out.exists():
        reference.main(["--params", p, "--model", str(repo / "models/sft"), "--prefs",
                        str(repo / "data/label/prefs.jsonl"), "--step-prefs",
                        str(repo / "data/label/step_prefs.jsonl"), "--out", str(out)])
    return out


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


def same_row(params: dict, variant: str) -> bool:
    """Whether the pipeline's row `variant` resolves to what VARIANTS[variant] does (loss, its params, pairs,
    guidance folder, training knobs)."""
    theirs = params["dpo"].get("variants", {}).get(variant)
    if theirs is None:
        return False
    parsed = config.parse(dpo.DpoParams, params["dpo"], "params.yaml: dpo")
    both = dpo.DpoParams(defaults=parsed.defaults, variants={"pipeline": theirs, "bench": VARIANTS[variant]})
    return dpo.resolve(both, "pipeline", "params.yaml") == dpo.resolve(both, "bench", "bench")


def reusable(repo: Path, params: dict, seed: int, scales: list[float]) -> dict[str, str]:
    """Method -> the pipeline's dpo row trained exactly as the method would be here, for the pipeline's own seed:
    the rows with a model whose params equal VARIANTS's; DPO-induced rows only with the pipeline's `dpo` reused
    and guiding them, learned ones at the pipeline's guidance scale."""
    if seed != params["dpo"]["defaults"]["seed"]:
        return {}
    sources = params["guidance"]["sources"]
    scale = sources.get("token_reward", {}).get("scale", 1.0)
    out = {name: m.variant for name, m in method_rows(scales).items()
           if (m.guidance != "token" or m.scale == scale) and same_row(params, m.variant)
           and (repo / f"models/dpo/{m.variant}").exists()}
    if "dpo" not in out or Path(sources.get("dpo", {}).get("model", "")) != Path("models/dpo/dpo"):
        out = {name: v for name, v in out.items() if method_rows(scales)[name].guidance != "dpo"}
    return out


def run_seed(repo: Path, params: dict, seed: int, scales: list[float], learned: dict, step_ref: Path,
             work: Path) -> dict:
    """Train and evaluate every method for one seed. Returns per method its model and answers file, its training
    metrics (None where reused), and the path of this seed's DPO-induced r_hat."""
    reused = reusable(repo, params, seed, scales)
    model_of = lambda m: repo / f"models/dpo/{reused[m]}" if m in reused else work / f"models/{m}"  # noqa: E731
    p = write_params(work / "params.yaml", bench_params(
        repo, params, seed, dpo={"variants": VARIANTS},
        guidance={"sources": {"dpo": {"kind": "dpo", "model": str(model_of("dpo"))}}}))
    ref = repo / "data/reference"
    trained = {"dpo": _train(train_argv(p, "dpo", repo, ref, ref, model_of("dpo")), model_of("dpo"),
                             work / "train/dpo.json")}
    theirs = repo / "data/guidance/dpo"
    dpo_rhat = _guidance(p, "dpo", model_of("dpo"), repo,
                         theirs if "dpo" in reused and theirs.exists() else work / "guidance/dpo")
    for name, m in method_rows(scales).items():
        if name == "dpo":
            continue
        guide = learned[m.scale].parent if m.guidance == "token" else dpo_rhat.parent if m.guidance == "dpo" else ref
        rows_ref = step_ref if VARIANTS[m.variant].get("pairs") == "step" else ref
        trained[name] = _train(train_argv(p, m.variant, repo, guide, rows_ref, model_of(name)), model_of(name),
                               work / f"train/{name}.json")
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
    return {"methods": out, "dpo_rhat": dpo_rhat, "trained": trained}


def policy_logps(model_dir: Path, tok, rows: list[dict], common: dict, cache: Path) -> dict[str, dict]:
    """Per-token log-probs of every pair's completions under a trained policy, cached as JSONL."""
    if not cache.exists():
        model = modeling.load_chain(model_dir, modeling.device_for(common["device"]), common["trust_remote_code"])
        preference.write_token_values(cache, preference.completion_logps(model, tok, rows, common["batch_size"]))
    return preference.read_token_values(cache)


def end_results(runs: dict, methods: list[str], specs: dict[str, dict], n_boot: int) -> tuple[dict, dict]:
    """Per method the pass rate and mean step score; per other method its difference from DPO, paired."""
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
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="learned-guidance scales (r_hat is standardised, then multiplied by each)")
    p.add_argument("--min-eval", type=int, default=500, help="refuse fewer held-out prompts of worked tasks")
    p.add_argument("--min-pairs", type=int, default=400, help="refuse fewer response-level training pairs")
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
    pairs = io.read_jsonl(repo / "data/label/prefs.jsonl", "prefs")
    if len(pairs) < args.min_pairs:
        sys.exit(f"error: {repo / 'data/label/prefs.jsonl'}: {len(pairs)} response-level pairs, --min-pairs "
                 f"{args.min_pairs}: raise prepare.n_train (this script's docstring, Size) and reproduce the repo")
    if not (repo / "data/label/step_prefs.jsonl").exists():
        sys.exit(f"error: {repo / 'data/label/step_prefs.jsonl'}: no step pairs for step_dpo: reproduce the repo "
                 "with label.step_pairs: true (profiles/long.yaml)")
    step_pairs = io.read_jsonl(repo / "data/label/step_prefs.jsonl", "prefs")
    t0 = time.perf_counter()
    shared = work / "shared"
    step_ref = step_reference(repo, write_params(shared / "params.yaml", bench_params(
        repo, params, params["dpo"]["defaults"]["seed"])), shared)
    learned, blame_rhat, accuracy = learned_guidance(repo, params, args.scales, shared)
    runs = {s: run_seed(repo, params, s, args.scales, learned, step_ref, work / f"seed_{s}") for s in args.seeds}
    methods = method_names(args.scales)
    end, paired = end_results(runs, methods, specs, args.n_boot)

    tok = modeling.load_tokenizer(sft_base, padding_side="right")
    max_len = params["common"]["max_len"]
    located, skipped = credit.locate(tok, pairs, specs, max_len)
    blame, displacement = mechanism(repo, params, runs, methods, blame_rhat, accuracy, located, tok, work,
                                    args.n_boot)
    own = params["token_reward"]["aggregator"]
    drawn = picture(pairs, located, runs[args.seeds[0]]["dpo_rhat"], blame_rhat[own],
                    f"learned token reward ({own})", tok, max_len, args.examples, args.plot)

    goal = {m: goal_met(d["pass"]) for m, d in paired.items() if m not in SEQUENCE_LEVEL}
    results = {"repo": str(repo), "pipeline": machine.repo_state(repo), "seeds": args.seeds, "scales": args.scales,
               "methods": methods, "variants": {m: VARIANTS[r.variant] for m, r in method_rows(args.scales).items()},
               "eval_prompts": len(worked_eval), "training_prompts": len(train_rows), "pairs": len(pairs),
               "step_pairs": len(step_pairs), "prompts_with_pairs": {
                   "response": len({pr["id"] for pr in pairs}),
                   "step": len({prompt_of(pr["id"]) for pr in step_pairs})},
               "pairs_located": len(located), "pairs_skipped": dict(skipped),
               "goal": {"minus_dpo_pass_at_least": GOAL, "met": goal, "any": any(goal.values())},
               "end_scores": end, "paired_vs_dpo": paired,
               "training": {m: {s: runs[s]["trained"][m] for s in args.seeds} for m in methods},
               "blame": blame, "displacement": displacement,
               "plot": args.plot if drawn else None, "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out).resolve()
    with contextlib.chdir(CODE):  # provenance names the code that ran, which may sit outside the pipeline's repo
        machine.write_results(out, results, argv=machine.module_command("bench.long_answers", argv),
                              allow_dirty=args.allow_dirty)
    print(json.dumps({"paired_vs_dpo": paired, "goal_met": goal}, indent=1))
    return results


if __name__ == "__main__":
    main()
