"""prepare: prompts with their verifiers (train / eval splits) and SFT demonstrations.

    dvc repro prepare
    python -m stages.prepare --out data/prepare

With `prepare.source: builtin` (default) the bundled suite of verifiable tasks (posttrain.tasks) is generated from
`common.seed`: the train and eval splits never share a prompt, and the SFT demonstrations are written by the
task solver, so they score 1.0. Any other `source` is a local .jsonl/.parquet file or a hub dataset name holding
chat `messages` rows (SFT demos; their user turns become prompts with no verifier).

Outputs: `train.jsonl` and `eval.jsonl` (schema `prompts`), `sft.jsonl` (schema `sft`), `rm_prefs.jsonl` (schema
`prefs`: the reward model's offline pairs; builtin source only), `stats.json`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from posttrain import cli, io, tasks


@dataclass
class PrepareParams:
    source: str = "builtin"
    """'builtin' (the verifiable task suite), a local .jsonl/.parquet path, or a hub dataset id."""
    n_train: int = 600
    """Prompts for on-policy sampling; each yields at most one preference pair."""
    n_eval: int = 200
    """Held-out prompts; the CI half-width of a pass rate near 0.5 is ~1/sqrt(n_eval)."""
    n_sft: int = 320
    """Solver-written demonstrations (disjoint from eval)."""
    n_rm: int = 300
    """Offline preference pairs for the reward model (solver answer vs a near miss, or vs another prompt's
    answer), on prompts disjoint from every other split; 0 writes an empty rm_prefs.jsonl."""
    task_mix: dict[str, float] = field(default_factory=lambda: {"add": 1.0})
    """Relative weight of each task in every split; names from posttrain.tasks.TASKS."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.task_mix) - set(tasks.TASKS))
        if unknown:
            raise ValueError(f"task_mix: unknown task(s) {unknown}; known: {sorted(tasks.TASKS)}")
        if min(self.n_train, self.n_eval, self.n_sft) < 1:
            raise ValueError("n_train, n_eval and n_sft must each be >= 1")
        if self.n_rm < 0:
            raise ValueError(f"n_rm must be >= 0, got {self.n_rm}")
        if not self.task_mix or min(self.task_mix.values()) < 0 or sum(self.task_mix.values()) <= 0:
            raise ValueError("task_mix needs non-negative weights with a positive sum")


def _key(row: dict) -> str:
    return row["messages"][-1]["content"]


def builtin(params: PrepareParams, seed: int) -> tuple[list[dict], list[dict], list[dict], dict]:
    rng = random.Random(seed)
    names = sorted(params.task_mix)
    weights = [params.task_mix[n] for n in names]
    need = params.n_train + params.n_eval + params.n_sft
    seen: set[str] = set()
    rows: list[dict] = []
    for _ in range(need * 50):
        if len(rows) == need:
            break
        row = tasks.make_prompt(rng.choices(names, weights)[0], rng)
        if _key(row) in seen:  # distinct prompts, so no eval prompt is ever trained on
            continue
        seen.add(_key(row))
        rows.append(row)
    if len(rows) < need:
        raise ValueError(f"prepare: only {len(rows)} distinct prompts exist for task_mix {params.task_mix}, "
                         f"{need} asked (n_train + n_eval + n_sft)")
    for i, row in enumerate(rows):
        row["id"] = f"{row['task']}-{i:05d}"
    eval_rows = rows[: params.n_eval]
    train = rows[params.n_eval : params.n_eval + params.n_train]
    sft = [{"id": r["id"], "messages": r["messages"] + [{"role": "assistant",
                                                           "content": tasks.solve(r["verifier"], rng)}],
            "verifier": r["verifier"]}
           for r in rows[params.n_eval + params.n_train :]]
    stats = {"n_train": len(train), "n_eval": len(eval_rows), "n_sft": len(sft)}
    return train, eval_rows, sft, stats


def reward_pairs(params: PrepareParams, seed: int, taken: set[str]) -> list[dict]:
    """The reward model's offline preference data (what a human-labelled set is in RLHF): per fresh prompt, the
    solver's answer over a near miss (number tasks) or over the answer to another prompt of the same task.
    Drawn from its own random stream, so the other splits do not change with `n_rm`."""
    rng = random.Random(seed + 7919)
    names = sorted(params.task_mix)
    weights = [params.task_mix[n] for n in names]
    pairs: list[dict] = []
    for _ in range(params.n_rm * 50):
        if len(pairs) == params.n_rm:
            break
        task = rng.choices(names, weights)[0]
        row, other = tasks.make_prompt(task, rng), tasks.make_prompt(task, rng)
        if _key(row) in taken:
            continue
        chosen = tasks.solve(row["verifier"], rng)
        rejected = tasks.near_miss(row["verifier"], rng) or tasks.solve(other["verifier"], rng)
        good, bad = tasks.score(row["verifier"], chosen), tasks.score(row["verifier"], rejected)
        if good <= bad or chosen.strip() == rejected.strip():
            continue
        taken.add(_key(row))
        pairs.append({"id": f"rm-{task}-{len(pairs):05d}", "prompt": row["messages"], "chosen": chosen,
                      "rejected": rejected, "chosen_score": good, "rejected_score": bad})
    return pairs


def external(params: PrepareParams, seed: int) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Chat `messages` rows from a local file or a hub dataset: demos for SFT, their user turns as prompts."""
    src = Path(params.source)
    if src.suffix == ".jsonl":
        rows = io.read_jsonl(src, "chat")
    else:
        import datasets

        ds = (datasets.load_dataset("parquet", data_files=str(src), split="train") if src.suffix == ".parquet"
              else datasets.load_dataset(params.source, split="train"))
        rows = io.check_rows(params.source, [dict(r) for r in ds], "chat")
    raw = [{"id": str(r.get("id", i)), "messages": r["messages"]} for i, r in enumerate(rows)]
    rng = random.Random(seed)
    rng.shuffle(raw)
    prompts = [{"id": r["id"], "task": "external", "messages": r["messages"][:-1], "verifier": None}
               for r in raw if r["messages"][-1]["role"] == "assistant"]
    eval_rows, train = prompts[: params.n_eval], prompts[params.n_eval : params.n_eval + params.n_train]
    held = {r["id"] for r in eval_rows}
    sft = [r for r in raw if r["id"] not in held][: params.n_sft]
    return train, eval_rows, sft, {"n_train": len(train), "n_eval": len(eval_rows), "n_sft": len(sft)}


def run(common, params: PrepareParams, args) -> dict:
    make = builtin if params.source == "builtin" else external
    train, eval_rows, sft, stats = make(params, common.seed)
    rm = []
    if params.source == "builtin":  # a user's chat data carries no pairs: train a reward model on your own prefs
        taken = {_key(r) for r in train + eval_rows} | {r["messages"][-2]["content"] for r in sft}
        rm = reward_pairs(params, common.seed, taken)
    stats["n_rm"] = len(rm)
    with io.atomic_dir(args.out) as tmp:
        io.write_jsonl(tmp / "rm_prefs.jsonl", rm)
        io.write_jsonl(tmp / "train.jsonl", train)
        io.write_jsonl(tmp / "eval.jsonl", eval_rows)
        io.write_jsonl(tmp / "sft.jsonl", sft)
        io.write_json(tmp / "stats.json", stats)
    return stats


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="output folder")
    return cli.execute("prepare", PrepareParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
