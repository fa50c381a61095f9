"""Iterative DPO (flows/iterative.py) on the tiny profile: rounds end to end, promotion and the registry alias, a
no-op re-run, a SIGKILLed round resumed; and the `serve` deployment on a real local Prefect server adding a round."""

import json
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, STARTUP_S, copy_repo, free_port, repo_env, wait_for

pytestmark = pytest.mark.slow


def _set(repo: Path, **iterative) -> None:
    """Override keys of the `iterative` block (and `dpo_defaults`) in the repo's params.yaml."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dpo"]["defaults"] |= iterative.pop("dpo_defaults", {})
    params["iterative"] |= iterative
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def _prompts(path: Path) -> set[str]:
    return {json.loads(line)["messages"][-1]["content"] for line in path.read_text().splitlines() if line.strip()}


def _alias_version(repo: Path) -> str:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_model_version_by_alias("posttrain-policy",
                                                                                      "champion").version


def _version_of(repo: Path, path: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (v,) = [v for v in client.search_model_versions("name='posttrain-policy'") if v.tags.get("path") == path]
    return v.version


def _runs(repo: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["posttrain"])


def _stage_runs(repo: Path):
    runs = _runs(repo)
    return runs[runs["tags.stage"].notna()]


def test_rounds_promote_rerun_and_resume(rounds_repo, tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows import iterative as it

    repo = copy_repo(rounds_repo, tmp_path / "repo")
    with prefect_test_harness(server_startup_timeout=STARTUP_S):
        # round 1 promotes whatever it trains (min_gain -1); round 2 (a TGDPO variant) can never be promoted
        _set(repo, promote={"level": 0.95, "min_gain": -1.0})
        (d1,) = it.iterative(repo_dir=str(repo))
        r1 = repo / "rounds" / "round_1"
        for f in ("prompts.jsonl", "samples.jsonl", "label/prefs.jsonl", "reference/logps.jsonl", "model/chain.json",
                  "eval/metrics.json", "select/answers.jsonl", "champion_eval/answers.jsonl",
                  "champion_select/answers.jsonl", "decision.json"):
            assert (r1 / f).exists(), f
        assert (repo / "rounds" / "round_1.yaml").exists() and (repo / "rounds" / "round_1.dvc").exists()
        assert not list(r1.glob("*.ckpt")) and not list(r1.glob(".*"))
        assert d1["promoted"] and d1["champion"] == "rounds/round_1/model"
        assert set(d1["ran"]) == {"generate", "label", "reference", "dpo", "evaluate", "select", "evaluate_champion",
                                  "select_champion"}
        # promotion reads the selection split, drawn once and disjoint from every split the pipeline uses
        selection = _prompts(repo / "rounds" / "selection.jsonl")
        assert len(selection) == 20 and d1["n_select"] == 20 and d1["n_eval"] == 10
        assert _alias_version(repo) == _version_of(repo, "rounds/round_1/model")

        _set(repo, promote={"level": 0.95, "min_gain": 0.99}, variant="tgdpo_token")
        (d2,) = it.iterative(repo_dir=str(repo))
        r2 = repo / "rounds" / "round_2"
        spec = yaml.safe_load((repo / "rounds" / "round_2.yaml").read_text())
        assert spec["round"]["champion"] == "rounds/round_1/model" and spec["round"]["reference"] == "models/sft"
        assert set(spec["round"]["commands"]) == {"generate", "label", "reference", "token_reward", "guidance", "dpo",
                                                  "evaluate", "select"}
        assert set(d2["ran"]) == set(spec["round"]["commands"])
        chain = json.loads((r2 / "model" / "chain.json").read_text())
        assert chain["adapters"] == ["models/sft", "rounds/round_1/model", "rounds/round_2/model"]  # adapters stack
        used = set().union(*(_prompts(repo / "data/prepare" / f"{s}.jsonl") for s in ("train", "eval")))
        assert len(_prompts(r2 / "prompts.jsonl")) == 12
        assert not _prompts(r2 / "prompts.jsonl") & (_prompts(r1 / "prompts.jsonl") | used | selection)
        assert not (_prompts(r1 / "prompts.jsonl") | selection) & used
        assert not d2["promoted"] and d2["champion"] == "rounds/round_1/model"
        assert _alias_version(repo) == _version_of(repo, "rounds/round_1/model")  # the alias stays
        assert _version_of(repo, "rounds/round_2/model")  # the candidate is registered all the same

        # every stage run nests under a round run, which nests under the flow's run
        runs = _runs(repo)
        by_id = runs.set_index("run_id")
        stage_runs = _stage_runs(repo)
        assert len(stage_runs) == 8 + 8
        for parent in stage_runs["tags.mlflow.parentRunId"]:
            assert by_id.loc[parent, "tags.mlflow.runName"].startswith("round_")
            assert by_id.loc[by_id.loc[parent, "tags.mlflow.parentRunId"], "tags.mlflow.runName"] == "iterative"

        # a finished round re-run: nothing runs
        (again,) = it.iterative(repo_dir=str(repo), round_number=2)
        assert again["ran"] == [] and len(_stage_runs(repo)) == 16

        # round 3, SIGKILLed in DPO training after a checkpoint, then resumed
        _set(repo, variant="dpo", dpo_defaults={"epochs": 4.0, "save_steps": 1})
        env = repo_env(ROOT) | {"PREFECT_API_URL": PREFECT_API_URL.value()}
        proc = subprocess.Popen([sys.executable, "-m", "flows.iterative", "--repo", str(repo)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ckpt, deadline = repo / "rounds/round_3/model.ckpt", time.time() + 300
        while not list(ckpt.glob("*/checkpoint-*/trainer_state.json")):  # <out>.ckpt/<run key>/
            assert proc.poll() is None, f"the round ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r3 = repo / "rounds" / "round_3"
        assert not (r3 / "model").exists() and not (r3 / "decision.json").exists()
        (d3,) = it.iterative(repo_dir=str(repo))
        assert d3["round"] == 3 and d3["ran"] == ["dpo", "evaluate", "select"]  # resumed: samples, labels kept
        assert (r3 / "decision.json").exists() and not ckpt.exists()
        assert d3["champion_before"] == "rounds/round_1/model"
        assert set(_runs(repo)["status"]) == {"FINISHED", "KILLED"}  # the killed run's MLflow runs are closed

    capsys.readouterr()
    it.main(["compare", "--repo", str(repo)])
    table = capsys.readouterr().out.splitlines()[:-1]  # the last line names the eval-curve files
    assert table[0].split() == ["round", "candidate", "champion", "gain", "promoted", "version"]
    assert [line.split()[0] for line in table[1:]] == ["1", "2", "3"]
    assert "True" in table[1] and "False" in table[2]
    assert (repo / "reports/rounds/rounds.png").read_bytes()[:4] == b"\x89PNG"
    md = (repo / "reports/rounds/rounds.md").read_text()
    assert md.count("\n| ") == 4  # header + one row per round


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_deployment_adds_a_round(rounds_repo, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo = copy_repo(rounds_repo, tmp_path / "repo")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = repo_env(repo) | {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", api.split(":")[2].split("/")[0], "--no-ui"], cwd=tmp_path, env=env,
                              stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)
    served = None
    try:
        wait_for(lambda: urllib.request.urlopen(f"{api}/health", timeout=5).status == 200, 180, "prefect server start")
        served = subprocess.Popen([sys.executable, "-m", "flows.iterative", "serve", "--interval", "3600"], cwd=repo,
                                  env=env, stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT)
        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                deployment = wait_for(lambda: client.read_deployment_by_name("iterative/iterative-dpo"), 120,
                                   "the served deployment")
            assert [s.schedule.interval for s in deployment.schedules] == [timedelta(seconds=3600)]
            assert deployment.parameters == {"repo_dir": str(repo), "params": "params.yaml", "rounds": 1}
            run = run_deployment("iterative/iterative-dpo", timeout=600, poll_interval=2)
        assert run.state.is_completed(), (run.state, (logs / "serve.log").read_text()[-3000:])
        decision = json.loads((repo / "rounds" / "round_1" / "decision.json").read_text())
        assert decision["round"] == 1 and not (repo / "rounds" / "round_2.yaml").exists()
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
