"""Iterative DPO rounds on the main job, each timed: the rounds table and what each round cost.

    python -m bench.rounds --repo ../run --rounds 3     # from a clean checkout; ../run: where `make run` ran

Runs `python -m flows.iterative` once per round in the pipeline repo (a process per round, as a user or a
scheduled Prefect run starts one), so each round's wall time includes its process start and Prefect's; then
reads every round's `rounds/round_<k>/decision.json` and the table `python -m flows.iterative compare` prints.
Rounds already in the repo are not re-run: only the `--rounds` new ones are timed. Writes bench/results/rounds.json
through `bench.machine.write_results`, with the pipeline repo's revision and profile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import machine

ENV = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def decided(repo: Path) -> set[int]:
    """The rounds with a decision.json in `repo`."""
    return {int(d.parent.name.split("_")[1]) for d in (repo / "rounds").glob("round_*/decision.json")}


def one_round(repo: Path) -> tuple[float, str]:
    """`python -m flows.iterative` (one round) in `repo`: its wall time and its last output line."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.iterative"], cwd=repo, env=ENV | {"PYTHONPATH": str(repo)},
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: flows.iterative failed in {repo} (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, (proc.stdout.strip().splitlines() or [""])[-1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="a pipeline repo where `make run` has run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/results/rounds.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    repo = Path(args.repo).resolve()
    timed = {}
    for _ in range(args.rounds):
        before = decided(repo)
        wall, said = one_round(repo)
        (k,) = decided(repo) - before  # a finished round leaves exactly one new decision
        timed[k] = {"wall_s": round(wall, 1), "said": said}
    decisions = {k: json.loads((repo / "rounds" / f"round_{k}" / "decision.json").read_text())
                 for k in sorted(decided(repo))}
    compare = subprocess.run([sys.executable, "-m", "flows.iterative", "compare"], cwd=repo,
                             env=ENV | {"PYTHONPATH": str(repo)}, capture_output=True, text=True, check=True)
    table = (repo / "reports/rounds/rounds.md").read_text()
    out = {"pipeline": machine.repo_state(repo), "rounds_timed": timed,
           "decisions": {k: d | timed.get(k, {}) for k, d in decisions.items()},
           "compare_stdout": compare.stdout, "rounds_md": table}
    out = machine.write_results(args.out, out, machine.module_command("bench.rounds", argv), args.allow_dirty)
    print(compare.stdout)
    print("; ".join(f"round {k}: {t['wall_s']:.0f} s" for k, t in timed.items()))
    return out


if __name__ == "__main__":
    main()
