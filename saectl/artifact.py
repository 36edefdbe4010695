"""One artifact and the shape of the store: where `<store>/<stage>/<digest>/` is, what makes
a folder one of saectl's (a `zarr.json` whose attributes carry a saectl manifest), named refs,
and the atomic write every small file goes through. `saectl.store` builds on this (writing,
reading, resolving) and re-exports it; `saectl.gc` removes what no ref keeps.

The store may be shared (a cluster filesystem several people write to), so nothing here
follows a symbolic link inside the store, and a folder without a saectl manifest is someone
else's: listed by nothing, removed by nothing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zarr

from saectl import locks
from saectl.errors import ArtifactError
from saectl.hashing import digest
from saectl.layout import REPORT

STORE_ENV = "SAECTL_STORE"
DEFAULT_STORE = "artifacts"
MANIFEST_KEY = "saectl"
COMPLETE = "COMPLETE"
LOCK = ".lock"
REFS = "refs"
TRASH = ".trash"  # where gc once moved artifacts; now only emptied (saectl.gc)
STAGE_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
HEX_RE = re.compile(r"^[0-9a-f]{4,64}$")


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
    if not STAGE_RE.match(stage):
        raise ValueError(f"bad stage name {stage!r}")
    return Artifact(store, stage, address(stage, params, inputs))


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename into place (zarr's
    `_atomic_write`): a reader sees the old content or the new, never half of it."""
    write_atomically(path, lambda f: f.write(data))


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`atomic_write` for content streamed by `write(file)` (a checkpoint too big to hold)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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
                            "delete the folder (gc leaves what it cannot read as saectl's), "
                            "then re-run the command that made it") from None
    manifest = meta.get("attributes", {}).get(MANIFEST_KEY)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is a Zarr store but not a saectl artifact (no '{MANIFEST_KEY}' "
                            "manifest); use `saectl import` to bring in arrays made elsewhere")
    return manifest


def is_locked(art: Artifact) -> bool:
    """True if some process holds any of the artifact's locks (its own or a shard's) now."""
    return any(locks.held(p) for p in sorted(art.path.glob(f"{LOCK}*")))


def folders(store: Path, stage: str | None = None) -> list[Artifact]:
    """Every `<stage>/<hex>` folder, whatever it holds; symbolic links are never followed (a
    stage folder linked elsewhere would make the store reach outside itself)."""
    if not store.is_dir():
        return []
    out = []
    for sdir in sorted(store.iterdir()):
        if (sdir.is_symlink() or not sdir.is_dir() or sdir.name in (REFS, TRASH)
                or not STAGE_RE.match(sdir.name) or (stage and sdir.name != stage)):
            continue
        for adir in sorted(sdir.iterdir()):
            if not adir.is_symlink() and adir.is_dir() and HEX_RE.match(adir.name):
                out.append(Artifact(store, sdir.name, adir.name))
    return out


def saectl_manifest(art: Artifact) -> dict | None:
    """The manifest when `art` is one of saectl's (its `zarr.json` carries a manifest for this
    very stage); None for a foreign folder or an unreadable one."""
    try:
        manifest = read_manifest(art.path)
    except ArtifactError:
        return None
    return manifest if manifest.get("stage") == art.stage else None


def damaged_manifest(art: Artifact) -> bool:
    meta = art.path / "zarr.json"
    if meta.is_symlink() or not meta.is_file():
        return False
    try:
        json.loads(meta.read_text())
    except (OSError, ValueError):
        return True
    return False


def list_artifacts(store: Path, stage: str | None = None) -> list[Artifact]:
    """saectl's artifacts (and ones whose manifest no longer parses, which reading names as
    damaged); folders without a saectl manifest are someone else's and are skipped."""
    return [a for a in folders(store, stage)
            if saectl_manifest(a) is not None or damaged_manifest(a)]


def list_refs(store: Path) -> dict[str, str]:
    """{name: 'stage/digest'} for every named ref under `<store>/refs/`."""
    base = store / REFS
    if not base.is_dir():
        return {}
    return {str(p.relative_to(base)): p.read_text().strip()
            for p in sorted(base.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def write_ref(store: Path, name: str, art: Artifact) -> None:
    check_ref_shape(name)
    atomic_write(store / REFS / name, (art.ref + "\n").encode())


def check_ref_shape(ref: str) -> None:
    parts = Path(ref).parts
    if not ref or os.path.isabs(ref) or ".." in parts or ref.startswith("~"):
        raise ArtifactError(f"ref '{ref}' points outside the store; name an artifact as "
                            "STAGE/DIGEST, a digest prefix, or a pipeline ref (see `saectl ls`)")
