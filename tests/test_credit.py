"""Blame localisation and shared-prefix displacement on hand-computed numbers; token spans on the real SmolLM2
tokenizer (the tiny model's), aligned with `preference.encode`."""

import copy
import random
from pathlib import Path

import pytest
import yaml

from posttrain import credit, modeling, preference, tasks

ADD3 = {"type": "chain_add", "operands": [55, 97, 23]}
PROMPT = [{"role": "user", "content": "Add 55, 97 and 23. Show each running total on its own line, then 'Answer: N'."}]
REJECTED = "55 + 97 = 152\n152 + 23 = 165\nAnswer: 165"


@pytest.fixture(scope="module")
def tok():
    return modeling.build_model("tiny", 0)[1]


def _pair(rejected: str, pid: str = "p0") -> dict:
    return {"id": pid, "prompt": PROMPT, "chosen": tasks.solve(ADD3), "rejected": rejected}


def test_token_spans_tile_the_response(tok):
    """SmolLM2 splits digits one per token; the end-of-turn tokens (<|im_end|>, "\\n") lie outside the text."""
    spans = credit.token_spans(tok, _pair(REJECTED), "rejected", max_len=256)
    pieces = [REJECTED[s[0] : s[1]] if s else None for s in spans]
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
    pairs = [_pair(REJECTED, "w"), {"id": "n", "prompt": PROMPT, "chosen": "85", "rejected": "86"}]
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


# --- bench/long_answers.py: its pure parts (the benchmark itself trains for hours) --------------------------------

def test_bench_method_names_and_params(tmp_path):
    from bench import long_answers as la

    assert la.method_names([1.0, 2.5]) == ["dpo", "rpo", "tgdpo", "tgdpo_cancel", "tgdpo_token_x1",
                                           "tgdpo_cancel_token_x1", "tgdpo_token_x2.5", "tgdpo_cancel_token_x2.5",
                                           "step_dpo"]
    assert la.method_rows([2.5])["tgdpo_cancel_token_x2.5"] == la.Method("tgdpo_cancel_token", "token", 2.5)
    assert la.prompt_of("chain_add-00012.step1.3") == "chain_add-00012" == la.prompt_of("chain_add-00012")
    params = {"common": {"seed": 0, "mlflow_uri": "sqlite:///mlflow.db", "mlflow_experiment": "posttrain"},
              "token_reward": {"aggregator": "average", "tau": 1.0}, "dpo": {"defaults": {"seed": 0}}}
    got = la.bench_params(tmp_path, params, 2, token_reward={"aggregator": "soft_min"})
    # the training seed moves; common.seed (the data: the same pairs for every seed) does not
    assert got["common"] == {"seed": 0, "mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db",
                             "mlflow_experiment": "bench-long-answers"}
    assert got["dpo"]["defaults"]["seed"] == 2
    assert got["token_reward"] == {"aggregator": "soft_min", "tau": 1.0}
    assert params["dpo"]["defaults"]["seed"] == 0 and params["token_reward"]["aggregator"] == "average"  # a copy


def test_bench_end_scores():
    from bench import long_answers as la

    specs = {"w": ADD3, "v": ADD3, "n": {"type": "number", "answer": 85}}
    answers = [{"id": "w", "passed": True, "response": tasks.solve(ADD3)},
               {"id": "v", "passed": False, "response": "55 + 97 = 142\n142 + 23 = 165\nAnswer: 165"},
               {"id": "n", "passed": True, "response": "85"}]
    assert la.end_scores(answers, specs) == {"w": {"pass": 1.0, "step_score": 1.0},
                                             "v": {"pass": 0.0, "step_score": pytest.approx(2 / 3)}}


def test_bench_compare_pairs_by_prompt_and_seed():
    """Differences per seed: seed 0 a 1, b 0, c 0 (mean 1/3); seed 1 a 1, b 1, c 0 (mean 2/3). Averaged over seeds
    per prompt: a 1, b 0.5, c 0, mean 0.5. Over seeds: mean 0.5, half-width t(1) x stdev / sqrt(2) = 12.706 / 6."""
    from bench import long_answers as la

    method = {0: {"a": 1.0, "b": 0.0, "c": 1.0}, 1: {"a": 1.0, "b": 1.0, "c": 0.0}}
    base = {0: {"a": 0.0, "b": 0.0, "c": 1.0}, 1: {"a": 0.0, "b": 0.0, "c": 0.0}}
    got = la.compare(method, base, n_boot=200)
    assert got["mean"] == pytest.approx(0.5) and got["prompts"] == 3
    assert got["per_seed"] == pytest.approx({0: 1 / 3, 1: 2 / 3})
    assert got["seeds"]["ci"] == pytest.approx([0.5 - 12.706 / 6, 0.5 + 12.706 / 6])
    assert 0.0 <= got["ci_prompts"][0] <= got["ci_prompts"][1] <= 1.0
    alone = la.compare(method, None, n_boot=200)  # the method's own figure: per prompt a 1, b 0.5, c 0.5
    assert alone["mean"] == pytest.approx(2 / 3)
    assert la.goal_met({"mean": 0.03, "ci_prompts": [0.001, 0.06]})
    assert not la.goal_met({"mean": 0.029, "ci_prompts": [0.001, 0.06]})
    assert not la.goal_met({"mean": 0.05, "ci_prompts": [0.0, 0.1]})


def test_bench_rows_are_the_long_profile_rows():
    """Every method trains as a row of profiles/long.yaml (so the pipeline's seed reuses them all), each row's
    params resolve, and the rows are the ones issue 22 compares."""
    from bench import long_answers as la
    from stages import dpo
    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "profiles/long.yaml").read_text())
    assert set(la.VARIANTS) == set(params["dpo"]["variants"])
    assert all(la.same_row(params, v) for v in la.VARIANTS)
    rows = dpo.DpoParams(variants=la.VARIANTS)
    got = {m: dpo.resolve(rows, r.variant, "bench") for m, r in la.method_rows([1.0]).items()}
    assert {m: (v.loss, v.pairs, getattr(v.loss_params, "cancel_shared_prefix", None)) for m, v in got.items()} == {
        "dpo": ("dpo", "response", None), "rpo": ("rpo", "response", None), "tgdpo": ("tgdpo", "response", False),
        "tgdpo_cancel": ("tgdpo", "response", True), "tgdpo_token_x1": ("tgdpo", "response", False),
        "tgdpo_cancel_token_x1": ("tgdpo", "response", True), "step_dpo": ("dpo", "step", None)}
    params["dpo"]["variants"]["rpo"]["nll_weight"] = 1.0  # the paper's weight: not the bench's row any more
    assert not la.same_row(params, "rpo") and not la.same_row(params, "absent")


def test_bench_reuses_the_pipeline_models_of_its_own_seed(tmp_path):
    from bench import long_answers as la

    for name in ("dpo", "tgdpo", "tgdpo_token", "step_dpo"):
        (tmp_path / "models/dpo" / name).mkdir(parents=True)
    params = {"dpo": {"defaults": {"seed": 0}, "variants": copy.deepcopy(la.VARIANTS)},
              "guidance": {"sources": {"token_reward": {"scale": 1.0}, "dpo": {"model": "models/dpo/dpo"}}}}
    assert la.reusable(tmp_path, params, 0, [1.0, 4.0]) == {"dpo": "dpo", "tgdpo": "tgdpo",
                                                           "tgdpo_token_x1": "tgdpo_token", "step_dpo": "step_dpo"}
    assert la.reusable(tmp_path, params, 0, [4.0]) == {"dpo": "dpo", "tgdpo": "tgdpo", "step_dpo": "step_dpo"}
    assert la.reusable(tmp_path, params, 1, [1.0]) == {}
    params["dpo"]["variants"]["dpo"]["beta"] = 0.2  # its dpo is another row: neither it nor what it guided is reused
    assert la.reusable(tmp_path, params, 0, [1.0]) == {"tgdpo_token_x1": "tgdpo_token", "step_dpo": "step_dpo"}


def test_pick_examples_with_a_shared_prefix():
    rows = [{"id": "c", "wrong": (14, 28)}, {"id": "a", "wrong": (0, 13)}, {"id": "b", "wrong": None},
            {"id": "d", "wrong": (29, 40)}, {"id": "e", "wrong": (5, 9)}]
    assert [r["id"] for r in credit.pick_examples(rows, 2)] == ["c", "d"]


def test_bench_refuses_a_repo_without_enough_worked_prompts(tmp_path):
    import json
    import shutil

    from bench import long_answers as la

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "profiles/long.yaml", tmp_path / "params.yaml")
    (tmp_path / "models/sft").mkdir(parents=True)
    (tmp_path / "models/sft/chain.json").write_text(json.dumps({"base": str(tmp_path / "models/base"),
                                                                "adapters": []}))
    rows = [{"id": f"w{i}", "task": "chain_add", "messages": PROMPT, "verifier": ADD3} for i in range(2)]
    (tmp_path / "data/prepare").mkdir(parents=True)
    for split in ("eval", "train"):
        (tmp_path / f"data/prepare/{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="names .*models/base, not found"):
        la.main(["--repo", str(tmp_path)])
    (tmp_path / "models/base").mkdir()
    with pytest.raises(SystemExit, match="2 held-out prompts of worked tasks, --min-eval 500"):
        la.main(["--repo", str(tmp_path)])
    (tmp_path / "data/label").mkdir(parents=True)
    (tmp_path / "data/label/prefs.jsonl").write_text(json.dumps(_pair(REJECTED, "w0")) + "\n")
    with pytest.raises(SystemExit, match="1 response-level pairs, --min-pairs 400: raise prepare.n_train"):
        la.main(["--repo", str(tmp_path), "--min-eval", "2"])
    with pytest.raises(SystemExit, match="no step pairs for step_dpo"):
        la.main(["--repo", str(tmp_path), "--min-eval", "2", "--min-pairs", "1"])


def test_bench_run_seed_trains_each_method_as_its_row(tmp_path, monkeypatch):
    """run_seed's wiring, with the stages replaced by recorders: each method's dpo row, guidance folder and
    reference folder (step_dpo's with the step cache), and its training metrics kept."""
    from bench import long_answers as la

    calls = []

    def stage(name):
        def main(argv):
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True)
            calls.append((name, {argv[i]: argv[i + 1] for i in range(0, len(argv), 2)}))
            return {"pairs": len(calls)}
        return main

    for module in (la.dpo, la.guidance, la.evaluate):
        monkeypatch.setattr(module, "main", stage(module.__name__))
    params = {"common": {"mlflow_uri": "sqlite:///mlflow.db"}, "dpo": {"defaults": {"seed": 0}},
              "guidance": {"sources": {}}}
    learned = {2.0: tmp_path / "token_x2/rhat.jsonl"}
    run = la.run_seed(tmp_path, params, 1, [2.0], learned, tmp_path / "step_ref", tmp_path / "work")
    trained = {a["--out"].rsplit("/", 1)[1]: (a["--variant"], Path(a["--guidance"]).name,
                                              Path(a["--reference"]).name)
               for name, a in calls if name == "stages.dpo"}
    assert trained == {"dpo": ("dpo", "reference", "reference"), "rpo": ("rpo", "reference", "reference"),
                       "tgdpo": ("tgdpo", "dpo", "reference"), "tgdpo_cancel": ("tgdpo_cancel", "dpo", "reference"),
                       "tgdpo_token_x2": ("tgdpo_token", "token_x2", "reference"),
                       "tgdpo_cancel_token_x2": ("tgdpo_cancel_token", "token_x2", "reference"),
                       "step_dpo": ("step_dpo", "reference", "step_ref")}
    assert all(a["--step-prefs"] == f"{tmp_path}/data/label/step_prefs.jsonl" for n, a in calls if n == "stages.dpo")
    assert [n for n, _ in calls].count("stages.evaluate") == 7 and set(run["methods"]) == set(trained)
    assert run["trained"]["dpo"] == {"pairs": 1} and run["dpo_rhat"] == tmp_path / "work/guidance/dpo/rhat.jsonl"


def test_bench_step_dpo_reads_the_step_pairs(workdir, tmp_path):
    """step_dpo's wiring: with no step cache in the pipeline's reference folder the bench makes one with
    --step-prefs, and step_dpo's run trains on label's 5 step pairs (not its 3 response-level ones) through it."""
    import json

    from bench import long_answers as la
    from posttrain import io
    from tests.conftest import RESPONSE_PAIRS, STEP_PAIRS, tiny_params

    repo, work = tmp_path / "repo", tmp_path / "work"
    (repo / "models").mkdir(parents=True)
    (repo / "models/sft").symlink_to(workdir / "models/base")
    io.write_jsonl(repo / "data/label/prefs.jsonl", RESPONSE_PAIRS)
    io.write_jsonl(repo / "data/label/step_prefs.jsonl", STEP_PAIRS)
    params = yaml.safe_load(tiny_params(tmp_path).read_text())
    p = la.write_params(work / "params.yaml", la.bench_params(repo, params, 0, dpo={"variants": la.VARIANTS}))
    ref = la.step_reference(repo, p, work)
    assert ref == work / "reference" and (ref / "step_logps.jsonl").exists()
    out, record = work / "models/step_dpo", work / "train/step_dpo.json"
    got = la._train(la.train_argv(p, "step_dpo", repo, ref, ref, out), out, record)
    assert got["pairs"] == 5 and json.loads(record.read_text()) == got
    assert la._train([], out, record) == got  # trained: read back, not re-run
    (repo / "data/reference").mkdir(parents=True)
    (repo / "data/reference/step_logps.jsonl").touch()  # the pipeline's reference ran with --step-prefs
    assert la.step_reference(repo, p, work) == repo / "data/reference"


# --- the credit stage, on the tiny model: hand-built guidance, a policy equal to the reference and one that is not --


def _worked_pairs(n: int) -> tuple[list[dict], list[dict]]:
    """Prompt rows (with verifiers) and pairs of worked tasks whose rejected answer slips at step 1 (not the first
    line), so a token before the wrong step exists in each."""
    rng, prompts, pairs = random.Random(3), [], []
    for i in range(n):
        row = tasks.make_prompt("chain_add" if i % 2 else "mul_steps", rng) | {"id": f"w{i}"}
        prompts.append(row)
        pairs.append({"id": row["id"], "prompt": row["messages"], "chosen": tasks.solve(row["verifier"]),
                      "rejected": tasks.near_miss(row["verifier"], rng, step=1)})
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
    io.write_jsonl(tmp_path / "train.jsonl", prompts)
    io.write_jsonl(tmp_path / "prefs.jsonl", pairs)
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
    args = ["--params", p, "--model", str(base), "--prefs", str(tmp_path / "prefs.jsonl"), "--prompts",
            str(tmp_path / "train.jsonl"), "--reference", str(tmp_path / "reference"), "--guidance",
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
    plain = [{"id": "a0", "prompt": PROMPT, "chosen": "85", "rejected": "86"}]
    io.write_jsonl(tmp_path / "plain.jsonl", plain)
    io.write_jsonl(tmp_path / "plain_train.jsonl", [tasks.make_prompt("add", random.Random(0)) | {"id": "a0"}])
    swap = {str(tmp_path / a): str(tmp_path / b) for a, b in (("prefs.jsonl", "plain.jsonl"), ("policies", "absent"),
                                                             ("train.jsonl", "plain_train.jsonl"), ("credit", "c0"))}
    args = [swap.get(a, a) for a in args]
    stage.main(args)
    m = json.loads((tmp_path / "c0/metrics.json").read_text())
    assert m == {"pairs": 1, "n": 0, "skipped": {"not_a_worked_task": 1}, "blame": {}, "displacement": {},
                 "displacement_minus_dpo": {}}
    assert (tmp_path / "c0/pairs.png").exists()
    assert "none of the 1 pairs is of a worked task" in report.credit_lines(str(tmp_path / "c0/metrics.json"))[0]
