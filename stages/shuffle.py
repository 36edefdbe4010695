"""Shuffle: a global random permutation of a harvest's token rows, out of core, split into
train and eval by *sequence* (no eval token's sequence has a token in train).

The permutation is a keyed Feistel bijection on [0, n_train) with cycle walking, so the
destination of any row is computed on the fly: no n-sized permutation array, whatever n is.
When a hook's harvest fits half of `--memory`, it is read once and written in place, with no
buckets (`saectl/shuffle_memory.py`: the same arrays, bit for bit). Otherwise two passes per
hook, each within `--memory`:
  1. read the harvest sequentially, send each train row to the on-disk bucket that holds its
     destination (`scratch/<hook>/<bucket>.bin`), accumulating normalisation statistics;
  2. load one bucket at a time, place its rows at their destinations, write the output chunks.
Progress is recorded after every flush (rows read, bucket file lengths) and every finished
bucket, so a killed shuffle resumes where it stopped and ends bit-identical.

Before them, unless `--max-activation-norm-multiple 0`, one read of every hook measures token
norms and finds the massive-activation tokens, which both splits then leave out
(`saectl/outliers.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saectl import arrays, faults, layout, outliers, shuffle_memory, store
from saectl.config import address_params, opt, parse_bytes
from saectl.console import info, progress
from saectl.errors import ConfigError
from saectl.spill import Analysis, HookSpill, Spill
from saectl.split import Permutation, Split
from saectl.stage import Plan, RunnerOptions, Stage

NAME = "shuffle"
OUTLIER_MULTIPLE = 5.0  # measured on SmolLM2 and the tiny test models: README, "Outliers"


@dataclass(frozen=True)
class ShuffleConfig(RunnerOptions):
    harvest: str | None = opt(None, "The harvest (or import) artifact to shuffle")
    eval_fraction: float = opt(0.05, "Fraction of sequences held out for evaluation")
    seed: int = opt(0, "Seed of the split and the permutation")
    keep_bos: bool = opt(False, "Keep BOS positions (their activations are outliers)")
    max_activation_norm_multiple: float = opt(
        OUTLIER_MULTIPLE, "Leave out of train and eval the tokens whose activation norm exceeds "
        "this multiple of the median norm (massive activations); 0 keeps every token")
    memory: str = opt("2GiB", "Memory budget for buffers, e.g. 512MiB, 2GiB", address=False)

    def __post_init__(self):
        if not self.harvest:
            raise ConfigError("give the harvest to shuffle: saectl shuffle HARVEST_REF")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.budget <= 0:
            raise ConfigError(f"--memory {self.memory} must be positive, e.g. --memory 2GiB")
        if not (self.max_activation_norm_multiple == 0 or self.max_activation_norm_multiple > 1):
            raise ConfigError(f"--max-activation-norm-multiple must be above 1 (or 0 to keep "
                              f"every token), got {self.max_activation_norm_multiple}")

    @property
    def budget(self) -> int:
        return parse_bytes(self.memory)


def make_split(n_seq: int, C: int, cfg: ShuffleConfig, has_bos: bool = True) -> Split:
    n_eval = round(cfg.eval_fraction * n_seq)
    if cfg.eval_fraction > 0:
        n_eval = min(max(n_eval, 1), n_seq - 1)
    if n_seq - n_eval < 1:
        raise ConfigError(f"the harvest has {n_seq} sequence(s): too few to split; "
                          "harvest more tokens or use --eval-fraction 0")
    rng = np.random.default_rng([cfg.seed, 0xE7A1])
    is_eval = np.zeros(n_seq, bool)
    is_eval[rng.permutation(n_seq)[:n_eval]] = True
    return Split(C, is_eval, 1 if has_bos and not cfg.keep_bos else 0)


# ---------------------------------------------------------------------------------------------
# The stage


def plan(cfg: ShuffleConfig) -> Plan:
    root = store.store_root(cfg.store)
    src = store.open_complete(root, cfg.harvest)
    if src.stage not in ("harvest", "import"):
        raise ConfigError(f"{src.ref} is a {src.stage} artifact; shuffle takes a harvest or import")
    params = address_params(cfg)
    del params["harvest"]  # it is an input, addressed by its digest
    if cfg.max_activation_norm_multiple == 0:
        # Keeping every token is the shuffle as it was before outliers were measured: same
        # arrays, so the same address as then.
        del params["max_activation_norm_multiple"]
    return Plan(store.artifact_for(root, NAME, params, {"harvest": src}), params,
                {"harvest": src})


def build(cfg: ShuffleConfig, plan: Plan, writer) -> None:
    art, src = plan.art, plan.inputs["harvest"]
    hin = src.group()
    hooks = sorted(hin[layout.ACTS].array_keys())
    _check_budget(cfg, [hin[layout.acts(h)] for h in hooks])
    made = src.manifest()["summary"]
    n_seq, C = made["n_seq"], made["context_size"]
    split = make_split(n_seq, C, cfg, has_bos=made.get("bos", True))
    measured, held = {}, {}
    step_of = lambda a: _read_step(cfg.budget, a)
    srcs = {h: hin[layout.acts(h)] for h in hooks}
    if sum(shuffle_memory.need(a, step_of(a)) for a in srcs.values()) <= cfg.budget // 2:
        # Every hook fits at once: one read each serves the outliers and the shuffle.
        for h, a in srcs.items():
            held[h] = shuffle_memory.load(a, step_of(a), src.ref, h, split)
            if cfg.max_activation_norm_multiple > 0:
                shuffle_memory.give_norms(art, h, held[h])
    spills = {}
    if cfg.max_activation_norm_multiple > 0:
        spills = _spills(art, {h: a for h, a in srcs.items() if h not in held}, split)
        # BOS stays --keep-bos's to decide: outliers are sought among the other positions.
        excluded, measured = outliers.find(
            art, srcs, C, 1 if made.get("bos", True) else 0,
            cfg.max_activation_norm_multiple, cfg.budget, step_of, src.ref, spills)
        split = dataclasses.replace(split, excluded=excluded)
    n_train, n_eval = split.counts()
    out = art.group("r+")
    out.create_array(layout.EVAL_SEQUENCES, data=np.flatnonzero(split.is_eval).astype(np.int64),
                     overwrite=True)
    out.create_array(layout.ROWS_EVAL, data=split.rows(want_eval=True), overwrite=True)
    stats = {}
    for i, hook in enumerate(hooks):
        stats[hook] = _shuffle_hook(art, out, srcs[hook], hook, split, n_train, n_eval, cfg,
                                    src.ref, write_rows=i == 0, held=held.pop(hook, None),
                                    spill=spills.get(hook))
        shares = stats[hook].pop("shares")
        if hook in measured:
            stats[hook]["outliers"] = {**measured[hook], **shares,
                                       **outliers.listed(hin, split.excluded, C)}
    shutil.rmtree(layout.scratch(art.path), ignore_errors=True)
    summary = {"n_train": n_train, "n_eval": n_eval,
               "n_eval_sequences": int(split.is_eval.sum()), "context_size": C,
               "keep_bos": cfg.keep_bos,
               "max_activation_norm_multiple": cfg.max_activation_norm_multiple,
               "n_outliers": len(split.excluded), "hooks": stats}
    store.mark_complete(art, summary)
    info(f"shuffle: wrote {art.ref} ({n_train:,} train rows, {n_eval:,} eval rows)")


def _spills(art, srcs: dict, split: Split) -> dict:
    """What the outliers' read leaves for each hook read out of core (saectl/spill.py): the
    statistics, and the raw rows when the scratch disk holds them all and the largest hook's
    buckets beside them; else not the rows, said once: the scatter then decodes again."""
    if not srcs:
        return {}
    spills = {}
    for h, a in srcs.items():
        storage = a.attrs.get("dtype", str(a.dtype))
        spills[h] = HookSpill(
            Analysis(layout.scratch(art.path, h), a.shape[0], a.shape[1], a.chunks[0],
                     lambda raw, lo, st=storage: shuffle_memory.analyse_chunk(raw, lo, split, st)),
            Spill(layout.scratch(art.path, h, "spill"), a.shape[0], a.shape[1], a.dtype,
                  a.chunks[0]))
    need = sum(s.rows.n * s.rows.row_bytes for s in spills.values()) + max(
        a.shape[0] * _record(a.dtype, a.shape[1]).itemsize for a in srcs.values())
    have = sum(f.stat().st_size for s in spills.values() if s.rows.folder.exists()
               for f in s.rows.folder.iterdir())
    layout.scratch(art.path).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(layout.scratch(art.path)).free + have
    if need > 0.9 * free:
        info(f"shuffle: the scratch disk has {free / 2**30:.1f} GiB free, a spill of the "
             f"harvest would take {need / 2**30:.1f} GiB: decoding it twice instead")
        for s in spills.values():
            s.rows = None
    return spills


def _read_step(budget: int, src_arr) -> int:
    """Rows per read: whole source chunks, a 64th of --memory (see _pass1)."""
    chunk, d = src_arr.chunks[0], src_arr.shape[1]
    return chunk * max(1, (budget // 64) // (chunk * d * src_arr.dtype.itemsize))


def _check_budget(cfg: ShuffleConfig, srcs) -> None:
    """Reads go a whole source chunk at a time, and ~64 reads fit the budget (see _pass1)."""
    need = max(64 * a.chunks[0] * a.shape[1] * a.dtype.itemsize for a in srcs)
    if cfg.budget < need:
        raise ConfigError(f"--memory {cfg.memory} is too small for this harvest's chunks; "
                          f"give at least --memory {math.ceil(need / 2**20)}MiB")


def _state_path(art, hook: str) -> Path:
    return layout.progress_file(art.path, f"shuffle-{hook}")


def _load_state(art, hook: str) -> dict:
    p = _state_path(art, hook)
    return json.loads(p.read_text()) if p.exists() else {}


def _save_state(art, hook: str, state: dict) -> None:
    store.atomic_write(_state_path(art, hook), json.dumps(state).encode())


def _record(dtype: np.dtype, d: int) -> np.dtype:
    """One scratch record: where the row goes, where it came from, and the row itself."""
    return np.dtype([("dest", "<i8"), ("src", "<i8"), ("row", dtype, (d,))])


def _shuffle_hook(art, out, src_arr, hook, split: Split, n_train: int, n_eval: int,
                  cfg: ShuffleConfig, src_ref: str, write_rows: bool, held=None,
                  spill=None) -> dict:
    d = src_arr.shape[1]
    storage = src_arr.attrs.get("dtype", str(src_arr.dtype))
    rec = _record(src_arr.dtype, d)
    chunk_rows = arrays.rows_per_chunk(d * src_arr.dtype.itemsize)
    # Our buffers take half of --memory; the other half is slack for the allocator and Zarr's
    # encoding copies (bounded by writing the block a few chunks at a time). Pass 2 holds one
    # bucket's records and its output block, an eighth of --memory, the next bucket's records
    # and the last bucket's block, still being written.
    per_row = rec.itemsize + d * src_arr.dtype.itemsize + 8
    bucket_rows = max(chunk_rows, (cfg.budget // 8) // per_row // chunk_rows * chunk_rows)
    n_buckets = max(1, math.ceil(n_train / bucket_rows))
    perm = Permutation(n_train, cfg.seed)
    attrs = {"hook": hook, "d": d}
    dst = arrays.create(out, layout.train_rows(hook), (n_train, d), (chunk_rows, d), storage,
                        attrs)
    dst_eval = arrays.create(out, layout.eval_rows(hook), (n_eval, d), (chunk_rows, d), storage,
                             attrs)
    rows_arr = arrays.create(out, layout.ROWS_TRAIN, (n_train,), (1 << 16,), "int64")
    scratch = layout.scratch(art.path, hook)
    scratch.mkdir(parents=True, exist_ok=True)
    state = _load_state(art, hook)
    step = _read_step(cfg.budget, src_arr)
    if not state.get("done") and (
            held or shuffle_memory.need(src_arr, step) <= cfg.budget // 2):
        held = held or shuffle_memory.load(src_arr, step, src_ref, hook, split)
        shares = outliers.Shares(d) if len(split.excluded) else None
        state = {"done": True, "n_buckets": 0, **shuffle_memory.shuffle_hook(
            held, dst, dst_eval, rows_arr if write_rows else None, split, perm, n_train,
            storage, src_arr.chunks[0], step, shares, hook)}
        del held
        _save_state(art, hook, state)
    n_buckets = state.get("n_buckets", n_buckets)
    if not state.get("done") and not state.get("pass1_done"):
        state = _pass1(art, src_arr, dst_eval, hook, split, perm, bucket_rows, n_buckets,
                       scratch, state, cfg.budget, src_ref, spill)
    done = set(state.get("buckets_done", []))
    todo = [] if state.get("done") else [b for b in range(n_buckets) if b not in done]

    def load(i):  # the next bucket is read on a thread while this one is placed
        return np.fromfile(scratch / f"{todo[i]}.bin", dtype=rec) if i < len(todo) else None

    def write(lo, hi, block, origin):  # and encoded on another while the next is placed
        for w in range(0, hi - lo, 4 * chunk_rows):
            dst[lo + w:lo + min(w + 4 * chunk_rows, hi - lo)] = block[w:w + 4 * chunk_rows]
        if origin is not None:
            rows_arr[lo:hi] = origin

    def finish(b, job):  # a bucket is done once written: then its progress, then its file
        job.result()
        done.add(b)
        state["buckets_done"] = sorted(done)
        _save_state(art, hook, state)
        (scratch / f"{b}.bin").unlink(missing_ok=True)
        faults.point("shuffle.bucket_placed")
        bar.advance(1)

    with progress(f"shuffle {hook}: place", n_buckets, "buckets", done=len(done)) as bar, \
            ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer:
        nxt, writing = loader.submit(load, 0), None
        for i, b in enumerate(todo):
            records, nxt = nxt.result(), loader.submit(load, i + 1)
            lo, hi = b * bucket_rows, min((b + 1) * bucket_rows, n_train)
            if len(records) != hi - lo:
                raise store.ArtifactError(f"shuffle scratch of {art.ref} is inconsistent "
                                          f"(bucket {b}); remove the artifact and re-run")
            block = np.empty((hi - lo, d), dtype=src_arr.dtype)
            block[records["dest"] - lo] = records["row"]
            origin = None
            if write_rows:
                origin = np.empty(hi - lo, np.int64)
                origin[records["dest"] - lo] = records["src"]
            del records
            if writing:
                finish(*writing)
            writing = (b, writer.submit(write, lo, hi, block, origin))
            del block, origin
        if writing:
            finish(*writing)
    n = max(n_train, 1)
    mean = np.asarray(state["sum"]) / n
    out.create_array(layout.stat("mean", hook), data=mean.astype(np.float32), overwrite=True)
    shares = outliers.Shares(d, state.get("shares")).shares(
        (n_train, np.asarray(state["sum"]), state["sq_sum"]))
    return {"d": d, "mean_norm": state["norm_sum"] / n, "mean_sq_norm": state["sq_sum"] / n,
            "n_buckets": n_buckets, "shares": shares}


def _pass1(art, src_arr, dst_eval, hook, split, perm, bucket_rows, n_buckets, scratch, state,
           budget, src_ref, spill=None) -> dict:
    """Send train rows to their buckets and copy eval rows in harvest order.

    Records wait in memory until a sixteenth of --memory is filled, then every bucket file gets
    its share, eval gets its whole chunks (the rest waits in `eval-tail-<rows read>.bin`: a
    part-chunk write would re-encode its chunk every read) and the progress (rows read, bucket
    lengths, eval rows written) is saved. A resumed run cuts the bucket files back to the saved
    lengths and reads on from the saved row. Statistics are summed per source chunk in float64,
    in chunk order, so they do not depend on --memory; each chunk's are computed on a worker
    while this thread scatters, and added in order before a flush saves them. The rows come
    from the spill the outliers' read wrote, where it holds them all, else from the harvest."""
    d = src_arr.shape[1]
    storage = src_arr.attrs.get("dtype", str(src_arr.dtype))
    rec = _record(src_arr.dtype, d)
    lengths = state.get("lengths", [0] * n_buckets)
    start = state.get("rows_read", 0)
    acc_sum = np.asarray(state.get("sum", np.zeros(d)), np.float64)
    norm_sum, sq_sum = state.get("norm_sum", 0.0), state.get("sq_sum", 0.0)
    eval_written = state["eval_written"] if "eval_written" in state else \
        _eval_before(split, start)
    tail = state.get("eval_tail")
    eval_buf = [np.fromfile(scratch / tail, dtype=src_arr.dtype).reshape(-1, d)] if tail else []
    for b in range(n_buckets):
        with open(scratch / f"{b}.bin", "ab") as fh:
            fh.truncate(lengths[b] * rec.itemsize)
    n_rows, chunk = src_arr.shape[0], src_arr.chunks[0]
    # Half of --memory for our buffers (see _shuffle_hook): a read, its float32 view and its
    # records are ~4 raw copies, so a read is 1/64 of it; pending records (and their sorted
    # copy at a flush) a sixteenth each.
    step = _read_step(budget, src_arr)
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
        nonlocal pending, pending_bytes, eval_written, eval_buf
        collect()
        if pending:
            allrec = np.concatenate(pending)
            pending, pending_bytes = [], 0
            bucket = allrec["dest"] // bucket_rows
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
            allrec = allrec[order]  # one gather; each bucket's share is then a slice of it
            for b in np.flatnonzero(np.diff(bounds)):
                with open(scratch / f"{b}.bin", "ab") as fh:
                    fh.write(allrec[bounds[b]:bounds[b + 1]].view(np.uint8))
                lengths[b] += int(bounds[b + 1] - bounds[b])
            del allrec
        tail_name = None
        if eval_buf:
            ev = np.concatenate(eval_buf)
            whole = len(ev) if rows_read == n_rows else len(ev) // dst_eval.chunks[0] * \
                dst_eval.chunks[0]
            if whole:
                dst_eval[eval_written:eval_written + whole] = ev[:whole]
                eval_written += whole
            eval_buf = [ev[whole:]] if whole < len(ev) else []
            if eval_buf:  # named by the flush, so a kill before the state save keeps the old
                tail_name = f"eval-tail-{rows_read}.bin"
                store.atomic_write(scratch / tail_name, eval_buf[0].tobytes())
        _save_state(art, hook, {"rows_read": rows_read, "lengths": lengths,
                                "sum": acc_sum.tolist(), "norm_sum": norm_sum, "sq_sum": sq_sum,
                                "eval_written": eval_written, "eval_tail": tail_name,
                                **({"shares": shares.state()} if shares else {})})
        for old in scratch.glob("eval-tail-*.bin"):
            if old.name != tail_name:
                old.unlink(missing_ok=True)
        if rows:
            rows.release(rows_read)
        faults.point("shuffle.flushed")

    with progress(f"shuffle {hook}: scatter", n_rows, "rows", done=start) as bar, \
            ThreadPoolExecutor(shuffle_memory.WORKERS) as pool:
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
                    q = sq[c0:c0 + chunk][m]
                    summing.append((sums[c0 // chunk], float(np.sqrt(q).sum()), float(q.sum())))
                else:
                    summing.append(pool.submit(_chunk_stats, raw[c0:c0 + chunk], m, storage))
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
    state = _load_state(art, hook)
    state["pass1_done"] = True
    _save_state(art, hook, state)
    return state


def _chunk_stats(raw: np.ndarray, mask: np.ndarray, storage: str) -> tuple:
    """(Σx in float64, Σ‖x‖, Σ‖x‖²) of one source chunk's train rows: shuffle_memory's
    statistics, with the same NumPy calls, so the two paths agree bit for bit."""
    x = arrays.from_storage(raw[mask], storage)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    return x.sum(0, dtype=np.float64), float(np.sqrt(sq).sum()), float(sq.sum())


def _eval_before(split: Split, row: int) -> int:
    """Eval rows among harvest rows [0, row): where a resumed pass 1 of a shuffle killed
    before it counted them goes on writing eval."""
    n = 0
    for lo in range(0, row, 1 << 20):
        n += int(split.index(np.arange(lo, min(lo + (1 << 20), row)), want_eval=True)[0].sum())
    return n


STAGE = Stage(NAME, ShuffleConfig, "Shuffle a harvest's token rows out of core and split "
              "train/eval by sequence.", plan, build, positional=("harvest",),
              figures=("n_train", "n_eval"))
