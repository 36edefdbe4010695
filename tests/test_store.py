"""The artifact store: addresses, life cycle, locks, refs, gc, and refusals."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import numpy as np
import pytest
import zarr

from saectl import arrays, store
from saectl.errors import ArtifactError, NotFoundError
from tests.helpers import assert_one_line_error, run_cli, tried


def make(root, stage="harvest", params=None, inputs=None, complete=True, summary=None):
    art = store.artifact_for(root, stage, params or {"x": 1}, inputs)
    with store.writing(art, params or {"x": 1}, inputs):
        g = art.group("r+")
        a = arrays.create(g, "acts/h", (8, 4), (4, 4), "float16")
        a[:] = np.arange(32, dtype=np.float16).reshape(8, 4)
        if complete:
            store.mark_complete(art, summary or {"n": 8})
    return art


def test_life_cycle_and_manifest(tmp_path):
    art = make(tmp_path, params={"x": 1}, complete=False)
    assert art.path == tmp_path / "harvest" / art.digest
    assert not art.is_complete()
    with pytest.raises(ArtifactError, match="incomplete"):
        store.open_complete(tmp_path, art.ref)
    store.mark_complete(art, {"n_tokens": 8})
    m = store.open_complete(tmp_path, art.ref).manifest()
    assert m["stage"] == "harvest" and m["params"] == {"x": 1} and m["summary"] == {"n_tokens": 8}
    assert m["digest"] == art.digest == store.address("harvest", {"x": 1})
    # A Zarr v3 group with the manifest in its attributes, readable by plain zarr.
    g = zarr.open_group(art.path, mode="r")
    assert g.attrs["saectl"]["stage"] == "harvest"
    assert g["acts/h"].metadata.zarr_format == 3
    codecs = [type(c).__name__ for c in g["acts/h"].metadata.codecs]
    assert "Crc32cCodec" in codecs


def test_inputs_change_the_address(tmp_path):
    a = make(tmp_path, params={"x": 1})
    b = make(tmp_path, stage="shuffle", params={"s": 0}, inputs={"harvest": a})
    c = make(tmp_path, params={"x": 2})
    d = store.artifact_for(tmp_path, "shuffle", {"s": 0}, {"harvest": c})
    assert b.digest != d.digest
    assert b.manifest()["inputs"] == {"harvest": a.ref}


def test_resolve_refs(tmp_path):
    a = make(tmp_path, params={"x": 1})
    assert store.resolve(tmp_path, a.ref) == a
    assert store.resolve(tmp_path, a.digest[:8]) == a
    assert store.resolve(tmp_path, f"harvest/{a.digest[:6]}") == a
    store.write_ref(tmp_path, "demo/harvest", a)
    assert store.resolve(tmp_path, "demo/harvest") == a
    assert store.resolve(tmp_path, "refs/demo/harvest") == a
    with pytest.raises(NotFoundError):
        store.resolve(tmp_path, "harvest/ffffffff")
    for bad in ("../x", "/etc/passwd", "harvest/../../x", "~/x"):
        with pytest.raises(ArtifactError, match="outside the store"):
            store.resolve(tmp_path, bad)


def test_foreign_zarr_store_is_refused(tmp_path):
    foreign = tmp_path / "harvest" / ("ab" * 32)
    zarr.open_group(foreign, mode="w", zarr_format=3, attributes={"other": 1})
    (foreign / store.COMPLETE).write_text("{}")
    with pytest.raises(ArtifactError, match="not a saectl artifact"):
        store.open_complete(tmp_path, "harvest/abab")


def test_broken_zarr_json(tmp_path):
    a = make(tmp_path)
    (a.path / "zarr.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="damaged"):
        store.open_complete(tmp_path, a.ref)


def test_damaged_chunk_is_named_never_read(tmp_path):
    a = make(tmp_path)
    chunk = a.path / "acts" / "h" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    g = a.group()
    assert np.array_equal(arrays.read(g["acts/h"], slice(0, 4)),
                          np.arange(16, dtype=np.float32).reshape(4, 4))
    with pytest.raises(ArtifactError, match="damaged.*acts/h"):
        arrays.read(g["acts/h"], slice(4, 8), artifact=a.ref)


def test_bfloat16_round_trip(tmp_path):
    import torch

    art = store.artifact_for(tmp_path, "harvest", {"bf": 1})
    x = torch.randn(16, 8) * 100
    with store.writing(art, {"bf": 1}):
        arr = arrays.create(art.group("r+"), "a", (16, 8), (8, 8), "bfloat16")
        arr[:] = arrays.to_storage(x, "bfloat16")
    back = arrays.read(art.group()["a"])
    assert np.array_equal(back, x.to(torch.bfloat16).float().numpy())


def _hold_lock(path, ready, release):
    art = store.Artifact(*path)
    with store.writing(art, {"x": 1}):
        ready.set()
        release.wait(10)


def test_lock_is_exclusive_and_released_on_death(tmp_path):
    art = store.artifact_for(tmp_path, "harvest", {"x": 1})
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=((tmp_path, "harvest", art.digest), ready, release))
    p.start()
    assert ready.wait(10)
    assert store.is_locked(art)
    with pytest.raises(ArtifactError, match="being written by pid"):
        with store.writing(art, {"x": 1}, wait=False):
            pass
    p.kill()  # SIGKILL: the kernel drops the lock
    p.join()
    assert not store.is_locked(art)
    with store.writing(art, {"x": 1}, wait=False):
        pass


def test_progress_is_a_union_of_writers(tmp_path):
    art = make(tmp_path, complete=False)
    store.record_progress(art, "shard-0-of-2", {0, 1})
    store.record_progress(art, "shard-1-of-2", {2})
    store.record_progress(art, "shard-0-of-2", {0, 1, 3})
    assert store.read_progress(art) == {0, 1, 2, 3}


def test_gc_keeps_refs_inputs_and_writers(tmp_path):
    h = make(tmp_path, params={"x": 1})
    s = make(tmp_path, stage="shuffle", params={"s": 1}, inputs={"harvest": h})
    t = make(tmp_path, stage="train", params={"t": 1}, inputs={"shuffle": s})
    orphan = make(tmp_path, params={"x": 99})
    store.write_ref(tmp_path, "demo/train", t)
    remove, busy = store.gc_plan(tmp_path)
    assert [a.ref for a in remove] == [orphan.ref] and busy == []
    # --all: inputs of complete artifacts no ref names go too, but refs keep their chain.
    (tmp_path / "refs" / "demo" / "train").unlink()
    remove_all, _ = store.gc_plan(tmp_path, everything=True)
    assert {a.ref for a in remove_all} == {h.ref, s.ref, t.ref, orphan.ref}
    remove_default, _ = store.gc_plan(tmp_path)
    assert {a.ref for a in remove_default} == {t.ref, orphan.ref}
    for a in remove_default:
        store.remove(a)
    assert not t.path.exists() and h.path.exists() and s.path.exists()
    tried("store", "gc safety")

def test_cli_ls_show_gc(tmp_path, capsys):
    a = make(tmp_path, params={"x": 1}, summary={"n_tokens": 8})
    b = make(tmp_path, params={"x": 2}, complete=False)
    res = run_cli(capsys, "ls", "--store", tmp_path)
    assert res.code == 0 and "complete" in res.out and "incomplete" in res.out
    res = run_cli(capsys, "show", a.digest[:10], "--store", tmp_path, "--json")
    m = json.loads(res.out)
    assert m["stage"] == "harvest" and m["params"] == {"x": 1} and m["summary"]["n_tokens"] == 8
    assert m["inputs"] == {}
    res = run_cli(capsys, "gc", "--store", tmp_path, "--dry-run")
    assert res.code == 0 and b.ref in res.out and a.ref in res.out and b.path.exists()
    store.write_ref(tmp_path, "keep/a", a)
    res = run_cli(capsys, "gc", "--store", tmp_path)
    assert b.ref in res.out and not b.path.exists() and a.path.exists()


def test_cli_bad_refs(tmp_path, capsys):
    import shutil

    a = make(tmp_path, params={"x": 1})
    twin = a.path.with_name(a.digest[:8] + "0" * 56)  # a second artifact with the same prefix
    shutil.copytree(a.path, twin)
    assert_one_line_error(run_cli(capsys, "show", "nope", "--store", tmp_path), "no artifact")
    assert_one_line_error(run_cli(capsys, "show", "../../etc", "--store", tmp_path), "outside")
    assert_one_line_error(run_cli(capsys, "show", a.digest[:8], "--store", tmp_path),
                          "ambiguous", "more digits")
    assert run_cli(capsys, "show", a.digest[:9], "--store", tmp_path).code == 0


def test_unwritable_store(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/saectl-store"  # root ignores permissions; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "store")
    art = store.artifact_for(store.store_root(target), "harvest", {"x": 1})
    with pytest.raises(ArtifactError, match="not writable"):
        with store.writing(art, {"x": 1}):
            pass


# ---------------------------------------------------------------- a shared store (issue 15)


def _foreign_zarr(path):
    zarr.open_group(path, mode="w", zarr_format=3, attributes={"other": 1})


def test_gc_and_ls_never_touch_folders_that_are_not_saectl_artifacts(tmp_path, capsys):
    """`results/2024/paper.tex` has the shape `<lowercase>/<hex>`; so do a foreign Zarr group
    and a folder of notes. gc (even --all) removes only saectl's artifacts; ls lists only them."""
    ours = make(tmp_path, params={"x": 1})
    paper = tmp_path / "results" / "2024" / "paper.tex"
    paper.parent.mkdir(parents=True)
    paper.write_text("\\documentclass{article}")
    _foreign_zarr(tmp_path / "harvest" / "deadbeef")
    notes = tmp_path / "train" / "abcd1234" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    wrong_stage = tmp_path / "shuffle" / ours.digest  # a copy under another stage's name
    import shutil

    shutil.copytree(ours.path, wrong_stage)
    res = run_cli(capsys, "ls", "--store", tmp_path, "--json")
    assert res.code == 0 and [r["ref"] for r in json.loads(res.out)] == [ours.ref]
    res = run_cli(capsys, "gc", "--store", tmp_path, "--all")
    assert res.code == 0, res.err
    assert res.out.split() == ["removed", ours.ref] and not ours.path.exists()
    assert paper.read_text().startswith("\\document") and notes.read_text() == "mine"
    assert (tmp_path / "harvest" / "deadbeef" / "zarr.json").is_file()
    assert (wrong_stage / "zarr.json").is_file()
    tried("store", "gc safety")


def test_gc_never_follows_a_symlink_out_of_the_store(tmp_path, capsys):
    """A stage folder (and an artifact folder) that are links to another store, on another
    filesystem where one is (/dev/shm): gc --all removes nothing through them, never crashes
    with EXDEV, and ls does not list them."""
    import shutil
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    outside = __import__("pathlib").Path(tempfile.mkdtemp(dir=base, prefix="saectl-outside-"))
    try:
        theirs = make(outside, params={"theirs": 1})
        theirs_train = make(outside, stage="train", params={"t": 1})
        st = tmp_path / "store"
        st.mkdir()
        (st / "harvest").symlink_to(outside / "harvest")  # store/harvest -> outside
        (st / "train").mkdir()
        (st / "train" / theirs_train.digest).symlink_to(theirs_train.path)
        ours = make(st, stage="shuffle", params={"s": 1})
        res = run_cli(capsys, "ls", "--store", st, "--json")
        assert res.code == 0 and [r["ref"] for r in json.loads(res.out)] == [ours.ref]
        res = run_cli(capsys, "gc", "--store", st, "--all")
        assert res.code == 0, res.err
        assert res.out.split() == ["removed", ours.ref]
        assert theirs.is_complete() and theirs_train.is_complete()
        assert store.remove(store.Artifact(st, "harvest", theirs.digest)) is False
        assert store.remove(store.Artifact(st, "train", theirs_train.digest)) is False
        assert theirs.is_complete() and theirs_train.is_complete()
    finally:
        shutil.rmtree(outside)
    tried("store", "gc safety")


def test_gc_empties_what_an_interrupted_gc_left(tmp_path, capsys):
    ours = make(tmp_path, params={"x": 1})
    old_trash = tmp_path / store.TRASH / "harvest-abcd-1-2"  # how older versions removed
    old_trash.mkdir(parents=True)
    (old_trash / "zarr.json").write_text("{}")
    half = tmp_path / "harvest" / f".{'ab' * 32}.removing-1-2"
    half.mkdir()
    store.write_ref(tmp_path, "keep", ours)
    assert run_cli(capsys, "gc", "--store", tmp_path).code == 0
    assert not (tmp_path / store.TRASH).exists() and not half.exists() and ours.is_complete()


def _write_shard(path, ready, release):
    art = store.Artifact(*path)
    with store.writing(art, {"x": 1}, shard="1-of-2"):
        ready.set()
        release.wait(10)


def test_gc_rechecks_shard_locks_when_it_removes(tmp_path):
    """A harvest shard that starts between gc's plan and its removal holds only its own lock
    (`.lock.1-of-2`); removal, under the main lock, asks again and keeps the artifact."""
    art = make(tmp_path, params={"x": 1}, complete=False)
    remove, busy = store.gc_plan(tmp_path)
    assert remove == [art] and busy == []
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_write_shard, args=((tmp_path, "harvest", art.digest), ready, release))
    p.start()
    try:
        assert ready.wait(10)
        assert store.remove(art) is False
        assert art.exists() and store.is_locked(art)
    finally:
        release.set()
        p.join(10)
    assert store.remove(art) is True and not art.path.exists()
    tried("store", "gc safety")


def test_writer_waiting_while_gc_moves_the_folder_starts_again(tmp_path):
    """A writer waiting for the lock while gc moves the artifact away must not write into the
    moved folder: it takes the lock at the artifact's path again, on a fresh folder."""
    import threading

    from saectl import locks

    art = store.artifact_for(tmp_path, "harvest", {"x": 1})
    art.path.mkdir(parents=True)
    fd = locks.acquire(art.path / store.LOCK)  # "gc" holds the main lock
    seen = {}

    def writer():
        with store.writing(art, {"x": 1}):
            seen["locked_at_path"] = store.is_locked(art)  # this thread's lock, at art.path
            seen["manifest"] = art.manifest()["params"]

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.5)  # the writer is waiting on the lock file
    os.rename(art.path, tmp_path / "harvest" / ".moved")  # gc moves it, then lets go
    os.close(fd)
    t.join(10)
    assert seen == {"locked_at_path": True, "manifest": {"x": 1}}
    assert not (tmp_path / "harvest" / ".moved" / "zarr.json").exists()
    tried("store", "gc safety")


def test_planted_lock_symlink_is_refused_never_written_through(tmp_path, capsys):
    """Someone who can write to a shared store links an artifact's `.lock` to a file of
    yours: the next writer refuses it in one line instead of truncating that file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    art = store.artifact_for(tmp_path / "store", "harvest", {"x": 1})
    art.path.mkdir(parents=True)
    (art.path / store.LOCK).symlink_to(victim)
    with pytest.raises(ArtifactError, match="symbolic link") as err:
        with store.writing(art, {"x": 1}):
            pass
    assert "\n" not in str(err.value) and victim.read_text() == "precious"
    tried("store", "planted file")


# ---------------------------------------------------------------- locks on NFS


def _nfs_flock(fd, op):
    """Linux's NFS client emulates flock with fcntl byte-range locks (lockf): an exclusive
    lock needs a descriptor open for writing (else EBADF), a shared one for reading."""
    import fcntl

    return fcntl.lockf(fd, op)


def _hold_plain(path, ready, release):
    with store.writing(store.Artifact(*path), {"x": 1}):
        ready.set()
        release.wait(10)


def test_locks_work_where_flock_is_fcntl_emulated(tmp_path, capsys, monkeypatch):
    """On NFS, `is_locked` used to open lock files read-only and ask for an exclusive lock:
    EBADF, and `saectl ls`/`gc` crashed. The probe is a shared lock now."""
    import fcntl

    monkeypatch.setattr(fcntl, "flock", _nfs_flock)
    idle = make(tmp_path, params={"x": 2}, complete=False)
    art = store.artifact_for(tmp_path, "harvest", {"x": 1})
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_plain, args=((tmp_path, "harvest", art.digest), ready, release))
    p.start()
    try:
        assert ready.wait(10)
        res = run_cli(capsys, "ls", "--store", tmp_path, "--json")
        assert res.code == 0, res.err
        assert {r["ref"]: r["state"] for r in json.loads(res.out)} == {
            art.ref: "writing", idle.ref: "incomplete"}
        res = run_cli(capsys, "gc", "--store", tmp_path)
        assert res.code == 0 and res.out.split() == ["removed", idle.ref], res.err
        assert f"keep {art.ref} (being written)" in res.err and art.exists()
    finally:
        release.set()
        p.join(10)
    tried("store", "NFS locks")


@pytest.mark.parametrize("code", ["ENOLCK", "EBADF"])
def test_a_filesystem_that_cannot_lock_is_one_line(tmp_path, capsys, monkeypatch, code):
    """ENOLCK (NFS without lockd) or EBADF from the lock call, on real lock files: `ls`,
    `gc` and a writer each say in one line that the filesystem cannot lock."""
    import errno
    import fcntl

    art = make(tmp_path, params={"x": 1}, complete=False)

    def refuse(fd, op):
        os.fstat(fd)  # a real, open descriptor
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", refuse)
    for args in (("ls",), ("gc",), ("gc", "--dry-run")):
        assert_one_line_error(run_cli(capsys, *args, "--store", tmp_path), "cannot lock files")
    with pytest.raises(ArtifactError, match="cannot lock files"):
        with store.writing(art, {"x": 1}):
            pass
    assert art.exists()
    tried("store", "NFS locks")
