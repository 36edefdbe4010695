"""Training checkpoints on disk: written atomically, read without running any code (issue 15).

A checkpoint lives inside a train artifact, in a store that other people may be able to write
(a shared cluster filesystem). It holds only tensors and plain values (dicts, lists, strings,
numbers), so it is read with `torch.load(weights_only=True)`: a pickle planted in its place is
refused instead of run, with one line saying how to recover (delete it; the SAE then trains
from scratch).

It is written the way `store.atomic_write` writes: to a temporary file in the same folder,
fsynced, renamed into place, and the folder fsynced so the rename itself survives a crash. A
killed run leaves the old checkpoint or the new one, never half of one. It is streamed to the
file rather than built in memory first: a wide SAE's checkpoint (weights and Adam moments) runs
to gigabytes.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

from saectl.artifact import write_atomically
from saectl.errors import SaectlError


def save(path: Path, state: dict) -> None:
    import torch  # deferred: torch is heavy, and this module is imported without it

    write_atomically(path, lambda f: torch.save(state, f))
    _fsync_dir(path.parent)


def load(path: Path, device, keys: tuple[str, ...] = ()) -> dict:
    """The checkpoint at `path` (a dict holding `keys`), or a one-line SaectlError."""
    import torch  # deferred: torch is heavy

    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle before refusing it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
        raise _refused(path, type(e).__name__) from None
    if not isinstance(state, dict) or not set(keys) <= set(state):
        raise _refused(path, "not a saectl checkpoint")
    return state


def remove(path: Path) -> None:
    """Delete the checkpoint and any temporary file a killed save left beside it."""
    path.unlink(missing_ok=True)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _refused(path: Path, why: str) -> SaectlError:
    return SaectlError(f"refusing to resume from {path}: it is damaged or holds more than tensors "
                       f"and plain values ({why}), so it was not loaded; delete it to train this "
                       f"SAE from scratch: rm {path}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder; the rename is all they give
        pass
    finally:
        os.close(fd)
