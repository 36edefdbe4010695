"""Import: activations from other tools, addressed by content; bad files refused before
anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from safetensors.numpy import save_file

from saectl import arrays, store
from tests.helpers import assert_one_line_error, run_cli, tried


def test_formats_round_trip_and_address_by_content(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    save_file({"acts": x}, str(tmp_path / "a.safetensors"))
    zarr.create_array(tmp_path / "a.zarr", data=x)
    refs = {}
    for name in ("a.npy", "a.safetensors", "a.zarr"):
        res = run_cli(capsys, "import", tmp_path / name, "--hook", "h", "--store", tmp_path / "s")
        assert res.code == 0, res.err
        art = store.open_complete(tmp_path / "s", res.out.strip())
        np.testing.assert_array_equal(arrays.read(art.group()["acts/h"]), x)
        refs[name] = res.out.strip()
    assert len(set(refs.values())) == 3  # different files, different addresses
    again = run_cli(capsys, "import", tmp_path / "a.npy", "--hook", "h", "--store", tmp_path / "s")
    assert again.out.strip() == refs["a.npy"] and "cache hit" in again.err
    np.save(tmp_path / "a.npy", x * 2)  # same name, new content: a new artifact
    changed = run_cli(capsys, "import", tmp_path / "a.npy", "--hook", "h", "--store", tmp_path / "s")
    assert changed.out.strip() != refs["a.npy"]
    img = run_cli(capsys, "import", tmp_path / "a.safetensors", "--hook", "h", "--image-shape",
                  "4x4", "--store", tmp_path / "s")
    m = store.open_complete(tmp_path / "s", img.out.strip()).manifest()
    assert m["summary"]["image_shape"] == [4, 4]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_and_nothing_written(bad, tmp_path, capsys):
    x = np.ones((50, 4), np.float32)
    x[17, 2] = bad
    np.save(tmp_path / "x.npy", x)
    res = run_cli(capsys, "import", tmp_path / "x.npy", "--store", tmp_path / "s")
    assert_one_line_error(res, "non-finite", "row 17", "column 2")
    assert store.list_artifacts(tmp_path / "s") == []


def test_bad_files(tmp_path, capsys):
    np.save(tmp_path / "three.npy", np.zeros((2, 3, 4), np.float32))
    save_file({"a": np.zeros((4, 2), np.float32), "b": np.zeros((4, 2), np.float32)},
              str(tmp_path / "two.safetensors"))
    np.save(tmp_path / "ok.npy", np.zeros((10, 6), np.float32))
    (tmp_path / "text.csv").write_text("1,2\n")
    (tmp_path / "broken.npy").write_bytes(b"not numpy at all")
    cases = [
        ([tmp_path / "missing.npy"], ["does not exist"]),
        ([tmp_path / "three.npy"], ["(2, 3, 4)", "(n, d)"]),
        ([tmp_path / "two.safetensors"], ["--key", "a, b"]),
        ([tmp_path / "two.safetensors", "--key", "c"], ["no tensor 'c'"]),
        ([tmp_path / "text.csv"], [".npy"]),
        ([tmp_path / "broken.npy"], ["not a readable .npy"]),
        ([tmp_path / "ok.npy", "--image-shape", "2x2"], ["4 pixels", "6 values"]),
        ([tmp_path / "ok.npy", "--image-shape", "big"], ["8x8"]),
        ([tmp_path / "ok.npy", "--context-size", "11"], ["10 rows"]),
        ([tmp_path / "ok.npy", "--hook", "a/b"], ["plain name"]),
    ]
    for args, needles in cases:
        assert_one_line_error(run_cli(capsys, "import", *args, "--store", tmp_path / "s"), *needles)
    assert store.list_artifacts(tmp_path / "s") == []


def test_no_wait_fails_at_once_while_another_process_writes(tmp_path, capsys):
    """The contract's lock step, which import once skipped: --no-wait is one line, at once."""
    import subprocess
    import sys
    import time

    from stages import import_acts

    np.save(tmp_path / "x.npy", np.ones((20, 4), np.float32))
    art = import_acts.STAGE.address(import_acts.ImportConfig(file=str(tmp_path / "x.npy"),
                                                             store=str(tmp_path / "s")))
    art.path.mkdir(parents=True)
    holder = subprocess.Popen(  # another process holds the artifact's write lock
        [sys.executable, "-c", "import sys, time; from saectl import store; "
         f"cm = store.flock({str(art.path / store.LOCK)!r}, True, 'holder'); cm.__enter__(); "
         "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        res = run_cli(capsys, "import", tmp_path / "x.npy", "--store", tmp_path / "s", "--no-wait")
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(res, "being written", "--no-wait")
    assert took < 5 and not art.is_complete()
    done = run_cli(capsys, "import", tmp_path / "x.npy", "--store", tmp_path / "s")
    assert done.code == 0 and done.out.strip() == art.ref
    tried("import", "busy writer")


def test_hook_names_are_normalised(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((20, 4), np.float32))
    refs = [run_cli(capsys, "import", tmp_path / "x.npy", "--hook", h, "--store", tmp_path / "s")
            for h in ("resid_post.03", "resid_post.3")]
    assert refs[0].code == refs[1].code == 0 and refs[0].out == refs[1].out
    g = store.open_complete(tmp_path / "s", refs[0].out.strip()).group()
    assert list(g["acts"].array_keys()) == ["resid_post.3"]
