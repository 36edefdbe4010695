"""Content addresses. Imports nothing else of saectl's, so what decides an address is all here.

digest = sha256(canonical JSON of {stage, schema, params, inputs}), as in joblib's `hashing.py`
but never through pickle: only plain JSON values are hashed, so an address can be recomputed
by anyone from the manifest alone. `tests/test_hashing.py` pins exact digests so addresses
never change by accident.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

# Bump when the meaning of stored content changes for the same params (it re-addresses everything).
SCHEMA_VERSION = 1


def _plain(obj):
    """JSON-ready copy: tuples become lists, Paths strings; NaN/inf and other types are refused."""
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"address keys must be strings: {list(obj)!r}")
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite number in an address: {obj}")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot put a {type(obj).__name__} into an address: {obj!r}")


def canonical_json(obj) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: one spelling per value."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(stage: str, params: dict, inputs: dict[str, str] | None = None) -> str:
    """The address of what `stage` makes from `params` (fully resolved) and input digests."""
    doc = {"stage": stage, "schema": SCHEMA_VERSION, "params": params, "inputs": inputs or {}}
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
