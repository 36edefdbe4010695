"""Tests for saectl.data: resolving --dataset, reading each file kind, packing tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import corpus_texts

from saectl.data import (
    DEFAULT_DATASET,
    DataSpec,
    count_tokens,
    dataset_identity,
    iter_texts,
    pack_tokens,
    resolve_dataset,
)
from saectl.errors import ConfigError, NotFoundError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def write_parquet(path, texts, row_group_size=7):
    pq.write_table(
        pa.table({"text": texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size
    )
    return path


def read(name, **kw):
    return list(iter_texts(resolve_dataset(str(name), **kw)))


def expected_stream(tok, texts):
    """The EOS-joined stream, built one document at a time (no batching) as a reference."""
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if ids:
            out += ([tok.eos_token_id] if out else []) + ids
    return out


# ---------------------------------------------------------------- reading each kind


def test_txt_one_document_per_file(tmp_path):
    doc = "First paragraph.\n\nSecond paragraph, same document."
    (tmp_path / "a.txt").write_text(doc + "\n")
    spec = resolve_dataset(str(tmp_path / "a.txt"))
    assert spec.kind == "files" and spec.paths == (str(tmp_path / "a.txt"),)
    assert list(iter_texts(spec)) == [doc]


def test_jsonl_round_trip(tmp_path):
    texts = corpus_texts(50)
    assert read(write_jsonl(tmp_path / "c.jsonl", texts)) == texts


def test_json_lines_and_json_array(tmp_path):
    texts = corpus_texts(5)
    assert read(write_jsonl(tmp_path / "lines.json", texts)) == texts
    (tmp_path / "array.json").write_text(json.dumps([{"body": t} for t in texts], indent=2))
    assert read(tmp_path / "array.json", text_column="body") == texts


def test_parquet_round_trip_across_row_groups(tmp_path):
    texts = corpus_texts(30)
    path = write_parquet(tmp_path / "c.parquet", texts)
    assert pq.ParquetFile(path).num_row_groups > 1
    assert read(path) == texts


def test_folder_mixes_kinds_in_sorted_order(tmp_path):
    texts = corpus_texts(20)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "x.txt").write_text("hidden")  # hidden folders are skipped
    (root / "notes.md").write_text("not a corpus file")  # other suffixes are skipped
    write_jsonl(root / "b.jsonl", texts[:5])
    write_parquet(root / "sub" / "c.parquet", texts[5:15])
    (root / "a.txt").write_text(texts[15])
    (root / "sub" / "d.txt").write_text(texts[16])
    spec = resolve_dataset(str(root))
    names = [p[len(str(root)) + 1 :] for p in spec.paths]
    assert names == ["a.txt", "b.jsonl", "sub/c.parquet", "sub/d.txt"]
    expected = [texts[15], *texts[:5], *texts[5:15], texts[16]]
    assert list(iter_texts(spec)) == expected
    assert list(iter_texts(resolve_dataset(str(root)))) == expected  # deterministic


def test_empty_documents_and_files_are_skipped(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    write_jsonl(tmp_path / "x.jsonl", ["one", "", "   ", "two"])
    with open(tmp_path / "x.jsonl", "a") as f:
        f.write("\n" + json.dumps({"text": None}) + "\n")
    assert read(tmp_path) == ["one", "two"]
    assert read(tmp_path / "empty.txt") == []


# ---------------------------------------------------------------- errors


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_names_file_and_offset(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    good = b'{"text": "fine"}\n' if suffix == ".jsonl" else b"fine "
    path.write_bytes(good + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError) as err:
        read(path)
    msg = one_line(err)
    assert str(path) in msg and "UTF-8" in msg
    assert f"offset {len(good) + 13}" in msg  # the byte \xe9 itself


def test_missing_jsonl_field_names_file_line_and_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n\n{"body": "x", "id": 2}\n')
    with pytest.raises(ConfigError) as err:
        read(path)
    msg = one_line(err)
    assert str(path) in msg and "line 3" in msg and "body, id" in msg and "--text-column" in msg


def test_invalid_json_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ConfigError, match="line 2"):
        read(path)


def test_missing_parquet_column(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", ["a", "b"])
    with pytest.raises(ConfigError) as err:
        read(path, text_column="body")
    assert "text, n" in one_line(err)


def test_missing_path_is_not_found(tmp_path):
    for name in [str(tmp_path / "nope"), "./nope-dir", "data/nope.jsonl", "a/b/c"]:
        with pytest.raises(NotFoundError) as err:
            resolve_dataset(name)
        assert name in one_line(err)


def test_empty_name_is_an_error():
    with pytest.raises(ConfigError, match="--dataset is empty"):
        resolve_dataset(" ")


def test_folder_without_corpus_files(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(NotFoundError) as err:
        resolve_dataset(str(tmp_path))
    assert ".txt" in one_line(err) and ".parquet" in str(err.value)


def test_unsupported_file_suffix(tmp_path):
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(ConfigError, match=r"\.jsonl"):
        resolve_dataset(str(tmp_path / "c.csv"))


def test_hf_id_resolves_and_fails_offline_in_one_line(monkeypatch):
    # No network here; offline mode makes the hub refuse at once instead of retrying for ~25 s.
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    spec = resolve_dataset("some-org/some-dataset", split="validation")
    assert spec == DataSpec("some-org/some-dataset", "hf", (), "text", "validation")
    assert resolve_dataset("wikitext:wikitext-2-raw-v1").kind == "hf"
    with pytest.raises(NotFoundError) as err:
        next(iter_texts(spec))
    assert "'some-org/some-dataset' is not a local file or folder" in one_line(err)


# ---------------------------------------------------------------- identity


def test_dataset_identity_tracks_content_not_folder_name(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    write_jsonl(root / "a.jsonl", corpus_texts(10))
    (root / "sub" / "b.txt").write_text("hello world")
    ident = dataset_identity(resolve_dataset(str(root)))
    json.dumps(ident)  # JSON-able
    assert [f["name"] for f in ident["files"]] == ["a.jsonl", "sub/b.txt"]
    assert str(tmp_path) not in json.dumps(ident)

    moved = tmp_path / "renamed"
    shutil.move(root, moved)
    assert dataset_identity(resolve_dataset(str(moved))) == ident

    (moved / "sub" / "b.txt").write_text("hello world!")
    assert dataset_identity(resolve_dataset(str(moved))) != ident
    assert dataset_identity(resolve_dataset(str(moved), text_column="body")) != ident


def test_hf_identity():
    ident = dataset_identity(resolve_dataset("org/ds:cfg", text_column="content", split="test"))
    assert ident == {"hf": "org/ds:cfg", "split": "test", "text_column": "content"}


# ---------------------------------------------------------------- packing


def test_pack_rows_start_with_bos_and_follow_the_stream(tok, tiny_corpus):
    texts = list(iter_texts(resolve_dataset(str(tiny_corpus))))
    stream = expected_stream(tok, texts)
    ctx, n_seq = 16, 40
    rows = pack_tokens(tok, texts, ctx, n_seq)
    assert rows.shape == (n_seq, ctx) and rows.dtype == np.int32
    assert (rows[:, 0] == tok.bos_token_id).all()
    assert rows[:, 1:].ravel().tolist() == stream[: n_seq * (ctx - 1)]
    assert (pack_tokens(tok, texts, ctx, n_seq) == rows).all()  # deterministic
    assert count_tokens(tok, texts) == len(stream)


def test_pack_batches_beyond_one_tokenizer_call(tok):
    texts = corpus_texts(700)  # more documents than one tokenizer batch
    stream = expected_stream(tok, texts)
    ctx = 32
    n_seq = len(stream) // (ctx - 1)  # every full row; the partial last row is dropped
    rows = pack_tokens(tok, texts, ctx, n_seq)
    assert rows.shape == (n_seq, ctx)
    assert rows[:, 1:].ravel().tolist() == stream[: n_seq * (ctx - 1)]


def test_pack_stops_reading_once_full(tok):
    seen = []

    def texts():
        for i, t in enumerate(corpus_texts(10_000)):
            seen.append(i)
            yield t

    pack_tokens(tok, texts(), 8, 2)
    assert len(seen) < 1000


def test_pack_too_small_corpus_says_how_many_tokens(tok):
    texts = corpus_texts(10)
    total = len(expected_stream(tok, texts))
    with pytest.raises(ConfigError) as err:
        pack_tokens(tok, texts, 16, 10_000)
    msg = one_line(err)
    fits = total // 15
    assert f"holds only {total:,} tokens ({fits} contexts of 16)" in msg
    assert f"--tokens {fits * 16} or fewer" in msg
    with pytest.raises(ConfigError, match="--context-size"):
        pack_tokens(tok, ["cat"], 64, 1)


@pytest.mark.parametrize("ctx,n_seq", [(1, 4), (0, 4), (8, 0), (8, 2.5)])
def test_pack_validates_sizes(tok, ctx, n_seq):
    with pytest.raises(ConfigError):
        pack_tokens(tok, ["some text"], ctx, n_seq)


# ---------------------------------------------------------------- the packaged default


def test_packaged_default_corpus():
    spec = resolve_dataset(None)
    assert spec.kind == "packaged" and resolve_dataset(DEFAULT_DATASET) == spec
    texts = list(iter_texts(spec))
    assert len(texts) > 9_000
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert texts[:3] == list(iter_texts(spec))[:3]
    ident = dataset_identity(spec)
    assert ident["files"][0]["name"] == "summaries_en-us.json"
