"""Train: one SAE on a shuffle artifact's train split, evaluated on its eval split.

The work is `saectl.fitting` (shared with the sweep stage, which trains several SAEs over one
reader); this module is the stage: plan the one artifact, then build it under the lock that
`saectl.stage.run` holds. A checkpoint left by a killed run is resumed from (fitting.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from saectl import distributed, fitting, store
from saectl.errors import ConfigError
from saectl.fitting import TrainStageConfig
from saectl.stage import Plan, Stage

NAME = "train"
FIGURES = ("fvu", "l0", "dead_fraction", "ce_loss_score")  # summary figures `saectl run` shows


@dataclass
class Opened:
    """What planning opened and resolved, handed to `build`."""

    src: store.Artifact
    manifest: dict
    harvest: store.Artifact
    point: fitting.Point
    lm: dict | None = None
    """{ref: model spec} for the CE-loss splice, found by `prepare`."""


def plan(cfg: TrainStageConfig) -> Plan:
    n_ranks = distributed.world()[1] if distributed.active() else cfg.nproc
    if cfg.shards > 1 and n_ranks == 1:
        raise ConfigError(f"--shards {cfg.shards} splits the latents over ranks; add --nproc "
                          f"{cfg.shards} (or run under torchrun or srun)")
    n_data = n_ranks // cfg.shards  # ranks that read different rows
    if n_data and cfg.batch_size % n_data:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not split over {n_data} ranks; "
                          f"give a multiple of {n_data} (the global batch is split evenly)")
    root = store.store_root(cfg.store)
    src, manifest, harvest = fitting.open_shuffle(root, cfg.shuffle)
    point = fitting.plan(root, src, manifest, cfg)
    if cfg.shards > 1:
        from saectl import sharding  # torch.distributed: only where latents are sharded

        sharding.check(point.sae_cfg.arch, point.sae_cfg.d_sae, cfg.shards, n_ranks)
    if cfg.nproc > 1 and not distributed.active() and not point.art.is_complete():
        launch(cfg.nproc)  # `--nproc N`: this same command under torchrun, then exit
    return Plan(point.art, point.params, {"shuffle": src},
                context=Opened(src, manifest, harvest, point))


def prepare(cfg: TrainStageConfig, plan: Plan) -> None:
    """Find (and check by content hash) the model the SAE is spliced into before anything is
    written, so a missing model fails fast and leaves no artifact behind."""
    o: Opened = plan.context
    o.lm = fitting.find_models(o.harvest, [o.point])


def build(cfg: TrainStageConfig, plan: Plan, writer: store.Writing) -> None:
    o: Opened = plan.context
    fitting.fit(o.src, o.manifest, o.harvest, [o.point], o.lm or {})


def follow(cfg: TrainStageConfig, plan: Plan) -> None:
    """A rank other than 0 of a data-parallel run: the same steps on its slice of each batch;
    rank 0 checkpoints, evaluates and writes (saectl.distributed)."""
    o: Opened = plan.context
    fitting.fit(o.src, o.manifest, o.harvest, [o.point], {})


def launch(nproc: int) -> None:
    """Run this very command under `torchrun --standalone --nproc-per-node N` (one machine)
    and exit with its status; `--nproc` itself is left out, so it runs once per rank."""
    import subprocess
    import sys

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "saectl", *args]
    raise SystemExit(subprocess.call(cmd))


STAGE = Stage(NAME, TrainStageConfig,
              "Train an SAE on a shuffle's train split and evaluate it on the eval split.",
              plan, build, ("shuffle",), FIGURES, prepare=prepare, follow=follow)
