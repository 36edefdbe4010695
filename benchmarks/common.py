"""Shared benchmark helpers: machine description, alternating timed runs, result rows.

Machines here are shared and noisy, so every figure is a ratio against a baseline measured in
the same run, each timing is the median of several repetitions after a warm-up, and saectl and
its baseline alternate so drift hits both alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass


@dataclass
class Row:
    benchmark: str
    saectl: float
    baseline: float
    unit: str
    goal: str          # e.g. ">= 0.95x" or "<= 2"
    ratio: float | None = None
    met: bool | None = None
    note: str = ""

    def __post_init__(self):
        if self.ratio is None and self.baseline:
            self.ratio = self.saectl / self.baseline
        if self.met is None and self.goal:
            op, _, target = self.goal.partition(" ")
            value = self.ratio if target.endswith("x") else self.saectl
            target = float(target.rstrip("x"))
            self.met = value >= target if op == ">=" else value <= target

    def as_dict(self) -> dict:
        return asdict(self)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "python": platform.python_version()}


def alternate(fns: dict, reps: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, run in alternation after `warmup` rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}
