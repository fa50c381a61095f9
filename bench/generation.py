"""Sampling throughput on the same prompts: HF generate with num_return_sequences (the prompt prefilled N times)
against posttrain's shared prefill (each prompt prefilled once, its KV cache repeated), and vLLM wherever it is
installed (its CUDA build on a GPU; its CPU build in `.venv-vllm`, `make setup-vllm`).

    python -m bench.generation                      # the pipeline's SFT model and training prompts
    .venv-vllm/bin/python -m bench.generation       # the same with vLLM's CPU build as a third backend

Writes bench/results/generation.json: per backend the seconds (vLLM's include its engine start, which every
`generate` stage pays once), new tokens per second, and how many samples pass the gold verifier (the same model
sampled the same way should pass about as often, whoever samples it).
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from bench import machine
from posttrain import io, modeling, sampling, tasks


def _hf_plain(model, tok, prompts, n, temperature, max_new_tokens, batch_size, seed):
    tok.padding_side = "left"
    out = []
    for start in range(0, len(prompts), max(1, batch_size // n)):
        chunk = prompts[start : start + max(1, batch_size // n)]
        enc = tok([modeling.render_prompt(tok, p) for p in chunk], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        torch.manual_seed(seed + start)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n, do_sample=True,
                                 temperature=temperature, top_k=0, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        out += tok.batch_decode(gen[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/sft")
    p.add_argument("--prompts-file", default="data/prepare/train.jsonl")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="bench/results/generation.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    device = modeling.device_for("auto")
    base, _ = modeling.model_chain(args.model)
    tok = modeling.load_tokenizer(base)
    model = modeling.load_chain(args.model, device)
    rows = io.read_jsonl(args.prompts_file, "prompts")[: args.prompts]
    prompts = [r["messages"] for r in rows]
    specs = [r["verifier"] for r in rows for _ in range(args.n)]  # the runs return n samples a prompt, in order

    def count(texts):
        return sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts)

    results = {}
    runs = {"hf_num_return_sequences": lambda: _hf_plain(model, tok, prompts, args.n, 0.7, args.max_new_tokens,
                                                          args.batch_size, 0),
            "hf_shared_prefill": lambda: [s for r in sampling.sample_hf(model, tok, prompts, args.n, 0.7,
                                                                       args.max_new_tokens, args.batch_size, 0)
                                          for s in r]}
    if importlib.util.find_spec("vllm") is not None:
        runs["vllm"] = lambda: [s for r in sampling.sample_vllm(model, tok, prompts, args.n, 0.7,
                                                                args.max_new_tokens, 0) for s in r]
    for name, fn in runs.items():
        t0 = time.perf_counter()
        texts = fn()
        seconds = time.perf_counter() - t0
        results[name] = {"seconds": round(seconds, 2), "new_tokens": count(texts),
                         "new_tokens_per_s": round(count(texts) / seconds, 1), "sequences": len(texts),
                         "gold_passed": sum(s is not None and tasks.score(s, t) == 1.0
                                            for s, t in zip(specs, texts, strict=True))}
        print(f"{name}: {results[name]}")
    out = {"model": args.model, "prompts": len(prompts), "n": args.n,
           "max_new_tokens": args.max_new_tokens, "results": results,
           "speedup_shared_prefill": round(results["hf_shared_prefill"]["new_tokens_per_s"]
                                           / results["hf_num_return_sequences"]["new_tokens_per_s"], 2)}
    out = machine.write_results(args.out, out, machine.module_command("bench.generation", argv), args.allow_dirty)
    return out


if __name__ == "__main__":
    main()
