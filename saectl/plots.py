"""Figures: matplotlib set up once (Agg, no screen needed) and one atomic `save_figure`, so a
plot is either whole on disk or absent, never half-written by a killed run.

matplotlib is imported when this module is (a stage imports it only where it draws; it costs
~0.3 s, which `saectl --help` and the cache-hit path should not pay)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from saectl.store import atomic_write

DPI = 110


def save_figure(fig, path: Path, dpi: int = DPI) -> Path:
    """Lay out, render to PNG in memory, write atomically, close the figure."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
    return path


__all__ = ["DPI", "plt", "save_figure"]
