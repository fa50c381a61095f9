"""Judges: who says which of two responses to a prompt is better, looked up by name in `JUDGES`.

Every judge answers two questions about prompt rows (`messages`, and `verifier` where there is one):
- `scores(rows, samples)`: a score per sample of each row, higher is better (what `label` pairs by);
- `prefer(rows, first, second)`: per row, the probability that `first` is better than `second`, 0.5 for a tie
  (what a win rate averages).
`verifier` reads each prompt's gold verifier spec (posttrain.tasks); `reward_model` the Bradley-Terry reward model
of the `reward_model` stage (P(first) = sigma(r_first - r_second); its `floor`, the calibrated reward of a good
response, lets `label` drop pairs of two bad answers); `llm` asks a local causal LM in the MT-Bench /
AlpacaEval pairwise style. Adding a judge is one class with these two methods, one `Judge` row of `JUDGES` (its
label gap, its report column, and how the report gets its win rate: from a value evaluate stored, or by asking it),
and one test; label and report read everything else from the row.

The LLM judge reads the judge's next-token distribution after the verdict question, restricted to the three
verdict letters (A, B, C = tie), instead of sampling a verdict: one forward pass per comparison, deterministic, and
a tie is a probability, not a parse failure. Each pair is asked in both orders and the two answers averaged, so a
judge that always picks the first answer scores every pair 0.5 (position bias cancels; tested).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain import progress, stats

PAIRWISE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. Choose the assistant that follows the user's instructions and answers the "
    "user's question better, considering correctness, helpfulness, relevance and level of detail. Do not let the "
    "order of the responses, their length, or the assistants' names influence you. Reply with a single letter: "
    "\"A\" if assistant A is better, \"B\" if assistant B is better, \"C\" for a tie.\n\n"
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
VERDICTS = ("A", "B", "C")


@dataclass
class LlmJudgeParams:
    """The LLM judge: a local causal LM and its pairwise prompt."""

    model: str = "models/sft"
    """A checkpoint, an adapter chain or a hub id. On CPU the bundled SmolLM2 is a plumbing check only: a 135M
    model is no judge of quality. profiles/gpu.yaml names a real one."""
    template: str = PAIRWISE_TEMPLATE
    """Must contain {question}, {answer_a} and {answer_b}, and ask for A, B or C (tie)."""
    max_answer_chars: int = 2000
    """Each answer is cut to this many characters before it goes into the prompt (and the cut is marked)."""
    batch_size: int = 8
    backend: Literal["auto", "hf", "vllm"] = "auto"
    """Who reads the verdict probabilities: HF (a forward pass per batch) or vLLM (the log-prob of each verdict
    letter as a one-token continuation, prefix-cached); 'auto' as `generate.backend` (posttrain.sampling)."""

    def __post_init__(self) -> None:
        missing = [k for k in ("{question}", "{answer_a}", "{answer_b}") if k not in self.template]
        if missing:
            raise ValueError(f"template must contain {missing}")
        if self.max_answer_chars < 1 or self.batch_size < 1:
            raise ValueError("max_answer_chars and batch_size must be >= 1")


def both_orders(p_first_ab: float, p_first_ba: float) -> float:
    """P(a better than b) from a judge asked (a, b) and then (b, a): the mean of P(a wins as first) and
    P(a wins as second) = 1 - P(b wins as first). A judge that always prefers the first answer gives 0.5."""
    return (p_first_ab + (1.0 - p_first_ba)) / 2


def round_robin(n: int, prefer: Callable[[list[tuple[int, int]]], list[float]]) -> list[float]:
    """Score n samples by their mean probability of beating each other sample (Borda count on probabilities)."""
    pairs = list(itertools.combinations(range(n), 2))
    won = [0.0] * n
    for (i, j), p in zip(pairs, prefer(pairs), strict=True):
        won[i] += p
        won[j] += 1 - p
    return [w / max(n - 1, 1) for w in won]


class VerifierJudge:
    """The gold verifier of each prompt (posttrain.tasks.score)."""

    def __init__(self, **_context) -> None:
        from posttrain import tasks

        self.score = tasks.score

    def _gold(self, rows: list[dict], responses: list[list[str]]) -> list[list[float]]:
        out = []
        for i, (row, texts) in enumerate(zip(rows, responses, strict=True), start=1):
            if row.get("verifier") is None:
                raise ValueError(f"row {i}: field 'verifier': null: judge 'verifier' needs one (use judge "
                                 "'reward_model' or 'llm' for data without gold answers)")
            try:
                out.append([self.score(row["verifier"], t) for t in texts])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"row {i}: field 'verifier': {e!r}") from e
        return out

    def scores(self, rows: list[dict], samples: list[list[str]]) -> list[list[float]]:
        return self._gold(rows, samples)

    def prefer(self, rows: list[dict], first: list[str], second: list[str]) -> list[float]:
        gold = self._gold(rows, [[a, b] for a, b in zip(first, second, strict=True)])
        return [stats.win(ga, gb) for ga, gb in gold]


class RewardModelJudge:
    """The reward_model stage's Bradley-Terry model: P(first better) = sigma(r_first - r_second)."""

    def __init__(self, reward_model: str, device: torch.device, max_len: int, batch_size: int = 32,
                 trust_remote_code: bool = False, **_context) -> None:
        from posttrain import reward

        self.model, self.tok = reward.load(reward_model, device, trust_remote_code)
        self.max_len, self.batch_size = max_len, batch_size
        self.floor = reward.threshold(reward_model)
        """The reward below which a response looks rejected rather than chosen (None: not calibrated)."""

    def _rewards(self, rows: list[dict], responses: list[str]) -> list[float]:
        from posttrain import reward

        convs = [r["messages"] + [{"role": "assistant", "content": s}] for r, s in zip(rows, responses, strict=True)]
        return reward.score(self.model, self.tok, convs, self.batch_size, self.max_len)

    def scores(self, rows: list[dict], samples: list[list[str]]) -> list[list[float]]:
        flat_rows = [r for r, ss in zip(rows, samples, strict=True) for _ in ss]
        flat = iter(self._rewards(flat_rows, [s for ss in samples for s in ss]))
        return [[next(flat) for _ in ss] for ss in samples]

    def prefer(self, rows: list[dict], first: list[str], second: list[str]) -> list[float]:
        ra, rb = self._rewards(rows, first), self._rewards(rows, second)
        return [bradley_terry(a, b) for a, b in zip(ra, rb, strict=True)]


def _question(messages: list[dict]) -> str:
    """The conversation up to the answer, as the judge reads it: the user turn alone, or every turn labelled."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


class LlmJudge:
    """Pairwise comparison by a local causal LM, both orders asked and averaged (see the module docstring)."""

    def __init__(self, llm: LlmJudgeParams, device: torch.device, model=None, tok=None,
                 trust_remote_code: bool = False, **_context) -> None:
        from posttrain import modeling

        self.params = llm
        if model is None:
            if Path(llm.model).exists():
                tok = modeling.stage_tokenizer(llm.model)
                model = modeling.load_chain(llm.model, device, trust_remote_code)
            else:  # a hub id, for users with a network
                model, tok = modeling.build_model(llm.model, 0, trust_remote_code)
                model = model.to(device)
        self.model, self.tok = model.eval(), tok
        self.tok.padding_side = "left"
        ids = [self.tok.encode(v, add_special_tokens=False) for v in VERDICTS]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"judge tokenizer: the verdicts {VERDICTS} must be one token each, got {ids}")
        self.verdict_ids = [i[0] for i in ids]
        from posttrain import sampling

        self.backend = sampling.backend_for(llm.backend, device)
        self._engine = None

    def _clip(self, text: str) -> str:
        n = self.params.max_answer_chars
        return text if len(text) <= n else text[:n] + " [...]"

    def render(self, messages: list[dict], a: str, b: str) -> str:
        from posttrain import modeling

        content = self.params.template.format(question=_question(messages), answer_a=self._clip(a),
                                              answer_b=self._clip(b))
        return modeling.render_prompt(self.tok, [{"role": "user", "content": content}])

    def verdicts(self, texts: list[str]) -> torch.Tensor:
        """(N, 3) probabilities of A, B, C as the judge's first answer token, renormalised over the three."""
        return self._verdicts_vllm(texts) if self.backend == "vllm" else self._verdicts_hf(texts)

    def _verdicts_vllm(self, texts: list[str]) -> torch.Tensor:
        """vLLM's log-prob of each verdict letter as the one token after the prompt (`prompt_logprobs` of the prompt
        plus that letter; the shared prompt is prefix-cached), renormalised over the three as the HF path does."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from posttrain import sampling

        if not texts:
            return torch.zeros(0, 3)
        if self._engine is None:  # one engine for the judge's life: label asks once per prompt, report per model
            stack = contextlib.ExitStack()
            self._engine = stack.enter_context(sampling.vllm_engine(self.model, self.tok, seed=0))
            weakref.finalize(self, stack.close)
        ids = [self.tok(t, add_special_tokens=False).input_ids for t in texts]
        asks = [TokensPrompt(prompt_token_ids=x + [v]) for x in ids for v in self.verdict_ids]
        results = self._engine.generate(asks, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=True)
        logps = torch.tensor([r.prompt_logprobs[-1][v].logprob for r, v in
                              zip(results, self.verdict_ids * len(texts), strict=True)]).reshape(len(texts), 3)
        return logps.softmax(-1)

    @torch.no_grad()
    def _verdicts_hf(self, texts: list[str]) -> torch.Tensor:
        """(N, 3) probabilities of A, B, C as the judge's first answer token, renormalised over the three. Rows are
        left-padded, so positions come from the mask: a verdict must not depend on its batch-mates' lengths."""
        from posttrain import modeling

        device = next(self.model.parameters()).device
        out = []
        with progress.Progress("judging", len(texts), "verdict") as bar:
            for start in range(0, len(texts), self.params.batch_size):
                enc = self.tok(texts[start : start + self.params.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(device)
                logits = self.model(**enc, position_ids=modeling.positions(enc.attention_mask),
                                    logits_to_keep=1).logits[:, -1].float()
                out.append(logits[:, self.verdict_ids].softmax(-1).cpu())
                bar.update(len(enc.input_ids), int(enc.attention_mask.sum()))
        return torch.cat(out) if out else torch.zeros(0, 3)

    def prefer(self, rows: list[dict], first: list[str], second: list[str]) -> list[float]:
        texts = [self.render(r["messages"], a, b) for r, a, b in zip(rows, first, second, strict=True)]
        texts += [self.render(r["messages"], b, a) for r, a, b in zip(rows, first, second, strict=True)]
        v = self.verdicts(texts)
        n = len(rows)
        p_first = (v[:, 0] + v[:, 2] / 2).tolist()  # a tie counts half to each side
        return [both_orders(p_first[i], p_first[n + i]) for i in range(n)]

    def scores(self, rows: list[dict], samples: list[list[str]]) -> list[list[float]]:
        out = []
        for row, ss in zip(rows, samples, strict=True):
            def prefer(pairs, row=row, ss=ss):
                return self.prefer([row] * len(pairs), [ss[i] for i, _ in pairs], [ss[j] for _, j in pairs])

            out.append(round_robin(len(ss), prefer))
        return out


@dataclass(frozen=True)
class Judge:
    """One row of JUDGES: the judge and all that `label` and `report` need to know about it."""

    cls: Callable[..., Any]
    """Built with the shared context (`make`); has `scores(rows, samples)` and `prefer(rows, first, second)`."""
    gap: Callable[[float, float], float]
    """label: (label.margin, label.min_prob) -> the score gap a pair needs, in the judge's units."""
    column: str
    """report: the key of its win rate against the reference in the table; '{ref}' is the reference's name."""
    header: str
    """report: the column's header ('{ref}' as above)."""
    stored: str | None = None
    """report: the field of evaluate's answers.jsonl rows that holds this judge's value of an answer; a win rate is
    then `compare(value, the reference's value)` per prompt (None values skipped), with no judge to run. None: the
    report builds the judge and asks `prefer` (the reference's own row is left out: it ties itself)."""
    compare: Callable[[float, float], float] | None = None
    """report: P(an answer beats the reference's) from the two stored values."""
    needs: str = ""
    """report: what to set when the answers lack the `stored` field."""
    about: str = ""
    """report: one sentence on how its win rate is computed ('{ref}', '{llm}': the LLM judge's model)."""
    floor: bool = False
    """label: the judge has a calibrated floor (`floor`): label.reward_floor drops pairs whose chosen is below it."""
    gold: bool = False
    """The judge is the gold verifier: label measures the other judges' agreement with it."""


def bradley_terry(reward: float, ref: float) -> float:
    """P(first better) = sigma(r_first - r_ref)."""
    return 1 / (1 + math.exp(ref - reward))


JUDGES: dict[str, Judge] = {
    "verifier": Judge(VerifierJudge, gap=lambda margin, min_prob: margin, column="win_rate_vs_{ref}",
                      header="win rate vs {ref} (gold)", stored="score", compare=stats.win, gold=True),
    "reward_model": Judge(
        RewardModelJudge, gap=lambda margin, min_prob: math.log(min_prob / (1 - min_prob)), column="win_rate_rm",
        header="win rate vs {ref} (reward model)", stored="reward", compare=bradley_terry,
        needs="evaluate.reward_model: true", floor=True,
        about="Reward-model win rate: mean over prompts of sigma(r - r_{ref}), the `reward_model` stage's rewards of "
              "each answer."),
    "llm": Judge(
        LlmJudge, gap=lambda margin, min_prob: 2 * min_prob - 1, column="win_rate_llm",
        header="win rate vs {ref} (LLM judge)",
        about="LLM-judge win rate: `{llm}` compares each answer with `{ref}`'s, both orders asked and averaged, ties "
              "count half. Judges favour length: mean length is beside it."),
}


def make(name: str, **context):
    """The judge `name` of JUDGES. Every judge gets the same context (reward_model: its folder; device; max_len;
    batch_size; llm: LlmJudgeParams; trust_remote_code) and takes what it needs."""
    if name not in JUDGES:
        raise ValueError(f"judge {name!r} is not one of {sorted(JUDGES)}")
    return JUDGES[name].cls(**context)
