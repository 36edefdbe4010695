"""Reliability: kill it, corrupt it, run it twice, fill its disk, feed it garbage, lose nothing.

Kills are real SIGKILLs at named fault points (saectl.faults) in subprocesses; corruption is
done to real chunk files; two commands race through real processes and locks; a full disk is
a real file-size limit (`ulimit -f`). Each case is counted (tests.helpers.tried) and the run
ends with a table of what was tried per stage. Older per-stage kill tests live beside their
stages (test_harvest, test_shuffle, test_train, test_sweep) and are counted there too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from saectl import arrays, store
from tests.helpers import assert_one_line_error, run_cli, run_subprocess, saectl_cmd, tried
from tests.test_explain import keyword_model, serve

C = 16


@pytest.fixture(scope="module")
def world(tiny_model_dirs, tmp_path_factory):
    """A store with a harvest (many small chunks), its shuffle and a trained SAE."""
    from tests.conftest import corpus_texts

    root = tmp_path_factory.mktemp("reliability")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    old_env, old_bytes = os.environ.get("SAECTL_CHUNK_BYTES"), arrays.CHUNK_BYTES
    os.environ["SAECTL_CHUNK_BYTES"], arrays.CHUNK_BYTES = "4096", 4096
    try:
        st = root / "store"
        h = run_subprocess(*_harvest(tiny_model_dirs["gpt_neox"], corpus, st))
        s = run_subprocess("shuffle", h.out.strip(), "--store", st)
        t = run_subprocess("train", s.out.strip(), "--arch", "topk", "--width", "64", "--k", "4",
                           "--tokens", "4096", "--batch-size", "256", "--no-lm-eval",
                           "--device", "cpu", "--store", st)
        assert t.code == 0, (h.err, s.err, t.err)
        yield {"root": root, "store": st, "corpus": corpus, "model": tiny_model_dirs["gpt_neox"],
               "harvest": h.out.strip(), "shuffle": s.out.strip(), "sae": t.out.strip()}
    finally:
        arrays.CHUNK_BYTES = old_bytes
        if old_env is None:
            os.environ.pop("SAECTL_CHUNK_BYTES", None)
        else:
            os.environ["SAECTL_CHUNK_BYTES"] = old_env


def _harvest(model, corpus, st, *extra):
    return ["harvest", "--model", model, "--dataset", corpus, "--hooks", "resid_post.1",
            "--tokens", 64 * C, "--context-size", C, "--device", "cpu", "--store", st, *extra]


def _copy_store(world, dest: Path) -> Path:
    shutil.copytree(world["store"], dest, ignore=shutil.ignore_patterns(".lock*"))
    return dest


def _arrays_of(art: store.Artifact) -> dict:
    import warnings

    warnings.filterwarnings("ignore", "Object at", UserWarning)  # report/, progress/, COMPLETE
    out = {}
    g = art.group()
    for name, arr in g.arrays():
        out[name] = arr[:]
    for sub in ("stats", "top", "pool", "lens", "windows"):
        if sub in g:
            for name, arr in g[sub].arrays():
                out[f"{sub}/{name}"] = arr[:]
    return out


# ------------------------------------------------------------------------------ corruption


def _chunk(art: store.Artifact, array: str, key: str) -> Path:
    return art.path / array / "c" / Path(*key.split("/"))


def _flip(p: Path):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


CORRUPTIONS = [
    # (name, what to do to the harvest artifact, words the error must hold)
    ("flipped byte", lambda a: _flip(_chunk(a, "acts/resid_post.1", "1/0")), ["c/1/0"]),
    ("truncated chunk", lambda a: _truncate(_chunk(a, "acts/resid_post.1", "2/0")), ["c/2/0"]),
    ("deleted chunk", lambda a: _chunk(a, "acts/resid_post.1", "3/0").unlink(),
     ["missing chunk 3.0", "acts/resid_post.1"]),
    ("deleted token chunk", lambda a: _chunk(a, "tokens", "0/0").unlink(), ["'tokens'"]),
    ("broken zarr.json", lambda a: (a.path / "zarr.json").write_text("{oops"),
     ["zarr.json does not parse"]),
    ("broken array metadata", lambda a: (a.path / "acts/resid_post.1/zarr.json").write_text("]"),
     ["metadata of 'acts/resid_post.1'"]),
]


@pytest.mark.parametrize("name, corrupt, words", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corruption_is_named_and_never_read(world, tmp_path, capsys, name, corrupt, words):
    st = _copy_store(world, tmp_path / "store")
    art = store.resolve(st, world["harvest"])
    corrupt(art)
    # A new shuffle (another seed, so not a cache hit) must refuse to read it.
    res = run_cli(capsys, "shuffle", world["harvest"], "--seed", "7", "--store", st)
    assert_one_line_error(res, "damaged", world["harvest"][:20], *words)
    assert not any(a.is_complete() for a in store.list_artifacts(st, "shuffle")
                   if a.manifest()["params"].get("seed") == 7)
    tried("harvest", "corruption")


def test_damaged_artifact_is_rebuilt_as_the_error_says(world, tmp_path, capsys):
    st = _copy_store(world, tmp_path / "store")
    art = store.resolve(st, world["harvest"])
    _chunk(art, "acts/resid_post.1", "1/0").unlink()
    res = run_cli(capsys, *_harvest(world["model"], world["corpus"], st))  # a cache "hit"
    assert res.code == 0  # complete, so harvest trusts it; the reader is what checks
    bad = run_cli(capsys, "shuffle", world["harvest"], "--seed", "7", "--store", st)
    assert "saectl gc --all" in bad.err and "delete its folder" in bad.err
    shutil.rmtree(art.path)
    again = run_cli(capsys, *_harvest(world["model"], world["corpus"], st))
    assert again.out.strip() == world["harvest"]
    ok = run_cli(capsys, "shuffle", world["harvest"], "--seed", "7", "--store", st)
    assert ok.code == 0, ok.err
    tried("harvest", "corruption")


# ------------------------------------------------------------------------------ kills


@pytest.mark.parametrize("fault", ["interpret.scanned", "store.before_complete"])
def test_interpret_killed_then_resumed_equals_uninterrupted(world, tmp_path, fault):
    a, b = _copy_store(world, tmp_path / "a"), _copy_store(world, tmp_path / "b")
    args = ["interpret", world["sae"], "--no-explain", "--top", "5", "--device", "cpu"]
    killed = run_subprocess(*args, "--store", a, env={"SAECTL_FAULTS": fault})
    assert killed.code == -9, killed.err
    (partial,) = store.list_artifacts(a, "interpret")
    assert not partial.is_complete()
    resumed = run_subprocess(*args, "--store", a)
    whole = run_subprocess(*args, "--store", b)
    assert resumed.code == 0 and resumed.out == whole.out, resumed.err
    if fault == "interpret.scanned":
        assert "scanning" not in resumed.err
    ra = _arrays_of(store.open_complete(a, resumed.out.strip()))
    rb = _arrays_of(store.open_complete(b, whole.out.strip()))
    assert ra.keys() == rb.keys() and len(ra) > 10
    for k in ra:
        assert np.array_equal(ra[k], rb[k]), k
    tried("interpret", "kill")


def test_interpret_killed_while_explaining_asks_nothing_twice(world, tmp_path):
    a, b = _copy_store(world, tmp_path / "a"), _copy_store(world, tmp_path / "b")
    with serve(keyword_model) as (url, requests):
        args = ["interpret", world["sae"], "--features", "0-40", "--explainer", url,
                "--explainer-model", "kw", "--explain-max", "20", "--detection", "4",
                "--device", "cpu"]
        killed = run_subprocess(*args, "--store", a, env={"SAECTL_FAULTS": "interpret.explained"})
        assert killed.code == -9, killed.err
        first = len(requests)
        assert first > 0
        resumed = run_subprocess(*args, "--store", a)
        assert resumed.code == 0, resumed.err
        second = len(requests)
        whole = run_subprocess(*args, "--store", b)
    assert resumed.out == whole.out
    # Every prompt answered before the kill was kept: the two runs together asked exactly
    # what the uninterrupted run asked, none twice.
    key = lambda r: json.dumps(r["messages"])  # noqa: E731
    before, after = {key(r) for r in requests[:first]}, [key(r) for r in requests[first:second]]
    assert not before & set(after)
    assert first + len(after) == len(requests) - second
    ea = (store.resolve(a, resumed.out.strip()).path / "explanations.json").read_text()
    eb = (store.resolve(b, whole.out.strip()).path / "explanations.json").read_text()
    assert ea == eb
    tried("interpret", "kill")


# ------------------------------------------------------------------------------ twice at once


def test_two_identical_harvests_at_once(world, tmp_path):
    args = _harvest(world["model"], world["corpus"], tmp_path / "s")
    env = {**os.environ, "SAECTL_CHUNK_BYTES": "4096"}
    procs = [subprocess.Popen(saectl_cmd(*args), env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert outs[0][0] == outs[1][0] == world["harvest"] + "\n"
    art = store.open_complete(tmp_path / "s", world["harvest"])
    src = store.open_complete(world["store"], world["harvest"])
    for name in ("tokens", "acts/resid_post.1"):
        assert np.array_equal(art.group()[name][:], src.group()[name][:])
    tried("harvest", "twice at once")


def test_no_wait_says_it_is_being_written(world, tmp_path, capsys):
    st = _copy_store(world, tmp_path / "s")
    args = ["interpret", world["sae"], "--no-explain", "--top", "3", "--store", st]
    killed = run_subprocess(*args, env={"SAECTL_FAULTS": "interpret.scanned"})
    assert killed.code == -9
    (art,) = store.list_artifacts(st, "interpret")
    with store.flock(art.path / store.LOCK, True, "test"):  # another writer holds it
        res = run_cli(capsys, *args, "--no-wait")
        assert_one_line_error(res, "is being written", "without --no-wait")
    assert run_cli(capsys, *args).code == 0
    tried("interpret", "twice at once")


# ------------------------------------------------------------------------------ full disk


def _limited(limit_kib: int, *args) -> subprocess.CompletedProcess:
    cmd = " ".join(f"'{a}'" for a in saectl_cmd(*args))
    return subprocess.run(["bash", "-c", f"ulimit -f {limit_kib}; exec {cmd}"], text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "SAECTL_CHUNK_BYTES": "4096"})


def test_full_disk_is_one_line_and_resumes(world, tmp_path):
    """A file-size limit below one chunk: the write fails with EFBIG like a full disk does."""
    st = tmp_path / "s"
    args = _harvest(world["model"], world["corpus"], st)
    p = _limited(2, *args)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("saectl: error:")]
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "too large" in lines[0].lower() and "re-run" in lines[0] or "again" in lines[0]
    (art,) = store.list_artifacts(st, "harvest")
    assert not art.is_complete()
    again = run_subprocess(*args)
    assert again.code == 0 and again.out.strip() == world["harvest"]
    tried("harvest", "full disk")
    # The same for a stage whose writes go through zarr directly.
    p = _limited(2, "shuffle", world["harvest"], "--seed", "3", "--store", st)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("saectl: error:")]
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert run_subprocess("shuffle", world["harvest"], "--seed", "3", "--store", st).code == 0
    tried("shuffle", "full disk")


# ------------------------------------------------------------------------------ bad input


def _bad_inputs(w, tmp: Path) -> list[tuple[str, list, list[str]]]:
    """(stage, args, words the one-line error must hold)."""
    st = ["--store", w["store"]]
    (tmp / "bad.yaml").write_text("tokens: [1, 2\n")
    (tmp / "unknown.yaml").write_text("tokenz: 5\n")
    (tmp / "grid_unknown.yaml").write_text("arch: [topk]\nfoo: [1]\n")
    (tmp / "grid_bad.yaml").write_text("arch: [topk\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    (tmp / "empty.txt").write_text("")
    np.save(tmp / "nan.npy", np.array([[1.0, np.nan], [0.0, 1.0]], dtype=np.float32))
    foreign = w["store"] / "harvest" / ("ab" * 32)
    if not foreign.exists():
        import zarr

        zarr.open_group(foreign, mode="w").create_array("x", shape=(2,), dtype="f4")
    H, M, D = w["harvest"], w["model"], w["corpus"]
    base = ["harvest", "--model", M, "--dataset", D]
    hv = [*base, "--hooks", "resid_post.1", *st]
    return [
        ("harvest", [*hv, "--config", tmp / "bad.yaml"], ["not valid YAML", "line"]),
        ("harvest", [*hv, "--config", tmp / "unknown.yaml"], ["unknown field", "tokenz"]),
        ("harvest", [*hv, "--tokens", "0"], ["--tokens must be at least 1"]),
        ("harvest", [*hv, "--batch-size", "-3"], ["--batch-size"]),
        ("harvest", [*hv, "--context-size", "1"], ["--context-size"]),
        ("harvest", [*base, "--hooks", "resid_post.99", *st], ["resid_post.99"]),
        ("harvest", [*base, "--hooks", "no.such.module", *st], ["no.such.module"]),
        ("harvest", [*base[:3], "--dataset", tmp / "latin1.txt", "--hooks", "resid_post.1", *st],
         ["UTF-8"]),
        ("harvest", [*base[:3], "--dataset", tmp / "empty.txt", "--hooks", "resid_post.1", *st],
         ["holds only 0 tokens"]),
        ("harvest", [*hv, "--tokens", str(10**9)], ["corpus holds only", "or fewer"]),
        ("shuffle", ["shuffle", "harvest/ffff0000", *st], ["no artifact"]),
        ("shuffle", ["shuffle", "../outside", *st], ["store"]),
        ("shuffle", ["shuffle", "/etc/passwd", *st], ["store"]),
        ("shuffle", ["shuffle", f"harvest/{'ab' * 32}", *st], ["not a saectl artifact"]),
        ("shuffle", ["shuffle", H, "--memory", "0", *st], ["--memory"]),
        ("train", ["train", w["shuffle"], "--k", "64", "--width", "64", *st], ["--k 64 must be smaller than the width 64"]),
        ("train", ["train", w["shuffle"], "--batch-size", "0", *st], ["--batch-size"]),
        ("train", ["train", w["shuffle"], "--expansion", "-1", *st], ["--expansion"]),
        ("train", ["train", w["shuffle"], "--hook", "resid_post.0", *st], ["resid_post.0"]),
        ("train", ["train", w["shuffle"], "--config", tmp / "unknown.yaml", *st], ["tokenz"]),
        ("train", ["train", H, *st], ["shuffle"]),
        ("sweep", ["sweep", w["shuffle"], "--grid", tmp / "grid_unknown.yaml", *st], ["foo"]),
        ("sweep", ["sweep", w["shuffle"], "--grid", tmp / "grid_bad.yaml", *st], ["YAML"]),
        ("import", ["import", tmp / "nan.npy", *st], ["non-finite"]),
        ("import", ["import", tmp / "missing.npy", *st], ["does not exist"]),
        ("interpret", ["interpret", w["sae"], "--features", "64", *st], ["out of range"]),
        ("interpret", ["interpret", w["shuffle"], *st], ["train ref"]),
        ("interpret", ["interpret", w["sae"], "--top", "0", *st], ["--top"]),
    ]


def test_bad_input_catalogue(world, tmp_path, capsys):
    before = {a.ref for a in store.list_artifacts(world["store"]) if a.is_complete()}
    failed = []
    for stage, args, words in _bad_inputs(world, tmp_path):
        res = run_cli(capsys, *args)
        try:
            assert_one_line_error(res, *words)
            tried(stage, "bad input")
        except AssertionError as e:
            failed.append(f"{stage} {[str(a)[-30:] for a in args[1:]]}: {e}")
    assert not failed, "\n".join(failed)
    after = {a.ref for a in store.list_artifacts(world["store"]) if a.is_complete()}
    assert before <= after  # nothing complete was lost
    for ref in before:
        store.open_complete(world["store"], ref)  # and nothing was damaged
