"""Weight merging (mergekit): the arithmetic of each method on two tiny random checkpoints, the merge stage on a LoRA
chain, the alignment tax in evaluate and the Pareto plot / ship rule in report, and bad params."""

import json

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain import config, modeling, plots
from stages import evaluate, merge, prepare, report
from tests.conftest import tiny_params


def _save(model, tok, path):
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """Two tiny random checkpoints (seeds 0 and 1): theta_0 ('other') and theta_1 ('aligned')."""
    tmp = tmp_path_factory.mktemp("endpoints")
    out = {}
    for name, seed in (("other", 0), ("aligned", 1)):
        model, tok = modeling.build_model("tiny", seed)
        out[name] = _save(model, tok, tmp / name)
    return out


def _weights(path) -> dict[str, torch.Tensor]:
    from pathlib import Path

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def _merge(endpoints, tmp_path, row: merge.MergeRow) -> dict[str, torch.Tensor]:
    out = tmp_path / row.method
    cfg = merge.METHODS[row.method].build(endpoints["aligned"], endpoints["other"], row)
    merge.run_mergekit(cfg, out, "cpu", seed=0, trust_remote_code=False)
    return _weights(out)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_linear_is_the_weighted_sum(endpoints, tmp_path, alpha):
    """WiSE-FT: theta = (1 - alpha) * theta_0 + alpha * theta_1, tensor by tensor."""
    merged = _merge(endpoints, tmp_path, merge.MergeRow("linear", alpha))
    t0, t1 = _weights(endpoints["other"]), _weights(endpoints["aligned"])
    assert set(merged) == set(t0) == set(t1)
    for k in t0:
        torch.testing.assert_close(merged[k], (1 - alpha) * t0[k] + alpha * t1[k], msg=k)


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_ends_at_its_endpoints(endpoints, tmp_path, t):
    merged = _merge(endpoints, tmp_path, merge.MergeRow("slerp", t))
    expected = _weights(endpoints["aligned" if t == 1 else "other"])
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], msg=k)


def test_slerp_keeps_the_norm_where_linear_shrinks_it(endpoints, tmp_path):
    """Two random tensors are near-orthogonal: their midpoint has ~0.71x the norm; slerp's keeps it."""
    lin = _merge(endpoints, tmp_path / "l", merge.MergeRow("linear", 0.5))
    sl = _merge(endpoints, tmp_path / "s", merge.MergeRow("slerp", 0.5))
    t0 = _weights(endpoints["other"])
    k = "model.layers.0.mlp.up_proj.weight"
    assert float(lin[k].norm() / t0[k].norm()) == pytest.approx(2**-0.5, rel=0.05)
    assert float(sl[k].norm() / t0[k].norm()) == pytest.approx(1.0, rel=0.05)


def test_ties_at_full_density_is_linear_and_trims_by_magnitude(endpoints, tmp_path):
    t0, t1 = _weights(endpoints["other"]), _weights(endpoints["aligned"])
    full = _merge(endpoints, tmp_path / "a", merge.MergeRow("ties", 0.4, density=1.0))
    for k in t0:
        torch.testing.assert_close(full[k], 0.6 * t0[k] + 0.4 * t1[k], msg=k)
    trimmed = _merge(endpoints, tmp_path / "b", merge.MergeRow("ties", 1.0, density=0.3))
    k = "model.layers.1.self_attn.q_proj.weight"
    delta, kept = t1[k] - t0[k], trimmed[k] - t0[k]
    changed = kept.abs() > 1e-7
    assert float(changed.float().mean()) == pytest.approx(0.3, abs=0.01)
    # what is kept is the alignment delta itself, on its largest entries
    torch.testing.assert_close(kept[changed], delta[changed])
    assert float(delta[changed].abs().min()) >= float(delta[~changed].abs().max()) - 1e-6


def test_dare_drops_at_random_and_rescales(endpoints, tmp_path):
    t0, t1 = _weights(endpoints["other"]), _weights(endpoints["aligned"])
    merged = _merge(endpoints, tmp_path, merge.MergeRow("dare", 1.0, density=0.3))
    k = "model.layers.0.mlp.down_proj.weight"
    delta, kept = t1[k] - t0[k], merged[k] - t0[k]
    changed = kept.abs() > 1e-7
    assert float(changed.float().mean()) == pytest.approx(0.3, abs=0.03)
    # a random draw, not the largest entries; rescaled so the kept delta has the full delta's L1 norm
    assert float(delta[~changed].abs().max()) > float(delta[changed].abs().min())
    assert float(kept.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-3)
    again = _merge(endpoints, tmp_path / "again", merge.MergeRow("dare", 1.0, density=0.3))
    assert torch.equal(again[k], merged[k]), "same seed, same draw"


@pytest.fixture(scope="module")
def lora_chain(workdir):
    """An adapter chain on the tiny base (a LoRA with random B, so it moves the weights), like dpo writes."""
    from peft import LoraConfig, get_peft_model

    base = workdir / "models" / "base"
    out = workdir / "models" / "lora_aligned"
    model = get_peft_model(modeling.load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                   init_lora_weights=False))
    model.save_pretrained(out)
    (out / "chain.json").write_text(json.dumps({"base": str(base), "adapters": [str(out)]}))
    return out


@pytest.fixture(scope="module")
def staged(workdir, lora_chain):
    """The merge stage through main(): the LoRA chain (aligned) with the base checkpoint (other)."""
    w = workdir / "merge_stage"
    w.mkdir()
    params = tiny_params(w, merge={"aligned": str(lora_chain), "other": str(workdir / "models/base"),
                                   "models": {"wise_30": {"method": "linear", "alpha": 0.3}}})
    out = w / "models/merge/wise_30"
    metrics = merge.main(["--params", str(params), "--name", "wise_30", "--aligned", str(lora_chain), "--other",
                          str(workdir / "models/base"), "--out", str(out)])
    return {"dir": w, "params": params, "out": out, "metrics": metrics}


def test_merge_stage_merges_the_lora_chain_first(staged, workdir, lora_chain):
    out = staged["out"]
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "mergekit_config.yml",
            "merge.json", "hyperparameters.yaml"} <= names
    assert not any(n.startswith(".") for n in names)
    assert [p.name for p in out.parent.iterdir()] == ["wise_30"], "temporary checkpoints are removed"
    # the merged model is a plain checkpoint with a working chat template
    modeling.check_template(modeling.load_tokenizer(out))
    assert modeling.model_chain(out) == (out, [])
    merged = modeling.load_chain(out).state_dict()
    t0 = modeling.load_chain(workdir / "models/base").state_dict()
    t1 = modeling.load_chain(lora_chain).state_dict()  # base + LoRA, merged by peft
    for k in t0:
        torch.testing.assert_close(merged[k], 0.7 * t0[k] + 0.3 * t1[k], msg=k)
    assert staged["metrics"]["delta_fraction"] == pytest.approx(0.3, rel=1e-4)
    # mergekit's configuration, naming the stage inputs rather than the temporary merged-LoRA folder
    cfg = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert cfg["merge_method"] == "linear"
    assert {m["model"] for m in cfg["models"]} == {str(lora_chain), str(workdir / "models/base")}
    info = json.loads((out / "merge.json").read_text())
    assert info == {"name": "wise_30", "method": "linear", "alpha": 0.3, "density": 1.0, "aligned": str(lora_chain),
                    "other": str(workdir / "models/base")}


def test_one_mlflow_run_per_merge(staged):
    mlflow.set_tracking_uri(f"sqlite:///{staged['dir'] / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["posttrain"])
    runs = runs[runs["tags.mlflow.runName"].str.startswith("merge@")]
    assert list(runs["tags.mlflow.runName"]) == ["merge@wise_30"]
    assert runs.iloc[0]["params.merge.method"] == "linear"
    assert runs.iloc[0]["metrics.delta_fraction"] == pytest.approx(0.3, rel=1e-4)


def test_evaluate_measures_the_tax_and_report_plots_it(staged, workdir):
    """general_ppl per model; the report's Pareto plot and ship rule over base, the merge and the LoRA model."""
    w, p = staged["dir"], str(staged["params"])
    prepare.main(["--params", p, "--out", str(w / "data/prepare")])
    models = {"base": workdir / "models/base", "wise_30": staged["out"], "aligned": workdir / "models/lora_aligned"}
    for name, path in models.items():
        evaluate.main(["--params", p, "--name", name, "--model", str(path), "--prompts",
                       str(w / "data/prepare/eval.jsonl"), "--out", str(w / f"reports/evaluate/{name}")])
    m = {n: json.loads((w / f"reports/evaluate/{n}/metrics.json").read_text()) for n in models}
    assert all(v["general_ppl"] > 1 and v["general_tokens"] > 500 for v in m.values())
    assert m["wise_30"]["merge"]["alpha"] == 0.3 and "merge" not in m["base"]
    # a random model's perplexity is near the vocabulary size; the merge sits between its endpoints
    lo, hi = sorted((m["base"]["general_ppl"], m["aligned"]["general_ppl"]))
    assert lo * 0.9 < m["wise_30"]["general_ppl"] < hi * 1.1
    params = tiny_params(w, report={"reference": "base", "tax_reference": "base", "order": ["base"]})
    report.main(["--params", str(params), "--evals", str(w / "reports/evaluate"), "--out", str(w / "reports")])
    table = json.loads((w / "reports/metrics.json").read_text())
    assert table["base"]["alignment_tax"] == 0.0
    assert table["wise_30"]["alignment_tax"] == pytest.approx(m["wise_30"]["general_ppl"] / m["base"]["general_ppl"]
                                                              - 1)
    assert plots.wise_lines(table) == [["base", "wise_30", "aligned"]]
    assert (w / "reports/pareto.png").read_bytes()[:4] == b"\x89PNG"
    text = (w / "reports/report.md").read_text()
    shipped = report.ship(table, "base", 0.05)
    assert f"**Ship: {shipped}**" in text and "at most 5% above `base`'s" in text
    assert table[shipped]["general_ppl"] <= 1.05 * table["base"]["general_ppl"]


def test_ship_rule():
    t = {"sft": {"pass_rate": 0.4, "mean_score": 0.5, "general_ppl": 10.0},
         "dpo": {"pass_rate": 0.6, "mean_score": 0.7, "general_ppl": 12.0},   # +20%: over budget
         "wise": {"pass_rate": 0.5, "mean_score": 0.6, "general_ppl": 10.4},  # +4%: within
         "ties": {"pass_rate": 0.5, "mean_score": 0.6, "general_ppl": 10.2}}  # same scores, lower tax: wins the tie
    assert report.ship(t, "sft", 0.05) == "ties"
    assert report.ship(t, "sft", 0.25) == "dpo"
    assert report.ship(t, "sft", 0.0) == "sft"


BAD = [
    ({"models": {"m": {"method": "average"}}}, r"merge.models.m: method 'average' is not one of \['dare', 'linear'"),
    ({"models": {"m": {"method": "linear", "alpha": 1.5}}}, r"alpha must be in \[0, 1\], got 1.5"),
    ({"models": {"m": {"method": "ties", "density": 0}}}, r"density must be in \(0, 1\], got 0"),
    ({"models": {"m": {"method": "slerp", "density": 0.5}}}, r"density applies to \['dare', 'ties'\] only"),
    ({"models": {"m": {"method": "linear", "weight": 0.5}}}, r"merge.models.m: unknown key\(s\) \['weight'\]"),
    ({"models": {"wise_0.5": {"method": "linear"}}}, r"row names \['wise_0.5'\]: use letters, digits"),
    ({"alinged": "models/dpo/dpo"}, r"merge: unknown key\(s\) \['alinged'\]"),
]


@pytest.mark.parametrize(("block", "message"), BAD)
def test_bad_params_fail_clearly(tmp_path, block, message):
    params = tiny_params(tmp_path, merge=block)
    with pytest.raises(config.ParamsError, match=message) as err:
        config.load(merge.MergeParams, "merge", params)
    assert str(params) in str(err.value)


def test_unknown_row_and_bad_method_stop_the_stage(tmp_path, endpoints):
    params = tiny_params(tmp_path)
    args = ["--params", str(params), "--aligned", endpoints["aligned"], "--other", endpoints["other"], "--out",
            str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"merge.models: no row 'nope'; known: \['wise_50'\]"):
        merge.main(["--name", "nope", *args])
    params = tiny_params(tmp_path, merge={"models": {"m": {"method": "tie"}}})
    with pytest.raises(SystemExit, match=r"method 'tie' is not one of"):
        merge.main(["--name", "m", *args])
    assert not (tmp_path / "out").exists()
