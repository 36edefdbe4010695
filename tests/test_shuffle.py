"""Shuffle: a true permutation, a sequence-level split, BOS left out, bounded memory, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saectl import arrays, store
from stages.shuffle import Permutation
from tests.helpers import REPO, assert_one_line_error, run_cli, run_subprocess, tried


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


MEASURE = """
import sys
from saectl.cli import main

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: count only the work
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(status("VmHWM") - before)
"""


def _peak_growth(*args) -> int:
    """Peak RSS growth of a real `saectl ARGS` run beyond what the interpreter held at start."""
    p = subprocess.run([sys.executable, "-c", MEASURE, *map(str, args)], capture_output=True,
                       text=True, cwd=REPO, env={"SAECTL_CHUNK_BYTES": str(64 << 10),
                                                 "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip().splitlines()[-1])


def test_peak_memory_stays_within_budget(tmp_path, capsys, monkeypatch):
    """Harvests of 23 MiB and 92 MiB shuffled with a 32 MiB budget: the peak RSS growth of the
    real command stays under the budget, and does not grow with the data."""
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
