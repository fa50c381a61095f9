"""Blame localisation and shared-prefix displacement on hand-computed numbers; token spans on the real SmolLM2
tokenizer (the tiny model's), aligned with `preference.encode`."""

import random

import pytest

from posttrain import credit, modeling, preference, tasks
from tests.conftest import ADD3, ADD3_PROMPT, ADD3_REJECTED, add3_pair


@pytest.fixture(scope="module")
def tok():
    return modeling.build_model("tiny", 0)[1]


def test_token_spans_tile_the_response(tok):
    """SmolLM2 splits digits one per token; the end-of-turn tokens (<|im_end|>, "\\n") lie outside the text."""
    spans = credit.token_spans(tok, add3_pair(ADD3_REJECTED), "rejected", max_len=256)
    pieces = [ADD3_REJECTED[s[0] : s[1]] if s else None for s in spans]
    assert pieces == ["5", "5", " +", " ", "9", "7", " =", " ", "1", "5", "2", "\n",
                      "1", "5", "2", " +", " ", "2", "3", " =", " ", "1", "6", "5", "\n",
                      "Answer", ":", " ", "1", "6", "5", None, None]


def test_token_spans_follow_encode_and_its_cut(tok):
    rng = random.Random(0)
    for task in tasks.PLANS:
        for _ in range(10):
            row = tasks.make_prompt(task, rng)
            pair = {"id": "x", "prompt": row["messages"], "chosen": tasks.solve(row["verifier"]),
                    "rejected": tasks.near_miss(row["verifier"], rng)}
            for max_len in (256, 90):
                enc = preference.encode(tok, pair, max_len)
                for side in ("chosen", "rejected"):
                    spans = credit.token_spans(tok, pair, side, max_len)
                    assert len(spans) == len(enc[f"{side}_ids"])
                    kept = [s for s in spans if s is not None]
                    text = "".join(pair[side][a:b] for a, b in kept)
                    assert pair[side].startswith(text) and (max_len < 256 or text == pair[side])


# Synthetic response: 5 response tokens at characters [0,2) [2,3) [3,5) [5,6) [6,8), then an end-of-turn token.
SPANS = [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), None]
WRONG = (3, 6)  # overlaps tokens 2 and 3: chance = 2 / 5


@pytest.mark.parametrize(("rhat", "hit"), [
    ([0.5, 0.1, -0.3, 0.2, 0.0, -5.0], True),  # lowest response token is 2 (-0.3); the -5.0 is end-of-turn
    ([-0.4, 0.1, -0.3, 0.2, 0.0, 0.0], False),  # lowest is token 0, before the wrong step
    ([0.0, 0.1, 0.0, 0.2, 0.3, 0.0], False),  # tie between 0 and 2: the first minimum, token 0
])
def test_blame_one(rhat, hit):
    assert credit.blame_one(rhat, SPANS, WRONG) == (hit, 2 / 5)


def test_blame_one_without_a_token_in_the_step():
    assert credit.blame_one([0.0] * 6, SPANS, (8, 8)) is None  # a missing last step: (len, len)
    with pytest.raises(ValueError, match="5 r_hat values for 6 tokens"):
        credit.blame_one([0.0] * 5, SPANS, WRONG)


def test_blame_over_responses():
    rows = [{"rhat": [0.5, 0.1, -0.3, 0.2, 0.0, 0.0], "spans": SPANS, "wrong": WRONG},  # hit, chance 2/5
            {"rhat": [-1.0, 0.0, 0.0, 0.0], "spans": [(0, 1), (1, 2), (2, 3), (3, 4)], "wrong": (3, 4)},  # miss, 1/4
            {"rhat": [0.0], "spans": [(0, 1)], "wrong": None},
            {"rhat": [0.0] * 6, "spans": SPANS, "wrong": (8, 8)}]
    got = credit.blame(rows, n_boot=200)
    assert got["n"] == 2 and got["dropped"] == {"no_wrong_step": 1, "wrong_step_has_no_token": 1}
    assert got["hit_rate"]["mean"] == pytest.approx(0.5)
    assert got["chance"]["mean"] == pytest.approx((0.4 + 0.25) / 2)
    assert got["lift"]["mean"] == pytest.approx(((1 - 0.4) + (0 - 0.25)) / 2)
    lo, hi = got["lift"]["ci"]
    assert -0.25 <= lo <= hi <= 0.6  # a bootstrap mean lies between the smallest and largest value
    # r_hat before the wrong step: row 1 tokens 0, 1 (0.5, 0.1) -> 0.3; row 2 tokens 0-2 (-1, 0, 0) -> -1/3
    assert got["rhat_before_wrong_step"]["n"] == 2
    assert got["rhat_before_wrong_step"]["mean"] == pytest.approx((0.3 - 1 / 3) / 2)
    # in it: row 1 tokens 2, 3 (-0.3, 0.2) -> -0.05; row 2 token 3 (0.0) -> 0; the dropped rows count in neither
    assert got["rhat_in_wrong_step"]["mean"] == pytest.approx(-0.025)


def test_rhat_by_part():
    rhat = [0.5, 0.1, -0.3, 0.2, 0.0, -5.0]  # the -5.0 is the end-of-turn token: in no part
    assert credit.rhat_by_part(rhat, SPANS, WRONG) == pytest.approx((0.3, -0.05))
    before, inside = credit.rhat_by_part(rhat, SPANS, (0, 2))  # the first step is the wrong one
    assert before is None and inside == pytest.approx(0.5)
    assert credit.rhat_by_part(rhat, SPANS, (8, 8)) == (pytest.approx(0.1), None)  # a missing last step: all 5 before
    with pytest.raises(ValueError, match="5 r_hat values for 6 tokens"):
        credit.rhat_by_part(rhat[:5], SPANS, WRONG)


def test_prefix_shift():
    logp = [-1.0, -2.0, -3.0, -1.0, -1.0, -9.0]
    ref = [-0.5, -1.0, -1.0, -1.0, -1.0, -1.0]
    # tokens ending at or before character 3 are 0 and 1: mean((-1 + 0.5), (-2 + 1)) = -0.75
    assert credit.prefix_shift(logp, ref, SPANS, WRONG) == pytest.approx(-0.75)
    assert credit.prefix_shift(logp, ref, SPANS, (0, 2)) is None  # the first step is the wrong one
    # wrong step at [5, 8): tokens 0, 1, 2 end by 5: mean(-0.5, -1, -2) = -7/6
    assert credit.prefix_shift(logp, ref, SPANS, (5, 8)) == pytest.approx(-7 / 6)


def test_displacement_and_paired_difference():
    base = {"spans": SPANS, "wrong": WRONG, "ref": [-1.0] * 6}
    rows = [base | {"id": "a", "logp": [-1.5, -2.0, 0, 0, 0, 0]},  # mean(-0.5, -1.0) = -0.75
            base | {"id": "b", "logp": [-0.5, -0.75, 0, 0, 0, 0]},  # mean(0.5, 0.25) = 0.375
            base | {"id": "c", "logp": [0.0] * 6, "wrong": (0, 2)},
            base | {"id": "d", "logp": [0.0] * 6, "wrong": None}]
    got = credit.displacement(rows, n_boot=200)
    assert got["n"] == 2 and got["dropped"] == {"no_token_before_wrong_step": 1, "no_wrong_step": 1}
    assert got["values"] == pytest.approx({"a": -0.75, "b": 0.375})
    assert got["mean"] == pytest.approx((-0.75 + 0.375) / 2)
    diff = credit.paired_difference({"a": 1.0, "b": 3.0, "z": 5.0}, {"a": 0.0, "b": 1.0})
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(1.5)
    assert 1.0 <= diff["ci"][0] <= diff["ci"][1] <= 2.0


def test_locate_and_attach(tok):
    pairs = [add3_pair(ADD3_REJECTED, "w"), {"id": "n", "prompt": ADD3_PROMPT, "chosen": "85", "rejected": "86"}]
    specs = {"w": ADD3, "n": {"type": "number", "answer": 85}}
    located, skipped = credit.locate(tok, pairs, specs, max_len=256)
    assert skipped == {"not_a_worked_task": 1}
    (row,) = located
    assert row["id"] == "w" and row["wrong"] == (14, 28) and len(row["spans"]) == 33
    rows = credit.attach(located, {"w": {"chosen": [], "rejected": list(range(33))}}, "rhat")
    assert rows[0]["rhat"] == list(range(33))
    # the tokens of step 1 ("152 + 23 = 165", characters 14..28) are tokens 12..23: 12 of 31 response tokens
    assert credit.blame_one([0.0] * 12 + [-1.0] + [0.0] * 20, row["spans"], row["wrong"]) == (True, 12 / 31)
    with pytest.raises(ValueError, match=r"no cached values for pair\(s\) \['w'\]"):
        credit.attach(located, {}, "rhat")


def test_panel_and_plot(tmp_path):
    p = credit.panel("rejected", "ab\ncd", [(0, 1), (1, 2), (2, 3), (3, 5), None], [1.0, -1.0, 0.0, 0.5, 9.0],
                     (3, 5))
    assert p == {"label": "rejected", "pieces": ["a", "b", "\n", "cd"], "values": [1.0, -1.0, 0.0, 0.5],
                 "marked": [False, False, False, True]}
    out = tmp_path / "plots" / "pairs.png"
    credit.plot_pairs([p, p | {"label": "chosen", "marked": [False] * 4}], out, "two panels")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in out.parent.iterdir()] == ["pairs.png"]  # no temp file left behind


def _worked_pairs(n: int) -> tuple[list[dict], list[dict]]:
    """Prompt rows (with verifiers) and pairs of worked tasks whose rejected answer slips at step 1 (not the first
    line), so a token before the wrong step exists in each."""
    rng, prompts, pairs = random.Random(3), [], []
    for i in range(n):
        row = tasks.make_prompt("chain_add" if i % 2 else "mul_steps", rng) | {"id": f"w{i}"}
        prompts.append(row)
        pairs.append({"id": row["id"], "prompt": row["messages"], "chosen": tasks.solve(row["verifier"]),
                      "rejected": tasks.near_miss(row["verifier"], rng, step=1), "verifier": row["verifier"]})
    return prompts, pairs


def test_credit_stage_blames_where_the_guidance_points_and_measures_displacement(workdir, tmp_path):
    import json
    import shutil

    from posttrain import io
    from stages import credit as stage
    from stages import reference, report
    from tests.conftest import tiny_params

    p = str(tiny_params(tmp_path, common={"max_len": 200}))
    base = workdir / "models/base"
    prompts, pairs = _worked_pairs(6)
    io.write_jsonl(tmp_path / "prefs.jsonl", pairs)  # each with its prompt's verifier, as label writes them
    reference.main(["--params", p, "--model", str(base), "--prefs", str(tmp_path / "prefs.jsonl"), "--out",
                    str(tmp_path / "reference")])
    tok = modeling.stage_tokenizer(base, padding_side="right")
    located, _ = credit.locate(tok, pairs, {r["id"]: r["verifier"] for r in prompts}, 200)
    first_wrong = {r["id"]: next(k for k, s in enumerate(r["spans"]) if s and s[1] > r["wrong"][0]) for r in located}
    # source "step": lowest r_hat on the first token of the wrong step (hit); "start": on the answer's first token
    # (a correct step here: miss)
    for name, at in (("step", first_wrong), ("start", dict.fromkeys(first_wrong, 0))):
        rows = [{"id": r["id"], "chosen": [0.0], "rejected": [-1.0 if k == at[r["id"]] else 0.0
                                                              for k in range(len(r["spans"]))]} for r in located]
        preference.write_token_values(tmp_path / f"guidance/{name}/rhat.jsonl", rows)
    shutil.copytree(base, tmp_path / "policies/dpo")  # the reference itself: no displacement
    rows = ("rpo", "tgdpo_cancel", "tgdpo_cancel_token", "step_dpo")  # every row counts, whatever its loss or pairs
    for name in rows:
        (tmp_path / "policies" / name).symlink_to(base)
    for debris in ("tgdpo.ckpt/checkpoint-2", ".rpo.tmp-1"):  # a killed run's checkpoints and temp: no policies
        (tmp_path / "policies" / debris).mkdir(parents=True)
    other = modeling.load_chain(base)
    with __import__("torch").no_grad():
        other.lm_head.weight.add_(0.05 * __import__("torch").randn_like(other.lm_head.weight))
    other.save_pretrained(tmp_path / "policies/noisy")
    args = ["--params", p, "--model", str(base), "--prefs", str(tmp_path / "prefs.jsonl"), "--reference",
            str(tmp_path / "reference"), "--guidance",
            str(tmp_path / "guidance"), "--policies", str(tmp_path / "policies"), "--out", str(tmp_path / "credit")]
    stage.main(args)
    m = json.loads((tmp_path / "credit/metrics.json").read_text())
    assert m["n"] == 6 and m["skipped"] == {}
    assert m["blame"]["step"]["hit_rate"]["mean"] == 1.0 and m["blame"]["start"]["hit_rate"]["mean"] == 0.0
    chance = sum(credit.blame_one([0.0] * len(r["spans"]), r["spans"], r["wrong"])[1] for r in located) / 6
    assert m["blame"]["step"]["chance"]["mean"] == pytest.approx(chance)
    assert set(m["displacement"]) == {"dpo", "noisy", *rows} and set(m["displacement_minus_dpo"]) == {"noisy", *rows}
    assert all(m["displacement"][n]["n"] == 6 and m["displacement"][n]["mean"] == pytest.approx(0.0, abs=1e-5)
               for n in ("dpo", *rows))
    noisy = m["displacement"]["noisy"]
    assert noisy["n"] == 6 and abs(noisy["mean"]) > 1e-3
    assert m["displacement_minus_dpo"]["noisy"]["mean"] == pytest.approx(noisy["mean"], abs=1e-5)
    assert (tmp_path / "credit/pairs.png").stat().st_size > 10_000
    lines = "\n".join(report.credit_lines(str(tmp_path / "credit/metrics.json")))
    assert "| step | 6 | 1.000 [1.000, 1.000] |" in lines and "| noisy | 6 |" in lines

    # pairs of a task without steps: nothing to measure, no model loaded (the policies folder is not even there)
    row = tasks.make_prompt("add", random.Random(0))
    plain = [{"id": "a0", "prompt": row["messages"], "chosen": "85", "rejected": "86", "verifier": row["verifier"]}]
    io.write_jsonl(tmp_path / "plain.jsonl", plain)
    swap = {str(tmp_path / a): str(tmp_path / b) for a, b in (("prefs.jsonl", "plain.jsonl"), ("policies", "absent"),
                                                             ("credit", "c0"))}
    args = [swap.get(a, a) for a in args]
    stage.main(args)
    m = json.loads((tmp_path / "c0/metrics.json").read_text())
    assert m == {"pairs": 1, "n": 0, "skipped": {"not_a_worked_task": 1}, "blame": {}, "displacement": {},
                 "displacement_minus_dpo": {}}
    assert (tmp_path / "c0/pairs.png").exists()
    assert "none of the 1 pairs is of a worked task" in report.credit_lines(str(tmp_path / "c0/metrics.json"))[0]
