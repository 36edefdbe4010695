"""Eval: any trained SAE on any activations of its model and hook, with the core metrics, the
description length at a tolerance, and k-sparse probing.

The work is `saectl.evaluation` (the sweep's `--eval` runs it on every point); this module is
the stage: its registration and what a person sees on stderr after a run or a cache hit.
"""

from __future__ import annotations

from rich.table import Table

from saectl import evaluation, layout, store
from saectl.console import console, info
from saectl.evaluation import EvalConfig
from saectl.stage import Stage

NAME = evaluation.NAME
FIGURES = ("fvu", "explained_variance_per_token", "worst_error_share", "ce_loss_score", "dl")
SHOWN = (("mse", "MSE"), ("fvu", "FVU"), ("explained_variance", "explained variance"),
         ("explained_variance_per_token", "explained variance per token"),
         ("worst_error_share", "error share of the worst 0.1% tokens"),
         ("top_variance_share", "variance share of the top 0.1% tokens"),
         ("cossim", "cosine"), ("l2_ratio", "l2 ratio"),
         ("relative_reconstruction_bias", "relative reconstruction bias"), ("l0", "L0"),
         ("dead_fraction", "dead"), ("dense_fraction", "dense (>10%)"),
         ("ce_loss_score", "CE-loss score"), ("kl_score", "KL score"),
         ("delta_lm_loss", "ΔLM loss"), ("dl", "DL bits/token"), ("dl_bins", "DL bins"))


def report(cfg: EvalConfig, art: store.Artifact) -> None:
    s = art.manifest()["summary"]
    table = Table(title=f"eval {art.ref[:18]}: {s['sae'][:18]} on {s['data'][:18]} "
                        f"({s['n_tokens']:,} tokens)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, name in SHOWN:
        if s.get(key) is not None:
            table.add_row(name, _fmt(s[key]))
    console.print(table)
    p = s.get("probing")
    if not p:
        return
    probe = Table(title=f"k-sparse probing: {len(p['tasks'])} one-vs-rest tasks on "
                        f"{p['dataset']} {p['label_column']} ({p['n_train']} train, "
                        f"{p['n_test']} test texts)")
    for col in ("k", "top-k latents", "random k latents", "top-k model dims"):
        probe.add_column(col, justify="right")
    for k in map(str, p["k"]):  # the manifest's keys are sorted as strings; k is in order
        probe.add_row(k, _fmt(p["sae_top_k"].get(k)), _fmt(p["random_k"].get(k)),
                      _fmt(p["model_top_k"].get(k)))
    probe.add_row("all", _fmt(p["sae_full"]), "", _fmt(p["model_full"]))
    console.print(probe)
    info(f"eval: plot in {layout.report(art.path, layout.PROBE_K_PNG)}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


STAGE = Stage(NAME, EvalConfig,
              "Evaluate a trained SAE on a harvest, shuffle or import of its model and hook: "
              "core metrics, description length, k-sparse probing.",
              evaluation.plan, evaluation.build, ("sae",), FIGURES, report=report,
              prepare=evaluation.prepare)
