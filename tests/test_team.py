"""The team path (docs/team.md) with the real services on loopback: an iterative round tracked by an MLflow server on
PostgreSQL, read back through the MLflow client; and the iterative deployment on a Prefect process work pool, run by
a separately started worker, one round at a time. (The DVC remote is in tests/test_dvc.py.)"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, STARTUP_S, copy_repo, free_port, repo_env, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
POOL = "posttrain-test"


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A service in its own process group, so that stopping it also stops the helpers it forks."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # helpers that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)


def _healthy(url: str) -> bool:
    return urllib.request.urlopen(url, timeout=5).status == 200


def _set_params(repo: Path, **blocks) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for block, values in blocks.items():
        params[block] |= values
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """PostgreSQL (scripts/postgres.sh) and `mlflow server` on it with a separate artifact root, both on loopback.

    Yields (tracking URI, artifact root, PostgreSQL env, server log)."""
    # the postgres user must reach the data dir when we are root: pytest's own tmp root is private to root
    pg = Path(tempfile.mkdtemp(prefix="posttrain-pg-"))
    pg.chmod(0o755)
    pg_env = os.environ | {"PGUSER": "posttrain", "PGPASSWORD": secrets.token_hex(16)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "start", str(pg), str(free_port())],
                          env=pg_env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        shutil.rmtree(pg, ignore_errors=True)
        pytest.skip(f"no PostgreSQL here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    backend = proc.stdout.strip().splitlines()[-1]
    tmp = tmp_path_factory.mktemp("mlflow_server")
    artifacts, log, port = tmp / "artifacts", tmp / "server.log", free_port()
    # the password reaches the server only through the environment (libpq reads PGPASSWORD); GenAI job runners off
    server = _start([str(BIN / "mlflow"), "server", "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
                     "--port", str(port), "--workers", "1"], tmp, pg_env | {
                         "MLFLOW_BACKEND_STORE_URI": backend, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, log)
    try:
        wait_for(lambda: _healthy(f"http://127.0.0.1:{port}/health"), 180, "mlflow server start")
        yield f"http://127.0.0.1:{port}", artifacts, pg_env | {"PGPORT": backend.split(":")[-1].split("/")[0]}, log
    finally:
        _stop(server)
        subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "stop", str(pg)], env=pg_env, timeout=60)
        shutil.rmtree(pg, ignore_errors=True)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A Prefect server on a free loopback port (its own PREFECT_HOME); yields (API URL, env for its clients)."""
    tmp = tmp_path_factory.mktemp("prefect")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {"PREFECT_HOME": str(tmp / "home"), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                     "--port", api.split(":")[2].split("/")[0], "--no-ui"], tmp, os.environ | env, tmp / "server.log")
    try:
        wait_for(lambda: _healthy(f"{api}/health"), STARTUP_S, "prefect server start")
        yield api, env
    finally:
        _stop(server)


@pytest.mark.postgres
def test_round_tracked_by_mlflow_server_on_postgres(rounds_repo, mlflow_server, prefect_api, tmp_path):
    """One iterative round (generate, label, reference, dpo, evaluate x2, promote) against the server: its runs,
    params, metrics, the logged adapter and the registry alias read back through the client; rows in PostgreSQL."""
    import mlflow
    import psycopg
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import iterative as it

    uri, artifacts, pg_env, server_log = mlflow_server
    repo = copy_repo(rounds_repo, tmp_path / "repo")
    _set_params(repo, common={"mlflow_uri": uri}, iterative={"promote": {"level": 0.95, "min_gain": -1.0}})
    with temporary_settings({PREFECT_API_URL: prefect_api[0]}):
        (decision,) = it.iterative(repo_dir=str(repo))
    assert decision["promoted"] and decision["champion"] == "rounds/round_1/model"

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("posttrain")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    by_name = {}
    for r in runs.values():
        by_name.setdefault(r.info.run_name, []).append(r)
    (round_run,) = by_name["round_1"]
    (flow_run,) = by_name["iterative"]
    assert round_run.data.tags["mlflow.parentRunId"] == flow_run.info.run_id
    stage_runs = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == round_run.info.run_id]
    assert sorted(r.data.tags["stage"] for r in stage_runs) == [
        "dpo@dpo", "evaluate@champion", "evaluate@champion_select", "evaluate@round_1", "evaluate@round_1_select",
        "generate", "label", "reference"]
    assert {r.info.status for r in runs.values()} == {"FINISHED"}

    spec = yaml.safe_load((repo / "rounds" / "round_1.yaml").read_text())
    assert round_run.data.params["seed"] == str(spec["round"]["seed"])
    assert round_run.data.metrics["promoted"] == 1.0
    assert round_run.data.metrics["candidate_pass_rate"] == decision["candidate_pass_rate"]
    (dpo_run,) = [r for r in stage_runs if r.data.tags["stage"] == "dpo@dpo"]
    assert dpo_run.data.params["common.seed"] == str(spec["round"]["seed"])
    assert dpo_run.data.params["common.mlflow_uri"] == uri
    # the trained adapter, logged by the stage, is served back by the server from the separate artifact root
    logged = {Path(f.path).name for f in client.list_artifacts(dpo_run.info.run_id, "model")}
    assert {"adapter_model.safetensors", "chain.json"} <= logged
    assert list(artifacts.rglob("adapter_model.safetensors"))

    # the registry: the alias names the promoted candidate, whose files come back from the server
    version = client.get_model_version_by_alias("posttrain-policy", "champion")
    assert version.tags["path"] == "rounds/round_1/model" and version.run_id == round_run.info.run_id
    mlflow.set_tracking_uri(uri)
    got = Path(mlflow.artifacts.download_artifacts("models:/posttrain-policy@champion", dst_path=str(tmp_path / "dl")))
    model = repo / "rounds" / "round_1" / "model"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in model.iterdir())
    assert (got / "adapter_model.safetensors").read_bytes() == (model / "adapter_model.safetensors").read_bytes()
    assert {v.tags["path"] for v in client.search_model_versions("name='posttrain-policy'")} == {
        "models/sft", "rounds/round_1/model"}

    # the store is PostgreSQL, and the password is in no param and no server log line
    with psycopg.connect(host="127.0.0.1", port=pg_env["PGPORT"], user=pg_env["PGUSER"],
                         password=pg_env["PGPASSWORD"], dbname="mlflow") as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == len(runs)
        assert conn.execute("SELECT count(*) FROM model_versions").fetchone()[0] == 2
    assert not [k for r in runs.values() for k, v in r.data.params.items() if pg_env["PGPASSWORD"] in v]
    assert pg_env["PGPASSWORD"] not in server_log.read_text()


def test_work_pool_worker_runs_one_round_at_a_time(rounds_repo, prefect_api, tmp_path):
    """Deploy to a process work pool with a schedule and concurrency limit 1; a worker started separately runs the
    first of two runs triggered together while the second waits for the slot; then the second is cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled, Cancelling

    repo = copy_repo(rounds_repo, tmp_path / "repo")
    api, prefect_env = prefect_api
    # the worker polls every 2 s (default 10) to keep the test short
    env = repo_env(repo) | prefect_env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}
    logs = tmp_path / "logs"
    logs.mkdir()
    remote = tmp_path / "dvc-remote"
    for cmd in (
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(remote)],
        [str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"],
        [sys.executable, "-m", "flows.iterative", "deploy", "--pool", POOL, "--interval", "3600"],
    ):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    # the worker may take 2 runs at once: only the deployment's limit keeps the second one waiting
    worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--limit", "2"],
                    repo, env, logs / "worker.log")
    try:
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("iterative/iterative-dpo")
            assert deployment.work_pool_name == POOL
            assert [s.schedule.interval for s in deployment.schedules] == [timedelta(seconds=3600)]
            assert deployment.global_concurrency_limit.limit == 1
            assert deployment.parameters == {"repo_dir": str(repo), "params": "params.yaml", "rounds": 1}
            ids = [run_deployment("iterative/iterative-dpo", timeout=0).id for _ in range(2)]

            seen: dict = {i: [] for i in ids}  # state names in the order each run went through them
            deadline = time.time() + 600
            while True:
                states = {i: client.read_flow_run(i).state for i in ids}
                for i, s in states.items():
                    if not seen[i] or seen[i][-1] != s.name:
                        seen[i].append(s.name)
                assert sum(s.is_running() for s in states.values()) <= 1, seen
                if any(s.is_final() for s in states.values()):
                    break
                assert time.time() < deadline, (seen, (logs / "worker.log").read_text()[-3000:])
                time.sleep(1)
            (first,) = [i for i in ids if states[i].is_final()]
            (second,) = [i for i in ids if i != first]
            assert states[first].is_completed(), (states[first], (logs / "worker.log").read_text()[-4000:])
            assert "Running" not in seen[second] and "AwaitingConcurrencySlot" in seen[second], seen
            # a run the worker already started is killed by it on Cancelling; one still waiting is just Cancelled
            running = client.read_flow_run(second).state.is_running()
            client.set_flow_run_state(second, Cancelling() if running else Cancelled(), force=True)
            wait_for(lambda: client.read_flow_run(second).state.is_final(), 60, "the second run cancelled")
            assert client.read_flow_run(first).work_pool_name == POOL
    finally:
        _stop(worker)
    decision = (repo / "rounds" / "round_1" / "decision.json").read_bytes()
    assert json.loads(decision)["round"] == 1
    assert str(first) in (logs / "worker.log").read_text()  # this worker, not this process, ran it

    # the round went to the DVC remote: gone from the folder and the cache, it comes back from there
    shutil.rmtree(repo / "rounds" / "round_1")
    shutil.rmtree(repo / ".dvc" / "cache")
    proc = subprocess.run([sys.executable, "-m", "dvc", "pull", "rounds/round_1.dvc"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (repo / "rounds" / "round_1" / "decision.json").read_bytes() == decision
