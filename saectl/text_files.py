"""Reading documents out of local corpus files, for saectl.data: `.txt` (one document per
file), `.jsonl`/`.json` (a text field of JSON lines, or of one array of objects), `.parquet` (a
text column, one row group in memory at a time), and the packaged corpus's JSON. Bad input is a
one-line ConfigError that names the file, the line or item, and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from saectl.errors import ConfigError, SaectlError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
"""File kinds read from disk; `.json` holds JSON lines, or one array of objects."""


def _decode(data: bytes, path: str, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 (invalid byte at offset {offset + e.start:,}); "
            "re-encode it as UTF-8 (e.g. `iconv -t UTF-8`)"
        ) from None


def _text_of(obj: object, path: str, where: str, column: str) -> str | None:
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}, {where}: not a JSON object; write one object per line")
    if column not in obj:
        fields = ", ".join(sorted(obj)) or "none"
        raise ConfigError(
            f"{path}, {where}: no field {column!r} (it has: {fields}); pass --text-column"
        )
    value = obj[column]
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{path}, {where}: field {column!r} is {type(value).__name__}, not text")
    return value


def _iter_json(path: str, column: str) -> Iterator[str | None]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
        f.seek(0)
        if head.startswith(b"["):  # a .json array of objects: small by nature, read at once
            try:
                items = json.loads(_decode(f.read(), path))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
            for i, obj in enumerate(items, 1):
                yield _text_of(obj, path, f"item {i}", column)
            return
        offset = 0
        for lineno, raw in enumerate(f, 1):  # binary lines, so errors can name the byte offset
            line = _decode(raw, path, offset).removeprefix("\ufeff").strip()
            offset += len(raw)
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{path}, line {lineno}: invalid JSON ({e.msg}); write one object per line"
                ) from None
            yield _text_of(obj, path, f"line {lineno}", column)


def _iter_parquet(path: str, column: str) -> Iterator[str | None]:
    try:
        import pyarrow as pa  # deferred: an optional extra, only for .parquet
        import pyarrow.parquet as pq
    except ImportError:
        raise SaectlError(
            "reading .parquet needs pyarrow: `pip install 'saectl[datasets]'`"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path} is not a readable parquet file ({e}); rewrite it") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise ConfigError(
            f"{path}: no column {column!r} (it has: {', '.join(names)}); pass --text-column"
        )
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"{path}: column {column!r} is {kind}, not text; pass --text-column")
    for g in range(pf.num_row_groups):  # one row group in memory at a time
        yield from pf.read_row_group(g, columns=[column]).column(0).to_pylist()


def iter_packaged(path: str) -> Iterator[str | None]:
    """The `extract` of each entry of the packaged Wikipedia summaries (None where absent)."""
    with open(path, "rb") as f:
        entries = json.loads(_decode(f.read(), path))
    for entry in entries.values():  # the dict's order is the file's order: deterministic
        yield entry.get("extract") if isinstance(entry, dict) else None


def iter_file(path: str, column: str) -> Iterator[str | None]:
    """The documents of one local file, in file order; None where a row's text is null."""
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        with open(path, "rb") as f:
            # One document per file; the final newline is file formatting, not text.
            yield _decode(f.read(), path).removeprefix("\ufeff").rstrip()
    elif suffix in (".jsonl", ".json"):
        yield from _iter_json(path, column)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, column)
    else:
        raise ConfigError(f"{path} is not one of {', '.join(SUFFIXES)}; convert it or rename it")
