"""bench/long_answers.py: its pure parts, on hand-made rows and repos (the benchmark itself trains for hours)."""

import copy
from pathlib import Path

import pytest
import yaml

from posttrain import credit, tasks
from tests.conftest import ADD3, ADD3_PROMPT, ADD3_REJECTED, add3_pair


def test_bench_method_names_and_params(tmp_path):
    from bench import long_answers as la

    assert la.method_names([1.0, 2.5]) == ["dpo", "rpo", "tgdpo", "tgdpo_cancel", "tgdpo_token_x1",
                                           "tgdpo_cancel_token_x1", "tgdpo_token_x2.5", "tgdpo_cancel_token_x2.5",
                                           "step_dpo"]
    assert la.method_rows([2.5])["tgdpo_cancel_token_x2.5"] == la.Method("tgdpo_cancel_token", "token", 2.5)
    assert la.prompt_of("chain_add-00012.step1.3") == "chain_add-00012" == la.prompt_of("chain_add-00012")
    params = {"common": {"seed": 0, "mlflow_uri": "sqlite:///mlflow.db", "mlflow_experiment": "posttrain"},
              "token_reward": {"aggregator": "average", "tau": 1.0}, "dpo": {"defaults": {"seed": 0}}}
    got = la.bench_params(tmp_path, params, 2, token_reward={"aggregator": "soft_min"})
    # the training seed moves; common.seed (the data: the same pairs for every seed) does not
    assert got["common"] == {"seed": 0, "mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db",
                             "mlflow_experiment": "bench-long-answers"}
    assert got["dpo"]["defaults"]["seed"] == 2
    assert got["token_reward"] == {"aggregator": "soft_min", "tau": 1.0}
    assert params["dpo"]["defaults"]["seed"] == 0 and params["token_reward"]["aggregator"] == "average"  # a copy


def test_bench_end_scores():
    from bench import long_answers as la

    specs = {"w": ADD3, "v": ADD3, "n": {"type": "number", "answer": 85}}
    answers = [{"id": "w", "passed": True, "response": tasks.solve(ADD3)},
               {"id": "v", "passed": False, "response": "55 + 97 = 142\n142 + 23 = 165\nAnswer: 165"},
               {"id": "n", "passed": True, "response": "85"}]
    assert la.end_scores(answers, specs) == {"w": {"pass": 1.0, "step_score": 1.0},
                                             "v": {"pass": 0.0, "step_score": pytest.approx(2 / 3)}}


def test_bench_compare_pairs_by_prompt_and_seed():
    """Differences per seed: seed 0 a 1, b 0, c 0 (mean 1/3); seed 1 a 1, b 1, c 0 (mean 2/3). Averaged over seeds
    per prompt: a 1, b 0.5, c 0, mean 0.5. Over seeds: mean 0.5, half-width t(1) x stdev / sqrt(2) = 12.706 / 6."""
    from bench import long_answers as la

    method = {0: {"a": 1.0, "b": 0.0, "c": 1.0}, 1: {"a": 1.0, "b": 1.0, "c": 0.0}}
    base = {0: {"a": 0.0, "b": 0.0, "c": 1.0}, 1: {"a": 0.0, "b": 0.0, "c": 0.0}}
    got = la.compare(method, base, n_boot=200)
    assert got["mean"] == pytest.approx(0.5) and got["prompts"] == 3
    assert got["per_seed"] == pytest.approx({0: 1 / 3, 1: 2 / 3})
    assert got["seeds"]["ci"] == pytest.approx([0.5 - 12.706 / 6, 0.5 + 12.706 / 6])
    assert 0.0 <= got["ci_prompts"][0] <= got["ci_prompts"][1] <= 1.0
    alone = la.compare(method, None, n_boot=200)  # the method's own figure: per prompt a 1, b 0.5, c 0.5
    assert alone["mean"] == pytest.approx(2 / 3)
    assert la.goal_met({"mean": 0.03, "ci_prompts": [0.001, 0.06]})
    assert not la.goal_met({"mean": 0.029, "ci_prompts": [0.001, 0.06]})
    assert not la.goal_met({"mean": 0.05, "ci_prompts": [0.0, 0.1]})


def test_bench_rows_are_the_long_profile_rows():
    """Every method trains as a row of profiles/long.yaml (so the pipeline's seed reuses them all), each row's
    params resolve, and the rows are the ones issue 22 compares."""
    from bench import long_answers as la
    from stages import dpo
    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "profiles/long.yaml").read_text())
    assert set(la.VARIANTS) == set(params["dpo"]["variants"])
    assert all(la.same_row(params, v) for v in la.VARIANTS)
    rows = dpo.DpoParams(variants=la.VARIANTS)
    got = {m: dpo.resolve(rows, r.variant, "bench") for m, r in la.method_rows([1.0]).items()}
    assert {m: (v.loss, v.pairs, getattr(v.loss_params, "cancel_shared_prefix", None)) for m, v in got.items()} == {
        "dpo": ("dpo", "response", None), "rpo": ("rpo", "response", None), "tgdpo": ("tgdpo", "response", False),
        "tgdpo_cancel": ("tgdpo", "response", True), "tgdpo_token_x1": ("tgdpo", "response", False),
        "tgdpo_cancel_token_x1": ("tgdpo", "response", True), "step_dpo": ("dpo", "step", None)}
    params["dpo"]["variants"]["rpo"]["nll_weight"] = 1.0  # the paper's weight: not the bench's row any more
    assert not la.same_row(params, "rpo") and not la.same_row(params, "absent")


def test_bench_reuses_the_pipeline_models_of_its_own_seed(tmp_path):
    from bench import long_answers as la

    for name in ("dpo", "tgdpo", "tgdpo_token", "step_dpo"):
        (tmp_path / "models/dpo" / name).mkdir(parents=True)
    params = {"dpo": {"defaults": {"seed": 0}, "variants": copy.deepcopy(la.VARIANTS)},
              "guidance": {"sources": {"token_reward": {"scale": 1.0}, "dpo": {"model": "models/dpo/dpo"}}}}
    assert la.reusable(tmp_path, params, 0, [1.0, 4.0]) == {"dpo": "dpo", "tgdpo": "tgdpo",
                                                           "tgdpo_token_x1": "tgdpo_token", "step_dpo": "step_dpo"}
    assert la.reusable(tmp_path, params, 0, [4.0]) == {"dpo": "dpo", "tgdpo": "tgdpo", "step_dpo": "step_dpo"}
    assert la.reusable(tmp_path, params, 1, [1.0]) == {}
    params["dpo"]["variants"]["dpo"]["beta"] = 0.2  # its dpo is another row: neither it nor what it guided is reused
    assert la.reusable(tmp_path, params, 0, [1.0]) == {"tgdpo_token_x1": "tgdpo_token", "step_dpo": "step_dpo"}


def test_pick_examples_with_a_shared_prefix():
    rows = [{"id": "c", "wrong": (14, 28)}, {"id": "a", "wrong": (0, 13)}, {"id": "b", "wrong": None},
            {"id": "d", "wrong": (29, 40)}, {"id": "e", "wrong": (5, 9)}]
    assert [r["id"] for r in credit.pick_examples(rows, 2)] == ["c", "d"]


def test_bench_refuses_a_repo_without_enough_worked_prompts(tmp_path):
    import json
    import shutil

    from bench import long_answers as la

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "profiles/long.yaml", tmp_path / "params.yaml")
    (tmp_path / "models/sft").mkdir(parents=True)
    (tmp_path / "models/sft/chain.json").write_text(json.dumps({"base": str(tmp_path / "models/base"),
                                                                "adapters": []}))
    rows = [{"id": f"w{i}", "task": "chain_add", "messages": ADD3_PROMPT, "verifier": ADD3} for i in range(2)]
    (tmp_path / "data/prepare").mkdir(parents=True)
    for split in ("eval", "train"):
        (tmp_path / f"data/prepare/{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="names .*models/base, not found"):
        la.main(["--repo", str(tmp_path)])
    (tmp_path / "models/base").mkdir()
    with pytest.raises(SystemExit, match="2 held-out prompts of worked tasks, --min-eval 500"):
        la.main(["--repo", str(tmp_path)])
    (tmp_path / "data/label").mkdir(parents=True)
    (tmp_path / "data/label/prefs.jsonl").write_text(json.dumps(add3_pair(ADD3_REJECTED, "w0")) + "\n")
    with pytest.raises(SystemExit, match="1 response-level pairs, --min-pairs 400: raise prepare.n_train"):
        la.main(["--repo", str(tmp_path), "--min-eval", "2"])
    with pytest.raises(SystemExit, match="no step pairs for step_dpo"):
        la.main(["--repo", str(tmp_path), "--min-eval", "2", "--min-pairs", "1"])


def test_bench_run_seed_trains_each_method_as_its_row(tmp_path, monkeypatch):
    """run_seed's wiring, with the stages replaced by recorders: each method's dpo row, guidance folder and
    reference folder (step_dpo's with the step cache), and its training metrics kept."""
    from bench import long_answers as la

    calls = []

    def stage(name):
        def main(argv):
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True)
            calls.append((name, {argv[i]: argv[i + 1] for i in range(0, len(argv), 2)}))
            return {"pairs": len(calls)}
        return main

    for module in (la.dpo, la.guidance, la.evaluate):
        monkeypatch.setattr(module, "main", stage(module.__name__))
    params = {"common": {"mlflow_uri": "sqlite:///mlflow.db"}, "dpo": {"defaults": {"seed": 0}},
              "guidance": {"sources": {}}}
    learned = {2.0: tmp_path / "token_x2/rhat.jsonl"}
    run = la.run_seed(tmp_path, params, 1, [2.0], learned, tmp_path / "step_ref", tmp_path / "work")
    trained = {a["--out"].rsplit("/", 1)[1]: (a["--variant"], Path(a["--guidance"]).name,
                                              Path(a["--reference"]).name)
               for name, a in calls if name == "stages.dpo"}
    assert trained == {"dpo": ("dpo", "reference", "reference"), "rpo": ("rpo", "reference", "reference"),
                       "tgdpo": ("tgdpo", "dpo", "reference"), "tgdpo_cancel": ("tgdpo_cancel", "dpo", "reference"),
                       "tgdpo_token_x2": ("tgdpo_token", "token_x2", "reference"),
                       "tgdpo_cancel_token_x2": ("tgdpo_cancel_token", "token_x2", "reference"),
                       "step_dpo": ("step_dpo", "reference", "step_ref")}
    assert all(a["--step-prefs"] == f"{tmp_path}/data/label/step_prefs.jsonl" for n, a in calls if n == "stages.dpo")
    assert [n for n, _ in calls].count("stages.evaluate") == 7 and set(run["methods"]) == set(trained)
    assert run["trained"]["dpo"] == {"pairs": 1} and run["dpo_rhat"] == tmp_path / "work/guidance/dpo/rhat.jsonl"


def test_bench_step_dpo_reads_the_step_pairs(workdir, tmp_path):
    """step_dpo's wiring: with no step cache in the pipeline's reference folder the bench makes one with
    --step-prefs, and step_dpo's run trains on label's 5 step pairs (not its 3 response-level ones) through it."""
    import json

    from bench import long_answers as la
    from posttrain import io
    from tests.conftest import RESPONSE_PAIRS, STEP_PAIRS, tiny_params

    repo, work = tmp_path / "repo", tmp_path / "work"
    (repo / "models").mkdir(parents=True)
    (repo / "models/sft").symlink_to(workdir / "models/base")
    io.write_jsonl(repo / "data/label/prefs.jsonl", RESPONSE_PAIRS)
    io.write_jsonl(repo / "data/label/step_prefs.jsonl", STEP_PAIRS)
    params = yaml.safe_load(tiny_params(tmp_path).read_text())
    p = la.write_params(work / "params.yaml", la.bench_params(repo, params, 0, dpo={"variants": la.VARIANTS}))
    ref = la.step_reference(repo, p, work)
    assert ref == work / "reference" and (ref / "step_logps.jsonl").exists()
    out, record = work / "models/step_dpo", work / "train/step_dpo.json"
    got = la._train(la.train_argv(p, "step_dpo", repo, ref, ref, out), out, record)
    assert got["pairs"] == 5 and json.loads(record.read_text()) == got
    assert la._train([], out, record) == got  # trained: read back, not re-run
    (repo / "data/reference").mkdir(parents=True)
    (repo / "data/reference/step_logps.jsonl").touch()  # the pipeline's reference ran with --step-prefs
    assert la.step_reference(repo, p, work) == repo / "data/reference"


# --- the credit stage, on the tiny model: hand-built guidance, a policy equal to the reference and one that is not --
