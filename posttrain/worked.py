"""Worked answers, every step checked by a program: the step plans of the worked tasks, the step-level verifier
(`steps`: a score per step and the character span of the first wrong one), the worked score, and rendering (the
solver's answer, or a near miss whose slip propagates). `posttrain.tasks` registers the worked tasks with these.

A worked task's answer is one line per step, `left op right = result`, then `Answer: N`. The plan of a spec lists
the steps a correct answer takes; an operand is a number from the prompt or the result of an earlier step.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Prev:
    """The result of step `i`, as the response wrote it."""

    i: int


@dataclass(frozen=True)
class Step:
    op: str
    left: int | Prev
    right: int | Prev


class StepScore(NamedTuple):
    """The step-level judgement of a worked answer (`steps`)."""

    final_correct: bool
    """The last `Answer: N` of the response carries the right N."""
    step_scores: list[bool]
    """One per step of the plan, then one for the `Answer:` line."""
    first_wrong_span: tuple[int, int] | None
    """Character span [start, end) of the first wrong step in the response; (len, len) when that step is missing
    (the response stops early); None when every step is right."""


_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "*": operator.mul}
_STEP_LINE = re.compile(r"(-?\d+)\s*([+*x\u00d7])\s*(-?\d+)\s*=\s*(-?\d+)\.?")
_ANSWER_LINE = re.compile(r"answer\s*:\s*(-?\d+)\.?", re.I)
_ANSWER_ANYWHERE = re.compile(r"answer\s*:\s*(-?\d+)", re.I)


def _chain_add_plan(spec: dict) -> list[Step]:
    """55, 97, 23 -> 55 + 97, then (that) + 23: each running total on its own line."""
    ops = spec["operands"]
    return [Step("+", ops[0], ops[1])] + [Step("+", Prev(i), x) for i, x in enumerate(ops[2:])]


def _mul_steps_plan(spec: dict) -> list[Step]:
    """47 * 36 -> 47 * 6, 47 * 30, then the sum of the two partial products."""
    a, b = spec["a"], spec["b"]
    return [Step("*", a, b % 10), Step("*", a, b - b % 10), Step("+", Prev(0), Prev(1))]


PLANS: dict[str, Callable[[dict], list[Step]]] = {"chain_add": _chain_add_plan, "mul_steps": _mul_steps_plan}
"""The worked verifier types: each maps a spec to the steps of its correct answer."""


def plan_of(spec: dict) -> list[Step]:
    kind = spec.get("type")
    if kind not in PLANS:
        raise ValueError(f"verifier type {kind!r} has no steps; worked types: {sorted(PLANS)}")
    return PLANS[kind](spec)


def _operand(x: int | Prev, written: list[int | None], gold: list[int]) -> int:
    """An operand's expected value: a prompt number, or an earlier step's result as written (error carried
    forward); the gold result where that step's line could not be read."""
    if isinstance(x, int):
        return x
    return gold[x.i] if written[x.i] is None else written[x.i]


def _gold(plan: list[Step]) -> list[int]:
    out: list[int] = []
    for st in plan:
        out.append(_OPS[st.op](_operand(st.left, out, out), _operand(st.right, out, out)))
    return out


def _lines(text: str) -> list[tuple[int, int]]:
    """Character spans of the non-blank lines of `text`, surrounding whitespace excluded."""
    spans = []
    for m in re.finditer(r"[^\n]+", text):
        line = m.group()
        if line.strip():
            spans.append((m.start() + len(line) - len(line.lstrip()), m.end() - len(line) + len(line.rstrip())))
    return spans


def steps(spec: dict, response: str) -> StepScore:
    """Judge a worked answer step by step.

    The i-th non-blank line is step i of the plan. A step is right when its line reads `left op right = result`
    with the plan's operator, the prompt's numbers, earlier results as the response wrote them (so a slip is
    counted once, where it happens, and the steps built on it correctly still count: error carried forward, as
    exam markers do), and the arithmetic of its own operands. The step after the plan is everything from the next
    line to the end: right when it is exactly `Answer: N` with N the last step's written result. Because every
    operand is pinned to the prompt or to an earlier line, all steps right implies the final answer right.
    """
    plan = plan_of(spec)
    gold = _gold(plan)
    lines = _lines(response)
    end = (len(response), len(response))
    written: list[int | None] = []
    ok: list[bool] = []
    spans: list[tuple[int, int]] = []
    for j, st in enumerate(plan):
        span = lines[j] if j < len(lines) else end
        m = _STEP_LINE.fullmatch(response[span[0] : span[1]])
        spans.append(span)
        if m is None:
            written.append(None)
            ok.append(False)
            continue
        left, op, right, result = int(m[1]), "+" if m[2] == "+" else "*", int(m[3]), int(m[4])
        written.append(result)
        ok.append(op == st.op and left == _operand(st.left, written, gold)
                  and right == _operand(st.right, written, gold) and result == _OPS[op](left, right))
    k = len(plan)
    span = (lines[k][0], lines[-1][1]) if k < len(lines) else end
    m = _ANSWER_LINE.fullmatch(response[span[0] : span[1]])
    spans.append(span)
    ok.append(m is not None and int(m[1]) == _operand(Prev(k - 1), written, gold))
    found = _ANSWER_ANYWHERE.findall(response)
    final = bool(found) and int(found[-1]) == gold[-1]
    wrong = next((spans[j] for j, good in enumerate(ok) if not good), None)
    return StepScore(final, ok, wrong)


def step_share(spec: dict, response: str) -> float:
    """The share of a worked answer's steps (the `Answer:` line included) that are right."""
    judged = steps(spec, response).step_scores
    return sum(judged) / len(judged)


def score(spec: dict, response: str) -> float:
    """1.0 when the final answer and every step are right, else 0.5 x the share of right steps: a wrong answer
    never reaches 0.5, so `label.margin: 0.5` pairs right answers against wrong ones only (as near misses of the
    number tasks score below 0.5), while among wrong answers the one with more right steps scores higher."""
    judged = steps(spec, response)
    if judged.final_correct and all(judged.step_scores):
        return 1.0
    return 0.5 * sum(judged.step_scores) / len(judged.step_scores)


def render(spec: dict, wrong_step: int | None = None, delta: int = 0) -> str:
    """A worked answer; with `wrong_step`, that step's result is off by `delta` and every later step is computed
    correctly from it (the slip propagates); `wrong_step == len(plan)` puts the slip in the `Answer:` line."""
    plan = plan_of(spec)
    gold = _gold(plan)
    written: list[int | None] = []
    lines = []
    for j, st in enumerate(plan):
        left, right = _operand(st.left, written, gold), _operand(st.right, written, gold)
        result = _OPS[st.op](left, right) + (delta if j == wrong_step else 0)
        written.append(result)
        lines.append(f"{left} {st.op} {right} = {result}")
    lines.append(f"Answer: {written[-1] + (delta if wrong_step == len(plan) else 0)}")
    return "\n".join(lines)
