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
    assert [r["id"] for r in ev[:2]] == [f"{ev[0]['task']}-00000", f"{ev[1]['task']}-00001"]  # io.prompt_id
    assert rm_prompts[0]["id"] == f"rmp-{rm_prompts[0]['task']}-00000" and rm_pairs[0]["id"].startswith("rm-")
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
    kept = json.loads((out / "train_metrics.json").read_text())  # beside the model: what a benchmark reads back
    assert "final_logps_chosen" in kept and kept == {k: metrics[k] for k in kept} and "train_runtime_s" not in kept
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


def test_generate_samples_the_reward_models_prompts_too(pipeline):
    w = pipeline["dir"]
    prompts = io.read_jsonl(w / "data/prepare/rm_prompts.jsonl", "prompts")
    rows = io.read_jsonl(w / "data/rm_samples.jsonl", "samples")
    assert [r["id"] for r in rows] == [r["id"] for r in prompts] and all(len(r["samples"]) == 4 for r in rows)
    assert pipeline["generate"]["rm_prompts"] == 6 and pipeline["generate"]["samples"] == (12 + 6) * 4

