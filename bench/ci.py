"""The README's test command as CI meets it: `.ci/run` (which calls `make test`: the install, then pytest) in a fresh
clone of the committed HEAD, timed end to end; or another make target that installs, then tests (`--run`).

    python -m bench.ci --repo .
    python -m bench.ci --repo . --run "make test-vllm" --out bench/results/test_vllm.json

Writes bench/results/ci.json: the wall time of the whole command, the install's and pytest's parts (from the
`touch .venv/.installed` line `make setup` prints last), and pytest's closing line (passed / skipped counts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import machine


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=".", help="the git repo to clone (its committed HEAD is measured)")
    p.add_argument("--run", default="bash .ci/run", help="the command, run in the clone (bash -c)")
    p.add_argument("--target", default="bench/work/ci", help="where the fresh clone goes (emptied first)")
    p.add_argument("--out", default="bench/results/ci.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    target = Path(args.target).resolve()
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(Path(args.repo).resolve()), str(target)], check=True)
    revision = subprocess.run(["git", "-C", str(target), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    log = target.parent / f"{target.name}.log"
    t0, installed = time.perf_counter(), None
    with log.open("w") as f:
        proc = subprocess.Popen(["bash", "-c", args.run], cwd=target, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {
                                    "CI": "true"})
        lines = []
        for line in proc.stdout:
            f.write(line)
            lines.append(line.rstrip())
            if installed is None and line.startswith("touch ") and ".installed" in line:
                installed = time.perf_counter() - t0
        proc.wait()
    wall = time.perf_counter() - t0
    closing = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln), "")
    results = {"run": args.run, "measured_revision": revision, "exit_code": proc.returncode, "wall_s": round(wall, 1),
               "install_s": None if installed is None else round(installed, 1),
               "pytest_s": None if installed is None else round(wall - installed, 1), "closing_line": closing,
               "log": str(log)}
    machine.write_results(args.out, results, allow_dirty=args.allow_dirty)
    print(results)
    if proc.returncode != 0:
        sys.exit(f"error: {args.run} failed (exit {proc.returncode}); its output: {log}")
    return results


if __name__ == "__main__":
    main()
