"""Iterative DPO rounds as data: the typed round, its plan (which stage runs with which arguments), and the
promotion decision. Pure: nothing here runs a stage, talks to Prefect or MLflow; flows/iterative.py does.

Round k is planned once, when it starts, into `rounds/round_<k>.yaml`: the params the round started with (with
`common.seed` and `generate.n_samples` set for the round) plus a `round:` block (`Round`) naming the champion, the
reference, the variant and the exact command of every step. Its steps, in order: generate (samples from the
champion on the round's fresh prompts) -> label -> reference -> [TGDPO: token_reward or a DPO guide, then
guidance] -> dpo (a new LoRA on the champion) -> evaluate on the eval split (reported) and on the selection split
(decided on); round 1 also evaluates the initial champion on both. As in dvc.yaml, reference and dpo are given the
round's `label/step_prefs.jsonl`, which label writes with `label.step_pairs` (and at least one pair): reference then
caches it and a `pairs: step` variant (Step-DPO) trains on it.

Promotion (flows/promotion.py) is decided on the selection split, never on the eval split it reports:
`rounds/selection.jsonl`, drawn once (before round 1) from the task suite, disjoint from `data/prepare` and from
every round's prompts, so repeated selection over rounds does not bias the reported figures.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from flows import promotion
from posttrain import config, io, losses, tasks

ROUNDS = Path("rounds")
PREPARE = Path("data/prepare")
EVAL_PROMPTS = PREPARE / "eval.jsonl"
SELECTION = ROUNDS / "selection.jsonl"
SELECTION_SEED = 999_983
"""Added to common.seed for the selection split: a stream no round's seed (common.seed + 1000 k) reaches."""


@dataclass
class IterativeParams:
    prompts_per_round: int = 600
    """Fresh training prompts per round; each gives at most one pair."""
    n_samples: int = 4
    """Responses per prompt sampled from the champion (overrides generate.n_samples in the round)."""
    selection_prompts: int = 200
    """Size of the selection split promotion is decided on (the CI half-width of a pass-rate gain shrinks as
    1/sqrt of it); drawn once, disjoint from every other split."""
    variant: str = "dpo"
    """A key of dpo.variants; a tgdpo variant re-computes its guidance source on each round's pairs."""
    initial: str = "models/sft"
    """Round 1's champion."""
    reference: str = "models/sft"
    """Reference model of every round's DPO; 'champion' = the round's starting policy."""
    promote: promotion.Promote = field(default_factory=promotion.Promote)
    registered_model: str = "posttrain-policy"
    """MLflow Model Registry name; its alias `champion` names the current champion."""

    def __post_init__(self) -> None:
        if min(self.prompts_per_round, self.selection_prompts) < 1:
            raise ValueError("prompts_per_round and selection_prompts must be >= 1")
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 to form a pair, got {self.n_samples}")


@dataclass
class Round:
    """The `round:` block of rounds/round_<k>.yaml: what round k was planned with."""

    k: int
    seed: int
    """common.seed + 1000 k: the round's prompts, sampling and training."""
    champion: str
    """The model the round samples from and trains on top of."""
    champion_eval: str
    """The champion's evaluate folder on the eval split (reported)."""
    champion_select: str
    """The champion's evaluate folder on the selection split (decided on)."""
    reference: str
    variant: str
    exclude: list[str]
    """Prompt files whose prompts the round's must avoid."""
    git_revision: str = "unknown"
    commands: dict[str, str] = field(default_factory=dict)
    """Step name -> the exact command, for the record (`plan` is the truth)."""

    @property
    def dir(self) -> Path:
        return round_dir(self.k)


@dataclass
class Step:
    name: str
    module: str
    """stages.<module>.main is called with `argv`."""
    argv: list[str]
    done: Path
    """Written last by the step: it exists iff the step finished."""

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", f"stages.{self.module}", *self.argv])


def round_dir(k: int) -> Path:
    return ROUNDS / f"round_{k}"


def spec_path(k: int) -> Path:
    return ROUNDS / f"round_{k}.yaml"


def decision_path(k: int) -> Path:
    return round_dir(k) / "decision.json"


def started_rounds() -> list[int]:
    """Rounds with a params file (written when a round starts)."""
    found = (re.fullmatch(r"round_(\d+)\.yaml", p.name) for p in ROUNDS.glob("round_*.yaml"))
    return sorted(int(m.group(1)) for m in found if m)


def next_round() -> int:
    """The lowest started round without a decision, else one past the last."""
    started = started_rounds()
    unfinished = [k for k in started if not decision_path(k).exists()]
    return unfinished[0] if unfinished else max(started, default=0) + 1


def draw_prompts(prefix: str, n: int, seed: int, task_mix: dict[str, float], exclude: list[str]) -> list[dict]:
    """`n` distinct task-suite prompts (ids `<prefix>-<task>-<i>`), none of them in the `exclude` files: drawn as
    `prepare` draws its splits (`tasks.draw`)."""
    seen = {io.prompt_key(r) for path in exclude for r in io.read_jsonl(path, "chat")}
    used = len(seen)
    rows = [{"id": io.prompt_id(row["task"], i, prefix)} | row
            for i, row in enumerate(tasks.draw(random.Random(seed), task_mix, n, seen))]
    if len(rows) < n:
        raise ValueError(f"{prefix}: only {len(rows)} new prompts exist for task_mix {task_mix} outside "
                         f"{used} used ones, {n} asked")
    return rows


def prepare_files() -> list[str]:
    return [str(PREPARE / f"{s}.jsonl") for s in ("train", "eval", "sft")]


def selection_rows(data: dict, where: str) -> list[dict]:
    """The selection split: drawn from the task suite once, disjoint from data/prepare (before any round exists)."""
    from stages.prepare import PrepareParams

    it = config.parse(IterativeParams, data.get("iterative"), f"{where}: iterative")
    common = config.parse(config.Common, data.get("common"), f"{where}: common")
    prepare = config.parse(PrepareParams, data.get("prepare"), f"{where}: prepare")
    return draw_prompts("select", it.selection_prompts, common.seed + SELECTION_SEED, prepare.task_mix,
                        prepare_files())


def new_spec(k: int, data: dict, where: str) -> dict:
    """Round k's params file: the current params with the round's seed and sample count, and its `round:` block."""
    from stages.prepare import PrepareParams

    it = config.parse(IterativeParams, data.get("iterative"), f"{where}: iterative")
    common = config.parse(config.Common, data.get("common"), f"{where}: common")
    if config.parse(PrepareParams, data.get("prepare"), f"{where}: prepare").source != "builtin":
        raise config.ParamsError(f"{where}: prepare.source: iterative rounds draw fresh prompts from the built-in "
                                 "task suite; a user data set has no generator of new prompts")
    if k == 1:
        champion, champion_eval, champion_select = (it.initial, str(round_dir(1) / "champion_eval"),
                                                    str(round_dir(1) / "champion_select"))
    else:
        if not decision_path(k - 1).exists():
            raise RuntimeError(f"round {k - 1} is not finished ({decision_path(k - 1)} is missing): run it first")
        prev = promotion.Decision.read(decision_path(k - 1))
        champion, champion_eval, champion_select = prev.champion, prev.champion_eval, prev.champion_select
    spec = copy.deepcopy(data)
    seed = common.seed + 1000 * k
    spec["common"]["seed"] = seed
    spec.setdefault("generate", {})["n_samples"] = it.n_samples
    exclude = prepare_files() + [str(SELECTION)] + [str(round_dir(j) / "prompts.jsonl") for j in range(1, k)]
    from posttrain import tracking

    r = Round(k=k, seed=seed, champion=champion, champion_eval=champion_eval, champion_select=champion_select,
              reference=champion if it.reference == "champion" else it.reference, variant=it.variant,
              exclude=exclude, git_revision=tracking.git_revision())
    spec["round"] = dataclasses.asdict(r)
    spec["round"]["commands"] = {s.name: s.command for s in plan(spec)}
    return spec


def read_round(spec: dict, where: str) -> Round:
    return config.parse(Round, spec.get("round"), f"{where}: round")


def _guidance_source(spec: dict, variant, r: Round, where: str):
    """The guidance source a TGDPO variant names by its folder (data/guidance/<source>, as dvc.yaml writes it)."""
    from stages.guidance import GuidanceParams

    sources = config.parse(GuidanceParams, spec.get("guidance"), f"{where}: guidance").sources
    for name, source in sources.items():
        if Path(variant.guidance) == Path("data/guidance") / name:
            return name, source
    raise config.ParamsError(f"{where}: dpo.variants.{r.variant}.guidance: {variant.guidance} is no "
                             f"data/guidance/<source> of guidance.sources {sorted(sources)}")


def plan(spec: dict) -> list[Step]:
    """The stage executions of a round, in order."""
    from stages import dpo
    from stages.label import LabelParams

    where = str(spec_path(spec["round"]["k"]))
    r = read_round(spec, where)
    d = r.dir
    params = ["--params", str(spec_path(r.k))]
    prefs, reference = str(d / "label" / "prefs.jsonl"), str(d / "reference")
    step_prefs = ["--step-prefs", str(d / "label" / "step_prefs.jsonl")]  # read only where label wrote it
    steps = [
        Step("generate", "generate", params + ["--model", r.champion, "--prompts", str(d / "prompts.jsonl"),
                                               "--out", str(d / "samples.jsonl")], d / "samples.jsonl"),
        Step("label", "label", params + ["--samples", str(d / "samples.jsonl"), "--policy", r.champion,
                                         "--out", str(d / "label")], d / "label"),
        Step("reference", "reference", params + ["--model", r.reference, "--prefs", prefs, *step_prefs,
                                                 "--out", reference], d / "reference"),
    ]
    dpo_params = config.parse(dpo.DpoParams, spec.get("dpo"), f"{where}: dpo")
    variant = dpo.resolve(dpo_params, r.variant, where)
    if variant.pairs == "step" and not config.parse(LabelParams, spec.get("label"), f"{where}: label").step_pairs:
        # refused before the round samples for an hour, not at its dpo step
        raise config.ParamsError(f"{where}: dpo.variants.{r.variant}.pairs: step, and label.step_pairs is off: "
                                 "the round's label writes no step pairs; set label.step_pairs: true on worked tasks")
    guidance = reference
    if losses.LOSSES[variant.loss].guided:  # the variant's guidance source, re-made on this round's pairs
        source_name, source = _guidance_source(spec, variant, r, where)
        if source.kind == "token_reward":  # its backbone: the reference, as models/sft in dvc.yaml
            guide, metrics = d / "token_reward", d / "token_reward_metrics.json"
            steps.append(Step("token_reward", "token_reward", params + [
                "--model", r.reference, "--prefs", prefs, "--out", str(guide), "--metrics", str(metrics)], metrics))
        else:  # the paper's recipe: the DPO-induced token reward of a DPO model trained on the same pairs
            guide = d / "guide"
            guide_variant = next((v for v in dpo_params.variants if Path(source.model) == Path("models/dpo") / v),
                                 None)
            if guide_variant is None:
                raise config.ParamsError(f"{where}: guidance.sources.{source_name}.model: {source.model} is no "
                                         f"models/dpo/<variant> of dpo.variants {sorted(dpo_params.variants)}")
            steps.append(Step("guide", "dpo", params + [
                "--variant", guide_variant, "--model", r.champion, "--prefs", prefs, *step_prefs, "--reference",
                reference, "--guidance", reference, "--out", str(guide)], guide))
        guidance = str(d / "guidance")
        steps.append(Step("guidance", "guidance", params + [
            "--name", source_name, "--model", str(guide), "--prefs", prefs, "--reference", reference,
            "--out", guidance], d / "guidance"))
    steps.append(Step("dpo", "dpo", params + ["--variant", r.variant, "--model", r.champion, "--prefs", prefs,
                                              *step_prefs, "--reference", reference, "--guidance", guidance,
                                              "--out", str(d / "model")], d / "model"))
    evaluations = [("evaluate", str(d / "model"), f"round_{r.k}", EVAL_PROMPTS, str(d / "eval")),
                   ("select", str(d / "model"), f"round_{r.k}_select", SELECTION, str(d / "select"))]
    if r.k == 1:  # the initial model has no evaluations yet
        evaluations += [("evaluate_champion", r.champion, "champion", EVAL_PROMPTS, r.champion_eval),
                        ("select_champion", r.champion, "champion_select", SELECTION, r.champion_select)]
    for name, model, label, prompts, out in evaluations:
        steps.append(Step(name, "evaluate", params + ["--name", label, "--model", model, "--prompts", str(prompts),
                                                      "--out", out], Path(out)))
    return steps


def _passed(folder: str | Path) -> dict[str, float]:
    return {r["id"]: float(r["passed"]) for r in io.read_jsonl(Path(folder) / "answers.jsonl", "answers")}


def decide(spec: dict) -> promotion.Decision:
    """`decision` on the round's files: selection answers decide, eval metrics are reported, label counts pairs."""
    from stages.evaluate import EvaluateParams

    where = str(spec_path(spec["round"]["k"]))
    r = read_round(spec, where)
    it = config.parse(IterativeParams, spec.get("iterative"), f"{where}: iterative")
    n_boot = config.parse(EvaluateParams, spec.get("evaluate"), f"{where}: evaluate").n_bootstrap
    reported = {"candidate": json.loads((r.dir / "eval" / "metrics.json").read_text()),
                "champion": json.loads((Path(r.champion_eval) / "metrics.json").read_text())}
    out = promotion.decision(r, it.promote, _passed(r.dir / "select"), _passed(r.champion_select), n_boot, reported)
    label = json.loads((r.dir / "label" / "stats.json").read_text())
    out.pairs = label["pairs"]
    if "step_pairs" in label:  # label.step_pairs: what a `pairs: step` variant trained on
        out.step_pairs = label["step_pairs"]["pairs"]
    return out
