"""Shuffle: a true permutation, a sequence-level split, BOS left out, bounded memory, resume."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from saectl import arrays, store
from stages.shuffle import Permutation
from tests.helpers import assert_one_line_error, run_cli, run_subprocess, tried


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097, 65536, 100_003])
def test_permutation_is_a_bijection(n):
    p = Permutation(n, seed=7)(np.arange(n))
    assert np.array_equal(np.sort(p), np.arange(n))
    if n > 100:
        assert np.mean(p == np.arange(n)) < 0.01  # not the identity
        assert not np.array_equal(p, Permutation(n, seed=8)(np.arange(n)))


def make_import(tmp_path, capsys, n=6000, d=24, context_size=20, dtype="float32", store_dir=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] = np.arange(n)  # row identity rides along in column 0 (exact in float32)
    np.save(tmp_path / "x.npy", x)
    res = run_cli(capsys, "import", tmp_path / "x.npy", "--hook", "h", "--context-size",
                  context_size, "--dtype", dtype, "--store", store_dir or tmp_path)
    assert res.code == 0, res.err
    return res.out.strip(), x


def test_shuffle_is_a_permutation_split_by_sequence(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 4096)
    ref, x = make_import(tmp_path, capsys)
    res = run_cli(capsys, "shuffle", ref, "--store", tmp_path, "--memory", "256KiB",
                  "--eval-fraction", "0.1", "--seed", "3")
    assert res.code == 0, res.err
    art = store.open_complete(tmp_path, res.out.strip())
    g = art.group()
    train = arrays.read(g["train/h"])
    evl = arrays.read(g["eval/h"])
    rows = g["rows/train"][:]
    assert np.array_equal(train, x[rows])  # every output row is the input row it claims
    assert len(np.unique(rows)) == len(rows)
    seq_train, seq_eval = set(rows // 20), set(g["rows/eval"][:] // 20)
    assert seq_train.isdisjoint(seq_eval)
    assert seq_train | seq_eval == set(range(300))
    assert len(seq_eval) == 30 and evl.shape == (30 * 20, 24)
    assert np.array_equal(evl, x[g["rows/eval"][:]])
    assert np.all(np.diff(g["rows/eval"][:]) > 0)  # eval keeps harvest order
    assert not np.all(np.diff(rows) > 0)  # train does not
    s = art.manifest()["summary"]
    assert s["n_train"] == 270 * 20 and s["n_eval"] == 600
    np.testing.assert_allclose(g["stats/h/mean"][:], x[rows].mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s["hooks"]["h"]["mean_norm"],
                               np.linalg.norm(x[rows].astype(np.float64), axis=1).mean(), rtol=1e-9)
    # Deterministic by seed; the memory budget is not part of the result.
    again = run_cli(capsys, "shuffle", ref, "--store", tmp_path / "other", "--memory", "1MiB",
                    "--eval-fraction", "0.1", "--seed", "3")
    assert again.code == 1  # the input is not in that store
    monkeypatch.setenv("SAECTL_STORE", str(tmp_path))
    same = run_cli(capsys, "shuffle", ref, "--memory", "1MiB", "--eval-fraction", "0.1",
                   "--seed", "3")
    assert same.out == res.out and "cache hit" in same.err
    other = run_cli(capsys, "shuffle", ref, "--memory", "256KiB", "--eval-fraction", "0.1",
                    "--seed", "4")
    assert other.out != res.out


def test_bos_positions_are_left_out(tiny_model_dirs, tiny_corpus, tmp_path, capsys):
    res = run_cli(capsys, "harvest", "--model", tiny_model_dirs["gpt2"], "--dataset", tiny_corpus,
                  "--hooks", "resid_post.0", "--tokens", 40 * 16, "--context-size", 16,
                  "--store", tmp_path, "--device", "cpu")
    h = res.out.strip()
    for keep, per_seq in ((False, 15), (True, 16)):
        out = run_cli(capsys, "shuffle", h, "--store", tmp_path, *(["--keep-bos"] if keep else []))
        g = store.open_complete(tmp_path, out.out.strip()).group()
        rows = np.concatenate([g["rows/train"][:], g["rows/eval"][:]])
        assert len(rows) == 40 * per_seq
        assert (rows % 16 == 0).any() == keep


@pytest.mark.parametrize("fault", ["shuffle.flushed:3", "shuffle.bucket_placed:2",
                                   "store.before_complete"])
def test_resume_after_sigkill_equals_uninterrupted(fault, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 4096)
    ref, _ = make_import(tmp_path, capsys, n=20000, d=16, store_dir=tmp_path / "a")
    make_import(tmp_path, capsys, n=20000, d=16, store_dir=tmp_path / "b")
    env = {"SAECTL_CHUNK_BYTES": "4096"}
    args = ["shuffle", ref, "--memory", "256KiB", "--seed", "1"]
    killed = run_subprocess(*args, "--store", tmp_path / "a", env={**env, "SAECTL_FAULTS": fault})
    assert killed.code == -9, killed.err
    resumed = run_subprocess(*args, "--store", tmp_path / "a", env=env)
    whole = run_subprocess(*args, "--store", tmp_path / "b", env=env)
    assert resumed.code == whole.code == 0, resumed.err + whole.err
    assert resumed.out == whole.out
    ga = store.open_complete(tmp_path / "a", resumed.out.strip()).group()
    gb = store.open_complete(tmp_path / "b", whole.out.strip()).group()
    for name in ("train/h", "eval/h", "rows/train", "stats/h/mean"):
        assert np.array_equal(ga[name][:], gb[name][:]), name
    assert not list((tmp_path / "a" / "shuffle").glob("*/scratch"))
    tried("shuffle", "kill")


def _peak_growth(*args) -> int:
    """Peak RSS growth of a real `saectl ARGS` run beyond what the interpreter held at start
    (the benchmarks' measure: the command's --help run first, so typer's one-off import of
    pydantic, 10 MiB, is not counted; then VmHWM reset to VmRSS just before the command)."""
    from benchmarks.common import peak_growth

    return peak_growth(*args, env={"SAECTL_CHUNK_BYTES": str(64 << 10)})


def test_peak_memory_stays_within_budget(tmp_path, capsys, monkeypatch):
    """Harvests of 23 MiB and 92 MiB shuffled with a 32 MiB budget: the peak RSS growth of the
    real command stays under the budget, and does not grow with the data. (22-25 MiB on the
    Xeon host; before the CLI's import of pydantic was left out, 28-31.6 there and 32.5-34 MiB
    on CI, over the budget.)"""
    budget = 32 << 20
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 64 << 10)
    growth = {}
    for n in (100_000, 400_000):
        ref, _ = make_import(tmp_path, capsys, n=n, d=60, context_size=50,
                             store_dir=tmp_path / str(n))
        growth[n] = _peak_growth("shuffle", ref, "--store", tmp_path / str(n), "--memory", budget)
    print({n: f"{g / 2**20:.1f} MiB" for n, g in growth.items()}, f"budget {budget >> 20} MiB")
    assert max(growth.values()) <= budget, growth
    # Flat in the data's size: 300k more rows may add allocator noise (seen up to 4.5 MiB on a
    # loaded machine) but not a per-row cost of 24 bytes or more (7 MiB here).
    assert growth[400_000] - growth[100_000] <= 6 << 20, growth


def test_bad_input(tmp_path, capsys):
    ref, _ = make_import(tmp_path, capsys, n=100, d=4, context_size=1)
    assert_one_line_error(run_cli(capsys, "shuffle", "nope", "--store", tmp_path), "no artifact")
    assert_one_line_error(run_cli(capsys, "shuffle", ref, "--store", tmp_path,
                                  "--eval-fraction", "1.5"), "eval-fraction")
    assert_one_line_error(run_cli(capsys, "shuffle", ref, "--store", tmp_path, "--memory", "1KiB"),
                          "memory")
    big, _ = make_import(tmp_path, capsys, n=20000, d=64, store_dir=tmp_path)
    assert_one_line_error(run_cli(capsys, "shuffle", big, "--store", tmp_path, "--memory", "3MiB"),
                          "too small", "at least --memory")
    assert_one_line_error(run_cli(capsys, "shuffle", ref, "--store", tmp_path, "--memory", "lots"),
                          "size")
    shuf = run_cli(capsys, "shuffle", ref, "--store", tmp_path).out.strip()
    assert_one_line_error(run_cli(capsys, "shuffle", shuf, "--store", tmp_path), "shuffle takes")
    # An incomplete input is refused.
    art = store.resolve(Path(tmp_path), ref)
    (art.path / store.COMPLETE).unlink()
    assert_one_line_error(run_cli(capsys, "shuffle", ref, "--store", tmp_path), "incomplete")


# ---------------------------------------------------------------------------------------------
# Massive-activation tokens (issue 16)

PLANTED = [(0, 3), (7, 0), (7, 19), (41, 10), (150, 5), (299, 12)]  # (sequence, position)


def make_outlier_import(tmp_path, capsys, store_dir=None, n=6000, d=24, C=20):
    """An import of normal rows with six planted at 500× the typical norm."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, d)).astype(np.float32)
    planted = np.array([s * C + p for s, p in PLANTED])
    x[planted] *= 500
    np.save(tmp_path / "x.npy", x)
    res = run_cli(capsys, "import", tmp_path / "x.npy", "--hook", "h", "--context-size", C,
                  "--store", store_dir or tmp_path)
    assert res.code == 0, res.err
    return res.out.strip(), x, planted


def _variance_share(x, rows, dropped):
    """By hand: share of the variance of x[rows] about its mean carried by x[dropped]."""
    x = x.astype(np.float64)
    mu = x[rows].mean(0)
    dev = ((x - mu) ** 2).sum(1)
    return dev[dropped].sum() / dev[rows].sum()


def test_outliers_are_left_out_by_default_and_kept_with_the_flag(tmp_path, capsys):
    ref, x, planted = make_outlier_import(tmp_path, capsys)
    res = run_cli(capsys, "shuffle", ref, "--store", tmp_path, "--eval-fraction", "0.1")
    assert res.code == 0, res.err
    art = store.open_complete(tmp_path, res.out.strip())
    g = art.group()
    train, evl = g["rows/train"][:], g["rows/eval"][:]
    assert np.array_equal(np.sort(np.concatenate([train, evl])),
                          np.setdiff1d(np.arange(len(x)), planted))
    assert np.array_equal(arrays.read(g["train/h"]), x[train])
    assert np.array_equal(arrays.read(g["eval/h"]), x[evl])
    assert np.all(np.diff(evl) > 0)
    assert np.array_equal(g["outliers/h"][:], np.array(PLANTED))
    s = art.manifest()["summary"]
    assert s["n_outliers"] == 6 and s["max_activation_norm_multiple"] == 5.0
    assert s["n_train"] == len(train) and s["n_eval"] == len(evl)
    np.testing.assert_allclose(g["stats/h/mean"][:], x[train].mean(0), rtol=1e-5, atol=1e-5)
    o = s["hooks"]["h"]["outliers"]
    norms = np.linalg.norm(x, axis=1).astype(np.float32)
    assert o["median_norm"] == np.sort(norms)[(len(x) - 1) // 2]  # exact (lower) median
    assert o["threshold"] == pytest.approx(5 * o["median_norm"])
    assert o["max_norm"] == pytest.approx(norms.max())
    assert o["n_exceeding"] == 6 and o["positions"] == [list(p) for p in PLANTED]
    assert o["token_ids"] is None  # an import has no token ids
    eval_seq = np.isin(planted // 20, g["eval/sequences"][:])
    assert o["n_dropped_eval"] == eval_seq.sum() and o["n_dropped_train"] == 6 - eval_seq.sum()
    assert 0 < eval_seq.sum() < 6  # both splits lose some
    for split, rows, drop in (("train", train, planted[~eval_seq]),
                              ("eval", evl, planted[eval_seq])):
        whole = np.concatenate([rows, drop])
        assert o[f"variance_share_{split}"] == pytest.approx(_variance_share(x, whole, drop),
                                                             rel=1e-6)
        assert o[f"variance_share_{split}"] > 0.9  # 6 rows at 500×: nearly all of it
    # --max-activation-norm-multiple 0 keeps them: the shuffle as it was, at its old address.
    keep = run_cli(capsys, "shuffle", ref, "--store", tmp_path, "--eval-fraction", "0.1",
                   "--max-activation-norm-multiple", "0")
    kart = store.open_complete(tmp_path, keep.out.strip())
    assert "max_activation_norm_multiple" not in kart.manifest()["params"]
    assert kart.ref != art.ref and "outliers" not in kart.group()
    kg = kart.group()
    assert np.array_equal(np.sort(np.concatenate([kg["rows/train"][:], kg["rows/eval"][:]])),
                          np.arange(len(x)))
    assert np.array_equal(kg["rows/eval"][:],
                          (kg["eval/sequences"][:][:, None] * 20 + np.arange(20)).ravel())
    # A higher multiple than the planted ratio keeps them too, at another address.
    high = run_cli(capsys, "shuffle", ref, "--store", tmp_path, "--eval-fraction", "0.1",
                   "--max-activation-norm-multiple", "1000")
    hs = store.open_complete(tmp_path, high.out.strip()).manifest()["summary"]
    assert hs["n_outliers"] == 0 and high.out not in (res.out, keep.out)


def test_keep_reproduces_the_old_shuffle(tmp_path, capsys):
    """With every token kept, the address is the one the shuffle had before outliers were
    measured (its params without the new field), and the split is the plain one."""
    from saectl.artifact import artifact_for

    ref, _, _ = make_outlier_import(tmp_path, capsys)
    keep = run_cli(capsys, "shuffle", ref, "--store", tmp_path, "--max-activation-norm-multiple",
                   "0").out.strip()
    src = store.open_complete(tmp_path, ref)
    old = {"eval_fraction": 0.05, "seed": 0, "keep_bos": False}
    assert keep == artifact_for(Path(tmp_path), "shuffle", old, {"harvest": src}).ref


def test_outliers_of_a_harvest_name_their_tokens(tiny_model_dirs, tiny_corpus, tmp_path, capsys):
    """Planted in a real harvest: the token ids come from its `tokens`; BOS stays --keep-bos's;
    the CE-loss splice reads back which positions of its sequences were left out."""
    from saectl import outliers

    res = run_cli(capsys, "harvest", "--model", tiny_model_dirs["gpt2"], "--dataset", tiny_corpus,
                  "--hooks", "resid_post.0", "--tokens", 40 * 16, "--context-size", 16,
                  "--store", tmp_path, "--device", "cpu")
    h = store.open_complete(tmp_path, res.out.strip())
    acts = h.group("r+")["acts/resid_post.0"]
    planted = [(2, 1), (9, 15), (30, 7)]
    for seq, pos in planted:
        acts[seq * 16 + pos] = arrays.read(acts, slice(seq * 16 + pos, seq * 16 + pos + 1))[0] * 100
    tokens = h.group()["tokens"][:]
    for keep_bos, per_seq in ((False, 15), (True, 16)):
        out = run_cli(capsys, "shuffle", h.ref, "--store", tmp_path, "--eval-fraction", "0.25",
                      *(["--keep-bos"] if keep_bos else []))
        art = store.open_complete(tmp_path, out.out.strip())
        g = art.group()
        rows = np.concatenate([g["rows/train"][:], g["rows/eval"][:]])
        assert len(rows) == 40 * per_seq - 3
        assert not np.isin(rows, [s * 16 + p for s, p in planted]).any()
        assert (rows % 16 == 0).any() == keep_bos  # BOS is never measured as an outlier
        o = art.manifest()["summary"]["hooks"]["resid_post.0"]["outliers"]
        assert o["positions"] == [list(p) for p in planted]
        assert o["token_ids"] == [int(tokens[s, p]) for s, p in planted]
        seqs = g["eval/sequences"][:]
        mask = outliers.left_out(art, "resid_post.0", seqs, 16)
        want = np.zeros((len(seqs), 16), bool)
        for s, p in planted:
            if s in seqs:
                want[list(seqs).index(s), p] = True
        assert np.array_equal(mask, want)


@pytest.mark.parametrize("fault", ["shuffle.norms:2", "shuffle.flushed:3",
                                   "shuffle.bucket_placed:2", "store.before_complete"])
def test_resume_with_outliers_equals_uninterrupted(fault, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 4096)
    ref, _, _ = make_outlier_import(tmp_path, capsys, store_dir=tmp_path / "a", n=20000, d=16)
    make_outlier_import(tmp_path, capsys, store_dir=tmp_path / "b", n=20000, d=16)
    env = {"SAECTL_CHUNK_BYTES": "4096"}
    args = ["shuffle", ref, "--memory", "256KiB", "--seed", "1", "--eval-fraction", "0.2"]
    killed = run_subprocess(*args, "--store", tmp_path / "a", env={**env, "SAECTL_FAULTS": fault})
    assert killed.code == -9, killed.err
    resumed = run_subprocess(*args, "--store", tmp_path / "a", env=env)
    whole = run_subprocess(*args, "--store", tmp_path / "b", env=env)
    assert resumed.code == whole.code == 0, resumed.err + whole.err
    assert resumed.out == whole.out
    a = store.open_complete(tmp_path / "a", resumed.out.strip())
    b = store.open_complete(tmp_path / "b", whole.out.strip())
    for name in ("train/h", "eval/h", "rows/train", "rows/eval", "stats/h/mean", "outliers/h"):
        assert np.array_equal(a.group()[name][:], b.group()[name][:]), name
    assert a.manifest()["summary"] == b.manifest()["summary"]
    assert a.manifest()["summary"]["n_outliers"] == 6
    tried("shuffle", "kill")


def test_the_spill_keeps_rows_in_segments_and_is_trusted_only_whole(tmp_path):
    """saectl/spill.py: appends across segment boundaries, a resume's cut, reads back in any
    step, covers only where every segment is whole, frees what the scatter has passed."""
    from saectl import spill

    x = np.arange(1000 * 3, dtype=np.float16).reshape(1000, 3)
    sp = spill.Spill(tmp_path / "sp", 1000, 3, np.float16, chunk=2)  # 128 rows a segment
    sp.truncate(0)
    for lo in range(0, 700, 90):
        sp.append(lo, x[lo:lo + 90])
    sp.truncate(333)  # a kill: the norms read saved 333 rows
    assert not sp.covers(0)
    for lo in range(333, 1000, 250):
        sp.append(lo, x[lo:lo + 250])
    assert sp.covers(0) and sp.covers(999)
    got = list(sp.read_ahead(40, 77))
    assert [lo for lo, _, _ in got] == list(range(40, 1000, 77))
    assert np.array_equal(np.concatenate([r for _, _, r in got]), x[40:])
    sp.release(300)  # segments 0 and 1 (rows 0-255) are passed
    assert sorted(int(f.stem) for f in (tmp_path / "sp").iterdir()) == [256, 384, 512, 640, 768,
                                                                      896]
    assert sp.covers(256) and not sp.covers(255)
    (tmp_path / "sp" / "640.bin").write_bytes(b"")
    assert not sp.covers(300)

    # The statistics beside it: cut back with the norms, whole only when every row is there.
    by_hand = lambda raw, lo: ((raw.astype(np.float64) ** 2).sum(1), raw.sum(0, np.float64))
    an = spill.Analysis(tmp_path / "an", 1000, 3, 2, by_hand)
    an.truncate(0)
    assert np.array_equal(an.add(0, x[:400]),
                          np.sqrt((x[:400].astype(np.float64) ** 2).sum(1)).astype(np.float32))
    an.truncate(200)
    assert not an.whole()
    an.add(200, x[200:])
    assert an.whole()
    sq, sums = an.read(100, 300)
    assert np.array_equal(sq, (x[100:300].astype(np.float64) ** 2).sum(1))
    assert np.array_equal(sums, x[100:300].astype(np.float64).reshape(100, 2, 3).sum(1))


def test_a_resume_without_its_spill_decodes_again_and_ends_the_same(tmp_path, capsys,
                                                                   monkeypatch):
    """Killed after the outliers' read spilled part of the rows; the spill is then lost (as on
    a scratch disk that was cleaned): the scatter reads the harvest instead, same artifact."""
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 4096)
    ref, _, _ = make_outlier_import(tmp_path, capsys, store_dir=tmp_path / "a", n=20000, d=16)
    make_outlier_import(tmp_path, capsys, store_dir=tmp_path / "b", n=20000, d=16)
    env = {"SAECTL_CHUNK_BYTES": "4096"}
    args = ["shuffle", ref, "--memory", "256KiB", "--seed", "1", "--eval-fraction", "0.2"]
    killed = run_subprocess(*args, "--store", tmp_path / "a",
                            env={**env, "SAECTL_FAULTS": "shuffle.flushed:2"})
    assert killed.code == -9, killed.err
    (spilled,) = (tmp_path / "a").rglob("spill")
    assert any(spilled.iterdir())  # the spill was made, and the scatter is reading it
    shutil.rmtree(spilled)
    resumed = run_subprocess(*args, "--store", tmp_path / "a", env=env)
    whole = run_subprocess(*args, "--store", tmp_path / "b", env=env)
    assert resumed.code == whole.code == 0, resumed.err + whole.err
    a = store.open_complete(tmp_path / "a", resumed.out.strip())
    b = store.open_complete(tmp_path / "b", whole.out.strip())
    for name in ("train/h", "eval/h", "rows/train", "stats/h/mean"):
        assert np.array_equal(a.group()[name][:], b.group()[name][:]), name
    assert a.manifest()["summary"] == b.manifest()["summary"]
    assert not list((tmp_path / "a").rglob("spill"))  # scratch is gone with the run


def test_without_room_for_the_spill_it_says_so_and_decodes_twice(tmp_path, capsys,
                                                                  monkeypatch):
    """A scratch disk too full for the spill (its free space reported as 1 MiB): one line says
    so, the harvest is decoded again, and the artifact is the one made with the spill."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 4096)
    runs = {}
    for room in ("spill", "full"):
        ref, _, _ = make_outlier_import(tmp_path, capsys, store_dir=tmp_path / room, n=20000,
                                        d=16)
        if room == "full":
            monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**40, 2**40, 2**20))
        res = run_cli(capsys, "shuffle", ref, "--store", tmp_path / room, "--memory", "256KiB",
                      "--seed", "1", "--eval-fraction", "0.2")
        assert res.code == 0, res.err
        said = [ln for ln in res.err.splitlines() if "decoding it twice" in ln]
        assert len(said) == (room == "full"), res.err
        runs[room] = _artifact(tmp_path / room, res.out.strip())
    _same(runs["spill"], runs["full"])


def test_the_splice_passes_left_out_positions_through(tiny_model_dirs, tiny_corpus, tmp_path,
                                                      capsys):
    """Train on a shuffle that left planted outliers out: its CE-loss splice keeps them clean
    (counted in the summary), in the SAE and the zero-ablation run alike."""
    import torch

    from saectl import hooks, metrics, models
    from stages.shuffle import ShuffleConfig, make_split

    res = run_cli(capsys, "harvest", "--model", tiny_model_dirs["gpt2"], "--dataset", tiny_corpus,
                  "--hooks", "resid_post.0", "--tokens", 40 * 16, "--context-size", 16,
                  "--store", tmp_path, "--device", "cpu")
    h = store.open_complete(tmp_path, res.out.strip())
    cfg = ShuffleConfig(harvest=h.ref, eval_fraction=0.25)
    evals = np.flatnonzero(make_split(40, 16, cfg).is_eval)
    trains = np.setdiff1d(np.arange(40), evals)
    planted = [(int(evals[0]), 4), (int(evals[1]), 9), (int(trains[0]), 2)]
    acts = h.group("r+")["acts/resid_post.0"]
    for seq, pos in planted:
        acts[seq * 16 + pos] = arrays.read(acts, slice(seq * 16 + pos, seq * 16 + pos + 1))[0] * 100
    sh = run_cli(capsys, "shuffle", h.ref, "--store", tmp_path, "--eval-fraction", "0.25")
    tr = run_cli(capsys, "train", sh.out.strip(), "--store", tmp_path, "--device", "cpu",
                 "--k", "4", "--expansion", "2", "--tokens", "512", "--batch-size", "64")
    assert tr.code == 0, tr.err
    s = store.open_complete(tmp_path, tr.out.strip()).manifest()["summary"]
    assert s["outliers_passed_through"] == 2 and "ce_loss_score" in s
    # What passing through means: a marked position keeps its clean activation in both runs.
    model = models.load_model(models.resolve_model(str(tiny_model_dirs["gpt2"])))
    hook = hooks.parse_hooks(model, ["resid_post.0"])[0]
    ids = [torch.from_numpy(np.asarray(h.group()["tokens"][:4])).long()]
    every = [torch.ones(4, 16, dtype=torch.bool)]
    kept = metrics.downstream(model, hook, torch.zeros_like, ids, passthrough=every)
    assert kept["ce_sae"] == kept["ce_zero"] == kept["ce_clean"] and kept["kl_sae"] == 0
    some = [torch.zeros(4, 16, dtype=torch.bool)]
    some[0][:, 5] = True
    part = metrics.downstream(model, hook, torch.zeros_like, ids, passthrough=some)
    plain = metrics.downstream(model, hook, torch.zeros_like, ids)
    assert part["ce_zero"] == part["ce_sae"] != plain["ce_zero"]


def test_bad_outlier_multiples(tmp_path, capsys):
    ref, x, _ = make_outlier_import(tmp_path, capsys)
    for bad in ("0.5", "1", "-2"):
        assert_one_line_error(run_cli(capsys, "shuffle", ref, "--store", tmp_path,
                                      "--max-activation-norm-multiple", bad), "above 1")
    x[::10] *= 100  # a tenth of the rows is not a few outliers
    np.save(tmp_path / "y.npy", x)
    many = run_cli(capsys, "import", tmp_path / "y.npy", "--hook", "h", "--context-size", 20,
                   "--store", tmp_path).out.strip()
    assert_one_line_error(run_cli(capsys, "shuffle", many, "--store", tmp_path),
                          "cuts the data", "give 0 to keep")
    tried("shuffle", "bad input", 4)


def _three_hooks(tiny_model_dirs, tiny_corpus, tmp_path, capsys, n_seq: int):
    """A harvest of an MLP's input and output and resid_mid on the tiny Llama, 16-token
    sequences, with one token of mlp_out made massive (sequence 5, position 3)."""
    res = run_cli(capsys, "harvest", "--model", tiny_model_dirs["llama"], "--dataset", tiny_corpus,
                  "--hooks", "mlp_in.1,mlp_out.1,resid_mid.1", "--tokens", n_seq * 16,
                  "--context-size", 16, "--store", tmp_path, "--device", "cpu")
    assert res.code == 0, res.err
    h = store.open_complete(tmp_path, res.out.strip())
    acts = h.group("r+")["acts/mlp_out.1"]
    acts[5 * 16 + 3] = arrays.read(acts, slice(5 * 16 + 3, 5 * 16 + 4))[0] * 1000
    return h


def test_every_hook_is_shuffled_alike(tiny_model_dirs, tiny_corpus, tmp_path, capsys):
    """A transcoder pairs an MLP's input with its output: one harvest holds both, and the
    shuffle gives every hook the same permutation and split (row i of each is the same token),
    outliers included (a token massive at one hook leaves every hook's split)."""
    h = _three_hooks(tiny_model_dirs, tiny_corpus, tmp_path, capsys, 30)
    out = run_cli(capsys, "shuffle", h.ref, "--store", tmp_path, "--eval-fraction", "0.2")
    assert out.code == 0, out.err
    g = store.open_complete(tmp_path, out.out.strip()).group()
    for split in ("train", "eval"):
        rows = g[f"rows/{split}"][:]
        assert 5 * 16 + 3 not in rows
        for hook in ("mlp_in.1", "mlp_out.1", "resid_mid.1"):
            src = arrays.read(h.group()[f"acts/{hook}"])
            np.testing.assert_array_equal(arrays.read(g[f"{split}/{hook}"]), src[rows])


# ---------------------------------------------------------------------------------------------
# The in-memory path (issue 22): the same artifact as the scratch buckets, within --memory


def _artifact(root, ref):
    art = store.open_complete(root, ref)
    g = art.group()
    names = sorted(k for k in _names(g) if not k.startswith("acts"))
    return {k: g[k][:] for k in names}, art.manifest()["summary"]


def _names(group, prefix=""):
    with warnings.catch_warnings():  # Zarr warns of the artifact's own files beside its arrays
        warnings.simplefilter("ignore")
        subs = list(group.groups())
    yield from (prefix + k for k in group.array_keys())
    for k, sub in subs:
        yield from _names(sub, prefix + k + "/")


def _same(a, b):
    arrs_a, sum_a = a
    arrs_b, sum_b = b
    assert arrs_a.keys() == arrs_b.keys()
    for k in arrs_a:
        assert np.array_equal(arrs_a[k], arrs_b[k], equal_nan=True), k
    for s in (sum_a, sum_b):
        for h in s["hooks"].values():
            h.pop("n_buckets", None)
    assert sum_a == sum_b


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_in_memory_and_out_of_core_give_the_same_artifact(dtype, tmp_path, capsys, monkeypatch):
    """Outliers left out (their chunks' sums redone), eval rows, the statistics: bit for bit."""
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 4096)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6000, 24)).astype(np.float32)
    x[[3, 140, 159, 830, 3005, 5992]] *= 500
    np.save(tmp_path / "x.npy", x)
    refs, runs = set(), {}
    for memory in ("2GiB", "256KiB"):
        root = tmp_path / memory
        ref = run_cli(capsys, "import", tmp_path / "x.npy", "--hook", "h", "--context-size", 20,
                      "--dtype", dtype, "--store", root).out.strip()
        res = run_cli(capsys, "shuffle", ref, "--store", root, "--memory", memory,
                      "--eval-fraction", "0.2", "--seed", "5")
        assert res.code == 0, res.err
        refs.add(res.out.strip())
        runs[memory] = _artifact(root, res.out.strip())
    assert len(refs) == 1  # --memory is not part of the address
    assert runs["2GiB"][1]["hooks"]["h"]["n_buckets"] == 0  # in memory
    assert runs["256KiB"][1]["hooks"]["h"]["n_buckets"] > 1  # through the buckets
    assert runs["2GiB"][1]["n_outliers"] == 6
    _same(runs["2GiB"], runs["256KiB"])


def test_every_hook_alike_in_memory_one_at_a_time_and_out_of_core(tiny_model_dirs, tiny_corpus,
                                                                  tmp_path, capsys, monkeypatch):
    """Three hooks: all held at once (one read each), one at a time (the outliers measured from
    the store first), or through the buckets: the same artifact."""
    from saectl import shuffle_memory
    from stages import shuffle

    monkeypatch.setattr(arrays, "CHUNK_BYTES", 2048)
    h = _three_hooks(tiny_model_dirs, tiny_corpus, tmp_path, capsys, 60)
    srcs = [h.group()[f"acts/{k}"] for k in ("mlp_in.1", "mlp_out.1", "resid_mid.1")]

    def needs(budget):
        each = [shuffle_memory.need(a, shuffle._read_step(budget, a)) for a in srcs]
        return sum(each), max(each)

    one = next(b for b in (1 << k for k in range(16, 30)) if needs(b)[1] <= b // 2)
    assert needs(one)[0] > one // 2, "the budget must hold one hook, not all three"
    small = next(b for b in (1 << k for k in range(14, 30))
                 if b >= 64 * max(a.chunks[0] * a.shape[1] * a.dtype.itemsize for a in srcs))
    assert needs(small)[1] > small // 2
    runs, refs = {}, set()
    for memory in ("2GiB", str(one), str(small)):
        out = run_cli(capsys, "shuffle", h.ref, "--store", tmp_path, "--eval-fraction", "0.2",
                      "--memory", memory)
        assert out.code == 0, out.err
        refs.add(out.out.strip())
        runs[memory] = _artifact(tmp_path, out.out.strip())
        assert (runs[memory][1]["hooks"]["mlp_in.1"]["n_buckets"] == 0) == (memory != str(small))
        shutil.rmtree(store.open_complete(tmp_path, out.out.strip()).path)  # not a cache hit
    assert len(refs) == 1
    _same(runs["2GiB"], runs[str(one)])
    _same(runs["2GiB"], runs[str(small)])


def test_in_memory_path_stays_within_budget(tmp_path, capsys, monkeypatch):
    """A 23 MiB harvest with a 96 MiB budget is shuffled in memory, and the real command's peak
    RSS growth stays under the budget."""
    budget = 96 << 20
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 64 << 10)
    ref, _ = make_import(tmp_path, capsys, n=100_000, d=60, context_size=50)
    growth = _peak_growth("shuffle", ref, "--store", tmp_path, "--memory", budget)
    monkeypatch.setenv("SAECTL_STORE", str(tmp_path))
    res = run_cli(capsys, "shuffle", ref, "--memory", budget)
    art = store.open_complete(tmp_path, res.out.strip())
    assert art.manifest()["summary"]["hooks"]["h"]["n_buckets"] == 0  # it was the in-memory path
    print(f"{growth / 2**20:.1f} MiB of {budget >> 20} MiB")
    assert growth <= budget, growth


def _same_widening(x):
    got, want = arrays.from_storage(x, "float16"), x.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)  # a NaN stays NaN (torch may quiet its payload)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_float16_widened_through_torch_equals_numpy():
    """Every float16 bit pattern (infinities, subnormals, -0, NaNs) widens to what NumPy gives,
    in arrays large enough for torch's path, read-only or strided too."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    x = np.tile(every, 3).reshape(-1, 48)
    _same_widening(x)
    x.flags.writeable = False
    _same_widening(x)
    _same_widening(np.tile(every, 4).reshape(-1, 64)[:, ::2])
