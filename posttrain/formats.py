"""Reading a user's data set in any of the shapes TRL documents, into the pipeline's internal rows.

    rows = formats.read("data/my_prefs.jsonl")            # a local .jsonl/.json/.parquet/.csv file
    rows = formats.read("saved_dir")                      # a `datasets` folder from `save_to_disk`
    rows = formats.read("org/name", subset="default", split="train_prefs")    # a hub data set (needs network)
    name = formats.detect(rows, "data/my_prefs.jsonl")    # or name one of FORMATS yourself
    converted, dropped = formats.convert(rows, name, "data/my_prefs.jsonl")

`FORMATS` (the one list of names) maps each format to its kind, its matcher (`detect` takes the first format whose
matcher accepts the first row) and its converter; every converter turns one raw
row into one internal row of its kind (`posttrain.io.SCHEMAS`), or raises `Bad` (a malformed row: the stage stops,
naming file, row and field) or `Drop` (a legal but useless row: dropped and counted under a stated reason):
- kind `prefs` (`prompt` messages, `chosen`, `rejected` strings, `chosen_score`, `rejected_score` or null):
  `preference` (`prompt`, `chosen`, `rejected` strings), `preference_conversational` (`prompt` a message list,
  `chosen`/`rejected` lists of assistant messages), `preference_implicit` (`chosen`/`rejected` whole
  conversations sharing the prompt as a prefix: how UltraFeedback-binarized stores them, and HH-RLHF, whose
  "\n\nHuman: ... \n\nAssistant: ..." transcript strings are read as conversations). TRL's
  `score_chosen`/`score_rejected` columns are kept as `chosen_score`/`rejected_score`.
- kind `sft` (`messages` ending with the assistant turn to learn): `messages`, `prompt_completion` (`prompt` and
  `completion` strings, or message lists).
- kind `prompts` (`messages` up to the user's turn; no verifier): `prompt_only` (`prompt`, a string or messages).

Drops (the `dropped` counter): `empty_prompt`, `empty_response`, `chosen_equals_rejected`, `no_assistant_turn`
(a conversation that does not end with an assistant turn answering a user turn), `prompt_ends_with_assistant`,
`no_shared_prompt` (implicit
pairs whose conversations share no user turn), `duplicate_prompt` (the same prompt again: the first row is kept).
Too-long rows need the tokenizer, so the training stages count those (`too_long`).
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from posttrain import config, io

ROLES = ("system", "user", "assistant")
Pairs = Literal["on_policy", "dataset"]
"""Where preference pairs come from (`prepare.pairs`): sampled from the SFT policy and judged, or the data set's."""
HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant: "
"""The turn markers of Anthropic's HH-RLHF transcripts."""
LOCAL = (".jsonl", ".json", ".parquet", ".csv")
"""File types read from a local path; any other source is a saved `datasets` folder or a hub id."""


class Bad(ValueError):
    """A malformed row: `field` and what is wrong with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")


class Drop(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """A legal but useless row, dropped and counted under `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- reading --------------------------------------------------------------------------------------------------


def _json_lines(path: Path) -> list[Any]:
    """JSON Lines with the row number of any malformed line (a UTF-8 BOM is accepted)."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        row = raw[: e.start].count(b"\n") + 1
        raise io.InputError(f"{path}: row {row}: not valid UTF-8 (byte {e.start})") from e
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise io.InputError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise io.InputError(f"{path}: row {i}: malformed JSON: {e.msg} at column {e.colno}") from e
    return rows


def read(source: str, subset: str = "", split: str = "train") -> list[dict]:
    """Every raw row of a local file, a saved `datasets` folder or a hub data set, as plain dicts.

    JSON Lines are parsed here, line by line, so a broken line is named by its row; parquet, CSV, saved folders and
    hub data sets are read by `datasets` (a CSV cell is a string: CSV holds the string formats only)."""
    path = Path(source)
    if path.suffix in LOCAL and not path.is_file():
        raise io.InputError(f"{source}: file not found")
    if path.suffix in (".jsonl", ".json"):
        rows = _json_lines(path)
    else:
        import datasets

        try:
            if path.is_dir():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise io.InputError(f"{source}: no split {split!r}; have {sorted(ds)} (set prepare.split)")
                    ds = ds[split]
            elif path.suffix in LOCAL:
                ds = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
            else:
                ds = datasets.load_dataset(source, subset or None, split=split)
        except io.InputError:
            raise
        except Exception as e:  # datasets raises many types (arrow, file, hub); the message is what helps
            raise io.InputError(f"{source}: could not be read: {type(e).__name__}: {e}") from e
        rows = [dict(r) for r in ds]
    if not rows:
        raise io.InputError(f"{source}: empty: no rows")
    return rows


# --- detection ------------------------------------------------------------------------------------------------


def detect(rows: list[dict], source: str) -> str:
    """The format of `rows`: the first row of FORMATS whose `matches` accepts the first row's columns."""
    first = rows[0]
    if not isinstance(first, dict):
        raise io.InputError(f"{source}: row 1: expected an object with named fields, got {type(first).__name__}")
    name = next((n for n, f in FORMATS.items() if f.matches(first)), None)
    if name is None:
        raise io.InputError(f"{source}: row 1: no known format in columns {sorted(first)}: expected one of "
                            f"{ {n: f.columns for n, f in FORMATS.items()} }")
    return name


# --- field checks ---------------------------------------------------------------------------------------------


def _text(row: dict, name: str) -> str:
    if name not in row or row[name] is None:
        raise Bad(name, "missing")
    if not isinstance(row[name], str):
        raise Bad(name, f"expected a string, got {type(row[name]).__name__}")
    return row[name]


def _messages(row: dict, name: str) -> list[dict]:
    v = row.get(name)
    if v is None:
        raise Bad(name, "missing")
    if not isinstance(v, list):
        raise Bad(name, f"expected a list of {{role, content}} messages, got {type(v).__name__}")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise Bad(name, f"message {i}: expected {{'role': str, 'content': str}}, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise Bad(name, f"message {i}: unknown role {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(row: dict, name: str = "prompt") -> list[dict]:
    """A prompt column as messages: a string is one user turn."""
    v = row.get(name)
    msgs = [{"role": "user", "content": _text(row, name)}] if not isinstance(v, list) else _messages(row, name)
    if not msgs or not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        raise Drop("empty_prompt")
    if msgs[-1]["role"] != "user":
        raise Drop("prompt_ends_with_assistant") if msgs[-1]["role"] == "assistant" else Drop("empty_prompt")
    return msgs


def _reply(row: dict, name: str) -> str:
    """A response column: a string, or a list holding one assistant message."""
    v = row.get(name)
    if isinstance(v, list):
        msgs = _messages(row, name)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise Bad(name, f"expected exactly one assistant message, got roles {[m['role'] for m in msgs]}")
        text = msgs[0]["content"]
    else:
        text = _text(row, name)
    if not text.strip():
        raise Drop("empty_response")
    return text


def _score(row: dict, name: str) -> float | None:
    v = row.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Bad(name, f"expected a number, got {type(v).__name__}")
    if not math.isfinite(v):  # Python's json reads NaN, Infinity and -Infinity as floats
        raise Bad(name, f"expected a finite number, got {v}")
    return float(v)


def _split_conversation(msgs: list[dict]) -> tuple[list[dict], str]:
    """(messages before the final assistant turn, its text); the turn before it must be the user's."""
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
        raise Drop("no_assistant_turn")
    if not msgs[-1]["content"].strip():
        raise Drop("empty_response")
    if not msgs[-2]["content"].strip():
        raise Drop("empty_prompt")
    return msgs[:-1], msgs[-1]["content"]


def _pair(prompt: list[dict], chosen: str, rejected: str, row: dict) -> dict:
    if chosen.strip() == rejected.strip():
        raise Drop("chosen_equals_rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_score": _score(row, "score_chosen"), "rejected_score": _score(row, "score_rejected")}


# --- converters: raw row -> internal row ----------------------------------------------------------------------


def preference(row: dict) -> dict:
    """{"prompt": "2+2?", "chosen": "4", "rejected": "5"}"""
    return _pair(_prompt(row), _reply(row, "chosen"), _reply(row, "rejected"), row)


def preference_conversational(row: dict) -> dict:
    """{"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}"""
    return _pair(_prompt(row), _reply(row, "chosen"), _reply(row, "rejected"), row)


def _transcript(row: dict, name: str) -> list[dict]:
    """HH-RLHF's "\n\nHuman: ...\n\nAssistant: ..." string as messages."""
    parts = re.split(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})", _text(row, name))
    if parts[0].strip() or len(parts) < 3:
        raise Bad(name, f"expected a transcript of {HUMAN!r} / {ASSISTANT!r} turns, got {parts[0][:60]!r}")
    return [{"role": "user" if tag == HUMAN else "assistant", "content": text.strip()}
            for tag, text in zip(parts[1::2], parts[2::2], strict=True)]


def preference_implicit(row: dict) -> dict:
    """{"chosen": [user, assistant(good)], "rejected": [user, assistant(bad)]}: the prompt is the shared prefix.
    HH-RLHF's transcript strings ("\n\nHuman: ...\n\nAssistant: ...") are read as the same conversations."""
    chosen, rejected = ((_transcript(row, k) if isinstance(row.get(k), str) else _messages(row, k))
                        for k in ("chosen", "rejected"))
    prompt, good = _split_conversation(chosen)
    other, bad = _split_conversation(rejected)
    if prompt != other:
        raise Drop("no_shared_prompt")
    return _pair(prompt, good, bad, row)


def messages(row: dict) -> dict:
    """{"messages": [user, assistant]}: an SFT demonstration; its last assistant turn is learned."""
    prompt, reply = _split_conversation(_messages(row, "messages"))
    return {"messages": prompt + [{"role": "assistant", "content": reply}]}


def prompt_completion(row: dict) -> dict:
    """{"prompt": "2+2?", "completion": "4"} (or message lists): an SFT demonstration."""
    return {"messages": _prompt(row) + [{"role": "assistant", "content": _reply(row, "completion")}]}


def prompt_only(row: dict) -> dict:
    """{"prompt": "2+2?"} (or a message list): a prompt to sample from."""
    return {"messages": _prompt(row)}


class Format(NamedTuple):
    kind: str
    """The internal schema its rows become: prefs, sft or prompts."""
    columns: tuple[str, ...]
    """The columns it reads (named in errors)."""
    matches: Callable[[dict], bool]
    """Whether a first row is of this format; `detect` takes the first row of FORMATS that matches."""
    convert: Callable[[dict], dict]


def _is_implicit(row: dict) -> bool:
    """Whole conversations (or HH-RLHF transcript strings) under chosen/rejected, the prompt inside them."""
    c = row["chosen"]
    if isinstance(c, list):  # with no prompt column, or opening with the user's turn rather than the answer
        return "prompt" not in row or bool(c) and isinstance(c[0], dict) and c[0].get("role") != "assistant"
    return "prompt" not in row and isinstance(c, str) and HUMAN in c


FORMATS: dict[str, Format] = {  # in detection order: the more specific shape first
    "preference_implicit": Format("prefs", ("chosen", "rejected"),
                                  lambda r: {"chosen", "rejected"} <= set(r) and _is_implicit(r), preference_implicit),
    "preference_conversational": Format("prefs", ("prompt", "chosen", "rejected"),
                                        lambda r: {"prompt", "chosen", "rejected"} <= set(r)
                                        and isinstance(r["chosen"], list), preference_conversational),
    "preference": Format("prefs", ("prompt", "chosen", "rejected"), lambda r: {"chosen", "rejected"} <= set(r),
                         preference),
    "messages": Format("sft", ("messages",), lambda r: "messages" in r, messages),
    "prompt_completion": Format("sft", ("prompt", "completion"), lambda r: {"prompt", "completion"} <= set(r),
                                prompt_completion),
    "prompt_only": Format("prompts", ("prompt",), lambda r: "prompt" in r, prompt_only),
}


def convert(rows: list[dict], name: str, source: str) -> tuple[list[dict], Counter]:
    """Each raw row through `FORMATS[name]`: the kept rows (with `id`: the row's own, else `row-<n>`) and the
    drop counts. A malformed row raises InputError naming the source, the 1-based row and the field."""
    fmt = FORMATS[name]
    out, dropped, seen = [], Counter(), set()
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise io.InputError(f"{source}: row {i}: expected an object with named fields, got {type(row).__name__}")
        try:
            item = fmt.convert(row)
        except Bad as e:
            raise io.InputError(f"{source}: row {i}: {e} (format {name})") from e
        except Drop as d:
            dropped[d.reason] += 1
            continue
        key = io.prompt_key(item)
        if key in seen:
            dropped["duplicate_prompt"] += 1
            continue
        seen.add(key)
        rid = row.get("id", row.get("prompt_id"))
        out.append((i, str(rid) if isinstance(rid, (str, int)) and str(rid).strip() else None, item))
    user_ids = [rid for _, rid, _ in out]
    # ids key the per-token caches: the user's are kept only when every row has one and none repeats
    unique = None not in user_ids and len(set(user_ids)) == len(user_ids)
    return [{"id": rid if unique else f"row-{i}"} | item for i, rid, item in out], dropped


def pairs_mode(params_path: str) -> str:
    """`prepare.pairs` of a params file: generate and label pass the data set's pairs through in 'dataset' mode."""
    value = (config.read_yaml(params_path).get("prepare") or {}).get("pairs", "on_policy")
    if value not in get_args(Pairs):
        raise config.ParamsError(f"{params_path}: prepare.pairs: {value!r} is not one of {list(get_args(Pairs))}")
    return value
