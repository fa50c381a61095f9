"""Bad input files: each gets an error naming the file, the row and the field; legal-but-useless rows are counted."""

import json

import pytest

from posttrain import io, judges
from stages import label

GOOD_PROMPT = {"id": "a", "task": "add", "messages": [{"role": "user", "content": "1+1?"}],
               "verifier": {"type": "number", "answer": 2}}
GOOD_PAIR = {"id": "a", "prompt": [{"role": "user", "content": "1+1?"}], "chosen": "2", "rejected": "3"}


def _line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


BAD = [
    # (schema, file bytes, expected message after the path)
    ("prompts", b"", r"empty file"),
    ("prompts", b"\n\n", r"empty file"),
    ("prompts", _line(GOOD_PROMPT) + b"{not json}\n", r"row 2: malformed JSON"),
    ("prompts", _line(GOOD_PROMPT) + b"\xff\xfe\n", r"row 2: not valid UTF-8"),
    ("prompts", b"[1, 2]\n", r"row 1: expected a JSON object, got list"),
    ("prompts", _line({k: v for k, v in GOOD_PROMPT.items() if k != "messages"}), r"row 1: field 'messages': missing"),
    ("prompts", _line(GOOD_PROMPT | {"messages": "hi"}), r"row 1: field 'messages': expected a non-empty list"),
    ("prompts", _line(GOOD_PROMPT | {"messages": []}), r"row 1: field 'messages': expected a non-empty list"),
    ("prompts", _line(GOOD_PROMPT | {"messages": [{"role": "user"}]}), r"row 1: field 'messages': message 0"),
    ("prompts", _line(GOOD_PROMPT | {"messages": [{"role": "robot", "content": "x"}]}),
     r"row 1: field 'messages': message 0: unknown role 'robot'"),
    ("prompts", _line(GOOD_PROMPT | {"verifier": [1]}), r"row 1: field 'verifier': expected a mapping"),
    ("prompts", _line(GOOD_PROMPT | {"id": ""}), r"row 1: field 'id': empty string"),
    ("prompts", _line(GOOD_PROMPT | {"id": 7}), r"row 1: field 'id': expected a string, got int"),
    ("prefs", _line(GOOD_PAIR | {"chosen": ""}), r"row 1: field 'chosen': empty string"),
    ("prefs", _line(GOOD_PAIR | {"rejected": None}), r"row 1: field 'rejected': expected a string, got NoneType"),
    ("prefs", _line(GOOD_PAIR) + _line({k: v for k, v in GOOD_PAIR.items() if k != "prompt"}),
     r"row 2: field 'prompt': missing"),
    ("samples", _line(GOOD_PROMPT | {"samples": "a"}), r"row 1: field 'samples': expected a list of strings"),
    ("samples", _line(GOOD_PROMPT | {"samples": ["a", 3]}), r"row 1: field 'samples': items \[1\] are not strings"),
    ("sft", _line({"id": "x", "messages": [{"role": "user", "content": 5}]}), r"row 1: field 'messages': message 0"),
    ("prompts", _line(GOOD_PROMPT) + b'{"id": "' + b"x" * 10_000_000 + b"\n", r"row 2: malformed JSON"),
]


@pytest.mark.parametrize(("schema", "content", "message"), BAD)
def test_bad_file_is_named_with_row_and_field(tmp_path, schema, content, message):
    path = tmp_path / "input.jsonl"
    path.write_bytes(content)
    with pytest.raises(io.InputError, match=rf"^{path}: {message}"):
        io.read_jsonl(path, schema)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(io.InputError, match="file not found"):
        io.read_jsonl(tmp_path / "nope.jsonl", "prompts")


def test_label_counts_every_drop():
    row = GOOD_PROMPT | {"id": "r1"}
    rows = [
        row | {"samples": ["2", "3", "2"]},  # a pair: "2" (1.0) vs "3" (0.5 * (1 - 1/2) = 0.25)
        row | {"id": "r2", "samples": ["5", "6"]},  # duplicate prompt text
        row | {"id": "r3", "messages": [{"role": "user", "content": "2+2?"}],
               "verifier": {"type": "number", "answer": 4}, "samples": ["4", "4", " "]},  # tie + an empty response
        row | {"id": "r4", "messages": [{"role": "user", "content": "3+3?"}],
               "verifier": {"type": "number", "answer": 6}, "samples": ["", "6"]},  # one non-empty response left
    ]
    scores = judges.VerifierJudge().scores(rows, [r["samples"] for r in rows])
    pairs, dropped = label.make_pairs(rows, scores, gap=0.5)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [("r1", "2", "3")]
    assert pairs[0]["rejected_score"] == pytest.approx(0.25)
    assert dropped == {"duplicate_prompt": 1, "tie": 1, "empty_response": 2, "fewer_than_two_responses": 1}


def test_label_floor_drops_a_pair_whose_chosen_reward_is_below_it():
    """Rewards per sample; gap log(3) ~ 1.10 (min_prob 0.75). r1: best -0.5, r2: best -2.5, both clear the gap."""
    rows = [GOOD_PROMPT | {"id": "r1", "samples": ["2", "3"]},
            GOOD_PROMPT | {"id": "r2", "messages": [{"role": "user", "content": "2+2?"}], "samples": ["5", "6"]}]
    scores = [[-0.5, -4.0], [-2.5, -6.0]]
    kept, dropped = label.make_pairs(rows, scores, gap=1.1, floor=-1.0)
    assert [p["id"] for p in kept] == ["r1"] and +dropped == {"chosen_below_floor": 1}
    kept, dropped = label.make_pairs(rows, scores, gap=1.1, floor=None)
    assert [p["id"] for p in kept] == ["r1", "r2"] and not +dropped


def test_label_names_a_bad_verifier(tmp_path):
    from tests.conftest import tiny_params

    path = tmp_path / "samples.jsonl"
    io.write_jsonl(path, [GOOD_PROMPT | {"id": "a", "samples": ["1", "2"]},
                          GOOD_PROMPT | {"id": "b", "verifier": {"type": "number"}, "samples": ["1", "2"]}])
    with pytest.raises(SystemExit, match=rf"{path}: row 2: field 'verifier': KeyError"):
        label.main(["--params", str(tiny_params(tmp_path)), "--samples", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_missing_or_empty_model_folder_ends_the_stage_with_its_path(tmp_path):
    """No traceback: cli.execute's exit with the message, and no output folder."""
    from stages import reference
    from tests.conftest import tiny_params

    prefs = tmp_path / "prefs.jsonl"
    io.write_jsonl(prefs, [GOOD_PAIR])
    argv = ["--params", str(tiny_params(tmp_path)), "--prefs", str(prefs), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path / 'nope'}: no such model folder$"):
        reference.main([*argv, "--model", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty: neither a checkpoint \(config.json\) nor an adapter chain"):
        reference.main([*argv, "--model", str(tmp_path / "empty")])
    assert not (tmp_path / "out").exists()


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), io.atomic_dir(out) as tmp:
        (tmp / "half.jsonl").write_text("{}")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_preference_encoding_drops_and_counts(workdir):
    """Pairs with equal texts, or a prompt too long for max_len, are dropped and counted, never trained on."""
    from posttrain import modeling, preference

    tok = modeling.load_tokenizer(workdir / "models/base", padding_side="right")
    pairs = [GOOD_PAIR | {"id": "ok"}, GOOD_PAIR | {"id": "same", "rejected": " 2 "},
             GOOD_PAIR | {"id": "long", "prompt": [{"role": "user", "content": "word " * 200}]}]
    rows, dropped = preference.encoded_rows(tok, pairs, max_len=64, source="prefs.jsonl")
    assert [r["id"] for r in rows] == ["ok"]
    assert dropped == {"chosen_equals_rejected": 1, "too_long": 1}
    with pytest.raises(io.InputError, match=r"prefs.jsonl: no usable pair"):
        preference.encoded_rows(tok, pairs[1:], max_len=64, source="prefs.jsonl")


def test_nan_loss_stops_training_with_a_clear_error():
    from types import SimpleNamespace

    from posttrain.training import StopOnNaN

    state, args = SimpleNamespace(global_step=7), SimpleNamespace(output_dir="models/sft.ckpt")
    StopOnNaN().on_log(args, state, None, logs={"loss": 0.5})
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 7; the last good checkpoint is kept in "
                                                 r"models/sft.ckpt"):
        StopOnNaN().on_log(args, state, None, logs={"loss": float("nan")})
