"""The shuffle's out-of-core path (stages/shuffle.py): scatter every train row to the on-disk
bucket that holds its destination (pass 1), then place one bucket at a time and write the
output (pass 2), each within --memory, with its progress saved so a killed run resumes where
it stopped and ends bit-identical."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from saectl import arrays, faults, layout, outliers, shuffle_memory, store
from saectl.console import progress
from saectl.split import Split


def state_path(art, hook: str) -> Path:
    return layout.progress_file(art.path, f"shuffle-{hook}")


def load_state(art, hook: str) -> dict:
    p = state_path(art, hook)
    return json.loads(p.read_text()) if p.exists() else {}


def save_state(art, hook: str, state: dict) -> None:
    store.atomic_write(state_path(art, hook), json.dumps(state).encode())


def record(dtype: np.dtype, d: int) -> np.dtype:
    """One scratch record: where the row goes, where it came from, and the row itself."""
    return np.dtype([("dest", "<i8"), ("src", "<i8"), ("row", dtype, (d,))])


def place(art, hook: str, dst, rows_arr, scratch: Path, state: dict, n_buckets: int,
          bucket_rows: int, n_train: int, rec: np.dtype, chunk_rows: int) -> None:
    """Pass 2: each bucket's records placed at their destinations and written, the next
    bucket read on a thread and the last one encoded on another meanwhile; `rows_arr`, when
    given, gets each row's harvest row. A bucket is recorded done once written, so a killed
    run places only the rest."""
    d = rec["row"].shape[0]
    write_rows = rows_arr is not None
    done = set(state.get("buckets_done", []))
    todo = [b for b in range(n_buckets) if b not in done]

    def load(i):  # the next bucket is read on a thread while this one is placed
        return np.fromfile(scratch / f"{todo[i]}.bin", dtype=rec) if i < len(todo) else None

    def write(b, lo, hi, block, origin):  # on a thread, while the next bucket is placed
        for w in range(0, hi - lo, 4 * chunk_rows):
            dst[lo + w:lo + min(w + 4 * chunk_rows, hi - lo)] = block[w:w + 4 * chunk_rows]
        if origin is not None:
            rows_arr[lo:hi] = origin
        done.add(b)  # a bucket is done once written: then its progress, then its file
        state["buckets_done"] = sorted(done)
        save_state(art, hook, state)
        (scratch / f"{b}.bin").unlink(missing_ok=True)
        faults.point("shuffle.bucket_placed")

    with progress(f"shuffle {hook}: place", n_buckets, "buckets", done=len(done)) as bar, \
            ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer:
        nxt, writing = loader.submit(load, 0), None
        for i, b in enumerate(todo):
            records, nxt = nxt.result(), loader.submit(load, i + 1)
            lo, hi = b * bucket_rows, min((b + 1) * bucket_rows, n_train)
            if len(records) != hi - lo:
                raise store.ArtifactError(f"shuffle scratch of {art.ref} is inconsistent "
                                          f"(bucket {b}); remove the artifact and re-run")
            block = np.empty((hi - lo, d), dtype=rec["row"].base)
            block[records["dest"] - lo] = records["row"]
            origin = None
            if write_rows:
                origin = np.empty(hi - lo, np.int64)
                origin[records["dest"] - lo] = records["src"]
            del records
            if writing:  # one bucket in flight: its block, and this one's
                writing.result()
                bar.advance(1)
            writing = writer.submit(write, b, lo, hi, block, origin)
            del block, origin
        if writing:
            writing.result()
            bar.advance(1)


def scatter(art, src_arr, dst_eval, hook, split, perm, bucket_rows, n_buckets, scratch, state,
            budget, step, src_ref, spill=None) -> dict:
    """Send train rows to their buckets and copy eval rows in harvest order.

    Records wait in memory until a sixteenth of --memory is filled, then (on a thread, while
    the reads go on) every bucket file gets its share, eval gets its whole chunks (the rest
    waits in `eval-tail-<rows read>.bin`: a part-chunk write would re-encode its chunk every
    read) and the progress (rows read, bucket lengths, eval rows written) is saved. A resumed
    run cuts the bucket files back to the saved lengths and reads on from the saved row.
    Statistics are summed per source chunk in float64, in chunk order, so they do not depend on
    --memory: each chunk's come from the outliers' analysis, or where it has none (or the chunk
    holds a left-out row) from a worker, and are added in order before a flush saves them. The
    rows come from the spill the outliers' read wrote, where it holds them all, else from the
    harvest."""
    d = src_arr.shape[1]
    storage = src_arr.attrs.get("dtype", str(src_arr.dtype))
    rec = record(src_arr.dtype, d)
    lengths = state.get("lengths", [0] * n_buckets)
    start = state.get("rows_read", 0)
    acc_sum = np.asarray(state.get("sum", np.zeros(d)), np.float64)
    norm_sum, sq_sum = state.get("norm_sum", 0.0), state.get("sq_sum", 0.0)
    eval_written = state["eval_written"] if "eval_written" in state else \
        _eval_before(split, start)
    tail = state.get("eval_tail")  # eval rows read but not yet a whole chunk
    eval_tail = np.fromfile(scratch / tail, dtype=src_arr.dtype).reshape(-1, d) if tail else None
    eval_buf: list[np.ndarray] = []
    for b in range(n_buckets):
        with open(scratch / f"{b}.bin", "ab") as fh:
            fh.truncate(lengths[b] * rec.itemsize)
    n_rows, chunk = src_arr.shape[0], src_arr.chunks[0]
    # Half of --memory for our buffers (see stages/shuffle.py): a read (`step` rows), its
    # float32 view and its records are ~4 raw copies, so a read is 1/64 of it. Pending records
    # are a sixteenth, and so are the last flush's, still being written a bucket at a time.
    shares = outliers.Shares(d, state.get("shares")) if len(split.excluded) else None
    pending: list[np.ndarray] = []
    pending_bytes = 0
    summing: list = []  # each chunk's statistics, in chunk order, computed on the workers

    def collect() -> None:  # the last read's statistics, added in chunk order
        nonlocal acc_sum, norm_sum, sq_sum
        for job in summing:  # a worker's, or one from the outliers' analysis
            s, n1, n2 = job.result() if hasattr(job, "result") else job
            acc_sum += s
            norm_sum += n1
            sq_sum += n2
        summing.clear()

    def flush(rows_read: int) -> None:
        """Hand what is pending to the flusher thread (after the last flush has finished), so
        this thread reads on while the buckets are sorted and written."""
        nonlocal pending, pending_bytes, eval_buf, flushing
        collect()
        done = {"rows_read": rows_read, "sum": acc_sum.tolist(), "norm_sum": norm_sum,
                "sq_sum": sq_sum, **({"shares": shares.state()} if shares else {})}
        if flushing:
            flushing.result()
        flushing = flusher.submit(write_out, pending, eval_buf, done)
        pending, pending_bytes, eval_buf = [], 0, []

    def write_out(recs: list, evals: list, done: dict) -> None:
        nonlocal eval_written, eval_tail
        if recs:
            allrec = np.concatenate(recs)
            del recs[:]
            bucket = allrec["dest"] // bucket_rows
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
            for b in np.flatnonzero(np.diff(bounds)):  # a bucket's share gathered at a time,
                with open(scratch / f"{b}.bin", "ab") as fh:  # not a sorted copy of them all
                    fh.write(allrec[order[bounds[b]:bounds[b + 1]]].view(np.uint8))
                lengths[b] += int(bounds[b + 1] - bounds[b])
            del allrec
        tail_name = None
        if eval_tail is not None or evals:
            ev = np.concatenate(([eval_tail] if eval_tail is not None else []) + evals)
            last = done["rows_read"] == n_rows
            whole = len(ev) if last else len(ev) // dst_eval.chunks[0] * dst_eval.chunks[0]
            if whole:
                dst_eval[eval_written:eval_written + whole] = ev[:whole]
                eval_written += whole
            eval_tail = ev[whole:] if whole < len(ev) else None
            if eval_tail is not None:  # named by the flush: a kill before the state save
                tail_name = f"eval-tail-{done['rows_read']}.bin"  # leaves the saved one
                (scratch / tail_name).write_bytes(eval_tail.tobytes())
        save_state(art, hook, {**done, "lengths": lengths, "eval_written": eval_written,
                               "eval_tail": tail_name})
        for old in scratch.glob("eval-tail-*.bin"):
            if old.name != tail_name:
                old.unlink(missing_ok=True)
        if rows:
            rows.release(done["rows_read"])
        faults.point("shuffle.flushed")

    flushing = None
    with progress(f"shuffle {hook}: scatter", n_rows, "rows", done=start) as bar, \
            ThreadPoolExecutor(shuffle_memory.WORKERS) as pool, \
            ThreadPoolExecutor(1) as flusher:
        rows = spill.rows if spill else None
        reads = rows.read_ahead(start, step) if rows and rows.covers(start) else \
            arrays.read_ahead(src_arr, start, step, artifact=src_ref)
        # The outliers' read analysed every chunk (as the in-memory path does): only a chunk
        # holding a left-out row is summed again.
        analysed = spill.analysis if spill and spill.analysis.whole() else None
        redo = set((split.excluded // chunk).tolist())
        for lo, hi, raw in reads:
            collect()  # so no more than one read waits on the workers
            idx = np.arange(lo, hi)
            emask, _ = split.index(idx, want_eval=True)
            if emask.any():  # eval rows of these sequences are contiguous in the eval split
                eval_buf.append(raw[emask])
            mask, t = split.index(idx, want_eval=False)
            sq, sums = analysed.read(lo, hi) if analysed else (None, None)
            for c0 in range(0, hi - lo, chunk):  # statistics per source chunk, in order
                m = mask[c0:c0 + chunk]
                if analysed and (lo + c0) // chunk not in redo:
                    summing.append(_train_stats(sq[c0:c0 + chunk], sums[c0 // chunk], m))
                else:
                    summing.append(pool.submit(_chunk_stats, raw[c0:c0 + chunk], lo + c0, m,
                                               split, storage))
                if shares:
                    shares.add_chunk(raw[c0:c0 + chunk], idx[c0:c0 + chunk],
                                     emask[c0:c0 + chunk], split, storage)
            recs = np.empty(len(t), dtype=rec)
            recs["dest"], recs["src"], recs["row"] = perm(t), idx[mask], raw[mask]
            del raw
            pending.append(recs)
            pending_bytes += recs.nbytes
            if pending_bytes >= budget // 16 or hi == n_rows:
                flush(hi)
            bar.advance(hi - lo)
        if flushing:
            flushing.result()
    state = load_state(art, hook)
    state["pass1_done"] = True
    save_state(art, hook, state)
    return state


def _train_stats(sq: np.ndarray, train_sum: np.ndarray, mask: np.ndarray) -> tuple:
    """(Σx, Σ‖x‖, Σ‖x‖²) of one source chunk's train rows from its analysis."""
    q = sq[mask]
    return train_sum, float(np.sqrt(q).sum()), float(q.sum())


def _chunk_stats(raw: np.ndarray, lo: int, mask: np.ndarray, split: Split, storage: str) -> tuple:
    """The same for a chunk not analysed before the outliers were known (or holding one):
    shuffle_memory's analysis under the split as it is now, so the paths agree bit for bit."""
    return _train_stats(*shuffle_memory.analyse_chunk(raw, lo, split, storage), mask)


def _eval_before(split: Split, row: int) -> int:
    """Eval rows among harvest rows [0, row): where a resumed pass 1 of a shuffle killed
    before it counted them goes on writing eval."""
    n = 0
    for lo in range(0, row, 1 << 20):
        n += int(split.index(np.arange(lo, min(lo + (1 << 20), row)), want_eval=True)[0].sum())
    return n
