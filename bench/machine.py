"""What every benchmark records about the machine it ran on (the VM here is noisy: the CPU
shares during a run say how much of it was ours)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_info(**versions: str) -> dict:
    """Date, CPUs, platform and versions (numpy and the caller's ``versions``)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count()),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **versions,
        "loadavg_start": list(os.getloadavg()),
    }


def cpu_times() -> list[int] | None:
    """The aggregate ``cpu`` line of /proc/stat (user nice system idle iowait irq softirq steal …)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def cpu_shares(before: list[int] | None, after: list[int] | None) -> dict | None:
    """Where the machine's CPU time went between two samples (steal: taken by the hypervisor)."""
    if not before or not after or len(before) < 8:
        return None
    d = [b - a for a, b in zip(before, after)]
    total = sum(d[:8]) or 1
    return {"busy": (total - d[3] - d[4] - d[7]) / total, "idle": (d[3] + d[4]) / total,
            "steal": d[7] / total}


def finish(res: dict, cpu_before: list[int] | None, started: float, json_path: str | Path) -> Path:
    """Close a bench run: end load and CPU shares, elapsed time, then the JSON at ``json_path``."""
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["machine"]["cpu_shares_during_run"] = cpu_shares(cpu_before, cpu_times())
    res["elapsed_s"] = time.perf_counter() - started
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    res["json_path"] = str(path)
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return path
