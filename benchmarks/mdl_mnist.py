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
import os
import resource
import sys
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
# The figures cost ~20-40 ms per direction (stroke-ness tries 52,344 segments), so an SAE with
# more live latents than EXACT is measured on a sample: DRAWS latents drawn with probability ∝
# use (with replacement; their plain mean estimates the use-weighted mean, standard error
# σ/√DRAWS) and UNIFORM drawn uniformly (their median estimates the median), besides the TILES
# most used. Seed replicas get DL only: their figures would repeat seed 0's.
EXACT, DRAWS, UNIFORM = 384, 256, 128
CAL_SHAPES, CAL_DIGITS = 200, 500  # the calibration's drawn shapes of each kind, test digits
NEAR = 3  # the feasible points of least held-out DL that get seeds 1 and 2 and a longer run
LONG = 2  # how many times as long that run trains (a check of convergence at the minimum)
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
    try:
        main(["run", str(PIPELINE), "--store", str(root),
              "--set", f"train_images.file={find(data, 'train')}",
              "--set", f"test_images.file={find(data, 'test')}"])
    except SystemExit as e:  # the CLI exits with its status; 0 means go on to the analysis
        if e.code not in (0, None):
            raise
    return time.time() - t


def sweep_rows(root: Path, ref: str, name: str) -> list[dict]:
    s = store.resolve(root, ref).manifest()["summary"]
    rows = [dict(zip(s["columns"], r)) if isinstance(r, list) else dict(r) for r in s["table"]]
    for r in rows:
        r["sweep"], r["chosen"] = name, name == "sweep" and r["point"] == s["chosen"]
        r["seed"] = store.resolve(root, r["ref"]).manifest()["params"]["train"]["seed"]
    return rows


def grid_point(root: Path, ref: str, **change) -> dict:
    """The sweep point that trains the SAE at `ref` again, with `change` (seed, tokens)."""
    prm = store.resolve(root, ref).manifest()["params"]
    sae, train = prm["sae"], prm["train"]
    out = {"arch": sae["arch"], "width": sae["d_sae"], "k": sae["k"],
           "tokens": train["total_steps"] * prm["batch_size"], "batch_size": prm["batch_size"],
           "dead_tokens": train["dead_window_tokens"], "lm_eval": False, "seed": train["seed"]}
    if sae["arch"] == "jumprelu":
        out["l0"] = sae["l0_coefficient"]
    if sae["matryoshka_prefixes"]:
        out["prefixes"] = ",".join(map(str, sae["matryoshka_prefixes"]))
    if train["lr"] is not None:
        out["lr"] = train["lr"]
    return {**out, **change}


def checks(root: Path, rows: list[dict], tolerance: float, work: Path,
           near: int = NEAR, long: int = LONG) -> list[dict]:
    """The two checks on the minimum, one sweep of their own: seeds 1 and 2 of the `near`
    feasible points of least held-out DL, and those points trained `long` times as long
    (seed 0), to see whether more training moves the choice. Its rows, `sweep` "seeds" or
    "long". The long runs go first: the two processes then finish together."""
    from saectl import stage
    from stages import sweep

    ok = sorted((r for r in rows if r["dl"] is not None), key=lambda r: r["dl"])[:near]
    points = [("long", grid_point(root, r["ref"], tokens=long * grid_point(root, r["ref"])["tokens"]))
              for r in ok]
    points += [("seeds", grid_point(root, r["ref"], seed=s)) for r in ok for s in (1, 2)]
    path = work / "mdl-mnist-checks.yaml"
    path.write_text(json.dumps({"points": [p for _, p in points]}))  # JSON is YAML
    art = stage.run(sweep.STAGE, sweep.SweepConfig(
        store=str(root), shuffle="refs/mdl-mnist/shuffle", grid=str(path), tolerance=tolerance,
        executor="processes", jobs=2))
    out = sweep_rows(root, art.ref, "checks")
    for r in out:  # the table's rows are the grid's points in order: p00, p01, ...
        r["sweep"] = points[int(r["point"][1:])][0]
    return out


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
    out = {k: row.get(k) for k in ("point", "sweep", "chosen", "arch", "width", "k", "seed",
                                   "l0", "ref")}
    out.update(val_dl=row["dl"], val_fvu=row["fvu"], val_quantised_fvu=row["quantised_fvu"],
               dl=dl.as_dict(), live=int(live.sum()), convergence=converged(art),
               prefixes=list(prefixes) if prefixes else None,
               l0_coefficient=sae.cfg.l0_coefficient if row["arch"] == "jumprelu" else None)
    if row["sweep"] != "sweep":
        return out
    dirs = sae.W_dec.detach().float().numpy()[live]
    w = fires.numpy()[live].astype(np.float64)
    order = np.argsort(-w)[:TILES]
    if len(w) <= EXACT:
        pick, weighted, uniform = np.arange(len(w)), None, None
    else:  # a sample: see EXACT
        rng = np.random.default_rng(0)
        weighted = rng.choice(len(w), DRAWS, p=w / w.sum())
        uniform = rng.choice(len(w), UNIFORM, replace=False)
        pick = np.unique(np.concatenate([order, weighted, uniform]))
    fig = strokes.figures(dirs[pick], (28, 28), refs)
    if class_means is not None:
        fig["template_class"] = strokes.template(dirs[pick], class_means)
    at = np.full(len(w), -1)
    at[pick] = np.arange(len(pick))
    kinds = kind(fig)
    if weighted is None:
        ww, wi, med = w, at, at
    else:  # each draw counts once, so the plain mean over draws is the use-weighted estimate
        ww, wi, med = np.ones(DRAWS), at[weighted], at[uniform]
    out.update(figures={k: {"weighted_mean": float((v[wi] * ww).sum() / ww.sum()),
                            "median": float(np.median(v[med]))} for k, v in fig.items()},
               kinds={k: float((ww * (kinds[wi] == k)).sum() / ww.sum())
                      for k in ("template", "stroke", "fragment", "other")},
               measured=int(len(pick)), sampled=weighted is not None)
    out["tiles"] = {"dirs": dirs[order].tolist(), "fires": w[order].tolist(),
                    **{k: np.asarray(v)[at[order]].tolist() for k, v in fig.items()}}
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
    for m in (r for r in rows if r["arch"] == "matryoshka" and r["sweep"] == "sweep"):
        art = store.resolve(root, m["ref"])
        groups = tuple(load_sae(layout.sae_dir(art.path)).cfg.matryoshka_prefixes)
        for r in rows:
            if r["sweep"] == "sweep" and r["arch"] in ("topk", "batchtopk") \
                    and r["width"] == m["width"] and r["k"] == m["k"]:
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
    for _ in range(CAL_SHAPES):
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
    sets = {"test digits": test_images[:CAL_DIGITS], "drawn segment": np.array(segs),
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
    ap.add_argument("--near", type=int, default=NEAR,
                    help="points nearest the minimum that get seeds 1, 2 and a longer run")
    ap.add_argument("--long", type=int, default=LONG,
                    help="how many times as long the points nearest the minimum train again")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0, load0 = time.time(), os.getloadavg()
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
    rows = sweep_rows(root, "refs/mdl-mnist/sweep.sweep", "sweep")
    t = time.time()
    rows += checks(root, rows, tolerance, root, a.near, a.long)
    checks_s = time.time() - t
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
               "pipeline_s": pipeline_s, "checks_s": checks_s, "analysis_s": None,
               "long_factor": a.long}
    sys.path.insert(0, str(REPO))  # run as a script, benchmarks/ is on the path, not the repo
    from benchmarks import mdl_mnist_report as report  # matplotlib

    report.plots(summary, a.out)
    summary["analysis_s"] = time.time() - t0 - (pipeline_s or 0) - checks_s
    summary["wall_s"] = time.time() - t0
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    summary["cpu_s"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    summary["load_average"] = {"start": load0, "end": os.getloadavg()}
    path = root / "mdl-mnist-results.json"
    path.write_text(json.dumps(summary, default=float))
    report.tables(summary)
    print(f"pipeline {pipeline_s or 0:.0f}s, seeds and longer runs {checks_s:.0f}s, analysis "
          f"{summary['analysis_s']:.0f}s: {summary['wall_s'] / 60:.1f} min wall, "
          f"{summary['cpu_s'] / 60:.1f} CPU-min (this process and its children), load average "
          f"{load0[0]:.1f} at the start, {summary['load_average']['end'][0]:.1f} at the end; "
          f"results in {path}")


if __name__ == "__main__":
    main()
