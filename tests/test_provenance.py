"""Every results file says which command, code revision (and whether the tree was dirty), machine and date produced
it; `bench.machine.write_results` writes those keys and refuses a dirty tree unless told."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from bench import machine
from tests.conftest import ROOT


def test_every_results_file_has_provenance():
    results = ROOT / "bench" / "results"
    files = [p for p in results.rglob("*") if p.is_file()] if results.is_dir() else []
    plots = set()
    for p in (p for p in files if p.suffix == ".json"):
        data = json.loads(p.read_text())
        missing = [k for k in machine.PROVENANCE_KEYS if k not in data]
        assert not missing, f"{p}: no {missing}: re-measure it with its bench command (no hand-edited figures)"
        assert len(data["git_revision"]) == 40 and isinstance(data["dirty"], bool), p
        assert {"cpu", "cores", "memory_gib", "gpu", "torch", "python"} <= set(data["machine"]), p
        # `python -m bench.x ...`, or a bench script run by its path (a clean checkout measuring another repo)
        first = data["command"].removeprefix("python ").split()[0]
        assert data["command"].startswith("python -m bench.") or re.search(r"(^|/)bench/\w+\.py$", first), p
        if data.get("plot"):
            plots.add(Path(data["plot"]).name)
    for p in (p for p in files if p.suffix != ".json"):  # a picture belongs to the results file that drew it
        assert p.suffix == ".png" and p.name in plots, f"{p}: not a results file's `plot`"


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_started", None)
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("scratch/\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_write_results_records_provenance_and_refuses_a_dirty_tree(repo, monkeypatch):
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (repo / "scratch").mkdir()
    (repo / "scratch" / "ignored.bin").write_text("ignored files do not make the tree dirty")
    out = machine.write_results("bench/results/x.json", {"steps": 8},
                                ["python", "-m", "bench.x", "--steps", "8", "--note", "a b"])
    on_disk = json.loads((repo / "bench/results/x.json").read_text())
    assert on_disk == out
    assert on_disk["steps"] == 8 and on_disk["git_revision"] == sha and on_disk["dirty"] is False
    assert on_disk["command"] == "python -m bench.x --steps 8 --note 'a b'"
    assert on_disk["date"].endswith("+00:00")
    # a results file not yet committed does not make the next benchmark's tree dirty
    machine.write_results("bench/results/y.json", {"steps": 9}, ["python", "-m", "bench.y"])

    (repo / "code.py").write_text("x = 2\n")
    with pytest.raises(SystemExit, match="dirty.*code.py.*--allow-dirty"):
        machine.write_results("bench/results/z.json", {"steps": 1}, ["python", "-m", "bench.z"])
    with pytest.raises(SystemExit, match="dirty"):
        machine.require_clean(allow_dirty=False)
    assert not (repo / "bench/results/z.json").exists()
    assert machine.write_results("bench/results/z.json", {"steps": 1}, ["python", "-m", "bench.z"],
                                 allow_dirty=True)["dirty"] is True

    _git(repo, "checkout", "code.py")
    machine.require_clean(allow_dirty=False)  # a benchmark starts here ...
    (repo / "code.py").write_text("x = 3\n")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "... and the code changes under it")
    with pytest.raises(SystemExit, match="HEAD moved from"):
        machine.write_results("bench/results/v.json", {}, ["python", "-m", "bench.v"])
    monkeypatch.setattr(machine, "_started", None)

    # what `make run` leaves (dvc.lock, DVC's .gitignore files, reports/ metrics) is not code: still clean
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "reports" / "evaluate" / "sft").mkdir(parents=True)
    (repo / "reports" / "evaluate" / "sft" / "metrics.json").write_text("{}")
    (repo / "reports" / "evaluate" / "sft" / ".gitignore").write_text("/answers.jsonl\n")
    (repo / ".gitignore").write_text("scratch/\n/models\n")
    assert machine.write_results("bench/results/u.json", {}, ["python", "-m", "bench.u"])["dirty"] is False
    (repo / "reports.py").write_text("z = 1\n")  # code beside reports/ is code
    with pytest.raises(SystemExit, match="reports.py"):
        machine.write_results("bench/results/u.json", {}, ["python", "-m", "bench.u"])
    (repo / "reports.py").unlink()

    (repo / "new_module.py").write_text("y = 1\n")  # untracked and not ignored: code that may have run
    with pytest.raises(SystemExit, match="new_module.py"):
        machine.write_results("bench/results/w.json", {}, ["python", "-m", "bench.w"])
    with pytest.raises(ValueError, match="provenance keys"):
        machine.write_results("bench/results/w.json", {"date": "yesterday"}, allow_dirty=True)


def test_every_bench_script_takes_allow_dirty():
    for p in sorted((ROOT / "bench").glob("*.py")):
        src = p.read_text()
        if "def main(" in src:
            assert '"--allow-dirty"' in src and "machine.write_results(" in src, f"{p.name}: write via write_results"


def test_stage_metrics_copies_what_the_stages_wrote_with_the_pipelines_revision(repo, tmp_path_factory):
    from bench import stage_metrics

    run = tmp_path_factory.mktemp("run")
    _git(run, "init", "-q")
    (run / "profiles").mkdir()
    (run / "profiles/long.yaml").write_text("common: {seed: 0}\n")
    (run / "params.yaml").write_text("common: {seed: 0}\n")
    _git(run, "add", "-A")
    _git(run, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (run / "params.yaml").write_text("common: {seed: 1}\n")  # a profile copied over params.yaml, then edited
    with pytest.raises(SystemExit, match="missing: run `dvc repro`"):
        stage_metrics.main(["--repo", str(run), "--out", str(repo / "scratch/out.json")])
    (run / "reports").mkdir()
    (run / "reports/metrics.json").write_text('{"sft": {"pass_rate": 0.25}}')
    got = stage_metrics.main(["--repo", str(run), "--out", str(repo / "scratch/out.json")])
    assert got["report"] == {"sft": {"pass_rate": 0.25}} and "reports/credit/metrics.json" in got["missing"]
    assert got["pipeline"]["params_profile"] is None
    assert got["pipeline"]["changed_files"] == ["params.yaml"]  # reports/ is the run's output, not a change
    (run / "params.yaml").write_text("common: {seed: 0}\n")
    got = stage_metrics.main(["--repo", str(run), "--out", str(repo / "scratch/out.json")])
    assert got["pipeline"]["params_profile"] == "long.yaml"
    saved = json.loads((repo / "scratch/out.json").read_text())
    assert saved["command"].startswith("python -m bench.stage_metrics --repo ") and saved["dirty"] is False


def test_stage_seconds_are_the_latest_finished_workspace_run_of_each_stage(tmp_path):
    """sft ran twice in the workspace (the later run, 250 s, wins), once in a `dvc exp run` (not the pipeline's) and
    once unfinished; label once: 4.5 s. Another experiment's run is not read."""
    from mlflow.tracking import MlflowClient

    from bench import stage_metrics

    (tmp_path / "params.yaml").write_text("common: {mlflow_uri: 'sqlite:///mlflow.db', mlflow_experiment: e}\n")
    assert stage_metrics.stage_seconds(tmp_path) == {}  # no store yet
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp, other = client.create_experiment("e"), client.create_experiment("other")

    def run(name, start_s, end_s, where="workspace", experiment=exp, status="FINISHED"):
        r = client.create_run(experiment, start_time=start_s * 1000, tags={"dvc_experiment": where}, run_name=name)
        client.set_terminated(r.info.run_id, status=status, end_time=end_s * 1000)

    run("sft", 1000, 1400)
    run("sft", 2000, 2250)
    run("sft", 3000, 3010, where="long-seed1")
    run("sft", 4000, 4005, status="FAILED")
    run("label", 2300, 2304.5)
    run("label", 5000, 5100, experiment=other)
    assert stage_metrics.stage_seconds(tmp_path) == {"sft": 250.0, "label": 4.5}


def test_main_job_pair_compares_wall_time_and_pass_rates_against_the_before_interval():
    """after/before wall 750/1000 = 0.75 (25% less); dpo's 0.47 lies in [0.43, 0.57], sft's 0.30 not in
    [0.37, 0.51]; a row the after run lacks is not inside."""
    from bench import main_job_pair

    def run(wall, rows):
        return {"make_run_s": wall, "eval_table": {"rows": rows}}

    before = run(1000.0, {"sft": {"pass_rate": 0.44, "pass_rate_ci": [0.37, 0.51]},
                          "dpo": {"pass_rate": 0.5, "pass_rate_ci": [0.43, 0.57]}})
    after = run(750.0, {"sft": {"pass_rate": 0.30, "pass_rate_ci": [0.24, 0.37]},
                        "dpo": {"pass_rate": 0.47, "pass_rate_ci": [0.40, 0.54]}})
    s = main_job_pair.compare(before, after)
    assert s["after_over_before_wall"] == 0.75 and s["wall_cut"] == 0.25 and s["same_rows"]
    assert s["pass_rates"]["dpo"] == {"before": 0.5, "before_ci": [0.43, 0.57], "after": 0.47,
                                      "inside_before_ci": True}
    assert not s["pass_rates"]["sft"]["inside_before_ci"] and not s["all_inside_before_ci"]
    s = main_job_pair.compare(before, run(900.0, {"dpo": after["eval_table"]["rows"]["dpo"]}))
    assert not s["same_rows"] and s["pass_rates"]["sft"] == {"before": 0.44, "after": None,
                                                             "inside_before_ci": False}


def test_main_job_pair_reads_each_stage_runs_time_from_a_real_mlflow_store(tmp_path):
    """Two runs logged by MLflow itself into a clone's `mlflow.db`, with set start and end times: their durations,
    by run name; `sft` run twice keeps its last run (12.5 s, not 3 s); no store, no times."""
    from mlflow.tracking import MlflowClient

    from bench import main_job_pair

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("posttrain")
    for name, start, end in (("sft", 1_000, 4_000), ("evaluate@dpo", 5_000, 6_250), ("sft", 7_000, 19_500)):
        run = client.create_run(exp, start_time=start, run_name=name)
        client.set_terminated(run.info.run_id, end_time=end)
    assert main_job_pair.mlflow_walls(tmp_path) == {"sft": 12.5, "evaluate@dpo": 1.2}
    assert main_job_pair.mlflow_walls(tmp_path / "none") == {}
