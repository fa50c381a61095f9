"""prepare: prompts (train / eval splits), SFT demonstrations and preference pairs, from the bundled tasks,
reasoning-gym or your own data set.

    dvc repro prepare
    python -m stages.prepare --out data/prepare

`prepare.source` picks where the data comes from:
- `builtin` (default): the bundled suite of verifiable tasks (posttrain.tasks), generated from `common.seed`; the
  train and eval splits never share a prompt, the SFT demonstrations are the task solver's (they score 1.0), the
  reward model's prompts are fresh ones (`generate` samples the SFT policy on them and the verifier ranks the
  samples, as labellers rank an SFT model's outputs in RLHF), and its optional offline pairs (`n_rm`) are the
  solver's answer over a near miss.
- `reasoning_gym`: the reasoning-gym data sets named in `prepare.reasoning_gym` (name -> size, config); every prompt's
  verifier spec names its data set and entry, so `label` and `evaluate` score with reasoning-gym's `score_answer`;
  the SFT demos are the entries' reference answers; the reward model's offline pairs are an entry's answer over
  another entry's, and its prompts the entries left after those.
- anything else: a local .jsonl/.json/.parquet/.csv file, a saved `datasets` folder or a hub id (`subset`, `split`)
  in one of the formats of `posttrain.formats.FORMATS` (detected from the columns, or named in `prepare.format`).
  Preference data gives prompts, SFT demos (the chosen responses, unless `sft_source` names demos) and pairs;
  SFT data gives prompts and demos; prompt-only data gives prompts and needs `sft_source`. None has a verifier.

`prepare.pairs` picks where the preference pairs come from: `on_policy` (sample the SFT policy in `generate`, judge
in `label`) or `dataset` (a preference source's own pairs, shuffled and split: `n_eval` held out, up to `n_train`
trained on; `generate` and `label` pass them through).

Outputs: `train.jsonl`, `eval.jsonl` and `rm_prompts.jsonl` (schema `prompts`; the last empty for a user's data),
`sft.jsonl` (schema `sft`), `rm_prefs.jsonl` (schema `prefs`: the reward model's offline pairs: builtin /
reasoning-gym near misses, or the user's train pairs), `prefs.jsonl`
and `heldout_prefs.jsonl` (the user's train / held-out pairs in `dataset` mode; empty otherwise), `stats.json`
(the format read and every dropped row by reason, `posttrain.formats`). A split left with no rows is an error.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from posttrain import cli, formats, io, reasoning_gym, tasks

log = logging.getLogger("prepare")
SOURCES = ("builtin", "reasoning_gym")
"""The generated sources; any other `source` is a user's data set."""


@dataclass
class PrepareParams:
    source: str = "builtin"
    """'builtin' (the verifiable task suite), 'reasoning_gym', or a user data set: a local .jsonl/.json/.parquet/
    .csv file, a saved `datasets` folder, or a hub dataset id."""
    format: str = "auto"
    """A user data set's format: 'auto' (from its columns) or a key of posttrain.formats.FORMATS."""
    subset: str = ""
    """Hub data sets only: the configuration (subset) name."""
    split: str = "train"
    """Hub data sets and saved DatasetDict folders: the split to read."""
    pairs: formats.Pairs = "on_policy"
    """'on_policy': generate samples the SFT policy and label judges them; 'dataset': the source's own preference
    pairs train the reward model and every preference variant (generate and label pass through)."""
    sft_source: str = ""
    """SFT demonstrations (a `messages` or `prompt_completion` data set) replacing the default ones; needed for a
    prompt-only source."""
    n_train: int = 600
    """Prompts for on-policy sampling (each yields at most one pair), or, in dataset mode, training pairs."""
    n_eval: int = 200
    """Held-out prompts (or pairs); the CI half-width of a pass rate near 0.5 is ~1/sqrt(n_eval)."""
    n_sft: int = 320
    """SFT demonstrations (on prompts disjoint from eval)."""
    n_rm: int = 0
    """Offline preference pairs for the reward model (generated sources: solver answer vs a near miss, or vs
    another prompt's answer), on prompts disjoint from every other split; 0 writes an empty rm_prefs.jsonl."""
    n_rm_prompts: int = 600
    """Generated sources: fresh prompts (disjoint from every other split) on which `generate` samples the SFT policy
    for the reward model, whose pairs the verifier then ranks (stages/reward_model.py); 0 writes none."""
    task_mix: dict[str, float] = field(default_factory=lambda: {"add": 1.0})
    """Builtin source: relative weight of each task in every split; names from posttrain.tasks.TASKS."""
    reasoning_gym: dict[str, dict[str, Any]] = field(default_factory=dict)
    """reasoning_gym source: data set name -> {size: entries to generate, config: its config fields}."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.task_mix) - set(tasks.TASKS))
        if unknown:
            raise ValueError(f"task_mix: unknown task(s) {unknown}; known: {sorted(tasks.TASKS)}")
        if min(self.n_train, self.n_eval, self.n_sft) < 1:
            raise ValueError("n_train, n_eval and n_sft must each be >= 1")
        if self.n_rm < 0 or self.n_rm_prompts < 0:
            raise ValueError(f"n_rm and n_rm_prompts must be >= 0, got {self.n_rm}, {self.n_rm_prompts}")
        if not self.task_mix or min(self.task_mix.values()) < 0 or sum(self.task_mix.values()) <= 0:
            raise ValueError("task_mix needs non-negative weights with a positive sum")
        if self.format != "auto" and self.format not in formats.FORMATS:
            raise ValueError(f"format: {self.format!r} is not 'auto' or one of {sorted(formats.FORMATS)}")
        if self.pairs == "dataset" and self.source in SOURCES:
            raise ValueError(f"pairs: 'dataset' needs a preference data set as source, not {self.source!r}")
        if self.source == "reasoning_gym":
            if not self.reasoning_gym:
                raise ValueError("source 'reasoning_gym' needs prepare.reasoning_gym: {name: {size, config}}")
            known = reasoning_gym.names()
            for name, spec in self.reasoning_gym.items():
                if name not in known:
                    raise ValueError(f"reasoning_gym: unknown data set {name!r}; known: {', '.join(known)}")
                extra = sorted(set(spec) - {"size", "config"})
                size = spec.get("size")
                if extra or not isinstance(size, int) or isinstance(size, bool) or size < 1 or \
                        not isinstance(spec.get("config", {}), dict):
                    raise ValueError(f"reasoning_gym.{name}: expected {{size: int >= 1, config: mapping}}, got {spec}")


def builtin(params: PrepareParams, seed: int) -> tuple[list[dict], list[dict], list[dict], dict]:
    rng = random.Random(seed)
    need = params.n_train + params.n_eval + params.n_sft
    rows = tasks.draw(rng, params.task_mix, need, set())  # distinct prompts: no eval prompt is ever trained on
    if len(rows) < need:
        raise ValueError(f"prepare: only {len(rows)} distinct prompts exist for task_mix {params.task_mix}, "
                         f"{need} asked (n_train + n_eval + n_sft)")
    for i, row in enumerate(rows):
        row["id"] = io.prompt_id(row["task"], i)
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
        if io.prompt_key(row) in taken:
            continue
        chosen = tasks.solve(row["verifier"], rng)
        rejected = tasks.near_miss(row["verifier"], rng) or tasks.solve(other["verifier"], rng)
        good, bad = tasks.score(row["verifier"], chosen), tasks.score(row["verifier"], rejected)
        if good <= bad or chosen.strip() == rejected.strip():
            continue
        taken.add(io.prompt_key(row))
        pairs.append({"id": f"rm-{io.prompt_id(task, len(pairs))}", "prompt": row["messages"], "chosen": chosen,
                      "rejected": rejected, "chosen_score": good, "rejected_score": bad})
    return pairs


def _split(rows: list[dict], params: PrepareParams, what: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(eval, train, rest) of already shuffled rows; an empty eval or train split is an error."""
    eval_rows, train = rows[: params.n_eval], rows[params.n_eval : params.n_eval + params.n_train]
    if not eval_rows or not train:
        raise io.InputError(f"{params.source}: {len(rows)} usable {what} leave the "
                            f"{'eval' if not eval_rows else 'train'} split empty (n_eval={params.n_eval}): "
                            "add rows or lower prepare.n_eval")
    return eval_rows, train, rows[params.n_eval + params.n_train :]


def from_reasoning_gym(params: PrepareParams, seed: int) -> tuple[list[dict], list[dict], list[dict], list[dict],
                                                                   list[dict], dict]:
    """reasoning-gym entries as prompts with verifiers: eval, train, SFT demos (the reference answers), then from the
    entries left the reward model's offline pairs (an entry's answer over another entry's of the same data set) and
    its prompts (fewer than asked when the entries run out)."""
    rows, seen, dropped = [], set(), Counter()
    for name, spec in sorted(params.reasoning_gym.items()):
        for row in reasoning_gym.prompts(name, spec.get("config", {}), seed, spec["size"]):
            if io.prompt_key(row) in seen:
                dropped["duplicate_prompt"] += 1
                continue
            seen.add(io.prompt_key(row))
            rows.append(row)
    rng = random.Random(seed)
    rng.shuffle(rows)
    need = params.n_train + params.n_eval + params.n_sft
    if len(rows) < need:
        raise io.InputError(f"prepare.reasoning_gym: {len(rows)} distinct entries, {need} needed (n_train + n_eval "
                            "+ n_sft): raise the sizes")
    for i, row in enumerate(rows):
        row["id"] = io.prompt_id(row["task"], i)
    eval_rows, train, rest = _split(rows, params, "entries")
    sft = [{"id": r["id"], "messages": r["messages"] + [{"role": "assistant",
                                                           "content": tasks.solve(r["verifier"])}],
            "verifier": r["verifier"]} for r in rest[: params.n_sft]]
    left = rest[params.n_sft :]
    rm, used = [], 0
    for row in left:
        if len(rm) == params.n_rm:
            break
        used += 1
        others = [o for o in left if o["task"] == row["task"] and o["verifier"]["answer"] != row["verifier"]["answer"]]
        if not others:
            continue
        rejected = rng.choice(others)["verifier"]["answer"]
        good, bad = tasks.score(row["verifier"], row["verifier"]["answer"]), tasks.score(row["verifier"], rejected)
        if good > bad:
            rm.append({"id": f"rm-{row['id']}", "prompt": row["messages"], "chosen": row["verifier"]["answer"],
                       "rejected": rejected, "chosen_score": good, "rejected_score": bad})
    rm_prompts = left[used : used + params.n_rm_prompts]
    return train, eval_rows, sft, rm, rm_prompts, {"dropped": dict(dropped)}


def _read(source: str, fmt: str, params: PrepareParams, max_share: float) -> tuple[str, list[dict], Counter]:
    rows = formats.read(source, params.subset, params.split)
    name = formats.detect(rows, source) if fmt == "auto" else fmt
    items, dropped = formats.convert(rows, name, source)
    log.info("%s: format %s, %d rows read, %d kept, dropped %s", source, name, len(rows), len(items), dict(dropped))
    io.check_drops(source, len(rows), dropped, max_share,
                   "each drop reason is a rule of posttrain/formats.py (docs: README, 'Use your own data'); "
                   "mend the rows or raise common.max_drop_share")
    if not items:
        raise io.InputError(f"{source}: no usable row (format {name}; dropped: {dict(dropped)})")
    return name, items, dropped


def _prompt_row(item: dict, messages: list[dict]) -> dict:
    return {"id": item["id"], "task": "external", "messages": messages, "verifier": None}


Splits = tuple[list[dict], list[dict], list[dict], list[dict], list[dict], dict]


def external(params: PrepareParams, seed: int, max_share: float) -> Splits:
    """A user's data set (posttrain.formats): prompts with no verifier, SFT demos and, from preference data, pairs.
    Returns train, eval, sft, the train and the held-out pairs (both empty unless the source holds pairs), stats."""
    name, items, dropped = _read(params.source, params.format, params, max_share)
    kind = formats.FORMATS[name].kind
    if params.pairs == "dataset" and kind != "prefs":
        raise io.InputError(f"{params.source}: prepare.pairs is 'dataset' but the source is {name!r} ({kind}); "
                            "it needs one of the preference formats: "
                            f"{sorted(n for n, f in formats.FORMATS.items() if f.kind == 'prefs')}")
    random.Random(seed).shuffle(items)
    eval_items, train_items, rest = _split(items, params, "rows")
    stats: dict[str, Any] = {"source": params.source, "format": name, "kind": kind, "dropped": dict(dropped)}
    pairs: list[dict] = []
    if kind == "prefs":
        prompt = lambda r: _prompt_row(r, r["prompt"])  # noqa: E731
        demos = [{"id": r["id"], "messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]}
                 for r in train_items]
        pairs = train_items
    else:
        prompt = lambda r: _prompt_row(r, r["messages"] if kind == "prompts" else r["messages"][:-1])  # noqa: E731
        demos = train_items + rest if kind == "sft" else []
    train, eval_rows = [prompt(r) for r in train_items], [prompt(r) for r in eval_items]
    if params.sft_source:
        sft_name, demos, sft_dropped = _read(params.sft_source, "auto", params, max_share)
        if formats.FORMATS[sft_name].kind != "sft":
            raise io.InputError(f"{params.sft_source}: prepare.sft_source must hold SFT demos (messages or "
                                f"prompt_completion), got {sft_name!r}")
        held = {io.prompt_key(r) for r in eval_rows}
        kept = [d for d in demos if io.prompt_key(d) not in held]
        sft_dropped["eval_prompt"] += len(demos) - len(kept)  # never train on a held-out prompt
        demos = kept
        stats |= {"sft_source": params.sft_source, "sft_format": sft_name, "sft_dropped": dict(sft_dropped)}
    sft = demos[: params.n_sft]
    if not sft:
        raise io.InputError(f"{params.sft_source or params.source}: no SFT demonstrations ({name} gives none): set "
                            "prepare.sft_source to a messages or prompt_completion data set")
    return train, eval_rows, sft, pairs, eval_items if kind == "prefs" else [], stats


def run(common, params: PrepareParams, args) -> dict:
    prefs: list[dict] = []
    heldout: list[dict] = []
    rm_prompts: list[dict] = []
    if params.source == "builtin":
        train, eval_rows, sft, stats = builtin(params, common.seed)
        taken = {io.prompt_key(r) for r in train + eval_rows + sft}
        rm = reward_pairs(params, common.seed, taken)
        rm_prompts = tasks.draw(random.Random(common.seed + 104729), params.task_mix, params.n_rm_prompts, taken)
        for i, row in enumerate(rm_prompts):
            row["id"] = io.prompt_id(row["task"], i, "rmp")
    elif params.source == "reasoning_gym":
        train, eval_rows, sft, rm, rm_prompts, stats = from_reasoning_gym(params, common.seed)
    else:
        train, eval_rows, sft, pairs, held, stats = external(params, common.seed, common.max_drop_share)
        rm = pairs  # the user's pairs train the reward model in either mode (label.judge: reward_model uses it)
        if params.pairs == "dataset":
            prefs, heldout = pairs, held
    stats |= {"source": params.source, "pairs": params.pairs, "n_train": len(train), "n_eval": len(eval_rows),
              "n_sft": len(sft), "n_rm": len(rm), "n_rm_prompts": len(rm_prompts), "n_prefs": len(prefs),
              "n_heldout_prefs": len(heldout)}
    stats.setdefault("format", params.source)
    stats.setdefault("dropped", {})
    log.info("prepare: %s", stats)
    with io.atomic_dir(args.out) as tmp:
        io.write_jsonl(tmp / "rm_prefs.jsonl", rm)
        io.write_jsonl(tmp / "rm_prompts.jsonl", rm_prompts)
        io.write_jsonl(tmp / "train.jsonl", train)
        io.write_jsonl(tmp / "eval.jsonl", eval_rows)
        io.write_jsonl(tmp / "sft.jsonl", sft)
        io.write_jsonl(tmp / "prefs.jsonl", prefs)
        io.write_jsonl(tmp / "heldout_prefs.jsonl", heldout)
        io.write_json(tmp / "stats.json", stats)
    return {k: v for k, v in stats.items() if k.startswith("n_")} | {
        f"dropped_{k}": v for k, v in stats["dropped"].items()}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="output folder")
    return cli.execute("prepare", PrepareParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
