"""`make bench`: run every benchmark, print one table, write benchmarks/results.json.

BENCH_ONLY=harvest,codecs runs a subset. Run it in .bench-venv (`make bench` builds it): the
train benchmark's baselines, SAELens and sparsify, are installed there and only there. Every
goal of issue 8's table has a row with its goal and a verdict (GOALS below); a goal without one
is reported and fails the run, as a benchmark that errors does. The scaling suite also draws
benchmarks/scaling.png (copied to docs/ for README).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from benchmarks.common import load_average, machine

SUITES = ["harvest", "codecs", "shuffle", "train", "bf16", "transcoder", "clt", "ddp", "gpu",
          "sweep", "interpret", "scaling", "groundtruth", "probing", "import_sae",
          "dashboard"]

# Issue 8's table of goals: (suite, what, words that the names of the rows answering it hold).
# After a run, each goal of a suite that ran must have at least one row with a goal and a
# met/not verdict; one without is reported as missing (and fails the run).
GOALS = [
    ("harvest", "harvest tokens/s >= 0.95x the bare HF forward", ("harvest tokens/s (SmolLM2",)),
    ("harvest", "harvest bf16 autocast vs fp32: speed-up", ("harvest tokens/s with --autocast",)),
    ("harvest", "harvest bf16 autocast vs fp32: max relative error",
     ("harvest bf16 autocast: max relative",)),
    ("harvest", "bytes on disk per activation value <= 2", ("harvest bytes per activation",)),
    ("shuffle", "shuffle throughput >= 0.5x a sequential copy", ("shuffle MB/s",)),
    ("shuffle", "shuffle peak memory <= --memory", ("shuffle peak RSS growth",)),
    ("train", "train TopK tokens/s >= 1.5x sparsify", ("topk train tokens/s", "vs sparsify")),
    ("train", "train TopK tokens/s >= 4x SAELens", ("topk train tokens/s", "vs saelens")),
    ("train", "train peak memory <= 1x a dense loop", ("topk train peak RSS growth",)),
    ("sweep", "local sweep of 8 SAEs <= 0.75x 8 train runs", ("local sweep of 8",)),
    ("sweep", "processes executor --jobs 2 <= 0.7x point by point", ("processes executor",)),
    ("interpret", "interpret scan tokens/s >= 0.9x encode alone", ("interpret scan tokens/s",)),
    ("scaling", "harvest time and disk linear in tokens", ("scaling: harvest",)),
    ("scaling", "shuffle peak memory flat at the budget", ("scaling: shuffle",)),
    ("scaling", "train time and memory against width and k", ("scaling: train",)),
    # Issue 16: feature recovery on SAELens's synthetic ground truth, each tool at its best LR.
    *[("groundtruth", f"{arch} recovers features >= SAELens's (F1)",
       (f"ground truth F1 {arch} ",)) for arch in ("topk", "batchtopk", "matryoshka")],
    # Issue 18: TopK transcoders (with and without the skip connection) against sparsify's.
    ("transcoder", "transcoder train tokens/s >= 1.5x sparsify",
     ("transcoder train tokens/s", "vs sparsify")),
    ("clt", "CLT step time against width and layers (<= (L+1)/2x L per-layer transcoders)",
     ("CLT step",)),
    # Issue 23: training in bfloat16 (benchmarks/bench_bf16.py).
    ("bf16", "bf16 train tokens/s >= 1.6x saectl fp32", ("bf16 train tokens/s", "vs saectl fp32")),
    ("bf16", "bf16 train tokens/s >= 4x sparsify", ("bf16 train tokens/s", "vs sparsify")),
    ("bf16", "bf16 quality on planted features: FVU within 1% of fp32",
     ("bf16 train quality on planted", "FVU")),
    ("bf16", "bf16 quality on SmolLM2: FVU within 1% of fp32",
     ("bf16 train quality on SmolLM2", "FVU")),
]


def judge_load(rows: list[dict], before: float, after: float, own: float = 0.5) -> list[dict]:
    """Record the suite's 1-minute load beside each figure; where it exceeded the cores during
    the measurement, others' work was in the timings, so no goal is called met or missed:
    the verdict is "not measured: load" (BENCH_IGNORE_LOAD=1 judges anyway). The load at the
    end holds the suite's own work, `own` cores on average (at least half a core): a suite
    that keeps both cores busy, as the sweep's two jobs do, ends near 2.5 with no one else on
    the machine."""
    cores = os.cpu_count() or 1
    load = max(before, after - max(0.5, own))
    for r in rows:
        r["load"] = f"{before:.1f} -> {after:.1f} on {cores} cores"
        if r["goal"] and load > cores and not os.environ.get("BENCH_IGNORE_LOAD"):
            r["met"], r["unmeasured"] = None, True
            r["note"] = f"not measured: load {load:.1f} > {cores} cores; " + r["note"]
    return rows


def _cpu() -> float:
    """CPU seconds of this process and its finished subprocesses (the real commands)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def goal_coverage(rows: list[dict], ran: list[str]) -> list[str]:
    """The issue's goals, for the suites that ran, that no row with a verdict answers (a row
    "not measured: load" answers it, without a verdict)."""
    return [what for suite, what, words in GOALS if suite in ran and not any(
        all(w in r["benchmark"] for w in words) and r["goal"]
        and (r["met"] is not None or r.get("unmeasured")) for r in rows)]


def main() -> int:
    only = [s for s in os.environ.get("BENCH_ONLY", "").split(",") if s]
    rows, errors = [], {}
    ran = [name for name in SUITES if not only or name in only]
    before = load_average()
    t_all = time.perf_counter()
    for name in ran:
        t0 = time.perf_counter()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            mod = importlib.import_module(f"benchmarks.bench_{name}")
            load_before, cpu_before, wall_before = os.getloadavg()[0], _cpu(), time.perf_counter()
            got = [r.as_dict() | {"suite": name} for r in mod.run()]
            own = (_cpu() - cpu_before) / (time.perf_counter() - wall_before)
            rows.extend(judge_load(got, load_before, os.getloadavg()[0], own))
        except Exception as e:  # noqa: BLE001 -- a failing benchmark is reported, the rest run
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"bench: {name} failed: {errors[name]}", file=sys.stderr)
        print(f"bench: {name} took {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    m = machine()
    m["load_average"] = f"{before} at start, {load_average()} at end"
    m["minutes"] = round((time.perf_counter() - t_all) / 60, 1)
    table = Table(title=f"saectl benchmarks: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
                        f"({m['torch_threads']} threads), GPU: {m['gpu'] or 'none'}; "
                        f"load {m['load_average']}")
    for col in ("benchmark", "saectl", "baseline", "ratio", "goal", "met"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["benchmark"], f"{r['saectl']:,.3g}", f"{r['baseline']:,.3g}",
                      "" if r["ratio"] is None else f"{r['ratio']:.3f}", r["goal"],
                      "load" if r.get("unmeasured") else {True: "yes", False: "NO", None: "-"}[r["met"]])
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    for r in rows:  # absolute figures and skip reasons, which the table has no room for
        if r["note"]:
            print(f"  {r['benchmark']}: {r['note']}")
    missing = goal_coverage(rows, [n for n in ran if n not in errors])
    for what in missing:
        print(f"  MISSING: no row answers the goal '{what}'")
    missed = [r["benchmark"] for r in rows if r["met"] is False]
    unmeasured = sum(bool(r.get("unmeasured")) for r in rows)
    print(f"goals: {sum(r['met'] is True for r in rows)} rows met, {len(missed)} missed, "
          f"{unmeasured} not measured (load)"
          + (f" ({'; '.join(missed)})" if missed else "") + f"; {m['minutes']} minutes")
    out = {"machine": m, "rows": rows, "errors": errors, "missing_goals": missing,
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = Path(os.environ.get("BENCH_OUT", Path(__file__).with_name("results.json")))
    path.write_text(json.dumps(out, indent=1))
    print(f"bench: wrote {path}", file=sys.stderr)
    return 1 if errors or missing else 0


if __name__ == "__main__":
    sys.exit(main())
