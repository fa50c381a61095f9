"""Provenance written with every figure: the command, the code revision and whether the tree was dirty, the machine,
the date. Every bench script writes its results file through `write_results`; no results file is edited by hand.

    machine.write_results("bench/results/step_time.json", results, allow_dirty=args.allow_dirty)

A dirty tree is `git status --porcelain` with anything in it outside `bench/results/` and DVC's bookkeeping (dvc.lock,
.gitignore files, reports/: what `make run` leaves): modified or staged tracked files, and untracked files that
.gitignore does not cover (a new module the benchmark may import is code that ran).
Results files themselves do not count, so two benchmarks can run one after the other before either is committed.
A commit made while a benchmark runs counts as dirty too: the revision written would not be the code that ran.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from posttrain import io

PROVENANCE_KEYS = ("command", "git_revision", "dirty", "machine", "date")
"""The top-level keys every results file carries (tests/test_provenance.py checks each file under bench/results)."""

RESULTS_DIR = "bench/results/"

_started: str | None = None
"""HEAD when `require_clean` ran at the start of this benchmark."""


def describe() -> dict:
    """The machine: CPU model, cores, memory, GPU (None without CUDA), torch and Python versions."""
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def git_state(repo: str | Path = ".") -> tuple[str, list[str]]:
    """(full HEAD sha, the `git status --porcelain` lines that make the tree dirty); SystemExit outside a repo."""
    def git(*a: str) -> str:
        proc = subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise SystemExit(f"error: git {' '.join(a)} in {Path(repo).resolve()}: {proc.stderr.strip()}")
        return proc.stdout

    sha = git("rev-parse", "HEAD").strip()
    status = git("status", "--porcelain", "--untracked-files=all").splitlines()
    lines = [ln for ln in status if not ln[3:].startswith(RESULTS_DIR) and not dvc_bookkeeping(ln[3:])]
    return sha, lines


def dvc_bookkeeping(path: str) -> bool:
    """What `dvc repro` (`make run`) writes into the tree and no benchmark runs: dvc.lock, the .gitignore files it
    keeps for its outputs, and the stages' outputs under reports/ (metrics.json, summary.json: `cache: false`)."""
    path = path.split(" -> ")[-1].strip('"')
    return path == "dvc.lock" or path == ".gitignore" or path.endswith("/.gitignore") or path.startswith("reports/")


def command(argv: list[str] | None = None) -> str:
    """The command line as typed: `python -m <module> <args>` for this process when `argv` is None."""
    if argv is not None:
        return shlex.join(argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def write_results(path: str | Path, results: dict, argv: list[str] | None = None,
                  allow_dirty: bool = False) -> dict:
    """Write `results` to `path` (JSON, atomically) with the provenance keys; return what was written.

    `argv` is the whole command (["python", "-m", "bench.x", ...]); None takes this process's own. Refuses with
    SystemExit when the tree is dirty and not `allow_dirty`: a figure must name the code that produced it.
    """
    clash = sorted(set(PROVENANCE_KEYS) & set(results))
    if clash:
        raise ValueError(f"results may not set the provenance keys {clash}")
    sha, dirty = git_state()
    if _started is not None and _started != sha:  # a commit during the run: HEAD is not the code that ran
        dirty.append(f"HEAD moved from {_started[:12]} to {sha[:12]} while the benchmark ran")
    if dirty and not allow_dirty:
        raise SystemExit(f"error: refusing to write {path}: the git tree is dirty ({'; '.join(dirty[:5])}"
                         f"{' ...' if len(dirty) > 5 else ''}); commit first, or pass --allow-dirty to record "
                         "the figure as dirty")
    out = dict(results) | {
        "command": command(argv), "git_revision": sha, "dirty": bool(dirty), "machine": describe(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    io.write_json(path, out)
    return out


def module_command(module: str, argv: list[str] | None) -> list[str] | None:
    """The command `python -m <module> <argv>` when a bench `main(argv)` was called with arguments, else None
    (this process's own command line)."""
    return None if argv is None else ["python", "-m", module, *argv]


def require_clean(allow_dirty: bool) -> None:
    """Refuse before a long benchmark starts, rather than after it, when its results could not be written; note
    HEAD, so that `write_results` can tell a commit made while the benchmark ran."""
    global _started
    _started, dirty = git_state()
    if dirty and not allow_dirty:
        raise SystemExit(f"error: the git tree is dirty ({'; '.join(dirty[:5])}); commit first, or pass "
                         "--allow-dirty to record the figures as dirty")


def repo_state(repo: Path) -> dict:
    """Which pipeline the figures stand on: the repo's revision, and which profile its params.yaml is."""
    sha, dirty = git_state(repo)
    params = (repo / "params.yaml").read_text()
    same = [p.name for p in sorted((repo / "profiles").glob("*.yaml")) if p.read_text() == params]
    return {"git_revision": sha, "changed_files": [ln[3:] for ln in dirty][:20],
            "params_profile": same[0] if same else None}
