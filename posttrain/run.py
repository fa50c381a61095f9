"""`make run`: `dvc repro` that says where it is: before each stage, "stage k of N", the time spent and an estimate
of the time left, taken from the last run's stage times on this machine.

    python -m posttrain.run              # dvc repro, with the stage count and the estimate
    python -m posttrain.run -- dpo       # any `dvc repro` arguments after --

N is the stages `dvc status` finds changed plus every stage downstream of them (what `dvc repro` will run). Each
stage's wall time is kept in `.dvc/tmp/stage_times.json` (DVC's own scratch folder, never committed); a stage with
no time of its own takes the one in bench/results/pipeline.json, measured on the CPU it names, and the estimate
says so. DVC's output passes through unchanged; the progress lines start with `[posttrain]`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from posttrain import progress

TIMES = Path(".dvc/tmp/stage_times.json")
PRIOR = Path("bench/results/pipeline.json")
RUNNING = re.compile(r"Running stage '([^']+)'")


def _ordered(r) -> tuple[object, list]:
    """(DVC's graph, its dvc.yaml stages in an order where every stage follows the stages it depends on)."""
    import networkx as nx
    from dvc.stage import PipelineStage

    graph = r.index.graph  # an edge points from a stage to a stage it depends on
    # dvc.yaml stages only: `dvc add`ed files (flows/iterative.py's rounds/*.dvc) are stages too, unnamed
    return graph, [s for s in reversed(list(nx.topological_sort(graph))) if isinstance(s, PipelineStage)]


def stage_order(repo: str | Path = ".") -> list[str]:
    """dvc.yaml's stages in DAG order (read from DVC, never restated)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return [s.name for s in _ordered(r)[1]]


def to_run(repo: str | Path = ".") -> list[str]:
    """The stages `dvc repro` will run, in DAG order: those `dvc status` finds changed and all downstream of them."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        # status keys are addresses relative to the cwd (`../repo/dvc.yaml:sft` from elsewhere): compare by name
        changed = {key.rsplit(":", 1)[-1] for key in r.status()}
        graph, stages = _ordered(r)
        runs = {s for s in stages if s.name in changed}
        for s in list(runs):
            runs |= {a for a in nx.ancestors(graph, s) if a in stages}
        return [s.name for s in stages if s in runs]


def known_times(repo: Path) -> tuple[dict[str, float], dict[str, float], str | None]:
    """(this machine's last stage times, the committed benchmark's, the CPU that benchmark ran on)."""
    own = json.loads((repo / TIMES).read_text()) if (repo / TIMES).is_file() else {}
    prior, cpu = {}, None
    if (repo / PRIOR).is_file():
        data = json.loads((repo / PRIOR).read_text())
        prior = {s["stage"]: s["dvc_wall_s"] for s in data.get("stages", []) if "dvc_wall_s" in s}
        cpu = data.get("machine", {}).get("cpu")
    return own, prior, cpu


def save_times(repo: Path, times: dict[str, float]) -> None:
    (repo / TIMES).parent.mkdir(parents=True, exist_ok=True)
    (repo / TIMES).write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")


def estimate(remaining: list[str], own: dict[str, float], prior: dict[str, float]) -> tuple[float, int, int]:
    """(seconds left, how many stages had a time of their own, how many only the benchmark's); stages with
    neither count nothing."""
    total, n_own, n_prior = 0.0, 0, 0
    for s in remaining:
        if s in own:
            total, n_own = total + own[s], n_own + 1
        elif s in prior:
            total, n_prior = total + prior[s], n_prior + 1
    return total, n_own, n_prior


def line(started: list[str], stages: list[str], spent: float, own: dict, prior: dict, cpu: str | None) -> str:
    """The progress line as the last of `started` begins: it and the stages not yet started are what is left."""
    remaining = started[-1:] + [s for s in stages if s not in started]
    left, n_own, n_prior = estimate(remaining, own, prior)
    unknown = len(remaining) - n_own - n_prior
    how = "last run's times" if not n_prior else f"partly timed on {cpu}" if n_own else f"as timed on {cpu}"
    untimed = f", {unknown} stages untimed" if unknown else ""
    guess = f"~{progress.clock(left)} left ({how}{untimed})" if n_own or n_prior else "no stage times yet"
    total = len(set(stages) | set(started))
    return f"[posttrain] stage {len(started)} of {total}: {started[-1]}; {progress.clock(spent)} spent, {guess}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else argv
    repo = Path.cwd()
    stages = to_run(repo) if not extra else []  # with a target, DVC's own lines say what runs
    own, prior, cpu = known_times(repo)
    print(f"[posttrain] {len(stages)} stages to run" if not extra else "[posttrain] dvc repro " + " ".join(extra),
          flush=True)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    t0 = time.perf_counter()
    current, begun, pending, started = None, t0, b"", []
    times = dict(own)
    while chunk := os.read(proc.stdout.fileno(), 4096):  # raw chunks: progress bars redraw with \r, not \n
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        pending += chunk
        *done, pending = pending.split(b"\n")
        for raw in done:
            m = RUNNING.search(raw.decode("utf-8", "replace"))
            if not m:
                continue
            now = time.perf_counter()
            if current:
                times[current] = now - begun
            current, begun = m.group(1), now
            started.append(current)
            print(line(started, stages, now - t0, times, prior, cpu), flush=True)
    rc = proc.wait()
    if current and rc == 0:
        times[current] = time.perf_counter() - begun
    if times != own:
        save_times(repo, times)
    print(f"[posttrain] dvc repro {'finished' if rc == 0 else f'failed (exit {rc})'} after "
          f"{progress.clock(time.perf_counter() - t0)}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
