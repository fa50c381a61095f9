"""Reading validated JSONL, and writing outputs atomically (temp path, then rename).

Every file passed between stages is JSONL with a declared schema (`SCHEMAS`). A row that breaks it stops the stage
with an `InputError` naming the file, the 1-based row and the field; nothing is half-read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """An input file that does not fit its schema: the message names file, row and field."""


def _is_messages(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return "expected a non-empty list of {role, content} messages"
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i}: expected {{'role': str, 'content': str}}, got {m!r:.80}"
        if m["role"] not in ("system", "user", "assistant"):
            return f"message {i}: unknown role {m['role']!r}"
    return None


def _nonempty_str(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"expected a string, got {type(v).__name__}"
    return None if v.strip() else "empty string"


def _is(tp: type | tuple, name: str):
    def check(v: Any) -> str | None:
        return None if isinstance(v, tp) and not isinstance(v, bool) else f"expected {name}, got {type(v).__name__}"

    return check


def _optional(check):
    return lambda v: None if v is None else check(v)


def _samples(v: Any) -> str | None:
    if not isinstance(v, list):  # empty when nothing was sampled (prepare.pairs: dataset)
        return "expected a list of strings"
    bad = [i for i, s in enumerate(v) if not isinstance(s, str)]
    return f"items {bad} are not strings" if bad else None


# field -> checker returning None when fine, else what is wrong
SCHEMAS: dict[str, dict[str, Any]] = {
    "prompts": {"id": _nonempty_str, "task": _is(str, "a string"), "messages": _is_messages,
                "verifier": _optional(_is(dict, "a mapping"))},
    "sft": {"id": _nonempty_str, "messages": _is_messages},
    "chat": {"messages": _is_messages},
    "samples": {"id": _nonempty_str, "messages": _is_messages, "verifier": _optional(_is(dict, "a mapping")),
                "samples": _samples},
    "answers": {"id": _nonempty_str, "task": _is(str, "a string"), "response": _is(str, "a string"),
                "score": _optional(_is((int, float), "a number")),  # null: the prompt has no gold verifier
                "passed": lambda v: None if v is None or isinstance(v, bool) else "expected a bool or null",
                "length": _is(int, "an integer")},
    "logp_sums": {"id": _nonempty_str, "chosen": _is((int, float), "a number"),
                  "rejected": _is((int, float), "a number")},
    "prefs": {"id": _nonempty_str, "prompt": _is_messages, "chosen": _nonempty_str, "rejected": _nonempty_str},
}


def read_jsonl(path: str | Path, schema: str, allow_empty: bool = False) -> list[dict]:
    """All rows of a JSONL file, each checked against `SCHEMAS[schema]`; raises InputError on the first bad one, and
    on a file with no row unless `allow_empty` (a split some sources leave empty, such as the reward model's)."""
    path = Path(path)
    checks = SCHEMAS[schema]
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise InputError(f"{path}: file not found") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        row = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}: row {row}: not valid UTF-8 (byte {e.start})") from e
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: row {i}: malformed JSON: {e.msg} at column {e.colno}") from e
        _check_row(path, i, row, checks)
        rows.append(row)
    if not rows and not allow_empty:
        raise InputError(f"{path}: empty file: no rows")
    return rows


def _check_row(path: Any, i: int, row: Any, checks: dict[str, Any]) -> None:
    if not isinstance(row, dict):
        raise InputError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
    for name, check in checks.items():
        if name not in row:
            raise InputError(f"{path}: row {i}: field '{name}': missing")
        problem = check(row[name])
        if problem:
            raise InputError(f"{path}: row {i}: field '{name}': {problem}")


def check_rows(source: Any, rows: list[dict], schema: str) -> list[dict]:
    """Check rows that did not come from a JSONL file (a parquet file, a hub dataset) against a schema."""
    for i, row in enumerate(rows, start=1):
        _check_row(source, i, row, SCHEMAS[schema])
    if not rows:
        raise InputError(f"{source}: empty: no rows")
    return rows


def check_drops(source: Any, total: int, dropped: dict[str, int], max_share: float, fix: str) -> None:
    """Stop when a rule dropped more than `max_share` (`common.max_drop_share`) of the `total` rows of `source`: a
    run that trains on the few rows left says nothing useful. The error names the rules and `fix`, the param to
    change. Under the share, the drops are logged (a stage never drops rows without a word)."""
    n = sum(dropped.values())
    if not n:
        return
    what = f"{source}: {n} of {total} rows dropped ({', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))})"
    if n > max_share * total:
        raise InputError(f"{what}: more than common.max_drop_share={max_share} of them; {fix}")
    logging.getLogger(__name__).warning("%s", what)


def prompt_id(task: str, i: int, split: str = "") -> str:
    """The one id scheme of the prompts this project draws: `<task>-<i:05d>`, with a prefix naming the split where
    the prompt is not one of prepare's train / eval / SFT rows (`rmp`: the reward model's fresh prompts; `r<k>` and
    `select`: an iterative round's). The id stays with the prompt from prepare to report: samples, pairs, answers
    and every cache key on it. A pair's id is its prompt's (a Step-DPO pair's `<prompt id>.step<k>.<sample>`); an
    offline pair that is no drawn prompt's is `rm-` + this (prepare's reward-model pairs)."""
    return f"{split}-{task}-{i:05d}" if split else f"{task}-{i:05d}"


def prompt_key(row: dict) -> str:
    """A prompt's identity, the one test of 'the same prompt' (splits, duplicates, fresh rounds): the conversation
    up to the answer, from a row's `prompt` (pairs) or its `messages` (prompts, samples, SFT demos: the final
    assistant turn dropped)."""
    msgs = row["prompt"] if "prompt" in row else row["messages"][:-1] if row["messages"][-1]["role"] == "assistant" \
        else row["messages"]
    return json.dumps(msgs, sort_keys=True)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(path: Path) -> list[Path]:
    """Remove the temps of `path` left by writers that died (SIGKILL, OOM) before their rename: each holds a part
    of an output, possibly a whole checkpoint. A live writer's temp is left alone. Returns what was removed."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp directory that replaces `path` only when the block finishes without error.

    A process killed inside the block leaves its temp (never a partial `path`); the next writer of `path` removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = _tmp(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)
