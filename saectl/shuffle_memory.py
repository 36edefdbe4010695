"""The shuffle's in-memory path: a hook whose harvest fits --memory is read once and its rows
gathered straight into their places, with no scratch buckets (issue 22).

The out-of-core path (stages/shuffle.py) reads the harvest, writes every train row to a bucket
file on disk, reads the buckets back and writes the output: about twice a copy's I/O. When the
hook's raw values fit half of --memory (the share the shuffle gives its own buffers), this path
instead holds them, computes the inverse of the permutation (the harvest row of every output
row) and writes the output a block at a time, each block one gather. The arrays it writes are
the out-of-core path's bit for bit: the same permutation, split and rows, and the statistics
summed per source chunk in the same order with the same NumPy calls (tests/test_shuffle.py).

The work is spread over the cores by overlapping it: the next read (Zarr decodes on its own
threads) runs while this block is analysed, the train statistics are summed on a thread while
the blocks are gathered and encoded, and the next block is gathered while this one is written.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from zarr.core.buffer import cpu

from saectl import arrays, outliers
from saectl.console import progress

PER_ROW = 80  # bytes a row beyond its values: norms², split masks and indices, the inverse


WORKERS = max(1, min(8, len(os.sched_getaffinity(0))))


@dataclass
class Held:
    """One hook's harvest in memory: its raw values, every row's ‖x‖² (float64), and each
    source chunk's Σx (float64) over its train rows as the split was before outliers were
    left out (still right for every chunk that holds none of them)."""

    raw: np.ndarray
    sq: np.ndarray
    sums: np.ndarray


def need(src_arr, step: int) -> int:
    """Bytes this path holds for one hook: the values, PER_ROW a row, and the blocks of `step`
    rows in flight (a read and the next, a gather and the next, Zarr's copies of a write: six)
    with a source chunk widened to float32 on each worker."""
    n, d = src_arr.shape
    item = src_arr.dtype.itemsize
    return n * (d * item + PER_ROW) + 6 * step * d * item + 2 * WORKERS * src_arr.chunks[0] * d * 4


def _read_into(src_arr, out: np.ndarray, lo: int, src_ref: str) -> None:
    """src_arr[lo:lo+len(out)] decoded straight into `out` (no copy); a damaged chunk is
    reported by name as arrays.read does."""
    try:
        src_arr.get_basic_selection(slice(lo, lo + len(out)),
                                    out=cpu.NDBuffer.from_numpy_array(out))
    except Exception:  # noqa: BLE001 -- arrays.read names the damaged chunk
        out[:] = arrays.read(src_arr, slice(lo, lo + len(out)), artifact=src_ref, raw=True)


def load(src_arr, step: int, src_ref: str, hook: str, split) -> Held:
    """Read the whole array, a block of `step` rows at a time, while the workers analyse the
    blocks already read, one source chunk each: widen to float32, each row's ‖x‖² as
    outliers.norms_of and the out-of-core statistics compute it (float64 einsum), and Σx of
    the chunk's train rows (`split` before outliers)."""
    n, d = src_arr.shape
    storage = src_arr.attrs.get("dtype", str(src_arr.dtype))
    chunk = src_arr.chunks[0]
    held = Held(np.empty((n, d), src_arr.dtype), np.empty(n, np.float64),
                np.zeros((-(-n // chunk), d)))

    def analyse(lo: int) -> None:
        held.sq[lo:lo + chunk], held.sums[lo // chunk] = analyse_chunk(
            held.raw[lo:lo + chunk], lo, split, storage)

    with ThreadPoolExecutor(WORKERS) as pool, \
            progress(f"shuffle {hook}: read", n, "rows") as bar:
        jobs = []
        for lo in range(0, n, step):
            _read_into(src_arr, held.raw[lo:lo + step], lo, src_ref)
            jobs += [pool.submit(analyse, c) for c in range(lo, min(lo + step, n), chunk)]
            bar.advance(min(step, n - lo))
        for j in jobs:
            j.result()
    return held


def analyse_chunk(raw: np.ndarray, lo: int, split, storage: str) -> tuple:
    """(each row's ‖x‖² in float64, Σx of the train rows in float64) of one source chunk
    starting at row `lo`, `split` as it was before outliers were left out."""
    x = arrays.from_storage(raw, storage)
    mask, _ = split.index(np.arange(lo, lo + len(x)), want_eval=False)
    return np.einsum("ij,ij->i", x, x, dtype=np.float64), x[mask].sum(0, dtype=np.float64)


def norms(held: Held) -> np.ndarray:
    """outliers.norms_of of every row, from the held ‖x‖²."""
    return np.sqrt(held.sq).astype("<f4")


def train_stats(held: Held, split, storage: str, chunk: int, shares) -> dict:
    """The out-of-core pass 1's statistics of the train rows, summed per source chunk in order:
    Σx (float64; a chunk's held sum unless it holds a left-out row), Σ‖x‖ and Σ‖x‖²; and the
    outliers' variance shares if `shares`."""
    n, d = held.raw.shape
    acc_sum, norm_sum, sq_sum = np.zeros(d), 0.0, 0.0
    redo = set((split.excluded // chunk).tolist())
    for lo in range(0, n, chunk):
        idx = np.arange(lo, min(lo + chunk, n))
        mask, _ = split.index(idx, want_eval=False)
        block = held.raw[lo:lo + chunk]
        if lo // chunk in redo:
            acc_sum += arrays.from_storage(block[mask], storage).sum(0, dtype=np.float64)
        else:
            acc_sum += held.sums[lo // chunk]
        sq = held.sq[lo:lo + chunk][mask]
        norm_sum += float(np.sqrt(sq).sum())
        sq_sum += float(sq.sum())
        if shares:
            emask, _ = split.index(idx, want_eval=True)
            shares.add_chunk(block, idx, emask, split, storage)
    return {"sum": acc_sum.tolist(), "norm_sum": norm_sum, "sq_sum": sq_sum,
            **({"shares": shares.state()} if shares else {})}


def inverse(split, perm, n_train: int) -> np.ndarray:
    """The harvest row of every output row: train row t goes to perm(t), so out[perm(t)] is
    harvest row split.rows(train)[t]. The permutation is evaluated a block at a time."""
    rows = split.rows(want_eval=False)
    inv = np.empty(n_train, np.int64)
    block = 1 << 18
    for lo in range(0, n_train, block):
        t = np.arange(lo, min(lo + block, n_train))
        inv[perm(t)] = rows[lo:lo + len(t)]
    return inv


def write_gathered(dst, raw: np.ndarray, rows: np.ndarray, step: int, what: str) -> None:
    """dst[i] = raw[rows[i]] for every i, `step` rows a write (whole output chunks), the next
    block gathered on a thread while Zarr encodes this one."""
    n = len(rows)
    step = max(dst.chunks[0], step // dst.chunks[0] * dst.chunks[0])

    def gather(lo):
        return np.take(raw, rows[lo:lo + step], axis=0)

    with ThreadPoolExecutor(1) as pool, progress(what, n, "rows") as bar:
        nxt = pool.submit(gather, 0) if n else None
        for lo in range(0, n, step):
            block = nxt.result()
            if lo + step < n:
                nxt = pool.submit(gather, lo + step)
            dst[lo:lo + len(block)] = block
            bar.advance(len(block))


def shuffle_hook(held: Held, dst, dst_eval, rows_arr, split, perm, n_train: int, storage: str,
                 chunk: int, step: int, shares, hook: str) -> dict:
    """Write train, eval (and rows/train when `rows_arr`) from the held hook; the train
    statistics are summed on a thread meanwhile. Returns them as pass 1's state holds them."""
    with ThreadPoolExecutor(1) as pool:
        stats = pool.submit(train_stats, held, split, storage, chunk, shares)
        write_gathered(dst_eval, held.raw, split.rows(want_eval=True), step,
                       f"shuffle {hook}: eval")
        inv = inverse(split, perm, n_train)
        if rows_arr is not None:
            for lo in range(0, n_train, 1 << 20):
                rows_arr[lo:lo + (1 << 20)] = inv[lo:lo + (1 << 20)]
        write_gathered(dst, held.raw, inv, step, f"shuffle {hook}: place")
        return stats.result()


def give_norms(art, hook: str, held: Held) -> None:
    """Hand the held norms to the outliers' measurement, so it does not read the hook again."""
    outliers.write_norms(art, hook, norms(held))
