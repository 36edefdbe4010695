"""Shuffle throughput against a sequential copy of the same store, and shuffle's peak memory
against its --memory budget (issue 8).

Data: synthetic float16 activations at d_in 576 (SmolLM2's width), BENCH_SHUFFLE_ROWS rows
(default 262,144: 302 MB raw) in sequences of 128, imported into a fresh store with the default
chunks (2,048 rows). Budget: BENCH_SHUFFLE_MEMORY (default 160MiB, about half the data, so the
shuffle runs out of core: ~22 buckets).

- Throughput, at the default --memory (2GiB: the data fits, so the shuffle reads it once and
  writes it in place, no buckets) and at the tight budget (out of core, through the buckets):
  `saectl.stage.run(shuffle.STAGE, cfg)` in this process against the baseline, a sequential
  chunk-by-chunk copy of the same array into a new Zarr array with the same chunks and codecs
  (each side removes its output inside its timing, so neither leaves the next a writeback to
  pay; read, decode, encode, write: the least any rewrite of the store does). In memory the
  shuffle decodes and encodes once, as the copy does, plus the gather, the outliers' norms
  and the statistics: goal ≥ 0.5×. Out of core it also measures the norms
  in a read of its own, writes every row to a scratch bucket and reads the buckets back: goal
  ≥ 0.4× (issue 22). A tenth of the data (30 MiB) is below what the 4 MiB chunks need (64
  chunks: 151 MiB), so the tight budget is the smallest that takes them.
- Memory: the real `saectl shuffle --memory BUDGET` in a fresh process, at the tight budget
  and at the default (the in-memory path); peak RSS growth over the RSS it held before the
  command, once the CLI had built the command's parameters (VmHWM, reset at start; see
  common.peak_growth); goal ≤ the budget.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import Row, alternate, peak_growth, synthetic_import

D_IN, CTX = 576, 128
N_ROWS = int(os.environ.get("BENCH_SHUFFLE_ROWS", "262144"))
MEMORY = os.environ.get("BENCH_SHUFFLE_MEMORY", "160MiB")


def copy_array(src, dst_group, name: str):
    """The baseline: the array rewritten chunk-aligned, in order, with the same chunks/codecs."""
    from saectl import arrays

    chunk = src.chunks[0]
    step = chunk * 16
    dst = arrays.create(dst_group, name, tuple(src.shape), tuple(src.chunks),
                        src.attrs.get("dtype", str(src.dtype)))
    for lo in range(0, src.shape[0], step):
        dst[lo:lo + step] = src[lo:lo + step]
    return dst


def _where_time_goes(cfg, shuffle) -> str:
    """One more shuffle under cProfile: its time by phase, for the note."""
    import cProfile
    import pstats

    from saectl.stage import run as run_stage

    art = shuffle.STAGE.address(cfg)
    shutil.rmtree(art.path, ignore_errors=True)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(run_stage, shuffle.STAGE, cfg)
    total = time.perf_counter() - t0
    shutil.rmtree(art.path, ignore_errors=True)
    cum: dict[str, float] = {}
    for (path, _, name), (_, _, _, ct, _) in pstats.Stats(prof).stats.items():
        key = {("shuffle.py", "_pass1"): "pass 1", ("shuffle.py", "flush"): "bucket writes",
               ("array.py", "__getitem__"): "Zarr reads",
               ("array.py", "__setitem__"): "Zarr writes",
               ("arrays.py", "from_storage"): "statistics", ("einsumfunc.py", "einsum"):
               "statistics", ("~", "<built-in method numpy.fromfile>"): "bucket reads",
               ("shuffle_memory.py", "load"): "in-memory read and analysis",
               ("shuffle_memory.py", "write_gathered"): "in-memory gather and write"}.get(
                   (Path(path).name, name))
        if key:
            cum[key] = cum.get(key, 0.0) + ct
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(cum.items(), key=lambda kv: -kv[1]))
    return (f"profiled default shuffle {total:.1f}s: {parts} (overlapping; the main thread's "
            "view: work on the workers shows as waits)")


def run() -> list[Row]:
    import zarr

    from saectl import store
    from saectl.config import parse_bytes
    from saectl.stage import run as run_stage
    from stages import shuffle

    work = Path(tempfile.mkdtemp(prefix="bench-shuffle-"))
    try:
        ref = synthetic_import(work, N_ROWS, D_IN, CTX)
        root = store.store_root(work)
        src_art = store.open_complete(root, ref)
        src = src_art.group()["acts/h"]
        raw_bytes = N_ROWS * D_IN * 2
        cfgs = {"default": shuffle.ShuffleConfig(harvest=ref, store=str(work)),
                "tight": shuffle.ShuffleConfig(harvest=ref, memory=MEMORY, store=str(work))}
        buckets = {}

        def do_shuffle(which):
            def fn():
                art = shuffle.STAGE.address(cfgs[which])
                shutil.rmtree(art.path, ignore_errors=True)
                run_stage(shuffle.STAGE, cfgs[which])
                buckets[which] = art.manifest()["summary"]["hooks"]["h"]["n_buckets"]
                shutil.rmtree(art.path, ignore_errors=True)
            return fn

        def do_copy():
            # Its output removed inside the timing, as each shuffle removes its own: a copy left
            # behind is written back to disk while the next command runs, and the shuffle that
            # followed it paid for that writeback (1.3-1.8 s against 1.2-1.3 s).
            target = work / "copy.zarr"
            copy_array(src, zarr.open_group(target, mode="w"), "h")
            shutil.rmtree(target, ignore_errors=True)

        t = alternate({"default": do_shuffle("default"), "tight": do_shuffle("tight"),
                       "copy": do_copy}, reps=3, warmup=1)
        split = _where_time_goes(cfgs["default"], shuffle)
        t0 = time.perf_counter()
        shutil.copytree(src_art.path, work / "cp")
        cp_s = time.perf_counter() - t0
        shutil.rmtree(work / "cp")

        budget = parse_bytes(MEMORY)
        growth = peak_growth("shuffle", ref, "--store", work, "--memory", MEMORY)
        shutil.rmtree(shuffle.STAGE.address(cfgs["default"]).path, ignore_errors=True)
        growth_default = peak_growth("shuffle", ref, "--store", work, "--memory", "2GiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = raw_bytes / 1e6
    copy_note = (f"sequential Zarr copy (decode+encode, 16 chunks a call) {t['copy']:.1f}s; "
                 f"a plain file copy of the store took {cp_s:.1f}s")
    return [
        Row(f"shuffle MB/s (raw fp16), {N_ROWS:,} x {D_IN}, default --memory 2GiB",
            mb / t["default"], mb / t["copy"], "MB/s", ">= 0.5x",
            note=f"{mb:.0f} MB in {buckets['default']} bucket(s): shuffle {t['default']:.1f}s, "
                 + copy_note + "; " + split),
        Row(f"shuffle MB/s (raw fp16), {N_ROWS:,} x {D_IN}, --memory {MEMORY} (out of core)",
            mb / t["tight"], mb / t["copy"], "MB/s", ">= 0.4x",
            note=f"{mb:.0f} MB in {buckets['tight']} buckets: shuffle {t['tight']:.1f}s, "
                 + copy_note),
        Row(f"shuffle peak RSS growth MiB, {N_ROWS:,} x {D_IN} ({mb:.0f} MB)",
            growth / 2**20, budget / 2**20, "MiB", "<= 1x",
            note=f"real `saectl shuffle --memory {MEMORY}` in a fresh process; VmHWM over the "
                 f"RSS before the command"),
        Row(f"shuffle peak RSS growth MiB, {N_ROWS:,} x {D_IN} ({mb:.0f} MB), default --memory "
            "2GiB (in memory)", growth_default / 2**20, 2048, "MiB", "<= 1x",
            note="real `saectl shuffle` in a fresh process: the data held once, and the blocks "
                 "in flight"),
    ]
