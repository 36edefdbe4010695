"""The sweep's plots (stages/sweep.py): L0 against FVU with the Pareto frontier, description
length against width per k beside the naive bound, and the CE-loss score against L0."""

from __future__ import annotations

import math
from pathlib import Path


def plot(folder: Path, rows: list[dict], tolerance: float, chosen: str | None,
         names: tuple[str, str, str]) -> None:
    """`names` (L0–FVU, DL–width, CE–L0) in `folder`, from the sweep's table `rows`."""
    from saectl.plots import plt, save_figure  # matplotlib, only when a sweep completes

    l0_fvu, dl_width, ce_l0 = (folder / name for name in names)
    # L0 against FVU with the Pareto frontier (lower-left is better on both).
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arch in sorted({r["arch"] for r in rows}):
        pts = [r for r in rows if r["arch"] == arch]
        ax.scatter([r["l0"] for r in pts], [r["fvu"] for r in pts], label=arch)
    front, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r["l0"], r["fvu"])):
        if r["fvu"] < best:
            front.append(r)
            best = r["fvu"]
    ax.plot([r["l0"] for r in front], [r["fvu"] for r in front], "k--", lw=1, label="Pareto frontier")
    ax.set(xscale="log", xlabel="L0 (active latents per token)", ylabel="FVU", title="Sparsity vs reconstruction")
    ax.legend()
    save_figure(fig, l0_fvu)

    # DL against width at the tolerance, with the naive bound beside it.
    fig, ax = plt.subplots(figsize=(6, 4.2))
    groups = {}
    for r in rows:
        groups.setdefault((r["arch"], r["k"]), []).append(r)
    for (arch, k), pts in sorted(groups.items()):
        pts = sorted((r for r in pts if r["dl"] is not None), key=lambda r: r["width"])
        if not pts:
            continue
        line, = ax.plot([r["width"] for r in pts], [r["dl"] for r in pts], "o-", label=f"{arch} k={k} DL")
        ax.plot([r["width"] for r in pts], [r["naive_bound"] for r in pts], ":", color=line.get_color(),
                label=f"{arch} k={k} naive bound")
    for r in rows:
        if r["point"] == chosen:
            ax.scatter([r["width"]], [r["dl"]], s=160, facecolors="none", edgecolors="red", label="chosen")
    ax.set(xscale="log", xlabel="width (latents)", ylabel="bits per token",
           title=f"Description length at FVU ≤ {tolerance}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no SAE reconstructs within FVU ≤ {tolerance}", ha="center",
                transform=ax.transAxes)
    save_figure(fig, dl_width)

    # CE-loss score against L0, where the downstream evaluation ran.
    scored = [r for r in rows if r["ce_loss_score"] is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for arch in sorted({r["arch"] for r in scored}):
            pts = [r for r in scored if r["arch"] == arch]
            ax.scatter([r["l0"] for r in pts], [r["ce_loss_score"] for r in pts], label=arch)
        ax.set(xscale="log", xlabel="L0", ylabel="CE-loss score", title="Downstream fidelity")
        ax.legend()
        save_figure(fig, ce_l0)
