"""The bundled suite of verifiable tasks: prompts, the program that solves them, and the verifiers.

Every prompt carries its own verifier spec (a small JSON-able dict), so the gold judgement of a response needs
nothing but this module: `score(spec, response)` returns a score in [0, 1], 1.0 meaning fully correct and values
in between giving partial credit. `solve(spec)` writes a response that scores 1.0; `prepare` uses it for the SFT
demonstrations and the tests use it to check every verifier.

The worked tasks (`chain_add`, `mul_steps`: types in `PLANS`) ask for 20-50-token answers, one line per step then
`Answer: N`. `steps(spec, response)` judges each step and gives the character span of the first wrong one, so
token-level credit can be checked against where the answer actually went wrong (`posttrain.credit`).
"""

from __future__ import annotations

import json
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from posttrain import reasoning_gym

TOPICS = ["the sea", "a cat", "the moon", "coffee", "rain", "a library", "trains", "winter", "a garden", "music"]
WORDS = ["apple", "river", "planet", "guitar", "silver", "forest", "window", "candle", "rocket", "pencil"]
CATEGORIES = {
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "pear"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "animals": ["dog", "cat", "horse", "tiger", "eagle", "whale", "rabbit", "fox"],
}
FILLER = ["we", "all", "like", "to", "see", "it", "on", "a", "calm", "bright", "day", "again", "today", "here"]
KEYS = ["name", "age", "city", "score", "color", "size", "speed", "level"]
_INT = re.compile(r"-?\d+")


def _last_int(text: str) -> int | None:
    """The answer is the last integer ("47 + 38 = 85" -> 85), as GSM8K-style graders read it."""
    found = _INT.findall(text.replace(",", ""))
    return int(found[-1]) if found else None


def _closeness(got: float, want: float, full: float = 1.0, partial: float = 0.5) -> float:
    """`full` when equal, else up to `partial` shrinking linearly with the relative error."""
    if got == want:
        return full
    return partial * max(0.0, 1.0 - abs(got - want) / max(abs(want), 1.0))


# --- verifiers: spec + response -> score in [0, 1] -------------------------------------------------------------


def _score_number(spec: dict, response: str) -> float:
    got = _last_int(response)
    return 0.0 if got is None else _closeness(got, spec["answer"])


def _score_uppercase(spec: dict, response: str) -> float:
    text = response.strip().strip(".!\"'")
    if text == spec["word"].upper():
        return 1.0
    return 0.5 if text.lower() == spec["word"].lower() else 0.0


def _score_word_count(spec: dict, response: str) -> float:
    n = len(response.split())
    return 0.0 if n == 0 else _closeness(n, spec["n"], partial=0.8)


def _score_json_keys(spec: dict, response: str) -> float:
    text = response.strip()
    m = re.search(r"\{.*\}", text, re.S)
    try:
        obj = json.loads(m.group() if m else text)
    except (json.JSONDecodeError, TypeError):
        return 0.0
    if not isinstance(obj, dict):
        return 0.0
    want = set(spec["keys"])
    if set(obj) == want:
        return 1.0
    return 0.5 * len(want & set(obj)) / len(want | set(obj))


def _score_list_n(spec: dict, response: str) -> float:
    items = [ln for ln in response.splitlines() if ln.strip().startswith(("-", "*"))]
    return 0.0 if not items else _closeness(len(items), spec["n"], partial=0.8)


def _score_include(spec: dict, response: str) -> float:
    words = re.findall(r"[a-z']+", response.lower())
    if not words:
        return 0.0
    return 1.0 if spec["keyword"].lower() in words else 0.2


# --- worked answers: every step checked by a program -----------------------------------------------------------
# A worked task's answer is one line per step, `left op right = result`, then `Answer: N`. The plan of a spec lists
# the steps a correct answer takes; an operand is a number from the prompt or the result of an earlier step.


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


def _plan(spec: dict) -> list[Step]:
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
    plan = _plan(spec)
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


def _score_worked(spec: dict, response: str) -> float:
    """1.0 when the final answer and every step are right, else 0.5 x the share of right steps: a wrong answer
    never reaches 0.5, so `label.margin: 0.5` pairs right answers against wrong ones only (as near misses of the
    number tasks score below 0.5), while among wrong answers the one with more right steps scores higher."""
    judged = steps(spec, response)
    if judged.final_correct and all(judged.step_scores):
        return 1.0
    return 0.5 * sum(judged.step_scores) / len(judged.step_scores)


def _render_worked(spec: dict, wrong_step: int | None = None, delta: int = 0) -> str:
    """A worked answer; with `wrong_step`, that step's result is off by `delta` and every later step is computed
    correctly from it (the slip propagates); `wrong_step == len(plan)` puts the slip in the `Answer:` line."""
    plan = _plan(spec)
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


VERIFIERS: dict[str, Callable[[dict, str], float]] = {
    "number": _score_number,
    "chain_add": _score_worked,
    "mul_steps": _score_worked,
    "uppercase": _score_uppercase,
    "word_count": _score_word_count,
    "json_keys": _score_json_keys,
    "list_n": _score_list_n,
    "include": _score_include,
    reasoning_gym.TYPE: reasoning_gym.score,
}


def score(spec: dict, response: str) -> float:
    """Gold score of `response` under a verifier `spec`, in [0, 1]."""
    kind = spec.get("type")
    if kind not in VERIFIERS:
        raise ValueError(f"unknown verifier type {kind!r}; known: {sorted(VERIFIERS)}")
    return float(VERIFIERS[kind](spec, response))


# --- tasks: rng -> (prompt text, verifier spec) ---------------------------------------------------------------


def _add(rng: random.Random) -> tuple[str, dict]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}? Reply with only the number.", {"type": "number", "answer": a + b}


def _sub(rng: random.Random) -> tuple[str, dict]:
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return f"What is {a} - {b}? Reply with only the number.", {"type": "number", "answer": a - b}


def _mul(rng: random.Random) -> tuple[str, dict]:
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return f"What is {a} * {b}? Reply with only the number.", {"type": "number", "answer": a * b}


def _chain_add(rng: random.Random) -> tuple[str, dict]:
    ops = [rng.randint(10, 99) for _ in range(rng.choice([3, 4]))]
    text = (f"Add {', '.join(map(str, ops[:-1]))} and {ops[-1]}. Show each running total on its own line, "
            "then 'Answer: N'.")
    return text, {"type": "chain_add", "operands": ops}


def _mul_steps(rng: random.Random) -> tuple[str, dict]:
    a, b = rng.randint(12, 99), 10 * rng.randint(1, 9) + rng.randint(1, 9)  # b has a non-zero ones digit
    text = (f"Multiply {a} by {b} with partial products: {a} times the ones digit of {b}, then {a} times its tens, "
            "then their sum, each on its own line, then 'Answer: N'.")
    return text, {"type": "mul_steps", "a": a, "b": b}


def _uppercase(rng: random.Random) -> tuple[str, dict]:
    w = rng.choice(WORDS)
    return f"Write the word '{w}' in all capital letters. Reply with only that word.", {"type": "uppercase", "word": w}


def _word_count(rng: random.Random) -> tuple[str, dict]:
    n, topic = rng.randint(3, 8), rng.choice(TOPICS)
    return f"Write a sentence about {topic} with exactly {n} words.", {"type": "word_count", "n": n, "topic": topic}


def _json_keys(rng: random.Random) -> tuple[str, dict]:
    keys = rng.sample(KEYS, 2)
    text = f"Reply with only a JSON object with exactly the keys \"{keys[0]}\" and \"{keys[1]}\"."
    return text, {"type": "json_keys", "keys": keys}


def _list_n(rng: random.Random) -> tuple[str, dict]:
    n, cat = rng.randint(2, 5), rng.choice(sorted(CATEGORIES))
    return f"List {n} {cat}, one per line, each line starting with '- '.", {"type": "list_n", "n": n, "category": cat}


def _include(rng: random.Random) -> tuple[str, dict]:
    kw, topic = rng.choice(WORDS), rng.choice(TOPICS)
    text = f"Write one short sentence about {topic} that uses the word '{kw}'."
    return text, {"type": "include", "keyword": kw, "topic": topic}


TASKS: dict[str, Callable[[random.Random], tuple[str, dict]]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "chain_add": _chain_add,
    "mul_steps": _mul_steps,
    "uppercase": _uppercase,
    "word_count": _word_count,
    "json_keys": _json_keys,
    "list_n": _list_n,
    "include": _include,
}


def make_prompt(task: str, rng: random.Random) -> dict[str, Any]:
    """One prompt row: `task`, chat `messages` (the user turn) and its `verifier` spec."""
    text, spec = TASKS[task](rng)
    return {"task": task, "messages": [{"role": "user", "content": text}], "verifier": spec}


NEAR_MISS_DELTAS = [-11, -10, -9, -2, -1, 1, 2, 9, 10, 11]
"""Off by a carry or a digit: the errors small models make."""


def draw(rng: random.Random, task_mix: dict[str, float], n: int, seen: set[str]) -> list[dict]:
    """`n` prompts (`make_prompt` rows) of tasks drawn by weight from `task_mix`, none whose `io.prompt_key` is in
    `seen` (which grows with them); fewer when the mix has no more distinct prompts within n * 50 draws."""
    from posttrain import io

    names = sorted(task_mix)
    weights = [task_mix[t] for t in names]
    rows: list[dict] = []
    for _ in range(n * 50):
        if len(rows) == n:
            break
        row = make_prompt(rng.choices(names, weights)[0], rng)
        if io.prompt_key(row) in seen:
            continue
        seen.add(io.prompt_key(row))
        rows.append(row)
    return rows


def near_miss(spec: dict, rng: random.Random, step: int | None = None) -> str | None:
    """A plausible wrong answer for number and worked tasks (None for the others). A worked one has one slipped
    step (`step`, default a random one; the `Answer:` line is step len(plan)) whose error propagates."""
    if spec["type"] == "number":
        return str(spec["answer"] + rng.choice(NEAR_MISS_DELTAS))
    if spec["type"] not in PLANS:
        return None
    n = len(_plan(spec))
    step = rng.randint(0, n) if step is None else step
    if not 0 <= step <= n:
        raise ValueError(f"step must be in [0, {n}] for {spec['type']!r}, got {step}")
    return _render_worked(spec, step, rng.choice(NEAR_MISS_DELTAS))


# --- the solver: spec -> a response scoring 1.0 ---------------------------------------------------------------


def solve(spec: dict, rng: random.Random | None = None) -> str:
    """A correct response for `spec`; `rng` varies the wording where the task leaves freedom."""
    rng = rng or random.Random(0)
    kind = spec["type"]
    if kind == "number":
        return str(spec["answer"])
    if kind in PLANS:
        return _render_worked(spec)
    if kind == "uppercase":
        return spec["word"].upper()
    if kind == "word_count":
        head = ["I", "love"] + spec["topic"].split()
        words = (head + rng.sample(FILLER, len(FILLER)))[: spec["n"]]
        return " ".join(words).capitalize() + "."
    if kind == "json_keys":
        return json.dumps({k: rng.randint(1, 9) for k in spec["keys"]})
    if kind == "list_n":
        return "\n".join(f"- {item}" for item in rng.sample(CATEGORIES[spec["category"]], spec["n"]))
    if kind == "include":
        return f"I think about {spec['topic']} when I see a {spec['keyword']}."
    raise ValueError(f"unknown verifier type {kind!r}; known: {sorted(VERIFIERS)}")
