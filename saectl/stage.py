"""The stage contract (docs/architecture.md, "The stage contract").

A stage is one `Stage` value: its name, its config dataclass (which is also its CLI flags, its
YAML fields and, through `opt(address=...)`, its address), how it *plans* (which artifact a
config makes, computed without writing anything) and how it *builds* that artifact. Everything
around the build, the same for every stage, lives in `run` below, once:

    plan → cache hit? → take the write lock (or fail at once with --no-wait)
         → re-check: did another process finish it while we waited? → build → (COMPLETE)

Resume is the build's own job (it reads what an earlier, killed run left: progress files,
checkpoints) and completion too (`store.mark_complete`, written last). A build may return
without completing: a sweep submitted to SLURM with --no-wait, a harvest shard whose siblings
are still running. The CLI (`saectl STAGE`), `saectl run` and the executors (which run
`saectl STAGE` in subprocesses) all go through `run`.

Adding a stage is one module under `stages/` that ends with `STAGE = Stage(...)`, and one line
in `saectl/cli.py` (`add_stage`); tests/toy_stage.py is a complete small example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from saectl import distributed, store
from saectl.config import opt
from saectl.console import info
from saectl.errors import ConfigError, SaectlError


@dataclass(frozen=True)
class RunnerOptions:
    """Flags every stage takes; how it runs, never what it makes (so never in the address).
    Stage configs subclass this (or `DeviceOptions`)."""

    store: str | None = opt(None, "Artifact store (default $SAECTL_STORE or ./artifacts)",
                            address=False)
    no_wait: bool = opt(False, "If another process is writing this artifact, exit at once "
                               "instead of waiting for it", address=False)


@dataclass(frozen=True)
class DeviceOptions(RunnerOptions):
    """`RunnerOptions` plus the torch device, for stages that run a model or an SAE."""

    device: str = opt("auto", "Torch device: auto, cpu, cuda, cuda:1, mps, or balanced (a "
                              "model too large for one GPU spread over all of them)",
                      address=False)


RUNNER_FIELDS = tuple(f for f in DeviceOptions.__dataclass_fields__)
"""Fields that say how a stage runs; set once for a whole `saectl run` (never per step)."""


@dataclass
class Plan:
    """What a config makes, known before anything is written: the artifact, the params and
    inputs of its address, and what the stage opened to find them (so `build` need not open it
    again)."""

    art: store.Artifact
    params: dict
    inputs: dict[str, store.Artifact] = field(default_factory=dict)
    shard: str | None = None
    """A harvest shard ("0-of-4"): it holds its own lock and writes its own part."""
    origin: dict | None = None
    """Recorded in the manifest, outside the address (where a model came from)."""
    context: Any = None
    """The stage's own: opened sources, resolved specs, grid points."""


@dataclass(frozen=True)
class Stage:
    name: str
    config: type
    """A frozen dataclass subclassing `RunnerOptions`: the flags, YAML fields and address."""
    help: str
    plan: Callable[[Any], Plan]
    """cfg → Plan, writing nothing (so `saectl run --dry-run` can tell what is cached)."""
    build: Callable[[Any, Plan, store.Writing], None]
    """(cfg, plan, writer) → None; runs under the write lock and calls `store.mark_complete`
    when the artifact is whole. `writer.exclusive()` takes the main lock for a shard."""
    positional: tuple[str, ...] = ()
    """Config fields given as arguments rather than flags (the input ref)."""
    figures: tuple[str, ...] = ()
    """The summary keys `saectl run`'s table shows (default: the first numbers it finds)."""
    output: Callable[[store.Artifact], str | None] | None = None
    """The ref a complete artifact hands to the next step and prints on stdout (default: its
    own ref). A sweep's is the SAE it chose."""
    report: Callable[[Any, store.Artifact], None] | None = None
    """(cfg, art) → None, shown (on stderr) after a run or a cache hit: the sweep's table, the
    dashboard's path (opened with --open); may raise the one-line error that makes the exit
    status 1 (no SAE met the tolerance)."""
    prepare: Callable[[Any, Plan], None] | None = None
    """(cfg, plan) → None, on a cache miss before the lock: work that writes nothing to the store
    and may fill `plan.context` for build, so a failure there leaves no incomplete artifact
    (steer generates here; its inf/NaN errors must not leave one)."""
    follow: Callable[[Any, Plan], None] | None = None
    """(cfg, plan) → None: what a rank other than 0 of a torchrun group does while rank 0
    builds (train: the same steps on its slice of each batch; it writes nothing). Stages
    without it refuse to run under torchrun."""
    as_json: Callable[[store.Artifact], str] | None = None
    """What `saectl STAGE --json` (a config field `as_json`) prints instead of the report and
    the ref (steer's summary)."""

    def address(self, cfg) -> store.Artifact:
        return self.plan(cfg).art

    def printed(self, cfg, art: store.Artifact) -> str | None:
        """The ref a run hands on (stdout, the next step of a pipeline): the output of a complete
        artifact; the artifact itself for a harvest shard whose siblings are still running;
        nothing for work submitted and not yet done (a sweep with --no-wait)."""
        if art.is_complete():
            return self.output(art) if self.output else art.ref
        return art.ref if getattr(cfg, "shard", None) is not None else None


def run(stage: Stage, cfg) -> store.Artifact:
    """The lifecycle, the same for every stage: cache hit, lock, re-check, build. Under
    torchrun only rank 0 goes through it; the other ranks plan the same artifact and follow
    (`Stage.follow`) if rank 0 says it builds (saectl.distributed)."""
    return run_built(stage, cfg)[0]


def run_built(stage: Stage, cfg) -> tuple[store.Artifact, str]:
    """`run`, and what this process did: "cached" (a hit, before or after the lock), "ran", or
    "partial" (a harvest shard that wrote its part while another shard completed the whole:
    whether the artifact is complete when we look again is a race, so the writer says)."""
    plan = _plan(stage, cfg)
    art = plan.art
    if distributed.rank() > 0:
        if distributed.broadcast_flag(False):
            stage.follow(cfg, plan)  # type: ignore[misc]
        return art, "cached"
    building = False
    try:
        if art.is_complete():
            info(f"{stage.name}: cache hit {art.ref}")
            return art, "cached"
        if stage.prepare is not None:
            stage.prepare(cfg, plan)
        with store.writing(art, plan.params, plan.inputs, shard=plan.shard,
                           wait=not cfg.no_wait, origin=plan.origin) as writer:
            if art.is_complete():  # another process finished it while we waited for the lock
                info(f"{stage.name}: cache hit {art.ref} (written by another process)")
                return art, "cached"
            building = distributed.broadcast_flag(True)
            stage.build(cfg, plan, writer)
    finally:
        if not building:  # the other ranks are told there is nothing to follow
            distributed.broadcast_flag(False)
    return art, "partial" if plan.shard is not None and not writer.completed else "ran"


def _plan(stage: Stage, cfg) -> Plan:
    """The plan; under torchrun every rank plans, and an error on any rank (a store one node
    cannot see) stops all of them with one line."""
    if not distributed.active():
        return stage.plan(cfg)
    if stage.follow is None:
        raise ConfigError(f"saectl {stage.name} does not run under torchrun; only train does")
    distributed.init(getattr(cfg, "device", "cpu"))
    plan, error = None, None
    try:
        plan = stage.plan(cfg)
    except SaectlError as e:
        error = str(e)
    distributed.agree(error)
    refs = distributed.gather(plan.art.ref)  # type: ignore[union-attr]
    if len(set(refs)) > 1:
        raise ConfigError(f"the ranks planned different artifacts ({', '.join(r[:18] for r in refs)}); "
                          "give every rank the same command and store")
    return plan  # type: ignore[return-value]

