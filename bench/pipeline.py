"""The README's main command, measured as a user meets it: a fresh clone, `make setup` (the install, timed apart),
then `make run` once end to end, then a no-op `dvc repro`.

    python -m bench.pipeline --repo .                           # clone this repo's HEAD into bench/work/pipeline
    python -m bench.pipeline --repo . --profile profiles/tiny.yaml --venv /path/to/.venv   # a quick check

Records the wall clock of `make setup` and of `make run` (the whole command: dvc repro and the table it prints);
per stage its wall time as `dvc repro` spent it (`dvc_wall_s`: from its "Running stage" line to the next, with
process start and imports), the time inside its MLflow run (`wall_s`) and its peak resident memory (the metric
`peak_rss_mb` that `posttrain.cli.execute` logs); the largest resident memory of any process it started,
the time of a second `dvc repro` and whether it ran a stage, and the eval table `make run` produced
(`reports/metrics.json` per model, and the markdown table of `reports/report.md`). `--profile` copies a params
file over the clone's params.yaml first; `--venv` reuses an installed environment (no install is timed). Writes
bench/results/pipeline.json through `bench.machine.write_results`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import machine
from posttrain import config, table

STAGE_MARK = "Running stage"
"""What `dvc repro` prints before it runs a stage; a no-op repro prints none."""


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run `cmd` in `cwd`, its output appended to `log`; its wall time in seconds and, for each line starting with
    `Running stage '<name>'`, (seconds since the start, name). SystemExit if it fails."""
    marks = []
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if line.startswith(STAGE_MARK):
                marks.append((time.perf_counter() - t0, line.split("'")[1]))
        proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed in {cwd} (exit {proc.returncode}); its output: {log}")
    return wall, marks


def stage_walls(marks: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Each stage's wall time as `dvc repro` spent it: from its `Running stage` line to the next one (the last: to
    `end`), so the process start, imports and dvc's hashing count, which the stage's own MLflow run does not see."""
    ends = [t for t, _ in marks[1:]] + [end]
    return {name: round(e - t, 1) for (t, name), e in zip(marks, ends, strict=True)}


def clone(repo: Path, target: Path) -> str:
    """A fresh `git clone` of `repo` (its committed HEAD, nothing uncommitted) at `target`; its HEAD sha."""
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(repo), str(target)], check=True)
    return subprocess.run(["git", "-C", str(target), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def stage_table(repo: Path) -> list[dict]:
    """Every stage run in the clone's MLflow store, in start order: name, wall time, peak RSS."""
    import mlflow

    common = config.parse(config.Common, config.read_yaml(repo / "params.yaml").get("common"), "common")
    uri = common.mlflow_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{repo / uri.removeprefix('sqlite:///')}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[common.mlflow_experiment], order_by=["start_time ASC"])
    rows = []
    for _, r in runs.iterrows():
        rss = r.get("metrics.peak_rss_mb")
        rows.append({"stage": r["tags.mlflow.runName"], "status": r["status"],
                     "wall_s": round((r["end_time"] - r["start_time"]).total_seconds(), 1),
                     "peak_rss_mb": None if rss is None or rss != rss else round(float(rss))})
    return rows


def eval_table(repo: Path) -> dict:
    """What `make run` reported: per model the scalars of reports/metrics.json, and report.md's table lines."""
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    rows = {name: {k: v for k, v in m.items() if isinstance(v, (int, float, list)) and not isinstance(v, bool)}
            for name, m in metrics.items()}
    report = (repo / "reports" / "report.md").read_text()
    return {"rows": rows, "markdown": table.eval_table(report), "ship": table.ship_line(report)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=".", help="the git repo to clone (its committed HEAD is measured)")
    p.add_argument("--target", default="bench/work/pipeline", help="where the fresh clone goes (emptied first)")
    p.add_argument("--profile", help="a params file copied over the clone's params.yaml (e.g. profiles/tiny.yaml)")
    p.add_argument("--venv", help="an installed environment to reuse: `make setup` is skipped and not timed")
    p.add_argument("--out", default="bench/results/pipeline.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    repo, target = Path(args.repo).resolve(), Path(args.target).resolve()
    revision = clone(repo, target)
    if args.profile:
        shutil.copy(args.profile, target / "params.yaml")
    log = target.parent / f"{target.name}.log"
    log.write_text("")
    venv = Path(args.venv).resolve() if args.venv else None
    # -o: the clone's requirements.lock is newer than the reused venv's stamp; never reinstall into that venv
    make = ["make", f"VENV={venv}", "-o", f"{venv}/.installed"] if venv else ["make"]
    install = None if venv else timed([*make, "setup"], target, log)[0]
    run_s, marks = timed([*make, "run"], target, log)
    peak_any = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    bin_dir = (venv or target / ".venv") / "bin"
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    noop = subprocess.run([str(bin_dir / "dvc"), "repro"], cwd=target, env=env, capture_output=True, text=True)
    noop_s = time.perf_counter() - t0
    if noop.returncode != 0:
        sys.exit(f"error: the second dvc repro failed in {target}:\n{noop.stdout[-2000:]}\n{noop.stderr[-2000:]}")
    walls = stage_walls(marks, run_s)
    stages = [r | {"dvc_wall_s": walls.get(r["stage"])} for r in stage_table(target)]
    out = {
        "measured_revision": revision, "profile": args.profile or "params.yaml", "venv_reused": bool(args.venv),
        "install_s": None if install is None else round(install, 1), "make_run_s": round(run_s, 1),
        "peak_rss_mb_any_process": round(peak_any), "stages": stages, "stages_ran": len(stages),
        "sum_stage_wall_s": round(sum(s["wall_s"] for s in stages), 1),
        "sum_stage_dvc_wall_s": round(sum(walls.values()), 1), "noop_dvc_repro_s": round(noop_s, 2),
        "noop_ran_a_stage": STAGE_MARK in noop.stdout, "eval_table": eval_table(target)}
    out = machine.write_results(args.out, out, machine.module_command("bench.pipeline", argv), args.allow_dirty)
    for s in stages:
        print(f"{s['stage']:<24} {s['dvc_wall_s'] or 0:>7.1f} s (run {s['wall_s']:>6.1f} s)  "
              f"{s['peak_rss_mb'] or 0:>6} MB")
    print("\n".join(out["eval_table"]["markdown"]))
    print(f"install: {install if install is None else round(install)} s; make run: {run_s:.0f} s; "
          f"no-op dvc repro: {noop_s:.1f} s (ran a stage: {out['noop_ran_a_stage']}); wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
