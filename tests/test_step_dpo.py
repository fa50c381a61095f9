"""The `step_dpo` row: reference caches label's step pairs beside the response-level ones, and a `pairs: step` row of
dpo trains on exactly those pairs; the rows it cannot train are refused by name."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from posttrain import config, io, preference
from stages import dpo, reference
from tests.conftest import RESPONSE_PAIRS, STEP_PAIRS, tiny_params

ROWS = {"dpo": {"loss": "dpo", "guidance": "data/reference"},
        "step_dpo": {"loss": "dpo", "guidance": "data/reference", "pairs": "step"}}


@pytest.fixture()
def files(workdir, tmp_path):
    params = tiny_params(tmp_path, dpo={"variants": ROWS})
    prefs, steps = tmp_path / "label/prefs.jsonl", tmp_path / "label/step_prefs.jsonl"
    prefs.parent.mkdir()
    io.write_jsonl(prefs, RESPONSE_PAIRS)
    io.write_jsonl(steps, STEP_PAIRS)
    return {"params": str(params), "model": str(workdir / "models/base"), "prefs": str(prefs), "steps": str(steps)}


def _reference(f, out, steps):
    return reference.main(["--params", f["params"], "--model", f["model"], "--prefs", f["prefs"], "--step-prefs",
                           steps, "--out", str(out)])


def _dpo(f, variant, steps, ref, out):
    return dpo.main(["--params", f["params"], "--variant", variant, "--model", f["model"], "--prefs", f["prefs"],
                     "--step-prefs", steps, "--reference", str(ref), "--guidance", str(ref), "--out", str(out)])


def test_step_dpo_row_trains_on_the_step_pairs(files, tmp_path):
    ref = tmp_path / "reference"
    metrics = _reference(files, ref, files["steps"])
    assert (metrics["pairs"], metrics["step_pairs"]) == (3, 5)
    assert sorted(p.name for p in ref.iterdir()) == ["logps.jsonl", "meta.json", "step_logps.jsonl"]
    assert set(preference.read_token_values(ref / "logps.jsonl")) == {p["id"] for p in RESPONSE_PAIRS}
    cached = preference.read_token_values(ref / "step_logps.jsonl")
    assert set(cached) == {p["id"] for p in STEP_PAIRS}
    # the step-1 pairs' prefix sits in the prompt: only the continuation is cached, shorter than the whole answer
    assert len(cached["s0.step1.0"]["chosen"]) < len(cached["s4.step0.1"]["chosen"])

    out = _dpo(files, "step_dpo", files["steps"], ref, tmp_path / "step_dpo")
    assert (out["pairs"], out["steps"]) == (5, 2)  # 5 step pairs (not the 3 response ones), batch_size 4
    lora_b = {k: v for k, v in load_file(str(tmp_path / "step_dpo/adapter_model.safetensors")).items()
              if "lora_B" in k}
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b.values())  # B starts at zero: it trained


def test_reference_without_step_pairs_writes_no_step_cache(files, tmp_path):
    ref = tmp_path / "reference"
    metrics = _reference(files, ref, str(tmp_path / "label/absent.jsonl"))  # label.step_pairs false: no file
    assert sorted(p.name for p in ref.iterdir()) == ["logps.jsonl", "meta.json"]
    assert metrics["pairs"] == 3 and "step_pairs" not in metrics


def test_step_rows_that_cannot_train_are_refused(files, tmp_path):
    common, params = config.load(dpo.DpoParams, "dpo", files["params"])
    assert dpo.resolve(params, "dpo", "p").pairs == "response" and dpo.resolve(params, "step_dpo", "p").pairs == "step"
    params.variants["guided"] = {"loss": "tgdpo", "guidance": "data/guidance/dpo", "pairs": "step"}
    with pytest.raises(config.ParamsError, match="guided: loss 'tgdpo' reads token guidance"):
        dpo.resolve(params, "guided", "p")
    params.variants["odd"] = {"loss": "dpo", "pairs": "steps"}
    with pytest.raises(config.ParamsError, match=r"odd.pairs: 'steps' is not one of \['response', 'step'\]"):
        dpo.resolve(params, "odd", "p")
    with pytest.raises(ValueError, match="reads token guidance"):
        dpo.VariantParams(loss="tgdpo", pairs="step")

    ref = tmp_path / "reference"
    _reference(files, ref, str(tmp_path / "label/absent.jsonl"))
    with pytest.raises(SystemExit, match="no step pairs .* set label.step_pairs: true"):
        _dpo(files, "step_dpo", str(tmp_path / "label/absent.jsonl"), ref, tmp_path / "out")
    with pytest.raises(SystemExit, match="step_logps.jsonl: no such file: re-run the reference stage"):
        _dpo(files, "step_dpo", files["steps"], ref, tmp_path / "out")
