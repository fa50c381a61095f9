"""`dvc repro` of a reduced tiny profile from a user's data: a TRL conversational preference file with no verifier
(`prepare.pairs: dataset`), and reasoning-gym prompts (`on_policy`, judged by reasoning-gym's own scorer).

Reduced so each repro takes about a minute: one preference variant, no guidance or merge rows, three evaluations."""

import json
import math
import shutil

import pytest
import yaml

from posttrain import io, tasks
from tests.conftest import ASSETS, DVC, copy_pipeline, run_ok, stages_run

pytestmark = pytest.mark.slow
COMMON = {"prepare", "base", "sft", "generate", "reward_model", "label", "reference", "token_reward", "dpo@dpo",
          "evaluate@base", "evaluate@sft", "evaluate@dpo", "credit", "report"}


def _repo(tmp, prepare: dict, **blocks):
    """A git + DVC copy of the pipeline whose params are the tiny profile, reduced, with `prepare` overrides (and
    those of other `blocks`)."""
    copy_pipeline(tmp, ("stages", "posttrain", "profiles"))
    params = yaml.safe_load((tmp / "params.yaml").read_text())
    params["prepare"] |= prepare
    params["dpo"]["variants"] = {"dpo": {"loss": "dpo", "guidance": "data/reference"}}
    params["guidance"]["sources"] = {}
    params["merge"]["models"] = {}
    params["evaluate"]["models"] = {"base": "models/base", "sft": "models/sft", "dpo": "models/dpo/dpo"}
    params["report"]["order"] = ["base", "sft", "dpo"]
    for block, values in blocks.items():
        params[block] |= values
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    run_ok(["git", "init", "-q"], tmp)
    run_ok(DVC + ["init", "-q"], tmp)
    return tmp


def test_dataset_mode_from_a_trl_conversational_preference_file(tmp_path):
    (tmp_path / "user").mkdir()
    shutil.copy(ASSETS / "formats" / "preference_conversational.jsonl", tmp_path / "user" / "prefs.jsonl")
    repo = _repo(tmp_path, {"source": "user/prefs.jsonl", "pairs": "dataset", "n_eval": 4, "n_train": 16,
                            "n_sft": 16}, evaluate={"reward_model": True},
                 report={"judges": ["reward_model", "llm"], "llm": {"model": "models/sft"}})
    assert stages_run(run_ok(DVC + ["repro"], repo)) == COMMON
    stats = json.loads((repo / "data/prepare/stats.json").read_text())
    assert (stats["format"], stats["n_prefs"], stats["n_heldout_prefs"], stats["dropped"]) == (
        "preference_conversational", 16, 4, {})
    train = io.read_jsonl(repo / "data/prepare/prefs.jsonl", "prefs")
    held = io.read_jsonl(repo / "data/prepare/heldout_prefs.jsonl", "prefs")
    raw = [json.loads(line) for line in (repo / "user/prefs.jsonl").read_text().splitlines()]
    assert sorted(p["chosen"] for p in train + held) == sorted(r["chosen"][0]["content"] for r in raw)
    # the user's pairs go to the reward model and, untouched, to every preference variant
    assert (repo / "data/label/prefs.jsonl").read_bytes() == (repo / "data/prepare/prefs.jsonl").read_bytes()
    assert (repo / "data/prepare/rm_prefs.jsonl").read_bytes() == (repo / "data/prepare/prefs.jsonl").read_bytes()
    rm = json.loads((repo / "reports/reward_model/metrics.json").read_text())
    assert rm["train_pairs"] + rm["heldout_pairs"] == 16
    # generate sampled nothing; SFT learned the chosen responses of the train pairs
    assert all(r["samples"] == [] for r in io.read_jsonl(repo / "data/generate/samples.jsonl", "samples"))
    demos = io.read_jsonl(repo / "data/prepare/sft.jsonl", "sft")
    assert [d["messages"][-1]["content"] for d in demos] == [p["chosen"] for p in train]
    table = json.loads((repo / "reports/metrics.json").read_text())
    assert set(table) == {"base", "sft", "dpo"}
    for row in table.values():
        assert "pass_rate" not in row and row["n_gold"] == 0 and row["heldout_pairs"] == 4
        assert 0 <= row["heldout_pref_accuracy"] <= 1 and row["heldout_chosen_ppl"] > 1
        for side in ("chosen", "rejected"):
            lo, hi = row[f"heldout_{side}_ppl_ci"]
            assert lo <= row[f"heldout_{side}_ppl"] <= hi and lo < hi
    answers = io.read_jsonl(repo / "reports/evaluate/dpo/answers.jsonl", "answers")
    assert len(answers) == 4 and all(a["score"] is None and a["passed"] is None for a in answers)
    # judged without a verifier: reward-model and LLM-judge win rates against sft, implicit-reward accuracy
    ref = {a["id"]: a["reward"] for a in io.read_jsonl(repo / "reports/evaluate/sft/answers.jsonl", "answers")}
    by_hand = sum(1 / (1 + math.exp(ref[a["id"]] - a["reward"])) for a in answers) / len(answers)
    assert table["dpo"]["win_rate_rm"] == pytest.approx(by_hand)
    assert table["sft"]["win_rate_rm"] == 0.5 and "win_rate_llm" not in table["sft"]  # the reference itself
    for name in ("base", "dpo"):
        lo, hi = table[name]["win_rate_llm_ci"]
        assert 0 <= lo <= table[name]["win_rate_llm"] <= hi <= 1
        assert 0 <= table[name]["implicit_accuracy"] <= 1 and "mean_reward_ci" in table[name]
    report = (repo / "reports/report.md").read_text()
    assert "No gold verifier" in report and "format preference_conversational" in report
    header = next(line for line in report.splitlines() if line.startswith("| model"))
    for column in ("win rate vs sft (reward model)", "win rate vs sft (LLM judge)", "mean reward",
                   "held-out implicit-reward accuracy vs sft", "held-out pref accuracy", "mean length"):
        assert column in header
    assert "pass rate" not in header
    assert "**Ship: none**" in report


def test_on_policy_from_reasoning_gym_judged_by_its_scorer(tmp_path):
    # spell_backward gives partial credit per matching letter, so even the random tiny model's samples differ
    repo = _repo(tmp_path, {"source": "reasoning_gym", "reasoning_gym": {"spell_backward": {"size": 40}},
                            "n_eval": 6, "n_train": 12, "n_sft": 12, "n_rm": 8})
    assert stages_run(run_ok(DVC + ["repro"], repo)) == COMMON
    evals = io.read_jsonl(repo / "data/prepare/eval.jsonl", "prompts")
    assert {r["verifier"]["type"] for r in evals} == {"reasoning_gym"}
    assert {r["verifier"]["dataset"] for r in evals} == {"spell_backward"}
    samples = {r["id"]: r for r in io.read_jsonl(repo / "data/generate/samples.jsonl", "samples")}
    pairs = io.read_jsonl(repo / "data/label/prefs.jsonl", "prefs")
    assert pairs
    for p in pairs:  # label scored each pair with reasoning-gym's score_answer for the entry its verifier names
        spec = samples[p["id"]]["verifier"]
        assert p["chosen_score"] == tasks.score(spec, p["chosen"]) > tasks.score(spec, p["rejected"])
    specs = {r["id"]: r["verifier"] for r in evals}
    for a in io.read_jsonl(repo / "reports/evaluate/sft/answers.jsonl", "answers"):
        assert a["score"] == tasks.score(specs[a["id"]], a["response"])
    table = json.loads((repo / "reports/metrics.json").read_text())
    assert all(r["n_gold"] == 6 and 0 <= r["pass_rate"] <= 1 for r in table.values())
    assert "win_rate_vs_sft" in table["dpo"]
