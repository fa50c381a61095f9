"""Shared fixtures: the tiny profile's params and a tiny random base model, built once per session."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
STARTUP_S = 180
"""Seconds a Prefect test server may take to start: on 2 busy cores it has taken more than Prefect's default 20-30
(flows/ subprocesses read the same through PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)."""
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(STARTUP_S))


# a worked task (three running totals) and a rejected answer whose first step is right: test_credit and
# test_long_answers_bench build their pairs from it
ADD3 = {"type": "chain_add", "operands": [55, 97, 23]}
ADD3_PROMPT = [{"role": "user", "content": "Add 55, 97 and 23. Show each running total on its own line, then "
                "'Answer: N'."}]
ADD3_REJECTED = "55 + 97 = 152\n152 + 23 = 165\nAnswer: 165"


def add3_pair(rejected: str, pid: str = "p0") -> dict:
    from posttrain import tasks

    return {"id": pid, "prompt": ADD3_PROMPT, "chosen": tasks.solve(ADD3), "rejected": rejected}


def tiny_params(tmp: Path, **overrides) -> Path:
    """Write the tiny profile to `tmp/params.yaml` with its MLflow store in `tmp`; `overrides` replace blocks."""
    params = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    params["common"]["mlflow_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    for block, values in overrides.items():
        params[block] = {**params.get(block, {}), **values}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A session scratch dir holding params.yaml and the tiny base model (models/base)."""
    from stages import base

    tmp = tmp_path_factory.mktemp("work")
    params = tiny_params(tmp)
    base.main(["--params", str(params), "--out", str(tmp / "models" / "base")])
    return tmp


def copy_pipeline(dst: Path, folders: tuple[str, ...] = ("stages", "posttrain", "profiles", "flows")) -> Path:
    """The repo's pipeline files (`folders`, dvc.yaml, .gitignore) copied into `dst`, the tiny profile as
    params.yaml."""
    for name in folders:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copy(ROOT / "profiles" / "tiny.yaml", dst / "params.yaml")
    return dst


# --- helpers of the tests that run the pipeline in a scratch git + DVC repo --------------------------------------

DVC = [sys.executable, "-m", "dvc"]


def repo_env(repo: Path) -> dict:
    return os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(repo)}


def run_ok(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def stages_run(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def own_store(repo: Path) -> None:
    """An absolute MLflow URI: several repos share this test process, where a relative one would follow the cwd."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["common"]["mlflow_uri"] = f"sqlite:///{repo / 'mlflow.db'}"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def rounds_repo(tmp_path_factory, workdir) -> Path:
    """(test_iterative, test_team) A git + DVC repo on the tiny profile holding what rounds read: data/prepare,
    models/base, models/sft."""
    from stages import prepare, sft

    repo = copy_pipeline(tmp_path_factory.mktemp("pipeline"))
    own_store(repo)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=repo_env(repo))
    with contextlib.chdir(repo):  # relative paths, as dvc.yaml passes them (chain.json records them)
        prepare.main(["--out", "data/prepare"])
        shutil.copytree(workdir / "models" / "base", "models/base")  # the session's tiny base model
        sft.main(["--model", "models/base", "--data", "data/prepare/sft.jsonl", "--out", "models/sft"])
    return repo


def copy_repo(repo: Path, dst: Path) -> Path:
    """A copy of `rounds_repo` with its own MLflow store and no rounds."""
    shutil.copytree(repo, dst, symlinks=True, ignore=shutil.ignore_patterns("rounds", "mlflow.db", "mlruns"))
    own_store(dst)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(Exception):
            if result := check():
                return result
        time.sleep(1)
    raise TimeoutError(what)


# --- worked-answer pairs (test_step_dpo, test_credit, test_rounds) ------------------------------------------------

PROMPT = [{"role": "user", "content": "Work it out step by step, then end with 'Answer: N'. What is 12 + 30 - 5?"}]
RESPONSE_PAIRS = [{"id": f"r{i}", "prompt": PROMPT, "chosen": "12 + 30 = 42\n42 - 5 = 37\nAnswer: 37",
                   "rejected": f"12 + 30 = {40 + i}\nAnswer: {35 + i}"} for i in range(3)]
STEP_PAIRS = [  # the correct steps before the first wrong one end the prompt as an open assistant turn
    {"id": f"s{i}.step1.0", "prompt": PROMPT + [{"role": "assistant", "content": "12 + 30 = 42\n"}],
     "chosen": "42 - 5 = 37\nAnswer: 37", "rejected": f"42 - 5 = {30 + i}\nAnswer: {30 + i}"} for i in range(4)
] + [{"id": "s4.step0.1", "prompt": PROMPT, "chosen": "12 + 30 = 42\n42 - 5 = 37\nAnswer: 37",
      "rejected": "12 + 30 = 52\n52 - 5 = 47\nAnswer: 47"}]  # wrong at step 0: no prefix


# --- a model vLLM runs (test_vllm, test_gpu) ---------------------------------------------------------------------

def vllm_sized_model(tmp_path: Path) -> Path:
    """A random 2-layer Llama with head size 64 (vLLM's attention kernels do not take the tiny model's 16), its
    weights drawn wide (std 0.5) and its head untied, so greedy decoding does not just repeat the prompt's last
    token (a blank line, stripped to nothing) as a near-uniform tied model does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain import modeling

    _, tok = modeling.build_model("tiny", seed=0)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False, initializer_range=0.5)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"
