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
import random
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from posttrain import reasoning_gym, worked
from posttrain.worked import PLANS, StepScore, step_share, steps  # noqa: F401 (the task suite's API)

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


def _near_miss_number(spec: dict, rng: random.Random, step: int | None) -> str:
    return str(spec["answer"] + rng.choice(NEAR_MISS_DELTAS))


def _near_miss_worked(spec: dict, rng: random.Random, step: int | None) -> str:
    """One slipped step (`step`, default a random one; the `Answer:` line is step len(plan)); its error propagates."""
    n = len(worked.plan_of(spec))
    step = rng.randint(0, n) if step is None else step
    if not 0 <= step <= n:
        raise ValueError(f"step must be in [0, {n}] for {spec['type']!r}, got {step}")
    return worked.render(spec, step, rng.choice(NEAR_MISS_DELTAS))


# --- the solvers: spec -> a response scoring 1.0 (`rng` varies the wording where the task leaves freedom) -------


def _solve_word_count(spec: dict, rng: random.Random) -> str:
    head = ["I", "love"] + spec["topic"].split()
    return " ".join((head + rng.sample(FILLER, len(FILLER)))[: spec["n"]]).capitalize() + "."


class Verifier(NamedTuple):
    """One verifier type: all that is known about its answers."""

    score: Callable[[dict, str], float]
    """(spec, response) -> gold score in [0, 1]."""
    solve: Callable[[dict, random.Random], str]
    """(spec, rng) -> a response scoring 1.0 (prepare's SFT demos and chosen answers)."""
    near_miss: Callable[[dict, random.Random, int | None], str] | None = None
    """(spec, rng, step) -> a plausible wrong answer (prepare's rejected answers); None: the type has none."""


VERIFIERS: dict[str, Verifier] = {
    "number": Verifier(_score_number, lambda s, rng: str(s["answer"]), _near_miss_number),
    "chain_add": Verifier(worked.score, lambda s, rng: worked.render(s), _near_miss_worked),
    "mul_steps": Verifier(worked.score, lambda s, rng: worked.render(s), _near_miss_worked),
    "uppercase": Verifier(_score_uppercase, lambda s, rng: s["word"].upper()),
    "word_count": Verifier(_score_word_count, _solve_word_count),
    "json_keys": Verifier(_score_json_keys, lambda s, rng: json.dumps({k: rng.randint(1, 9) for k in s["keys"]})),
    "list_n": Verifier(_score_list_n, lambda s, rng: "\n".join(
        f"- {item}" for item in rng.sample(CATEGORIES[s["category"]], s["n"]))),
    "include": Verifier(_score_include, lambda s, rng: f"I think about {s['topic']} when I see a {s['keyword']}."),
    reasoning_gym.TYPE: Verifier(reasoning_gym.score, lambda s, rng: reasoning_gym.solve(s)),
}
"""Verifier type (a spec's `type`) -> its row. A new type is its functions and one row; tests/test_tasks.py needs a
hand-checked case for its score."""


def _row(spec: dict) -> Verifier:
    kind = spec.get("type")
    if kind not in VERIFIERS:
        raise ValueError(f"unknown verifier type {kind!r}; known: {sorted(VERIFIERS)}")
    return VERIFIERS[kind]


def score(spec: dict, response: str) -> float:
    """Gold score of `response` under a verifier `spec`, in [0, 1]."""
    return float(_row(spec).score(spec, response))


def solve(spec: dict, rng: random.Random | None = None) -> str:
    """A correct response for `spec`; `rng` varies the wording where the task leaves freedom."""
    return _row(spec).solve(spec, rng or random.Random(0))


def near_miss(spec: dict, rng: random.Random, step: int | None = None) -> str | None:
    """A plausible wrong answer for number and worked tasks (None for the others). A worked one has one slipped
    step (`step`, default a random one; the `Answer:` line is step len(plan)) whose error propagates."""
    miss = _row(spec).near_miss
    return None if miss is None else miss(spec, rng, step)
