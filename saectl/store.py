"""The artifact store: content-addressed Zarr v3 groups under `<store>/<stage>/<digest>/`.

Life of an artifact (design.md, "Artifacts"):
- created empty, with its manifest (stage, params, inputs, version, host, created) in the
  group's attributes under the key `saectl`; it is *incomplete* until
- `mark_complete` adds the summary figures and then, last and atomically, writes `COMPLETE`.
- Writers hold an exclusive `flock` on `.lock` (or a shard's own lock), which the kernel
  drops when a process dies, so a killed run never leaves a stale lock behind.
- Progress for resume lives in `progress/<writer>.json` (atomic writes); a re-run reads the
  union of those files and skips the work already done.

Paths inside an artifact come from `saectl.layout`; the store's shape (`<stage>/<digest>`,
refs, what counts as an artifact) from `saectl.artifact`, re-exported here with `saectl.gc`
and `saectl.locks`; stages never join store paths themselves.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import zarr

from saectl import __version__, faults, layout, locks
from saectl.errors import ArtifactError, NotFoundError
from saectl.hashing import SCHEMA_VERSION, canonical_json
from saectl.layout import PROGRESS, REPORT, SAE_DIR  # noqa: F401 (store.REPORT: older callers)

# The store's shape, one artifact, and gc live beside this module; their names are re-exported
# so callers keep writing `store.Artifact`, `store.atomic_write`, `store.remove`.
from saectl.artifact import (  # noqa: F401
    COMPLETE, DEFAULT_STORE, HEX_RE, LOCK, MANIFEST_KEY, REFS, STAGE_RE, STORE_ENV, TRASH,
    Artifact, address, artifact_for, atomic_write, check_ref_shape, folders, is_locked,
    list_artifacts, list_refs, read_manifest, saectl_manifest, store_root, write_ref)
from saectl.gc import gc_plan, remove, sweep_leftovers  # noqa: F401
from saectl.locks import flock  # noqa: F401 (store.flock: the lock writers and tests take)

# Every chunk is written, even one that is all fill value, so a chunk file that is missing
# from a complete artifact means damage, not zeros (`verify` counts them).
zarr.config.set({"array.write_empty_chunks": True})


def _host() -> str:
    return socket.gethostname()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Writing


def _check_writable(store: Path) -> None:
    try:
        store.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=store, prefix=".probe."):
            pass
    except OSError as e:
        raise ArtifactError(f"the store {store} is not writable ({e.strerror or e}); "
                            f"pass --store DIR or set {STORE_ENV} to a folder you can write") from None


def _create(art: Artifact, params: dict, inputs: dict[str, Artifact] | None,
            origin: dict | None) -> None:
    manifest = {
        "stage": art.stage, "digest": art.digest, "schema": SCHEMA_VERSION,
        "params": params, "inputs": {k: v.ref for k, v in (inputs or {}).items()},
        "origin": origin or {},
        "saectl_version": __version__, "created": _now(), "host": _host(), "summary": {},
        "all_chunks": True,  # every chunk is written (`verify` may count them)
    }
    # Round-trip through canonical JSON so what is stored is exactly what was hashed.
    manifest = json.loads(canonical_json(manifest))
    # mode "a", never "w": "w" empties the folder, lock file included.
    zarr.open_group(art.path, mode="a", zarr_format=3, attributes={MANIFEST_KEY: manifest})


class Writing:
    """What `writing` yields: the artifact, and `exclusive()` for the steps that must not
    overlap across shards (creating arrays, checking all shards and marking completion)."""

    def __init__(self, art: Artifact, shard: str | None):
        self.art, self.shard = art, shard
        self.completed = False
        """Whether this process marked the artifact complete: of a harvest's shards only the
        last to finish does, and only it reports the step as ran."""

    def mark_complete(self, summary: dict) -> None:
        mark_complete(self.art, summary)
        self.completed = True

    @contextmanager
    def exclusive(self):
        if self.shard is None:  # the main lock is already ours for the whole write
            yield
            return
        with flock(self.art.path / LOCK, True, self.art.ref):
            yield


@contextmanager
def writing(art: Artifact, params: dict, inputs: dict[str, Artifact] | None = None, *,
            shard: str | None = None, wait: bool = True, origin: dict | None = None):
    """Create `art` if it does not exist and hold its write lock while the block runs.

    `origin` is recorded in the manifest but not addressed: where things came from (a model's
    folder or hub id), which later stages need to find them again.

    Without `shard` the block holds the artifact's one lock. Shards of one harvest each hold
    their own (`.lock.<shard>`), so they write their disjoint regions side by side, taking the
    main lock only to create the artifact and inside `exclusive()`. A shard takes its own lock
    *before* the main one (the order `exclusive()` uses too), so from the moment the artifact
    is checked it is never without a held lock that `saectl gc` sees (`remove`).
    """
    _check_writable(art.store)
    while True:  # again only when gc moved the folder away while we waited for a lock
        try:
            art.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArtifactError(f"cannot create {art.path} ({e.strerror or e}); check the "
                                "store's permissions and free space") from None
        shard_fd = None
        if shard is not None:
            shard_fd = _take(art.path / f"{LOCK}.{shard}", wait, f"{art.ref} shard {shard}")
            if shard_fd is None:
                continue
        main_fd = _take(art.path / LOCK, wait, art.ref)
        if main_fd is not None and (shard_fd is None or
                                    locks.same_file(shard_fd, art.path / f"{LOCK}.{shard}")):
            break
        for fd in (main_fd, shard_fd):
            if fd is not None:
                os.close(fd)
    try:
        if not art.exists():
            _create(art, params, inputs, origin)
        else:
            read_manifest(art.path)  # refuse a foreign or broken store before writing into it
        if shard is not None:
            os.close(main_fd)  # the shard's own lock is held on
            main_fd = None
        yield Writing(art, shard)
    finally:
        for fd in (main_fd, shard_fd):
            if fd is not None:
                os.close(fd)


def _take(path: Path, wait: bool, what: str) -> int | None:
    """`locks.acquire` as `writing` needs it: None means start again (the folder moved)."""
    try:
        return locks.acquire(path, wait, what)
    except BlockingIOError:
        raise ArtifactError(f"{what} is being written by {locks.holder(path)}; wait for it "
                            "or run again without --no-wait") from None
    except FileNotFoundError:
        return None


def _json_safe(obj):
    """Summary figures as JSON: non-finite numbers become null, keys strings, NumPy plain."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # NumPy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def mark_complete(art: Artifact, summary: dict) -> None:
    """Store the summary figures in the manifest, then write COMPLETE atomically and last."""
    group = zarr.open_group(art.path, mode="r+", zarr_format=3)
    manifest = dict(group.attrs[MANIFEST_KEY])
    manifest["summary"] = json.loads(canonical_json(_json_safe(summary)))
    manifest["completed"] = _now()
    group.attrs[MANIFEST_KEY] = manifest
    faults.point("store.before_complete")
    atomic_write(art.path / COMPLETE, (canonical_json({"digest": art.digest}) + "\n").encode())


def read_progress(art: Artifact) -> set[int]:
    """Units of work already done, as recorded by every writer of this artifact."""
    done: set[int] = set()
    for f in (art.path / PROGRESS).glob("*.json"):
        try:
            done.update(json.loads(f.read_text())["done"])
        except (json.JSONDecodeError, KeyError):
            continue  # cannot happen with atomic writes; if it does, the work is redone
    return done


def record_progress(art: Artifact, writer: str, done: set[int]) -> None:
    atomic_write(layout.progress_file(art.path, writer), json.dumps({"done": sorted(done)}).encode())


# ---------------------------------------------------------------------------------------------
# Reading and naming


def check_complete(art: Artifact) -> Artifact:
    read_manifest(art.path)
    if not art.is_complete():
        raise ArtifactError(f"artifact {art.ref} is incomplete (its stage has not finished); "
                            "re-run the command that makes it to resume, or `saectl gc` to drop it")
    verify(art)
    return art


def _damaged(art: Artifact, what: str) -> ArtifactError:
    return ArtifactError(f"artifact {art.ref} is damaged: {what}; remove it (`saectl gc --all`, "
                         "or delete its folder) and re-run the command that made it")


def verify(art: Artifact) -> None:
    """Every array's metadata parses and every one of its chunks is on disk (a missing chunk
    would otherwise read as zeros). Costs one directory walk; chunk *contents* are checked by
    their crc32c when read (`arrays.read`). Artifacts from before every chunk was written
    (no `all_chunks` in the manifest) are only checked for metadata."""
    count = bool(read_manifest(art.path).get("all_chunks"))
    for meta in art.path.rglob("zarr.json"):
        name = str(meta.parent.relative_to(art.path)) or "."
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            raise _damaged(art, f"the metadata of '{name}' does not parse ({type(e).__name__})") from None
        if doc.get("node_type") != "array" or not count:
            continue
        try:
            shape, chunks = doc["shape"], doc["chunk_grid"]["configuration"]["chunk_shape"]
            sep = doc["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        except (KeyError, TypeError):
            raise _damaged(art, f"the metadata of '{name}' lacks its shape or chunks") from None
        grid = [math.ceil(n / c) for n, c in zip(shape, chunks)]
        want = math.prod(grid)
        chunk_dir = meta.parent / "c"
        have = sum(1 for p in chunk_dir.rglob("*") if p.is_file()) if chunk_dir.is_dir() else 0
        if have < want:
            missing = next(idx for idx in _chunk_indices(grid)
                           if not (meta.parent / ("c" + sep + sep.join(map(str, idx)))).is_file())
            raise _damaged(art, f"array '{name}' is missing chunk {'.'.join(map(str, missing))} "
                                f"({want - have} of {want} chunks missing)")


def _chunk_indices(grid: list[int]):
    return itertools.product(*(range(n) for n in grid))


def resolve(store: Path, ref: str, stage: str | None = None) -> Artifact:
    """`stage/digest`, `stage/prefix`, a bare digest prefix, or a named ref (`refs/NAME` or
    `NAME`). Refuses refs that leave the store and ambiguous prefixes."""
    ref = ref.strip().rstrip("/")
    check_ref_shape(ref)
    named = ref.removeprefix(f"{REFS}/")
    refs = list_refs(store)
    if named in refs:
        return resolve(store, refs[named], stage)
    parts = ref.split("/")
    if len(parts) == 2 and HEX_RE.match(parts[1]):
        candidates = [a for a in folders(store, parts[0]) if a.digest.startswith(parts[1])]
    elif len(parts) == 1 and HEX_RE.match(parts[0]):
        candidates = [a for a in folders(store) if a.digest.startswith(parts[0])]
    else:
        candidates = []
    if stage:
        candidates = [a for a in candidates if a.stage == stage] or candidates
    if not candidates:
        raise NotFoundError(f"no artifact '{ref}' in the store {store}; `saectl ls` lists what "
                            "is there (or pass --store / set SAECTL_STORE)")
    if len(candidates) > 1:
        names = ", ".join(a.ref[: len(a.stage) + 13] for a in candidates[:4])
        more = f" and {len(candidates) - 4} more" if len(candidates) > 4 else ""
        raise ArtifactError(f"ref '{ref}' is ambiguous: it matches {names}{more}; give more digits")
    art = candidates[0]
    if stage and art.stage != stage:
        raise ArtifactError(f"{art.ref} is a {art.stage} artifact, but this command needs a "
                            f"{stage} artifact")
    return art


def open_complete(store: Path, ref: str, stage: str | None = None) -> Artifact:
    return check_complete(resolve(store, ref, stage))


def sae_dir(art: Artifact) -> Path:
    """Where a train artifact keeps its SAE (load it with `saectl.sae.load_sae`)."""
    return layout.sae_dir(art.path)


def size_bytes(art: Artifact) -> int:
    """Bytes of the files inside the artifact (links are not followed, nor counted)."""
    return sum(os.lstat(os.path.join(d, f)).st_size
               for d, _, files in os.walk(art.path) for f in files)


