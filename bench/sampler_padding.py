"""On-policy samples of prompts of different token lengths, before and after the shared-prefill fix (issue 21):
the share of empty samples by task, and the share of prompts whose greedy samples, taken in a batch, differ from
the same prompt sampled alone.

    cp profiles/reasoning_gym.yaml params.yaml && dvc repro sft     # in a scratch clone: its SFT model and prompts
    python -m bench.sampler_padding --repo ../rg                    # from a clean checkout

"before" is `posttrain/sampling.py` as of `--before` (8c5605c, the last revision with the bug), read from git;
"after" is this checkout's. Both sample the repo's training prompts with its `generate` params and `common.seed`,
as the generate stage does, on one model in one process. The greedy check takes `--greedy-prompts` of them (n 2,
temperature 0) in the batches `generate` forms, against each prompt alone. Writes
bench/results/sampler_padding.json.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import machine
from posttrain import config, io, modeling, sampling


def sampler_at(rev: str):
    """posttrain/sampling.py as of `rev`, imported as its own module (it imports this checkout's modeling)."""
    src = subprocess.run(["git", "show", f"{rev}:posttrain/sampling.py"], capture_output=True, text=True,
                         check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"sampling_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"sampling_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def empties(rows: list[dict], samples: list[list[str]]) -> dict:
    by_task: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    all_empty = collections.Counter()
    for row, ss in zip(rows, samples, strict=True):
        by_task[row["task"]][0] += sum(not s for s in ss)
        by_task[row["task"]][1] += len(ss)
        all_empty[row["task"]] += all(not s for s in ss)
    total = sum(e for e, _ in by_task.values()), sum(n for _, n in by_task.values())
    return {"empty": total[0], "samples": total[1], "share": total[0] / max(total[1], 1),
            "by_task": {t: {"empty": e, "samples": n, "share": e / n, "prompts_all_empty": all_empty[t]}
                        for t, (e, n) in sorted(by_task.items())}}


def greedy_alone_check(sample_hf, model, tok, prompts: list, batch_size: int, seed: int) -> dict:
    batched = sample_hf(model, tok, prompts, 2, 0.0, 32, batch_size, seed)
    alone = [sample_hf(model, tok, [p], 2, 0.0, 32, batch_size, seed)[0] for p in prompts]
    differ = [i for i, (b, a) in enumerate(zip(batched, alone, strict=True)) if b != a]
    return {"prompts": len(prompts), "differ": len(differ), "share": len(differ) / max(len(prompts), 1),
            "examples": [{"alone": alone[i][0], "batched": batched[i]} for i in differ[:3]]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="a repo where `dvc repro sft` ran on profiles/reasoning_gym.yaml")
    p.add_argument("--before", default="8c5605c", help="the revision whose sampler is 'before'")
    p.add_argument("--greedy-prompts", type=int, default=64)
    p.add_argument("--out", default="bench/results/sampler_padding.json")
    p.add_argument("--shared-cores", default="", help="what else ran on the cores meanwhile (recorded; seconds are "
                   "then no timing)")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    here, out, repo = Path.cwd(), Path(args.out).resolve(), Path(args.repo).resolve()
    before = sampler_at(args.before)
    params = config.read_yaml(repo / "params.yaml")
    gen, seed = params["generate"], params["common"]["seed"]
    os.chdir(repo)  # adapter chains name their base relative to the repo
    tok = modeling.stage_tokenizer("models/sft")
    model = modeling.load_chain("models/sft")
    rows = io.read_jsonl("data/prepare/train.jsonl", "prompts")
    prompts = [r["messages"] for r in rows]
    lengths = [len(tok(modeling.render_prompt(tok, m), add_special_tokens=False).input_ids) for m in prompts]
    results: dict = {"pipeline": machine.repo_state(repo), "before_revision": args.before, "generate": gen,
                     "seed": seed, "prompts": len(rows), "prompt_tokens": {"min": min(lengths), "max": max(lengths)},
                     "shared_cores": args.shared_cores}
    for name, sampler in (("before", before), ("after", sampling)):
        t0 = time.perf_counter()
        samples = sampler.sample_hf(model, tok, prompts, gen["n_samples"], gen["temperature"],
                                    gen["max_new_tokens"], gen["batch_size"], seed)
        results[name] = {"seconds": round(time.perf_counter() - t0, 1), "empty": empties(rows, samples),
                         "greedy_batched_vs_alone": greedy_alone_check(
                             sampler.sample_hf, model, tok, prompts[: args.greedy_prompts], gen["batch_size"], seed)}
        print(name, {k: v for k, v in results[name]["empty"].items() if k != "by_task"}, file=sys.stderr)
    os.chdir(here)
    machine.write_results(out, results, argv=machine.module_command("bench.sampler_padding", argv),
                          allow_dirty=args.allow_dirty)
    return results


if __name__ == "__main__":
    main()
