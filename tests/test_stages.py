"""Every stage on the tiny profile, called through `main([...])` into a scratch dir, in DAG order."""

import json

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain import io, modeling, preference, reward, stats, tasks, tracking
from stages import (
    dpo,
    evaluate,
    generate,
    guidance,
    label,
    prepare,
    reference,
    report,
    reward_model,
    sft,
    token_reward,
)
from tests.conftest import tiny_params

VARIANTS = {
    "dpo": {"loss": "dpo", "guidance": "data/reference"},
    "rpo": {"loss": "rpo", "guidance": "data/reference"},
    "tgdpo": {"loss": "tgdpo", "guidance": "data/guidance/dpo"},
    "tgdpo_token": {"loss": "tgdpo", "guidance": "data/guidance/token_reward"},
    "tgdpo_cancel": {"loss": "tgdpo", "guidance": "data/guidance/dpo", "cancel_shared_prefix": True},
    "ipo": {"loss": "ipo", "guidance": "data/reference"},
    "simpo": {"loss": "simpo", "guidance": "data/reference"},
    "orpo": {"loss": "orpo", "guidance": "data/reference"},
    "kto": {"loss": "kto", "guidance": "data/reference"},
    "dpop": {"loss": "dpop", "guidance": "data/reference"},
}
SOURCES = {"dpo": {"kind": "dpo", "model": "models/dpo/dpo"},
           "token_reward": {"kind": "token_reward", "model": "models/token_reward"}}


@pytest.fixture(scope="module")
def pipeline(workdir):
    """Run every stage once, in DAG order, with every preference loss as a variant."""
    w = workdir
    p = str(tiny_params(w, dpo={"variants": VARIANTS}, guidance={"sources": SOURCES}))
    d = lambda rel: str(w / rel)  # noqa: E731
    out = {"params": p, "dir": w}
    out["prepare"] = prepare.main(["--params", p, "--out", d("data/prepare")])
    out["sft"] = sft.main(["--params", p, "--model", d("models/base"), "--data", d("data/prepare/sft.jsonl"),
                           "--out", d("models/sft")])
    out["generate"] = generate.main(["--params", p, "--model", d("models/sft"), "--prompts",
                                     d("data/prepare/train.jsonl"), "--out", d("data/samples.jsonl"),
                                     "--rm-prompts", d("data/prepare/rm_prompts.jsonl"), "--rm-out",
                                     d("data/rm_samples.jsonl")])
    out["reward_model"] = reward_model.main(["--params", p, "--model", d("models/sft"), "--prefs",
                                             d("data/prepare/rm_prefs.jsonl"), "--rm-samples",
                                             d("data/rm_samples.jsonl"), "--samples", d("data/samples.jsonl"),
                                             "--out", d("models/reward_model"), "--metrics",
                                             d("reports/reward_model.json")])
    out["label"] = label.main(["--params", p, "--samples", d("data/samples.jsonl"), "--reward-model",
                               d("models/reward_model"), "--out", d("data/label")])
    prefs = ["--prefs", d("data/label/prefs.jsonl")]
    out["reference"] = reference.main(["--params", p, "--model", d("models/sft"), *prefs, "--out",
                                       d("data/reference")])
    out["token_reward"] = token_reward.main(["--params", p, "--model", d("models/sft"), *prefs, "--out",
                                             d("models/token_reward"), "--metrics", d("reports/token_reward.json")])
    order = ["dpo", "guidance@dpo", "guidance@token_reward"] + [v for v in VARIANTS if v != "dpo"]
    for step in order:
        if step.startswith("guidance@"):
            name = step.split("@")[1]
            out[step] = guidance.main(["--params", p, "--name", name, "--model", d(SOURCES[name]["model"]), *prefs,
                                       "--reference", d("data/reference"), "--out", d(f"data/guidance/{name}")])
            continue
        out[f"dpo@{step}"] = dpo.main(["--params", p, "--variant", step, "--model", d("models/sft"), *prefs,
                                       "--reference", d("data/reference"), "--guidance", d(VARIANTS[step]["guidance"]),
                                       "--out", d(f"models/dpo/{step}")])
    for name, model in (("base", "models/base"), ("sft", "models/sft"), ("dpo", "models/dpo/dpo")):
        out[f"evaluate@{name}"] = evaluate.main(["--params", p, "--name", name, "--model", d(model), "--prompts",
                                                 d("data/prepare/eval.jsonl"), "--out", d(f"reports/evaluate/{name}")])
    out["report"] = report.main(["--params", p, "--evals", d("reports/evaluate"), "--label-stats",
                                 d("data/label/stats.json"), "--out", d("reports")])
    return out


def test_prepare_splits_are_disjoint_and_demos_correct(pipeline):
    d = pipeline["dir"] / "data/prepare"
    assert sorted(f.name for f in d.iterdir()) == ["eval.jsonl", "heldout_prefs.jsonl", "prefs.jsonl",
                                                   "rm_prefs.jsonl", "rm_prompts.jsonl", "sft.jsonl", "stats.json",
                                                   "train.jsonl"]
    assert (d / "prefs.jsonl").read_text() == (d / "heldout_prefs.jsonl").read_text() == ""  # on-policy pairs
    train, ev = io.read_jsonl(d / "train.jsonl", "prompts"), io.read_jsonl(d / "eval.jsonl", "prompts")
    demos = io.read_jsonl(d / "sft.jsonl", "sft")
    rm_prompts = io.read_jsonl(d / "rm_prompts.jsonl", "prompts")
    rm_pairs = io.read_jsonl(d / "rm_prefs.jsonl", "prefs")
    assert (len(train), len(ev), len(demos), len(rm_prompts)) == (12, 10, 12, 6)
    assert all(r["verifier"] for r in rm_prompts)
    texts = [r["messages"][0]["content"] for r in train + ev + rm_prompts] + [
        r["messages"][0]["content"] for r in demos] + [r["prompt"][0]["content"] for r in rm_pairs]
    assert len(set(texts)) == len(texts), "a prompt appears in two splits"
    assert {r["task"] for r in train + ev} <= {"add", "word_count", "include"}
    # demos are the solver's: each scores 1.0 under the verifier of the prompt it answers
    assert all(tasks.score(r["verifier"], r["messages"][-1]["content"]) == 1.0 for r in demos)
    counts = {k: pipeline["prepare"][k] for k in ("n_train", "n_eval", "n_sft")}
    assert counts == {"n_train": 12, "n_eval": 10, "n_sft": 12}
    assert pipeline["prepare"]["peak_rss_mb"] > 0


def test_prepare_is_deterministic(workdir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        prepare.main(["--params", str(workdir / "params.yaml"), "--out", str(out)])
    for name in ("train.jsonl", "eval.jsonl", "sft.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def _lora_b_norm(path) -> float:
    weights = load_file(str(path / "adapter_model.safetensors"))
    return sum(float(v.norm()) for k, v in weights.items() if "lora_B" in k)


def test_sft_trains_an_adapter(pipeline):
    out = pipeline["dir"] / "models/sft"
    assert {"adapter_model.safetensors", "adapter_config.json", "chain.json", "hyperparameters.yaml"} <= {
        f.name for f in out.iterdir()}
    # LoRA B starts at zero: a non-zero B means the optimiser moved the parameters
    assert _lora_b_norm(out) > 0
    assert json.loads((out / "chain.json").read_text())["adapters"] == [str(out)]
    assert pipeline["sft"]["steps"] == 3  # 12 demos / batch 4 * 1 epoch
    assert not (pipeline["dir"] / "models/sft.ckpt").exists(), "checkpoints are removed after a finished run"
    hyper = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert hyper["sft"]["seed"] == 0 and hyper["git_revision"] == tracking.git_revision() != "unknown"


def test_generate_and_label(pipeline):
    rows = io.read_jsonl(pipeline["dir"] / "data/samples.jsonl", "samples")
    assert len(rows) == 12 and all(len(r["samples"]) == 4 for r in rows)
    pairs = io.read_jsonl(pipeline["dir"] / "data/label/prefs.jsonl", "prefs")
    stats = json.loads((pipeline["dir"] / "data/label/stats.json").read_text())
    assert stats["pairs"] == len(pairs) == pipeline["label"]["pairs"]
    assert stats["pairs"] + sum(v for k, v in stats["dropped"].items() if k != "empty_response") == 12
    for p in pairs:
        assert p["chosen_score"] > p["rejected_score"] and p["chosen"] != p["rejected"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_changes_the_policy(pipeline, variant):
    out = pipeline["dir"] / "models/dpo" / variant
    assert _lora_b_norm(out) > 0, "LoRA B starts at zero: training must have moved it"
    chain = json.loads((out / "chain.json").read_text())
    assert chain["adapters"] == [str(pipeline["dir"] / "models/sft"), str(out)]
    metrics = pipeline[f"dpo@{variant}"]
    assert metrics["pairs"] == pipeline["label"]["pairs"]
    assert "final_logps_chosen" in metrics and "final_logps_rejected" in metrics  # likelihood displacement watch
    if variant != "dpo":  # same seed, pairs and order: only the loss can set the two apart
        mine = load_file(str(out / "adapter_model.safetensors"))
        plain = load_file(str(pipeline["dir"] / "models/dpo/dpo/adapter_model.safetensors"))
        assert any(not torch.equal(mine[k], plain[k]) for k in plain), f"{variant} trained exactly as dpo did"


def test_dpo_merged_weights_differ_from_sft(pipeline):
    sft_model = modeling.load_chain(pipeline["dir"] / "models/sft")
    dpo_model = modeling.load_chain(pipeline["dir"] / "models/dpo/dpo")
    diffs = [float((a - b).abs().max()) for a, b in zip(sft_model.parameters(), dpo_model.parameters(), strict=True)]
    assert max(diffs) > 0


def test_reference_cache_matches_a_fresh_forward(pipeline):
    """The cached per-token reference log-probs are what the SFT model gives, token for token."""
    from posttrain import preference

    w = pipeline["dir"]
    cache = preference.read_token_values(w / "data/reference/logps.jsonl")
    pairs = io.read_jsonl(w / "data/label/prefs.jsonl", "prefs")
    tok = modeling.load_tokenizer(w / "models/base", padding_side="right")
    rows, _ = preference.encoded_rows(tok, pairs[:2], 96, "prefs")
    model = modeling.load_chain(w / "models/sft")
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
        logps = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(-1)
        n = len(row["chosen_ids"])
        torch.testing.assert_close(torch.tensor(cache[row["id"]]["chosen"]), logps[-n:].detach(), atol=1e-4,
                                   rtol=1e-4)


def test_dpo_guidance_is_the_induced_reward(pipeline):
    """guidance@dpo r_hat = log pi_dpo - log pi_ref per token (seed 000's practical recipe)."""
    from posttrain import preference

    w = pipeline["dir"]
    ref = preference.read_token_values(w / "data/reference/logps.jsonl")
    rhat = preference.read_token_values(w / "data/guidance/dpo/rhat.jsonl")
    pairs = io.read_jsonl(w / "data/label/prefs.jsonl", "prefs")
    tok = modeling.load_tokenizer(w / "models/base", padding_side="right")
    (row,), _ = preference.encoded_rows(tok, pairs[:1], 96, "prefs")
    model = modeling.load_chain(w / "models/dpo/dpo")
    ids = torch.tensor([row["prompt_ids"] + row["rejected_ids"]])
    logps = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(-1)
    n = len(row["rejected_ids"])
    expected = logps[-n:].detach() - torch.tensor(ref[row["id"]]["rejected"])
    torch.testing.assert_close(torch.tensor(rhat[row["id"]]["rejected"]), expected, atol=1e-4, rtol=1e-4)
    assert set(rhat) == set(ref)


def test_token_reward_model(pipeline):
    m = pipeline["token_reward"]
    assert {"heldout_accuracy_average", "heldout_accuracy_soft_max", "heldout_accuracy_soft_min"} <= set(m)
    assert m["train_pairs"] + m["heldout_pairs"] == pipeline["label"]["pairs"]
    head = load_file(str(pipeline["dir"] / "models/token_reward/head.safetensors"))
    assert float(head["weight"].abs().sum()) > 0, "the head starts at zero: training must have moved it"
    assert float(head["scale"]) == pytest.approx(m["scale"]) and m["scale"] != 1.0, "the scale starts at 1, learns"
    assert _lora_b_norm(pipeline["dir"] / "models/token_reward/adapter") > 0, "the LoRA adapter trained"
    assert {"heldout_accuracy_average_initial", "heldout_accuracy_soft_min_initial"} <= set(m)
    from posttrain import preference

    rhat = preference.read_token_values(pipeline["dir"] / "data/guidance/token_reward/rhat.jsonl")
    flat = torch.tensor([x for v in rhat.values() for side in ("chosen", "rejected") for x in v[side]])
    assert abs(float(flat.mean())) < 1e-4 and abs(float(flat.std()) - 1) < 1e-3  # standardised, scale 1


def test_reward_model_trains_its_head_and_measures_agreement(pipeline):
    from safetensors.torch import load_file

    w = pipeline["dir"]
    head = load_file(str(w / "models/reward_model/head.safetensors"))
    assert head["weight"].abs().sum() > 0, "the head starts at zero: training must have moved it"
    assert _lora_b_norm(w / "models/reward_model/adapter") > 0, "LoRA B starts at zero: the adapter trained"
    m = pipeline["reward_model"]
    assert float(head["scale"]) == pytest.approx(m["scale"]) and m["scale"] != 1.0  # starts at 1
    assert 0 <= m["heldout_accuracy_initial"] <= 1
    rm_pairs = io.read_jsonl(w / "data/prepare/rm_prefs.jsonl", "prefs")
    ranked, _ = reward_model.ranked_pairs(io.read_jsonl(w / "data/rm_samples.jsonl", "samples"), 0.5)
    assert len(rm_pairs) == m["offline_pairs"] == 16 and m["ranked_pairs"] == len(ranked)
    assert m["train_pairs"] + m["heldout_pairs"] == 16 + len(ranked)
    assert all(p["chosen_score"] > p["rejected_score"] for p in rm_pairs)
    assert 0 <= m["heldout_accuracy"] <= 1 and 0 <= m["verifier_agreement"] <= 1
    # the floor is recomputed from the held-out pairs' rewards of the saved model
    held = reward_model.split_heldout(rm_pairs + ranked, 0.25)[1]
    model, tok = reward.load(w / "models/reward_model", torch.device("cpu"))
    chosen, rejected = reward_model.heldout_rewards(model, tok, held, 96)
    assert reward.threshold(w / "models/reward_model") == m["floor"] == pytest.approx(
        reward.calibrate(chosen, rejected)["threshold"], abs=1e-4)
    assert m["heldout_accuracy"] == reward_model.accuracy(chosen, rejected)
    assert m["agreement_prompts"] == 6


def test_label_with_the_reward_model_as_judge(pipeline, tmp_path):
    """judge: reward_model ranks samples by reward; pairs keep sigma(r_w - r_l) >= min_prob; verifier not needed."""
    from posttrain import reward

    w = pipeline["dir"]
    p = tiny_params(tmp_path, label={"judge": "reward_model", "min_prob": 0.5})
    rows = io.read_jsonl(w / "data/samples.jsonl", "samples")
    no_verifier = tmp_path / "samples.jsonl"
    io.write_jsonl(no_verifier, [r | {"verifier": None} for r in rows])
    out = label.main(["--params", str(p), "--samples", str(no_verifier), "--reward-model",
                      str(w / "models/reward_model"), "--out", str(tmp_path / "label")])
    pairs = io.read_jsonl(tmp_path / "label/prefs.jsonl", "prefs")
    assert out["pairs"] == len(pairs) > 0
    model, tok = reward.load(w / "models/reward_model", torch.device("cpu"))
    for pair in pairs[:3]:
        r_w, r_l = reward.score(model, tok, [pair["prompt"] + [{"role": "assistant", "content": pair[s]}]
                                             for s in ("chosen", "rejected")])
        assert r_w > r_l
        assert pair["chosen_score"] == pytest.approx(r_w, abs=1e-4)
    assert "gold_agreement" not in json.loads((tmp_path / "label/stats.json").read_text())
    # with the verifiers there, the stats say how often the gold verifier orders the kept pairs the same way
    label.main(["--params", str(p), "--samples", str(w / "data/samples.jsonl"), "--reward-model",
                str(w / "models/reward_model"), "--out", str(tmp_path / "gold")])
    stats, verifier = json.loads((tmp_path / "gold/stats.json").read_text()), {r["id"]: r["verifier"] for r in rows}
    gold = [(tasks.score(verifier[q["id"]], q["chosen"]), tasks.score(verifier[q["id"]], q["rejected"]))
            for q in io.read_jsonl(tmp_path / "gold/prefs.jsonl", "prefs")]
    assert stats["gold_agreement"] == pytest.approx(sum(c > r for c, r in gold) / len(gold))
    assert stats["gold_breakdown"] == label.gold_breakdown(gold) and sum(stats["gold_breakdown"].values()) == len(gold)


def test_gold_breakdown_counts_kept_pairs_by_their_gold_scores():
    gold = [(1.0, 0.2), (1.0, 0.0), (0.3, 1.0), (1.0, 1.0), (0.4, 0.1), (0.2, 0.2), (0.1, 0.45)]
    assert label.gold_breakdown(gold) == {"right_over_wrong": 2, "wrong_over_right": 1, "both_right": 1,
                                          "both_wrong_agree": 1, "both_wrong_tie": 1, "both_wrong_reversed": 1}


def test_label_with_the_llm_judge(pipeline, tmp_path):
    """judge: llm scores each sample by its mean probability of beating the others (both orders asked), so a
    prompt's scores average 0.5; no verifier is read."""
    from posttrain import judges

    w = pipeline["dir"]
    p = tiny_params(tmp_path, label={"judge": "llm", "min_prob": 0.5, "llm": {"model": str(w / "models/sft")}})
    rows = [r | {"verifier": None} for r in io.read_jsonl(w / "data/samples.jsonl", "samples")[:4]]
    io.write_jsonl(tmp_path / "samples.jsonl", rows)
    out = label.main(["--params", str(p), "--samples", str(tmp_path / "samples.jsonl"), "--out",
                      str(tmp_path / "label")])
    pairs = io.read_jsonl(tmp_path / "label/prefs.jsonl", "prefs")
    assert out["pairs"] == len(pairs) > 0
    judge = judges.make("llm", llm=judges.LlmJudgeParams(model=str(w / "models/sft")), device=torch.device("cpu"))
    row = next(r for r in rows if r["id"] == pairs[0]["id"])
    scores = judge.scores([row], [row["samples"]])[0]
    assert sum(scores) / len(scores) == pytest.approx(0.5)
    kept = [x for x, text in zip(scores, row["samples"], strict=True) if text.strip()]  # label drops empty ones
    assert pairs[0]["chosen_score"] == pytest.approx(max(kept), abs=1e-5)


def test_shared_prompt_forward_equals_the_concatenated_forward(workdir):
    """pair_logps runs each prompt once (KV cache repeated for both completions): same log-probs and gradients
    as TRL's concatenated [prompt + chosen; prompt + rejected] forward, with prompts of different lengths."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from posttrain import preference

    tok = modeling.load_tokenizer(workdir / "models/base", padding_side="right")
    model = modeling.load_chain(workdir / "models/base")
    pairs = [{"id": str(i), "prompt": [{"role": "user", "content": "What is 1 + 2?" + " Go on." * i}],
              "chosen": "3", "rejected": f"It is {i} or so"} for i in range(3)]
    rows, _ = preference.encoded_rows(tok, pairs, 96, "x")
    plain = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=96)(
        [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
    logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits[:, :-1]
    want = torch.gather(logits.log_softmax(-1), 2, plain["input_ids"][:, 1:, None]).squeeze(-1)
    shift = plain["completion_mask"][:, 1:].bool()
    want.masked_fill(~shift, 0).sum().backward()
    grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    model.zero_grad()
    batch = preference.PairCollator(tok.pad_token_id)([{k: r[k] for k in ("prompt_ids", "chosen_ids",
                                                                          "rejected_ids")} for r in rows])
    assert batch["prompt_mask"].sum(-1).unique().numel() == 3, "prompts of three lengths (left padding)"
    assert batch["prefix_len"] > 5, "the template and question the prompts share run once"
    got = preference.pair_logps(model, batch)
    for i in range(len(rows) * 2):
        n = int(batch["completion_mask"][i].sum())
        assert torch.allclose(got[i, :n], want[i][shift[i]], atol=1e-5)
    got.sum().backward()
    for k, v in model.named_parameters():  # float rounding only: relative to each tensor's largest entry
        assert (v.grad - grads[k]).abs().max() <= 1e-5 * grads[k].abs().max(), k


def test_evaluate_and_report(pipeline):
    w = pipeline["dir"]
    for name in ("base", "sft", "dpo"):
        answers = io.read_jsonl(w / f"reports/evaluate/{name}/answers.jsonl", "answers")
        metrics = json.loads((w / f"reports/evaluate/{name}/metrics.json").read_text())
        assert metrics["n"] == len(answers) == 10
        assert metrics["pass_rate"] == sum(a["passed"] for a in answers) / 10
        # the interval is the percentile bootstrap of these 10 answers with evaluate's resamples and seed
        passed = [float(a["passed"]) for a in answers]
        assert metrics["pass_rate_ci"] == list(stats.bootstrap_ci(passed, 200, 0))
    table = json.loads((w / "reports/metrics.json").read_text())
    assert set(table) == {"base", "sft", "dpo"}
    assert table["sft"]["win_rate_vs_sft"] == 0.5  # against itself every prompt ties
    text = (w / "reports/report.md").read_text()
    assert [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ") and "model" not in ln] == [
        "base", "sft", "dpo"]
    assert (w / "reports/scores.png").read_bytes()[:4] == b"\x89PNG"
    labelled = json.loads((w / "data/label/stats.json").read_text())
    assert f"{labelled['prompts']} prompts sampled, {labelled['pairs']} pairs kept" in text


def test_one_mlflow_run_per_stage(pipeline):
    mlflow.set_tracking_uri(f"sqlite:///{pipeline['dir'] / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["posttrain"])
    names = set(runs["tags.mlflow.runName"])
    assert names == {"base", "prepare", "sft", "generate", "reward_model", "label", "reference", "token_reward",
                     "guidance@dpo",
                     "guidance@token_reward", "evaluate@base", "evaluate@sft", "evaluate@dpo", "report"} | {
        f"dpo@{v}" for v in VARIANTS}
    assert (runs["tags.mlflow.runName"] == "sft").sum() == 1
    sft_run = runs[runs["tags.mlflow.runName"] == "sft"].iloc[0]
    assert sft_run["params.sft.learning_rate"] == "0.001"
    assert sft_run["metrics.train_loss"] > 0
    assert sft_run["tags.git_revision"] == tracking.git_revision() != "unknown"


def test_win_rate_counts_ties_as_half():
    assert stats.win_values([1.0, 0.5, 0.0], [0.5, 0.5, 1.0]) == [1.0, 0.5, 0.0]
    lo, hi = stats.bootstrap_ci([1.0] * 10)
    assert lo == hi == 1.0


def test_perplexity_interval_resamples_responses_not_tokens():
    import math

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
    from tests.conftest import tiny_params

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


def test_shared_prefill_sampling_matches_plain_generate(workdir):
    """Prefilling what the prompts share once, each prompt's own tokens once, and repeating the cache gives the
    tokens generate gives for the repeated, left-padded prompts."""
    from posttrain import sampling

    tok = modeling.load_tokenizer(workdir / "models/base")
    model = modeling.load_chain(workdir / "models/base")
    prompts = [[{"role": "user", "content": "What is 12 + 30?"}], [{"role": "user", "content": "Hi"}]]
    texts = [modeling.render_prompt(tok, p) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for n in (1, 3):
        rows = tok(texts, add_special_tokens=False).input_ids
        shared, width = sampling._generate_shared_prefill(model, rows, tok.pad_token_id, n, **kw)
        plain = model.generate(input_ids=enc.input_ids.repeat_interleave(n, 0),
                               attention_mask=enc.attention_mask.repeat_interleave(n, 0), **kw)
        assert width == enc.input_ids.shape[1] and torch.equal(shared[:, width:], plain[:, width:])


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


def test_generate_samples_the_reward_models_prompts_too(pipeline):
    w = pipeline["dir"]
    prompts = io.read_jsonl(w / "data/prepare/rm_prompts.jsonl", "prompts")
    rows = io.read_jsonl(w / "data/rm_samples.jsonl", "samples")
    assert [r["id"] for r in rows] == [r["id"] for r in prompts] and all(len(r["samples"]) == 4 for r in rows)
    assert pipeline["generate"]["rm_prompts"] == 6 and pipeline["generate"]["samples"] == (12 + 6) * 4


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
