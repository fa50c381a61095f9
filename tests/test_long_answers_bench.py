"""bench/long_answers.py: its pure parts and its refusals, on hand-made rows and repos (the benchmark itself runs
DVC experiments for hours; tests/test_dvc.py runs it on the tiny pipeline)."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from posttrain import credit, io, tasks
from tests.conftest import ADD3, ADD3_PROMPT, ADD3_REJECTED, ROOT, add3_pair


def _long_params() -> dict:
    return yaml.safe_load((ROOT / "profiles/long.yaml").read_text())


def test_bench_rows_are_the_long_profile_rows_and_each_scale_adds_the_token_rows():
    from bench import long_answers as la

    params = _long_params()
    assert list(la.ROWS) == list(params["dpo"]["variants"])
    la.check_rows(params, list(la.ROWS), "long.yaml")
    assert la.token_source(params) == "token_reward"
    tags = la.variants(["dpo", "tgdpo", "tgdpo_token", "tgdpo_cancel_token"], params, [2.5, 4.0], [3e-4])
    assert tags == {"": {"knobs": {}, "rows": ["dpo", "tgdpo", "tgdpo_token", "tgdpo_cancel_token"]},
                    "x2.5": {"knobs": {"guidance.sources.token_reward.scale": 2.5},
                             "rows": ["tgdpo_token", "tgdpo_cancel_token"]},
                    "x4": {"knobs": {"guidance.sources.token_reward.scale": 4.0},
                           "rows": ["tgdpo_token", "tgdpo_cancel_token"]},
                    "lr0.0003": {"knobs": {"dpo.defaults.learning_rate": 3e-4},
                                 "rows": ["dpo", "tgdpo", "tgdpo_token", "tgdpo_cancel_token"]}}
    assert la.method_rows(tags) == {
        "dpo": ("dpo", ""), "tgdpo": ("tgdpo", ""), "tgdpo_token": ("tgdpo_token", ""),
        "tgdpo_cancel_token": ("tgdpo_cancel_token", ""), "tgdpo_token_x2.5": ("tgdpo_token", "x2.5"),
        "tgdpo_cancel_token_x2.5": ("tgdpo_cancel_token", "x2.5"), "tgdpo_token_x4": ("tgdpo_token", "x4"),
        "tgdpo_cancel_token_x4": ("tgdpo_cancel_token", "x4"), "dpo_lr0.0003": ("dpo", "lr0.0003"),
        "tgdpo_lr0.0003": ("tgdpo", "lr0.0003"), "tgdpo_token_lr0.0003": ("tgdpo_token", "lr0.0003"),
        "tgdpo_cancel_token_lr0.0003": ("tgdpo_cancel_token", "lr0.0003")}
    no_token = copy.deepcopy(params)
    del no_token["guidance"]["sources"]["token_reward"]
    assert la.token_source(no_token) is None
    assert set(la.method_rows(la.variants(["dpo", "tgdpo"], no_token, [4.0], []))) == {"dpo", "tgdpo"}
    with pytest.raises(SystemExit, match="must start with dpo"):
        la.check_rows(params, ["tgdpo", "dpo"], "long.yaml")
    with pytest.raises(SystemExit, match="long.yaml: dpo.variants has no row 'kto'"):
        la.check_rows(params, ["dpo", "kto"], "long.yaml")
    params["evaluate"]["models"]["rpo"] = "models/merge/wise_50"
    with pytest.raises(SystemExit, match="evaluate.models.rpo must be models/dpo/rpo"):
        la.check_rows(params, ["dpo", "rpo"], "long.yaml")


def test_anchored_rows_are_paired_with_rpo_as_well_as_dpo():
    """20 prompts, one seed: dpo passes none, rpo the first 10, the anchored token row the first 12. Against dpo the
    row gains 12/20 = 0.6 (goal met); against rpo 2/20 = 0.1, and the bootstrap interval reaches 0 (18 of 20 zero
    differences: a resample misses both ones with probability 0.9^20 = 0.12 > 0.025), so not met against rpo."""
    from bench import long_answers as la

    params = _long_params()
    assert la.nll_weight(params, "rpo") == 0.5  # RPOParams' default
    assert la.nll_weight(params, "tgdpo_cancel_token_nll") == 0.5
    assert la.nll_weight(params, "tgdpo_cancel_token") == 0.0  # TGDPOParams' default
    assert la.anchored(params, list(la.ROWS)) == ["tgdpo_cancel_token_nll", "step_rpo"]
    assert la.anchored(params, ["dpo", "tgdpo_cancel_token_nll"]) == []  # no rpo row to pair with
    rows = ["dpo", "rpo", "tgdpo_cancel_token_nll"]
    methods = la.method_rows(la.variants(rows, params, [], []))
    passes = {"dpo": 0, "rpo": 10, "tgdpo_cancel_token_nll": 12}
    state = {"scores": {m: {f"p{i}": {"pass": float(i < n)} for i in range(20)} for m, n in passes.items()},
             "displacement": dict.fromkeys(rows), "minus_dpo": dict.fromkeys(rows), "blame": {},
             "trained": dict.fromkeys(rows)}
    got = {"methods": methods, "states": {0: {"": state}}, "blame_by_aggregator": {},
           "anchored": la.anchored(params, rows)}
    out = la.summarise(got, [0], 1000)
    assert out["paired_vs_dpo"]["tgdpo_cancel_token_nll"]["pass"]["mean"] == pytest.approx(0.6)
    assert out["paired_vs_rpo"]["tgdpo_cancel_token_nll"]["pass"]["mean"] == pytest.approx(0.1)
    assert out["paired_vs_rpo"]["tgdpo_cancel_token_nll"]["baseline"] == "rpo"
    assert out["paired_vs_rpo"]["tgdpo_cancel_token_nll"]["pass"]["ci_prompts"][0] == 0.0
    assert set(out["paired_vs_rpo"]) == {"tgdpo_cancel_token_nll"}
    assert out["goal"]["met"] == {"tgdpo_cancel_token_nll": True}
    assert out["goal"]["met_vs_rpo"] == {"tgdpo_cancel_token_nll": False}


def test_bench_end_scores():
    """Pass on every prompt with a gold verdict; the step score on worked tasks alone; no verdict, no row."""
    from bench import long_answers as la

    specs = {"w": ADD3, "v": ADD3, "n": {"type": "number", "answer": 85}, "u": {}}
    answers = [{"id": "w", "passed": True, "response": tasks.solve(ADD3)},
               {"id": "v", "passed": False, "response": "55 + 97 = 142\n142 + 23 = 165\nAnswer: 165"},
               {"id": "n", "passed": True, "response": "85"}, {"id": "u", "passed": None, "response": "hi"}]
    assert la.end_scores(answers, specs) == {"w": {"pass": 1.0, "step_score": 1.0},
                                             "v": {"pass": 0.0, "step_score": pytest.approx(2 / 3)},
                                             "n": {"pass": 1.0}}
    assert la.prompt_of("chain_add-00012.step1.3") == "chain_add-00012" == la.prompt_of("chain_add-00012")


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


def test_bench_reads_credit_only_where_the_experiment_ran_it(tmp_path):
    """With --credit-seeds own a further seed's experiment leaves the own seed's reports/credit/metrics.json in the
    workspace: read_state must not credit that seed with it."""
    from bench import long_answers as la

    (tmp_path / "reports/evaluate/dpo").mkdir(parents=True)
    (tmp_path / "reports/credit").mkdir(parents=True)
    io.write_jsonl(tmp_path / "reports/evaluate/dpo/answers.jsonl",
                   [{"id": "w", "task": "chain_add", "response": tasks.solve(ADD3), "score": 1.0, "passed": True,
                     "length": 40}])
    io.write_json(tmp_path / "reports/credit/metrics.json", {"displacement": {"dpo": {"n": 3, "mean": -0.5}},
                                                            "displacement_minus_dpo": {}, "blame": {"dpo": {"n": 3}}})
    ran = la.read_state(tmp_path, {"dpo": "dpo"}, {"w": ADD3})
    assert ran["displacement"] == {"dpo": {"n": 3, "mean": -0.5}} and ran["blame"] == {"dpo": {"n": 3}}
    stale = la.read_state(tmp_path, {"dpo": "dpo"}, {"w": ADD3}, credit=False)
    assert stale["displacement"] == {"dpo": None} and stale["minus_dpo"] == {"dpo": None} and stale["blame"] == {}
    assert stale["scores"] == ran["scores"] == {"dpo": {"w": {"pass": 1.0, "step_score": 1.0}}}


def test_bench_over_seeds_needs_every_seed():
    """Credit's per-seed figures: the t-interval of the means where every seed has one (a float or a dict's
    mean), none where a seed measured nothing."""
    from bench import long_answers as la

    got = la.over_seeds({0: {"n": 4, "mean": 0.25}, 1: {"n": 3, "mean": 0.75}})
    assert got["mean_over_seeds"]["mean"] == pytest.approx(0.5)
    # stdev of 0.25, 0.75 is 0.25 sqrt(2); half-width t(1) x stdev / sqrt(2) = 12.706 x 0.25
    assert got["mean_over_seeds"]["ci"] == pytest.approx([0.5 - 12.706 * 0.25, 0.5 + 12.706 * 0.25])
    blame = la.over_seeds({0: {"n": 2, "lift": {"mean": 0.1}}, 1: {"n": 2, "lift": {"mean": 0.3}}}, ("lift",))
    assert blame["lift_over_seeds"]["mean"] == pytest.approx(0.2)
    older = la.over_seeds({0: {"n": 2, "lift": {"mean": 0.1}}, 1: {"n": 2, "lift": {"mean": 0.3}}}, ("lift", "new"))
    assert set(older) == {"per_seed", "lift_over_seeds"}  # a key the pipeline's credit stage does not write
    empty = {"n": 2, "rhat_before_wrong_step": {"n": 0, "mean": float("nan")}}  # every answer wrong from its start
    assert set(la.over_seeds({0: empty, 1: empty}, ("rhat_before_wrong_step",))) == {"per_seed"}
    assert set(la.over_seeds({0: {"n": 0, "mean": 0.0}, 1: {"n": 2, "mean": 0.1}})) == {"per_seed"}
    assert set(la.over_seeds({0: None, 1: {"n": 2, "mean": 0.1}})) == {"per_seed"}


def test_pick_examples_with_a_shared_prefix():
    rows = [{"id": "c", "wrong": (14, 28)}, {"id": "a", "wrong": (0, 13)}, {"id": "b", "wrong": None},
            {"id": "d", "wrong": (29, 40)}, {"id": "e", "wrong": (5, 9)}]
    assert [r["id"] for r in credit.pick_examples(rows, 2)] == ["c", "d"]


def _no_gold(tmp_path: Path) -> Path:
    """A copy of the repo whose held-out prompts have no verifier (a user's prompts)."""
    other = tmp_path / "no_gold"
    shutil.copytree(tmp_path, other, ignore=shutil.ignore_patterns("no_gold"))
    rows = [json.loads(x) | {"verifier": None} for x in (other / "data/prepare/eval.jsonl").read_text().splitlines()]
    (other / "data/prepare/eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return other


def test_bench_refuses_a_repo_without_enough_prompts_or_pairs(tmp_path, capsys):
    from bench import long_answers as la

    shutil.copy(ROOT / "profiles/long.yaml", tmp_path / "params.yaml")
    rows = [{"id": f"w{i}", "task": "chain_add", "messages": ADD3_PROMPT, "verifier": ADD3} for i in range(2)]
    (tmp_path / "data/prepare").mkdir(parents=True)
    for split in ("eval", "train"):
        (tmp_path / f"data/prepare/{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--repo", str(tmp_path), "--allow-dirty"]
    with pytest.raises(SystemExit, match="2 held-out prompts with a verifier, --min-eval 500"):
        la.main(base)
    (tmp_path / "data/label").mkdir(parents=True)
    (tmp_path / "data/label/prefs.jsonl").write_text(json.dumps(add3_pair(ADD3_REJECTED, "w0")) + "\n")
    with pytest.raises(SystemExit, match="1 response-level pairs, --min-pairs 400: raise prepare.n_train"):
        la.main([*base, "--min-eval", "2"])
    with pytest.raises(SystemExit, match="no step pairs for step_dpo"):
        la.main([*base, "--min-eval", "2", "--min-pairs", "1"])
    with pytest.raises(SystemExit, match="0 held-out prompts with a verifier, --min-eval 0"):  # nothing to score
        la.main([*base, "--rows", "dpo", "--min-eval", "0", "--min-pairs", "0"] + ["--repo", str(_no_gold(tmp_path))])
    with pytest.raises(SystemExit, match="dpo.variants has no row 'kto'"):
        la.main([*base, "--rows", "dpo", "kto"])
    with pytest.raises(SystemExit):  # refused by argparse, before any experiment starts
        la.main([*base, "--aggregators", "median"])
    assert "invalid choice: 'median'" in capsys.readouterr().err


# --- the credit stage, on the tiny model: hand-built guidance, a policy equal to the reference and one that is not --
