"""`make bench`: run every benchmark, print one table, write benchmarks/results.json.

BENCH_ONLY=harvest,codecs runs a subset. Run it in .bench-venv (`make bench` builds it): the
train benchmark's baselines, SAELens and sparsify, are installed there and only there. Every
goal of issue 8's table has a row with its goal and a verdict (GOALS below); a goal without one
is reported and fails the run, as a benchmark that errors does. The scaling suite also draws
benchmarks/scaling.png (copied to docs/ for README).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import statistics
import sys
import threading
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


def judge_load(rows: list[dict], use: dict) -> list[dict]:
    """Record the machine's load beside each figure of a suite (`use`: what `machine_use`
    measured while the suite ran); where others' work took CPU the suite needed, it was in the
    timings, so no goal is called met or missed: the verdict is "not measured: load"
    (BENCH_IGNORE_LOAD=1 judges anyway).

    Others' CPU use (the busy time of this process's cores, from /proc/stat, less the suite's
    own, its commands included; hypervisor steal counts as others') is what decides, not the
    load average: the suite's own waiting threads (readers, a sweep's parent) raise the load
    above the cores with no one else on the machine. A suite is contended when others used
    more than half a core while the cores were saturated (less than a quarter core idle):
    then some of the suite's demand waited (what the suite got, `own`, already shrank by it)."""
    cores, own, others = use["cores"], use["own"], use["others"]
    contended = others > 0.5 and cores - own - others < 0.25
    for r in rows:
        r["load"] = (f"load {use['load_mean']:.1f} mean, {use['load_max']:.1f} max on {cores} "
                     f"cores; CPU: the suite {own:.2f} cores, others {others:.2f}")
        if r["goal"] and contended and os.environ.get("BENCH_IGNORE_LOAD") != "1":
            r["met"], r["unmeasured"] = None, True
            r["note"] = (f"not measured: load (others used {others:.2f} cores beside the "
                         f"suite's {own:.2f}, of {cores}); " + r["note"])
    return rows


def _own_cpu() -> float:
    """CPU seconds of this process and its finished subprocesses (the real commands)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _busy_cpu(cpus: set[int]) -> float | None:
    """CPU seconds the cores `cpus` spent busy since boot (user, nice, system, irq, softirq,
    steal), from /proc/stat; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu") and ln[3].isdigit()]
    except OSError:
        return None
    ticks = sum(sum(int(v) for i, v in enumerate(ln[1:9]) if i not in (3, 4))  # idle, iowait
                for ln in lines if int(ln[0][3:]) in cpus)
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def machine_use(every: float = 5.0):
    """While the block runs: the 1-minute load average every `every` seconds, and the CPU the
    block used against what the machine's cores (this process's) were busy with. Yields a dict
    filled in at the end: cores, own and others (in cores, averaged over the block), load_mean
    and load_max."""
    cpus = os.sched_getaffinity(0)
    use: dict = {"cores": len(cpus)}
    loads, stop = [os.getloadavg()[0]], threading.Event()

    def sample():
        while not stop.wait(every):
            loads.append(os.getloadavg()[0])

    thread = threading.Thread(target=sample, daemon=True)
    own0, busy0, t0 = _own_cpu(), _busy_cpu(cpus), time.perf_counter()
    thread.start()
    try:
        yield use
    finally:
        stop.set()
        thread.join()
        loads.append(os.getloadavg()[0])
        wall = max(time.perf_counter() - t0, 1e-9)
        own, busy = (_own_cpu() - own0) / wall, _busy_cpu(cpus)
        # without /proc/stat: whatever of the mean load the suite's own use does not explain
        others = ((busy - busy0) / wall - own if busy is not None and busy0 is not None
                  else statistics.fmean(loads) - own)
        use.update(own=own, others=max(0.0, others), load_mean=statistics.fmean(loads),
                   load_max=max(loads))


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
            with machine_use() as use:
                got = [r.as_dict() | {"suite": name} for r in mod.run()]
            rows.extend(judge_load(got, use))
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
