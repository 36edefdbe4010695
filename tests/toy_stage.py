"""A toy stage written only against the contract (saectl/stage.py), for tests/test_stage.py:
`toy --n N [--seed S]` writes `values`, N numbers made one chunk at a time, recording each
finished chunk in its progress file, so a killed run resumes where it stopped. It has a fault
point (`toy.chunk`) after each chunk, like the real stages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saectl import faults, store
from saectl.config import address_params, opt
from saectl.console import info
from saectl.errors import ConfigError
from saectl.stage import Plan, RunnerOptions, Stage

NAME = "toy"
CHUNK = 10


@dataclass(frozen=True)
class ToyConfig(RunnerOptions):
    n: int = opt(100, "How many numbers")
    seed: int = opt(0, "Seed of the numbers")
    source: str | None = opt(None, "Another toy artifact whose values are added (optional)")

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"--n must be at least 1, got {self.n}")


def plan(cfg: ToyConfig) -> Plan:
    root = store.store_root(cfg.store)
    params = address_params(cfg)
    inputs = {}
    if params.pop("source"):
        inputs["source"] = store.open_complete(root, cfg.source, stage=NAME)
    return Plan(store.artifact_for(root, NAME, params, inputs), params, inputs)


def build(cfg: ToyConfig, plan: Plan, writer) -> None:
    art = plan.art
    group = art.group("r+")
    if "values" not in group:
        group.create_array("values", shape=(cfg.n,), chunks=(CHUNK,), dtype="float64")
    values = group["values"]
    base = plan.inputs["source"].group()["values"][:] if "source" in plan.inputs else None
    done = store.read_progress(art)
    for c in range(-(-cfg.n // CHUNK)):
        if c in done:
            continue
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, cfg.n)
        chunk = np.random.default_rng([cfg.seed, c]).standard_normal(hi - lo)
        if base is not None:
            chunk += base[lo:hi] if len(base) >= hi else 0.0
        values[lo:hi] = chunk
        done.add(c)
        store.record_progress(art, "main", done)
        faults.point("toy.chunk")
    store.mark_complete(art, {"n": cfg.n, "total": float(values[:].sum())})
    info(f"toy: wrote {art.ref}")


STAGE = Stage(NAME, ToyConfig, "A toy stage for the contract's tests.", plan, build,
              figures=("n", "total"))
