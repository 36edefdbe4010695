"""Sweep: train a grid of SAEs, tabulate them, plot the frontier, and choose one by minimum
description length (Ayonrinde, Pearce, Sharkey, "Interpretability as Compression").

Every grid point is an ordinary train artifact, so a point already trained is a cache hit and
a sweep run again trains only what is missing. Executors:
- `local`: in this process; points that read the same data share one reader (each batch is
  decoded once and given to every SAE), so N small SAEs cost far less than N runs;
- `processes --jobs N`: one `saectl train` subprocess per missing point, N at a time;
- `slurm`: one array task per missing point; completion is followed through the store (not
  sacct), `--no-wait` submits and exits, and a later run collects, resubmitting only failures.

With `--eval`, every point is also evaluated by `saectl eval`'s work (saectl.evaluation, in
this process, after training, with eval's defaults and the sweep's tolerance): the table gains
k-sparse probing accuracies and `report/probe_k.png` plots them against k. Each point's eval is
an ordinary eval artifact, so `saectl eval POINT_REF` afterwards is a cache hit.

The sweep artifact holds the table (also `report/table.csv`), the plots (`report/*.png`) and the
chosen point; the chosen point's train ref is the one line on stdout (`output`), and the table
is shown on stderr after every run or cache hit (`report`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass
from dataclasses import fields as dc_fields
from pathlib import Path

import yaml
from rich.table import Table

from saectl import evaluation, executors, layout, store, sweep_plots, threads
from saectl.config import build as build_config
from saectl.config import load_yaml, opt
from saectl.console import console, info
from saectl.errors import ConfigError, SaectlError
from saectl.fitting import Point, TrainStageConfig, open_shuffle, train_points
from saectl.fitting import plan as plan_point
from saectl.sbatch import SLURM_KEYS, SlurmOptions, merged_options
from saectl.stage import RUNNER_FIELDS, DeviceOptions, Plan, Stage

NAME = "sweep"
EXECUTORS = ("local", "processes", "slurm")
# Train flags a grid may not set: how a stage runs (set once for the sweep), the sweep's own
# input, and `model`, a path on this machine rather than a hyperparameter.
NOT_GRID = (*RUNNER_FIELDS, "shuffle", "model")
FIGURES = ("chosen", "tolerance")  # summary figures `saectl run` shows (and the chosen SAE's)
TABLE = "table.csv"  # in report/, beside the plots
PLOTS = ("l0_fvu.png", "dl_width.png", "ce_l0.png")
PROBE_PLOT = "probe_k.png"  # with --eval
SHARES = ("explained_variance_per_token", "worst_error_share")  # in points' summaries, if there
PROBE_SHOWN = ("1", "5")  # probing accuracies at these k on the terminal (all k in the CSV)
POINTS = "points"  # work/points/<digest>.yaml: each point's train config, for the executors


@dataclass(frozen=True)
class SweepConfig(DeviceOptions):
    shuffle: str | None = opt(None, "The shuffle artifact every point trains on")
    grid: str | None = opt(None, "YAML grid: train params as lists (a product) and/or `points:`")
    tolerance: float = opt(0.1, "FVU tolerance ε of the MDL choice (quantised reconstruction)")
    eval: bool = opt(False, "Also run `saectl eval` on every point (k-sparse probing in the "
                            "table and report/probe_k.png); the grid's `eval:` sets its flags")
    executor: str = opt("local", "local, processes or slurm", address=False)
    jobs: int = opt(2, "Concurrent processes (--executor processes; at most one per core "
                       "unless --threads is given)", address=False)
    autocast: str | None = opt(None, "bfloat16: train every point with bf16 products (a grid "
                                     "may set `autocast:` per point instead); in the points' "
                                     "addresses", address=False)
    log: str | None = opt(None, "Send every point's training curves to wandb or tensorboard "
                                "(one group)", address=False)
    log_strict: bool = opt(False, "Stop if the --log tracker cannot start", address=False)
    threads: int | None = opt(None, "Threads per process (--executor processes; default: the "
                                    "cores, or SLURM's --cpus-per-task, divided among --jobs), "
                                    "or of the one process (local)", address=False)
    no_wait: bool = opt(False, "slurm: submit and exit, run again to collect; any executor: "
                               "exit at once if another process is writing this sweep",
                        address=False)
    partition: str | None = opt(None, "sbatch --partition", address=False)
    time: str | None = opt(None, "sbatch --time, e.g. 02:00:00", address=False)
    gres: str | None = opt(None, "sbatch --gres, e.g. gpu:1", address=False)
    cpus_per_task: int | None = opt(None, "sbatch --cpus-per-task", address=False)
    mem: str | None = opt(None, "sbatch --mem, e.g. 16G", address=False)
    ntasks: int | None = opt(None, "slurm: ranks per point (sbatch --ntasks); above 1 each point "
                                   "trains data-parallel under srun", address=False)
    nodes: int | None = opt(None, "slurm: nodes per point (sbatch --nodes)", address=False)
    gpus_per_task: str | None = opt(None, "slurm: sbatch --gpus-per-task, e.g. 1 (a GPU per "
                                          "rank)", address=False)

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
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1")
        if self.threads is not None and self.executor == "slurm":
            raise ConfigError("--threads is for --executor processes or local; a SLURM task "
                              "uses its --cpus-per-task (give --cpus-per-task instead)")


@dataclass
class Grid:
    """What planning found, for build: the shuffle, every point, how to submit them."""

    src: store.Artifact
    manifest: dict
    harvest: store.Artifact
    values: list[dict]
    """Each point's train params as the grid gave them (the table shows those that vary)."""
    points: list[Point]
    """In grid order."""
    slurm: SlurmOptions | None
    """--executor slurm's options (flags over the grid's `slurm:`), checked while planning."""
    eval: dict | None = None
    """With --eval (or an `eval:` section): eval's flags from the grid; None: no eval."""


def grid_points(path: str, base: dict) -> tuple[list[dict], dict, dict | None]:
    """The grid file → (one dict of train params per point, slurm options from the YAML, eval
    flags from the YAML or None).

    Keys with list values form a product; scalar keys apply to every point; `points:` adds
    explicit points (each with the scalar keys under it)."""
    spec = load_yaml(path)
    slurm = spec.pop("slurm", {}) or {}
    eval_opts = spec.pop("eval", None)
    if eval_opts is not None and not isinstance(eval_opts, dict):
        raise ConfigError(f"{path}: `eval` must be a mapping of eval's flags, e.g. "
                          "{probe_texts: 50}")
    bad_eval = sorted(set(eval_opts or {}) & {*RUNNER_FIELDS, "sae", "tolerance"})
    if bad_eval:
        raise ConfigError(f"{path}: eval keys {', '.join(bad_eval)} come from the sweep itself "
                          "(its flags and points); leave them out of `eval:`")
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
    return [{**base, **fixed, **p} for p in points], slurm, eval_opts


def plan(cfg: SweepConfig) -> Plan:
    root = store.store_root(cfg.store)
    src, manifest, harvest = open_shuffle(root, cfg.shuffle)
    base = {"shuffle": src.ref, "store": str(root), "device": cfg.device}
    if cfg.autocast is not None:  # a default for every point; each point's address holds it
        base["autocast"] = cfg.autocast
    if cfg.log:  # every point's curves in one group of the tracker
        base.update(log=cfg.log, log_strict=cfg.log_strict,
                    log_group=f"sweep {Path(cfg.grid).stem} on {src.ref[:20]}")
    values, slurm_yaml, eval_opts = grid_points(cfg.grid, base)
    if cfg.eval and eval_opts is None:
        eval_opts = {}
    points = []
    for i, v in enumerate(values):
        tcfg = build_config(TrainStageConfig, v, f"{cfg.grid} point {i}")
        points.append(plan_point(root, src, manifest, tcfg))
    seen = {}
    for i, p in enumerate(points):
        if p.art.digest in seen:
            raise ConfigError(f"{cfg.grid}: points {seen[p.art.digest]} and {i} are the same SAE; "
                              "remove the duplicate")
        seen[p.art.digest] = i
    slurm = (merged_options({k: getattr(cfg, k) for k in SLURM_KEYS if k != "extra"}, slurm_yaml)
             if cfg.executor == "slurm" else None)
    ranks = (slurm.ntasks or slurm.nodes or 1) if slurm else 1
    for p in points:  # each point trains data-parallel over `ranks` (SLURM tasks)
        if p.cfg.batch_size % ranks:
            raise ConfigError(f"batch_size {p.cfg.batch_size} does not split over the {ranks} "
                              f"ranks of --ntasks; give a multiple of {ranks}")
    params = {"points": sorted(p.art.ref for p in points), "tolerance": cfg.tolerance}
    if eval_opts is not None:  # only then, so a sweep without --eval keeps its address
        params["eval"] = evaluation.settings(_eval_config(cfg, eval_opts, "-"))
    inputs = {"shuffle": src}
    return Plan(store.artifact_for(root, NAME, params, inputs), params, inputs,
                context=Grid(src, manifest, harvest, values, points, slurm, eval_opts))


def build(cfg: SweepConfig, plan: Plan, writer: store.Writing) -> None:
    """Train what is missing, then the description lengths, table, plots and choice."""
    grid: Grid = plan.context
    missing = [p for p in grid.points if not p.art.is_complete()]
    info(f"sweep: {len(grid.points)} points, {len(grid.points) - len(missing)} already trained, "
         f"{len(missing)} to train ({cfg.executor})")
    if missing and not _train(cfg, plan.art, grid, missing):
        return  # --no-wait: submitted; nothing chosen yet
    evals = None
    if grid.eval is not None:
        cfgs = [_eval_config(cfg, grid.eval, p.art.ref) for p in grid.points]
        with evaluation.shared_lm_eval(cfgs):  # one clean and one zero-ablated pass for all
            evals = [evaluation.evaluate(c) for c in cfgs]
    _finish(plan.art, grid, cfg.tolerance, evals)


def _eval_config(cfg: SweepConfig, opts: dict, ref: str) -> evaluation.EvalConfig:
    """eval's flags from the grid, with the sweep's store, device, tolerance and --no-wait."""
    return build_config(evaluation.EvalConfig,
                        {**opts, "sae": ref, "store": cfg.store, "device": cfg.device,
                         "no_wait": cfg.no_wait, "tolerance": cfg.tolerance},
                        f"{cfg.grid}: eval")


def _train(cfg: SweepConfig, art: store.Artifact, grid: Grid, missing: list[Point]) -> bool:
    """Train the missing points; False when they were submitted without waiting."""
    if cfg.executor == "local":
        with threads.count(cfg.threads):
            train_points(grid.src, grid.manifest, grid.harvest, missing)
        return True
    work = layout.work(art.path)
    tasks = []
    # processes: largest first; SLURM's array keeps the grid's order, which a later run
    # that follows the submitted job relies on
    for p in (_largest_first(missing) if cfg.executor == "processes" else missing):
        cfg_file = layout.work(art.path, POINTS, f"{p.art.digest[:12]}.yaml")
        values = {f.name: getattr(p.cfg, f.name) for f in dc_fields(TrainStageConfig)
                  if f.name != "shuffle"}
        store.atomic_write(cfg_file, yaml.safe_dump(values, sort_keys=True).encode())
        tasks.append(executors.Task(p.art.digest[:12],
                                    ["train", grid.src.ref, "--config", str(cfg_file)], p.art))
    if cfg.executor == "processes":
        out = executors.run_processes(tasks, cfg.jobs, work / executors.LOG_DIR,
                                      threads=cfg.threads)
    else:
        job, submitted = executors.submit_or_follow(tasks, grid.slurm, work)
        info(f"sweep: submitted {len(tasks)} array tasks as SLURM job {job}" if submitted
             else f"sweep: following SLURM job {job} submitted earlier")
        if cfg.no_wait:
            info("sweep: --no-wait: run the same command again to collect the results")
            return False
        out = executors.follow_slurm(tasks, job, work)
    if out.failed:
        lines = "; ".join(f"{t.name}: {why}" for t, why in out.failed)
        raise SaectlError(f"{len(out.failed)} of {len(tasks)} sweep points failed ({lines}); "
                          "run the sweep again to retry only those")
    return True


def _largest_first(points: list[Point]) -> list[Point]:
    """The points by their training's FLOPs (tokens × d_in × width), largest first (ties in
    grid order): with a few jobs at a time, the last to run are then the short ones, and a core
    waits less at the end for one long point (each job keeps the threads it started with)."""
    return sorted(points, key=lambda p: -p.steps * p.cfg.batch_size * p.sae_cfg.d_in
                  * p.sae_cfg.d_sae)


def _eval_batches(src: store.Artifact, hook: str, target: str | None = None):
    """The eval split's batches; a transcoder's are (input, target) pairs."""
    from saectl.reader import BatchReader, split_rows  # torch

    ev = split_rows(src.group(), hook, "eval", src.ref)
    ev_y = split_rows(src.group(), target, "eval", src.ref) if target else None
    return BatchReader(ev, min(8192, int(ev.shape[0])), 0, src.ref, ev_y).once


def _finish(art: store.Artifact, grid: Grid, tolerance: float,
            evals: list[store.Artifact] | None = None) -> None:
    """Description length of every point, the table, the plots, the choice."""
    from saectl import mdl  # torch
    from saectl.sae import load_sae  # torch

    rows, dls, probes = [], {}, {}
    values = grid.values
    shares = [k for k in SHARES if any(k in p.art.manifest()["summary"] for p in grid.points)]
    varying = sorted({k for v in values for k in v if len({json.dumps(w.get(k)) for w in values}) > 1})
    for i, (p, v) in enumerate(zip(grid.points, values)):
        s = p.art.manifest()["summary"]
        sae = load_sae(layout.sae_dir(p.art.path))
        dl = mdl.description_length(sae, _eval_batches(grid.src, p.hook, p.target), tolerance)
        name = f"p{i:02d}"
        dls[name] = dl
        rows.append({"point": name, **{k: v.get(k) for k in varying}, "arch": p.sae_cfg.arch,
                     "width": p.sae_cfg.d_sae, "k": p.sae_cfg.k, "ref": p.art.ref,
                     "mse": s["mse"], "fvu": s["fvu"], "l0": s["l0"],
                     **{k: s.get(k) for k in shares},
                     "dead_fraction": s["dead_fraction"], "ce_loss_score": s.get("ce_loss_score"),
                     "dl": dl.bits_per_token, "naive_bound": dl.naive_bound, "bins": dl.bins,
                     "quantised_fvu": dl.quantised_fvu})
        if evals is not None:
            rows[-1]["eval_ref"] = evals[i].ref
            probe = evals[i].manifest()["summary"].get("probing")
            if probe:
                probes[name] = probe
                rows[-1].update({f"probe_top_{k}": probe["sae_top_k"].get(str(k))
                                 for k in probe["k"]})
                rows[-1]["probe_model_full"] = probe["model_full"]
    chosen, message = mdl.choose(dls, tolerance)
    chosen_ref = next((r["ref"] for r in rows if r["point"] == chosen), None)
    buf = io.StringIO()
    columns = list(dict.fromkeys(c for r in rows for c in r))  # a point without probing lacks some
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    store.atomic_write(layout.report(art.path, TABLE), buf.getvalue().encode())
    sweep_plots.plot(layout.report(art.path), rows, tolerance, chosen, PLOTS)
    if probes:
        evaluation.probe_plot(layout.report(art.path, PROBE_PLOT), probes)
    store.mark_complete(art, {"table": rows, "columns": columns, "chosen": chosen,
                              "chosen_ref": chosen_ref,
                              "tolerance": tolerance, "message": message,
                              "by_bins": {k: dl.by_bins for k, dl in dls.items()}})


def output(art: store.Artifact) -> str | None:
    """What a complete sweep hands on and prints: the chosen SAE's ref (None when none met ε)."""
    return art.manifest()["summary"].get("chosen_ref")


def report(cfg: SweepConfig, art: store.Artifact) -> None:
    """The table on stderr; the one-line error when no SAE met ε (it says which came closest).
    Nothing while the sweep is incomplete (its points submitted with --no-wait)."""
    if not art.is_complete():
        return
    s = art.manifest()["summary"]
    table = Table(title=f"sweep {art.ref[:18]} (ε = {s['tolerance']})")
    shown = {"mse", "ref", "naive_bound", "quantised_fvu", "eval_ref", "probe_model_full"}
    cols = [c for c in s["columns"] if c not in shown and not (
        c.startswith("probe_top_") and c.removeprefix("probe_top_") not in PROBE_SHOWN)]
    names = {"dead_fraction": "dead", "ce_loss_score": "CE score", "dl": "DL bits/tok",
             "bins": "B", "explained_variance_per_token": "EV/token",
             "worst_error_share": "worst 0.1% err",
             **{f"probe_top_{k}": f"probe@{k}" for k in PROBE_SHOWN}}
    for c in cols:
        table.add_column(names.get(c, c), justify="right", no_wrap=True)
    for r in s["table"]:
        style = "bold green" if r["point"] == s["chosen"] else None
        table.add_row(*[_fmt(r.get(c)) for c in cols], style=style)
    console.print(table)
    info(f"sweep: {s['message']}; table and plots in {layout.report(art.path)}")
    if s["chosen_ref"] is None:
        raise SaectlError(f"{s['message']} (sweep {art.ref[:18]}; raise --tolerance)")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


STAGE = Stage(NAME, SweepConfig,
              "Train a grid of SAEs, tabulate and plot them, and choose one by description length.",
              plan, build, ("shuffle",), FIGURES, output=output, report=report)
