"""generate: sample N responses per training prompt from the current policy (on-policy preference data).

    dvc repro generate
    python -m stages.generate --model models/sft --prompts data/prepare/train.jsonl --out data/generate/samples.jsonl \
        --rm-prompts data/prepare/rm_prompts.jsonl --rm-out data/generate/rm_samples.jsonl

With `--rm-prompts`, the reward model's prompts are sampled in the same pass and written to `--rm-out`: the
reward_model stage trains on the verifier's ranking of them, so the judge learns from the very kind of responses
it will judge in `label`.

HF `generate` (batched, KV cache) on CPU; vLLM when installed and a GPU is present (`generate.backend`). Both
write the same rows: the prompt row plus `samples`, a list of N response strings. With `prepare.pairs: dataset`
the pairs are the data set's own: nothing is sampled, each prompt row is written with `samples: []` and the
metrics say `passed_through: 1`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from posttrain import cli, formats, io, modeling, sampling


@dataclass
class GenerateParams:
    n_samples: int = 4
    """Responses per prompt; more raise the chance a prompt has both a correct and a wrong answer (a pair)."""
    temperature: float = 0.7
    """Lower keeps samples near the policy's mode (pairs it can learn from); higher adds diversity and noise."""
    max_new_tokens: int = 12
    batch_size: int = 64
    """Sequences per generate call (prompts x samples)."""
    backend: Literal["auto", "hf", "vllm"] = "auto"
    tensor_parallel_size: int = 1
    """vLLM only: GPUs a model is split over."""

    def __post_init__(self) -> None:
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 to form a pair, got {self.n_samples}")
        if self.temperature < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("temperature must be >= 0, max_new_tokens and batch_size >= 1")


def run(common, params: GenerateParams, args) -> dict:
    if bool(args.rm_prompts) != bool(args.rm_out):
        raise io.InputError("generate: --rm-prompts and --rm-out go together")
    prompts = io.read_jsonl(args.prompts, "prompts")
    rm_prompts = io.read_jsonl(args.rm_prompts, "prompts", allow_empty=True) if args.rm_prompts else []
    if formats.pairs_mode(args.params) == "dataset":
        io.write_jsonl(args.out, [p | {"samples": []} for p in prompts])
        if args.rm_out:
            io.write_jsonl(args.rm_out, [p | {"samples": []} for p in rm_prompts])
        print("generate: prepare.pairs is 'dataset': the data set's pairs are used, nothing sampled")
        return {"prompts": len(prompts), "samples": 0, "passed_through": 1}
    device = modeling.device_for(common.device)
    tok = modeling.stage_tokenizer(args.model)
    model = modeling.load_chain(args.model, device, common.trust_remote_code)
    backend = sampling.backend_for(params.backend, device)
    t0 = time.perf_counter()
    samples = sampling.sample(model, tok, [p["messages"] for p in prompts + rm_prompts], n=params.n_samples,
                              temperature=params.temperature, max_new_tokens=params.max_new_tokens,
                              batch_size=params.batch_size, seed=common.seed, backend=backend,
                              tensor_parallel_size=params.tensor_parallel_size)
    seconds = time.perf_counter() - t0
    rows = [p | {"samples": s} for p, s in zip(prompts + rm_prompts, samples, strict=True)]
    empty = sum(not s.strip() for r in rows for s in r["samples"])
    io.check_drops(args.out, len(rows) * params.n_samples, {"empty_sample": empty}, common.max_drop_share,
                   "the policy ends its turn at once: check that models/sft learned the answer format (its evaluate "
                   "pass rate) and that the prompts render as in training (posttrain/sampling.py)")
    io.write_jsonl(args.out, rows[: len(prompts)])
    if args.rm_out:
        io.write_jsonl(args.rm_out, rows[len(prompts) :])
    new_tokens = sum(len(tok(s, add_special_tokens=False).input_ids) for r in rows for s in r["samples"])
    return {"prompts": len(prompts), "rm_prompts": len(rm_prompts), "samples": len(rows) * params.n_samples,
            "seconds": seconds, "new_tokens_per_s": new_tokens / max(seconds, 1e-9), "backend": backend}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="policy: a checkpoint or an adapter chain")
    p.add_argument("--prompts", required=True, help="prompts (JSONL, schema `prompts`)")
    p.add_argument("--out", required=True, help="samples file (JSONL, schema `samples`)")
    p.add_argument("--rm-prompts", help="the reward model's prompts (JSONL, schema `prompts`), sampled too")
    p.add_argument("--rm-out", help="their samples file (JSONL, schema `samples`)")
    return cli.execute("generate", GenerateParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
