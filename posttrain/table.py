"""Print the eval table of a report: what `make run` shows when the pipeline is done.

    python -m posttrain.table                      # reports/report.md
    python -m posttrain.table reports/report.md

The table is the first markdown table of `report.md` (a row per model, the report's columns), followed by the
report's ship decision. The same lines go into bench/results/pipeline.json (`bench.pipeline`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def eval_table(report_md: str) -> list[str]:
    """The first run of lines that start with `|` (header, rule and one row per model)."""
    lines, started = [], False
    for line in report_md.splitlines():
        if line.startswith("|"):
            lines.append(line)
            started = True
        elif started:
            break
    return lines


def ship_line(report_md: str) -> str | None:
    """The report's `**Ship: <model>**. Rule: ...` sentence, without the markdown emphasis."""
    return next((line.replace("**", "") for line in report_md.splitlines() if line.startswith("**Ship:")), None)


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", nargs="?", default="reports/report.md", help="a report.md written by stages.report")
    args = p.parse_args(argv)
    path = Path(args.report)
    if not path.is_file():
        sys.exit(f"error: {path}: no report (run `dvc repro` first)")
    text = path.read_text(encoding="utf-8")
    table = eval_table(text)
    if not table:
        sys.exit(f"error: {path}: no markdown table in it")
    ship = ship_line(text)
    out = [f"{path}:", "", *table, *(["", ship] if ship else [])]
    print("\n".join(out))
    return out


if __name__ == "__main__":
    main()
