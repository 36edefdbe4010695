"""What a person sees of a steer artifact (stages/steer.py): the texts side by side with the
effect figures in the terminal, and the strength sweep's figure. Both read only the summary
the stage stores in the manifest, so a cache hit shows the same as the run that wrote it."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from saectl.console import console


def is_sweep(summary: dict) -> bool:
    """Several runs through --strengths (the ones with a figure)."""
    return summary["runs"][0]["sweep"] is not None and len(summary["runs"]) > 1


def plot_sweep(summary: dict, path: Path) -> None:
    """Effect (mean feature activation on the generated text) against fluency (perplexity
    under the unmodified model), one line per feature through the strengths."""
    from saectl.plots import plt, save_figure  # deferred: matplotlib, only when drawing

    runs, base = summary["runs"], summary["baseline"]["mean"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    values = [r["sweep"] for r in runs]
    unit = "× max activation" if summary["units"] == "max_act" else "(raw)"
    for feat in summary["features"]:
        f = str(feat["feature"])
        acts = [r["mean"]["act"][f] for r in runs]
        ppl = [r["mean"]["ppl"] for r in runs]
        line, = ax1.plot(values, acts, "o-", label=f"feature {f}")
        ax1.axhline(base["act"][f], color=line.get_color(), ls=":", lw=1)
        ax2.plot(ppl, acts, "o-", color=line.get_color(), label=f"feature {f}")
        for v, x, y in zip(values, ppl, acts):
            ax2.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax2.scatter([base["ppl"]], [base["act"][f]], marker="*", s=120, color=line.get_color())
    ax1.set(xlabel=f"strength {unit}", ylabel="mean feature activation on generated text",
            title="Effect (dotted: baseline)")
    ax1b = ax1.twinx()
    ax1b.plot(values, [r["mean"]["ppl"] for r in runs], "k--", lw=1)
    ax1b.set(ylabel="perplexity under the unsteered model (dashed)")
    ax2.set(xlabel="perplexity under the unsteered model (fluency; ★ baseline)",
            ylabel="mean feature activation", title="Effect against fluency")
    ax1.legend(fontsize=7)
    fig.suptitle(f"{summary['mode']} at {summary['hook']} ({summary['sae'][:18]})", fontsize=9)
    save_figure(fig, path)


def _shown(s: str) -> Text:
    return Text(s.replace("\n", "⏎"))


def _texts(summary: dict) -> list[Table]:
    """One table of prompt, baseline, steered; or per prompt, a row per strength."""
    runs = summary["runs"]
    if len(runs) == 1:
        table = Table(show_lines=True)
        for col in ("prompt", "baseline", f"steered ({runs[0]['label']})"):
            table.add_column(col, ratio=1 if col == "prompt" else 2)
        for i, prompt in enumerate(summary["prompts"]):
            table.add_row(_shown(prompt), _shown(summary["baseline"]["texts"][i]),
                          _shown(runs[0]["texts"][i]))
        return [table]
    tables = []
    for i, prompt in enumerate(summary["prompts"]):
        table = Table(title=Text(prompt), show_lines=False, title_justify="left")
        table.add_column("strength", no_wrap=True, justify="right")
        table.add_column("continuation")
        table.add_row("baseline", _shown(summary["baseline"]["texts"][i]))
        for r in runs:
            table.add_row(f"{r['sweep']:g}", _shown(r["texts"][i]))
        tables.append(table)
    return tables


def _effects(summary: dict) -> Table:
    """Activation, Δlogp per feature, KL and perplexity of the baseline and every run."""
    base = summary["baseline"]["mean"]
    table = Table(title=f"effect, mean over {len(summary['prompts'])} prompt(s)",
                  title_justify="left")
    table.add_column("run", no_wrap=True)
    feats = [str(f["feature"]) for f in summary["features"]]
    for f in feats:
        table.add_column(f"act {f}", justify="right")
    for f in feats:
        table.add_column(f"Δlogp {f}", justify="right")
    table.add_column("KL", justify="right")
    table.add_column("ppl", justify="right")
    table.add_row("baseline", *[f"{base['act'][f]:.3g}" for f in feats], *["-" for _ in feats],
                  "-", f"{base['ppl']:.3g}")
    for r in summary["runs"]:
        m = r["mean"]
        table.add_row(r["label"] if r["sweep"] is None else f"{r['sweep']:g}",
                      *[f"{m['act'][f]:.3g}" for f in feats],
                      *[f"{m['dlogp'][f]:+.3g}" for f in feats], f"{m['kl']:.3g}",
                      f"{m['ppl']:.3g}")
    return table


def show(summary: dict, plot: Path) -> None:
    """Texts side by side and the figures: on stdout when it is a terminal (the ref follows),
    else on stderr, so `REF=$(saectl steer ...)` still gets one line. `plot`: where the sweep's
    figure is (named when there is one)."""
    out = Console(highlight=False) if sys.stdout.isatty() else console
    units = ("strengths in units of each feature's max activation "
             f"({summary['units_from'][:18]})" if summary["units"] == "max_act"
             else "strengths in raw activation units")
    out.print(Text(f"steer {summary['sae'][:18]} at {summary['hook']} of {summary['model']}: "
                   f"{summary['mode']}, positions {summary['positions']}, {units}"))
    base = summary["baseline"]["mean"]
    for feat in summary["features"]:
        f = str(feat["feature"])
        out.print(Text(f"feature {f}: logit lens {', '.join(map(repr, feat['logit_lens'][:6]))}; "
                       f"baseline activation mean {base['act'][f]:.3g}, max "
                       f"{base['act_max'][f]:.3g} (raw)"))
    for table in _texts(summary):
        out.print(table)
    out.print(_effects(summary))
    out.print(Text("act: the feature's mean activation on the generated tokens (unsteered model "
                   "re-reading the text); Δlogp: change in log-probability of its top logit-lens "
                   "tokens; KL: from the baseline's next-token distribution, nats/token; ppl: "
                   "perplexity of the text under the unsteered model"))
    if is_sweep(summary):
        out.print(Text(f"plot: {plot}"))
