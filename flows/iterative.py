"""iterative: online (iterative) DPO in rounds, each on fresh prompts sampled from the champion (seed 002 §7.5).

    python -m flows.iterative                   # one round: the next, or the unfinished one resumed
    python -m flows.iterative --rounds 3        # three more rounds
    python -m flows.iterative --round 2         # reproduce / resume round 2 from rounds/round_2.yaml (no-op if done)
    python -m flows.iterative serve --interval 3600   # a Prefect deployment: each scheduled run adds one round
    python -m flows.iterative deploy --pool posttrain --interval 3600   # the same on a work pool (docs/team.md)
    python -m flows.iterative compare           # the rounds as a table, read from the MLflow store

It reads the pipeline's outputs (`models/sft`, `data/prepare`), so it runs after `dvc repro`. What a round does
and how promotion is decided is planned in flows/rounds.py (pure); this module executes it: each step is a stage
`main([...])` run in this process (in its own process under `common.launcher`) with `rounds/round_<k>.yaml` as
its params file. A step whose output exists is skipped and every output is written atomically, so a crashed round
resumes where it stopped (dpo from `<out>.ckpt`); a finished round (`decision.json` present) is left alone. Each
finished round folder is `dvc add`ed (`rounds/round_<k>.dvc`; no dvc.yaml stage, so `dvc repro` never runs a
round). The selection split (`rounds/selection.jsonl`) is drawn before round 1 and kept in git.

MLflow: a parent run `iterative` per flow run, a nested run `round_<k>` holding the decision's metrics, and under it
one run per stage execution. Every candidate becomes a version of the registered model `iterative.registered_model`;
the alias `champion` moves to it only on promotion.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import compare
from flows.promotion import Decision
from flows.rounds import (
    ROUNDS,
    SELECTION,
    IterativeParams,
    Step,
    decide,
    decision_path,
    draw_prompts,
    new_spec,
    next_round,
    plan,
    read_round,
    round_dir,
    selection_rows,
    spec_path,
)
from posttrain import config, io, tracking

DEPLOYMENT = "iterative-dpo"
ALIAS = "champion"


@task(task_run_name="selection split", cache_policy=NO_CACHE)
def selection_task(data: dict, where: str) -> int:
    """Draw the selection split once (it must stay the same for every round's decision)."""
    if SELECTION.exists():
        return len(io.read_jsonl(SELECTION, "prompts"))
    rows = selection_rows(data, where)
    io.write_jsonl(SELECTION, rows)
    return len(rows)


@task(task_run_name="round_{k}: prompts", cache_policy=NO_CACHE)
def prompts_task(k: int, spec: dict) -> int:
    from stages.prepare import PrepareParams

    out = round_dir(k) / "prompts.jsonl"
    if out.exists():
        return len(io.read_jsonl(out, "prompts"))
    where = f"{spec_path(k)}"
    it = config.parse(IterativeParams, spec.get("iterative"), f"{where}: iterative")
    mix = config.parse(PrepareParams, spec.get("prepare"), f"{where}: prepare").task_mix
    r = read_round(spec, where)
    rows = draw_prompts(f"r{k}", it.prompts_per_round, r.seed, mix, r.exclude)
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



def _tracking(data: dict, repo: Path, where: str):
    from mlflow import MlflowClient

    common = config.parse(config.Common, data.get("common"), f"{where}: common")
    uri = tracking.resolve_uri(common.mlflow_uri, repo)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(common.mlflow_experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(common.mlflow_experiment)
    return client, exp_id, uri, common.mlflow_experiment


def register(client, name: str, decision: Decision, run_id: str) -> tuple[str, str]:
    """Register the candidate (and the champion it faced); point `champion` at the champion after the round."""
    k = decision.round
    before = tracking.model_version(client, name, decision.champion_before, None,
                                    {"round": "initial"} if k == 1 else {}, via_run=run_id)
    cand = tracking.model_version(client, name, decision.candidate, run_id, {
        "round": k, "promoted": decision.promoted, "pass_rate": round(decision.candidate_pass_rate, 4)},
        via_run=run_id)
    champion = cand if decision.promoted else before
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
        return dataclasses.asdict(Decision.read(decision_path(k))) | {"ran": []}
    if spec_path(k).exists():
        spec = config.read_yaml(spec_path(k))
        log.info("round %d: resuming with %s", k, spec_path(k))
    else:
        spec = new_spec(k, data, where)
        io.write_text(spec_path(k), _yaml(spec))
        log.info("round %d: started, params and commands in %s", k, spec_path(k))
    d.mkdir(parents=True, exist_ok=True)
    _clean(d)
    r = read_round(spec, str(spec_path(k)))
    run = client.create_run(exp_id, run_name=f"round_{k}", tags={
        "iterative_round": str(k), "mlflow.parentRunId": parent_id, "flow": "iterative"})
    rid = run.info.run_id
    try:
        for key in ("seed", "champion", "reference", "variant"):
            client.log_param(rid, key, getattr(r, key))
        client.log_metric(rid, "prompts", prompts_task(k, spec))
        own_process = bool(config.parse(config.Common, spec.get("common"), f"{spec_path(k)}: common").launcher)
        ran = [s.name for s in plan(spec) if stage_task(k, s, rid, own_process) == "ran"]
        decision = decide(spec)
        name = config.parse(IterativeParams, spec.get("iterative"), str(spec_path(k))).registered_model
        decision.model_version, decision.champion_version = register(client, name, decision, rid)
        for key, value in decision.metrics().items():  # `promoted` last: `compare` reads runs that have it
            client.log_metric(rid, key, value)
        client.set_tag(rid, "model_version", decision.model_version)
        client.log_artifact(rid, str(spec_path(k)))
        decision.write(decision_path(k))  # the round is finished once this file exists
        client.log_artifact(rid, str(decision_path(k)))
        _clean(d)
        dvc_add(repo, d)
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    log.info("round %d: candidate %.3f vs champion %.3f, gain %.3f [%.3f, %.3f]: %s", k,
             decision.candidate_pass_rate, decision.champion_pass_rate, decision.gain, *decision.gain_ci,
             "promoted" if decision.promoted else "not promoted")
    return dataclasses.asdict(decision) | {"ran": ran}


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
            selection_task(data, params)
            for _ in range(1 if round_number else rounds):
                k = round_number or next_round()
                decisions.append(run_round(k, data, params, repo, client, exp_id, parent.info.run_id))
            status = "FINISHED"
        finally:
            client.set_terminated(parent.info.run_id, status)
        table = compare.compare_table(uri, experiment)
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key="iterative-rounds", markdown=compare.markdown(table),
                             description="iterative DPO: every round's candidate vs champion (eval split) and the "
                                         "gain promotion decided on (selection split)")
    return decisions


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
        table = compare.compare_table(uri, experiment)
        print(table.to_string(index=False) if not table.empty else "no finished round in the MLflow store yet")
        curve = compare.write_curve(uri, experiment, repo / args.out)
        if curve:
            print(f"eval curve over rounds: {curve} (table: {curve.with_suffix('.md')})")
    else:
        for d in iterative(repo_dir=args.repo, params=args.params, rounds=args.rounds, round_number=args.round):
            print(f"round {d['round']}: {'promoted' if d['promoted'] else 'not promoted'}; champion {d['champion']}")


if __name__ == "__main__":
    main()
