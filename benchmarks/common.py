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
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return {"cpu": cpu, "cpu_flags": flags, "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "python": platform.python_version(), "load_average": load_average()}


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


def planted_mixtures(n=20000, d=32, F=96, active=3, seed=0):
    """Ground truth for feature recovery (tests/test_train.py, benchmarks/bench_bf16.py): n
    sparse non-negative mixtures of `active` of F random unit directions D (F, d), plus a
    little noise. Returns x (n, d) float32 and D, as numpy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    D = rng.normal(size=(F, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    idx = np.stack([rng.choice(F, active, replace=False) for _ in range(n)])
    coef = rng.uniform(0.5, 2.0, size=(n, active))
    x = np.einsum("nk,nkd->nd", coef, D[idx]) + 0.01 * rng.normal(size=(n, d))
    return x.astype(np.float32), D


def time_rounds(steps: dict, batches: list[tuple], warmup: int,
                rounds: int) -> tuple[dict, dict, dict]:
    """One call of each of `steps` in turn on the same batch (its arguments), warmup + rounds
    rounds with the order rotating every round: each one's wall and CPU seconds per round after
    the warm-up, and its last loss (a number, or a dict's "loss")."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, float] = {}
    for r in range(warmup + rounds):
        batch = batches[r % len(batches)]
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = steps[name](*batch)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                times[name].append(dt)
                cpu[name].append(dc)
            losses[name] = float(loss["loss"] if isinstance(loss, dict) else loss)
    return times, cpu, losses


def paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of a's time over b's in the same round."""
    return statistics.median(x / y for x, y in zip(a, b))


def load_average() -> str:
    """The 1/5/15-minute load averages: others' work on a shared machine shows up here."""
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def synthetic_import(root, n_rows: int, d: int, context_size: int = 128, dtype: str = "float16",
                     seed: int = 0) -> str:
    """A fresh import artifact of n_rows × d normal values under `root`: its ref. Written in
    blocks through a memory-mapped .npy, so making it never holds the whole array."""
    from pathlib import Path

    import numpy as np

    from saectl.stage import run as run_stage
    from stages import import_acts

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    npy = root / f"x-{n_rows}x{d}.npy"
    mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(n_rows, d))
    rng = np.random.default_rng(seed)
    for lo in range(0, n_rows, 16384):
        hi = min(lo + 16384, n_rows)
        mm[lo:hi] = rng.standard_normal((hi - lo, d), dtype=np.float32)
    mm.flush()
    del mm
    art = run_stage(import_acts.STAGE, import_acts.ImportConfig(
        file=str(npy), hook="h", dtype=dtype, context_size=context_size, store=str(root)))
    npy.unlink()
    return art.ref


_MEASURE = """
import contextlib, io, sys
sys.path.insert(0, sys.argv[1])
from saectl.cli import main

# The command's --help first: typer builds its parameters on first use, importing pydantic
# (10 MiB), a fixed cost of the CLI that is not the command's work.
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main([sys.argv[2], "--help"])
    except SystemExit:
        pass


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: count only the work
code = 0
try:
    main(sys.argv[2:])
except SystemExit as e:
    code = e.code or 0
print(status("VmHWM") - before, code)
"""


def peak_growth(*args, env: dict | None = None) -> int:
    """Peak RSS growth in bytes of a real `saectl ARGS` run in a fresh process, beyond what the
    interpreter held once saectl's CLI was imported and had built the command's parameters
    (its --help run first; VmHWM reset to VmRSS just before), as tests/test_shuffle.py
    measures it."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", _MEASURE, str(repo), *map(str, args)],
                       check=False, capture_output=True, text=True, cwd=repo,
                       env={**os.environ, **(env or {})})
    last = p.stdout.strip().splitlines()[-1:] or ["0 1"]
    growth, code = last[0].split()
    if p.returncode or code != "0":
        raise RuntimeError(f"saectl {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")
    return int(growth)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (avx512_bf16, amx_bf16, ...) from /proc/cpuinfo; empty if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = list(f)
    except OSError:
        return set()
    for line in lines:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()
