"""Example selection: which token windows show a feature, to a person (the dashboard) and to
the explainer and its scorer (sampled as EleutherAI's delphi does: top, quantile, held-out
activating and non-activating contexts).

The scan (`saectl.scan`) leaves, per feature *slot* (its row in the scan's arrays), its top
contexts, one per sequence, and `pool`, a uniform sample of the sequences it fires on. From
them `choose` asks for windows of each `Kind`:

- TOP: every top context;
- QUANTILE: `per_quantile` contexts from each of `quantiles` slices of the pool sorted by
  activation (outside the top list);
- POSITIVE: up to `detection` of the pool's other contexts, held out for scoring;
- NEGATIVE: `3 × detection` random sequences; `keep` drops those where the feature fires
  anywhere in the window, then all but `detection` per feature.

A window is `width` tokens with the activating token about 3/4 along. After the windows pass
has read their activations, `save` stores them (`windows/...`) and `Windows` reads them back
as `Example`s. Every draw is a hash of (seed, sequence, feature) (`hash_keys`), so examples
never depend on how the scan was cut into blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from saectl import layout
from saectl.explain import Example

NO_SEQ = -1
"""A top or pool slot left empty (the feature fired in fewer sequences)."""
NEGATIVE_SEQS = 4096  # negatives are drawn from the first this many sequences
COLUMNS = ("slot", "kind", "quantile", "seq", "start")


class Kind(IntEnum):
    """What an example window is for; stored as these integers in `windows/kind`."""

    TOP = 0
    QUANTILE = 1
    POSITIVE = 2
    NEGATIVE = 3


def hash_keys(seed: int, seqs: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) keys for every (sequence, feature) pair: splitmix64 of the pair and the
    seed, so a key never depends on which block a sequence was read in."""
    with np.errstate(over="ignore"):
        z = (seqs.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
             + feats.astype(np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03)
             + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x8CB92BA72F3D8DD7))
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


@dataclass(frozen=True)
class Placement:
    """Where a window sits inside a sequence of `context_size` tokens."""

    context_size: int
    width: int
    skip_first: bool
    """Position 0 is BOS: never the start of a window."""

    def start(self, pos: int) -> int:
        """The window's first token, with token `pos` about 3/4 along."""
        if self.width == 1:
            return int(pos)
        lo = 1 if self.skip_first else 0
        return int(min(max(pos - (3 * self.width) // 4, lo), self.context_size - self.width))


@dataclass
class Requests:
    """The windows to read, one row each, as columns."""

    slot: np.ndarray
    kind: np.ndarray
    quantile: np.ndarray
    """The activation quantile of a QUANTILE window; -1 for the other kinds."""
    seq: np.ndarray
    start: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[tuple]) -> Requests:
        cols = np.array(rows, dtype=np.int64).reshape(-1, len(COLUMNS)).T
        return cls(*(np.ascontiguousarray(c) for c in cols))

    def __len__(self) -> int:
        return len(self.slot)

    def select(self, mask: np.ndarray) -> Requests:
        return Requests(*(getattr(self, c)[mask] for c in COLUMNS))


def embedded(fired: np.ndarray, limit: int, seed: int) -> list[int]:
    """Slots whose examples the dashboard embeds: all live ones, or a seeded sample of
    `limit`."""
    live = np.flatnonzero(fired > 0)
    if len(live) <= limit:
        return live.tolist()
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(live, limit, replace=False)).tolist()


def choose(scan, place: Placement, n_seq: int, *, quantiles: int, per_quantile: int,
           detection: int, seed: int, dashboard_max: int) -> Requests:
    """Every window to read for the slots `embedded` picks, from the scan's `Stats`."""
    rows: list[tuple] = []
    lo_tok = 1 if place.skip_first else 0
    for j in embedded(scan.fired, dashboard_max, seed):
        top_seq = scan.top_seq[j]
        for s, p in zip(top_seq, scan.top_pos[j]):
            if s != NO_SEQ:
                rows.append((j, Kind.TOP, -1, s, place.start(p)))
        shown = set(top_seq[top_seq != NO_SEQ].tolist())
        ok = scan.pool_seq[j] != NO_SEQ
        cand = [(a, s, p) for a, s, p in zip(scan.pool_act[j][ok], scan.pool_seq[j][ok],
                                             scan.pool_pos[j][ok]) if s not in shown]
        cand.sort(key=lambda t: (t[0], t[1]))  # by activation: quantiles are slices
        held = []
        for q, idx in enumerate(np.array_split(np.arange(len(cand)), quantiles)):
            pick = idx[:: max(1, len(idx) // per_quantile)][:per_quantile]
            for i in pick:
                rows.append((j, Kind.QUANTILE, q, cand[i][1], place.start(cand[i][2])))
            held += [i for i in idx if i not in set(pick.tolist())]
        for i in held[:: max(1, len(held) // detection)][:detection]:
            rows.append((j, Kind.POSITIVE, -1, cand[i][1], place.start(cand[i][2])))
        # Non-activating candidates: random sequences, at a random start (checked by `keep`).
        f = scan.features[j]
        keys = hash_keys(seed + 1, np.arange(min(n_seq, NEGATIVE_SEQS)), np.array([f]))[:, 0]
        span = max(1, place.context_size - lo_tok - place.width + 1)
        for s in np.argsort(keys)[: 3 * detection]:
            if s in shown:
                continue
            start = lo_tok + int(hash_keys(seed, np.array([s]), np.array([f]))[0, 0] * span)
            rows.append((j, Kind.NEGATIVE, -1, int(s), start))
    return Requests.from_rows(rows)


def keep(req: Requests, acts: np.ndarray, detection: int) -> np.ndarray:
    """Which windows to keep: a non-activating context must not activate anywhere in what is
    shown, and each feature keeps its first `detection` of those."""
    silent = ~((req.kind == Kind.NEGATIVE) & (acts > 0).any(1))
    neg = np.flatnonzero(silent & (req.kind == Kind.NEGATIVE))
    slot_neg = req.slot[neg]
    first = np.concatenate([[True], slot_neg[1:] != slot_neg[:-1]]) if len(neg) else []
    rank = np.zeros(len(neg), dtype=np.int64)  # the rank of each negative within its slot
    for i in range(1, len(neg)):
        rank[i] = 0 if first[i] else rank[i - 1] + 1
    out = silent.copy()
    out[neg[rank >= detection]] = False
    return out


def save(group, req: Requests, acts: np.ndarray, width: int, token_ids=None) -> None:
    """Store the windows (`windows/...`), with their token ids when the source has tokens."""
    for name in COLUMNS:
        group.create_array(layout.member(layout.WINDOWS, name),
                           data=np.ascontiguousarray(getattr(req, name)), overwrite=True)
    group.create_array(layout.member(layout.WINDOWS, "acts"), data=acts.reshape(-1, width),
                       overwrite=True)
    if token_ids is not None:
        seqs, where = np.unique(req.seq, return_inverse=True)
        rows = np.asarray(token_ids.get_orthogonal_selection(
            (seqs, slice(None)))).reshape(len(seqs), -1)
        cols = req.start[:, None] + np.arange(width)
        group.create_array(layout.member(layout.WINDOWS, "tokens"),
                           data=rows[where[:, None], cols].astype(np.int32), overwrite=True)


class Windows:
    """The stored windows of an interpret artifact, as `Example`s per slot and kind."""

    def __init__(self, group, context_size: int):
        self.cols = {c: group[layout.member(layout.WINDOWS, c)][:] for c in COLUMNS}
        self.acts = group[layout.member(layout.WINDOWS, "acts")][:]
        tokens = layout.member(layout.WINDOWS, "tokens")
        self.tokens = group[tokens][:] if tokens in group else None
        """Token ids (n, width), or None for imported activations (examples are row numbers)."""
        self.context_size = context_size
        order = np.argsort(self.cols["slot"], kind="stable")
        slots, first = np.unique(self.cols["slot"][order], return_index=True)
        self.by_slot = dict(zip(slots.tolist(), np.split(order, first[1:])))

    def _of(self, slot: int, kind: Kind) -> np.ndarray:
        idx = self.by_slot.get(slot, np.zeros(0, np.int64))
        return idx[self.cols["kind"][idx] == kind]

    def has(self, slot: int, kind: Kind) -> bool:
        return len(self._of(slot, kind)) > 0

    def examples(self, slot: int, kind: Kind,
                 strings: dict[int, str] | None) -> list[tuple[int, Example]]:
        """[(quantile, Example)] of one slot and kind, in stored order; `strings` decodes the
        token ids."""
        out = []
        for i in self._of(slot, kind):
            if self.tokens is not None:
                tokens = [strings[int(t)] for t in self.tokens[i]]
            else:
                row = int(self.cols["seq"][i]) * self.context_size + int(self.cols["start"][i])
                tokens = [f"row {row}"]
            out.append((int(self.cols["quantile"][i]), Example(tokens, self.acts[i].tolist())))
        return out

    def one_per_quantile(self, slot: int, strings) -> list[Example]:
        """The first QUANTILE example of each quantile."""
        seen, out = set(), []
        for q, ex in self.examples(slot, Kind.QUANTILE, strings):
            if q not in seen:
                seen.add(q)
                out.append(ex)
        return out


def cut(ex: Example, n: int) -> Example:
    """A prompt's part of a context: `n` tokens placed as in the window, the maximum ~3/4
    along (a non-activating context keeps its end)."""
    if len(ex.tokens) <= n:
        return ex
    peak = int(np.argmax(ex.acts)) if max(ex.acts) > 0 else len(ex.tokens) - 1
    lo = min(max(peak - (3 * n) // 4, 0), len(ex.tokens) - n)
    return Example(ex.tokens[lo:lo + n], ex.acts[lo:lo + n])
