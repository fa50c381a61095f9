"""Left-padded batches: a row's samples and a judge's verdicts do not depend on the lengths of its batch-mates.

The tiny test model is re-initialised with weights of std 0.5: at the default 0.02 its logits barely depend on
position, so a forward that puts a padded row's tokens at the wrong positions still gives the same greedy tokens
and a test on it could not fail. At 0.5 the old shared prefill (no position ids) changed these rows.
"""

import pytest
import torch

from posttrain import judges, modeling, sampling

PROMPTS = [[{"role": "user", "content": c}] for c in (
    "Hi",
    "What is 12 + 30? Reply with only the number.",
    "Sort these numbers: 5, 3, 9, 1, 22, 17, 8 in ascending order, please.",
    "Hello there, how are you?",
)]


@pytest.fixture(scope="module")
def sharp():
    model, tok = modeling.build_model("tiny", 0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    return model.eval(), tok


def test_prompts_differ_in_token_length(sharp):
    _, tok = sharp
    lengths = {len(tok(modeling.render_prompt(tok, p), add_special_tokens=False).input_ids) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)


@pytest.mark.parametrize("n", [1, 3])
def test_greedy_rows_batched_equal_rows_sampled_alone(sharp, n):
    model, tok = sharp
    batched = sampling.sample_hf(model, tok, PROMPTS, n, 0.0, 8, 64, 0)
    alone = [sampling.sample_hf(model, tok, [p], n, 0.0, 8, 64, 0)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(set(row)) == 1 and row[0] for row in batched)  # greedy: n equal, non-empty samples


def test_llm_judge_verdicts_batched_equal_verdicts_alone(sharp):
    """With RoPE a constant shift of a row's positions cancels in one forward, so the judge is tried on a model of
    absolute positions (GPT-2's shape), where a left-padded row read without position ids gets other logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = sharp
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                       initializer_range=0.5)).eval()
    judge = judges.LlmJudge(judges.LlmJudgeParams(model="unused", batch_size=8), torch.device("cpu"), model, tok)
    texts = [judge.render(p, "1", "2") for p in PROMPTS]
    batched = judge.verdicts(texts)
    alone = torch.cat([judge.verdicts([t]) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_shared_prefix_batch_layout():
    """[shared prefix | left padding | own tokens]; the prefix is capped so every row keeps one own token."""
    k, ids, mask = modeling.shared_prefix_batch([[5, 6, 7, 8], [5, 6, 9], [5, 6, 7]], 0)
    assert k == 2
    assert ids.tolist() == [[5, 6, 7, 8], [5, 6, 0, 9], [5, 6, 0, 7]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 0, 1]]
    assert modeling.positions(mask).tolist() == [[0, 1, 2, 3], [0, 1, 1, 2], [0, 1, 1, 2]]
    assert modeling.shared_prefix_batch([[5, 6], [5, 6]], 0)[0] == 1  # equal rows: the last token stays own
    assert modeling.shared_prefix_batch([[5, 6, 7]], 0)[0] == 0  # one row: nothing to share
    assert modeling.shared_prefix_batch([[4, 6], [5, 6]], 0)[0] == 0


def test_the_batch_shares_its_chat_prefix(sharp):
    """The rows above share their system prompt and template: the sampler runs that prefix once (so the test
    above checks the shared path, not a fallback)."""
    _, tok = sharp
    rows = [tok(modeling.render_prompt(tok, p), add_special_tokens=False).input_ids for p in PROMPTS]
    k = modeling.shared_prefix_batch(rows, tok.pad_token_id)[0]
    assert k >= 5 and all(r[:k] == rows[0][:k] for r in rows)
