"""`make bench`: run every benchmark, print one table, write benchmarks/results.json.

BENCH_ONLY=harvest,codecs runs a subset. Run it in .bench-venv (`make bench` builds it): the
train benchmark's baselines, SAELens and sparsify, are installed there and only there.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import machine  # noqa: E402

SUITES = ["harvest", "codecs", "train", "sweep", "interpret"]


def main() -> int:
    only = [s for s in os.environ.get("BENCH_ONLY", "").split(",") if s]
    rows, errors = [], {}
    for name in SUITES:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            mod = importlib.import_module(f"benchmarks.bench_{name}")
            rows.extend(r.as_dict() | {"suite": name} for r in mod.run())
        except Exception as e:  # a failing benchmark is reported, the rest still run
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"bench: {name} failed: {errors[name]}", file=sys.stderr)
        print(f"bench: {name} took {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    table = Table(title="saectl benchmarks")
    for col in ("benchmark", "saectl", "baseline", "ratio", "goal", "met"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["benchmark"], f"{r['saectl']:,.3g}", f"{r['baseline']:,.3g}",
                      "" if r["ratio"] is None else f"{r['ratio']:.3f}", r["goal"],
                      {True: "yes", False: "NO", None: "-"}[r["met"]])
    Console().print(table)
    for r in rows:  # absolute figures and skip reasons, which the table has no room for
        if r["note"]:
            print(f"  {r['benchmark']}: {r['note']}")
    out = {"machine": machine(), "rows": rows, "errors": errors,
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = Path(os.environ.get("BENCH_OUT", Path(__file__).with_name("results.json")))
    path.write_text(json.dumps(out, indent=1))
    print(f"bench: wrote {path}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
