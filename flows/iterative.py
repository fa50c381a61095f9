"""iterative: online (iterative) DPO in rounds, each on fresh prompts sampled from the champion (seed 002 §7.5).

    python -m flows.iterative                   # one round: the next, or the unfinished one resumed
    python -m flows.iterative --rounds 3        # three more rounds
    python -m flows.iterative --round 2         # reproduce / resume round 2 from rounds/round_2.yaml (no-op if done)
    python -m flows.iterative serve --interval 3600   # a Prefect deployment: each scheduled run adds one round
    python -m flows.iterative deploy --pool posttrain --interval 3600   # the same on a work pool (docs/team.md)
    python -m flows.iterative compare           # the rounds as a table, read from the MLflow store

It reads the pipeline's outputs (`models/sft`, `data/prepare`), so it runs after `dvc repro`. Round k:
1. prompts: `iterative.prompts_per_round` new prompts from the task suite (`posttrain.tasks`, `prepare.task_mix`),
   drawn with the round's seed (common.seed + 1000 k), none of them in `data/prepare` (train, eval, sft) or in an
   earlier round;
2. generate (`iterative.n_samples` from the champion) -> label -> reference (`iterative.reference`, models/sft by
   default) -> [TGDPO only: token_reward or a DPO guide, then guidance, on this round's pairs] -> dpo
   (`iterative.variant`, a new LoRA on the champion) -> evaluate on `data/prepare/eval.jsonl`;
3. promote: the candidate becomes champion iff the lower end of the paired bootstrap interval (`promote.level`,
   resampling eval prompts) of pass rate(candidate) - pass rate(champion) exceeds `promote.min_gain`.

Stages run in this process through their `main([...])` (each in its own process under `common.launcher`) with
`rounds/round_<k>.yaml` as params file: the params the round started with (common.seed and generate.n_samples set
for the round) plus a `round:` block with the champion, the reference and the exact command of every step. A step
whose output exists is skipped and every output is written atomically, so a crashed round resumes where it stopped
(dpo from `<out>.ckpt`); a finished round (`decision.json` present) is left alone. Each finished round folder is
then `dvc add`ed (`rounds/round_<k>.dvc`; no dvc.yaml stage, so `dvc repro` never runs a round).

MLflow: a parent run `iterative` per flow run, a nested run `round_<k>` holding the decision's metrics, and under it
one run per stage execution. Every candidate becomes a version of the registered model `iterative.registered_model`;
the alias `champion` moves to it only on promotion.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import importlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from posttrain import config, io, stats, tasks, tracking

ROUNDS = Path("rounds")
PREPARE = Path("data/prepare")
EVAL_PROMPTS = PREPARE / "eval.jsonl"
DEPLOYMENT = "iterative-dpo"
ALIAS = "champion"


@dataclass
class Promote:
    level: float = 0.95
    """Two-sided level of the paired bootstrap interval of the pass-rate gain."""
    min_gain: float = 0.0
    """Promote iff the interval's lower end exceeds this: 0 = better than the champion beyond resampling noise."""

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if not -1 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be in [-1, 1), got {self.min_gain}")


@dataclass
class IterativeParams:
    prompts_per_round: int = 600
    """Fresh training prompts per round; each gives at most one pair."""
    n_samples: int = 4
    """Responses per prompt sampled from the champion (overrides generate.n_samples in the round)."""
    variant: str = "dpo"
    """A key of dpo.variants; a tgdpo variant re-computes its guidance source on each round's pairs."""
    initial: str = "models/sft"
    """Round 1's champion."""
    reference: str = "models/sft"
    """Reference model of every round's DPO; 'champion' = the round's starting policy."""
    promote: Promote = field(default_factory=Promote)
    registered_model: str = "posttrain-policy"
    """MLflow Model Registry name; its alias `champion` names the current champion."""

    def __post_init__(self) -> None:
        if self.prompts_per_round < 1:
            raise ValueError(f"prompts_per_round must be >= 1, got {self.prompts_per_round}")
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 to form a pair, got {self.n_samples}")


@dataclass
class Step:
    name: str
    module: str
    """stages.<module>.main is called with `argv`."""
    argv: list[str]
    done: Path
    """Written last by the step: it exists iff the step finished."""

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", f"stages.{self.module}", *self.argv])


def round_dir(k: int) -> Path:
    return ROUNDS / f"round_{k}"


def spec_path(k: int) -> Path:
    return ROUNDS / f"round_{k}.yaml"


def decision_path(k: int) -> Path:
    return round_dir(k) / "decision.json"


def started_rounds() -> list[int]:
    """Rounds with a params file (written when a round starts)."""
    found = (re.fullmatch(r"round_(\d+)\.yaml", p.name) for p in ROUNDS.glob("round_*.yaml"))
    return sorted(int(m.group(1)) for m in found if m)


def next_round() -> int:
    """The lowest started round without a decision, else one past the last."""
    started = started_rounds()
    unfinished = [k for k in started if not decision_path(k).exists()]
    return unfinished[0] if unfinished else max(started, default=0) + 1


def _user_text(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def draw_prompts(k: int, n: int, seed: int, task_mix: dict[str, float], exclude: list[str]) -> list[dict]:
    """`n` distinct task-suite prompts for round k, none of them in the `exclude` files (prompts/sft JSONL)."""
    seen = {_user_text(r["messages"]) for path in exclude for r in io.read_jsonl(path, "chat")}
    rng = random.Random(seed)
    names = sorted(task_mix)
    weights = [task_mix[t] for t in names]
    rows: list[dict] = []
    for _ in range(n * 50):
        if len(rows) == n:
            break
        row = tasks.make_prompt(rng.choices(names, weights)[0], rng)
        if _user_text(row["messages"]) in seen:
            continue
        seen.add(_user_text(row["messages"]))
        rows.append({"id": f"r{k}-{row['task']}-{len(rows):05d}"} | row)
    if len(rows) < n:
        raise ValueError(f"round {k}: only {len(rows)} new prompts exist for task_mix {task_mix} outside "
                         f"{len(seen)} used ones, {n} asked (iterative.prompts_per_round)")
    return rows


def new_spec(k: int, data: dict, where: str) -> dict:
    """Round k's params file: the current params with the round's seed and sample count, and its `round:` block."""
    it = config.parse(IterativeParams, data.get("iterative"), f"{where}: iterative")
    common = config.parse(config.Common, data.get("common"), f"{where}: common")
    if (data.get("prepare") or {}).get("source", "builtin") != "builtin":
        raise config.ParamsError(f"{where}: prepare.source: iterative rounds draw fresh prompts from the built-in "
                                 "task suite; a user data set has no generator of new prompts")
    if k == 1:
        champion, champion_eval = it.initial, str(round_dir(1) / "champion_eval")
    else:
        if not decision_path(k - 1).exists():
            raise RuntimeError(f"round {k - 1} is not finished ({decision_path(k - 1)} is missing): run it first")
        prev = json.loads(decision_path(k - 1).read_text())
        champion, champion_eval = prev["champion"], prev["champion_eval"]
    spec = copy.deepcopy(data)
    seed = common.seed + 1000 * k
    spec["common"]["seed"] = seed
    spec.setdefault("generate", {})["n_samples"] = it.n_samples
    exclude = [str(PREPARE / f"{s}.jsonl") for s in ("train", "eval", "sft")] + [
        str(round_dir(j) / "prompts.jsonl") for j in range(1, k)]
    spec["round"] = {"k": k, "seed": seed, "champion": champion, "champion_eval": champion_eval,
                     "reference": champion if it.reference == "champion" else it.reference,
                     "variant": it.variant, "exclude": exclude, "git_revision": tracking.git_revision()}
    spec["round"]["commands"] = {s.name: s.command for s in plan(spec)}
    return spec


def plan(spec: dict) -> list[Step]:
    """The stage executions of a round, in order."""
    from stages import dpo

    r = spec["round"]
    k, d = r["k"], round_dir(r["k"])
    params = ["--params", str(spec_path(k))]
    prefs, reference = str(d / "label" / "prefs.jsonl"), str(d / "reference")
    steps = [
        Step("generate", "generate", params + ["--model", r["champion"], "--prompts", str(d / "prompts.jsonl"),
                                               "--out", str(d / "samples.jsonl")], d / "samples.jsonl"),
        Step("label", "label", params + ["--samples", str(d / "samples.jsonl"), "--out", str(d / "label")],
             d / "label"),
        Step("reference", "reference", params + ["--model", r["reference"], "--prefs", prefs, "--out", reference],
             d / "reference"),
    ]
    where = str(spec_path(k))
    dpo_params = config.parse(dpo.DpoParams, spec.get("dpo"), f"{where}: dpo")
    variant = dpo.resolve(dpo_params, r["variant"], where)
    guidance = reference
    if variant.loss == "tgdpo":
        # the variant's guidance folder (data/guidance/<source>) names the source; re-made on this round's pairs
        source_name = Path(variant.guidance).name
        source = (spec.get("guidance", {}).get("sources") or {}).get(source_name)
        if source is None:
            raise config.ParamsError(f"{where}: dpo.variants.{r['variant']}.guidance: no guidance.sources."
                                     f"{source_name}")
        if source.get("kind", "dpo") == "token_reward":  # its backbone: the reference, as models/sft in dvc.yaml
            guide, metrics = d / "token_reward", d / "token_reward_metrics.json"
            steps.append(Step("token_reward", "token_reward", params + [
                "--model", r["reference"], "--prefs", prefs, "--out", str(guide), "--metrics", str(metrics)],
                metrics))
        else:  # the paper's recipe: the DPO-induced token reward of a DPO model trained on the same pairs
            guide = d / "guide"
            steps.append(Step("guide", "dpo", params + [
                "--variant", Path(source.get("model", "models/dpo/dpo")).name, "--model", r["champion"],
                "--prefs", prefs, "--reference", reference, "--guidance", reference, "--out", str(guide)], guide))
        guidance = str(d / "guidance")
        steps.append(Step("guidance", "guidance", params + [
            "--name", source_name, "--model", str(guide), "--prefs", prefs, "--reference", reference,
            "--out", guidance], d / "guidance"))
    steps += [
        Step("dpo", "dpo", params + ["--variant", r["variant"], "--model", r["champion"], "--prefs", prefs,
                                     "--reference", reference, "--guidance", guidance, "--out", str(d / "model")],
             d / "model"),
        Step("evaluate", "evaluate", params + ["--name", f"round_{k}", "--model", str(d / "model"),
                                               "--prompts", str(EVAL_PROMPTS), "--out", str(d / "eval")],
             d / "eval"),
    ]
    if Path(r["champion_eval"]) == d / "champion_eval":  # round 1: the initial model has no eval yet
        steps.append(Step("evaluate_champion", "evaluate", params + [
            "--name", Path(r["champion"]).name, "--model", r["champion"], "--prompts", str(EVAL_PROMPTS),
            "--out", r["champion_eval"]], Path(r["champion_eval"])))
    return steps


@task(task_run_name="round_{k}: prompts", cache_policy=NO_CACHE)
def prompts_task(k: int, spec: dict) -> int:
    out = round_dir(k) / "prompts.jsonl"
    if out.exists():
        return len(io.read_jsonl(out, "prompts"))
    it = config.parse(IterativeParams, spec.get("iterative"), f"{spec_path(k)}: iterative")
    mix = (spec.get("prepare") or {}).get("task_mix") or {"add": 1.0}
    rows = draw_prompts(k, it.prompts_per_round, spec["round"]["seed"], mix, spec["round"]["exclude"])
    io.write_jsonl(out, rows)
    return len(rows)


@task(task_run_name="round_{k}: {step.name}", cache_policy=NO_CACHE)
def stage_task(k: int, step: Step, parent_run_id: str, own_process: bool = False) -> str:
    """Run one stage under the round's MLflow run; 'skipped' when its output exists.

    In this process (one import of torch for the whole round), or with `own_process` as its own `python -m`
    (needed under `common.launcher`, where a training stage replaces its process by `accelerate launch`)."""
    log = get_run_logger()
    if step.done.exists():
        log.info("%s: %s exists, skipped", step.name, step.done)
        return "skipped"
    log.info("%s", step.command)
    if own_process:
        proc = subprocess.run([sys.executable, "-m", f"stages.{step.module}", *step.argv],
                              env=os.environ | {"MLFLOW_PARENT_RUN_ID": parent_run_id})
        if proc.returncode != 0:
            raise RuntimeError(f"round {k}: {step.command} failed with exit code {proc.returncode}")
        return "ran"
    before = os.environ.get("MLFLOW_PARENT_RUN_ID")
    os.environ["MLFLOW_PARENT_RUN_ID"] = parent_run_id
    try:
        importlib.import_module(f"stages.{step.module}").main(step.argv)
    except SystemExit as e:  # cli.execute exits on bad input or params with the message alone
        raise RuntimeError(f"round {k}: {step.command} failed: {e.code}") from None
    finally:
        if before is None:
            os.environ.pop("MLFLOW_PARENT_RUN_ID", None)
        else:
            os.environ["MLFLOW_PARENT_RUN_ID"] = before
    return "ran"


def paired_gain(candidate: Path, champion: Path, n_boot: int, seed: int, level: float) -> tuple[float, float, float]:
    """Mean and bootstrap interval of passed(candidate) - passed(champion) over the same eval prompts."""
    a = {r["id"]: float(r["passed"]) for r in io.read_jsonl(candidate / "answers.jsonl", "answers")}
    b = {r["id"]: float(r["passed"]) for r in io.read_jsonl(champion / "answers.jsonl", "answers")}
    if a.keys() != b.keys():
        raise io.InputError(f"{candidate} and {champion} answered different eval prompts: no paired comparison")
    diffs = [a[i] - b[i] for i in sorted(a)]
    lo, hi = stats.bootstrap_ci(diffs, n_boot, seed, level)
    return sum(diffs) / len(diffs), lo, hi


def decide(spec: dict) -> dict:
    r = spec["round"]
    d = round_dir(r["k"])
    it = config.parse(IterativeParams, spec.get("iterative"), f"{spec_path(r['k'])}: iterative")
    n_boot = (spec.get("evaluate") or {}).get("n_bootstrap", 1000)
    cand = json.loads((d / "eval" / "metrics.json").read_text())
    champ = json.loads((Path(r["champion_eval"]) / "metrics.json").read_text())
    gain, lo, hi = paired_gain(d / "eval", Path(r["champion_eval"]), n_boot, r["seed"], it.promote.level)
    promoted = lo > it.promote.min_gain
    label = json.loads((d / "label" / "stats.json").read_text())
    return {
        "round": r["k"], "candidate": str(d / "model"), "champion_before": r["champion"],
        "candidate_pass_rate": cand["pass_rate"], "candidate_pass_rate_ci": cand["pass_rate_ci"],
        "champion_pass_rate": champ["pass_rate"], "champion_pass_rate_ci": champ["pass_rate_ci"],
        "gain": gain, "gain_ci": [lo, hi], "n_eval": cand["n"], "pairs": label["pairs"],
        "rule": f"promote iff the lower end of the {it.promote.level:.0%} paired bootstrap interval of pass rate "
                f"(candidate - champion) over the {cand['n']} eval prompts > {it.promote.min_gain}",
        "promoted": promoted,
        "champion": str(d / "model") if promoted else r["champion"],
        "champion_eval": str(d / "eval") if promoted else r["champion_eval"],
    }


# --- MLflow: runs and the Model Registry ----------------------------------------------------------------------


def _tracking(data: dict, repo: Path, where: str):
    from mlflow import MlflowClient

    common = config.parse(config.Common, data.get("common"), f"{where}: common")
    uri = common.mlflow_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{repo / uri.removeprefix('sqlite:///')}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(common.mlflow_experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(common.mlflow_experiment)
    return client, exp_id, uri, common.mlflow_experiment


def _source(client, path: str, run_id: str) -> str:
    """What a registry version of model folder `path` points at: the folder itself when run `run_id` keeps its
    artifacts on this machine (a SQLite or file store), else a copy logged to that run's artifacts, since a tracking
    server refuses a local path outside its artifact store (and a teammate could not read it)."""
    from mlflow.utils.uri import is_local_uri

    if is_local_uri(client.get_run(run_id).info.artifact_uri, is_tracking_or_registry_uri=False):
        return str(Path(path).resolve())
    client.log_artifacts(run_id, path, f"registry/{path}")
    return f"runs:/{run_id}/registry/{path}"


def _version(client, name: str, path: str, run_id: str | None, tags: dict, via_run: str) -> str:
    """The registry version of model folder `path` (tag `path`), created on first use (source: `_source`)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="posttrain policies; alias 'champion' = current champion")
    for v in client.search_model_versions(f"name='{name}'"):
        if v.tags.get("path") == path:
            return v.version
    source = _source(client, path, via_run)
    if source.startswith("runs:/"):  # a server accepts a run's artifacts as source only together with that run
        run_id = via_run
    v = client.create_model_version(name, source=source, run_id=run_id,
                                    tags={"path": path} | {k: str(x) for k, x in tags.items()})
    return v.version


def register(client, name: str, decision: dict, run_id: str) -> tuple[str, str]:
    """Register the candidate (and the champion it faced); point `champion` at the champion after the round."""
    k = decision["round"]
    before = _version(client, name, decision["champion_before"], None, {"round": "initial"} if k == 1 else {},
                      run_id)
    cand = _version(client, name, decision["candidate"], run_id, {
        "round": k, "promoted": decision["promoted"], "pass_rate": round(decision["candidate_pass_rate"], 4)},
                    run_id)
    champion = cand if decision["promoted"] else before
    client.set_registered_model_alias(name, ALIAS, champion)
    return cand, champion


def dvc_add(repo: Path, d: Path) -> None:
    """Version a finished round folder (rounds/round_<k>.dvc); skipped outside a DVC repo. With a default DVC remote
    (`dvc remote add -d`, docs/team.md) the folder is pushed too: a worker's clone may be gone by the next round."""
    if not (repo / ".dvc").is_dir():
        get_run_logger().warning("%s is not a DVC repo: %s is not versioned", repo, d)
        return
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        dvc_repo.add(str(d))
        if dvc_repo.config["core"].get("remote"):
            dvc_repo.push(targets=[f"{d}.dvc"])
            get_run_logger().info("%s pushed to DVC remote %s", d, dvc_repo.config["core"]["remote"])


def _clean(d: Path) -> None:
    """Drop the temp folders a killed step left (io.atomic_dir names them .<name>.tmp-<pid>)."""
    for p in d.glob(".*.tmp-*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def run_round(k: int, data: dict, where: str, repo: Path, client, exp_id: str, parent_id: str) -> dict:
    log = get_run_logger()
    d = round_dir(k)
    if decision_path(k).exists():
        if not Path(f"{d}.dvc").exists():
            dvc_add(repo, d)
        log.info("round %d is finished (%s): nothing to do", k, decision_path(k))
        return json.loads(decision_path(k).read_text()) | {"ran": []}
    if spec_path(k).exists():
        spec = config.read_yaml(spec_path(k))
        log.info("round %d: resuming with %s", k, spec_path(k))
    else:
        spec = new_spec(k, data, where)
        io.write_text(spec_path(k), _yaml(spec))
        log.info("round %d: started, params and commands in %s", k, spec_path(k))
    d.mkdir(parents=True, exist_ok=True)
    _clean(d)
    r = spec["round"]
    run = client.create_run(exp_id, run_name=f"round_{k}", tags={
        "iterative_round": str(k), "mlflow.parentRunId": parent_id, "flow": "iterative"})
    rid = run.info.run_id
    try:
        for key in ("seed", "champion", "reference", "variant"):
            client.log_param(rid, key, r[key])
        client.log_metric(rid, "prompts", prompts_task(k, spec))
        own_process = bool(spec["common"].get("launcher"))
        ran = [s.name for s in plan(spec) if stage_task(k, s, rid, own_process) == "ran"]
        decision = decide(spec)
        name = config.parse(IterativeParams, spec.get("iterative"), str(spec_path(k))).registered_model
        decision["model_version"], decision["champion_version"] = register(client, name, decision, rid)
        for key in ("candidate_pass_rate", "champion_pass_rate", "gain"):
            client.log_metric(rid, key, decision[key])
        for key in ("candidate_pass_rate_ci", "champion_pass_rate_ci", "gain_ci"):
            client.log_metric(rid, key.replace("_ci", "_lo"), decision[key][0])
            client.log_metric(rid, key.replace("_ci", "_hi"), decision[key][1])
        client.log_metric(rid, "pairs", decision["pairs"])
        client.log_metric(rid, "promoted", float(decision["promoted"]))  # last: `compare` reads runs that have it
        client.set_tag(rid, "model_version", decision["model_version"])
        client.log_artifact(rid, str(spec_path(k)))
        io.write_json(decision_path(k), decision)  # the round is finished once this file exists
        client.log_artifact(rid, str(decision_path(k)))
        _clean(d)
        dvc_add(repo, d)
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    log.info("round %d: candidate %.3f vs champion %.3f, gain %.3f [%.3f, %.3f]: %s", k,
             decision["candidate_pass_rate"], decision["champion_pass_rate"], decision["gain"], *decision["gain_ci"],
             "promoted" if decision["promoted"] else "not promoted")
    return decision | {"ran": ran}


def _yaml(obj: dict) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def _close_stale(client, exp_id: str) -> None:
    """Mark KILLED the runs a killed flow left RUNNING (under the repo lock no other flow run is live)."""
    stale = {r.info.run_id for r in client.search_runs(
        [exp_id], "tags.flow = 'iterative' and attributes.status = 'RUNNING'")}
    for r in client.search_runs([exp_id], "attributes.status = 'RUNNING'"):
        if r.info.run_id in stale or r.data.tags.get("mlflow.parentRunId") in stale:
            client.set_terminated(r.info.run_id, "KILLED")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One flow run at a time per repo: a scheduled run waits for the one in progress, then takes the next round."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@flow(name="iterative")
def iterative(repo_dir: str = ".", params: str = "params.yaml", rounds: int = 1,
              round_number: int | None = None) -> list[dict]:
    """Run `rounds` more rounds (or exactly round `round_number`); returns each round's decision."""
    repo = Path(repo_dir).resolve()
    with contextlib.chdir(repo), _lock(repo / ROUNDS / ".lock"):
        data = config.read_yaml(params)
        client, exp_id, uri, experiment = _tracking(data, repo, params)
        _close_stale(client, exp_id)
        parent = client.create_run(exp_id, run_name="iterative", tags={"flow": "iterative"})
        status, decisions = "FAILED", []
        try:
            for _ in range(1 if round_number else rounds):
                k = round_number or next_round()
                decisions.append(run_round(k, data, params, repo, client, exp_id, parent.info.run_id))
            status = "FINISHED"
        finally:
            client.set_terminated(parent.info.run_id, status)
        table = compare_table(uri, experiment)
    from prefect.artifacts import create_markdown_artifact

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    create_markdown_artifact(key="iterative-rounds", markdown="\n".join(lines),
                             description="iterative DPO: every round's candidate vs champion on the eval split")
    return decisions


def _decisions(uri: str, experiment: str) -> dict:
    """Round -> the MLflow run data of its latest decision (a resumed round: its last one)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="metrics.promoted >= 0",
                              order_by=["attributes.start_time ASC"]) if exp else []
    return {int(r.data.tags["iterative_round"]): r.data for r in runs}


def write_curve(uri: str, experiment: str, out: Path) -> Path | None:
    """The eval curve over rounds: `out/rounds.png` (champion and candidate gold pass rate with 95% intervals)
    and `out/rounds.md` (the compare table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = _decisions(uri, experiment)
    if not latest:
        return None
    ks = sorted(latest)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, shift in (("champion_pass_rate", "champion (start of round)", -0.05),
                              ("candidate_pass_rate", "candidate", 0.05)):
        y = [latest[k].metrics[key] for k in ks]
        err = [[y[i] - latest[k].metrics[key + "_lo"] for i, k in enumerate(ks)],
               [latest[k].metrics[key + "_hi"] - y[i] for i, k in enumerate(ks)]]
        ax.errorbar([k + shift for k in ks], y, yerr=err, marker="o", capsize=3, label=label)
    for k in ks:
        if latest[k].metrics["promoted"]:
            ax.annotate("promoted", (k + 0.05, latest[k].metrics["candidate_pass_rate"]), fontsize=8)
    ax.set_xticks(ks)
    ax.set_xlabel("round")
    ax.set_ylabel("gold pass rate (eval split, 95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=120)
    plt.close(fig)
    table = compare_table(uri, experiment)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    (out / "rounds.md").write_text("# Iterative DPO rounds\n\n![eval curve](rounds.png)\n\n" + "\n".join(lines) + "\n")
    return out / "rounds.png"


def compare_table(uri: str, experiment: str):
    """One row per round (its latest decision): candidate and champion pass rate with 95% CI, gain CI, promoted."""
    import pandas as pd

    latest = _decisions(uri, experiment)

    def ci(m: dict, key: str, fmt: str = ".3f") -> str:
        return f"{m[key]:{fmt}} [{m[key + '_lo']:{fmt}}, {m[key + '_hi']:{fmt}}]"

    rows = [{"round": k, "candidate": ci(m.metrics, "candidate_pass_rate"),
             "champion": ci(m.metrics, "champion_pass_rate"), "gain": ci(m.metrics, "gain", "+.3f"),
             "promoted": bool(m.metrics["promoted"]), "version": m.tags.get("model_version")}
            for k, m in sorted(latest.items())]
    return pd.DataFrame(rows, columns=["round", "candidate", "champion", "gain", "promoted", "version"])


def serve(repo_dir: str, params: str, interval: float) -> None:
    """Serve the flow as deployment `iterative/iterative-dpo`; every scheduled run adds one round.

    The first scheduled round is one interval from now (`prefect deployment run iterative/iterative-dpo` adds one at
    once); `limit=1` and the repo lock keep rounds one at a time."""
    import datetime

    from prefect.schedules import Interval

    start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=interval)
    iterative.serve(name=DEPLOYMENT, schedule=Interval(interval, anchor_date=start), limit=1,
                    parameters={"repo_dir": str(Path(repo_dir).resolve()), "params": params, "rounds": 1},
                    description="Iterative DPO: each run adds one round (sample, label, train, evaluate, promote).")


def deploy(repo_dir: str, params: str, interval: float, pool: str, source: str | None = None) -> str:
    """Deploy the flow as `iterative/iterative-dpo` to work pool `pool`, where workers started separately
    (`prefect worker start --pool <pool>`) pick up its runs; every scheduled run adds one round.

    The code comes from `source` (a git URL, or by default the folder holding flows/, which the workers must then see
    at the same path). `concurrency_limit=1` makes the server hold a second run in AwaitingConcurrencySlot until the
    first ends, so two workers never train at once; the repo lock adds the same guard on one filesystem."""
    import datetime

    from prefect.schedules import Interval

    start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=interval)
    code = source or str(Path(__file__).resolve().parents[1])
    deployment_id = iterative.from_source(source=code, entrypoint="flows/iterative.py:iterative").deploy(
        name=DEPLOYMENT, work_pool_name=pool, schedule=Interval(interval, anchor_date=start), concurrency_limit=1,
        parameters={"repo_dir": str(Path(repo_dir).resolve()), "params": params, "rounds": 1},
        description="Iterative DPO: each run adds one round (sample, label, train, evaluate, promote).",
        print_next_steps=False)
    return str(deployment_id)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=["run", "serve", "deploy", "compare"])
    p.add_argument("--repo", default=".", help="the pipeline's repo (default: .)")
    p.add_argument("--params", default="params.yaml", help="params file, relative to --repo")
    p.add_argument("--rounds", type=int, default=1, help="run: rounds to add (default 1)")
    p.add_argument("--round", type=int, default=None, help="run: reproduce or resume exactly this round")
    p.add_argument("--interval", type=float, default=3600.0, help="serve, deploy: seconds between scheduled rounds")
    p.add_argument("--out", default="reports/rounds", help="compare: folder for rounds.png and rounds.md")
    p.add_argument("--pool", default="posttrain", help="deploy: the work pool (prefect work-pool create)")
    p.add_argument("--source", default=None, help="deploy: where workers get the code (git URL; default: this one)")
    args = p.parse_args(argv)
    if args.command == "serve":
        serve(args.repo, args.params, args.interval)
    elif args.command == "deploy":
        print(f"deployment iterative/{DEPLOYMENT} on work pool {args.pool}: "
              f"{deploy(args.repo, args.params, args.interval, args.pool, args.source)}")
    elif args.command == "compare":
        repo = Path(args.repo).resolve()
        data = config.read_yaml(repo / args.params)
        _, _, uri, experiment = _tracking(data, repo, args.params)
        table = compare_table(uri, experiment)
        print(table.to_string(index=False) if not table.empty else "no finished round in the MLflow store yet")
        curve = write_curve(uri, experiment, repo / args.out)
        if curve:
            print(f"eval curve over rounds: {curve} (table: {curve.with_suffix('.md')})")
    else:
        for d in iterative(repo_dir=args.repo, params=args.params, rounds=args.rounds, round_number=args.round):
            print(f"round {d['round']}: {'promoted' if d['promoted'] else 'not promoted'}; champion {d['champion']}")


if __name__ == "__main__":
    main()
