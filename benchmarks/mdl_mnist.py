"""The MDL-SAE experiment on MNIST (issue 19; README, "MDL on MNIST"), end to end:

1. `saectl run pipelines/mdl-mnist.yaml` with the data path: import, shuffle, the sweep (chosen
   by DL on 5,004 held-out training images), the seeds, and the chosen SAE's eval on the test set;
2. for every SAE of both sweeps, on the 10,000 test images: DL at the tolerance (and at others),
   the hierarchical code beside the flat one for Matryoshka (and, as a control, for the TopK and
   BatchTopK SAEs of its width and k, cut into the same groups), and the decoder-direction
   figures of saectl/strokes.py over its live latents;
3. the plots (docs/mdl-mnist-*.png) and the tables README quotes, on stdout; every number in
   <store>/mdl-mnist-results.json.

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/mdl_mnist.py --data ../shared/data/mnist \
        --store /tmp/mnist-store

`--skip-run` analyses a store the pipeline already filled.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from saectl import layout, mdl, store, strokes
from saectl.sae import load_sae

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipelines" / "mdl-mnist.yaml"
FILES = {"train": "train-images.idx3-ubyte.gz", "test": "t10k-images.idx3-ubyte.gz",
         "train_labels": "train-labels.idx1-ubyte.gz"}
TEMPLATE_IMAGES = 10_000  # training images a direction is compared with (and the class means)
TILES = 32  # most-used live latents drawn per SAE
# A direction's kind, from the figures: each threshold midway between the calibration medians
# of the kinds it separates (README, "MDL on MNIST"): stroke-ness between digits (0.61) and two
# joined segments (0.87), extent (geometrically) between a round blob (5) and a segment (16),
# template-ness between a segment (0.60) and a digit (0.84).
TEMPLATE_AT, STROKE_AT, FRAGMENT_EXTENT = 0.72, 0.74, 9


def _idx(path: Path) -> np.ndarray:
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def find(data: Path, name: str) -> Path:
    """MNIST's file by its usual name, gzipped or not, with '-' or '.' before idx."""
    stem = FILES[name].removesuffix(".gz")
    for cand in (stem, stem.replace(".idx", "-idx")):
        for suffix in (".gz", ""):
            if (data / (cand + suffix)).exists():
                return data / (cand + suffix)
    raise SystemExit(f"{data} has no {FILES[name]}; give --data the folder of MNIST's IDX files")


def run_pipeline(data: Path, root: Path) -> float:
    from saectl.cli import main

    t = time.time()
    main(["run", str(PIPELINE), "--store", str(root),
          "--set", f"train_images.file={find(data, 'train')}",
          "--set", f"test_images.file={find(data, 'test')}"])
    return time.time() - t


def sweep_rows(root: Path, step: str) -> list[dict]:
    s = store.resolve(root, f"refs/mdl-mnist/{step}.sweep").manifest()["summary"]
    rows = [dict(zip(s["columns"], r)) if isinstance(r, list) else dict(r) for r in s["table"]]
    for r in rows:
        r["sweep"], r["chosen"] = step, r["point"] == s["chosen"]
    return rows


def converged(art: store.Artifact) -> float:
    """Relative fall of the training-log FVU over the last 20% of steps: (fvu at 80%) / (fvu at
    the end) − 1. The LR decays linearly to 0 over those steps, so a little fall is expected."""
    g = art.group()
    steps, fvu = g[layout.train_log("step")][:], g[layout.train_log("fvu")][:]
    at = int(np.searchsorted(steps, 0.8 * steps[-1]))
    return float(fvu[at] / fvu[-1] - 1)


@torch.no_grad()
def measure(row: dict, root: Path, test: torch.Tensor, refs: np.ndarray, class_means,
            tolerance: float) -> dict:
    art = store.resolve(root, row["ref"])
    sae = load_sae(layout.sae_dir(art.path))
    prefixes = tuple(sae.cfg.matryoshka_prefixes or ()) if row["arch"] == "matryoshka" else None
    batches = lambda: iter(test.split(2500))
    dl = mdl.description_length(sae, batches, tolerance, groups=prefixes)
    fires = torch.zeros(sae.d_sae, dtype=torch.int64)
    for x in batches():
        fires += (sae.encode(x) > 0).sum(0)
    live = fires.numpy() > 0
    dirs = sae.W_dec.detach().float().numpy()[live]
    fig = strokes.figures(dirs, (28, 28), refs)
    if class_means is not None:
        fig["template_class"] = strokes.template(dirs, class_means)
    w = fires.numpy()[live].astype(np.float64)
    kinds = kind(fig)
    out = {k: row.get(k) for k in ("point", "sweep", "chosen", "arch", "width", "k", "seed",
                                   "l0", "ref")}
    out.update(val_dl=row["dl"], val_fvu=row["fvu"], val_quantised_fvu=row["quantised_fvu"],
               dl=dl.as_dict(), live=int(live.sum()), convergence=converged(art),
               figures={k: {"weighted_mean": float((v * w).sum() / w.sum()),
                            "median": float(np.median(v))} for k, v in fig.items()},
               kinds={k: float((w * (kinds == k)).sum() / w.sum())
                      for k in ("template", "stroke", "fragment", "other")},
               prefixes=list(prefixes) if prefixes else None)
    order = np.argsort(-w)[:TILES]
    out["tiles"] = {"dirs": dirs[order].tolist(), "fires": w[order].tolist(),
                    **{k: np.asarray(v)[order].tolist() for k, v in fig.items()}}
    return out


def kind(fig: dict) -> np.ndarray:
    """stroke: one or two segments explain ≥ STROKE_AT of a one-piece positive lobe that is not
    a fragment; else template: correlates ≥ TEMPLATE_AT with some training image or class mean;
    else fragment: half its squared mass in fewer than FRAGMENT_EXTENT pixels; else other. A
    stroke wins over a template: a "1" is both, and is counted a stroke."""
    t = np.maximum(fig["template"], fig.get("template_class", fig["template"]))
    out = np.full(len(t), "other", dtype=object)
    frag = fig["extent"] < FRAGMENT_EXTENT
    stroke = (fig["stroke"] >= STROKE_AT) & (fig["components"] == 1) & ~frag
    out[frag] = "fragment"
    out[(t >= TEMPLATE_AT) & ~stroke] = "template"
    out[stroke] = "stroke"
    return out


def hierarchy_controls(rows: list[dict], root: Path, test: torch.Tensor, tolerance: float):
    """The hierarchical code of the TopK/BatchTopK SAEs with each Matryoshka's width and k, cut
    into the Matryoshka's groups: a dictionary without nested training, coded the same way."""
    out = []
    for m in (r for r in rows if r["arch"] == "matryoshka"):
        art = store.resolve(root, m["ref"])
        groups = tuple(load_sae(layout.sae_dir(art.path)).cfg.matryoshka_prefixes)
        for r in rows:
            if r["arch"] in ("topk", "batchtopk") and r["width"] == m["width"] \
                    and r["k"] == m["k"] and r.get("seed", 0) in (0, None):
                sae = load_sae(layout.sae_dir(store.resolve(root, r["ref"]).path))
                dl = mdl.description_length(sae, lambda: iter(test.split(2500)), tolerance,
                                            groups=groups)
                out.append({"point": r["point"], "arch": r["arch"], "width": r["width"],
                            "k": r["k"], "groups": list(groups), "dl": dl.as_dict()})
    return out


def calibration(refs: np.ndarray, class_means, test_images: np.ndarray) -> dict:
    """The figures of things whose kind is known: test digits, class means, drawn segments (one
    and two), round blobs."""
    rng = np.random.default_rng(1)
    segs, pairs, blobs = [], [], []
    yy, xx = np.mgrid[0:28, 0:28]
    for _ in range(200):
        y0, x0, y1, x1 = rng.uniform(5, 23, 4)
        if math.hypot(y1 - y0, x1 - x0) < 8:
            y1, x1 = 28 - y0, 28 - x0
        width = rng.uniform(1.5, 3.5)
        one = strokes.segment_image((28, 28), y0, x0, y1, x1, width)
        segs.append(one.ravel())
        y2, x2 = rng.uniform(5, 23, 2)
        pairs.append(np.maximum(one, strokes.segment_image((28, 28), y1, x1, y2, x2, width)).ravel())
        cy, cx, s = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(1, 2)
        blobs.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)).ravel())
    sets = {"test digits": test_images[:500], "drawn segment": np.array(segs),
            "two joined segments": np.array(pairs), "round blob": np.array(blobs)}
    if class_means is not None:
        sets["class means"] = class_means
    out = {}
    for name, x in sets.items():
        fig = strokes.figures(x.astype(np.float32), (28, 28), refs)
        out[name] = {k: float(np.median(v)) for k, v in fig.items()}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of MNIST's IDX files")
    ap.add_argument("--store", type=Path, default=Path("mnist-store"))
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="where the plots go")
    ap.add_argument("--skip-run", action="store_true", help="the pipeline has run already")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    pipeline_s = None if a.skip_run else run_pipeline(a.data, a.store)
    root = store.store_root(a.store)
    train_x = store.resolve(root, "refs/mdl-mnist/train_images").group()["acts/pixels"]
    test_np = np.asarray(store.resolve(root, "refs/mdl-mnist/test_images").group()["acts/pixels"][:])
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(train_x.shape[0], TEMPLATE_IMAGES, replace=False))
    all_train = np.asarray(train_x[:])
    refs = all_train[pick]
    labels = _idx(find(a.data, "train_labels"))
    class_means = np.stack([all_train[labels == c].mean(0) for c in range(10)])
    tolerance = store.resolve(root, "refs/mdl-mnist/sweep.sweep").manifest()["summary"]["tolerance"]
    rows = sweep_rows(root, "sweep") + sweep_rows(root, "seeds")
    for r in rows:
        r.setdefault("seed", 0)
        r["seed"] = r["seed"] if r["seed"] is not None else 0
    test = torch.from_numpy(test_np)
    results = []
    for r in rows:
        t = time.time()
        results.append(measure(r, root, test, refs, class_means, tolerance))
        print(f"  {r['sweep']} {r['arch']} width {r['width']} k {r['k']} seed {r['seed']}: "
              f"{time.time() - t:.0f}s", flush=True)
    controls = hierarchy_controls(rows, root, test, tolerance)
    test_eval = store.resolve(root, "refs/mdl-mnist/test").manifest()["summary"]
    summary = {"tolerance": tolerance, "points": results, "hierarchy_controls": controls,
               "calibration": calibration(refs, class_means, test_np),
               "test_eval": {k: test_eval.get(k) for k in ("fvu", "l0", "dead_fraction", "dl",
                                                          "dl_bins", "n_tokens")},
               "pipeline_s": pipeline_s, "analysis_s": None}
    from benchmarks import mdl_mnist_report as report  # matplotlib

    report.plots(summary, a.out)
    summary["analysis_s"] = time.time() - t0 - (pipeline_s or 0)
    path = root / "mdl-mnist-results.json"
    path.write_text(json.dumps(summary, default=float))
    report.tables(summary)
    print(f"pipeline {pipeline_s or 0:.0f}s, analysis {summary['analysis_s']:.0f}s; "
          f"results in {path}")


if __name__ == "__main__":
    main()
