"""Explanations and scores cached apart from the scan (issue 20): every answer an explainer or
scorer gave, kept in the store but outside any artifact, so an interpret run with another
explainer, other scorers or another `--explain-max` reuses the answers it can, and a run that
asks the same question of the same model asks nothing.

    <store>/.explanations/<explainer>/<kk>.json

`<explainer>` is 16 hex digits of the sha256 of the client's identity (endpoint and model, or
a local model's content hash); `kk` the first two hex digits of an answer's key, which is
explain.py's `ResponseCache.key`: sha256 of (client identity, the prompt's messages, which hold
the examples shown, max_tokens). So the cache is keyed by explainer, prompt and examples, and
a changed prompt or a changed example is a new question. The folder's name starts with a dot:
it is no stage, so `saectl gc` and `ls` pass it by.

Each file is rewritten whole and atomically, under a flock, merged with what another process
wrote meanwhile, so two runs sharing an explainer lose nothing. A damaged file costs only its
answers (asked again).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from saectl.errors import SaectlError
from saectl.hashing import canonical_json
from saectl.locks import flock
from saectl.store import MANIFEST_KEY, Artifact, atomic_write, list_artifacts

if TYPE_CHECKING:  # explain.py imports this module
    from saectl.explain import Client

FOLDER = ".explanations"


def explainer_folder(root: Path, identity: dict) -> Path:
    return Path(root) / FOLDER / hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


class StoreCache:
    """`ResponseCache`'s interface (`key`, `get`, `put`, `save`) over sharded files in the
    store; `legacy` is an artifact's own `responses.json` from before, read as seed answers."""

    key = staticmethod(lambda client, messages, max_tokens: ResponseCache.key(
        client, messages, max_tokens))

    def __init__(self, root: Path, identity: dict, legacy: Path | None = None):
        self.folder = explainer_folder(root, identity)
        self.shards: dict[str, dict[str, str]] = {}
        self.dirty: dict[str, dict[str, str]] = {}
        self.legacy: dict[str, str] = {}
        if legacy is not None:
            self.legacy = _read(Path(legacy))

    def _shard(self, key: str) -> dict[str, str]:
        kk = key[:2]
        if kk not in self.shards:
            self.shards[kk] = _read(self.folder / f"{kk}.json")
        return self.shards[kk]

    def get(self, key: str) -> str | None:
        found = self._shard(key).get(key)
        return found if found is not None else self.legacy.get(key)

    def put(self, answers: dict[str, str]) -> None:
        for k, v in answers.items():
            self._shard(k)[k] = v
            self.dirty.setdefault(k[:2], {})[k] = v

    def save(self) -> None:
        if not self.dirty:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for kk, new in self.dirty.items():
            path = self.folder / f"{kk}.json"
            with flock(self.folder / f".{kk}.lock", True, f"explanations cache {kk}"):
                merged = {**_read(path), **new}  # another process may have added answers
                atomic_write(path, json.dumps(merged, sort_keys=True, indent=0).encode())
            self.shards[kk] = merged
        self.dirty = {}

    def __len__(self) -> int:
        return sum(len(_read(p)) for p in self.folder.glob("*.json")) if self.folder.is_dir() \
            else 0


def _read(path: Path) -> dict[str, str]:
    try:
        loaded = json.loads(path.read_text())
        return {k: v for k, v in loaded.items() if isinstance(v, str)}
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return {}


class ResponseCache:
    """Answers keyed by sha256 of (client identity, messages, max_tokens), kept in one JSON
    file written atomically; `path=None` keeps them in memory only."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self.entries = {k: v for k, v in loaded.items() if isinstance(v, str)}
            except (ValueError, AttributeError, UnicodeDecodeError):
                pass  # a damaged cache costs only the questions asked again

    @staticmethod
    def key(client: Client, messages: list[dict], max_tokens: int) -> str:
        doc = {"client": client.identity, "messages": messages, "max_tokens": max_tokens}
        return hashlib.sha256(canonical_json(doc).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, answers: dict[str, str]) -> None:
        self.entries.update(answers)

    def save(self) -> None:
        if self.path is not None:
            atomic_write(self.path, json.dumps(self.entries, sort_keys=True, indent=0).encode())


def cached_complete(client: Client, cache: ResponseCache | None, batch: list[list[dict]],
                    max_tokens: int, chunk: int = 64) -> list[str]:
    """`client.complete` for the prompts `cache` lacks (each distinct prompt once), in chunks
    saved as they finish, so an interrupted run keeps what it was already told."""
    if cache is None:
        return client.complete(batch, max_tokens) if batch else []
    keys = [cache.key(client, m, max_tokens) for m in batch]
    known: dict[str, str] = {}
    first: dict[str, list[dict]] = {}
    for k, m in zip(keys, batch):
        if k in known or k in first:
            continue
        found = cache.get(k)
        if found is None:
            first[k] = m
        else:
            known[k] = found
    missing = list(first)
    for start in range(0, len(missing), chunk):
        part = missing[start:start + chunk]
        answers = dict(zip(part, client.complete([first[k] for k in part], max_tokens),
                           strict=True))
        cache.put(answers)
        cache.save()
        known.update(answers)
    return [known[k] for k in keys]


# ---------------------------------------------------------------------------------------------
# The scan, shared by artifacts that differ only in their explanations


def _scan_key(params: dict, explain_only) -> dict:
    return json.loads(canonical_json({k: v for k, v in params.items()
                                      if k not in explain_only}))


def scan_donor(plan, explain_only) -> Artifact | None:
    """A complete artifact of `plan`'s stage and inputs whose address differs from `plan`'s
    only in the params `explain_only`: its scan is what `plan`'s would be."""
    want = _scan_key(plan.params, explain_only)
    inputs = {k: a.ref for k, a in plan.inputs.items()}
    for art in list_artifacts(plan.art.store, plan.art.stage):
        if art.ref == plan.art.ref or not art.is_complete():
            continue
        try:
            m = art.manifest()
        except SaectlError:
            continue
        if m.get("inputs") == inputs and _scan_key(m.get("params") or {}, explain_only) == want:
            return art
    return None


def copy_members(donor: Artifact, art: Artifact, members) -> None:
    """The donor's Zarr members into `art`, hard-linked where the filesystem allows (the
    chunks of a complete artifact never change), copied where not."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for name in members:
        src, dst = donor.path / name, art.path / name
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, copy_function=link)
    # The root group's attributes that the members go with (the scan's token count), not the
    # manifest: each artifact keeps its own.
    attrs = {k: v for k, v in donor.group().attrs.asdict().items() if k != MANIFEST_KEY}
    if attrs:
        art.group("r+").attrs.update(attrs)
