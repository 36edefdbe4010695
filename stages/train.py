"""Train: one SAE on a shuffle artifact's train split, evaluated on its eval split.

The work is `saectl.fitting` (shared with the sweep stage); this module is the command.
"""

from __future__ import annotations

from saectl import store
from saectl.fitting import TrainStageConfig, open_shuffle, plan, train_points

NAME = "train"
Config = TrainStageConfig
FIGURES = ("fvu", "l0", "dead_fraction", "ce_loss_score")  # summary figures `saectl run` shows


def address(cfg: TrainStageConfig) -> store.Artifact:
    """The artifact `run(cfg)` makes or finds, computed without writing anything."""
    root = store.store_root(cfg.store)
    src, manifest, _ = open_shuffle(root, cfg.shuffle)
    return plan(root, src, manifest, cfg).art


def run(cfg: TrainStageConfig) -> store.Artifact:
    root = store.store_root(cfg.store)
    src, manifest, harvest = open_shuffle(root, cfg.shuffle)
    point = plan(root, src, manifest, cfg)
    return train_points(src, manifest, harvest, [point])[0]


# TRANSITIONAL (issue 14): the old run wrapped until this module defines plan and build.
from saectl import stage as _contract  # noqa: E402

STAGE = _contract.legacy('train', TrainStageConfig, run, "Train an SAE on a shuffle's train split and evaluate it on the eval split.",
                         ('shuffle',), address=address, output=None,
                         figures=FIGURES)
