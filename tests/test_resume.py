"""A training stage killed with SIGKILL mid-run leaves no output, and the re-run resumes from its last checkpoint
to the same weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from tests.conftest import ROOT, tiny_params


def _sft(params: Path, workdir: Path, data: Path, out: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "stages.sft", "--params", str(params), "--model",
                             str(workdir / "models/base"), "--data", str(data),
                             "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


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
    deadline = time.time() + 600
    while not (ckpt / "checkpoint-4").exists():  # 12 demos / batch 4 = 3 steps an epoch, 12 in all
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    time.sleep(1.0)  # mid-way through the steps after checkpoint-4
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "a killed stage must leave no output that DVC could take as complete"
    last = get_last_checkpoint(str(ckpt))
    assert last is not None and int(last.rsplit("-", 1)[1]) < 12, "killed before the end, with a checkpoint kept"

    proc = _sft(params, workdir, data, killed)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert not ckpt.exists(), "checkpoints are removed once the stage finishes"
    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)  # resumed == uninterrupted, to fp32 noise


def test_resume_skips_a_checkpoint_cut_off_mid_write(tmp_path):
    """A kill during a save leaves checkpoint-N without trainer_state.json: resume from the one before, drop it."""
    from posttrain import training

    out = tmp_path / "model"
    ckpt = training.ckpt_dir(out)
    (ckpt / "checkpoint-10").mkdir(parents=True)
    (ckpt / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    (ckpt / "checkpoint-20").mkdir()
    (ckpt / "checkpoint-20" / "adapter_model.safetensors").write_bytes(b"partial")
    (ckpt / "checkpoint-3").mkdir()
    (ckpt / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    assert training.resume_from(out) == str(ckpt / "checkpoint-10")  # by step number, not by name order
    assert not (ckpt / "checkpoint-20").exists()
    (ckpt / "checkpoint-10" / "trainer_state.json").write_text('{"global_st')  # cut off inside the state file
    assert training.resume_from(out) == str(ckpt / "checkpoint-3")
    assert training.resume_from(tmp_path / "never_trained") is None
