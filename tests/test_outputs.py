"""What a user sees: the eval table `make run` prints, the MLflow experiment's kind and the tags runs are grouped by,
and the pieces `bench.pipeline` collects its figures with."""

import json

import pytest
from mlflow import MlflowClient

from posttrain import config, table, tracking
from tests.conftest import ROOT, tiny_params

REPORT = """# posttrain report

Gold verifiers on 10 held-out prompts; ...

| model | pass rate | mean score | win rate vs sft | mean length | general ppl | tax vs base |
|---|---|---|---|---|---|---|
| base | 0.100 [0.000, 0.300] | 0.200 [0.100, 0.300] | 0.400 [0.200, 0.600] | 7.0 | 9.00 | +0.0% |
| sft | 0.300 [0.000, 0.600] | 0.400 [0.200, 0.600] | 0.500 [0.500, 0.500] | 6.0 | 9.10 | +1.1% |

![scores](scores.png)

**Ship: sft**. Rule: the highest gold pass rate among models ...

| another | table |
"""


def test_table_prints_the_eval_table_and_the_ship_line(tmp_path, capsys):
    (tmp_path / "report.md").write_text(REPORT)
    lines = table.main([str(tmp_path / "report.md")])
    rows = REPORT.splitlines()[4:8]
    assert lines == [f"{tmp_path / 'report.md'}:", "", *rows, "", "Ship: sft. Rule: the highest gold pass rate "
                     "among models ..."]
    assert capsys.readouterr().out == "\n".join(lines) + "\n"
    with pytest.raises(SystemExit, match="no report"):
        table.main([str(tmp_path / "missing.md")])


def test_make_run_ends_with_the_table():
    run = (ROOT / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n", 1)[0]
    steps = [ln.strip() for ln in run.splitlines() if ln.startswith("\t")]
    repro = next(i for i, s in enumerate(steps) if s.endswith("-m posttrain.run"))  # dvc repro, with stage k of N
    assert steps[repro + 1] == "@$(PY) -m posttrain.table reports/report.md"
    assert not any("metrics show" in s and not s.startswith("@echo") for s in steps), "no raw metrics dump"


def test_dvc_metrics_are_one_compact_row_per_model():
    stages = {k: v.get("do", v) for k, v in config.read_yaml(ROOT / "dvc.yaml")["stages"].items()}
    declared = {name: [next(iter(m)) if isinstance(m, dict) else m for m in st.get("metrics", [])]
                for name, st in stages.items()}
    assert {k: v for k, v in declared.items() if v} == {"evaluate": ["reports/evaluate/${key}/summary.json"]}


def test_experiment_opens_on_runs_and_eval_runs_carry_model_and_dvc_experiment(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("DVC_EXP_NAME", "beta-sweep-1")
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    with tracking.stage_run("evaluate@dpo", {"git_revision": "abc"}, uri, "posttrain"):
        pass
    monkeypatch.delenv("DVC_EXP_NAME")
    with tracking.stage_run("sft", {"git_revision": "abc"}, uri, "posttrain"):
        pass
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("posttrain")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_name: r.data.tags for r in client.search_runs([exp.experiment_id])}
    assert runs["evaluate@dpo"]["model"] == "dpo" and runs["evaluate@dpo"]["dvc_experiment"] == "beta-sweep-1"
    assert "model" not in runs["sft"] and runs["sft"]["dvc_experiment"] == "workspace"


def test_pipeline_bench_collects_stage_runs_and_the_eval_table(tmp_path):
    from bench import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny_params(tmp_path)  # params.yaml naming that store, as a clone's would
    for stage, rss in (("prepare", 210.0), ("evaluate@sft", 900.0)):
        with tracking.stage_run(stage, {"git_revision": "abc"}, uri, "posttrain"):
            tracking.log_metrics({"peak_rss_mb": rss})
    rows = pipeline.stage_table(tmp_path)
    assert [(r["stage"], r["status"], r["peak_rss_mb"]) for r in rows] == [
        ("prepare", "FINISHED", 210), ("evaluate@sft", "FINISHED", 900)]
    assert all(r["wall_s"] >= 0 for r in rows)

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "report.md").write_text(REPORT)
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps({"sft": {
        "pass_rate": 0.3, "pass_rate_ci": [0.0, 0.6], "n": 10, "model": "models/sft", "merge": {"alpha": 0.5}}}))
    got = pipeline.eval_table(tmp_path)
    assert got["rows"] == {"sft": {"pass_rate": 0.3, "pass_rate_ci": [0.0, 0.6], "n": 10}}
    assert got["markdown"] == REPORT.splitlines()[4:8] and got["ship"].startswith("Ship: sft.")
    # dvc's "Running stage" lines at 1.0 s and 4.5 s of a 10 s command
    assert pipeline.stage_walls([(1.0, "prepare"), (4.5, "evaluate@sft")], 10.0) == {"prepare": 3.5,
                                                                                    "evaluate@sft": 5.5}
