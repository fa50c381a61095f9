"""`dvc repro` on the tiny profile end to end in a fresh git + DVC repo, then the Prefect recipe flow over it."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from posttrain import run
from tests.conftest import DVC, STARTUP_S, copy_pipeline, run_ok, stages_run

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"prepare", "base", "sft", "generate", "reward_model", "label", "reference", "token_reward",
          "guidance@token_reward", "dpo@dpo", "dpo@tgdpo_token", "evaluate@base", "evaluate@sft", "evaluate@dpo",
          "evaluate@tgdpo_token", "merge@wise_50", "evaluate@wise_50", "credit", "report"}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the pipeline with the tiny profile as params.yaml, reproduced once."""
    repo = copy_pipeline(tmp_path_factory.mktemp("repo"))
    run_ok(["git", "init", "-q"], repo)
    run_ok(DVC + ["init", "-q"], repo)
    log = run_ok([sys.executable, "-m", "posttrain.run"], repo)  # `make run`'s dvc repro, with stage k of N
    return repo, log


def commit(repo):
    """`git add -A` and a commit, an empty one when nothing changed: a DVC experiment starts from a commit, and a
    test that runs one must not rely on an earlier test having made it."""
    run_ok(["git", "add", "-A"], repo)
    run_ok(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q", "--allow-empty", "-m",
            "tiny pipeline"], repo)


def test_first_repro_runs_every_stage(repo):
    repo, log = repo
    assert stages_run(log) == STAGES
    assert {s for s in STAGES if re.search(rf"posttrain\.cli: {re.escape(s)} done in [0-9.]+ s", log)} == STAGES
    assert "is empty" not in log, "a DVC warning about an empty dependency or output"
    assert f"[posttrain] {len(STAGES)} stages to run" in log
    begun = re.findall(rf"\[posttrain\] stage (\d+) of {len(STAGES)}: (\S+);", log)
    assert [int(k) for k, _ in begun] == list(range(1, len(STAGES) + 1)) and {s for _, s in begun} == STAGES
    assert set(json.loads((repo / ".dvc/tmp/stage_times.json").read_text())) == STAGES
    table = json.loads((repo / "reports/metrics.json").read_text())
    assert set(table) == {"base", "sft", "dpo", "tgdpo_token", "wise_50"}
    assert table["wise_50"]["merge"]["alpha"] == 0.5 and "alignment_tax" in table["wise_50"]
    assert all((repo / "reports" / f).exists() for f in ("report.md", "scores.png", "pareto.png"))
    assert (repo / "models/merge/wise_50/model.safetensors").exists()
    assert (repo / "models/dpo/tgdpo_token/adapter_model.safetensors").exists()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["posttrain"])
    assert set(runs["tags.mlflow.runName"]) == STAGES  # one MLflow run per stage execution


def test_unchanged_repro_runs_nothing_quickly(repo):
    repo, _ = repo
    t0 = time.perf_counter()
    assert stages_run(run_ok(DVC + ["repro"], repo)) == set()
    assert time.perf_counter() - t0 < 15


def test_one_rows_loss_param_changes_that_row_alone(repo):
    """dpo@<row> depends on dpo.defaults and its own row only: one loss hyper-parameter of one row leaves every
    other stage up to date (downstream stages follow once that row's model changes). params.yaml is restored."""
    repo, _ = repo
    path = repo / "params.yaml"
    before = path.read_text()
    params = yaml.safe_load(before)
    params["dpo"]["variants"]["tgdpo_token"]["alpha"] = 0.25
    path.write_text(yaml.safe_dump(params))
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(repo)}
    try:
        proc = subprocess.run(DVC + ["status", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=300, check=True)
    finally:
        path.write_text(before)
    assert {name.split(":")[-1] for name in json.loads(proc.stdout)} == {"dpo@tgdpo_token"}


def test_evaluate_param_reruns_only_evaluate_and_report(repo):
    repo, _ = repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["n_bootstrap"] = 300
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    evaluates = {"evaluate@base", "evaluate@sft", "evaluate@dpo", "evaluate@tgdpo_token", "evaluate@wise_50"}
    ran = stages_run(run_ok(DVC + ["repro"], repo))
    # report follows only if an evaluate output changed (the random tiny model scores 0 everywhere, so the
    # intervals may not move); nothing upstream of evaluate may run
    assert evaluates <= ran <= evaluates | {"report"}
    assert "pass_rate" in run_ok(DVC + ["metrics", "show", "--json"], repo)


def test_recipe_flow_follows_dvc(repo):
    """The flow runs every stage in DAG order, lets DVC skip unchanged ones, nests MLflow runs, and publishes."""
    from prefect.testing.utilities import prefect_test_harness

    repo, _ = repo
    sys.path.insert(0, str(repo))
    from flows.recipe import recipe, stage_order

    order = stage_order(repo)
    assert set(order) == STAGES
    for before, after in [("prepare", "sft"), ("reference", "dpo@dpo"), ("guidance@token_reward", "dpo@tgdpo_token"),
                          ("evaluate@dpo", "report"), ("dpo@tgdpo_token", "credit"), ("credit", "report")]:
        assert order.index(before) < order.index(after)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["report"]["reference"] = "base"  # only the report must re-run
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert run.to_run(repo) == ["report"]  # from this test's cwd, not the repo: names, not cwd-relative addresses
    times = json.loads((repo / ".dvc/tmp/stage_times.json").read_text())
    with prefect_test_harness(server_startup_timeout=STARTUP_S):
        outcome = recipe(repo_dir=str(repo))
    assert {s for s, o in outcome.items() if o == "ran"} == {"report"}
    after = json.loads((repo / ".dvc/tmp/stage_times.json").read_text())  # the flow times what it ran
    assert after.keys() == times.keys() and {s for s in times if after[s] != times[s]} == {"report"}
    assert "win_rate_vs_base" in json.loads((repo / "reports/metrics.json").read_text())["sft"]
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["posttrain"])
    parent = runs[runs["tags.mlflow.runName"] == "recipe"].iloc[0]["run_id"]
    nested = runs[runs["tags.mlflow.parentRunId"] == parent]
    assert list(nested["tags.mlflow.runName"]) == ["report"]


def test_remote_push_clone_pull_runs_nothing(repo, tmp_path):
    """A teammate's clone: `dvc push` to a remote, `git clone`, `dvc pull`, and `dvc repro` runs no stage.

    It commits the repo as the earlier tests left it."""
    repo, _ = repo
    remote = tmp_path / "remote"
    run_ok(DVC + ["remote", "add", "-d", "team", str(remote)], repo)
    commit(repo)
    run_ok(DVC + ["push"], repo)
    assert len([p for p in remote.rglob("*") if p.is_file()]) > 20  # content-addressed files of every cached out

    clone = tmp_path / "clone"
    run_ok(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "models").exists() and (clone / "reports/metrics.json").exists()  # git has the metrics
    run_ok(DVC + ["pull"], clone)
    for f in ("models/merge/wise_50/model.safetensors", "models/dpo/tgdpo_token/adapter_model.safetensors",
              "data/prepare/eval.jsonl", "reports/report.md"):
        assert (clone / f).read_bytes() == (repo / f).read_bytes(), f
    assert stages_run(run_ok(DVC + ["repro"], clone)) == set()
    assert "up to date" in run_ok(DVC + ["status"], clone)


def test_seeds_bench_runs_each_seed_as_a_dvc_experiment(repo, tmp_path):
    """bench.seeds on the tiny pipeline: seed 0 reads the pipeline's own answers; seed 1
    is a `dvc exp run` that re-runs only the rows' dpo and evaluate stages, logged to MLflow's bench-seeds
    experiment; then the workspace has the pipeline's params and outputs back."""
    from bench import seeds

    repo, _ = repo
    commit(repo)
    params = (repo / "params.yaml").read_bytes()
    adapter = (repo / "models/dpo/dpo/adapter_model.safetensors").read_bytes()
    out = seeds.main(["--repo", str(repo), "--seeds", "0", "1", "--variants", "dpo", "tgdpo_token",
                      "--out", str(tmp_path / "seeds.json"), "--allow-dirty"])
    table = json.loads((repo / "reports/metrics.json").read_text())
    assert out["per_seed"]["dpo"][0]["pass_rate"] == table["dpo"]["pass_rate"]
    assert set(out["per_seed"]["tgdpo_token"]) == {0, 1} and set(out["paired_vs_dpo"]) == {"tgdpo_token_minus_dpo"}
    assert (repo / "params.yaml").read_bytes() == params
    assert (repo / "models/dpo/dpo/adapter_model.safetensors").read_bytes() == adapter
    assert "up to date" in run_ok(DVC + ["status"], repo)
    assert "seed-1" in run_ok(DVC + ["exp", "list"], repo)
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["bench-seeds"])
    assert sorted(runs["tags.mlflow.runName"]) == ["dpo@dpo", "dpo@tgdpo_token", "evaluate@dpo",
                                                   "evaluate@tgdpo_token"]


def test_long_answers_bench_runs_seeds_scales_and_heads_as_dvc_experiments(repo, tmp_path):
    """bench.long_answers on the tiny pipeline: seed 0 reads the pipeline's own outputs; seed 2, the learned guidance
    at scale 2 and the DPO learning rate 2e-3 (both seeds), and the soft_min token-reward head are `dvc exp run`s
    that re-run what those knobs reach and take the rest from DVC's run cache (guidance at a scale already run); the
    workspace comes back. Seed 2, not 1: the seeds test's experiment would be in the run cache."""
    from bench import long_answers as la

    repo, _ = repo
    commit(repo)
    params = (repo / "params.yaml").read_bytes()
    out = la.main(["--repo", str(repo), "--seeds", "0", "2", "--rows", "dpo", "tgdpo_token", "--scales", "2",
                   "--learning-rates", "2e-3", "--aggregators", "average", "soft_min", "--min-eval", "0",
                   "--min-pairs", "0", "--n-boot", "50",
                   "--out", str(tmp_path / "long.json"), "--plot", str(tmp_path / "pairs.png"), "--allow-dirty"])
    table = json.loads((repo / "reports/metrics.json").read_text())
    assert out["end_scores"]["dpo"]["pass"]["per_seed"][0] == pytest.approx(table["dpo"]["pass_rate"])
    lr = {"dpo.defaults.learning_rate": 2e-3}
    assert out["methods"] == {"dpo": {"row": "dpo", "variant": "", "knobs": {}},
                              "tgdpo_token": {"row": "tgdpo_token", "variant": "", "knobs": {}},
                              "tgdpo_token_x2": {"row": "tgdpo_token", "variant": "x2",
                                                 "knobs": {"guidance.sources.token_reward.scale": 2.0}},
                              "dpo_lr0.002": {"row": "dpo", "variant": "lr0.002", "knobs": lr},
                              "tgdpo_token_lr0.002": {"row": "tgdpo_token", "variant": "lr0.002", "knobs": lr}}
    # each method against dpo trained at its learning rate
    assert {m: d["baseline"] for m, d in out["paired_vs_dpo"].items()} == {
        "tgdpo_token": "dpo", "tgdpo_token_x2": "dpo", "dpo_lr0.002": "dpo", "tgdpo_token_lr0.002": "dpo_lr0.002"}
    assert out["settings"]["dpo"]["learning_rate"] == 1e-3
    assert out["params"] == yaml.safe_load(params)  # the scratch repo's whole params.yaml, label's knobs included
    assert all(out["training"]["dpo_lr0.002"][s]["pairs"] == out["training"]["dpo"][s]["pairs"] for s in (0, 2))
    assert "step_score" not in out["end_scores"]["dpo"]  # no worked task in the tiny mix
    assert out["training"]["dpo"][0] == json.loads((repo / "models/dpo/dpo/train_metrics.json").read_text())
    assert out["label"] == json.loads((repo / "data/label/stats.json").read_text()) and out["label"]["pairs"] > 0
    assert all(out["training"][m][s]["pairs"] > 0 for m in out["methods"] for s in (0, 2))
    assert set(out["blame_by_aggregator"]) == {"soft_min"}  # no worked task here: the pipeline's head has no blame
    assert "heldout_accuracy" in out["blame_by_aggregator"]["soft_min"] and (tmp_path / "pairs.png").exists()
    assert (repo / "params.yaml").read_bytes() == params
    assert "up to date" in run_ok(DVC + ["status"], repo)
    names = run_ok(DVC + ["exp", "list"], repo)
    assert all(re.search(rf"\[long-\d{{8}}-{n}\]", names) for n in ("seed0-x2", "seed2", "seed2-x2", "soft_min",
                                                                             "seed0-lr0.002", "seed2-lr0.002"))
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["bench-long-answers"])
    assert sorted(runs["tags.mlflow.runName"]) == sorted(
        ["guidance@token_reward", "dpo@tgdpo_token", "evaluate@tgdpo_token", "credit"]  # seed 0, scale 2
        + ["dpo@dpo", "dpo@tgdpo_token", "evaluate@dpo", "evaluate@tgdpo_token", "credit"]  # seed 2 (guidance cached)
        + ["dpo@tgdpo_token", "evaluate@tgdpo_token", "credit"]  # seed 2, scale 2 (guidance cached)
        + 2 * ["dpo@dpo", "dpo@tgdpo_token", "evaluate@dpo", "evaluate@tgdpo_token", "credit"]  # lr 2e-3, each seed
        + ["token_reward", "guidance@token_reward", "credit"])  # the soft_min head, and the credit stage's blame
    dpo_runs = runs[runs["tags.mlflow.runName"] == "dpo@dpo"]  # seed 2 at the pipeline's rate, both seeds at 2e-3
    assert sorted(dpo_runs["params.dpo.learning_rate"].astype(float)) == [1e-3, 2e-3, 2e-3]
