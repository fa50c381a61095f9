"""On a CUDA GPU only (skipped elsewhere; `pytest -m gpu` selects them): bf16 DPO through the stages, the training
launcher on 2 GPUs with each accelerate config, and vLLM sampling against HF `generate`. Each writes what it measured
to bench/results/gpu_*.json with the machine.

    pip install -e .[gpu]      # on top of the lock, docs/gpu.md
    pytest -m gpu tests/test_gpu.py

vLLM runs last in this module: it holds most of the GPU memory while its engine lives.
"""

import json
import math
import os
import random
import socket
import subprocess
import sys
import time

import mlflow
import pytest
import torch
import yaml

from bench import machine
from posttrain import cli, io, modeling, sampling, tasks
from stages import dpo, generate, label, prepare, reference, sft
from tests.conftest import ROOT, tiny_params, vllm_sized_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RESULTS = ROOT / "bench" / "results"
CUDA = torch.device("cuda")


def record(name: str, figures: dict) -> None:
    # a test run may be on a dirty tree: written anyway, with `dirty` saying so
    machine.write_results(RESULTS / f"gpu_{name}.json", figures, allow_dirty=True)


def chat_tokens(tok, rows: list[dict]) -> int:
    return sum(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows)


@pytest.fixture(scope="module")
def cuda_run(workdir, tmp_path_factory):
    """The tiny profile on cuda up to the DPO inputs: prepare, sft, generate (HF), label, reference."""
    t = tmp_path_factory.mktemp("gpu")
    p = str(tiny_params(t, common={"device": "cuda"}))
    d = lambda rel: str(t / rel)  # noqa: E731
    base = str(workdir / "models" / "base")
    prepare.main(["--params", p, "--out", d("data/prepare")])
    sft.main(["--params", p, "--model", base, "--data", d("data/prepare/sft.jsonl"), "--out", d("models/sft")])
    generate.main(["--params", p, "--model", d("models/sft"), "--prompts", d("data/prepare/train.jsonl"), "--out",
                   d("data/samples.jsonl")])
    label.main(["--params", p, "--samples", d("data/samples.jsonl"), "--out", d("data/label")])
    reference.main(["--params", p, "--model", d("models/sft"), "--prefs", d("data/label/prefs.jsonl"), "--out",
                    d("data/reference")])
    return t, p, base


def test_dpo_trains_in_bf16_on_cuda(cuda_run):
    t, p, base = cuda_run
    out = t / "models" / "dpo" / "dpo"
    m = dpo.main(["--params", p, "--variant", "dpo", "--model", str(t / "models/sft"), "--prefs",
                  str(t / "data/label/prefs.jsonl"), "--reference", str(t / "data/reference"), "--guidance",
                  str(t / "data/reference"), "--out", str(out)])
    assert math.isfinite(m["train_loss"]) and m["steps"] >= 1
    mlflow.set_tracking_uri(f"sqlite:///{t / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["posttrain"], filter_string="attributes.run_name = 'dpo@dpo'",
                                output_format="list")
    assert run.data.params["bf16"] == "True"  # logged by the trainer's MLflow callback: TrainingArguments.bf16
    tok = modeling.load_tokenizer(base)
    pairs = io.read_jsonl(t / "data/label/prefs.jsonl", "prefs")
    tokens = chat_tokens(tok, [{"messages": r["prompt"] + [{"role": "assistant", "content": r[k]}]}
                               for r in pairs for k in ("chosen", "rejected")])
    record("dpo", {"model": "tiny (2 layers, 64 wide)", "pairs": m["pairs"], "steps": m["steps"],
                   "train_runtime_s": m["train_runtime_s"],
                   "tokens_per_s": round(tokens / max(m["train_runtime_s"], 1e-9), 1)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("kind", ["ddp", "zero3", "fsdp"])
def test_sft_on_two_gpus_through_the_launcher(cuda_run, tmp_path, kind):
    """`common.launcher` = the repo's config with 2 processes: the stage relaunches, rank 0 writes a loadable
    adapter (gathered from the shards under ZeRO-3 / FSDP) and one MLflow run."""
    if kind == "zero3":
        pytest.importorskip("deepspeed")
    t, _, base = cuda_run
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / f"{kind}.yaml").read_text())
    cfg |= {"num_processes": 2, "main_process_port": _free_port()}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    params = tiny_params(tmp_path, common={"device": "cuda", "launcher": str(tmp_path / "two.yaml")})
    env = {k: v for k, v in os.environ.items() if k not in (cli.MARKER, "LOCAL_RANK", "RANK", "WORLD_SIZE")}
    out = tmp_path / "models" / "sft"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stages.sft", "--params", str(params), "--model", base, "--data",
                           str(t / "data/prepare/sft.jsonl"), "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = modeling.load_chain(out, CUDA)  # a shard-sized or empty adapter tensor would fail to load here
    assert model.dtype == torch.bfloat16
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["posttrain"], output_format="list")
    assert run.info.run_name == "sft" and run.data.metrics["steps"] == 2  # 12 demos, 4 a GPU, 2 GPUs
    tok = modeling.load_tokenizer(base)
    tokens = chat_tokens(tok, io.read_jsonl(t / "data/prepare/sft.jsonl", "sft"))
    record(f"launch_{kind}", {"config": f"configs/accelerate/{kind}.yaml", "num_processes": 2,
                              "model": "tiny (2 layers, 64 wide)", "rows": run.data.metrics["rows"],
                              "train_runtime_s": run.data.metrics["train_runtime_s"],
                              "tokens_per_s": round(tokens / max(run.data.metrics["train_runtime_s"], 1e-9), 1),
                              "wall_s_with_launch": round(seconds, 1)})


def test_vllm_sampling_has_the_hf_format(tmp_path):
    pytest.importorskip("vllm")
    path = vllm_sized_model(tmp_path)
    tok = modeling.load_tokenizer(path)
    rng = random.Random(0)
    prompts = [tasks.make_prompt("add", rng)["messages"] for _ in range(32)]
    n, max_new = 4, 16
    assert sampling.backend_for("auto", CUDA) == "vllm"
    figures, outs = {}, {}
    for backend in ("hf", "vllm"):  # vLLM second: it moves the model to the CPU and keeps the GPU while it lives
        model = modeling.load_model(path, device=CUDA)
        t0 = time.perf_counter()
        outs[backend] = sampling.sample(model, tok, prompts, n=n, temperature=1.0, max_new_tokens=max_new,
                                        batch_size=64, seed=0, backend=backend)
        seconds = time.perf_counter() - t0
        new = sum(len(tok(s, add_special_tokens=False).input_ids) for row in outs[backend] for s in row)
        figures[backend] = {"seconds": round(seconds, 2), "new_tokens": new,
                            "new_tokens_per_s": round(new / seconds, 1)}
    hf, vl = outs["hf"], outs["vllm"]
    assert len(hf) == len(vl) == len(prompts)
    for a, b in zip(hf, vl, strict=True):
        assert len(a) == len(b) == n and all(isinstance(s, str) and s == s.strip() for s in a + b)
        assert all(len(tok(s, add_special_tokens=False).input_ids) <= max_new + 1 for s in b)
    record("sampling", {"model": "random 2-layer Llama, 128 wide", "prompts": len(prompts), "n": n,
                        "max_new_tokens": max_new, "temperature": 1.0, "results": figures,
                        "note": "includes vLLM's engine start (seconds) and the checkpoint save"})
    print(json.dumps(figures))
