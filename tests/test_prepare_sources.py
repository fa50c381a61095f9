"""prepare's splits from user data (every pairs mode) and from reasoning-gym, the held-out pair metrics, and the
report where no verifier exists."""

import json

import pytest
import torch

from posttrain import formats, io, modeling, tasks
from stages import evaluate, prepare, report
from tests.conftest import ASSETS, tiny_params

FORMATS_DIR = ASSETS / "formats"


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
        rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(2)]
        (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
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



    tok = modeling.load_tokenizer(workdir / "models/base", padding_side="right")
    model = modeling.load_chain(workdir / "models/base", torch.device("cpu"))
    path = str(FORMATS_DIR / "preference.jsonl")
    pairs = formats.convert(formats.read(path), "preference", path)[0][:5]
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
