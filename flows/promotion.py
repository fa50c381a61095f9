"""Promotion of an iterative round's candidate: the rule (`Promote`, `decision`) and its record (`Decision`,
`rounds/round_<k>/decision.json`). Pure, as flows/rounds.py: flows/rounds.py `decide` feeds it a round's files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain import config, io, stats

if TYPE_CHECKING:
    from flows.rounds import Round


@dataclass
class Promote:
    level: float = 0.95
    """Two-sided level of the paired bootstrap interval of the pass-rate gain."""
    min_gain: float = 0.0
    """Promote iff the interval's lower end exceeds this: 0 = better than the champion beyond resampling noise."""

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if not -1 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be in [-1, 1), got {self.min_gain}")


@dataclass
class Decision:
    """`rounds/round_<k>/decision.json`: what round k decided and the figures it decided on; written once (`write`)
    when the round finishes, read back (`read`) by the next round and a re-run."""

    round: int
    candidate: str
    """The round's trained model."""
    champion_before: str
    candidate_pass_rate: float
    """On the eval split (reported; promotion never reads it), as are the champion's."""
    candidate_pass_rate_ci: list[float]
    champion_pass_rate: float
    champion_pass_rate_ci: list[float]
    n_eval: int
    gain: float
    """Mean per-prompt pass gain (candidate - champion) on the selection split: what promotion decides on."""
    gain_ci: list[float]
    n_select: int
    rule: str
    promoted: bool
    champion: str
    """The champion after the round (the candidate if promoted), with its evaluate folders on both splits."""
    champion_eval: str
    champion_select: str
    pairs: int = 0
    """Response-level pairs the round trained on (label's count)."""
    step_pairs: int | None = None
    """Step-level pairs label wrote (label.step_pairs), else None."""
    model_version: int | str | None = None
    """The candidate's version of the registered model, and the champion's after the round (flows/iterative.py; as
    MLflow gives it, a number)."""
    champion_version: int | str | None = None

    @classmethod
    def read(cls, path: str | Path) -> Decision:
        return config.parse(cls, json.loads(Path(path).read_text()), str(path))

    def write(self, path: str | Path) -> None:
        io.write_json(path, dataclasses.asdict(self))

    def metrics(self) -> dict[str, float]:
        """What the round's MLflow run logs: the figures, each interval as _lo/_hi, `promoted` as 0/1."""
        out = {k: float(getattr(self, k)) for k in ("candidate_pass_rate", "champion_pass_rate", "gain", "n_select",
                                                   "pairs")}
        for key in ("candidate_pass_rate_ci", "champion_pass_rate_ci", "gain_ci"):
            out[key.replace("_ci", "_lo")], out[key.replace("_ci", "_hi")] = getattr(self, key)
        return out | {"promoted": float(self.promoted)}


def decision(r: Round, promote: Promote, candidate: dict[str, float], champion: dict[str, float], n_boot: int,
             reported: dict[str, dict]) -> Decision:
    """Promote iff the lower end of the paired bootstrap interval (`promote.level`) of the selection-split pass-rate
    gain (candidate - champion, per prompt id: `candidate`/`champion` map id -> passed) exceeds `promote.min_gain`.
    `reported` carries the eval-split figures ({'candidate': metrics, 'champion': metrics}) into the record."""
    gain, lo, hi = stats.paired_gain(candidate, champion, n_boot, r.seed, promote.level)
    promoted = lo > promote.min_gain
    cand, champ = reported["candidate"], reported["champion"]
    return Decision(
        round=r.k, candidate=str(r.dir / "model"), champion_before=r.champion,
        candidate_pass_rate=cand["pass_rate"], candidate_pass_rate_ci=list(cand["pass_rate_ci"]),
        champion_pass_rate=champ["pass_rate"], champion_pass_rate_ci=list(champ["pass_rate_ci"]),
        n_eval=cand["n"], gain=gain, gain_ci=[lo, hi], n_select=len(candidate),
        rule=f"promote iff the lower end of the {promote.level:.0%} paired bootstrap interval of pass rate "
             f"(candidate - champion) over the {len(candidate)} selection prompts > {promote.min_gain}; the "
             f"pass rates reported are on the {cand['n']} eval prompts, which promotion never reads",
        promoted=promoted,
        champion=str(r.dir / "model") if promoted else r.champion,
        champion_eval=str(r.dir / "eval") if promoted else r.champion_eval,
        champion_select=str(r.dir / "select") if promoted else r.champion_select)
