"""Rules the stages apply, each on hand-made input and the tiny base model, without running the pipeline: bad
input stops with the file, row and field and leaves no output; pairs are ranked, split and counted by stated rules;
the statistics the report prints."""

import json
import math

import pytest

from posttrain import io, modeling, preference, reward, stats
from stages import label, prepare, reward_model
from tests.conftest import tiny_params


def test_gold_breakdown_counts_kept_pairs_by_their_gold_scores():
    gold = [(1.0, 0.2), (1.0, 0.0), (0.3, 1.0), (1.0, 1.0), (0.4, 0.1), (0.2, 0.2), (0.1, 0.45)]
    assert label.gold_breakdown(gold) == {"right_over_wrong": 2, "wrong_over_right": 1, "both_right": 1,
                                          "both_wrong_agree": 1, "both_wrong_tie": 1, "both_wrong_reversed": 1}


def test_win_rate_counts_ties_as_half():
    assert stats.win_values([1.0, 0.5, 0.0], [0.5, 0.5, 1.0]) == [1.0, 0.5, 0.0]
    lo, hi = stats.bootstrap_ci([1.0] * 10)
    assert lo == hi == 1.0


def test_perplexity_interval_resamples_responses_not_tokens():

    # nll sums 2 and 4 over 1 and 2 tokens: every resample has 2 nats a token, so the interval is one point
    assert stats.ratio_ppl_ci([2.0, 4.0], [1, 2]) == pytest.approx((math.e ** 2, math.e ** 2))
    # 1 and 4 nats over one token each: a resample of both copies of either (1/4 each) gives e or e^4, so the
    # 2.5% and 97.5% quantiles are exactly those; the mix gives e^2.5
    lo, hi = stats.ratio_ppl_ci([1.0, 4.0], [1, 1], n_boot=4000)
    assert (lo, hi) == pytest.approx((math.e, math.e ** 4))


def test_template_check_catches_double_bos_and_missing_eos(workdir):
    tok = modeling.load_tokenizer(workdir / "models/base")
    modeling.check_template(tok)  # the shipped SmolLM2 template is fine
    good = tok.chat_template
    tok.chat_template = "{{ bos_token }}" + good.replace("{% for message", "{{ bos_token }}{% for message", 1)
    with pytest.raises(modeling.TemplateError, match="double BOS"):
        modeling.check_template(tok)
    tok.chat_template = good.replace("'<|im_end|>' + '\n'", "'\n'")
    with pytest.raises(modeling.TemplateError, match="not closed by EOS"):
        modeling.check_template(tok)


def test_prepare_rejects_a_bad_user_file(workdir, tmp_path):
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": None}]}) + "\n")
    params = tiny_params(tmp_path, prepare={"source": str(bad)})
    with pytest.raises(SystemExit, match=rf"{bad}: row 2: field 'messages': message 0"):
        prepare.main(["--params", str(params), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_label_rejects_a_bad_samples_file(workdir, tmp_path):
    bad = tmp_path / "samples.jsonl"
    bad.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "1+1?"}], "verifier": None,
                               "samples": ["2", ""]}) + "\n")
    with pytest.raises(SystemExit, match=rf"{bad}: row 1: field 'verifier': null"):
        label.main(["--params", str(workdir / "params.yaml"), "--samples", str(bad), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_reward_model_without_pairs_says_so_and_label_refuses_it(workdir, tmp_path):
    """User chat data brings no pairs: reward_model records why it trained nothing; the judge then names it."""
    empty = tmp_path / "rm_prefs.jsonl"
    empty.write_text("")
    p = str(tiny_params(tmp_path, label={"judge": "reward_model"}))
    out = reward_model.main(["--params", p, "--model", str(workdir / "models/base"), "--prefs", str(empty),
                             "--samples", str(empty), "--out", str(tmp_path / "rm"), "--metrics",
                             str(tmp_path / "rm.json")])
    assert out["train_pairs"] == 0 and (tmp_path / "rm/untrained.json").exists()
    samples = tmp_path / "samples.jsonl"
    io.write_jsonl(samples, [{"id": "a", "messages": [{"role": "user", "content": "hi"}], "verifier": None,
                              "samples": ["x", "y"]}])
    with pytest.raises(SystemExit, match=r"rm: .*rm_prefs.jsonl holds no preference pairs"):
        label.main(["--params", p, "--samples", str(samples), "--reward-model", str(tmp_path / "rm"),
                    "--out", str(tmp_path / "label")])


def test_heldout_pairs_all_dropped_stop_with_the_file_and_the_drops(workdir):
    from stages import evaluate

    model = modeling.load_chain(workdir / "models/base")
    tok = modeling.load_tokenizer(workdir / "models/base", padding_side="right")
    pair = {"id": "h0", "prompt": [{"role": "user", "content": "2 + 2?"}], "chosen": "4", "rejected": " 4 "}
    with pytest.raises(io.InputError, match=r"heldout_prefs.jsonl: no usable pair .*chosen_equals_rejected': 1"):
        evaluate.heldout_pairs(model, tok, [pair], 96, 4, "heldout_prefs.jsonl", 100, 0)


def test_ranked_pairs_pair_every_two_answers_a_margin_apart():
    """51 + 42 = 93: '93' scores 1.0; '103' 0.5 * (1 - 10/93) = 0.446; '34' 0.5 * (1 - 59/93) = 0.183."""
    q = [{"role": "user", "content": "What is 51 + 42?"}]
    rows = [{"id": "p1", "messages": q, "verifier": {"type": "number", "answer": 93},
             "samples": ["93", " 93 ", "103", "", "34"]},
            {"id": "p2", "messages": q, "verifier": {"type": "number", "answer": 93}, "samples": ["103", "34"]},
            {"id": "p3", "messages": q, "verifier": None, "samples": ["93", "34"]}]
    pairs, counts = reward_model.ranked_pairs(rows, 0.5)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("93", "103"), ("93", "34")]
    assert {p["group"] for p in pairs} == {"p1"} and len({p["id"] for p in pairs}) == 2
    assert counts == {"no_verifier": 1, "empty_response": 1, "repeated_response": 1, "prompt_without_pair": 1}
    # a margin below the wrong answers' gap (0.263) also ranks the two wrong ones, the nearer chosen
    pairs, _ = reward_model.ranked_pairs(rows[1:2], 0.25)
    assert [(p["chosen"], p["rejected"], round(p["chosen_score"], 3)) for p in pairs] == [("103", "34", 0.446)]
    with pytest.raises(ValueError, match=r"row 2: field 'verifier': KeyError\('answer'\)"):
        reward_model.ranked_pairs([rows[0], rows[1] | {"verifier": {"type": "number"}}], 0.5)


def test_heldout_split_keeps_a_prompts_pairs_together():
    pairs = [{"id": f"g{g}:{k}", "group": f"g{g}"} for g in range(40) for k in range(3)]
    train, held = reward_model.split_heldout(pairs, 0.5)
    assert train and held, "both sides used: the rule is not forced"
    assert not {p["group"] for p in train} & {p["group"] for p in held}
    assert all(sum(p["group"] == q["group"] for p in held) == 3 for q in held)
    # pairs without a group split on their own ids, as before
    alone = [{"id": f"x{i}"} for i in range(40)]
    assert reward_model.split_heldout(alone, 0.5)[1] == [p for p in alone if preference.is_heldout(p["id"], 0.5)]


def test_label_refuses_a_floor_the_reward_model_does_not_have(workdir, tmp_path):
    """A reward model saved without calibration.json (no held-out pairs): label.reward_floor names the folder."""
    rm = reward.build(modeling.load_chain(workdir / "models/base"))
    reward.save(rm, tmp_path / "rm", str(workdir / "models/base"), {})
    samples = tmp_path / "samples.jsonl"
    io.write_jsonl(samples, [{"id": "a", "messages": [{"role": "user", "content": "hi"}], "verifier": None,
                              "samples": ["x", "y"]}])
    p = str(tiny_params(tmp_path, label={"judge": "reward_model", "reward_floor": True}))
    with pytest.raises(SystemExit, match=r"rm: no calibration.json .*label.reward_floor: false"):
        label.main(["--params", p, "--samples", str(samples), "--reward-model", str(tmp_path / "rm"),
                    "--out", str(tmp_path / "label")])
    assert not (tmp_path / "label").exists()
