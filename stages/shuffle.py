"""Shuffle: a global random permutation of a harvest's token rows, out of core, split into
train and eval by *sequence* (no eval token's sequence has a token in train).

The permutation is a keyed Feistel bijection on [0, n_train) with cycle walking, so the
destination of any row is computed on the fly: no n-sized permutation array, whatever n is.
When a hook's harvest fits half of `--memory`, it is read once and written in place, with no
buckets (`saectl/shuffle_memory.py`: the same arrays, bit for bit). Otherwise two passes per
hook, each within `--memory` (`saectl/shuffle_buckets.py`):
  1. read the harvest sequentially, send each train row to the on-disk bucket that holds its
     destination (`scratch/<hook>/<bucket>.bin`), accumulating normalisation statistics;
  2. load one bucket at a time, place its rows at their destinations, write the output chunks.
Progress is recorded after every flush (rows read, bucket file lengths) and every finished
bucket, so a killed shuffle resumes where it stopped and ends bit-identical.

Before them, unless `--max-activation-norm-multiple 0`, one read of every hook measures token
norms and finds the massive-activation tokens, which both splits then leave out
(`saectl/outliers.py`). Out of core, that read also spills each hook's raw rows and their
statistics to scratch (`saectl/spill.py`), so pass 1 does not decode the harvest again.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass

import numpy as np

from saectl import arrays, layout, outliers, shuffle_buckets, shuffle_memory, store
from saectl.config import address_params, opt, parse_bytes
from saectl.console import info
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
        a.shape[0] * shuffle_buckets.record(a.dtype, a.shape[1]).itemsize for a in srcs.values())
    have = sum(f.stat().st_size for s in spills.values() if s.rows.folder.exists()
               for f in s.rows.folder.iterdir())
    layout.scratch(art.path).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(layout.scratch(art.path)).free + have
    if need > 0.9 * free:
        info(f"shuffle: the scratch disk has {free / 2**30:.1f} GiB free, a spill of the "
             f"harvest would take {need / 2**30:.1f} GiB: decoding it twice instead")
        for s in spills.values():  # a killed run's spill would only hold the buckets' room
            shutil.rmtree(s.rows.folder, ignore_errors=True)
            s.rows = None
    return spills


def _read_step(budget: int, src_arr) -> int:
    """Rows per read: whole source chunks, a 64th of --memory (see shuffle_buckets.scatter)."""
    chunk, d = src_arr.chunks[0], src_arr.shape[1]
    return chunk * max(1, (budget // 64) // (chunk * d * src_arr.dtype.itemsize))


def _check_budget(cfg: ShuffleConfig, srcs) -> None:
    """Reads go a whole source chunk at a time, and ~64 reads fit the budget (see
    shuffle_buckets.scatter)."""
    need = max(64 * a.chunks[0] * a.shape[1] * a.dtype.itemsize for a in srcs)
    if cfg.budget < need:
        raise ConfigError(f"--memory {cfg.memory} is too small for this harvest's chunks; "
                          f"give at least --memory {math.ceil(need / 2**20)}MiB")


def _shuffle_hook(art, out, src_arr, hook, split: Split, n_train: int, n_eval: int,
                  cfg: ShuffleConfig, src_ref: str, write_rows: bool, held=None,
                  spill=None) -> dict:
    d = src_arr.shape[1]
    storage = src_arr.attrs.get("dtype", str(src_arr.dtype))
    rec = shuffle_buckets.record(src_arr.dtype, d)
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
    state = shuffle_buckets.load_state(art, hook)
    step = _read_step(cfg.budget, src_arr)
    if not state.get("done") and (
            held or shuffle_memory.need(src_arr, step) <= cfg.budget // 2):
        held = held or shuffle_memory.load(src_arr, step, src_ref, hook, split)
        shares = outliers.Shares(d) if len(split.excluded) else None
        state = {"done": True, "n_buckets": 0, **shuffle_memory.shuffle_hook(
            held, dst, dst_eval, rows_arr if write_rows else None, split, perm, n_train,
            storage, src_arr.chunks[0], step, shares, hook)}
        del held
        shuffle_buckets.save_state(art, hook, state)
    n_buckets = state.get("n_buckets", n_buckets)
    if not state.get("done") and not state.get("pass1_done"):
        state = shuffle_buckets.scatter(art, src_arr, dst_eval, hook, split, perm, bucket_rows,
                                        n_buckets, scratch, state, cfg.budget, step, src_ref,
                                        spill)
    if not state.get("done"):
        shuffle_buckets.place(art, hook, dst, rows_arr if write_rows else None, scratch, state,
                              n_buckets, bucket_rows, n_train, rec, chunk_rows)
    n = max(n_train, 1)
    mean = np.asarray(state["sum"]) / n
    out.create_array(layout.stat("mean", hook), data=mean.astype(np.float32), overwrite=True)
    shares = outliers.Shares(d, state.get("shares")).shares(
        (n_train, np.asarray(state["sum"]), state["sq_sum"]))
    return {"d": d, "mean_norm": state["norm_sum"] / n, "mean_sq_norm": state["sq_sum"] / n,
            "n_buckets": n_buckets, "shares": shares}


STAGE = Stage(NAME, ShuffleConfig, "Shuffle a harvest's token rows out of core and split "
              "train/eval by sequence.", plan, build, positional=("harvest",),
              figures=("n_train", "n_eval"))
