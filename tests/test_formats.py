"""Every dataset format of posttrain.formats read from its bundled sample into the same internal rows, every reader
(JSON Lines, JSON, CSV, parquet, a saved `datasets` folder), bad input named by file, row and field or dropped and
counted, and prepare's splits from user data and from reasoning-gym."""

import json

import pytest

from posttrain import formats, io, tasks
from stages import prepare
from tests.conftest import ASSETS, tiny_params

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


# --- prepare from user data and from reasoning-gym --------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One MLflow store for every prepare run here: creating a fresh SQLite store costs seconds each time."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _prepare(tmp_path, mlflow_db, **block):
    params = tiny_params(tmp_path, prepare=block, common={"mlflow_uri": mlflow_db})
    prepare.main(["--params", str(params), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    return json.loads((out / "stats.json").read_text()), {
        f.name: [json.loads(x) for x in f.read_text().splitlines()] for f in out.glob("*.jsonl")}


def test_prepare_dataset_mode_splits_the_pairs(tmp_path, mlflow_db):
    stats, files = _prepare(tmp_path, mlflow_db, source=str(FORMATS_DIR / "preference_implicit.jsonl"),
                            pairs="dataset", n_eval=5, n_train=10, n_sft=4)
    assert (stats["format"], stats["n_prefs"], stats["n_heldout_prefs"], stats["n_sft"]) == (
        "preference_implicit", 10, 5, 4)
    assert files["rm_prefs.jsonl"] == files["prefs.jsonl"] and files["rm_prompts.jsonl"] == []
    held = {p["id"] for p in files["heldout_prefs.jsonl"]}
    assert held == {r["id"] for r in files["eval.jsonl"]} and not held & {p["id"] for p in files["prefs.jsonl"]}
    assert all(r["verifier"] is None for r in files["train.jsonl"] + files["eval.jsonl"])
    assert [d["messages"][-1]["content"] for d in files["sft.jsonl"]] == [p["chosen"] for p in
                                                                          files["prefs.jsonl"][:4]]
    assert files["prefs.jsonl"][0]["chosen_score"] == 8.0


def test_prepare_on_policy_from_prompts_takes_demos_from_sft_source(tmp_path, mlflow_db):
    stats, files = _prepare(tmp_path, mlflow_db, source=str(FORMATS_DIR / "prompt_only.jsonl"), n_eval=4, n_train=8,
                            n_sft=20, sft_source=str(FORMATS_DIR / "messages.jsonl"))
    assert (stats["format"], stats["sft_format"], stats["n_train"], stats["n_prefs"]) == (
        "prompt_only", "messages", 8, 0)
    assert stats["sft_dropped"] == {"eval_prompt": 4}  # a demo on a held-out prompt would leak it into training
    assert len(files["sft.jsonl"]) == 16 and files["prefs.jsonl"] == []


PREPARE_ERRORS = [
    ({"source": str(FORMATS_DIR / "prompt_only.jsonl")}, r"no SFT demonstrations \(prompt_only gives none\)"),
    ({"source": str(FORMATS_DIR / "messages.jsonl"), "pairs": "dataset"},
     r"prepare.pairs is 'dataset' but the source is 'messages'"),
    ({"source": str(FORMATS_DIR / "preference.jsonl"), "n_eval": 20}, r"20 usable rows leave the train split empty"),
    ({"source": "CHAT", "n_eval": 1},
     r"chat.jsonl: 2 of 2 rows dropped \(no_assistant_turn 2\): more than common.max_drop_share"),
    ({"source": "builtin", "pairs": "dataset"}, r"pairs: 'dataset' needs a preference data set"),
    ({"source": "reasoning_gym", "reasoning_gym": {"no_such_set": {"size": 3}}}, r"unknown data set 'no_such_set'"),
    ({"source": "reasoning_gym", "reasoning_gym": {"chain_sum": {"size": 30}}}, r"30 distinct entries, 34 needed"),
]


@pytest.mark.parametrize(("block", "message"), PREPARE_ERRORS, ids=[m for _, m in PREPARE_ERRORS])
def test_prepare_refuses_data_that_leaves_nothing_to_train_on(tmp_path, mlflow_db, block, message):
    if block["source"] == "CHAT":  # the case: chat rows with no assistant turn once exited 0
        (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": [U | {"content": f"q{i}"}]}) + "\n"
                                                     for i in range(2)))
        block = block | {"source": str(tmp_path / "chat.jsonl")}
    with pytest.raises(SystemExit, match=message):
        _prepare(tmp_path, mlflow_db, **block)
    assert not (tmp_path / "out").exists()


def test_prepare_from_reasoning_gym(tmp_path, mlflow_db):
    stats, files = _prepare(tmp_path, mlflow_db, source="reasoning_gym", n_eval=4, n_train=6, n_sft=5, n_rm=3,
                            n_rm_prompts=2,
                            reasoning_gym={"chain_sum": {"size": 20, "config": {"min_terms": 2, "max_terms": 2}}})
    assert (stats["n_eval"], stats["n_train"], stats["n_sft"], stats["n_rm"], stats["n_rm_prompts"]) == (4, 6, 5, 3, 2)
    texts = [r["messages"][0]["content"] for name in ("train.jsonl", "eval.jsonl", "sft.jsonl", "rm_prompts.jsonl")
             for r in files[name]] + [p["prompt"][0]["content"] for p in files["rm_prefs.jsonl"]]
    assert len(set(texts)) == len(texts) == 20  # every entry in one split at most
    assert all(r["verifier"]["dataset"] == "chain_sum" for r in files["rm_prompts.jsonl"])
    spec = files["eval.jsonl"][0]["verifier"]
    assert spec["type"] == "reasoning_gym" and spec["dataset"] == "chain_sum" and spec["size"] == 20
    # each demo is its entry's reference answer; each reward pair's rejected answer is another entry's
    assert all(tasks.score(d["verifier"], d["messages"][-1]["content"]) == 1.0 for d in files["sft.jsonl"])
    assert all(p["chosen_score"] == 1.0 > p["rejected_score"] for p in files["rm_prefs.jsonl"])


# --- evaluate with no verifier: held-out pairs --------------------------------------------------------------------


def test_heldout_pair_metrics_equal_a_plain_forward(workdir):
    """evaluate's held-out perplexities and preference accuracy, recomputed from one full-sequence forward per
    response (log-probs of the response tokens after the templated prompt)."""
    import math

    import torch

    from posttrain import modeling
    from stages import evaluate

    tok = modeling.load_tokenizer(workdir / "models/base", padding_side="right")
    model = modeling.load_chain(workdir / "models/base", torch.device("cpu"))
    pairs = _load(FORMATS_DIR / "preference.jsonl")[1][:5]
    got, sums = evaluate.heldout_pairs(model, tok, pairs, max_len=96, batch_size=2, source="heldout_prefs.jsonl",
                                       n_boot=200, seed=0)
    totals, counts, wins = {"chosen": 0.0, "rejected": 0.0}, {"chosen": 0, "rejected": 0}, 0
    for pair in pairs:
        prompt = tok.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        means = {}
        for side in ("chosen", "rejected"):
            full = tok.apply_chat_template(pair["prompt"] + [{"role": "assistant", "content": pair[side]}],
                                           tokenize=True, return_dict=True)["input_ids"]
            assert full[: len(prompt)] == prompt
            with torch.no_grad():
                logits = model(torch.tensor([full])).logits[0].float()
            target = torch.tensor(full[len(prompt):])
            logps = logits[len(prompt) - 1 : -1].log_softmax(-1).gather(1, target[:, None]).squeeze(1)
            totals[side] += float(logps.sum())
            counts[side] += len(target)
            means[side] = float(logps.mean())
        wins += means["chosen"] > means["rejected"]
    assert got["heldout_pairs"] == 5
    for side in ("chosen", "rejected"):
        assert got[f"heldout_{side}_ppl"] == pytest.approx(math.exp(-totals[side] / counts[side]), rel=1e-4)
    assert got["heldout_pref_accuracy"] == wins / 5
    lo, hi = got["heldout_pref_accuracy_ci"]
    assert lo <= wins / 5 <= hi
    for side in ("chosen", "rejected"):  # what report's implicit-reward accuracy reads, per pair
        assert sum(s[side] for s in sums) == pytest.approx(totals[side], rel=1e-4)


@pytest.mark.parametrize("heldout", [True, False], ids=["heldout-pairs", "prompts-only"])
def test_report_without_verifiers_shows_what_was_measured(tmp_path, mlflow_db, heldout):
    from stages import report

    evals = tmp_path / "evals"
    for name, ppl, acc, length in (("base", 20.0, 0.25, 3), ("sft", 22.0, 0.75, 5)):
        io.write_jsonl(evals / name / "answers.jsonl", [
            {"id": f"q{i}", "task": "external", "response": "x", "score": None, "passed": None, "length": length}
            for i in range(4)])
        held = {"heldout_pairs": 4, "heldout_pref_accuracy": acc, "heldout_chosen_ppl": 7.5,
                "heldout_rejected_ppl": 9.0} if heldout else {}
        io.write_json(evals / name / "metrics.json", {"general_ppl": ppl, "model": f"models/{name}"} | held)
    params = tiny_params(tmp_path, common={"mlflow_uri": mlflow_db})
    report.main(["--params", str(params), "--evals", str(evals), "--out", str(tmp_path / "reports")])
    text = (tmp_path / "reports/report.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith(("| base", "| sft"))]
    if heldout:
        assert rows == ["| base | 0.250 | 7.50 | 9.00 | 3.0 | 20.00 | +0.0% |",
                        "| sft | 0.750 | 7.50 | 9.00 | 5.0 | 22.00 | +10.0% |"]
    else:
        # only the columns that apply: nothing was measured on pairs, so no pair columns at all
        assert rows == ["| base | 3.0 | 20.00 | +0.0% |", "| sft | 5.0 | 22.00 | +10.0% |"]
        assert "| model | mean length | general ppl | tax vs base |" in text
    assert "**Ship: none**" in text
    table = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert "pass_rate" not in table["sft"] and table["sft"]["alignment_tax"] == pytest.approx(0.1)
    assert (tmp_path / "reports/pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_report_names_the_answer_without_a_reward(tmp_path, mlflow_db):
    """report.judges 'reward_model' needs evaluate.reward_model's per-answer rewards: the first answer lacking one
    is named by file, row (its line in answers.jsonl) and field."""
    from stages import report

    evals = tmp_path / "evals"
    for name in ("base", "sft"):
        rows = [{"id": f"q{i}", "task": "external", "response": "x", "score": None, "passed": None, "length": 1,
                 "reward": 0.5} for i in range(3)]
        if name == "sft":
            del rows[1]["reward"]
        io.write_jsonl(evals / name / "answers.jsonl", rows)
        io.write_json(evals / name / "metrics.json", {"general_ppl": 20.0, "model": f"models/{name}"})
    params = tiny_params(tmp_path, common={"mlflow_uri": mlflow_db}, report={"judges": ["reward_model"]})
    with pytest.raises(SystemExit, match=r"sft/answers.jsonl: row 2: field 'reward': missing"):
        report.main(["--params", str(params), "--evals", str(evals), "--out", str(tmp_path / "reports")])
