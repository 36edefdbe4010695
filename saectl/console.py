"""Everything saectl says goes to stderr; stdout carries only a stage's one-line reference.

On a terminal progress is a rich bar; elsewhere (a SLURM log, a pipe) it is a plain line every
`PLAIN_EVERY` seconds, so logs stay readable and small.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

# Off a terminal (a SLURM log, a pipe) rich would wrap tables at 80 columns; logs can be wide.
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
PLAIN_EVERY = 10.0


def info(msg: str) -> None:
    console.print(msg, markup=False, soft_wrap=True)


def short_ref(ref: str | None) -> str:
    """`stage/` and the first 12 digits of the digest, as `saectl ls` and `saectl run` show refs."""
    return "-" if not ref else ref[:len(ref.split("/")[0]) + 13]


def is_tty() -> bool:
    return sys.stderr.isatty()


class _Plain:
    """Periodic plain-text progress lines."""

    def __init__(self, desc: str, total: int, unit: str, done: int):
        self.desc, self.total, self.unit = desc, total, unit
        self.done = self.start_done = done
        self.t0 = self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY or self.done >= self.total:
            self.last = now
            rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            pct = 100.0 * self.done / max(self.total, 1)
            shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
            info(f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%), "
                 f"{shown} {self.unit}/s, eta {eta:,.0f}s")


class _Bar:
    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)


@contextmanager
def progress(desc: str, total: int, unit: str = "tokens", done: int = 0):
    """Yields an object with `.advance(n)`."""
    if not is_tty():
        yield _Plain(desc, total, unit, done)
        return
    cols = (TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,} " + unit), TimeRemainingColumn())
    with Progress(*cols, console=console, transient=False) as p:
        yield _Bar(p, p.add_task(desc, total=total, completed=done))
