"""flows/rounds.py without running anything: the plan of a round for each kind of variant, the round's params file,
prompt drawing, and the promotion rule on hand-built answers, including cases that go either way."""

import contextlib

import pytest
import yaml

from flows import promotion, rounds
from posttrain import config, io, stats
from tests.conftest import ROOT


@pytest.fixture()
def repo(tmp_path):
    """A folder with the tiny profile's params and data/prepare written by the prepare stage (cheap: no model)."""
    from stages import prepare

    data = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    data["common"]["mlflow_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with contextlib.chdir(tmp_path):
        prepare.main(["--out", "data/prepare"])
        yield tmp_path


def _spec(k: int, **iterative) -> dict:
    data = config.read_yaml("params.yaml")
    data["iterative"] |= iterative
    return rounds.new_spec(k, data, "params.yaml")


def _names(spec: dict) -> list[str]:
    return [s.name for s in rounds.plan(spec)]


def test_round_one_plans_the_champion_evaluations_and_records_its_commands(repo):
    spec = _spec(1)
    r = rounds.read_round(spec, "x")
    assert (r.k, r.seed, r.champion, r.reference, r.variant) == (1, 1000, "models/sft", "models/sft", "dpo")
    assert _names(spec) == ["generate", "label", "reference", "dpo", "evaluate", "select", "evaluate_champion",
                            "select_champion"]
    steps = {s.name: s for s in rounds.plan(spec)}
    assert steps["dpo"].argv[steps["dpo"].argv.index("--model") + 1] == "models/sft"
    assert steps["select"].argv[steps["select"].argv.index("--prompts") + 1] == "rounds/selection.jsonl"
    assert steps["evaluate"].argv[steps["evaluate"].argv.index("--prompts") + 1] == "data/prepare/eval.jsonl"
    assert spec["round"]["commands"]["dpo"] == steps["dpo"].command
    assert spec["common"]["seed"] == 1000 and spec["generate"]["n_samples"] == 4
    assert "rounds/selection.jsonl" in r.exclude and "data/prepare/eval.jsonl" in r.exclude


def test_later_rounds_start_from_the_last_decision(repo):
    (repo / "rounds" / "round_1").mkdir(parents=True)
    promotion.decision(rounds.read_round(_spec(1), "x"), promotion.Promote(min_gain=-1.0), {"p": 1.0}, {"p": 0.0},
                       10, REPORTED).write(rounds.decision_path(1))  # round 1 promoted its model
    spec = _spec(2, reference="champion")
    r = rounds.read_round(spec, "x")
    assert (r.champion, r.reference, r.champion_select) == ("rounds/round_1/model", "rounds/round_1/model",
                                                            "rounds/round_1/select")
    assert _names(spec) == ["generate", "label", "reference", "dpo", "evaluate", "select"]
    assert "rounds/round_1/prompts.jsonl" in r.exclude
    with pytest.raises(RuntimeError, match="round 2 is not finished"):
        _spec(3)


def test_tgdpo_rounds_remake_their_guidance(repo):
    spec = _spec(1, variant="tgdpo_token")  # tiny: guidance data/guidance/token_reward, a learned token reward
    assert _names(spec)[:6] == ["generate", "label", "reference", "token_reward", "guidance", "dpo"]
    guidance = {s.name: s for s in rounds.plan(spec)}["guidance"]
    assert guidance.argv[guidance.argv.index("--name") + 1] == "token_reward"

    data = config.read_yaml("params.yaml")
    data["dpo"]["variants"]["tgdpo"] = {"loss": "tgdpo", "guidance": "data/guidance/dpo"}
    data["guidance"]["sources"]["dpo"] = {"kind": "dpo", "model": "models/dpo/dpo"}
    data["iterative"]["variant"] = "tgdpo"
    steps = {s.name: s for s in rounds.plan(rounds.new_spec(1, data, "params.yaml"))}
    assert steps["guide"].argv[steps["guide"].argv.index("--variant") + 1] == "dpo"  # the paper's DPO guide

    data["dpo"]["variants"]["tgdpo"]["guidance"] = "data/guidance/nowhere"
    with pytest.raises(config.ParamsError, match="no data/guidance/<source>"):
        rounds.new_spec(1, data, "params.yaml")


def _step_spec(workdir, **label) -> dict:
    data = config.read_yaml("params.yaml")
    base = str(workdir / "models/base")
    data["iterative"] |= {"variant": "step_dpo", "initial": base, "reference": base}
    data["dpo"]["variants"]["step_dpo"] = {"loss": "dpo", "guidance": "data/reference", "pairs": "step"}
    data["label"] |= {"step_pairs": True} | label
    return rounds.new_spec(1, data, "params.yaml")


def test_a_step_dpo_round_caches_and_trains_on_its_step_pairs(repo, workdir):
    """A `pairs: step` variant in a round: reference and dpo get the round's label/step_prefs.jsonl, as dvc.yaml gives
    data/label's; the planned commands run on hand-written pairs (tests/test_step_dpo.py's) train on the 5 step pairs,
    not the 3 response ones. With label.step_pairs off the round is refused before it samples."""
    import importlib

    from tests.conftest import RESPONSE_PAIRS, STEP_PAIRS

    spec = _step_spec(workdir)
    io.write_text(rounds.spec_path(1), yaml.safe_dump(spec))
    steps = {s.name: s for s in rounds.plan(spec)}
    assert list(steps)[:4] == ["generate", "label", "reference", "dpo"]
    for name in ("reference", "dpo"):
        argv = steps[name].argv
        assert argv[argv.index("--step-prefs") + 1] == "rounds/round_1/label/step_prefs.jsonl"
    io.write_jsonl("rounds/round_1/label/prefs.jsonl", RESPONSE_PAIRS)
    io.write_jsonl("rounds/round_1/label/step_prefs.jsonl", STEP_PAIRS)
    ref = importlib.import_module("stages.reference").main(steps["reference"].argv)
    assert (ref["pairs"], ref["step_pairs"]) == (3, 5)
    trained = importlib.import_module("stages.dpo").main(steps["dpo"].argv)
    assert trained["pairs"] == 5 and (repo / "rounds/round_1/model/adapter_model.safetensors").exists()

    io.write_json("rounds/round_1/label/stats.json", {"pairs": 3, "step_pairs": {"pairs": 5, "by_source": {}}})
    for folder in ("eval", "select", "champion_eval", "champion_select"):
        io.write_jsonl(f"rounds/round_1/{folder}/answers.jsonl", [{"id": "p0", "task": "add", "response": "",
                                                                  "score": 1.0, "passed": True, "length": 1}])
        io.write_json(f"rounds/round_1/{folder}/metrics.json", {"pass_rate": 1.0, "pass_rate_ci": [0, 1], "n": 1})
    decided = rounds.decide(spec)
    assert (decided.pairs, decided.step_pairs) == (3, 5)

    with pytest.raises(config.ParamsError, match="step_dpo.pairs: step, and label.step_pairs is off"):
        _step_spec(workdir, step_pairs=False)


def test_user_data_has_no_rounds(repo):
    data = config.read_yaml("params.yaml")
    data["prepare"]["source"] = "my.jsonl"
    with pytest.raises(config.ParamsError, match="no generator of new prompts"):
        rounds.new_spec(1, data, "params.yaml")


def test_selection_and_round_prompts_are_fresh_and_reproducible(repo):
    data = config.read_yaml("params.yaml")
    selection = rounds.selection_rows(data, "params.yaml")
    assert len(selection) == 20 and selection == rounds.selection_rows(data, "params.yaml")
    used = {r["messages"][-1]["content"] for f in rounds.prepare_files() for r in io.read_jsonl(f, "chat")}
    texts = {r["messages"][-1]["content"] for r in selection}
    assert len(texts) == 20 and not texts & used
    io.write_jsonl(rounds.SELECTION, selection)
    r = rounds.read_round(_spec(1), "x")
    drawn = rounds.draw_prompts("r1", 12, r.seed, {"add": 1.0}, r.exclude)
    assert [d["id"] for d in drawn[:2]] == ["r1-add-00000", "r1-add-00001"]
    assert not {d["messages"][-1]["content"] for d in drawn} & (used | texts)


ROUND = rounds.Round(k=2, seed=7, champion="rounds/round_1/model", champion_eval="rounds/round_1/eval",
                     champion_select="rounds/round_1/select", reference="models/sft", variant="dpo", exclude=[])
REPORTED = {"candidate": {"pass_rate": 0.6, "pass_rate_ci": [0.5, 0.7], "n": 10},
            "champion": {"pass_rate": 0.5, "pass_rate_ci": [0.4, 0.6], "n": 10}}


def _answers(passed: list[int]) -> dict[str, float]:
    return {f"p{i:02d}": float(v) for i, v in enumerate(passed)}


def test_a_clear_gain_is_promoted():
    # the candidate passes 10 prompts the champion fails and ties on 10: per-prompt gains +1 x 10, 0 x 10, mean 0.5;
    # a resample's mean is Binomial(20, 1/2) / 20, whose 2.5% quantile is 0.3: far above 0
    d = promotion.decision(ROUND, promotion.Promote(), _answers([1] * 20), _answers([0] * 10 + [1] * 10), 1000,
                           REPORTED)
    assert d.gain == 0.5 and 0.25 < d.gain_ci[0] < 0.5
    assert d.promoted and d.champion == "rounds/round_2/model"
    assert d.champion_select == "rounds/round_2/select"
    assert d.candidate_pass_rate == 0.6 and d.n_select == 20  # reported on eval, decided on selection


def test_a_gain_inside_the_noise_could_go_either_way():
    """Mean gain +0.1 over 20 prompts: 3 wins, 1 loss, 16 ties. Its 95% interval straddles 0, so the default rule
    (lower end > 0) keeps the champion; a rule that tolerates a 0.15 loss (min_gain -0.15) promotes on the very
    same answers. Either outcome is the rule applied, not an accident of the data."""
    cand = _answers([1, 1, 1, 0] + [1] * 8 + [0] * 8)
    champ = _answers([0, 0, 0, 1] + [1] * 8 + [0] * 8)
    gain, lo, hi = stats.paired_gain(cand, champ, 1000, ROUND.seed, 0.95)
    assert gain == pytest.approx(0.1) and -0.15 < lo < 0 < hi
    keep = promotion.decision(ROUND, promotion.Promote(min_gain=0.0), cand, champ, 1000, REPORTED)
    take = promotion.decision(ROUND, promotion.Promote(min_gain=-0.15), cand, champ, 1000, REPORTED)
    assert not keep.promoted and keep.champion == ROUND.champion
    assert keep.champion_select == ROUND.champion_select
    assert take.promoted and take.gain_ci == keep.gain_ci


def test_a_decision_needs_the_same_prompts():
    with pytest.raises(ValueError, match="different prompts"):
        promotion.decision(ROUND, promotion.Promote(), _answers([1, 1]), _answers([1, 1, 1]), 100, REPORTED)


def test_decide_reads_the_round_files(repo):
    spec = _spec(1)
    r = rounds.read_round(spec, "x")
    for folder, passed in ((r.dir / "select", [1, 1, 1, 1]), (r.champion_select, [0, 0, 0, 0]),
                           (r.dir / "eval", [1, 0]), (r.champion_eval, [0, 0])):
        io.write_jsonl(f"{folder}/answers.jsonl", [{"id": f"p{i}", "task": "add", "response": "", "score": float(v),
                                                    "passed": bool(v), "length": 1} for i, v in enumerate(passed)])
        io.write_json(f"{folder}/metrics.json", {"pass_rate": sum(passed) / len(passed), "pass_rate_ci": [0, 1],
                                                 "n": len(passed)})
    io.write_json(r.dir / "label" / "stats.json", {"pairs": 5})
    d = rounds.decide(spec)
    assert d.promoted and d.gain == 1.0 and d.pairs == 5 and d.n_eval == 2 and d.n_select == 4
    d.write(tmp := r.dir / "decision.json")
    assert promotion.Decision.read(tmp) == d  # what run_round writes to decision.json, read back whole
    assert d.metrics() == {"candidate_pass_rate": 0.5, "champion_pass_rate": 0.0, "gain": 1.0, "n_select": 4.0,
                           "pairs": 5.0, "candidate_pass_rate_lo": 0, "candidate_pass_rate_hi": 1,
                           "champion_pass_rate_lo": 0, "champion_pass_rate_hi": 1, "gain_lo": 1.0, "gain_hi": 1.0,
                           "promoted": 1.0}
