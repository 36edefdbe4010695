"""The MDL-SAE experiment on handwritten digits (pipelines/mdl-digits.yaml) at a small size:
the images import with their shape, the sweep's DL plot and the decoder images exist, the DL
values are finite and the choice respects the tolerance. Also MNIST's IDX format."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest

from saectl import store
from tests.helpers import REPO, assert_one_line_error, run_cli

pytest.importorskip("sklearn", reason="scikit-learn is needed for sklearn:digits")


def test_small_mdl_digits_pipeline(tmp_path, capsys):
    sets = ["sweep.grid={arch: topk, width: [16, 64, 256], k: [4], tokens: 30000, "
            "batch_size: 256}", "sweep.tolerance=0.4",
            "narrowest.width=16", "narrowest.k=4", "narrowest.tokens=30000",
            "widest.width=256", "widest.k=4", "widest.tokens=30000"]
    res = run_cli(capsys, "run", REPO / "pipelines" / "mdl-digits.yaml", "--store", tmp_path,
                  *[a for s in sets for a in ("--set", s)])
    assert res.code == 0, res.err
    imp = store.resolve(tmp_path, "refs/mdl-digits/digits")
    assert imp.manifest()["summary"]["image_shape"] == [8, 8]
    assert imp.manifest()["summary"]["n_tokens"] == 1797
    sweep = store.resolve(tmp_path, "refs/mdl-digits/sweep.sweep")
    s = sweep.manifest()["summary"]
    rows = [dict(zip(s["columns"], r)) if isinstance(r, list) else r for r in s["table"]]
    chosen = next(r for r in rows if r["point"] == s["chosen"])
    assert chosen["quantised_fvu"] <= 0.4
    scored = [r for r in rows if r["dl"] is not None]
    assert scored and all(math.isfinite(r["dl"]) and r["dl"] <= r["naive_bound"] for r in scored)
    assert chosen["dl"] == min(r["dl"] for r in scored)
    assert (sweep.path / "report" / "dl_width.png").stat().st_size > 10_000
    for step in ("chosen_images", "narrowest_images", "widest_images"):
        art = store.resolve(tmp_path, f"refs/mdl-digits/{step}")
        assert (art.path / "report" / "decoder.png").stat().st_size > 5_000
        assert art.manifest()["params"]["image_shape"] == [8, 8]


def _idx(path, images: np.ndarray, gz=False):
    n, h, w = images.shape
    raw = b"\0\0\x08\x03" + b"".join(v.to_bytes(4, "big") for v in (n, h, w)) + images.tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_import_with_their_shape(tmp_path, capsys, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    _idx(path, images, gz)
    res = run_cli(capsys, "import", path, "--hook", "pixels", "--store", tmp_path)
    assert res.code == 0, res.err
    art = store.open_complete(tmp_path, res.out.strip())
    assert art.manifest()["summary"]["image_shape"] == [28, 28]
    x = art.group()["acts/pixels"][:]
    np.testing.assert_allclose(x, images.reshape(50, -1) / 255.0, rtol=1e-6)
    bad = tmp_path / "broken-idx3-ubyte"
    bad.write_bytes(path.read_bytes()[:-10] if not gz else b"\0\0\x08\x03" + b"\0" * 8)
    assert_one_line_error(run_cli(capsys, "import", bad, "--store", tmp_path), "IDX")
