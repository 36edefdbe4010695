"""How `saectl run` shows a plan (`--dry-run`) and a finished run: text lines, a rich table,
and plain dicts for `--json`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rich.table import Table

from saectl import store
from saectl.console import short_ref

if TYPE_CHECKING:  # only for annotations: the runner imports this module
    from saectl.pipeline import Planned, Ran
    from saectl.pipeline_spec import Pipeline


def plan_lines(p: Pipeline, rows: list[Planned]) -> list[str]:
    notes = {"cached": "cached", "run": "will run", "resume": "will resume (incomplete)"}
    out = [f"{'step':<14} {'stage':<10} {'status':<28} artifact"]
    for r in rows:
        status = notes.get(r.status) or f"unknown until {r.status.split()[-1]} runs"
        art = short_ref(r.artifact)
        if r.output and r.output != r.artifact:
            art += f" → {short_ref(r.output)}"
        out.append(f"{r.step:<14} {r.stage:<10} {status:<28} {art}")
    return out


def duration(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_table(p: Pipeline, results: list[Ran]):
    """A rich table: step, ref, cached or ran, wall time, key figures."""
    t = Table(title=f"pipeline {p.name} ({p.path})")
    for col, just in (("step", "left"), ("ref", "left"), ("status", "left"), ("time", "right"),
                      ("figures", "left")):
        t.add_column(col, justify=just)
    for r in results:
        figs = ", ".join(f"{k} {_fmt(v)}" for k, v in r.figures.items())
        if r.artifact:
            figs = f"{short_ref(r.artifact)}: {figs}"
        t.add_row(r.step, short_ref(r.output or r.artifact), r.status, duration(r.seconds), figs,
                  style="dim" if r.status == "cached" else None)
    return t


def report_lines(p: Pipeline, results: list[Ran]) -> list[str]:
    lines = [f"{r.step}: {path}" for r in results for path in r.reports]
    done = [r for r in results if r.status in ("cached", "ran")]
    if done:
        lines.append(f"refs: {store.REFS}/{p.name}/<step> (saectl show "
                     f"{store.REFS}/{p.ref_name(done[-1].step)})")
    return lines


def as_dicts(rows) -> list[dict]:
    return [dataclasses.asdict(r) for r in rows]
