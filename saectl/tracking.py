"""Training curves where researchers already look: Weights & Biases and TensorBoard
(`--log wandb|tensorboard` on train and sweep; `saectl log REF` replays a finished artifact).

The training log inside the artifact stays the source of truth; a tracker gets a copy of each
window as it is written, then the evaluation figures. A run is named by its artifact: the W&B
run id and the TensorBoard folder are the artifact's digest, so a resumed run continues the
same tracker run. A killed process loses what its tracker had not flushed (both write
asynchronously; W&B's service drops the whole unflushed tail on SIGKILL), so a resumed run
first sends the checkpoint's windows again from the artifact's log, then the new ones.
TensorBoard is told to purge what the killed run wrote (`purge_step`), so each step is there
once; W&B keeps the first value of a step it already has (a run's steps only increase: a
second `wandb sync` of an older step is dropped), though an offline folder may then hold a
window twice. Logging never enters an address.

Offline by default where the library has it: W&B runs in offline mode unless WANDB_MODE says
otherwise (`wandb sync` uploads the folder later), writing under the store's `tracking/wandb`
(or WANDB_DIR); TensorBoard writes event files under `tracking/tensorboard/<digest>`. A tracker
that cannot start (package missing, folder not writable) is one line and training goes on
(`--log-strict` stops instead): a curve is a convenience, the artifact is the result.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from saectl.console import info
from saectl.errors import ConfigError

KINDS = ("wandb", "tensorboard")


class Tracker:
    """One artifact's run in one tracker."""

    def __init__(self, kind: str, root: Path, ref: str, config: dict, group: str | None,
                 start_step: int):
        self.kind, self.ref, self.run = kind, ref, None
        self.last_step, self.last_time = start_step, time.monotonic()  # for tokens/s
        digest = ref.split("/")[-1]
        name = f"{ref.split('/')[0]}/{digest[:12]}"
        if kind == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            folder = Path(os.environ.get("WANDB_DIR", root / "tracking" / "wandb"))
            folder.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "saectl"), id=digest[:32],
                                  name=name, group=group, config=config, dir=str(folder),
                                  resume="allow", reinit="create_new")
        else:
            from torch.utils.tensorboard import SummaryWriter

            folder = root / "tracking" / "tensorboard" / digest[:12]
            # resumed: everything the killed run wrote is purged and sent again (replay)
            self.run = SummaryWriter(str(folder), purge_step=1 if start_step else None)
            self.run.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")

    def log(self, step: int, figures: dict) -> None:
        if self.kind == "wandb":
            self.run.log({f"train/{k}": v for k, v in figures.items() if k != "step"}, step=step)
        else:
            for k, v in figures.items():
                if k != "step":
                    self.run.add_scalar(f"train/{k}", v, step)

    def replay(self, log: dict) -> None:
        """Send the windows of a stored log ({figure: [value per window]}, with `step`)."""
        for i, step in enumerate(log.get("step", [])):
            self.log(int(step), {k: float(v[i]) for k, v in log.items() if i < len(v)})

    def summary(self, figures: dict) -> None:
        flat = {f"eval/{k}": v for k, v in figures.items() if isinstance(v, (int, float))
                and not isinstance(v, bool)}
        if self.kind == "wandb":
            self.run.summary.update(flat)
        else:
            for k, v in flat.items():
                self.run.add_scalar(k, v, 0)

    def close(self) -> None:
        if self.kind == "wandb":
            self.run.finish()
        else:
            self.run.close()


def open_tracker(kind: str | None, root: Path, ref: str, config: dict, *, group: str | None = None,
                 start_step: int = 0, strict: bool = False) -> Tracker | None:
    """A started tracker, or None (no --log, or one that could not start and is not strict)."""
    if kind is None:
        return None
    if kind not in KINDS:
        raise ConfigError(f"--log {kind!r} is not one of {', '.join(KINDS)}")
    try:
        return Tracker(kind, Path(root), ref, config, group, start_step)
    except Exception as e:  # noqa: BLE001 -- any failure of a tracker is reported, not fatal
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = (f"the {kind} package is not installed (pip install {kind})"
                if isinstance(e, ImportError) else f"{type(e).__name__}: {first}")
        if strict:
            raise ConfigError(f"--log {kind} cannot start: {what}; fix it or leave out "
                              "--log-strict") from None
        info(f"train: --log {kind} cannot start: {what}; training goes on without it")
        return None


def replay(art, kind: str) -> Path:
    """`saectl log REF --to KIND`: a finished train artifact's stored log and figures into a
    tracker run of its own (named by the artifact, so a second replay continues it)."""
    from saectl import layout

    if art.stage != "train" or not art.is_complete():
        raise ConfigError(f"{art.ref} is not a complete train artifact; `saectl log` replays "
                          "the training log of one")
    group = art.group()
    names = list(group[layout.TRAIN_LOG].array_keys()) if layout.TRAIN_LOG in group else []
    if not names:
        raise ConfigError(f"{art.ref} holds no training log to replay")
    logs = {k: group[layout.train_log(k)][:] for k in names}
    manifest = art.manifest()
    tracker = open_tracker(kind, art.store, art.ref, manifest["params"], strict=True)
    assert tracker is not None
    tracker.replay(logs)
    tracker.summary(manifest.get("summary", {}))
    tracker.close()
    return Path(art.store) / "tracking" / kind
