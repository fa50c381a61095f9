"""Every dataset format of posttrain.formats read from its bundled sample into the same internal rows, every reader
(JSON Lines, JSON, CSV, parquet, a saved `datasets` folder), bad input named by file, row and field or dropped and
counted. (prepare's splits from user data and from reasoning-gym: tests/test_prepare_sources.py.)"""

import json

import pytest

from posttrain import formats, io
from tests.conftest import ASSETS

FORMATS_DIR = ASSETS / "formats"
SAMPLES = {  # bundled sample -> the format detected from its columns
    "preference.jsonl": "preference",
    "preference.csv": "preference",
    "preference_conversational.jsonl": "preference_conversational",
    "preference_implicit.jsonl": "preference_implicit",
    "preference_implicit_hh.jsonl": "preference_implicit",  # HH-RLHF's transcript strings
    "messages.jsonl": "messages",
    "prompt_completion.jsonl": "prompt_completion",
    "prompt_completion.json": "prompt_completion",
    "prompt_only.jsonl": "prompt_only",
}


def _load(path, name=None):
    rows = formats.read(str(path))
    name = name or formats.detect(rows, str(path))
    items, dropped = formats.convert(rows, name, str(path))
    return name, items, dropped


def _first_pair():
    return {"id": "row-1", "prompt": [{"role": "user", "content": "What is the capital of France?"}],
            "chosen": "Paris.", "rejected": "London.", "chosen_score": None, "rejected_score": None}


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_each_bundled_sample_is_detected_and_read_whole(sample):
    name, items, dropped = _load(FORMATS_DIR / sample)
    assert name == SAMPLES[sample]
    assert len(items) == 20 and dropped == {}
    kind = formats.FORMATS[name].kind
    io.check_rows(sample, items, "chat" if kind == "prompts" else kind)  # prepare adds task and verifier


def test_every_format_has_a_bundled_sample():
    assert set(SAMPLES.values()) == set(formats.FORMATS)


def test_the_three_preference_formats_give_the_same_pairs():
    want = _load(FORMATS_DIR / "preference.jsonl")[1]
    assert want[0] == _first_pair()
    assert _load(FORMATS_DIR / "preference_conversational.jsonl")[1] == want
    assert _load(FORMATS_DIR / "preference.csv")[1] == want
    implicit = _load(FORMATS_DIR / "preference_implicit.jsonl")[1]
    # UltraFeedback's score columns are kept; everything else is the same pair
    assert {(r["chosen_score"], r["rejected_score"]) for r in implicit} == {(8.0, 3.0)}
    assert [r | {"chosen_score": None, "rejected_score": None} for r in implicit] == want
    assert _load(FORMATS_DIR / "preference_implicit_hh.jsonl")[1] == want


def test_sft_formats_give_the_same_demos_and_prompt_only_their_prompts():
    demos = _load(FORMATS_DIR / "messages.jsonl")[1]
    assert demos[0] == {"id": "row-1", "messages": [{"role": "user", "content": "What is the capital of France?"},
                                                     {"role": "assistant", "content": "Paris."}]}
    assert _load(FORMATS_DIR / "prompt_completion.jsonl")[1] == demos
    assert _load(FORMATS_DIR / "prompt_completion.json")[1] == demos
    prompts = _load(FORMATS_DIR / "prompt_only.jsonl")[1]
    assert prompts == [{"id": d["id"], "messages": d["messages"][:1]} for d in demos]


def test_parquet_and_saved_datasets_folders_read_through_datasets(tmp_path):
    import datasets

    raw = [json.loads(line) for line in (FORMATS_DIR / "preference_conversational.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(raw)
    ds.to_parquet(str(tmp_path / "prefs.parquet"))
    datasets.DatasetDict({"train_prefs": ds}).save_to_disk(str(tmp_path / "saved"))
    want = _load(FORMATS_DIR / "preference.jsonl")[1]
    assert _load(tmp_path / "prefs.parquet")[1] == want
    rows = formats.read(str(tmp_path / "saved"), split="train_prefs")
    assert formats.convert(rows, formats.detect(rows, "saved"), "saved")[0] == want
    with pytest.raises(io.InputError, match=r"saved: no split 'train'; have \['train_prefs'\]"):
        formats.read(str(tmp_path / "saved"))


def test_user_ids_are_kept_only_when_unique():
    rows = [{"id": 7, "prompt": "a?", "completion": "b"}, {"id": "x", "prompt": "c?", "completion": "d"}]
    assert [r["id"] for r in formats.convert(rows, "prompt_completion", "f")[0]] == ["7", "x"]
    rows[1]["id"] = 7
    assert [r["id"] for r in formats.convert(rows, "prompt_completion", "f")[0]] == ["row-1", "row-2"]


U = {"role": "user", "content": "Hi?"}
A = {"role": "assistant", "content": "Hello."}
GOOD = json.dumps({"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."})

BAD = [  # (file name, content, None = detect / a format name, error message)
    ("p.jsonl", GOOD + "\n{oops\n", None, r"p.jsonl: row 2: malformed JSON"),
    ("p.jsonl", json.dumps({"prompt": "a", "chosen": 3, "rejected": "b"}), None,
     r"row 1: field 'chosen': expected a string, got int \(format preference\)"),
    ("p.jsonl", json.dumps({"prompt": "a", "chosen": "b"}), "preference", r"row 1: field 'rejected': missing"),
    ("p.jsonl", json.dumps({"prompt": [U], "chosen": [U], "rejected": [A]}), "preference_conversational",
     r"row 1: field 'chosen': expected exactly one assistant message, got roles \['user'\]"),
    ("p.jsonl", json.dumps({"prompt": [{"role": "user"}], "chosen": [A], "rejected": [A]}), None,
     r"row 1: field 'prompt': message 0: expected \{'role': str, 'content': str\}"),
    ("m.jsonl", json.dumps({"messages": [{"role": "bot", "content": "x"}, A]}), None,
     r"row 1: field 'messages': message 0: unknown role 'bot'"),
    ("p.jsonl", json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": "high"}), None,
     r"row 1: field 'score_chosen': expected a number, got str"),
    ("p.jsonl", GOOD + "\n" + json.dumps({"prompt": "a", "chosen": "b", "rejected": "c",
                                         "score_chosen": float("nan")}), None,
     r"p.jsonl: row 2: field 'score_chosen': expected a finite number, got nan"),  # json reads NaN
    ("p.jsonl", json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "score_rejected": float("-inf")}), None,
     r"row 1: field 'score_rejected': expected a finite number, got -inf"),
    ("p.csv", "prompt,chosen,rejected,score_chosen\nFine?,Yes.,No.,inf\n", None,
     r"p.csv: row 1: field 'score_chosen': expected a finite number, got inf"),
    ("p.jsonl", GOOD + "\n[1, 2]\n", None, r"row 2: expected an object with named fields, got list"),
    ("p.jsonl", b"\xef\xbb\xbf" + GOOD.encode() + b"\n\xff\xfe\n", None, r"p.jsonl: row 2: not valid UTF-8"),
    ("p.jsonl", json.dumps({"question": "a", "answer": "b"}), None,
     r"row 1: no known format in columns \['answer', 'question'\]"),
    ("p.jsonl", "\n\n", None, r"p.jsonl: empty: no rows"),
    ("p.csv", "prompt,chosen,rejected\nFine?,Yes.,No.\nOk?,,No.\n", None, r"p.csv: row 2: field 'chosen': missing"),
    ("p.txt", "prompt\n", None, r"could not be read"),
    ("hh.jsonl", json.dumps({"chosen": "Paris.", "rejected": "London."}), "preference_implicit",
     r"row 1: field 'chosen': expected a transcript of '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns, got 'Paris.'"),
]


@pytest.mark.parametrize(("fname", "content", "fmt", "message"), BAD, ids=[m for *_, m in BAD])
def test_bad_rows_are_named_by_file_row_and_field(tmp_path, fname, content, fmt, message):
    path = tmp_path / fname
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(io.InputError, match=message):
        _load(path, fmt)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(io.InputError, match=rf"{tmp_path / 'nope.parquet'}: file not found"):
        formats.read(str(tmp_path / "nope.parquet"))


DROPS = [  # (a row that is legal but useless, its format, the reason it is counted under)
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "preference", "empty_prompt"),
    ({"prompt": "q?", "chosen": " ", "rejected": "b"}, "preference", "empty_response"),
    ({"prompt": "q?", "chosen": "same ", "rejected": "same"}, "preference", "chosen_equals_rejected"),
    ({"prompt": "Fine?", "chosen": "Sure.", "rejected": "Nope."}, "preference", "duplicate_prompt"),
    ({"prompt": [U, A], "chosen": [A], "rejected": [{"role": "assistant", "content": "Bye."}]},
     "preference_conversational", "prompt_ends_with_assistant"),
    ({"chosen": [U, A], "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "x"}]},
     "preference_implicit", "no_shared_prompt"),
    ({"chosen": [U], "rejected": [U, A]}, "preference_implicit", "no_assistant_turn"),
    ({"messages": [U]}, "messages", "no_assistant_turn"),  # the chat row with no assistant turn
    ({"messages": [U, A, A]}, "messages", "no_assistant_turn"),  # two assistant turns: no user turn to answer
    ({"messages": [{"role": "system", "content": "Be brief."}, A]}, "messages", "no_assistant_turn"),
    ({"prompt": "q?", "completion": ""}, "prompt_completion", "empty_response"),
    ({"prompt": [{"role": "system", "content": "Be brief."}]}, "prompt_only", "empty_prompt"),
]
FIRST = {"preference": {"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."},
         "preference_conversational": {"prompt": [{"role": "user", "content": "Fine?"}], "chosen": [A],
                                       "rejected": [{"role": "assistant", "content": "No."}]},
         "preference_implicit": {"chosen": [{"role": "user", "content": "Fine?"}, A],
                                 "rejected": [{"role": "user", "content": "Fine?"}, {"role": "assistant",
                                                                                      "content": "No."}]},
         "messages": {"messages": [{"role": "user", "content": "Fine?"}, A]},
         "prompt_completion": {"prompt": "Fine?", "completion": "Yes."},
         "prompt_only": {"prompt": "Fine?"}}


@pytest.mark.parametrize(("row", "fmt", "reason"), DROPS, ids=[f"{f}-{r}" for _, f, r in DROPS])
def test_useless_rows_are_dropped_and_counted(row, fmt, reason):
    items, dropped = formats.convert([FIRST[fmt], row], fmt, "f.jsonl")
    assert [r["id"] for r in items] == ["row-1"] and dropped == {reason: 1}


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert _load(path)[1][0]["prompt"] == [{"role": "user", "content": "Fine?"}]
