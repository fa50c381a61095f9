"""label: turn sampled responses into preference pairs with a judge (the gold verifier by default).

    dvc repro label
    python -m stages.label --samples data/generate/samples.jsonl --out data/label

Per prompt, every sample is scored; the best becomes `chosen` and the worst `rejected` when their scores differ by
at least `label.margin` (and strictly). Dropped, and counted in `stats.json`: prompts whose samples all tie (or
differ by less than the margin), pairs whose two texts are equal, empty responses, and repeated prompts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from posttrain import cli, io, tasks


@dataclass
class LabelParams:
    judge: Literal["verifier"] = "verifier"
    """Who scores samples: 'verifier' = each prompt's gold verifier spec."""
    margin: float = 0.5
    """Minimum score gap between chosen and rejected; 0.5 keeps only clear wins (e.g. right vs wrong answer)."""

    def __post_init__(self) -> None:
        if not 0 <= self.margin <= 1:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")


def make_pairs(rows: list[dict], margin: float, source: str) -> tuple[list[dict], Counter]:
    dropped: Counter = Counter()
    seen: set[str] = set()
    pairs = []
    for i, row in enumerate(rows, start=1):
        if row["verifier"] is None:
            raise io.InputError(f"{source}: row {i}: field 'verifier': null, but label.judge is 'verifier'")
        key = row["messages"][-1]["content"]
        if key in seen:
            dropped["duplicate_prompt"] += 1
            continue
        seen.add(key)
        candidates = [s for s in row["samples"] if s.strip()]
        dropped["empty_response"] += len(row["samples"]) - len(candidates)
        if len(candidates) < 2:
            dropped["fewer_than_two_responses"] += 1
            continue
        try:
            scored = sorted(((tasks.score(row["verifier"], s), s) for s in candidates), key=lambda t: -t[0])
        except (KeyError, TypeError, ValueError) as e:
            raise io.InputError(f"{source}: row {i}: field 'verifier': {e!r}") from e
        (best, chosen), (worst, rejected) = scored[0], scored[-1]
        if best <= worst or best - worst < margin:
            dropped["tie"] += 1
            continue
        if chosen.strip() == rejected.strip():
            dropped["chosen_equals_rejected"] += 1
            continue
        pairs.append({"id": row["id"], "prompt": row["messages"], "chosen": chosen, "rejected": rejected,
                      "chosen_score": best, "rejected_score": worst})
    return pairs, dropped


def run(common, params: LabelParams, args) -> dict:
    rows = io.read_jsonl(args.samples, "samples")
    pairs, dropped = make_pairs(rows, params.margin, args.samples)
    if not pairs:
        raise io.InputError(f"{args.samples}: no preference pair survived (dropped: {dict(dropped)}); sample more "
                            "responses per prompt, raise the temperature or lower label.margin")
    stats = {"prompts": len(rows), "pairs": len(pairs), "dropped": dict(dropped)}
    with io.atomic_dir(args.out) as tmp:
        io.write_jsonl(tmp / "prefs.jsonl", pairs)
        io.write_json(tmp / "stats.json", stats)
    return {"prompts": len(rows), "pairs": len(pairs)} | {f"dropped_{k}": v for k, v in dropped.items()}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--samples", required=True, help="sampled responses (JSONL, schema `samples`)")
    p.add_argument("--out", required=True, help="output folder: prefs.jsonl, stats.json")
    return cli.execute("label", LabelParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
