"""reasoning-gym (pinned 0.1.25, offline) as a source of verifiable prompts, scored by its own `score_answer`.

    prepare:
      source: reasoning_gym
      reasoning_gym:               # data set name -> size (entries generated) and config (its *Config fields)
        chain_sum: {size: 40, config: {min_terms: 2, max_terms: 2}}
        basic_arithmetic: {size: 40}

Each entry becomes a prompt whose verifier spec names the data set and the entry:
`{"type": "reasoning_gym", "dataset": "chain_sum", "config": {...}, "seed": 0, "size": 40, "index": 7,
"answer": "12"}`. `score(spec, response)` rebuilds that data set (procedural, so the same arguments give the same
entries; cached per process) and returns `dataset.score_answer(response, entry)`: `label` and `evaluate` call it
through `posttrain.tasks.score` exactly as they score the bundled tasks. The stored `answer` guards against a
different reasoning-gym version regenerating other entries.
"""

from __future__ import annotations

import functools
import json
from typing import Any

TYPE = "reasoning_gym"


def names() -> list[str]:
    """Every data set reasoning-gym can generate."""
    import reasoning_gym

    return sorted(reasoning_gym.factory.DATASETS)


@functools.lru_cache(maxsize=64)
def _dataset(name: str, config_json: str, seed: int, size: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, seed=seed, size=size, **json.loads(config_json))


def dataset(name: str, config: dict[str, Any], seed: int, size: int):
    """The reasoning-gym data set `name` with these config fields (unknown names and fields raise ValueError)."""
    if name not in names():
        raise ValueError(f"unknown reasoning_gym data set {name!r}; known: {', '.join(names())}")
    try:
        return _dataset(name, json.dumps(config, sort_keys=True), seed, size)
    except TypeError as e:  # an unknown config field
        raise ValueError(f"reasoning_gym data set {name!r}: bad config {config}: {e}") from e


def spec(name: str, config: dict[str, Any], seed: int, size: int, index: int, answer: str) -> dict:
    return {"type": TYPE, "dataset": name, "config": config, "seed": seed, "size": size, "index": index,
            "answer": answer}


def prompts(name: str, config: dict[str, Any], seed: int, size: int) -> list[dict]:
    """One prompt row per entry (`task`: the data set's name), with its verifier spec."""
    ds = dataset(name, config, seed, size)
    rows = []
    for i in range(size):
        entry = ds[i]
        rows.append({"task": f"rg_{name}", "messages": [{"role": "user", "content": entry["question"]}],
                     "verifier": spec(name, config, seed, size, i, str(entry["answer"]))})
    return rows


def _entry(s: dict) -> tuple[Any, dict]:
    ds = _dataset(s["dataset"], json.dumps(s["config"], sort_keys=True), s["seed"], s["size"])
    entry = ds[s["index"]]
    if str(entry["answer"]) != s["answer"]:
        raise ValueError(f"reasoning_gym {s['dataset']}[{s['index']}] now answers {entry['answer']!r}, the spec "
                         f"says {s['answer']!r}: a different reasoning-gym version? (pinned: 0.1.25)")
    return ds, entry


def score(s: dict, response: str) -> float:
    """reasoning-gym's own score of `response` for the entry the spec names, in [0, 1]."""
    ds, entry = _entry(s)
    return float(ds.score_answer(response, entry))


def solve(s: dict) -> str:
    """The entry's reference answer (it scores 1.0): the SFT demonstration."""
    return s["answer"]
