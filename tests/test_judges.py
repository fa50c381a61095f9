"""The judges of posttrain.judges: hand-worked order averaging and round robin, the LLM judge's position-bias
cancellation on real (tiny) models whose verdict is fixed by construction, and the verifier / reward-model judges."""

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain import io, judges, modeling, reward

ROWS = [{"id": "p1", "messages": [{"role": "user", "content": "What is 2 + 2?"}],
         "verifier": {"type": "number", "answer": 4}}]


def test_both_orders_by_hand():
    # asked (a, b): a wins as first with 0.9; asked (b, a): b wins as first with 0.3, so a wins as second with 0.7
    assert judges.both_orders(0.9, 0.3) == pytest.approx((0.9 + 0.7) / 2)
    assert judges.both_orders(1.0, 1.0) == 0.5  # always the first answer: no preference left


def test_round_robin_by_hand():
    # P(0 beats 1) = 0.8, P(0 beats 2) = 0.6, P(1 beats 2) = 0.5:
    # 0: (0.8 + 0.6) / 2 = 0.7; 1: (0.2 + 0.5) / 2 = 0.35; 2: (0.4 + 0.5) / 2 = 0.45
    table = {(0, 1): 0.8, (0, 2): 0.6, (1, 2): 0.5}
    assert judges.round_robin(3, lambda pairs: [table[p] for p in pairs]) == pytest.approx([0.7, 0.35, 0.45])


def _fixed_verdict_model(letter: str):
    """The tiny random Llama with its output layer replaced by one that always puts 10 logits on `letter`: a real
    causal LM whose verdict is known whatever the prompt."""
    model, tok = modeling.build_model("tiny", 0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    with torch.no_grad():
        head.bias[tok.encode(letter, add_special_tokens=False)[0]] = 10.0
    model.lm_head = head
    return model, tok


@pytest.mark.parametrize("letter", ["A", "B"])
def test_a_judge_that_always_picks_one_position_scores_every_pair_half(letter):
    model, tok = _fixed_verdict_model(letter)
    judge = judges.LlmJudge(judges.LlmJudgeParams(), torch.device("cpu"), model=model, tok=tok)
    first, second = ["4", "four, I think", "5"], ["5", "4", "4"]
    p = judge.prefer(ROWS * 3, first, second)
    assert p == pytest.approx([0.5, 0.5, 0.5], abs=1e-3)
    assert judge.scores(ROWS, [["4", "5", "22"]]) == [pytest.approx([0.5, 0.5, 0.5], abs=1e-3)]


def test_llm_judge_reads_the_verdict_letters_and_counts_a_tie_half():
    model, tok = _fixed_verdict_model("C")
    judge = judges.LlmJudge(judges.LlmJudgeParams(), torch.device("cpu"), model=model, tok=tok)
    v = judge.verdicts([judge.render(ROWS[0]["messages"], "4", "5")])
    # logits (0, 0, 10) over A, B, C -> softmax = (1, 1, e^10) / (2 + e^10)
    z = 2 + math.exp(10)
    assert v[0].tolist() == pytest.approx([1 / z, 1 / z, math.exp(10) / z], rel=1e-4)
    assert judge.prefer(ROWS, ["4"], ["5"]) == pytest.approx([0.5])


def test_llm_judge_is_antisymmetric_on_a_random_model():
    model, tok = modeling.build_model("tiny", 1)
    torch.manual_seed(1)
    with torch.no_grad():  # weights far larger than the init's, so the random judge has opinions
        for p in model.parameters():
            p.normal_(0, 0.5)
    judge = judges.LlmJudge(judges.LlmJudgeParams(), torch.device("cpu"), model=model, tok=tok)
    ab = judge.prefer(ROWS * 2, ["4", "It is 4."], ["5", "4"])
    ba = judge.prefer(ROWS * 2, ["5", "4"], ["4", "It is 4."])
    assert [x + y for x, y in zip(ab, ba, strict=True)] == pytest.approx([1.0, 1.0])
    assert any(abs(x - 0.5) > 0.01 for x in ab), "a random model should prefer something"


def test_llm_judge_prompt_holds_both_answers_and_clips_long_ones():
    model, tok = modeling.build_model("tiny", 0)
    judge = judges.LlmJudge(judges.LlmJudgeParams(max_answer_chars=5), torch.device("cpu"), model=model, tok=tok)
    text = judge.render(ROWS[0]["messages"], "four!!!!", "4")
    assert "What is 2 + 2?" in text and "four! [...]" in text and "Assistant B's Answer]\n4\n" in text


def test_template_must_name_its_slots():
    with pytest.raises(ValueError, match="answer_b"):
        judges.LlmJudgeParams(template="{question} {answer_a}")


def test_verifier_judge():
    judge = judges.VerifierJudge()
    assert judge.scores(ROWS, [["4", "5", "The answer is 4"]]) == [[1.0, pytest.approx(0.375), 1.0]]
    assert judge.prefer(ROWS * 3, ["4", "5", "4"], ["5", "4", "2 + 2 = 4"]) == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="row 2: field 'verifier': null"):
        judge.prefer([ROWS[0], {"id": "x", "messages": ROWS[0]["messages"], "verifier": None}], ["4", "4"],
                     ["5", "5"])
    with pytest.raises(ValueError, match="row 1: field 'verifier': KeyError"):
        judge.scores([{"id": "y", "messages": [], "verifier": {"type": "number"}}], [["4"]])
    with pytest.raises(ValueError, match="judge 'oracle' is not one of"):
        judges.make("oracle")


def test_reward_model_judge_is_sigmoid_of_the_reward_difference(workdir, tmp_path):
    rm = reward.build(modeling.load_chain(workdir / "models/base"))
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    reward.save(rm, tmp_path / "rm", str(workdir / "models/base"), {})
    judge = judges.RewardModelJudge(reward_model=str(tmp_path / "rm"), device=torch.device("cpu"), max_len=64)
    r4, r5 = judge.scores(ROWS, [["4", "5"]])[0]
    assert r4 != r5
    assert judge.prefer(ROWS, ["4"], ["5"]) == pytest.approx([1 / (1 + math.exp(r5 - r4))])


def test_every_judge_row_keeps_the_protocol_and_is_tested_here():
    import inspect
    import sys

    here = inspect.getsource(sys.modules[__name__])
    for name, j in judges.JUDGES.items():
        assert callable(j.cls.scores) and callable(j.cls.prefer), name
        assert (j.stored is None) == (j.compare is None), f"{name}: a stored value needs its compare, and only then"
        assert j.gap(0.5, 0.5) >= 0 and j.gap(0.5, 0.9) > 0, name
        assert f"judges.{j.cls.__name__}(" in here, f"{name}: no test here builds {j.cls.__name__}"


def test_a_new_judge_row_shows_its_column_in_label_and_report_with_no_other_edit(tmp_path, monkeypatch):
    """One row added to JUDGES: label takes its gap, report its win rate (from a stored value) and its column."""
    from stages import label, report

    shorter = judges.Judge(judges.VerifierJudge, gap=lambda margin, min_prob: 0.25, column="win_rate_short",
                           header="shorter than {ref}", stored="length", compare=lambda a, b: float(a < b),
                           about="Shorter: the share of prompts where an answer is shorter than {ref}'s.")
    monkeypatch.setitem(judges.JUDGES, "shorter", shorter)
    assert label.LabelParams(judge="shorter").gap() == 0.25
    lengths = {"sft": [3, 3, 3, 3], "dpo": [1, 5, 2, 3]}  # dpo shorter on prompts 1 and 3: 2 of 4
    for n, ls in lengths.items():
        io.write_jsonl(tmp_path / n / "answers.jsonl", [
            {"id": f"p{i}", "task": "t", "response": "x", "score": None, "passed": None, "length": k}
            for i, k in enumerate(ls)])
    table = {n: {} for n in lengths}
    params = report.ReportParams(judges=["shorter"])
    report.add_judged(table, tmp_path, params, None, SimpleNamespace(seed=0), 200)
    assert table["dpo"]["win_rate_short"] == 0.5 and table["sft"]["win_rate_short"] == 0.0  # never shorter itself
    header = report.table_lines(table, ["sft", "dpo"], params)[0]
    assert "shorter than sft" in header
    assert "Shorter: the share of prompts where an answer is shorter than sft's." in report._intro(
        table | {"sft": table["sft"] | {"n": 4}}, ["sft", "dpo"], params, gold=False)
