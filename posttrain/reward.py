"""The reward models: a causal LM (LoRA-trained) with a scalar head, whose reward also reads the LM's own log-probs.

One model class serves both reward models of the recipe:
- the Bradley-Terry sequence reward model (`reward_model` stage, TRL's RewardTrainer):
      r(x, y) = w . h_last  +  a * sum_t log p_phi(token_t | tokens_<t)
  h_last = the final hidden state at the sequence's last token (the sequence-classification head);
- the preference-grounded token reward of seed 001 (`token_reward` stage):
      r_t = w . h_t  +  a * log p_phi(token_t | tokens_<t)      at every position t,
  aggregated over the response by posttrain.token_reward.AGGREGATORS.
phi is the SFT model with a LoRA adapter (or all its weights, `lora: false`), trained with the head w and the scale
a (which starts at 1, w at 0) on the Bradley-Terry loss. Why the log-prob term: a head on a frozen or LoRA-tuned
backbone barely learns arithmetic correctness from pairs (shared/reference/MEASURED.md: 0.55 held-out on near-miss
sums, against 0.92 for the SFT model's own likelihood); the language model's token log-probs already carry it, so
the reward starts as the SFT model's log-likelihood of the conversation and training moves the head, the adapter
and the scale from there. The stages report the held-out accuracy before training too, so what training adds shows.
Over a pair, the prompt's log-probs are the same on both sides and cancel in r_w - r_l. So training (a
`preference.PairCollator` batch through `forward`: each prompt run once for both answers) and `score` (the reward
every judge and metric reads) leave them out: r(x, y) = w . h_last + a * sum over the response's tokens only. Every
comparison on one prompt is unchanged, and rewards compare across prompts, which `calibrate` needs: the reward above
which a response looks like a chosen one rather than a rejected one (the `label` stage's floor).

Saved: `adapter/` (the LoRA adapter, or `model/` for a full fine-tune), `head.safetensors` (w and a),
`backbone.json` (the causal-LM chain it was built on), `hyperparameters.yaml`, and `calibration.json` where the
reward_model stage had held-out pairs to calibrate on.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain import modeling, progress


class RewardModel(torch.nn.Module):
    """A causal LM, a scalar head on its final hidden states, and a scale on its token log-probs."""

    def __init__(self, lm) -> None:
        super().__init__()
        self.lm = lm
        self.config = lm.config  # what TRL's RewardTrainer reads (num_labels, pad_token_id)
        self.config.num_labels = 1
        self.score = torch.nn.Linear(lm.config.hidden_size, 1, bias=False, dtype=lm.dtype, device=lm.device)
        torch.nn.init.zeros_(self.score.weight)
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float32, device=lm.device))

    def add_model_tags(self, tags) -> None:
        """What TRL's trainers call on a transformers model: passed on to the language model."""
        self.lm.add_model_tags(tags)

    def _parts(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) head values w . h_t and (B, T) log p(token_t | tokens_<t) (0 at t = 0 and on padding)."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        head = self.score(out.hidden_states[-1]).squeeze(-1).float()
        logp = torch.gather(out.logits[:, :-1].float().log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(-1)
        logp = F.pad(logp * attention_mask[:, 1:], (1, 0))
        return head, logp

    def token_rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) r_t = w . h_t + a * log p(token_t | tokens_<t)."""
        head, logp = self._parts(input_ids, attention_mask)
        return head + self.scale * logp

    def completion_rewards(self, prompt_ids: Tensor, prompt_mask: Tensor, prefix_len: int, completion_ids: Tensor,
                           completion_mask: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Rewards of completions continuing prompts (`posttrain.modeling.completions_forward`: each prompt run once
        for all its completions): (N, C) token rewards r_t = w . h_t + a * log p(token_t | tokens_<t) on the
        completion's tokens (0 on padding), and (N,) sequence rewards w . h_last + a * sum of the completion's
        log-probs. The prompt's log-probs are left out: over a pair they are the same on both sides and cancel."""
        logp, hidden = modeling.completions_forward(self.lm, prompt_ids, prompt_mask, prefix_len, completion_ids,
                                                    completion_mask, index, hidden=True)
        head = self.score(hidden).squeeze(-1).float()
        tokens = (head + self.scale * logp) * completion_mask
        last = completion_mask.sum(-1) - 1
        return tokens, head[torch.arange(len(last)), last] + self.scale * logp.sum(-1)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                prompt_ids: Tensor | None = None, prompt_mask: Tensor | None = None, prefix_len: int = 0,
                completion_ids: Tensor | None = None, completion_mask: Tensor | None = None,
                **_trainer_kwargs) -> SimpleNamespace:
        """Sequence rewards as `.logits` (B, 1).
        - Whole sequences (`input_ids`, right padding): read at the last non-pad token, the log-probs summed over
          every token, as TRL's default reward-model forward.
        - A `posttrain.preference.PairCollator` batch (`prompt_ids`, ..., what the reward stages train on): the
          [chosen; rejected] completions' rewards (`completion_rewards`), each prompt run once for both, and
          `.token_rewards` (2B, C).
        Trainers also pass `use_cache=False` and the like, which the inner calls set anyway."""
        if prompt_ids is not None:
            b = prompt_ids.size(0)
            index = torch.cat([torch.arange(b), torch.arange(b)]).to(prompt_ids.device)
            tokens, r = self.completion_rewards(prompt_ids, prompt_mask, prefix_len, completion_ids,
                                                completion_mask, index)
            return SimpleNamespace(logits=r[:, None], token_rewards=tokens)
        head, logp = self._parts(input_ids, attention_mask)
        last = attention_mask.sum(-1) - 1
        r = head[torch.arange(len(last)), last] + self.scale * logp.sum(-1)
        return SimpleNamespace(logits=r[:, None])


def build(causal_lm, lora=None) -> RewardModel:
    """A RewardModel on `causal_lm` (the SFT model, merged); with `lora` (LoraParams) only a LoRA adapter of it, the
    head and the scale train, else every weight does."""
    if lora is not None:
        from peft import get_peft_model

        from posttrain import training

        causal_lm = get_peft_model(causal_lm, training.lora_config(lora))
    return RewardModel(causal_lm)


def calibrate(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """The reward threshold t that best tells the chosen responses of held-out pairs (reward >= t) from the rejected
    ones (reward < t), each response one vote; the lowest such t when several tie. {"threshold", "accuracy",
    "pairs"}."""
    if not chosen or len(chosen) != len(rejected):
        raise ValueError(f"calibrate: needs as many chosen as rejected rewards, at least one ({len(chosen)}, "
                         f"{len(rejected)})")
    c_sorted, r_sorted = sorted(chosen), sorted(rejected)

    def right_at(t: float) -> int:  # chosen >= t, plus rejected < t: two binary searches, so n log n in all
        return len(c_sorted) - bisect.bisect_left(c_sorted, t) + bisect.bisect_left(r_sorted, t)

    best = max(sorted(set(chosen + rejected)), key=lambda t: (right_at(t), -t))
    right = right_at(best)
    return {"threshold": best, "accuracy": right / (2 * len(chosen)), "pairs": len(chosen)}


def save(model: RewardModel, out: str | Path, backbone_model: str, resolved: dict,
         calibration: dict | None = None) -> None:
    """Write the trained parts atomically: the adapter (or the whole LM), the head and scale, the backbone's name,
    and the calibration (`calibrate`) when there is one."""
    from safetensors.torch import save_file

    from posttrain import io, tracking, training

    with io.atomic_dir(out) as tmp:
        lm = model.lm
        lm.save_pretrained(tmp / ("adapter" if hasattr(lm, "peft_config") else "model"), safe_serialization=True)
        save_file({"weight": model.score.weight.detach().cpu().contiguous(),
                   "scale": model.scale.detach().cpu().reshape(1)}, str(tmp / "head.safetensors"))
        (tmp / "backbone.json").write_text(json.dumps({"model": str(backbone_model)}) + "\n")
        tracking.write_hyperparameters(tmp, resolved)
        if calibration is not None:
            io.write_json(tmp / "calibration.json", calibration)
    training.finish(out)


def threshold(path: str | Path) -> float | None:
    """The calibrated reward threshold saved with a reward model (None when it had no held-out pairs)."""
    f = Path(path) / "calibration.json"
    return json.loads(f.read_text())["threshold"] if f.exists() else None


def backbone(path: str | Path) -> str:
    """The causal-LM model (checkpoint or chain) a reward model was built on."""
    return json.loads((Path(path) / "backbone.json").read_text())["model"]


def load_model(path: str | Path, device: torch.device, trust_remote_code: bool = False) -> RewardModel:
    """A trained reward model: its backbone chain, its adapter merged in (or its whole saved LM), head and scale."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from posttrain import io, modeling

    path = Path(path)
    if (path / "untrained.json").exists():
        raise io.InputError(f"{path}: {json.loads((path / 'untrained.json').read_text())['reason']}")
    if (path / "model").is_dir():
        lm = AutoModelForCausalLM.from_pretrained(str(path / "model"), dtype=modeling.dtype_for(device),
                                                  trust_remote_code=trust_remote_code).to(device)
    else:
        lm = modeling.load_chain(backbone(path), device, trust_remote_code)
        lm = PeftModel.from_pretrained(lm, str(path / "adapter")).merge_and_unload()
    model = RewardModel(lm)
    head = load_file(str(path / "head.safetensors"))
    with torch.no_grad():
        model.score.weight.copy_(head["weight"])
        model.scale.copy_(head["scale"][0])
    return model.to(device).eval()


def load(path: str | Path, device: torch.device, trust_remote_code: bool = False):
    """(model, tokenizer): the reward model and its backbone's checked tokenizer (right padding)."""
    from posttrain import modeling

    model = load_model(path, device, trust_remote_code)  # first: an untrained folder says why before anything loads
    return model, modeling.stage_tokenizer(backbone(path), padding_side="right")


@torch.no_grad()
def score(model, tok, conversations: list[list[dict]], batch_size: int = 32, max_len: int = 512) -> list[float]:
    """Reward of each conversation's last turn (prompt messages + the assistant turn, through the chat template):
    the head at the last token plus the scaled log-probs of the response's tokens (the prompt's are left out).
    The response is what follows the templated prompt with its generation prompt (`preference.encode`'s split),
    cut so that the whole fits `max_len`; a prompt that leaves it no room keeps its last token as the response.
    A batch runs each distinct prompt once (`RewardModel.completion_rewards`): n samples of a prompt, or a pair's two
    answers, share its forward."""
    device = next(model.parameters()).device
    out: list[float] = []
    bar = progress.Progress("scoring", len(conversations), "answer")
    for start in range(0, len(conversations), batch_size):
        prompts: dict[tuple, int] = {}
        index, comps = [], []
        for conv in conversations[start : start + batch_size]:
            full = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"][:max_len]
            prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
            n = min(modeling.common_prefix(prompt, full), len(full) - 1)
            index.append(prompts.setdefault(tuple(full[:n]), len(prompts)))
            comps.append(full[n:])
        k, prompt_ids, prompt_mask = modeling.shared_prefix_batch([list(p) for p in prompts], tok.pad_token_id)
        comp_ids = torch.full((len(comps), max(map(len, comps))), tok.pad_token_id)
        comp_mask = torch.zeros(comp_ids.shape, dtype=torch.long)
        for i, c in enumerate(comps):
            comp_ids[i, : len(c)], comp_mask[i, : len(c)] = torch.tensor(c), 1
        _, r = model.completion_rewards(prompt_ids.to(device), prompt_mask.to(device), k, comp_ids.to(device),
                                        comp_mask.to(device), torch.tensor(index, device=device))
        out += r.float().cpu().tolist()
        bar.update(len(comps), int(prompt_mask.sum() + comp_mask.sum()))
    bar.close()
    return out
