"""A training stage (sft, dpo) killed with SIGKILL mid-run leaves no output, and the re-run resumes from its last
checkpoint to the same weights as an uninterrupted run; a re-run with other params or inputs starts afresh."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from tests.conftest import ROOT, tiny_params


def _stage(name: str, *args: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", f"stages.{name}", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _sft(params: Path, workdir: Path, data: Path, out: Path) -> subprocess.Popen:
    return _stage("sft", "--params", params, "--model", workdir / "models/base", "--data", data, "--out", out)


def _kill_after(proc: subprocess.Popen, ckpt: Path, step: int, last: int) -> Path:
    """SIGKILL `proc` a moment after `checkpoint-<step>` appears in its run folder (`<out>.ckpt/<key>/`), check a
    checkpoint short of `last` is kept, and return that run folder."""
    deadline = time.time() + 600
    while not list(ckpt.glob(f"*/checkpoint-{step}")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    time.sleep(0.2)  # into the steps after it (a tiny model's step takes tens of milliseconds on an idle machine)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run,) = ckpt.iterdir()
    kept = get_last_checkpoint(str(run))
    assert kept is not None and int(kept.rsplit("-", 1)[1]) < last, "killed before the end, with a checkpoint kept"
    return run


def _same_adapter(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)  # resumed == uninterrupted, to fp32 noise


@pytest.mark.slow
def test_sigkilled_sft_resumes_to_the_same_weights(workdir, tmp_path):
    from stages import prepare

    params = tiny_params(tmp_path, sft={"epochs": 4.0, "save_steps": 2, "learning_rate": 1e-3})
    prepare.main(["--params", str(params), "--out", str(tmp_path / "prepare")])
    data = tmp_path / "prepare" / "sft.jsonl"

    straight = tmp_path / "straight"
    proc = _sft(params, workdir, data, straight)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    killed = tmp_path / "killed"
    proc = _sft(params, workdir, data, killed)
    ckpt = Path(f"{killed}.ckpt")
    run = _kill_after(proc, ckpt, 4, 12)  # 12 demos / batch 4 = 3 steps an epoch, 12 in all
    assert not killed.exists(), "a killed stage must leave no output that DVC could take as complete"

    proc = _sft(params, workdir, data, killed)
    code, err = proc.wait(timeout=600), proc.stderr.read()
    assert code == 0, err
    assert f"resuming from {run}/checkpoint-" in err, "the same params and inputs: the re-run resumes"
    assert not ckpt.exists(), "checkpoints are removed once the stage finishes"
    _same_adapter(straight, killed)


@pytest.mark.slow
def test_sigkilled_dpo_resumes_to_the_same_weights(workdir, tmp_path):
    """The dpo stage (PreferenceTrainer, cached reference) on prepare's 16 offline pairs from the tiny base model;
    a stale temp folder of a save killed earlier (`.<name>.tmp-<dead pid>`) is cleaned by the re-run."""
    from stages import prepare, reference

    params = tiny_params(tmp_path, dpo={"defaults": {"epochs": 10.0, "save_steps": 2, "batch_size": 4,
                                                     "learning_rate": 1e-3}, "variants": {"dpo": {"loss": "dpo"}}})
    prepare.main(["--params", str(params), "--out", str(tmp_path / "prepare")])
    prefs, ref = tmp_path / "prepare" / "rm_prefs.jsonl", tmp_path / "reference"
    base = workdir / "models/base"
    reference.main(["--params", str(params), "--model", str(base), "--prefs", str(prefs), "--out", str(ref)])

    def dpo(out: Path) -> subprocess.Popen:
        return _stage("dpo", "--params", params, "--variant", "dpo", "--model", base, "--prefs", prefs,
                      "--reference", ref, "--guidance", ref, "--out", out)

    straight = tmp_path / "straight"
    proc = dpo(straight)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    killed = tmp_path / "killed"
    proc = dpo(killed)
    ckpt = Path(f"{killed}.ckpt")
    run = _kill_after(proc, ckpt, 4, 40)  # 16 pairs / batch 4 = 4 steps an epoch, 40 in all: time to kill it in
    assert not killed.exists(), "a killed stage must leave no output that DVC could take as complete"
    stale = tmp_path / f".killed.tmp-{proc.pid}"  # what a kill inside the final save leaves: a partial temp folder
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"partial")

    proc = dpo(killed)
    code, err = proc.wait(timeout=600), proc.stderr.read()
    assert code == 0, err
    assert f"resuming from {run}/checkpoint-" in err, "the same params and inputs: the re-run resumes"
    assert not ckpt.exists() and not stale.exists()
    _same_adapter(straight, killed)

    # killed again, then re-run with another training seed (what `dvc exp run -S dpo.defaults.seed=1` does): the
    # stage must train afresh, not resume the seed-0 checkpoint
    shutil.rmtree(killed)
    _kill_after(dpo(killed), ckpt, 4, 40)
    seed1 = yaml.safe_load(params.read_text())
    seed1["dpo"]["defaults"]["seed"] = 1
    params.write_text(yaml.safe_dump(seed1))
    proc = dpo(killed)
    code, err = proc.wait(timeout=600), proc.stderr.read()
    assert code == 0, err
    assert "checkpoint(s) of a run with other params or inputs: deleted, not resumed" in err
    assert "resuming from" not in err


def test_resume_skips_a_checkpoint_cut_off_mid_write(tmp_path):
    """A kill during a save leaves checkpoint-N without trainer_state.json: resume from the one before, drop it."""
    from posttrain import training

    ckpt = training.run_dir(tmp_path / "model", {"learning_rate": 1e-4}, [])
    (ckpt / "checkpoint-10").mkdir()
    (ckpt / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    (ckpt / "checkpoint-20").mkdir()
    (ckpt / "checkpoint-20" / "adapter_model.safetensors").write_bytes(b"partial")
    (ckpt / "checkpoint-3").mkdir()
    (ckpt / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    assert training.resume_from(ckpt) == str(ckpt / "checkpoint-10")  # by step number, not by name order
    assert not (ckpt / "checkpoint-20").exists()
    (ckpt / "checkpoint-10" / "trainer_state.json").write_text('{"global_st')  # cut off inside the state file
    assert training.resume_from(ckpt) == str(ckpt / "checkpoint-3")
    assert training.resume_from(tmp_path / "never_trained") is None


def test_a_run_with_other_params_or_inputs_does_not_resume(tmp_path, caplog, monkeypatch):
    """Checkpoints live in `<out>.ckpt/<key>/`, the key hashing the params, the process count and each input file's
    (and posttrain's code's) size and mtime: the same ones resume, however the paths are spelled; another seed,
    process count, or an input an upstream stage re-wrote starts afresh and deletes the old run."""
    from posttrain import training

    out, prefs, ref = tmp_path / "dpo", tmp_path / "prefs.jsonl", tmp_path / "reference"
    prefs.write_text("{}\n")
    ref.mkdir()
    (ref / "logps.pt").write_bytes(b"1234")
    params = {"dpo": {"seed": 0, "learning_rate": 3e-5}}

    def ckpt(run: Path, step: int) -> Path:
        (run / f"checkpoint-{step}").mkdir()
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        return run / f"checkpoint-{step}"

    first = training.run_dir(out, params, [prefs, ref, ""])  # '' (no launcher) is skipped
    assert first.parent == tmp_path / "dpo.ckpt"
    key = json.loads((first / "run.json").read_text())
    assert key["params"] == params and key["world_size"] == 1
    assert key["inputs"]["0/"] == [3, prefs.stat().st_mtime_ns]  # by position and path inside the input
    assert key["inputs"]["1/logps.pt"] == [4, (ref / "logps.pt").stat().st_mtime_ns]
    assert "posttrain/losses.py" in key["inputs"] and len(key["inputs"]) > 10  # and posttrain's code
    kept = ckpt(first, 4)
    monkeypatch.chdir(tmp_path)
    again = training.run_dir(out, params, ["prefs.jsonl", "./reference/"])
    assert again == first  # a re-run after a kill, its paths spelled otherwise: the same folder, resumed
    assert training.resume_from(first) == str(kept)
    monkeypatch.setenv("WORLD_SIZE", "2")  # another process count (a sharded checkpoint would not load): a new run
    assert training.run_dir(out, params, [prefs, ref]) != first and not first.exists()
    monkeypatch.delenv("WORLD_SIZE")
    first = training.run_dir(out, params, [prefs, ref])
    ckpt(first, 4)

    with caplog.at_level(logging.WARNING):
        seed1 = training.run_dir(out, {"dpo": {"seed": 1, "learning_rate": 3e-5}}, [prefs, ref])
    assert seed1 != first and not first.exists() and training.resume_from(seed1) is None
    assert "1 checkpoint(s) of a run with other params or inputs: deleted, not resumed" in caplog.text

    ckpt(seed1, 2)
    os.utime(ref / "logps.pt", ns=(1, 1))  # the same bytes written again by an upstream stage: another run
    rewritten = training.run_dir(out, {"dpo": {"seed": 1, "learning_rate": 3e-5}}, [prefs, ref])
    assert rewritten != seed1 and not seed1.exists() and training.resume_from(rewritten) is None

    old = training.ckpt_dir(out) / "checkpoint-7"  # the layout before run folders: not resumable by key, deleted
    old.mkdir()
    assert training.run_dir(out, {"dpo": {"seed": 1, "learning_rate": 3e-5}}, [prefs, ref]) == rewritten
    assert not old.exists() and sorted(p.name for p in training.ckpt_dir(out).iterdir()) == [rewritten.name]
