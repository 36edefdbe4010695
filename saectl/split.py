"""The shuffle's split and order (stages/shuffle.py): which sequences are eval and where
each kept token row lands (`Split`), and a keyed bijection of [0, n) evaluated a block at a
time, so the shuffled order never has to be held as an array (`Permutation`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixed round function on uint64."""
    with np.errstate(over="ignore"):
        z = x + key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Permutation:
    """A bijection of [0, n) keyed by `seed`: a balanced Feistel network on 2·h bits
    (4^h ≥ n), cycle-walked back into range (expected < 4 walks)."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int):
        self.n = n
        self.h = max(1, math.ceil(math.log2(max(n, 2)) / 2))
        rng = np.random.default_rng([seed, 0x5AEC7])
        self.keys = rng.integers(0, 2**63, size=self.ROUNDS, dtype=np.uint64)
        self.mask = np.uint64((1 << self.h) - 1)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.h)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right, k) & self.mask)
        return (left << h) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        y = self._feistel(idx.astype(np.uint64))
        out = y >= np.uint64(self.n)
        while out.any():
            y[out] = self._feistel(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)


@dataclass(frozen=True)
class Split:
    """Which sequences are eval, and how token rows map to train/eval indices."""

    C: int
    is_eval: np.ndarray  # (n_seq,) bool
    first: int           # first position kept in each sequence (1 drops BOS)
    # Sorted harvest rows (at positions ≥ first) left out of both splits: the outliers.
    excluded: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))

    @property
    def per_seq(self) -> int:
        return self.C - self.first

    def _excluded(self, want_eval: bool) -> np.ndarray:
        return self.excluded[self.is_eval[self.excluded // self.C] == want_eval]

    def counts(self) -> tuple[int, int]:
        n_eval = int(self.is_eval.sum())
        return ((len(self.is_eval) - n_eval) * self.per_seq - len(self._excluded(False)),
                n_eval * self.per_seq - len(self._excluded(True)))

    def index(self, rows: np.ndarray, want_eval: bool) -> tuple[np.ndarray, np.ndarray]:
        """(mask over rows, index of each selected row within its split, in harvest order)."""
        seq, pos = rows // self.C, rows % self.C
        sel = self.is_eval[seq] == want_eval
        before = np.concatenate([[0], np.cumsum(self.is_eval == want_eval)])[seq]
        mask = sel & (pos >= self.first)
        index = before * self.per_seq + pos - self.first
        out = self._excluded(want_eval)
        if len(out):  # each left-out row shifts the later rows of its split down by one
            mask &= ~np.isin(rows, out)
            index = index - np.searchsorted(out, rows)
        return mask, index[mask]

    def rows(self, want_eval: bool) -> np.ndarray:
        """The harvest row of every row in the split, in harvest order."""
        seqs = np.flatnonzero(self.is_eval == want_eval)
        rows = (seqs[:, None] * self.C + np.arange(self.first, self.C)[None]).reshape(-1)
        if len(self.excluded):
            rows = rows[~np.isin(rows, self.excluded)]
        return rows.astype(np.int64)
