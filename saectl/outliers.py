"""Massive-activation tokens: found by norm, left out of the shuffle's splits, and read back
by every evaluation that splices an SAE into the model (issue 16).

A few tokens of many language models carry activations far above the rest (SmolLM2-135M's
`resid_post.15`: norms of 1,400 to 27,000 against a median of 172, on 0.04% of tokens). Left
in, they carry most of the variance of a split, so FVU and MSE measure mostly how an SAE
reconstructs those few tokens. As dictionary_learning's `ActivationBuffer` does with its
`max_activation_norm_multiple`, the shuffle leaves out every token whose norm exceeds that
multiple of the median norm, and records which (sequence, position) they were in
`outliers/<hook>`, so the CE-loss splice passes them through unchanged.

The median is exact and out of core. dictionary_learning takes it per refresh batch; a
shuffle sees the whole harvest, so its threshold is one number per hook whatever the
batching or --memory. Each row's norm is streamed (float32, 4 bytes a row) to a scratch file;
the top 16 bits of a non-negative float32 order it as the float does, so one histogram of
those bits finds the median's bin and a second, of the low 16 bits inside that bin, its exact
value: two scans of a file d/2 times smaller than the activations, 2 × 512 KiB of counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from saectl import arrays, faults, layout, store
from saectl.console import progress
from saectl.errors import ConfigError

WRITER = "shuffle.outliers"  # its progress file; hooks' own are `shuffle-<hook>`
# More than this is not a few outliers but a cut of the data. Not 1%: the token after BOS, massive
# in every sequence, is 1/(C-1) of the tokens, 1.6% at 64-token contexts and 6.7% at 16.
MAX_SHARE = 0.08
LISTED = 100                 # positions listed in the manifest; `outliers/<hook>` holds all


def norms_of(raw: np.ndarray, storage: str) -> np.ndarray:
    """Each row's L2 norm, summed in float64 and stored as float32."""
    x = arrays.from_storage(raw, storage)
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype("<f4")


def _state(art) -> dict:
    p = layout.progress_file(art.path, WRITER)
    return json.loads(p.read_text()) if p.exists() else {}


def _save(art, state: dict) -> None:
    store.atomic_write(layout.progress_file(art.path, WRITER), json.dumps(state).encode())


def stream_norms(art, src_arr, hook: str, step: int, src_ref: str, spill=None) -> Path:
    """Every row's norm into `scratch/<hook>/norms.f32`, in row order; a killed run cuts the
    file back to the saved row count and reads on from there. With a `spill.HookSpill`, what
    the shuffle's scatter needs of the rows is written too (their statistics, and the raw rows
    where the disk has room), cut back alike."""
    rows, analysis = (spill.rows, spill.analysis) if spill else (None, None)
    path = layout.norms_scratch(art.path, hook)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _state(art)
    done = state.setdefault("rows", {}).get(hook, 0)
    storage = src_arr.attrs.get("dtype", str(src_arr.dtype))
    n = src_arr.shape[0]
    with open(path, "ab") as fh:
        fh.truncate(done * 4)
    for part in (rows, analysis):
        if part:
            part.truncate(done)
    with progress(f"shuffle {hook}: norms", n, "rows", done=done) as bar, open(path, "ab") as fh:
        for i, (lo, hi, raw) in enumerate(arrays.read_ahead(src_arr, done, step,
                                                             artifact=src_ref)):
            fh.write((analysis.add(lo, raw) if analysis else norms_of(raw, storage)).tobytes())
            if rows:
                rows.append(lo, raw)
            if i % 16 == 15 or hi == n:  # each save is an fsync: not after every small read
                fh.flush()
                state["rows"][hook] = hi
                _save(art, state)
                faults.point("shuffle.norms")
            bar.advance(hi - lo)
    return path


def write_norms(art, hook: str, norms: np.ndarray) -> None:
    """Every row's norm, already computed (the shuffle's in-memory path read the hook), into
    the file stream_norms would write, recorded as streamed: find then reads no activations."""
    path = layout.norms_scratch(art.path, hook)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # not ndarray.tofile: a short write there has no errno, so a
        fh.write(norms.astype("<f4").tobytes())  # full disk would not read as one (cli.py)
    state = _state(art)
    state.setdefault("rows", {})[hook] = len(norms)
    _save(art, state)


def _scan(path: Path, C: int, first: int, budget: int):
    """(rows, norms) of the rows a split can hold (position ≥ `first`), a block at a time: its
    temporaries take ~32 bytes a row, a 64th of --memory as a read of the shuffle does."""
    n, block = path.stat().st_size // 4, max(4096, budget // 64 // 32)
    for lo in range(0, n, block):
        v = np.fromfile(path, dtype="<f4", count=min(block, n - lo), offset=4 * lo)
        rows = np.arange(lo, lo + len(v), dtype=np.int64)
        keep = rows % C >= first
        yield rows[keep], v[keep]


def exact_median(path: Path, C: int, first: int, budget: int) -> float:
    """The lower median (as torch.median) of the norms of rows at position ≥ `first`."""
    top = np.zeros(1 << 16, np.int64)
    for _, v in _scan(path, C, first, budget):
        top += np.bincount(v.view(np.uint32) >> 16, minlength=1 << 16)
    total = int(top.sum())
    if total == 0:
        return float("nan")
    k = (total - 1) // 2
    cum = np.cumsum(top)
    hi = int(np.searchsorted(cum, k, side="right"))
    below = int(cum[hi - 1]) if hi else 0
    low = np.zeros(1 << 16, np.int64)
    for _, v in _scan(path, C, first, budget):
        bits = v.view(np.uint32)
        low += np.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo = int(np.searchsorted(np.cumsum(low), k - below, side="right"))
    return float(np.array([(hi << 16) | lo], np.uint32).view(np.float32)[0])


def exceeding(path: Path, C: int, first: int, threshold: float,
              budget: int) -> tuple[np.ndarray, float]:
    """(sorted rows whose norm exceeds `threshold`, the largest norm)."""
    found, top = [], 0.0
    for rows, v in _scan(path, C, first, budget):
        found.append(rows[v > threshold])
        top = max(top, float(v.max(initial=0.0)))
    return (np.concatenate(found) if found else np.empty(0, np.int64)), top


def find(art, sources: dict, C: int, first: int, multiple: float, budget: int, step_of,
         src_ref: str, spills: dict | None = None) -> tuple[np.ndarray, dict]:
    """(sorted harvest rows to leave out, {hook: what was measured}).

    A row is left out of every hook's split if its norm exceeds `multiple` × the median at any
    hook, so the splits of all hooks hold the same tokens (one `rows/train`). The result is
    written to `outliers/<hook>` and the progress file before the splits use it, so a resumed
    run reads it back rather than measuring again. `step_of(array)`: rows per read; `spills`:
    {hook: spill.HookSpill} for the hooks the shuffle reads out of core."""
    state = _state(art)
    group = art.group("r+")
    if state.get("done"):
        pairs = group[layout.outliers(min(sources))][:]
        return (pairs[:, 0] * C + pairs[:, 1]).astype(np.int64), state["hooks"]
    found, measured = [], {}
    for hook, arr in sorted(sources.items()):
        path = stream_norms(art, arr, hook, step_of(arr), src_ref, (spills or {}).get(hook))
        median = exact_median(path, C, first, budget)
        threshold = multiple * median
        rows, top = exceeding(path, C, first, threshold, budget)
        measured[hook] = {"median_norm": median, "threshold": threshold, "max_norm": top,
                          "n_exceeding": len(rows)}
        found.append(rows)
    rows = np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)
    n_rows = next(iter(sources.values())).shape[0] // C * (C - first)
    if len(rows) > MAX_SHARE * max(n_rows, 1):
        raise ConfigError(f"{len(rows):,} of {n_rows:,} tokens exceed --max-activation-norm-"
                          f"multiple {multiple:g} × the median norm: that cuts the data, not a "
                          "few outliers; raise the multiple, or give 0 to keep every token")
    pairs = np.stack([rows // C, rows % C], axis=1).astype(np.int64).reshape(-1, 2)
    for hook in sources:
        group.create_array(layout.outliers(hook), data=pairs, overwrite=True)
    _save(art, {"done": True, "hooks": measured})
    return rows, measured


def left_out(shuffle, hook: str, seqs: np.ndarray, C: int) -> np.ndarray:
    """[len(seqs), C] bool: the positions of these harvest sequences the shuffle left out as
    outliers (all False for a shuffle that kept them, or one made before they were measured)."""
    mask = np.zeros((len(seqs), C), bool)
    group = shuffle.group()
    if layout.outliers(hook) not in group:
        return mask
    pairs = group[layout.outliers(hook)][:]
    where = {int(s): i for i, s in enumerate(seqs)}
    for seq, pos in pairs:
        if int(seq) in where:
            mask[where[int(seq)], int(pos)] = True
    return mask


def variance_share(kept: tuple, dropped: tuple) -> float:
    """Share of a split's variance (about its mean before dropping) that the dropped rows
    carry; each argument is (n, Σx, Σ‖x‖²) in float64."""
    n = kept[0] + dropped[0]
    if dropped[0] == 0 or n == 0:
        return 0.0
    s = np.asarray(kept[1]) + np.asarray(dropped[1])
    mu = s / n
    total = kept[2] + dropped[2] - n * float(mu @ mu)
    part = dropped[2] - 2 * float(mu @ np.asarray(dropped[1])) + dropped[0] * float(mu @ mu)
    return part / total if total > 0 else 0.0


def listed(harvest_group, rows: np.ndarray, C: int) -> dict:
    """The manifest's record of the first LISTED rows left out: (sequence, position), and the
    token ids when the harvest kept them (an import has none: null)."""
    head = rows[:LISTED]
    seq, pos = head // C, head % C
    ids = None
    if layout.TOKENS in harvest_group:
        ids = (np.asarray(harvest_group[layout.TOKENS].get_coordinate_selection((seq, pos)))
               .tolist() if len(head) else [])
    return {"positions": np.stack([seq, pos], axis=1).tolist(), "token_ids": ids,
            "listed": len(head)}


class Shares:
    """What the variance shares need beyond the shuffle's own train statistics: (n, Σx, Σ‖x‖²)
    in float64 of eval's kept rows and of each split's dropped rows, summed per source chunk
    in order (so, like the statistics, they do not depend on --memory)."""

    NAMES = ("eval_kept", "train_dropped", "eval_dropped")

    def __init__(self, d: int, state: dict | None = None):
        state = state or {}
        self.sums = {k: [state[k][0], np.asarray(state[k][1], np.float64), state[k][2]]
                     if k in state else [0, np.zeros(d), 0.0] for k in self.NAMES}

    def add_chunk(self, raw: np.ndarray, rows: np.ndarray, eval_kept: np.ndarray, split,
                  storage: str) -> None:
        dropped = np.isin(rows, split.excluded)
        in_eval = split.is_eval[rows // split.C]
        for name, sel in (("eval_kept", eval_kept), ("train_dropped", dropped & ~in_eval),
                          ("eval_dropped", dropped & in_eval)):
            if sel.any():
                x = arrays.from_storage(raw[sel], storage)
                acc = self.sums[name]
                acc[0] += len(x)
                acc[1] += x.sum(0, dtype=np.float64)
                acc[2] += float(np.einsum("ij,ij->", x, x, dtype=np.float64))

    def state(self) -> dict:
        return {k: [n, s.tolist(), q] for k, (n, s, q) in self.sums.items()}

    def shares(self, train_kept: tuple) -> dict:
        s = self.sums
        return {"n_dropped_train": s["train_dropped"][0], "n_dropped_eval": s["eval_dropped"][0],
                "variance_share_train": variance_share(train_kept, tuple(s["train_dropped"])),
                "variance_share_eval": variance_share(tuple(s["eval_kept"]),
                                                      tuple(s["eval_dropped"]))}
