"""Sweep: train a grid of SAEs, tabulate them, plot the frontier, and choose one by minimum
description length (Ayonrinde, Pearce, Sharkey, "Interpretability as Compression").

Every grid point is an ordinary train artifact, so a point already trained is a cache hit and
a sweep run again trains only what is missing. Executors:
- `local`: in this process; points that read the same data share one reader (each batch is
  decoded once and given to every SAE), so N small SAEs cost far less than N runs;
- `processes --jobs N`: one `saectl train` subprocess per missing point, N at a time;
- `slurm`: one array task per missing point; completion is followed through the store (not
  sacct), `--no-wait` submits and exits, and a later run collects, resubmitting only failures.

The sweep artifact holds the table (also `report/table.csv`), the plots (`report/*.png`) and the
chosen point; the chosen point's train ref is the one line on stdout.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from dataclasses import dataclass, fields as dc_fields
from pathlib import Path

import yaml

from saectl import store
from saectl.config import build, load_yaml, opt
from saectl.console import console, info
from saectl.errors import ConfigError, SaectlError
from saectl.fitting import TrainStageConfig, open_shuffle, plan, train_points

NAME = "sweep"
EXECUTORS = ("local", "processes", "slurm")
# Train flags a grid may not set: they are the sweep's own (input, where, how).
NOT_GRID = ("shuffle", "store", "device", "no_wait", "model")
SLURM_KEYS = ("partition", "time", "gres", "cpus_per_task", "mem", "extra")
FIGURES = ("chosen", "tolerance")  # summary figures `saectl run` shows (and the chosen SAE's)


@dataclass(frozen=True)
class SweepConfig:
    shuffle: str | None = opt(None, "The shuffle artifact every point trains on")
    grid: str | None = opt(None, "YAML grid: train params as lists (a product) and/or `points:`")
    tolerance: float = opt(0.1, "FVU tolerance ε of the MDL choice (quantised reconstruction)")
    executor: str = opt("local", "local, processes or slurm", address=False)
    jobs: int = opt(2, "Concurrent processes (--executor processes)", address=False)
    no_wait: bool = opt(False, "slurm: submit and exit; run again to collect", address=False)
    partition: str | None = opt(None, "sbatch --partition", address=False)
    time: str | None = opt(None, "sbatch --time, e.g. 02:00:00", address=False)
    gres: str | None = opt(None, "sbatch --gres, e.g. gpu:1", address=False)
    cpus_per_task: int | None = opt(None, "sbatch --cpus-per-task", address=False)
    mem: str | None = opt(None, "sbatch --mem, e.g. 16G", address=False)
    device: str = opt("auto", "Device for training (auto, cpu, cuda)", address=False)
    store: str | None = opt(None, "Artifact store (default $SAECTL_STORE or ./artifacts)",
                            address=False)

    def __post_init__(self):
        if not self.shuffle:
            raise ConfigError("give the shuffle to sweep on: saectl sweep SHUFFLE_REF --grid grid.yaml")
        if not self.grid:
            raise ConfigError("give --grid grid.yaml (train params as lists, e.g. k: [8, 16, 32])")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"--tolerance must be in (0, 1), got {self.tolerance}")
        if self.jobs < 1:
            raise ConfigError("--jobs must be at least 1")


def grid_points(path: str, base: dict) -> tuple[list[dict], dict]:
    """The grid file → (one dict of train params per point, slurm options from the YAML).

    Keys with list values form a product; scalar keys apply to every point; `points:` adds
    explicit points (each with the scalar keys under it)."""
    spec = load_yaml(path)
    slurm = spec.pop("slurm", {}) or {}
    explicit = spec.pop("points", []) or []
    valid = sorted(f.name for f in dc_fields(TrainStageConfig) if f.name not in NOT_GRID)
    bad = sorted(set(spec) - set(valid)) + sorted(
        {k for p in explicit if isinstance(p, dict) for k in p} - set(valid))
    if bad:
        raise ConfigError(f"{path}: {', '.join(bad)} cannot be swept; valid keys are "
                          f"{', '.join(valid)}")
    if not isinstance(explicit, list) or not all(isinstance(p, dict) for p in explicit):
        raise ConfigError(f"{path}: `points` must be a list of mappings, e.g. - {{arch: topk, k: 8}}")
    bad_slurm = sorted(set(slurm) - set(SLURM_KEYS))
    if bad_slurm:
        raise ConfigError(f"{path}: slurm keys {', '.join(bad_slurm)} are unknown; valid: "
                          f"{', '.join(SLURM_KEYS)}")
    axes = {k: v for k, v in spec.items() if isinstance(v, list)}
    fixed = {k: v for k, v in spec.items() if not isinstance(v, list)}
    if any(len(v) == 0 for v in axes.values()):
        raise ConfigError(f"{path}: an axis is an empty list; give each at least one value")
    points = []
    if axes:
        keys = list(axes)
        points = [dict(zip(keys, combo)) for combo in itertools.product(*axes.values())]
    points += [dict(p) for p in explicit]
    if not points:
        raise ConfigError(f"{path}: the grid is empty; give lists (k: [8, 16]) or `points:`")
    return [{**base, **fixed, **p} for p in points], slurm


def _plan(cfg: SweepConfig):
    root = store.store_root(cfg.store)
    src, manifest, harvest = open_shuffle(root, cfg.shuffle)
    base = {"shuffle": src.ref, "store": str(root), "device": cfg.device}
    values, slurm_yaml = grid_points(cfg.grid, base)
    points = []
    for i, v in enumerate(values):
        tcfg = build(TrainStageConfig, v, f"{cfg.grid} point {i}")
        points.append(plan(root, src, manifest, tcfg))
    seen = {}
    for i, p in enumerate(points):
        if p.art.digest in seen:
            raise ConfigError(f"{cfg.grid}: points {seen[p.art.digest]} and {i} are the same SAE; "
                              "remove the duplicate")
        seen[p.art.digest] = i
    params = {"points": sorted(p.art.ref for p in points), "tolerance": cfg.tolerance}
    art = store.artifact_for(root, NAME, params, {"shuffle": src})
    return src, manifest, harvest, values, slurm_yaml, points, params, art


def address(cfg: SweepConfig) -> store.Artifact:
    """The sweep artifact `run(cfg)` makes or finds, computed without training or writing."""
    return _plan(cfg)[-1]


def output(art: store.Artifact) -> str | None:
    """What a complete sweep prints: the chosen SAE's ref (None when no SAE met ε)."""
    return art.manifest()["summary"].get("chosen_ref")


def run(cfg: SweepConfig) -> str:
    src, manifest, harvest, values, slurm_yaml, points, params, art = _plan(cfg)
    if art.is_complete():
        info(f"sweep: cache hit {art.ref}")
        return _report(art)
    with store.writing(art, params, {"shuffle": src}):
        if not art.is_complete():
            missing = [p for p in points if not p.art.is_complete()]
            info(f"sweep: {len(points)} points, {len(points) - len(missing)} already trained, "
                 f"{len(missing)} to train ({cfg.executor})")
            if missing and not _execute(cfg, art, src, manifest, harvest, missing, slurm_yaml):
                return ""  # --no-wait: submitted; nothing chosen yet
            _finish(art, src, points, values, cfg)
    return _report(art)


def _execute(cfg, art, src, manifest, harvest, missing, slurm_yaml) -> bool:
    """Train the missing points; False when they were submitted without waiting."""
    if cfg.executor == "local":
        train_points(src, manifest, harvest, missing)
        return True
    from saectl import executors

    work = art.path / "work"
    tasks = []
    for i, p in enumerate(missing):
        cfg_file = work / "points" / f"{p.art.digest[:12]}.yaml"
        cfg_file.parent.mkdir(parents=True, exist_ok=True)
        values = {f.name: getattr(p.cfg, f.name) for f in dc_fields(TrainStageConfig)
                  if f.name not in ("shuffle",)}
        cfg_file.write_text(yaml.safe_dump(values, sort_keys=True))
        tasks.append(executors.Task(p.art.digest[:12], ["train", src.ref, "--config", str(cfg_file)],
                                    p.art))
    if cfg.executor == "processes":
        out = executors.run_processes(tasks, cfg.jobs, work / "logs")
    else:
        opts = {k: getattr(cfg, k) for k in SLURM_KEYS if k != "extra"}
        opts = {k: v for k, v in {**slurm_yaml, **{k: v for k, v in opts.items() if v}}.items()}
        opts["extra"] = tuple(slurm_yaml.get("extra", ()) or ())
        job = _slurm_job(work)
        if job is None or not _job_alive(job):
            job = executors.submit_slurm(tasks, executors.SlurmOptions(**opts), work)
            (work / "slurm.json").write_text(json.dumps({"job": job}))
            info(f"sweep: submitted {len(tasks)} array tasks as SLURM job {job}")
        else:
            info(f"sweep: following SLURM job {job} submitted earlier")
        if cfg.no_wait:
            info("sweep: --no-wait: run the same command again to collect the results")
            return False
        out = executors.follow_slurm(tasks, job, work)
    if out.failed:
        lines = "; ".join(f"{t.name}: {why}" for t, why in out.failed)
        raise SaectlError(f"{len(out.failed)} of {len(tasks)} sweep points failed ({lines}); "
                          "run the sweep again to retry only those")
    return True


def _slurm_job(work: Path) -> str | None:
    f = work / "slurm.json"
    return json.loads(f.read_text())["job"] if f.exists() else None


def _job_alive(job: str) -> bool:
    import subprocess

    try:
        p = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and bool(p.stdout.strip())


def _eval_batches(src, hook):
    from saectl.reader import BatchReader

    ev = src.group()[f"eval/{hook}"]
    reader = BatchReader(ev, min(8192, int(ev.shape[0])), 0, src.ref)
    return reader.once


def _finish(art, src, points, values, cfg) -> None:
    """Description length of every point, the table, the plots, the choice."""
    from saectl import mdl
    from saectl.sae import load_sae

    rows, dls = [], {}
    varying = sorted({k for v in values for k in v if len({json.dumps(w.get(k)) for w in values}) > 1})
    for i, (p, v) in enumerate(zip(points, values)):
        s = p.art.manifest()["summary"]
        sae = load_sae(store.sae_dir(p.art))
        dl = mdl.description_length(sae, _eval_batches(src, p.hook), cfg.tolerance)
        name = f"p{i:02d}"
        dls[name] = dl
        rows.append({"point": name, **{k: v.get(k) for k in varying}, "arch": p.sae_cfg.arch,
                     "width": p.sae_cfg.d_sae, "k": p.sae_cfg.k, "ref": p.art.ref,
                     "mse": s["mse"], "fvu": s["fvu"], "l0": s["l0"],
                     "dead_fraction": s["dead_fraction"], "ce_loss_score": s.get("ce_loss_score"),
                     "dl": dl.bits_per_token, "naive_bound": dl.naive_bound, "bins": dl.bins,
                     "quantised_fvu": dl.quantised_fvu})
    chosen, message = mdl.choose(dls, cfg.tolerance)
    chosen_ref = next((r["ref"] for r in rows if r["point"] == chosen), None)
    report = art.report_dir
    report.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    store.atomic_write(report / "table.csv", buf.getvalue().encode())
    _plots(report, rows, dls, cfg.tolerance, chosen)
    store.mark_complete(art, {"table": rows, "columns": list(rows[0]), "chosen": chosen,
                              "chosen_ref": chosen_ref,
                              "tolerance": cfg.tolerance, "message": message,
                              "by_bins": {k: dl.by_bins for k, dl in dls.items()}})


def _report(art) -> str:
    """Print the table on stderr; return the chosen ref, or say which point came closest."""
    from rich.table import Table

    s = art.manifest()["summary"]
    rows = s["table"]
    table = Table(title=f"sweep {art.ref[:18]} (ε = {s['tolerance']})")
    shown = {"mse", "ref", "naive_bound", "quantised_fvu"}  # in the CSV; kept off the terminal
    cols = [c for c in s["columns"] if c not in shown]
    names = {"dead_fraction": "dead", "ce_loss_score": "CE score", "dl": "DL bits/tok",
             "bins": "B"}
    for c in cols:
        table.add_column(names.get(c, c), justify="right", no_wrap=True)
    for r in rows:
        style = "bold green" if r["point"] == s["chosen"] else None
        table.add_row(*[_fmt(r[c]) for c in cols], style=style)
    console.print(table)
    info(f"sweep: {s['message']}; table and plots in {art.report_dir}")
    if s["chosen_ref"] is None:
        raise SaectlError(f"{s['message']} (sweep {art.ref[:18]}; raise --tolerance)")
    return s["chosen_ref"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plots(report: Path, rows, dls, tolerance, chosen) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(report / name, dpi=110)
        plt.close(fig)

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
    save(fig, "l0_fvu.png")

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
    save(fig, "dl_width.png")

    # CE-loss score against L0, where the downstream evaluation ran.
    scored = [r for r in rows if r["ce_loss_score"] is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for arch in sorted({r["arch"] for r in scored}):
            pts = [r for r in scored if r["arch"] == arch]
            ax.scatter([r["l0"] for r in pts], [r["ce_loss_score"] for r in pts], label=arch)
        ax.set(xscale="log", xlabel="L0", ylabel="CE-loss score", title="Downstream fidelity")
        ax.legend()
        save(fig, "ce_l0.png")


# TRANSITIONAL (issue 14): the old run wrapped until this module defines plan and build.
from saectl import stage as _contract  # noqa: E402

STAGE = _contract.legacy('sweep', SweepConfig, run, 'Train a grid of SAEs, tabulate and plot them, and choose one by description length.',
                         ('shuffle',), address=address, output=output,
                         figures=FIGURES)
