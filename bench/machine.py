"""The machine a benchmark ran on, written next to every figure."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess


def describe() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "git_revision": rev,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
