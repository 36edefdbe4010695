"""The shuffle's spill: a hook's raw rows, in harvest order, uncompressed on the scratch disk,
written by the outliers' norms read so the scatter pass reads them back instead of decoding
the harvest a second time, and what the scatter's statistics need of them (issue 22).

Out of core, the shuffle must read a hook twice: the outliers have to be known before any
row has its place, and only a full read finds them. Decoding (Zarr's zstd) is most of a
read's CPU; reading raw bytes back is a fraction of it. The spill is cut into segments of a
fixed number of rows (from the harvest's chunks, never from --memory, so a resumed run with
another --memory finds the same files), and each segment is removed once the scatter pass has
saved its progress past it: the scratch disk holds about one copy of the data, not two.

A spill is only trusted where it is whole: the scatter reads it when every segment from its
starting row to the end is there at full length, and otherwise decodes the harvest as
before (a run that began without a spill, or one whose spill was cut short).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNKS_PER_SEGMENT = 64  # ~150 MB at SmolLM2's width in float16: few files, freed often


class Spill:
    """Segments `<first row>.bin` of one hook's raw rows under `folder`."""

    def __init__(self, folder: Path, n_rows: int, d: int, dtype, chunk: int):
        self.folder, self.n, self.d = folder, n_rows, d
        self.dtype = np.dtype(dtype)
        self.row_bytes = d * self.dtype.itemsize
        self.seg = chunk * CHUNKS_PER_SEGMENT
        self.freed = 0  # segments released so far

    def _path(self, s: int) -> Path:
        return self.folder / f"{s * self.seg}.bin"

    def _rows_in(self, s: int) -> int:
        return min(self.seg, self.n - s * self.seg)

    def truncate(self, done: int) -> None:
        """Back to rows [0, done): what the norms read's saved progress says was written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for s in range(done // self.seg, -(-self.n // self.seg)):
            p = self._path(s)
            keep = max(0, done - s * self.seg) * self.row_bytes
            if keep == 0:
                p.unlink(missing_ok=True)
            elif p.exists():
                with open(p, "r+b") as fh:
                    fh.truncate(keep)

    def append(self, lo: int, raw: np.ndarray) -> None:
        """Rows [lo, lo + len(raw)), written after every row before lo."""
        at = 0
        while at < len(raw):
            s = (lo + at) // self.seg
            take = min(len(raw) - at, (s + 1) * self.seg - (lo + at))
            with open(self._path(s), "ab") as fh:
                fh.write(np.ascontiguousarray(raw[at:at + take]).view(np.uint8))
            at += take

    def covers(self, start: int) -> bool:
        """Every row from `start` to the end is in the spill."""
        for s in range(start // self.seg, -(-self.n // self.seg)):
            p = self._path(s)
            if not p.exists() or p.stat().st_size != self._rows_in(s) * self.row_bytes:
                return False
        return True

    def _read(self, lo: int, hi: int) -> np.ndarray:
        out = np.empty((hi - lo, self.d), self.dtype)
        at = lo
        while at < hi:
            s = at // self.seg
            take = min(hi, (s + 1) * self.seg) - at
            off = (at - s * self.seg) * self.row_bytes
            out[at - lo:at - lo + take] = np.fromfile(
                self._path(s), self.dtype, take * self.d, offset=off).reshape(take, self.d)
            at += take
        return out

    def read_ahead(self, start: int, step: int):
        """(lo, hi, rows) from `start` on, as arrays.read_ahead yields them from Zarr."""
        with ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(self._read, start, min(start + step, self.n)) \
                if start < self.n else None
            for lo in range(start, self.n, step):
                raw = nxt.result()
                if lo + step < self.n:
                    nxt = pool.submit(self._read, lo + step, min(lo + 2 * step, self.n))
                yield lo, min(lo + step, self.n), raw

    def release(self, below: int) -> None:
        """Remove the segments wholly before row `below` (the scatter's saved progress)."""
        for s in range(self.freed, below // self.seg):
            self._path(s).unlink(missing_ok=True)
        self.freed = max(self.freed, below // self.seg)


class Analysis:
    """Each row's ‖x‖² (float64) and each source chunk's Σx over its train rows (float64, the
    split before outliers), as `shuffle_memory.Held` holds them, written by the outliers' read
    beside the spill: the scatter's statistics then widen and sum again only the chunks that
    hold a left-out row. `analyse(raw_chunk, lo) -> (sq, sum)` computes one chunk's."""

    def __init__(self, folder: Path, n_rows: int, d: int, chunk: int, analyse):
        self.sq_path, self.sums_path = folder / "sq.f64", folder / "sums.f64"
        self.n, self.d, self.chunk, self.analyse = n_rows, d, chunk, analyse

    def truncate(self, done: int) -> None:
        """Back to rows [0, done) (a whole number of chunks, or every row)."""
        self.sq_path.parent.mkdir(parents=True, exist_ok=True)
        for path, size in ((self.sq_path, done * 8),
                           (self.sums_path, -(-done // self.chunk) * self.d * 8)):
            with open(path, "ab") as fh:
                fh.truncate(size)

    def add(self, lo: int, raw: np.ndarray) -> np.ndarray:
        """Analyse rows [lo, lo + len(raw)) (lo at a chunk's start), append what it found, and
        return their norms as outliers.norms_of does."""
        parts = [self.analyse(raw[c:c + self.chunk], lo + c)
                 for c in range(0, len(raw), self.chunk)]
        sq = np.concatenate([p[0] for p in parts])
        with open(self.sq_path, "ab") as fh:
            fh.write(sq.tobytes())
        with open(self.sums_path, "ab") as fh:
            fh.write(np.stack([p[1] for p in parts]).tobytes())
        return np.sqrt(sq).astype("<f4")

    def whole(self) -> bool:
        return (self.sq_path.exists() and self.sums_path.exists()
                and self.sq_path.stat().st_size == self.n * 8
                and self.sums_path.stat().st_size == -(-self.n // self.chunk) * self.d * 8)

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(‖x‖² of rows [lo, hi), Σx of the chunks they start)."""
        c0, c1 = lo // self.chunk, -(-hi // self.chunk)
        return (np.fromfile(self.sq_path, np.float64, hi - lo, offset=8 * lo),
                np.fromfile(self.sums_path, np.float64, (c1 - c0) * self.d,
                            offset=8 * c0 * self.d).reshape(-1, self.d))


@dataclass
class HookSpill:
    """What the outliers' read of one hook leaves for the scatter: always the statistics, and
    the raw rows when the scratch disk has room for them (else None)."""

    analysis: Analysis
    rows: Spill | None = None
