"""`saectl gc`: remove the artifacts no named ref keeps, safely on a shared store.

Only saectl's own artifacts are ever considered (a folder whose `zarr.json` carries a saectl
manifest for its stage); symbolic links are never followed and nothing outside the store is
touched. An artifact is removed under its main lock, after every other lock in it (a harvest
shard's) is probed again, so a writer that started after planning keeps its artifact.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from saectl import locks
from saectl.artifact import (LOCK, STAGE_RE, TRASH, Artifact, folders, is_locked, list_refs,
                             saectl_manifest)


def gc_plan(store: Path, everything: bool = False) -> tuple[list[Artifact], list[Artifact]]:
    """(to_remove, kept_because_locked), among saectl's own artifacts only (a folder whose
    `zarr.json` carries no saectl manifest is never planned). Kept: what a ref names and,
    transitively, its inputs; unless `everything`, also the inputs of every complete artifact;
    and anything being written (`remove` asks again under the lock)."""
    manifests = {}
    for a in folders(store):
        m = saectl_manifest(a)
        if m is not None:
            manifests[a.ref] = (a, m)
    keep: set[str] = set()
    todo = list(list_refs(store).values())
    if not everything:
        for a, m in manifests.values():
            if a.is_complete():
                todo.extend(m.get("inputs", {}).values())
    while todo:
        ref = todo.pop()
        if ref in keep or ref not in manifests:
            continue
        keep.add(ref)
        todo.extend(manifests[ref][1].get("inputs", {}).values())
    remove, busy = [], []
    for ref, (a, _) in manifests.items():
        if ref not in keep:
            (busy if is_locked(a) else remove).append(a)
    return remove, busy


def _inside(store: Path, path: Path) -> bool:
    """`path` is a real folder (no link on the way) that resolves inside the store."""
    root = store.resolve()
    return (not path.is_symlink() and not path.parent.is_symlink()
            and path.resolve().is_relative_to(root) and path.resolve() != root)


def remove(art: Artifact) -> bool:
    """Remove `art` unless a writer holds any of its locks; True when it is gone.

    Under the artifact's main lock (so no new writer can start), every other lock in it (a
    harvest shard's) is probed again, since a shard that started after `gc_plan` holds only
    its own. The folder is then renamed to a hidden name beside it (same folder, so the same
    filesystem: never EXDEV) and deleted; `shutil.rmtree` removes links inside it without
    following them. Only a saectl artifact inside the store is ever touched."""
    if not _inside(art.store, art.path) or saectl_manifest(art) is None:
        return False
    try:
        fd = locks.acquire(art.path / LOCK, wait=False, what=art.ref)
    except BlockingIOError:
        return False
    except FileNotFoundError:
        return True
    if fd is None:  # moved away while we opened it: someone else removed it
        return True
    try:
        others = [p for p in art.path.glob(f"{LOCK}.*") if p.name != LOCK]
        if any(locks.held(p) for p in others):
            return False
        dest = art.path.with_name(f".{art.digest}.removing-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(art.path, dest)
    finally:
        os.close(fd)
    shutil.rmtree(dest, ignore_errors=True)
    return True


def sweep_leftovers(store: Path) -> list[Path]:
    """Delete what an interrupted `remove` left: `<stage>/.<digest>.removing-*` folders, and
    the `.trash` folder older versions moved artifacts into. Returns what it deleted."""
    gone = []
    trash = store / TRASH
    if trash.is_dir() and not trash.is_symlink():
        gone.append(trash)
    for sdir in (store.iterdir() if store.is_dir() else ()):
        if sdir.is_symlink() or not sdir.is_dir() or not STAGE_RE.match(sdir.name):
            continue
        gone += [p for p in sdir.glob(".*.removing-*") if p.is_dir() and not p.is_symlink()]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
