"""The main job at two revisions, back to back on one machine: did a change make `make run` faster without moving
its table?

    python -m bench.main_job_pair --before <rev> --after HEAD --venv .venv    # from a checkout nobody edits

For each revision, in order: a fresh clone checked out at it (bench/work/pair_before, pair_after), `make run` end
to end with the environment `--venv` (installed once; no install is timed), its wall time and each stage's as
`dvc repro` spent it (`bench.pipeline.stage_walls`) and as its MLflow run lasted (`mlflow_walls`), the eval table
it printed, and the files its stages wrote (`bench.stage_metrics.FILES`). Then `speedup`: the after run's share of
the before run's wall time, and per model whether the after run's pass rate lies inside the before run's 95%
interval. Writes bench/results/main_job_pair.json through `bench.machine.write_results`, so both runs are one file
at one revision of this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import subprocess
from pathlib import Path

from bench import machine, pipeline, stage_metrics


def mlflow_walls(repo: Path) -> dict[str, float]:
    """Each stage's own time, as its MLflow run lasted (the clone's default SQLite store, `mlflow.db`): the stage's
    work after its imports, without the process start and DVC's bookkeeping that `stage_dvc_wall_s` also counts; a
    name run twice keeps its last run."""
    db = repo / "mlflow.db"
    if not db.is_file():
        return {}
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT name, start_time, end_time FROM runs WHERE end_time IS NOT NULL "
                           "ORDER BY start_time").fetchall()
    return {name: round((end - start) / 1000, 1) for name, start, end in rows}


def measure(repo: Path, rev: str, target: Path, venv: Path) -> dict:
    """One fresh clone of `repo` at `rev`, `make run` in it; what it took and what it printed."""
    pipeline.clone(repo, target)
    subprocess.run(["git", "-C", str(target), "checkout", "-q", rev], check=True)
    sha = subprocess.run(["git", "-C", str(target), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    log = target.parent / f"{target.name}.log"
    log.write_text("")
    run_s, marks = pipeline.timed(["make", f"VENV={venv}", "-o", f"{venv}/.installed", "run"], target, log)
    walls = pipeline.stage_walls(marks, run_s)
    files = {k: json.loads((target / rel).read_text()) for k, rel in stage_metrics.FILES.items()
             if (target / rel).is_file()}
    return {"revision": sha, "make_run_s": round(run_s, 1), "stage_dvc_wall_s": walls,
            "stage_mlflow_s": mlflow_walls(target),
            "eval_table": pipeline.eval_table(target), "stage_files": files}


def compare(before: dict, after: dict) -> dict:
    """The after run's wall time as a share of the before run's, and per model the two pass rates with whether
    the after one lies inside the before one's 95% interval."""
    rows = {}
    for name, b in before["eval_table"]["rows"].items():
        a = after["eval_table"]["rows"].get(name)
        if a is None or "pass_rate" not in b:
            rows[name] = {"before": b.get("pass_rate"), "after": None if a is None else a.get("pass_rate"),
                          "inside_before_ci": False}
            continue
        lo, hi = b["pass_rate_ci"]
        rows[name] = {"before": b["pass_rate"], "before_ci": [lo, hi], "after": a["pass_rate"],
                      "inside_before_ci": lo <= a["pass_rate"] <= hi}
    return {"after_over_before_wall": round(after["make_run_s"] / before["make_run_s"], 3),
            "wall_cut": round(1 - after["make_run_s"] / before["make_run_s"], 3),
            "same_rows": sorted(before["eval_table"]["rows"]) == sorted(after["eval_table"]["rows"]),
            "all_inside_before_ci": all(r["inside_before_ci"] for r in rows.values()), "pass_rates": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=".", help="the git repo whose revisions are cloned")
    p.add_argument("--before", required=True, help="the revision before the change")
    p.add_argument("--after", default="HEAD", help="the revision after it")
    p.add_argument("--venv", required=True, help="an installed environment both runs use")
    p.add_argument("--work", default="bench/work", help="where the clones go (pair_before, pair_after)")
    p.add_argument("--out", default="bench/results/main_job_pair.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    repo, work, venv = Path(args.repo).resolve(), Path(args.work).resolve(), Path(args.venv).resolve()
    revs = {k: subprocess.run(["git", "-C", str(repo), "rev-parse", r], capture_output=True, text=True,
                              check=True).stdout.strip() for k, r in (("before", args.before), ("after", args.after))}
    runs = {k: measure(repo, rev, work / f"pair_{k}", venv) for k, rev in revs.items()}
    out = runs | {"speedup": compare(runs["before"], runs["after"])}
    out = machine.write_results(args.out, out, machine.module_command("bench.main_job_pair", argv), args.allow_dirty)
    s = out["speedup"]
    print(f"make run: before {runs['before']['make_run_s']:.0f} s, after {runs['after']['make_run_s']:.0f} s "
          f"({s['wall_cut']:.1%} less); every pass rate inside the before run's interval: {s['all_inside_before_ci']}")
    return out


if __name__ == "__main__":
    main()
