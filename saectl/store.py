"""The artifact store: content-addressed Zarr v3 groups under `<store>/<stage>/<digest>/`.

Life of an artifact (design.md, "Artifacts"):
- created empty, with its manifest (stage, params, inputs, version, host, created) in the
  group's attributes under the key `saectl`; it is *incomplete* until
- `mark_complete` adds the summary figures and then, last and atomically, writes `COMPLETE`.
- Writers hold an exclusive `flock` on `.lock` (or a shard's own lock), which the kernel
  drops when a process dies, so a killed run never leaves a stale lock behind.
- Progress for resume lives in `progress/<writer>.json` (atomic writes); a re-run reads the
  union of those files and skips the work already done.

Every path is built here (style.md item 8); stages never join store paths themselves.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import zarr

from saectl import __version__, faults
from saectl.errors import ArtifactError, NotFoundError
from saectl.hashing import SCHEMA_VERSION, canonical_json, digest

# Every chunk is written, even one that is all fill value, so a chunk file that is missing
# from a complete artifact means damage, not zeros (`verify` counts them).
zarr.config.set({"array.write_empty_chunks": True})

STORE_ENV = "SAECTL_STORE"
DEFAULT_STORE = "artifacts"
MANIFEST_KEY = "saectl"
COMPLETE = "COMPLETE"
LOCK = ".lock"
PROGRESS = "progress"
REPORT = "report"
SAE_DIR = "sae"  # a trained SAE in SAELens's layout: cfg.json, sae_weights.safetensors, ...
REFS = "refs"
TRASH = ".trash"
_STAGE_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_HEX_RE = re.compile(r"^[0-9a-f]{4,64}$")


def store_root(store: str | os.PathLike | None = None) -> Path:
    """`--store`, else `$SAECTL_STORE`, else `./artifacts`."""
    return Path(store or os.environ.get(STORE_ENV) or DEFAULT_STORE).expanduser().absolute()


@dataclass(frozen=True)
class Artifact:
    store: Path
    stage: str
    digest: str

    @property
    def path(self) -> Path:
        return self.store / self.stage / self.digest

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.digest}"

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT

    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def is_complete(self) -> bool:
        return (self.path / COMPLETE).is_file()

    def manifest(self) -> dict:
        return read_manifest(self.path)

    def group(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.path, mode=mode, zarr_format=3)

    def __str__(self) -> str:
        return self.ref


def address(stage: str, params: dict, inputs: dict[str, Artifact] | None = None) -> str:
    return digest(stage, params, {k: v.ref for k, v in (inputs or {}).items()})


def artifact_for(store: Path, stage: str, params: dict,
                 inputs: dict[str, Artifact] | None = None) -> Artifact:
    if not _STAGE_RE.match(stage):
        raise ValueError(f"bad stage name {stage!r}")
    return Artifact(store, stage, address(stage, params, inputs))


# ---------------------------------------------------------------------------------------------
# Small file primitives


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename into place (zarr's
    `_atomic_write`): a reader sees the old content or the new, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports must be readable on a shared cluster
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: Path) -> dict:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not a saectl artifact (no zarr.json); "
                            "name one that `saectl ls` lists") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"artifact {path} is damaged: zarr.json does not parse ({e}); "
                            "remove it with `saectl gc --all` or delete the folder, "
                            "then re-run the command that made it") from None
    manifest = meta.get("attributes", {}).get(MANIFEST_KEY)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is a Zarr store but not a saectl artifact (no '{MANIFEST_KEY}' "
                            "manifest); use `saectl import` to bring in arrays made elsewhere")
    return manifest


def _host() -> str:
    return socket.gethostname()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Locks


@contextmanager
def flock(path: Path, wait: bool = True, what: str = ""):
    """An exclusive lock on `path` for as long as the block runs. The kernel releases it when
    the process dies, so SIGKILL never leaves a stale lock. With wait=False a held lock is an
    ArtifactError naming its holder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text(errors="replace").strip() or "another process"
            if not wait:
                raise ArtifactError(f"{what or path} is being written by {holder}; wait for it "
                                    "or run again without --no-wait") from None
            from saectl.console import info

            info(f"waiting for {holder}, which is writing {what or path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {_host()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def is_locked(art: Artifact) -> bool:
    """True if some process holds any of the artifact's locks right now."""
    for lock in art.path.glob(f"{LOCK}*"):
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


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

    Without `shard` the block holds the artifact's one lock. Shards of one harvest create the
    artifact under that lock, then each holds only its own (`.lock.<shard>`), so they write
    their disjoint regions side by side, taking the main lock only inside `exclusive()`.
    """
    _check_writable(art.store)
    try:
        art.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create {art.path} ({e.strerror or e}); check the store's "
                            "permissions and free space") from None
    with flock(art.path / LOCK, wait, art.ref):
        if not art.exists():
            _create(art, params, inputs, origin)
        else:
            read_manifest(art.path)  # refuse a foreign or broken store before writing into it
        if shard is None:
            yield Writing(art, None)
            return
    with flock(art.path / f"{LOCK}.{shard}", wait, f"{art.ref} shard {shard}"):
        yield Writing(art, shard)


def _json_safe(obj):
    """Summary figures as JSON: non-finite numbers become null, keys strings, NumPy plain."""
    import math

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
    atomic_write(art.path / PROGRESS / f"{writer}.json", json.dumps({"done": sorted(done)}).encode())


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
    import math

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
    import itertools

    return itertools.product(*(range(n) for n in grid))


def _all_artifacts(store: Path, stage: str | None = None) -> list[Artifact]:
    if not store.is_dir():
        return []
    out = []
    for sdir in sorted(store.iterdir()):
        if not sdir.is_dir() or sdir.name in (REFS, TRASH) or not _STAGE_RE.match(sdir.name):
            continue
        if stage and sdir.name != stage:
            continue
        for adir in sorted(sdir.iterdir()):
            if adir.is_dir() and _HEX_RE.match(adir.name):
                out.append(Artifact(store, sdir.name, adir.name))
    return out


def list_artifacts(store: Path, stage: str | None = None) -> list[Artifact]:
    return _all_artifacts(store, stage)


def list_refs(store: Path) -> dict[str, str]:
    """{name: 'stage/digest'} for every named ref under `<store>/refs/`."""
    base = store / REFS
    if not base.is_dir():
        return {}
    return {str(p.relative_to(base)): p.read_text().strip()
            for p in sorted(base.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def write_ref(store: Path, name: str, art: Artifact) -> None:
    _check_ref_shape(name)
    atomic_write(store / REFS / name, (art.ref + "\n").encode())


def _check_ref_shape(ref: str) -> None:
    parts = Path(ref).parts
    if not ref or os.path.isabs(ref) or ".." in parts or ref.startswith("~"):
        raise ArtifactError(f"ref '{ref}' points outside the store; name an artifact as "
                            "STAGE/DIGEST, a digest prefix, or a pipeline ref (see `saectl ls`)")


def resolve(store: Path, ref: str, stage: str | None = None) -> Artifact:
    """`stage/digest`, `stage/prefix`, a bare digest prefix, or a named ref (`refs/NAME` or
    `NAME`). Refuses refs that leave the store and ambiguous prefixes."""
    ref = ref.strip().rstrip("/")
    _check_ref_shape(ref)
    named = ref.removeprefix(f"{REFS}/")
    refs = list_refs(store)
    if named in refs:
        return resolve(store, refs[named], stage)
    parts = ref.split("/")
    if len(parts) == 2 and _HEX_RE.match(parts[1]):
        candidates = [a for a in _all_artifacts(store, parts[0]) if a.digest.startswith(parts[1])]
    elif len(parts) == 1 and _HEX_RE.match(parts[0]):
        candidates = [a for a in _all_artifacts(store) if a.digest.startswith(parts[0])]
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
    return art.path / SAE_DIR


def size_bytes(art: Artifact) -> int:
    return sum(p.stat().st_size for p in art.path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# Garbage collection


def gc_plan(store: Path, everything: bool = False) -> tuple[list[Artifact], list[Artifact]]:
    """(to_remove, kept_because_locked). Kept: what a ref names and, transitively, its inputs;
    unless `everything`, also the inputs of every complete artifact; and anything being written."""
    arts = _all_artifacts(store)
    by_ref = {a.ref: a for a in arts}
    keep: set[str] = set()
    todo = []
    for target in list_refs(store).values():
        todo.append(target)
    if not everything:
        for a in arts:
            if a.is_complete():
                try:
                    todo.extend(a.manifest().get("inputs", {}).values())
                except ArtifactError:
                    pass
    while todo:
        ref = todo.pop()
        if ref in keep or ref not in by_ref:
            continue
        keep.add(ref)
        try:
            todo.extend(by_ref[ref].manifest().get("inputs", {}).values())
        except ArtifactError:
            pass
    remove, busy = [], []
    for a in arts:
        if a.ref in keep:
            continue
        (busy if is_locked(a) else remove).append(a)
    return remove, busy


def remove(art: Artifact) -> None:
    """Move the artifact out of its place under its lock (so no writer is mid-way), then delete."""
    trash = art.store / TRASH
    trash.mkdir(exist_ok=True)
    dest = trash / f"{art.stage}-{art.digest}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with flock(art.path / LOCK, wait=False, what=art.ref):
            os.rename(art.path, dest)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
        return
    shutil.rmtree(dest, ignore_errors=True)
