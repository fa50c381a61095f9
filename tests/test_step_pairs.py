"""Step-level pairs (Step-DPO) from the step verifier: hand-written worked answers, every pair derived by hand; the
label stage writing them; `preference.encode` continuing a partial assistant turn."""

import json

import pytest

from posttrain import io, modeling, preference, step_pairs
from stages import label
from tests.conftest import tiny_params

ADD = {"type": "chain_add", "operands": [55, 97, 23]}  # 55 + 97 = 152, 152 + 23 = 175, Answer: 175
ADD_MSGS = [{"role": "user", "content": "Add 55, 97 and 23. Show each running total on its own line, then "
                                        "'Answer: N'."}]
MUL = {"type": "mul_steps", "a": 47, "b": 36}  # 47 * 6 = 282, 47 * 30 = 1410, 282 + 1410 = 1692, Answer: 1692
MUL_MSGS = [{"role": "user", "content": "Multiply 47 by 36 with partial products."}]

RIGHT = "55 + 97 = 152\n152 + 23 = 175\nAnswer: 175"
WRONG_AT_1 = "55 + 97 = 152\n152 + 23 = 176\nAnswer: 176"   # step 1 slips; the Answer line follows it (right)
WRONG_AT_0 = "55 + 97 = 142\n142 + 23 = 165\nAnswer: 165"   # step 0 slips; steps 1 and Answer carry it (right)
TERSE_AT_1 = "55+97=152\n152 + 23 = 185\nAnswer: 185"       # step 0 right but written unlike any right sample
ADD_ROW = {"id": "c1", "messages": ADD_MSGS, "verifier": ADD, "samples": [RIGHT, WRONG_AT_1, WRONG_AT_0, TERSE_AT_1]}

MUL_WRONG_AT_2 = "47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1792\nAnswer: 1792"
MUL_WRONG_AT_ANSWER = "47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1692\nAnswer: 1962"
MUL_SAME_MISTAKE = "47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1792\nAnswer: 1692"  # step 2 as MUL_WRONG_AT_2
MUL_STOPS = "47 * 6 = 282\n47 * 30 = 1410"                                          # no step 2 at all
MUL_WRONG_AT_0 = "47 * 6 = 272\n47 * 30 = 1410\n272 + 1410 = 1682\nAnswer: 1682"
MUL_ROW = {"id": "m1", "messages": MUL_MSGS, "verifier": MUL,  # all wrong: no response-level pair
           "samples": [MUL_WRONG_AT_2, MUL_WRONG_AT_ANSWER, MUL_SAME_MISTAKE, MUL_STOPS, " ", MUL_WRONG_AT_0]}

NUMBER_ROW = {"id": "n1", "messages": [{"role": "user", "content": "What is 2 + 2?"}],
              "verifier": {"type": "number", "answer": 4}, "samples": ["4", "5"]}


def _assistant(prefix: str) -> list[dict]:
    return [{"role": "assistant", "content": prefix}]


# Derived by hand. Gold scores of the whole answers: a right one 1.0; a wrong one 0.5 x its share of right steps
# (the Answer line counted; a slip is carried forward): each wrong chain_add answer here has 2 of 3 right, 1/3;
# each wrong mul_steps one 3 of 4, 0.375. Halving makes both exact in floating point.
ADD_PAIRS = [
    {"id": "c1.step1.1", "prompt": ADD_MSGS + _assistant("55 + 97 = 152\n"), "chosen": "152 + 23 = 175\nAnswer: 175",
     "rejected": "152 + 23 = 176\nAnswer: 176", "chosen_score": 1.0, "rejected_score": 1 / 3,
     "source": "own_sample", "step": 1, "mistake": "152 + 23 = 176"},
    {"id": "c1.step0.2", "prompt": ADD_MSGS, "chosen": RIGHT, "rejected": WRONG_AT_0, "chosen_score": 1.0,
     "rejected_score": 1 / 3, "source": "own_sample", "step": 0, "mistake": "55 + 97 = 142"},
    {"id": "c1.step1.3", "prompt": ADD_MSGS + _assistant("55+97=152\n"), "chosen": "152 + 23 = 175\nAnswer: 175",
     "rejected": "152 + 23 = 185\nAnswer: 185", "chosen_score": 1.0, "rejected_score": 1 / 3,
     "source": "solver", "step": 1, "mistake": "152 + 23 = 185"},
]
MUL_PAIRS = [
    {"id": "m1.step2.0", "prompt": MUL_MSGS + _assistant("47 * 6 = 282\n47 * 30 = 1410\n"),
     "chosen": "282 + 1410 = 1692\nAnswer: 1692", "rejected": "282 + 1410 = 1792\nAnswer: 1792",
     "chosen_score": 1.0, "rejected_score": 0.375, "source": "solver", "step": 2, "mistake": "282 + 1410 = 1792"},
    {"id": "m1.step3.1", "prompt": MUL_MSGS + _assistant("47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1692\n"),
     "chosen": "Answer: 1692", "rejected": "Answer: 1962", "chosen_score": 1.0, "rejected_score": 0.375,
     "source": "solver", "step": 3, "mistake": "Answer: 1962"},
    # the slip at step 0 is carried forward rightly by steps 1 (47 * 30 does not use it), 2 and Answer: 3 of 4
    {"id": "m1.step0.4", "prompt": MUL_MSGS, "chosen": "47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1692\nAnswer: 1692",
     "rejected": MUL_WRONG_AT_0, "chosen_score": 1.0, "rejected_score": 0.375, "source": "solver", "step": 0,
     "mistake": "47 * 6 = 272"},
]
# each pair carries its prompt's verifier, as label writes it
ADD_PAIRS = [p | {"verifier": ADD} for p in ADD_PAIRS]
MUL_PAIRS = [p | {"verifier": MUL} for p in MUL_PAIRS]


def test_chain_add_pairs_by_hand():
    """Wrong at step 1 with a right sample sharing its prefix: that sample's rest is chosen. Wrong at step 0: no
    prefix, the whole right sample is chosen. Wrong at step 1 after a prefix no right sample has: the solver's
    steps from step 1. The right answer gives no pair."""
    pairs, dropped = step_pairs.of_row(ADD_ROW)
    assert pairs == ADD_PAIRS
    assert dropped == {}
    for p in pairs:  # each side, read after its prefix, is the whole answer it came from
        prefix = p["prompt"][-1]["content"] if p["prompt"][-1]["role"] == "assistant" else ""
        assert prefix + p["rejected"] in ADD_ROW["samples"]


def test_all_wrong_mul_steps_prompt_gets_solver_pairs():
    """No right sample: every chosen side is the solver's; the same first mistake twice gives one pair; an answer
    that stops before its first wrong step, and an empty one, give none."""
    pairs, by_source, dropped = step_pairs.make([MUL_ROW], per_prompt=10)
    assert pairs == MUL_PAIRS
    assert by_source == {"own_sample": 0, "policy_sample": 0, "solver": 3}
    assert dropped == {"same_first_mistake": 1, "wrong_step_missing": 1, "empty_response": 1}


def test_cap_keeps_own_samples_first_and_counts_the_rest():
    pairs, by_source, dropped = step_pairs.make([ADD_ROW, MUL_ROW, NUMBER_ROW], per_prompt=2)
    assert [p["id"] for p in pairs] == ["c1.step1.1", "c1.step0.2", "m1.step2.0", "m1.step3.1"]
    assert by_source == {"own_sample": 2, "policy_sample": 0, "solver": 2}
    assert dropped == {"over_cap": 2, "same_first_mistake": 1, "wrong_step_missing": 1, "empty_response": 1,
                       "not_a_worked_task": 1}


def test_a_repeated_prompt_gives_no_duplicate_pair():
    pairs, by_source, dropped = step_pairs.make([ADD_ROW, ADD_ROW | {"id": "c2"}], per_prompt=10)
    assert [p["id"] for p in pairs] == ["c1.step1.1", "c1.step0.2", "c1.step1.3"]
    assert dropped == {"same_first_mistake": 3}


def test_policy_samples_from_the_prefix_replace_the_solver_where_one_is_right():
    """The three solver pairs of MUL_ROW, two samples each from their prompts (prefix included). m1.step2.0: a
    sample repeating the mistake, then a right one: the right one is chosen. m1.step3.1: a wrong Answer line and an
    empty sample: the solver's stays. m1.step0.4 (no prefix): empty, then a whole right answer: chosen."""
    asked = []

    def sample(prompts, n):
        asked.append((prompts, n))
        return [["282 + 1410 = 1792\nAnswer: 1792", "282 + 1410 = 1692\nAnswer: 1692"],
                ["Answer: 1962", ""],
                ["", "47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1692\nAnswer: 1692"]]

    pairs, sampled = step_pairs.complete(MUL_PAIRS, sample, 2)
    assert asked == [([p["prompt"] for p in MUL_PAIRS], 2)] and sampled == 3
    assert pairs == [MUL_PAIRS[0] | {"chosen": "282 + 1410 = 1692\nAnswer: 1692", "source": "policy_sample"},
                     MUL_PAIRS[1],
                     MUL_PAIRS[2] | {"chosen": "47 * 6 = 282\n47 * 30 = 1410\n282 + 1410 = 1692\nAnswer: 1692",
                                     "source": "policy_sample"}]
    assert step_pairs.count(pairs) == {"own_sample": 0, "policy_sample": 2, "solver": 1}
    # own-sample pairs are not sampled; nothing to sample, nothing asked
    asked.clear()
    assert step_pairs.complete(ADD_PAIRS, lambda prompts, n: asked.append(prompts) or [[""]] * len(prompts), 4) == (
        ADD_PAIRS, 1)
    assert asked == [[ADD_PAIRS[2]["prompt"]]]
    assert step_pairs.complete(ADD_PAIRS[:2], sample, 4) == (ADD_PAIRS[:2], 0) and len(asked) == 1


def _params(tmp_path, **label_block):
    return str(tiny_params(tmp_path, label=label_block))


def _samples(tmp_path, rows) -> str:
    path = tmp_path / "samples.jsonl"
    io.write_jsonl(path, rows)
    return str(path)


def test_label_writes_step_prefs_and_counts_them(tmp_path):
    out = tmp_path / "label"
    params = _params(tmp_path, step_pairs=True, step_pairs_per_prompt=2, margin=0.5)  # margin: right over wrong only
    metrics = label.main(["--params", params, "--samples", _samples(tmp_path, [ADD_ROW, MUL_ROW, NUMBER_ROW]),
                          "--out", str(out)])
    written = io.read_jsonl(out / "step_prefs.jsonl", "prefs")
    assert written == ADD_PAIRS[:2] + MUL_PAIRS[:2]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["step_pairs"] == {"pairs": 4, "by_source": {"own_sample": 2, "policy_sample": 0, "solver": 2},
                                   "dropped": {"over_cap": 2, "same_first_mistake": 1, "wrong_step_missing": 1,
                                               "empty_response": 1, "not_a_worked_task": 1}}
    assert (metrics["step_pairs"], metrics["step_pairs_own_sample"], metrics["step_pairs_solver"]) == (4, 2, 2)
    # the response-level pairs are label's as before: right over wrong in c1 and n1; m1 is all wrong
    assert [p["id"] for p in io.read_jsonl(out / "prefs.jsonl", "prefs")] == ["c1", "n1"]


def test_label_writes_no_empty_step_prefs(tmp_path):
    """No worked task: no file (an empty DVC output draws warnings), and stats say 0; off, nothing is said."""
    out = tmp_path / "label"
    samples = _samples(tmp_path, [NUMBER_ROW])
    label.main(["--params", _params(tmp_path, step_pairs=True), "--samples", samples, "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["prefs.jsonl", "stats.json"]
    assert json.loads((out / "stats.json").read_text())["step_pairs"] == {
        "pairs": 0, "by_source": {"own_sample": 0, "policy_sample": 0, "solver": 0},
        "dropped": {"not_a_worked_task": 1}}
    metrics = label.main(["--params", _params(tmp_path), "--samples", _samples(tmp_path, [ADD_ROW]), "--out",
                          str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["prefs.jsonl", "stats.json"]
    assert "step_pairs" not in json.loads((out / "stats.json").read_text()) and "step_pairs" not in metrics


def test_label_samples_the_policy_from_step_prefixes(workdir, tmp_path):
    """label.step_samples 2 with the tiny random model as the policy: the two capped solver pairs' prompts are
    sampled (its samples are noise, never right, so the solver's steps stay); without --policy it refuses."""
    out = tmp_path / "label"
    params = _params(tmp_path, step_pairs=True, step_pairs_per_prompt=2, margin=0.5, step_samples=2)
    samples = _samples(tmp_path, [ADD_ROW, MUL_ROW, NUMBER_ROW])
    metrics = label.main(["--params", params, "--samples", samples, "--policy", str(workdir / "models/base"),
                          "--out", str(out)])
    assert io.read_jsonl(out / "step_prefs.jsonl", "prefs") == ADD_PAIRS[:2] + MUL_PAIRS[:2]
    stats = json.loads((out / "stats.json").read_text())["step_pairs"]
    assert stats["prefixes_sampled"] == 2 and stats["by_source"] == {"own_sample": 2, "policy_sample": 0, "solver": 2}
    assert metrics["step_pairs_policy_sample"] == 0
    with pytest.raises(SystemExit, match="step_samples > 0 needs --policy"):
        label.main(["--params", params, "--samples", samples, "--out", str(tmp_path / "label2")])
    assert not (tmp_path / "label2").exists()


def test_label_refuses_step_pairs_it_cannot_make(tmp_path):
    with pytest.raises(ValueError, match="step_pairs_per_prompt must be >= 1"):
        label.LabelParams(step_pairs_per_prompt=0)
    with pytest.raises(ValueError, match="step_samples and step_temperature must be >= 0"):
        label.LabelParams(step_samples=-1)
    params = tiny_params(tmp_path, label={"step_pairs": True}, prepare={"pairs": "dataset"})
    prefs = tmp_path / "prefs.jsonl"
    io.write_jsonl(prefs, [ADD_PAIRS[1]])
    with pytest.raises(SystemExit, match="step_pairs needs sampled answers"):
        label.main(["--params", str(params), "--samples", _samples(tmp_path, [ADD_ROW]), "--pairs", str(prefs),
                    "--out", str(tmp_path / "label")])


@pytest.fixture(scope="module")
def tok():
    return modeling.build_model("tiny", 0)[1]


def test_encode_continues_the_partial_assistant_turn(tok):
    """A step pair trains exactly the tokens after the prefix of the answer as one turn renders it; the prefix is
    not a closed turn followed by a new one (what the template gives the prompt with a generation prompt)."""
    pair = ADD_PAIRS[0]
    enc = preference.encode(tok, pair, max_len=256)
    for side in ("chosen", "rejected"):
        whole = ADD_MSGS + _assistant("55 + 97 = 152\n" + pair[side])
        ids = tok.apply_chat_template(whole, tokenize=True, return_dict=True)["input_ids"]
        assert enc["prompt_ids"] + enc[f"{side}_ids"] == ids
        assert tok.decode(enc[f"{side}_ids"]) == pair[side] + "<|im_end|>\n"
    assert tok.decode(enc["prompt_ids"]).endswith("<|im_start|>assistant\n55 + 97 = 152\n")
    assert tok.decode(enc["prompt_ids"]).count("<|im_start|>assistant") == 1
    # label.step_samples samples the policy from the very tokens the pair's completions are trained after
    assert tok(modeling.render_prompt(tok, pair["prompt"]), add_special_tokens=False).input_ids == enc["prompt_ids"]
    # an empty prefix is a plain prompt, encoded as every response-level pair is
    plain = preference.encode(tok, ADD_PAIRS[1], max_len=256)
    assert tok.decode(plain["prompt_ids"]).endswith("'Answer: N'.<|im_end|>\n<|im_start|>assistant\n")


def test_reference_and_dpo_train_on_step_pairs(workdir, tmp_path):
    """The reference cache of step pairs covers the tokens after the prefix only (the continuation, then the
    end-of-turn <|im_end|> and newline), and the dpo stage trains on them with it (what a step_dpo row runs)."""
    from stages import dpo, reference

    pairs, _, _ = step_pairs.make([ADD_ROW, MUL_ROW], per_prompt=10)
    prefs, ref, model = tmp_path / "step_prefs.jsonl", tmp_path / "reference", str(workdir / "models/base")
    io.write_jsonl(prefs, pairs)
    params = str(workdir / "params.yaml")
    assert reference.main(["--params", params, "--model", model, "--prefs", str(prefs), "--out", str(ref)])[
        "pairs"] == 6
    tok = modeling.stage_tokenizer(model, padding_side="right")
    cached = preference.read_token_values(ref / "logps.jsonl")
    for p in pairs:
        for side in ("chosen", "rejected"):
            assert len(cached[p["id"]][side]) == len(tok(p[side], add_special_tokens=False).input_ids) + 2
    out = dpo.main(["--params", params, "--variant", "dpo", "--model", model, "--prefs", str(prefs), "--reference",
                    str(ref), "--guidance", str(ref), "--out", str(tmp_path / "step_dpo")])
    assert out["pairs"] == 6 and out["steps"] == 2  # 6 pairs, batch_size 4 (profiles/tiny.yaml)
