"""Every verifier on hand-checked responses, the step-level judge of worked answers, and the solver scoring 1.0 on
every task."""

import random

import pytest

from posttrain import tasks, worked

RG_SPEC = {"type": "reasoning_gym", "dataset": "chain_sum", "config": {"min_terms": 2, "max_terms": 2}, "seed": 0,
           "size": 5, "index": 0, "answer": "-3579"}
CASES = [
    # (spec, response, expected score) -- partial credit worked out in the comments
    ({"type": "number", "answer": 85}, "85", 1.0),
    ({"type": "number", "answer": 85}, "The answer is 85.", 1.0),
    ({"type": "number", "answer": 100}, "90", 0.45),  # 0.5 * (1 - 10/100)
    ({"type": "number", "answer": 85}, "47 + 38 = 114", 0.5 * (1 - 29 / 85)),  # the last integer: 114
    ({"type": "number", "answer": 85}, "47 + 38 = 85", 1.0),
    ({"type": "number", "answer": 10}, "50", 0.0),  # relative error >= 1 -> nothing
    ({"type": "number", "answer": 1200}, "1,200", 1.0),
    ({"type": "number", "answer": 85}, "eighty-five", 0.0),
    ({"type": "uppercase", "word": "apple"}, "APPLE", 1.0),
    ({"type": "uppercase", "word": "apple"}, "APPLE.", 1.0),
    ({"type": "uppercase", "word": "apple"}, "apple", 0.5),
    ({"type": "uppercase", "word": "apple"}, "APPLES", 0.0),
    ({"type": "word_count", "n": 5}, "one two three four five", 1.0),
    ({"type": "word_count", "n": 5}, "one two three four", 0.8 * (1 - 1 / 5)),
    ({"type": "word_count", "n": 5}, "", 0.0),
    ({"type": "json_keys", "keys": ["a", "b"]}, '{"a": 1, "b": 2}', 1.0),
    ({"type": "json_keys", "keys": ["a", "b"]}, 'Sure: {"a": 1, "b": 2}', 1.0),
    ({"type": "json_keys", "keys": ["a", "b"]}, '{"a": 1, "c": 2}', 0.5 * 1 / 3),  # overlap {a} / union {a,b,c}
    ({"type": "json_keys", "keys": ["a", "b"]}, "{a: 1}", 0.0),
    ({"type": "json_keys", "keys": ["a", "b"]}, "[1, 2]", 0.0),
    ({"type": "list_n", "n": 3}, "- x\n- y\n- z", 1.0),
    ({"type": "list_n", "n": 4}, "- x\n- y", 0.8 * (1 - 2 / 4)),
    ({"type": "list_n", "n": 3}, "x, y, z", 0.0),
    ({"type": "include", "keyword": "river"}, "The river is wide.", 1.0),
    ({"type": "include", "keyword": "river"}, "The rivers are wide.", 0.2),
    ({"type": "include", "keyword": "river"}, "  ", 0.0),
    # worked answers: 1.0 iff every step and the final answer are right, else 0.5 x share of right steps
    ({"type": "chain_add", "operands": [55, 97, 23]}, "55 + 97 = 152\n152 + 23 = 175\nAnswer: 175", 1.0),
    ({"type": "chain_add", "operands": [55, 97, 23]}, "55 + 97 = 142\n142 + 23 = 165\nAnswer: 165", 0.5 * 2 / 3),
    ({"type": "mul_steps", "a": 47, "b": 36}, "47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1692\nAnswer: 1692", 1.0),
    ({"type": "mul_steps", "a": 47, "b": 36}, "1692", 0.0),  # the right number with no work: no step is there
    (RG_SPEC, "-3579", 1.0),  # reasoning-gym chain_sum entry 0 of seed 0: 1663 - 5242; its score_answer is exact
    (RG_SPEC, "-3578", 0.0),
]


@pytest.mark.parametrize(("spec", "response", "expected"), CASES)
def test_verifier_hand_checked(spec, response, expected):
    assert tasks.score(spec, response) == pytest.approx(expected)


def test_every_verifier_has_a_hand_checked_case():
    assert {spec["type"] for spec, _, _ in CASES} == set(tasks.VERIFIERS)


def test_every_verifier_row_solves_its_own_spec_and_misses_only_where_it_says():
    rng = random.Random(1)
    specs = {s["type"]: s for s in [tasks.make_prompt(t, rng)["verifier"] for t in tasks.TASKS] + [
        spec for spec, _, _ in CASES if spec["type"] == "reasoning_gym"]}  # reasoning-gym's solver is in its row now
    assert set(specs) == set(tasks.VERIFIERS)
    for spec in specs.values():
        assert tasks.score(spec, tasks.solve(spec, rng)) == 1.0, spec["type"]
        miss = tasks.near_miss(spec, rng)
        assert (miss is None) == (tasks.VERIFIERS[spec["type"]].near_miss is None), spec["type"]
        assert miss is None or tasks.score(spec, miss) < 1.0, spec["type"]


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_solver_scores_full_marks(task):
    rng = random.Random(1)
    for _ in range(50):
        row = tasks.make_prompt(task, rng)
        assert tasks.score(row["verifier"], tasks.solve(row["verifier"], rng)) == 1.0


def test_unknown_verifier_is_named():
    with pytest.raises(ValueError, match="unknown verifier type 'nope'"):
        tasks.score({"type": "nope"}, "x")


# --- worked answers, step by step --------------------------------------------------------------------------------
# Plans: chain_add [55, 97, 23] is 55 + 97 = 152, 152 + 23 = 175, then "Answer: 175" (3 judged steps);
# [55, 97, 23, 41] adds 175 + 41 = 216 (4 steps); mul_steps 47 * 36 is 47 * 6 = 282, 47 * 30 = 1410,
# 282 + 1410 = 1692, then "Answer: 1692" (4 steps). Spans are [start, end) character offsets, found by counting:
# "55 + 97 = 152" is 13 characters, "152 + 23 = 175" 14, "Answer: 175" 11; "47 * 6 = 282" 12, "47 * 30 = 1410" 14,
# "282 + 1410 = 1692" 17, "Answer: 1692" 12; each line is followed by one "\n".
ADD3 = {"type": "chain_add", "operands": [55, 97, 23]}
ADD4 = {"type": "chain_add", "operands": [55, 97, 23, 41]}
MUL = {"type": "mul_steps", "a": 47, "b": 36}
T, F = True, False
STEP_CASES = [
    # (spec, response, step scores, final answer right, first wrong span, score)
    (ADD3, "55 + 97 = 152\n152 + 23 = 175\nAnswer: 175", [T, T, T], T, None, 1.0),
    # slip in step 0 carried forward: steps 1 and the answer are right given 142 (error carried forward)
    (ADD3, "55 + 97 = 142\n142 + 23 = 165\nAnswer: 165", [F, T, T], F, (0, 13), 0.5 * 2 / 3),
    # slip in step 0 but step 1 restarts from the true 152: step 1 contradicts its own previous line, so it is
    # wrong too; the final answer is right, yet the score is 0.5 x 1/3, not 1.0
    (ADD3, "55 + 97 = 142\n152 + 23 = 175\nAnswer: 175", [F, F, T], T, (0, 13), 0.5 * 1 / 3),
    # step 0 unreadable ("is" for "="; 14 characters): step 1 is checked against the true 152, as nothing was written
    (ADD3, "55 + 97 is 152\n152 + 23 = 175\nAnswer: 175", [F, T, T], T, (0, 14), 0.5 * 2 / 3),
    # slip in the middle step of four: line 1 starts at 13 + 1 = 14 and is 14 long
    (ADD4, "55 + 97 = 152\n152 + 23 = 165\n165 + 41 = 206\nAnswer: 206", [T, F, T, T], F, (14, 28), 0.5 * 3 / 4),
    # every step right, the Answer line wrong: it starts at 14 + 14 + 1 = 29
    (ADD3, "55 + 97 = 152\n152 + 23 = 175\nAnswer: 185", [T, T, F], F, (29, 40), 0.5 * 2 / 3),
    # garbage: line 0 is no step, step 1 and the Answer line are missing; no "Answer:" at all
    (ADD3, "I think it is 175.", [F, F, F], F, (0, 18), 0.0),
    (ADD3, "", [F, F, F], F, (0, 0), 0.0),
    # stops early: step 1 is the line "Answer: 152" (14..25); the answer step is missing, its span is (len, len)
    (ADD3, "55 + 97 = 152\nAnswer: 152", [T, F, F], F, (14, 25), 0.5 * 1 / 3),
    # text after the Answer line: the answer step spans 29..(29 + 11 + 1 + 16) and is not exactly "Answer: N";
    # the last "Answer:" carries 175, so the final answer counts as right
    (ADD3, "55 + 97 = 152\n152 + 23 = 175\nAnswer: 175\nHope this helps!", [T, T, F], T, (29, 57), 0.5 * 2 / 3),
    # extra whitespace: "  55 + 97 = 152 \n\n  152+23=175\n Answer:175  \n": line 0 is 2..15, the blank line is
    # skipped, "152+23=175" is 20..30, "Answer:175" 32..42
    (ADD3, "  55 + 97 = 152 \n\n  152+23=175\n Answer:175  \n", [T, T, T], T, None, 1.0),
    (ADD3, "  55 + 97 = 152 \n\n  152+23=175\n Answer:176  \n", [T, T, F], F, (32, 42), 0.5 * 2 / 3),
    (MUL, "47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1692\nAnswer: 1692", [T, T, T, T], T, None, 1.0),
    # wrong first partial product, carried into the sum
    (MUL, "47 * 6 = 272\n47 * 30 = 1410\n272 + 1410 = 1682\nAnswer: 1682", [F, T, T, T], F, (0, 12), 0.375),
    # wrong middle step: the tens partial product (line 1 is 13..27)
    (MUL, "47 * 6 = 282\n47 * 30 = 1310\n282 + 1310 = 1592\nAnswer: 1592", [T, F, T, T], F, (13, 27), 0.375),
    # the place-value slip: 47 * 3 instead of 47 * 30 ("47 * 3 = 141" is 13..25); the sum of what was written is right
    (MUL, "47 * 6 = 282\n47 * 3 = 141\n282 + 141 = 423\nAnswer: 423", [T, F, T, T], F, (13, 25), 0.375),
    # wrong sum (line 2 is 13 + 14 + 1 = 28..45)
    (MUL, "47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1602\nAnswer: 1602", [T, T, F, T], F, (28, 45), 0.375),
    # wrong final line only (46..58)
    (MUL, "47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1692\nAnswer: 1962", [T, T, T, F], F, (46, 58), 0.375),
    (MUL, "1692", [F, F, F, F], F, (0, 4), 0.0),
    # CRLF line ends, "x" for times, a full stop after the answer: lines at 0..12, 14..28, 30..47, 49..62
    (MUL, "47 x 6 = 282\r\n47 x 30 = 1410\r\n282 + 1410 = 1692\r\nAnswer: 1692.", [T, T, T, T], T, None, 1.0),
    (MUL, "47 x 6 = 282\r\n47 x 30 = 1400\r\n282 + 1400 = 1682\r\nAnswer: 1682.", [T, F, T, T], F, (14, 28), 0.375),
]


@pytest.mark.parametrize(("spec", "response", "step_scores", "final", "span", "expected"), STEP_CASES)
def test_worked_steps_hand_checked(spec, response, step_scores, final, span, expected):
    judged = tasks.steps(spec, response)
    assert judged == tasks.StepScore(final, step_scores, span)
    assert tasks.score(spec, response) == pytest.approx(expected)
    assert tasks.step_share(spec, response) == pytest.approx(sum(step_scores) / len(step_scores))
    if span is not None and span[0] < span[1]:
        assert response[span[0] : span[1]].strip() == response[span[0] : span[1]]  # no surrounding whitespace


@pytest.mark.parametrize("task", sorted(tasks.PLANS))
def test_worked_near_miss_slips_exactly_the_chosen_step(task):
    """A near miss at step j: the first wrong step is j, every other step is right (the slip propagates
    correctly), the final answer is wrong, and the score is 0.5 x (n - 1) / n."""
    rng = random.Random(3)
    for _ in range(30):
        spec = tasks.make_prompt(task, rng)["verifier"]
        n = len(tasks.steps(spec, tasks.solve(spec)).step_scores)
        for j in range(n):
            miss = tasks.near_miss(spec, rng, step=j)
            judged = tasks.steps(spec, miss)
            assert judged.step_scores == [i != j for i in range(n)]
            assert not judged.final_correct
            assert judged.first_wrong_span == worked._lines(miss)[j]  # the j-th line: the answer line for j = n - 1
            assert tasks.score(spec, miss) == pytest.approx(0.5 * (n - 1) / n)
    with pytest.raises(ValueError, match="step must be in"):
        tasks.near_miss(spec, rng, step=n)


def test_near_miss_is_none_for_tasks_without_one():
    assert tasks.near_miss({"type": "uppercase", "word": "apple"}, random.Random(0)) is None


def test_steps_refuses_a_task_without_steps():
    with pytest.raises(ValueError, match=r"verifier type 'number' has no steps; worked types: \['chain_add'"):
        tasks.steps({"type": "number", "answer": 3}, "3")


def test_worked_answers_are_20_to_60_tokens():
    """The worked tasks exist for their length: the solver's answers are 20-60 SmolLM2 tokens (digits are single
    tokens), where the default task's answers are about 3."""
    from posttrain import modeling

    _, tok = modeling.build_model("tiny", 0)
    rng = random.Random(0)
    for task in tasks.PLANS:
        lengths = [len(tok(tasks.solve(tasks.make_prompt(task, rng)["verifier"]), add_special_tokens=False).input_ids)
                   for _ in range(50)]
        assert 20 <= min(lengths) and max(lengths) <= 60, (task, min(lengths), max(lengths))


def test_long_profile_passes_the_config_checks():
    """profiles/long.yaml (checked with every profile in tests/test_config.py) mixes only worked tasks and holds out
    the >= 500 prompts bench/long_answers.py needs."""
    from pathlib import Path

    from posttrain import config
    from stages import prepare

    long = Path(__file__).resolve().parents[1] / "profiles" / "long.yaml"
    _, params = config.load(prepare.PrepareParams, "prepare", long)
    assert set(params.task_mix) == set(tasks.PLANS) and params.n_eval >= 500
