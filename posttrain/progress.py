"""Progress bars for a stage's long loops (sampling, judging, scoring, log-prob caches, evaluation): tqdm on
stderr, which DVC and Prefect pass through, with rows done, rows/s and tokens/s.

A bar redraws at most every `MININTERVAL` seconds, so a log file that captures it (a test, CI) stays short.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

MININTERVAL = 5.0


def clock(seconds: float) -> str:
    """A duration as `4m05s`, or `1h02m` from an hour on (progress lines: make run's, the trainers')."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class Progress:
    """`with Progress("sampling", len(prompts), "prompt") as p: ... p.update(rows, tokens)`."""

    def __init__(self, desc: str, total: int, unit: str = "row"):
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=MININTERVAL, ncols=100,
                        disable=total == 0)
        self.tokens, self.t0 = 0, time.perf_counter()

    def update(self, rows: int, tokens: int = 0) -> None:
        self.tokens += tokens
        if self.tokens:
            rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
