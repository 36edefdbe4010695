"""Plots and tables of benchmarks/mdl_mnist.py's results (README, "MDL on MNIST")."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from saectl import mdl
from saectl.plots import plt, save_figure

TOLERANCES = (0.15, 0.2, 0.25, 0.3)  # the choice at each, from the same test-set figures
NAMES = {"template": "template-ness", "extent": "extent (pixels)", "stroke": "stroke-ness",
         "components": "components"}


def label(p: dict) -> str:
    if p["arch"] == "jumprelu":
        return f"jumprelu {p['width']} λ{p['l0_coefficient']:g}"  # the same for every seed
    return f"{p['arch']} {p['width']} k{p['k']}"


def test_dl(p: dict, tolerance: float) -> tuple[float | None, float | None, int | None]:
    """(DL, naive bound, B) on the test images at `tolerance`, or Nones if no B meets it."""
    by = {int(b): e for b, e in p["dl"]["by_bins"].items()}
    b = mdl.select_bins({k: {"fvu": math.inf if e["fvu"] is None else e["fvu"]}
                         for k, e in by.items()}, tolerance)
    if b is None:
        return None, None, None
    return by[b]["bits_per_token"], by[b]["naive_bound"], b


def chosen(points: list[dict], tolerance: float, seed0=True) -> dict | None:
    ok = [(test_dl(p, tolerance)[0], label(p), i) for i, p in enumerate(points)
          if test_dl(p, tolerance)[0] is not None and (not seed0 or p["sweep"] == "sweep")]
    return points[min(ok)[2]] if ok else None


def shown(summary: dict) -> dict[str, dict]:
    """The three SAEs drawn: the pipeline's choice; the narrowest of the grid at its densest k
    and the widest at its sparsest k (the paper's two ends: narrow and dense, wide and sparse),
    whether or not they meet the tolerance."""
    pts = [p for p in summary["points"] if p["sweep"] == "sweep" and p["arch"] == "topk"]
    narrow, wide = min(p["width"] for p in pts), max(p["width"] for p in pts)
    return {"chosen": next(p for p in summary["points"] if p["chosen"] and p["sweep"] == "sweep"),
            "narrowest": max((p for p in pts if p["width"] == narrow), key=lambda p: p["k"]),
            "widest": min((p for p in pts if p["width"] == wide), key=lambda p: p["k"])}


def plots(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tol = summary["tolerance"]
    pts = [p for p in summary["points"] if p["sweep"] != "long"]
    topk = [p for p in pts if p["arch"] == "topk"]
    by_k = defaultdict(list)
    for p in topk:
        by_k[p["k"]].append(p)
    chosen_p = next(p for p in pts if p["chosen"] and p["sweep"] == "sweep")

    # DL against width per k on the test images, naive bound dotted, seeds as min-max bars.
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for k in sorted(by_k):
        widths = sorted({p["width"] for p in by_k[k]})
        mean, lo, hi, bound, ws = [], [], [], [], []
        for w in widths:
            vals = [test_dl(p, tol) for p in by_k[k] if p["width"] == w]
            dls = [v[0] for v in vals if v[0] is not None]
            if len(dls) != len(vals) or not dls:
                continue
            ws.append(w)
            mean.append(np.mean(dls))
            lo.append(np.mean(dls) - min(dls))
            hi.append(max(dls) - np.mean(dls))
            bound.append(np.mean([v[1] for v in vals]))
        if not ws:
            continue
        line = ax.errorbar(ws, mean, yerr=[lo, hi], fmt="o-", capsize=3, label=f"TopK k={k}")[0]
        ax.plot(ws, bound, ":", color=line.get_color())
    others = defaultdict(list)
    for p in pts:
        if p["arch"] != "topk":
            others[label(p)].append(p)
    for name, ps in sorted(others.items()):
        dls = [test_dl(p, tol)[0] for p in ps]
        if all(d is not None for d in dls):
            m = float(np.mean(dls))
            ax.errorbar([ps[0]["width"]], [m], yerr=[[m - min(dls)], [max(dls) - m]], fmt="s",
                        capsize=3, label=name + (f" ({len(ps)} seeds)" if len(ps) > 1 else ""))
    dl = test_dl(chosen_p, tol)[0]
    ax.scatter([chosen_p["width"]], [dl], s=220, facecolors="none", edgecolors="red",
               label="chosen (on held-out train images)")
    ax.plot([], [], "k:", label="naive bound L0·(log2 F + log2 B)")
    ax.set(xscale="log", xlabel="width (latents)", ylabel="bits per image",
           title=f"DL on the 10,000 test images at quantised FVU ≤ {tol}")
    ax.legend(fontsize=6.5, ncol=2)
    save_figure(fig, out / "mdl-mnist-dl.png")

    # The direction figures against width per k (usage-weighted means over live latents).
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, fig_name in zip(axes, NAMES):
        for k in sorted(by_k):
            seed0 = sorted((p for p in by_k[k] if p["sweep"] == "sweep"), key=lambda p: p["width"])
            ax.plot([p["width"] for p in seed0],
                    [p["figures"][fig_name]["weighted_mean"] for p in seed0], "o-", label=f"k={k}")
        ax.scatter([chosen_p["width"]], [chosen_p["figures"][fig_name]["weighted_mean"]], s=180,
                   facecolors="none", edgecolors="red")
        ax.set(xscale="log", xlabel="width", title=NAMES[fig_name])
    axes[0].legend(fontsize=7)
    fig.suptitle("Decoder directions of TopK SAEs (mean over live latents, weighted by use on "
                 "the test images; red: chosen)", fontsize=9)
    save_figure(fig, out / "mdl-mnist-figures.png")

    for name, p in shown(summary).items():
        tiles(p, out / f"mdl-mnist-{name}.png", f"{name}: {label(p)}")


def tiles(p: dict, path: Path, title: str) -> None:
    t = p["tiles"]
    n = len(t["dirs"])
    cols = 8
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.25, rows * 1.45))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i >= n:
            continue
        d = np.asarray(t["dirs"][i]).reshape(28, 28)
        m = np.abs(d).max() or 1
        ax.imshow(d, cmap="RdBu_r", vmin=-m, vmax=m)
        ax.set_title(f"T{t['template'][i]:.2f} S{t['stroke'][i]:.2f}\n"
                     f"E{t['extent'][i]} C{t['components'][i]}", fontsize=6)
    fig.suptitle(f"{title}: the {n} most-used live latents (red +, blue −); T template-ness, "
                 "S stroke-ness, E extent, C components", fontsize=7)
    save_figure(fig, path)


def tables(summary: dict) -> None:
    tol = summary["tolerance"]
    pts = [p for p in summary["points"] if p["sweep"] != "long"]
    print(f"\n### DL on the test images at quantised FVU <= {tol} (seed 0; seeds: mean ± half range)")
    print("| SAE | val DL | test DL | seeds | naive | B | test FVU | L0 | live | conv. |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    groups = defaultdict(list)
    for p in pts:
        groups[label(p)].append(p)
    for name, ps in sorted(groups.items(), key=lambda kv: (test_dl(kv[1][0], tol)[0] is None,
                                                          test_dl(kv[1][0], tol)[0] or 0)):
        p = next(q for q in ps if q["sweep"] == "sweep")
        dl, bound, b = test_dl(p, tol)
        dls = [test_dl(q, tol)[0] for q in ps]
        seeds = "-"
        if len(ps) > 1 and all(d is not None for d in dls):
            seeds = f"{np.mean(dls):.2f} ± {(max(dls) - min(dls)) / 2:.2f} (n={len(dls)})"
        elif len(ps) > 1:
            seeds = f"{sum(d is not None for d in dls)} of {len(dls)} feasible"
        f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
        mark = " **(chosen)**" if p["chosen"] else ""
        print(f"| {name}{mark} | {f(p['val_dl'])} | {f(dl)} | {seeds} | {f(bound)} | {b or '-'} "
              f"| {f(p['dl']['fvu'], 3)} | {f(p['dl']['l0'], 1)} | {p['live']} "
              f"| {p['convergence'] * 100:.1f}% |")
    long_table(summary)
    print("\n### Direction figures (weighted mean over live latents; median in brackets) and kinds;"
          " * = estimated from a sample of latents (mdl_mnist.EXACT)")
    print("| SAE | test DL | template-ness | extent | stroke-ness | components | template / stroke "
          "/ fragment / other |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for p in sorted((p for p in pts if p["sweep"] == "sweep"), key=lambda p: (p["arch"], p["k"], p["width"])):
        fg, kd = p["figures"], p["kinds"]
        dl = test_dl(p, tol)[0]
        print(f"| {label(p)}{' **(chosen)**' if p['chosen'] else ''}"
              f"{' *' if p.get('sampled') else ''} | "
              f"{'-' if dl is None else f'{dl:.1f}'} | "
              + " | ".join(f"{fg[k]['weighted_mean']:.2f} ({fg[k]['median']:.2f})"
                           for k in ("template", "extent", "stroke", "components"))
              + " | " + " / ".join(f"{kd[k]:.2f}" for k in ("template", "stroke", "fragment", "other"))
              + " |")
    print("\n### Calibration: median figures of things of known kind")
    print("| | template-ness | extent | stroke-ness | components |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, c in summary["calibration"].items():
        print(f"| {name} | {c['template']:.2f} | {c['extent']:.0f} | {c['stroke']:.2f} | "
              f"{c['components']:.0f} |")
    print("\n### Choice by test DL at other tolerances (seed 0)")
    for t in TOLERANCES:
        c = chosen(pts, t)
        print(f"- ε {t}: " + ("none feasible" if c is None else
                             f"{label(c)}, {test_dl(c, t)[0]:.2f} bits (B={test_dl(c, t)[2]})"))
    print("\n### Hierarchical code (groups = Matryoshka prefixes) beside the flat code, test images")
    print("| SAE | ε | B | flat DL | hierarchical DL | flat naive | hierarchical naive |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = [(label(p), p["dl"]) for p in pts if p["prefixes"] and p["sweep"] == "sweep"]
    rows += list({c["point"]: (f"{c['arch']} {c['width']} k{c['k']} (control, same groups)",
                               c["dl"]) for c in summary["hierarchy_controls"]}.values())
    for t in TOLERANCES:
        for name, dl in rows:
            by = {int(b): e for b, e in dl["by_bins"].items()}
            b = mdl.select_bins(by, t)
            if b is None:
                print(f"| {name} | {t} | - | infeasible | | | |")
                continue
            e = by[b]
            print(f"| {name} | {t} | {b} | {e['bits_per_token']:.2f} | "
                  f"{e['hierarchical_bits_per_token']:.2f} | {e['naive_bound']:.1f} | "
                  f"{e['hierarchical_naive_bound']:.1f} |")
    ev = summary["test_eval"]
    print(f"\n`test` step (saectl eval of the chosen SAE on the test images): {ev}")


def long_table(summary: dict) -> None:
    """The points nearest the minimum, trained `long_factor` times as long (seed 0): test FVU and
    DL before and after, and which of them the longer training would choose."""
    tol, factor = summary["tolerance"], summary.get("long_factor")
    long = [p for p in summary["points"] if p["sweep"] == "long"]
    if not long:
        return
    base = {label(p): p for p in summary["points"] if p["sweep"] == "sweep"}
    print(f"\n### Convergence at the minimum: the same points trained {factor}x as long (seed 0, "
          f"test images, ε {tol})")
    print("| SAE | test FVU | FVU, longer | change | test DL (B) | DL, longer (B) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    f = lambda v: "infeasible" if v[0] is None else f"{v[0]:.2f} ({v[2]})"
    for p in sorted(long, key=lambda p: test_dl(p, tol)[0] or math.inf):
        b = base[label(p)]
        fv0, fv1 = b["dl"]["fvu"], p["dl"]["fvu"]
        print(f"| {label(p)} | {fv0:.3f} | {fv1:.3f} | {(fv1 / fv0 - 1) * 100:+.1f}% | "
              f"{f(test_dl(b, tol))} | {f(test_dl(p, tol))} |")
    for name, ps in (("as trained", [base[label(p)] for p in long]), ("longer", long)):
        ok = [(test_dl(p, tol)[0], label(p)) for p in ps if test_dl(p, tol)[0] is not None]
        print(f"- least test DL among them, {name}: " + (f"{min(ok)[1]} ({min(ok)[0]:.2f})"
                                                         if ok else "none feasible"))
