"""The MDL-SAE experiment on MNIST (pipelines/mdl-mnist.yaml, benchmarks/mdl_mnist.py): the
pipeline and the analysis at a tiny size on the real files when ../shared/data/mnist holds them;
the decoder-direction figures of saectl/strokes.py on things whose kind is known; the
hierarchical code of saectl/mdl.py on hand-built SAEs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from saectl import store, strokes
from saectl.errors import ConfigError
from saectl.mdl import binary_entropy, description_length
from saectl.sae import ARCHS, SAEConfig
from tests.helpers import REPO, run_cli

MNIST = REPO.parent / "shared" / "data" / "mnist"
HW = (28, 28)


def _have_mnist() -> bool:
    return all((MNIST / f).exists() for f in ("train-images.idx3-ubyte.gz",
                                              "t10k-images.idx3-ubyte.gz",
                                              "train-labels.idx1-ubyte.gz"))


needs_mnist = pytest.mark.skipif(not _have_mnist(), reason=f"MNIST's IDX files are not in "
                                 f"{MNIST} (the project's shared data); the pipeline test needs them")


@needs_mnist
def test_small_mdl_mnist_pipeline_and_analysis(tmp_path, capsys, monkeypatch):
    grid = ("{arch: topk, width: [16, 64], k: [4], tokens: 2560, batch_size: 256, "
            "lm_eval: false, points: [{arch: matryoshka, width: 64, k: 4, prefixes: '16,64'}]}")
    sets = [f"train_images.file={MNIST / 'train-images.idx3-ubyte.gz'}",
            f"test_images.file={MNIST / 't10k-images.idx3-ubyte.gz'}",
            f"sweep.grid={grid}", "sweep.tolerance=0.6", "test.tolerance=0.6"]
    res = run_cli(capsys, "run", REPO / "pipelines" / "mdl-mnist.yaml", "--store", tmp_path,
                  *[a for s in sets for a in ("--set", s)])
    assert res.code == 0, res.err
    train = store.resolve(tmp_path, "refs/mdl-mnist/train_images").manifest()["summary"]
    test = store.resolve(tmp_path, "refs/mdl-mnist/test_images").manifest()["summary"]
    assert (train["n_tokens"], train["image_shape"]) == (60_000, [28, 28])
    assert test["n_tokens"] == 10_000
    ev = store.resolve(tmp_path, "refs/mdl-mnist/test").manifest()
    assert ev["summary"]["n_tokens"] == 10_000  # the test images, not the shuffle's split
    assert ev["inputs"]["data"] == store.resolve(tmp_path, "refs/mdl-mnist/test_images").ref
    assert math.isfinite(ev["summary"]["dl"])

    from benchmarks import mdl_mnist

    monkeypatch.setattr(mdl_mnist, "TEMPLATE_IMAGES", 500)
    monkeypatch.setattr(mdl_mnist, "CAL_SHAPES", 40)  # medians of fewer: the figures cost
    monkeypatch.setattr(mdl_mnist, "CAL_DIGITS", 100)  # ~30 ms a direction
    mdl_mnist.main(["--data", str(MNIST), "--store", str(tmp_path), "--out",
                    str(tmp_path / "docs"), "--skip-run", "--near", "1"])
    out = json.loads((tmp_path / "mdl-mnist-results.json").read_text())
    # 3 in the sweep; seeds 1 and 2 and a 4x longer run of the one nearest the minimum
    assert [p["sweep"] for p in out["points"]].count("sweep") == 3
    near = [p for p in out["points"] if p["sweep"] != "sweep"]
    assert sorted((p["sweep"], p["seed"]) for p in near) == [("long", 0), ("seeds", 1), ("seeds", 2)]
    assert len({(p["arch"], p["width"], p["k"]) for p in near}) == 1
    assert out["cpu_s"] > 0 and len(out["load_average"]["start"]) == 3
    chosen = next(p for p in out["points"] if p["chosen"] and p["sweep"] == "sweep")
    # the analysis's test DL of the chosen SAE is the test step's, computed apart
    assert chosen["dl"]["bits_per_token"] == pytest.approx(ev["summary"]["dl"], rel=1e-6)
    mat = next(p for p in out["points"] if p["arch"] == "matryoshka")
    e = mat["dl"]["by_bins"]["256"]
    assert e["hierarchical_bits_per_token"] > 0 and e["hierarchical_naive_bound"] > 0
    for p in out["points"]:
        assert p["live"] > 0
        if p["sweep"] == "sweep":  # the figures of seed 0's SAEs only
            assert 0 <= p["kinds"]["template"] <= 1
    for name in ("dl", "figures", "chosen", "narrowest", "widest"):
        assert (tmp_path / "docs" / f"mdl-mnist-{name}.png").stat().st_size > 10_000
    cal = out["calibration"]
    assert cal["drawn segment"]["stroke"] > 0.85 > cal["test digits"]["stroke"]
    assert cal["round blob"]["extent"] < cal["drawn segment"]["extent"] < cal["test digits"]["extent"]


def test_a_wrong_mnist_path_is_one_line_and_writes_nothing(tmp_path, capsys):
    """Where MNIST is not where the pipeline is told it is, the run stops at the import with
    one line naming the path, and no artifact is left complete."""
    from tests.helpers import assert_one_line_error

    res = run_cli(capsys, "run", REPO / "pipelines" / "mdl-mnist.yaml", "--store", tmp_path,
                  "--set", f"train_images.file={tmp_path / 'nowhere' / 'train.gz'}")
    assert_one_line_error(res, "train_images", "nowhere", "does not exist")
    assert not list(tmp_path.glob("*/*/COMPLETE"))


def test_a_jumprelus_seeds_are_one_row_of_the_report():
    """The report groups an SAE's seeds by its label: a JumpReLU's is its λ, which the seeds
    share, not its measured L0, which they do not (two labels left the seed-0 row without its
    seeds, and the report stopped)."""
    from benchmarks.mdl_mnist_report import label

    seeds = [{"arch": "jumprelu", "width": 256, "k": 32, "l0_coefficient": 6.0, "l0": l0}
             for l0 in (14.0, 13.7, 13.73)]
    assert len({label(p) for p in seeds}) == 1
    assert label(seeds[0]) != label({**seeds[0], "l0_coefficient": 12.0})


# -- the direction figures ---------------------------------------------------------------------


def _ring(radius=8.0, width=1.5):
    yy, xx = np.mgrid[0:28, 0:28]
    return np.clip(width - np.abs(np.hypot(yy - 14, xx - 14) - radius), 0, 1).ravel()


def _blob(cy=14.0, cx=14.0, sigma=1.2):
    yy, xx = np.mgrid[0:28, 0:28]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2)).ravel()


def test_a_drawn_segment_is_a_stroke_and_a_ring_is_not():
    seg = strokes.segment_image(HW, 6.3, 4.2, 21.7, 18.9, 2.7).ravel()  # off the lattice
    got = strokes.strokeness(np.stack([seg, _ring(), _blob()]), HW)
    assert got[0] > 0.9  # one segment explains it
    assert got[1] < 0.5  # a circle is not one or two straight segments
    assert strokes.components(seg[None], HW)[0] == 1


def test_two_joined_segments_need_the_second_segment():
    corner = np.maximum(strokes.segment_image(HW, 5, 5, 21, 5, 2.5),
                        strokes.segment_image(HW, 5, 5, 5, 21, 2.5)).ravel()[None]
    assert strokes.strokeness(corner, HW)[0] > 0.9
    assert strokes.strokeness(corner, HW, two=False)[0] < 0.6


def test_strokeness_reads_the_positive_lobe_only():
    seg = strokes.segment_image(HW, 5, 5, 20, 20, 2.5).ravel()
    assert strokes.strokeness(-seg[None], HW)[0] == 0.0  # no positive lobe
    mixed = seg - 0.5 * _ring()
    assert strokes.strokeness(mixed[None], HW)[0] > 0.9


def test_extent_counts_the_pixels_of_half_the_squared_mass():
    d = np.zeros(784)
    d[:4] = [3, 1, 1, 1]  # squared mass 12: pixel 0 holds 9 ≥ 6
    assert strokes.extent(d[None])[0] == 1
    d[:4] = [1, 1, 1, 1]  # 4 equal pixels: two hold half
    assert strokes.extent(d[None])[0] == 2
    assert strokes.extent(_blob()[None])[0] < 10 < strokes.extent(_ring()[None])[0]


def test_components_count_separate_pieces_of_the_lobe():
    two = np.zeros((28, 28))
    two[5:8, 5:8] = 1
    two[20:23, 20:23] = 1
    diag = np.zeros((28, 28))
    diag[3, 3] = diag[4, 4] = 1  # touching at a corner: one piece under 8-connectivity
    low = two.copy()
    low[12, 12] = 0.2  # below LOBE × max: not part of the lobe
    got = strokes.components(np.stack([two.ravel(), diag.ravel(), low.ravel(),
                                       -two.ravel()]), HW)
    assert got.tolist() == [2, 1, 2, 0]


def test_templateness_is_the_best_signed_correlation():
    rng = np.random.default_rng(0)
    refs = rng.random((50, 784)).astype(np.float32)
    d = np.stack([refs[7] * 3 + 1, -refs[7], _blob()])  # scale and offset do not matter
    got = strokes.template(d, refs)
    assert got[0] == pytest.approx(1.0, abs=1e-5)
    assert got[1] < 0.5  # the negative of an image is not its template
    assert got[2] < 0.5


@needs_mnist
def test_a_digit_is_a_template_and_its_strokes_are_not():
    from benchmarks.mdl_mnist import _idx

    x = _idx(MNIST / "t10k-images.idx3-ubyte.gz")[:300].reshape(300, -1).astype(np.float32) / 255
    digit, refs = x[0], x[1:]
    # a short stroke in a corner: no digit looks like it (a long upright one would: a "1")
    seg = strokes.segment_image(HW, 3, 3, 9, 8, 2.5).ravel()
    t = strokes.template(np.stack([digit, seg]), np.vstack([refs, digit[None]]))
    assert t[0] == pytest.approx(1.0, abs=1e-5)
    assert strokes.template(digit[None], refs)[0] > 0.6  # another 7 looks like it
    assert t[1] < 0.4
    upright = strokes.segment_image(HW, 5, 14, 23, 13, 2.5).ravel()[None]
    assert strokes.template(upright, refs)[0] > 0.8


# -- the hierarchical code ---------------------------------------------------------------------


def _sae(W_enc, b_enc, W_dec):
    W_enc = torch.as_tensor(W_enc, dtype=torch.float64)
    d_in, d_sae = W_enc.shape
    sae = ARCHS["relu"](SAEConfig(arch="relu", d_in=d_in, d_sae=d_sae, dtype="float64"))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(torch.as_tensor(b_enc, dtype=torch.float64))
        sae.W_dec.copy_(torch.as_tensor(W_dec, dtype=torch.float64))
        sae.b_dec.zero_()
    return sae


def test_one_group_is_the_flat_code():
    torch.manual_seed(0)
    sae = ARCHS["topk"](SAEConfig(arch="topk", d_in=8, d_sae=16, k=3))
    x = torch.randn(400, 8)
    dl = description_length(sae, lambda: iter(x.split(100)), 0.9, groups=(16,))
    for e in dl.by_bins.values():  # the group fires on every token: H_b(1) = 0
        assert e["hierarchical_bits_per_token"] == pytest.approx(e["bits_per_token"], abs=1e-9)
        assert e["hierarchical_naive_bound"] == pytest.approx(e["naive_bound"], abs=1e-9)


def test_hierarchical_code_by_hand():
    """Two inputs dims, three latents: latent 0 reads dim 0 (group 1 = {0}); latents 1 and 2
    both read dim 1 (group 2 = {1, 2}), 2 only above 2. Tokens (dim 1 > 0 on 2 of 8)."""
    sae = _sae([[1.0, 0, 0], [0, 1, 1]], [0.0, 0, -2], [[1.0, 0], [0, 1], [0, 1]])
    x = torch.tensor([[1.0, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 1], [1, 3]])
    dl = description_length(sae, lambda: iter([x]), 0.5, groups=(1, 3))
    e = dl.by_bins[2]
    # p = (1, 2/8, 1/8); group 2 fires on 2 of 8 tokens: a_2 = 1/4, rates inside (1, 1/2)
    h_q = e["bits_per_token"] - float(binary_entropy(torch.tensor([1.0, 0.25, 0.125])).sum())
    want = float(binary_entropy(0.25)) + 0.25 * (0 + 1.0) + h_q
    assert e["hierarchical_bits_per_token"] == pytest.approx(want, abs=1e-9)
    assert e["hierarchical_bits_per_token"] < e["bits_per_token"]
    # naive: L0 = 1 + 2/8 + 1/8; group bits log2 2, within-group log2 1 and log2 2, B = 2
    l0_1, l0_2 = 1.0, 3 / 8
    assert e["hierarchical_naive_bound"] == pytest.approx(
        l0_1 * (1 + 0) + l0_2 * (1 + 1) + (l0_1 + l0_2) * 1, abs=1e-9)


def test_groups_must_be_prefixes_of_the_width():
    sae = _sae([[1.0, 0, 0]], [0.0, 0, 0], [[1.0], [0], [0]])
    x = torch.ones(4, 1)
    for bad in ((2,), (2, 1, 3), (0, 3)):
        with pytest.raises(ConfigError, match="groups"):
            description_length(sae, lambda: iter([x]), 0.5, groups=bad)
