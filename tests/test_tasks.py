"""Every verifier on hand-checked responses, and the solver scoring 1.0 on every task."""

import random

import pytest

from posttrain import tasks

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
    (RG_SPEC, "-3579", 1.0),  # reasoning-gym chain_sum entry 0 of seed 0: 1663 - 5242; its score_answer is exact
    (RG_SPEC, "-3578", 0.0),
]


@pytest.mark.parametrize(("spec", "response", "expected"), CASES)
def test_verifier_hand_checked(spec, response, expected):
    assert tasks.score(spec, response) == pytest.approx(expected)


def test_every_verifier_has_a_hand_checked_case():
    assert {spec["type"] for spec, _, _ in CASES} == set(tasks.VERIFIERS)


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_solver_scores_full_marks(task):
    rng = random.Random(1)
    for _ in range(50):
        row = tasks.make_prompt(task, rng)
        assert tasks.score(row["verifier"], tasks.solve(row["verifier"], rng)) == 1.0


def test_unknown_verifier_is_named():
    with pytest.raises(ValueError, match="unknown verifier type 'nope'"):
        tasks.score({"type": "nope"}, "x")
