"""Where token-level credit lands on worked answers: two measurements of the mechanism, not of the end score.

Both read rejected responses of worked tasks (`posttrain.tasks.PLANS`), whose first wrong step the verifier
locates as a character span (`tasks.steps`), and per-token values laid out like `posttrain.preference.encode`'s
completion tokens (the layout of the `reference` and `guidance` caches). `token_spans` maps those tokens to
characters of the response.

- Blame localisation (`blame`): for each rejected response, is its lowest-r_hat token (the one token guidance
  blames most: TGDPO gives it the largest weight on the rejected side) inside the first wrong step? Against the
  chance rate of a token drawn uniformly from the response: step tokens / response tokens.
- Shared-prefix displacement (`displacement`): per rejected response, the mean over the tokens before its first
  wrong step (correct steps, mostly shared with the chosen answer) of log pi_policy - log pi_ref. Sequence-level
  DPO pushes every token of a rejected answer down, these included; token guidance should push them less.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from posttrain import preference, stats, tasks

Span = tuple[int, int]


def token_spans(tok, pair: dict, side: str, max_len: int) -> list[Span | None]:
    """The character span, within `pair[side]`, of each completion token `preference.encode(tok, pair, max_len)`
    gives for that side; None for a token outside the response text (the end-of-turn tokens of the template).

    The rendered conversation is tokenised again with offsets; a tokenizer whose offsets tokenisation differs from
    its chat-template tokenisation is refused rather than mapped wrongly.
    """
    enc = preference.encode(tok, pair, max_len)
    ids, n = enc[f"{side}_ids"], len(enc["prompt_ids"])
    text = pair[side]
    full = tok.apply_chat_template(pair["prompt"] + [{"role": "assistant", "content": text}], tokenize=False)
    prompt = tok.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=False)
    start = full.find(text, len(os.path.commonprefix([prompt, full])))
    if start < 0:
        raise ValueError(f"pair {pair.get('id')!r}: the chat template does not render the {side} text verbatim")
    again = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    if again["input_ids"][: n + len(ids)] != enc["prompt_ids"] + ids:
        raise ValueError(f"pair {pair.get('id')!r}: tokenising the rendered chat with offsets gives other ids than "
                         "the chat template: cannot map tokens to characters")
    end = start + len(text)
    spans: list[Span | None] = []
    for a, b in again["offset_mapping"][n : n + len(ids)]:
        lo, hi = max(a, start), min(b, end)
        spans.append((lo - start, hi - start) if lo < hi else None)
    return spans


def _overlaps(span: Span | None, window: Span) -> bool:
    return span is not None and span[0] < window[1] and span[1] > window[0]


def _before(spans: list[Span | None], wrong: Span) -> list[int]:
    """The response tokens that end before the `wrong` span starts (the correct steps)."""
    return [j for j, s in enumerate(spans) if s is not None and s[1] <= wrong[0]]


def blame_one(rhat: list[float], spans: list[Span | None], wrong: Span) -> tuple[bool, float] | None:
    """(the lowest-r_hat response token lies in the `wrong` span, step tokens / response tokens) for one response;
    the first minimum on ties. None when no response token overlaps `wrong` (the step was cut off by max_len, or
    is missing at the end of an answer that stopped early)."""
    if len(rhat) != len(spans):
        raise ValueError(f"{len(rhat)} r_hat values for {len(spans)} tokens: built with another tokenizer or max_len")
    response = [j for j, s in enumerate(spans) if s is not None]
    inside = [j for j in response if _overlaps(spans[j], wrong)]
    if not inside:
        return None
    lowest = min(response, key=lambda j: rhat[j])
    return lowest in inside, len(inside) / len(response)


def rhat_by_part(rhat: list[float], spans: list[Span | None], wrong: Span) -> tuple[float | None, float | None]:
    """(mean r_hat of the response tokens that end before the `wrong` span starts, mean r_hat of the tokens in it);
    None for a part without a token. Why it matters: with r_hat below zero on the correct steps, TGDPO pushes them
    down harder than DPO does (`displacement` measures how far). On the tokens the chosen answer shares, its weights
    beta (1 + alpha beta r_hat) (chosen side) and beta (1 - alpha beta r_hat) (rejected side) leave
    2 alpha beta^2 r_hat times their log-ratio in the margin, where DPO's cancel; on the others the rejected weight
    exceeds beta. The figure averages both kinds: the tokens before the wrong step are not all shared."""
    if len(rhat) != len(spans):
        raise ValueError(f"{len(rhat)} r_hat values for {len(spans)} tokens: built with another tokenizer or max_len")
    before = [rhat[j] for j in _before(spans, wrong)]
    inside = [rhat[j] for j, s in enumerate(spans) if _overlaps(s, wrong)]
    return (statistics.fmean(before) if before else None), (statistics.fmean(inside) if inside else None)


def prefix_shift(logp: list[float], ref: list[float], spans: list[Span | None], wrong: Span) -> float | None:
    """Mean of logp - ref over the response tokens that end before the `wrong` span starts; None when there is
    none (the first step is already wrong)."""
    if not len(logp) == len(ref) == len(spans):
        raise ValueError(f"{len(logp)} policy and {len(ref)} reference log-probs for {len(spans)} tokens")
    before = _before(spans, wrong)
    if not before:
        return None
    return statistics.fmean(logp[j] - ref[j] for j in before)


def _mean_ci(values: list[float], n_boot: int, seed: int) -> dict:
    if not values:
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")]}
    return {"mean": statistics.fmean(values), "ci": list(stats.bootstrap_ci(values, n_boot, seed))}


def blame(rows: Iterable[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Blame localisation over rejected responses, each a dict with `rhat`, `spans` and `wrong` (the first wrong
    step's span, or None). Returns the share whose lowest-r_hat token is in the first wrong step (`hit_rate`),
    the chance rate (mean step tokens / response tokens), their per-response difference (`lift`), each with a
    95% bootstrap interval over responses, and what was left out and why; and, on the same responses, the mean
    r_hat of the tokens before the first wrong step (those with any: `rhat_before_wrong_step`, its own `n`) and in
    it (`rhat_in_wrong_step`), per response then over responses (`rhat_by_part`)."""
    hits, chance, before, inside, dropped = [], [], [], [], Counter()
    for r in rows:
        if r["wrong"] is None:
            dropped["no_wrong_step"] += 1
            continue
        got = blame_one(r["rhat"], r["spans"], r["wrong"])
        if got is None:
            dropped["wrong_step_has_no_token"] += 1
            continue
        hits.append(float(got[0]))
        chance.append(got[1])
        pre, step = rhat_by_part(r["rhat"], r["spans"], r["wrong"])
        before += [pre] if pre is not None else []
        inside.append(step)
    return {"n": len(hits), "dropped": dict(dropped), "hit_rate": _mean_ci(hits, n_boot, seed),
            "chance": _mean_ci(chance, n_boot, seed),
            "lift": _mean_ci([h - c for h, c in zip(hits, chance, strict=True)], n_boot, seed),
            "rhat_before_wrong_step": {"n": len(before), **_mean_ci(before, n_boot, seed)},
            "rhat_in_wrong_step": _mean_ci(inside, n_boot, seed)}


def displacement(rows: Iterable[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Shared-prefix displacement over rejected responses, each a dict with `id`, `logp` (policy), `ref`, `spans`
    and `wrong`: the mean over responses of `prefix_shift`, with a 95% bootstrap interval; `values` keeps each
    response's figure by id, for `paired_difference` between two policies."""
    values, dropped = {}, Counter()
    for r in rows:
        if r["wrong"] is None:
            dropped["no_wrong_step"] += 1
            continue
        got = prefix_shift(r["logp"], r["ref"], r["spans"], r["wrong"])
        if got is None:
            dropped["no_token_before_wrong_step"] += 1
            continue
        values[r["id"]] = got
    return {"n": len(values), "dropped": dict(dropped), **_mean_ci(list(values.values()), n_boot, seed),
            "values": values}


def paired_difference(a: dict[str, float], b: dict[str, float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of a[k] - b[k] over the keys both have, with a 95% bootstrap interval over those keys."""
    keys = sorted(set(a) & set(b))
    return {"n": len(keys), **_mean_ci([a[k] - b[k] for k in keys], n_boot, seed)}


def locate(tok, pairs: list[dict], specs: dict[str, dict], max_len: int) -> tuple[list[dict], Counter]:
    """For each pair of a worked task: its id, the token spans of its rejected completion and the first wrong
    step of the rejected response (`tasks.steps`). Pairs whose prompt has no worked verifier are left out, and
    counted."""
    out, skipped = [], Counter()
    for pair in pairs:
        spec = specs.get(pair["id"])
        if spec is None or spec.get("type") not in tasks.PLANS:
            skipped["not_a_worked_task"] += 1
            continue
        out.append({"id": pair["id"], "text": pair["rejected"],
                    "spans": token_spans(tok, pair, "rejected", max_len),
                    "wrong": tasks.steps(spec, pair["rejected"]).first_wrong_span})
    return out, skipped


def attach(located: list[dict], values: dict[str, dict], key: str) -> list[dict]:
    """`located` rows with the rejected side's per-token values of a cache (`preference.read_token_values`) as
    `key`; a pair the cache lacks is an error (the cache was built on other pairs)."""
    missing = [r["id"] for r in located if r["id"] not in values]
    if missing:
        raise ValueError(f"no cached values for pair(s) {missing[:3]} ({len(missing)} in all)")
    return [r | {key: values[r["id"]]["rejected"]} for r in located]


def pick_examples(located: list[dict], n: int) -> list[dict]:
    """The first `n` rejected responses (by id) whose first wrong step is not the first line: they share correct
    steps with the chosen answer, where sequence-level and token-level credit differ."""
    return [r for r in sorted(located, key=lambda r: r["id"]) if r["wrong"] is not None and r["wrong"][0] > 0][:n]


def panel(label: str, text: str, spans: list[Span | None], values: list[float], wrong: Span | None) -> dict:
    """One response for `plot_pairs`: its tokens as text pieces with their values, those in `wrong` marked."""
    keep = [(s, v) for s, v in zip(spans, values, strict=True) if s is not None]
    return {"label": label, "pieces": [text[a:b] for (a, b), _ in keep], "values": [v for _, v in keep],
            "marked": [wrong is not None and _overlaps(s, wrong) for s, _ in keep]}


def plot_pairs(panels: list[dict], path: str | Path, title: str) -> None:
    """Each panel's tokens as cells coloured by their value (red: low r_hat, blamed; blue: high), one row per
    line of the response, tokens of the first wrong step boxed. Each panel is scaled by its own largest |value|
    (given in its label): guidance sources differ in units (a log-ratio, a standardised reward), and what the
    picture shows is where within a response the blame falls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    if not panels:  # still a picture, so a pipeline's output exists: it says there was nothing to draw
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, title, ha="center", va="center", fontsize=10)
        _save(fig, path)
        return
    norm, cmap = TwoSlopeNorm(vcenter=0.0, vmin=-1.0, vmax=1.0), plt.get_cmap("RdBu")
    cells, labels, row, width = [], [], 0, max(45, len(title))  # room for the colour bar's label and the title
    for p in panels:
        scale = max((abs(v) for v in p["values"]), default=0.0) or 1.0
        label = f"{p['label']} (max |r_hat| {scale:.3g})"
        labels.append((row, label))
        width = max(width, len(label))
        row, x = row + 1, 0
        for piece, raw, marked in zip(p["pieces"], p["values"], p["marked"], strict=True):
            value = raw / scale
            for k, part in enumerate(piece.split("\n")):
                if k:
                    row, x = row + 1, 0
                if part:
                    cells.append((x, row, part, value, marked))
                    x += len(part)
                    width = max(width, x)
        row += 2
    # a monospace character at 9 pt is 0.6 x 9 / 72 = 0.075 in wide; the axes take 0.96 of the figure's width
    fig, ax = plt.subplots(figsize=(0.078 * (width + 1), 0.3 * row + 1.2))
    fig.subplots_adjust(left=0.02, right=0.98)
    boxes: dict[int, list[int]] = {}
    for x, y, part, value, marked in cells:
        ax.add_patch(Rectangle((x, -y - 0.85), len(part), 0.8, facecolor=cmap(norm(value)), edgecolor="none"))
        ax.text(x + 0.05, -y - 0.45, part, family="monospace", fontsize=9, va="center", ha="left")
        if marked:
            boxes.setdefault(y, []).extend((x, x + len(part)))
    for y, xs in boxes.items():  # one box per line around the first wrong step's tokens
        ax.add_patch(Rectangle((min(xs), -y - 0.9), max(xs) - min(xs), 0.9, fill=False, edgecolor="black",
                               linewidth=1.2))
    for y, text in labels:
        ax.text(0, -y - 0.45, text, fontsize=9, fontweight="bold", va="center", ha="left")
    ax.set_xlim(0, width + 1)
    ax.set_ylim(-row, 0)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, orientation="horizontal", fraction=0.04,
                 pad=0.02, label="r_hat / its panel's max |r_hat| (boxed: the first wrong step)")
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
