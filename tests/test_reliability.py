"""What happens when things go wrong: a kill inside an atomic write, a loss that turns NaN in a real trainer run,
and the iterative promotion rule on a candidate that could go either way."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.integrations import MLflowCallback

from posttrain import io, stats, training
from tests.conftest import ROOT, tiny_params

WRITER = """
import sys, time
from posttrain import io
with io.atomic_dir(sys.argv[1]) as tmp:
    (tmp / "weights.bin").write_bytes(b"half of a checkpoint")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_kill_inside_atomic_dir_leaves_no_output_and_the_next_writer_cleans_up(tmp_path):
    out = tmp_path / "models" / "sft"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline() == "writing\n"
    live = out.parent / f".sft.tmp-{proc.pid}"
    assert (live / "weights.bin").exists()
    io.write_text(out.parent / "other.txt", "a writer of another path")
    with io.atomic_dir(out.parent / "other") as tmp:
        (tmp / "x").write_text("x")
    assert live.exists(), "a live writer's temp is never touched"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed writer leaves no output"
    assert live.exists(), "only its temp folder"

    stale_file = out.parent / ".notes.txt.tmp-999999999"  # pid above any pid_max: a dead writer of a file
    stale_file.write_text("half")
    with io.atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"whole")
    io.write_text(out.parent / "notes.txt", "whole")
    assert (out / "weights.bin").read_bytes() == b"whole"
    assert sorted(p.name for p in out.parent.iterdir()) == ["notes.txt", "other", "other.txt", "sft"]


@pytest.fixture(scope="module")
def dpo_inputs(workdir, tmp_path_factory):
    """prepare's 16 offline pairs and their reference cache, on the tiny base model."""
    from stages import prepare, reference

    tmp = tmp_path_factory.mktemp("nan")
    params = tiny_params(tmp, dpo={"defaults": {"save_steps": 2, "logging_steps": 1, "batch_size": 4,
                                                "epochs": 2.0}})
    prepare.main(["--params", str(params), "--out", str(tmp / "prepare")])
    reference.main(["--params", str(params), "--model", str(workdir / "models/base"), "--prefs",
                    str(tmp / "prepare/rm_prefs.jsonl"), "--out", str(tmp / "reference")])
    return params, tmp


class PoisonAt(TrainerCallback):
    """Make one trainable weight NaN at the end of step `step`: every loss after it is NaN, on purpose."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


def _dpo_trainer(workdir, params: Path, tmp: Path, out: Path, save_steps: int, logging_steps: int):
    from posttrain import config, modeling
    from stages import dpo

    common, all_params = config.load(dpo.DpoParams, "dpo", params)
    vp = dpo.resolve(all_params, "dpo", str(params))
    vp.save_steps, vp.logging_steps = save_steps, logging_steps
    device = modeling.device_for(common.device)
    model, base, _ = training.policy_for_training(workdir / "models/base", device, False)
    tok = modeling.load_tokenizer(base, padding_side="right")
    pairs = io.read_jsonl(tmp / "prepare/rm_prefs.jsonl", "prefs")
    data, _ = dpo.build_dataset(tok, pairs, vp, common.max_len, tmp / "reference", tmp / "reference", "prefs")
    trainer = dpo.make_trainer(model, tok, data, vp, common, device, str(training.run_dir(out, {}, [])))
    trainer.remove_callback(MLflowCallback)  # no MLflow store here; the guard is what is under test
    trainer.add_callback(PoisonAt(3))
    return trainer


@pytest.mark.parametrize("save_steps, logging_steps, caught", [
    (2, 5, "weight .* is not finite at step 4"), (100, 1, "training loss became nan at step 4")])
def test_nan_guard_stops_a_real_dpo_run_keeping_the_last_good_checkpoint(workdir, dpo_inputs, tmp_path,
                                                                          save_steps, logging_steps, caught):
    """Weights poisoned after step 3 of 8. Saving every 2 steps and logging every 5: no loss is logged before the
    step-4 save, so the guard checks the weights before each save and refuses checkpoint-4; checkpoint-2 stays
    and resume picks it. Logging every step: the step-4 loss is NaN in the log (transformers' default NaN filter
    would have hidden it behind the earlier losses: `training.device_args` turns it off)."""
    params, tmp = dpo_inputs
    out = tmp_path / "dpo"
    trainer = _dpo_trainer(workdir, params, tmp, out, save_steps, logging_steps)
    with pytest.raises(FloatingPointError, match=caught):
        trainer.train()
    assert trainer.state.global_step == 4 and not out.exists()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    run = training.run_dir(out, {}, [])
    ckpts = sorted(p.name for p in run.glob("checkpoint-*"))
    if save_steps == 2:
        assert losses == [] and ckpts == ["checkpoint-2"]
        assert training.resume_from(run) == str(run / "checkpoint-2")
        weights = load_file(str(run / "checkpoint-2" / "adapter_model.safetensors"))
        assert weights and all(torch.isfinite(w).all() for w in weights.values())
    else:
        assert ckpts == [] and len(losses) == 4 and all(x == x for x in losses[:3]) and losses[3] != losses[3]


@pytest.mark.parametrize("wins, losses, promoted, lo_range", [
    (11, 3, True, (0.0, 0.01)),     # gain +0.040; normal approx. lower end 0.040 - 1.96 x 0.0185 = +0.004
    (10, 4, False, (-0.01, 0.0)),   # gain +0.030; 0.030 - 1.96 x 0.0186 = -0.006: better on the point, not by rule
    (2, 0, False, (0.0, 0.0)),      # no loss at all, but 0.99^200 = 13% > 2.5% of resamples hold no win: lo = 0
])
def test_promotion_rule_on_a_close_call(wins, losses, promoted, lo_range):
    """200 selection prompts the champion and the candidate both answer; they differ on `wins` (candidate right,
    champion wrong) and `losses` prompts. Promote iff the 95% paired-bootstrap lower end is > 0 (strictly)."""
    from flows import promotion, rounds

    champ = [False] * wins + [True] * losses + [True] * 60 + [False] * (140 - wins - losses)
    cand = [True] * wins + [False] * losses + [True] * 60 + [False] * (140 - wins - losses)
    as_ids = lambda passed: {f"p{i:03d}": float(p) for i, p in enumerate(passed)}  # noqa: E731
    r = rounds.Round(k=1, seed=0, champion="models/sft", champion_eval="champion_eval",
                     champion_select="champion_select", reference="models/sft", variant="dpo", exclude=[])
    gain, lo, hi = stats.paired_gain(as_ids(cand), as_ids(champ), 1000, 0, 0.95)
    assert gain == pytest.approx((wins - losses) / 200)
    assert lo_range[0] <= lo <= lo_range[1] and (lo == 0.0 if lo_range == (0.0, 0.0) else lo != 0.0)
    reported = {"candidate": {"n": 10, "pass_rate": 0.5, "pass_rate_ci": [0, 1]},
                "champion": {"n": 10, "pass_rate": 0.5, "pass_rate_ci": [0, 1]}}
    decision = promotion.decision(r, promotion.Promote(level=0.95, min_gain=0.0), as_ids(cand), as_ids(champ),
                                  1000, reported)
    assert decision.promoted is promoted and decision.gain_ci == [lo, hi]
    assert decision.champion == ("rounds/round_1/model" if promoted else "models/sft")
    assert decision.champion_select == ("rounds/round_1/select" if promoted else "champion_select")
