"""Streaming feature statistics: one pass of an SAE over stored activations, in bounded memory.

Per feature, kept incrementally block by block (nothing grows with the number of tokens):
- how many tokens it fires on, the sum and the maximum of its activations;
- a histogram of log10 activations over fixed bins (`HIST_EDGES`), so blocks just add;
- the `top` contexts by their maximum activation, one per sequence (so a feature that fires
  on every token of one document does not fill its top list with that document), merged by a
  stable sort on (activation desc, sequence asc): the same list a full sort gives, whatever
  the block size;
- a uniform sample of the sequences it fires on, without replacement (a bottom-k sample on a
  hash of (seed, sequence, feature)): the pool quantile examples and held-out examples for
  scoring are drawn from, as delphi's quantile sampling does, exact for any block size.

`windows` is the second pass: the per-token activations of chosen features over chosen
token windows, which the dashboard shades and the explainer reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

HIST_EDGES = np.round(np.arange(-6.0, 4.0 + 1e-9, 0.05), 2)
"""log10(activation) bin edges: 1e-6 to 1e4 in 200 bins; values outside go to the end bins."""
NO_SEQ = -1
MERGE_EVERY = 64  # sequences buffered between merges into the top lists


@dataclass
class Stats:
    features: np.ndarray  # (n_f,) the SAE's latent index of each row below
    n_tokens: int  # tokens scanned (BOS positions excluded)
    fired: np.ndarray  # (n_f,) int64 tokens with activation > 0
    act_sum: np.ndarray  # (n_f,) float64
    max_act: np.ndarray  # (n_f,) float32
    hist: np.ndarray  # (n_f, len(HIST_EDGES) - 1) int64
    top_act: np.ndarray  # (n_f, top) float32; 0 where a feature fired in fewer sequences
    top_seq: np.ndarray  # (n_f, top) int64; NO_SEQ in those slots
    top_pos: np.ndarray  # (n_f, top) int64 position of the maximum inside the sequence
    pool_act: np.ndarray  # (n_f, pool) the uniform sample of firing sequences, by key
    pool_seq: np.ndarray
    pool_pos: np.ndarray

    @property
    def density(self) -> np.ndarray:
        return self.fired / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> np.ndarray:
        """Mean activation over the tokens where the feature fired (NaN where it never did)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.fired > 0, self.act_sum / self.fired, np.nan)


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


def _merge(keep: tuple, cand: tuple, n: int, descending: bool) -> tuple:
    """The first `n` of running ∪ candidate rows per feature, by the first tensor, stable
    (running entries, from earlier sequences, win ties)."""
    both = [torch.cat([a, b], dim=1) for a, b in zip(keep, cand)]
    order = torch.sort(both[0], dim=1, descending=descending, stable=True).indices[:, :n]
    return tuple(t.gather(1, order) for t in both)


def _flush(best: tuple, keyed: tuple, pending: list[tuple], top: int, pool: int):
    """Merge the pending blocks' per-sequence maxima into the top list and the pool."""
    if not pending:
        return best, keyed
    m, seqs, pos, keys = (torch.cat(t, dim=1) for t in zip(*pending))
    return (_merge(best, (m, seqs, pos), top, descending=True),
            _merge(keyed, (keys, m, seqs, pos), pool, descending=False))


@torch.inference_mode()
def scan(blocks: Iterator[tuple[int, torch.Tensor]], encode: Callable[[torch.Tensor], torch.Tensor],
         features: np.ndarray, *, top: int, pool: int, seed: int = 0, skip_first: bool = False,
         on_block: Callable[[int], None] | None = None) -> Stats:
    """Statistics of `features` over `blocks` of (first sequence number, acts (S, C, d)).

    `encode` maps (N, d) to the activations of the chosen features (N, n_f). `skip_first`
    leaves out each sequence's position 0 (BOS, whose residual is an outlier no feature
    explains). `on_block(tokens)` reports progress."""
    n_f = len(features)
    nb = len(HIST_EDGES) - 1
    fired = torch.zeros(n_f, dtype=torch.int64)
    act_sum = torch.zeros(n_f, dtype=torch.float64)
    max_act = torch.zeros(n_f)
    hist = torch.zeros(n_f * nb, dtype=torch.int64)
    neg = torch.full((n_f, top), -1.0), torch.full((n_f, top), NO_SEQ), torch.zeros(n_f, top, dtype=torch.int64)
    keyed = (torch.full((n_f, pool), 2.0, dtype=torch.float64), torch.zeros(n_f, pool),
             torch.full((n_f, pool), NO_SEQ), torch.zeros(n_f, pool, dtype=torch.int64))
    best = neg
    n_tokens = 0
    pending: list[tuple] = []
    n_pending = 0
    lo_edge, width = float(HIST_EDGES[0]), float(HIST_EDGES[1] - HIST_EDGES[0])
    for seq0, x in blocks:
        S, C, d = x.shape
        a = encode(x.reshape(S * C, d)).reshape(-1)
        # Everything below works on the nonzero entries only: an SAE's activations are sparse,
        # and passes over the dense block cost more than the encode itself.
        flat = torch.nonzero(a > 0).squeeze(1)
        vals = a[flat].float().cpu()
        flat = flat.cpu()
        tok, f = flat // n_f, flat % n_f
        c, s = tok % C, tok // C
        if skip_first:
            keep = c > 0
            vals, f, c, s = vals[keep], f[keep], c[keep], s[keep]
        n_tokens += S * (C - skip_first)
        fired += torch.bincount(f, minlength=n_f)
        act_sum += torch.bincount(f, weights=vals.double(), minlength=n_f)
        bins = ((vals.log10() - lo_edge) / width).floor().long().clamp_(0, nb - 1)
        hist += torch.bincount(f * nb + bins, minlength=n_f * nb)
        # Each sequence's maximum per feature, and its first position.
        key = s * n_f + f
        m = torch.zeros(S * n_f).scatter_reduce_(0, key, vals, "amax")
        at_max = vals == m[key]
        pos = torch.full((S * n_f,), C, dtype=torch.int64).scatter_reduce_(
            0, key[at_max], c[at_max], "amin")
        m, pos = m.view(S, n_f), pos.view(S, n_f).clamp_(max=C - 1)
        max_act = torch.maximum(max_act, m.max(0).values)
        keys = torch.from_numpy(hash_keys(seed, np.arange(seq0, seq0 + S), features)).T
        keys = torch.where(m.T > 0, keys, 2.0)  # only sequences where it fires enter the pool
        pending.append((m.T, torch.arange(seq0, seq0 + S).expand(n_f, S), pos.T, keys))
        n_pending += S
        if n_pending >= MERGE_EVERY:  # a sort per few blocks, not per block
            best, keyed = _flush(best, keyed, pending, top, pool)
            pending, n_pending = [], 0
        if on_block:
            on_block(S * C)
    best, keyed = _flush(best, keyed, pending, top, pool)
    top_act, top_seq, top_pos = best
    invalid = top_act <= 0
    pkey, pool_act, pool_seq, pool_pos = keyed
    pool_seq = torch.where(pkey < 2.0, pool_seq, NO_SEQ)
    return Stats(features=np.asarray(features), n_tokens=n_tokens, fired=fired.numpy(),
                 act_sum=act_sum.numpy(), max_act=max_act.numpy(),
                 hist=hist.view(n_f, nb).numpy(),
                 top_act=top_act.masked_fill(invalid, 0).numpy(),
                 top_seq=top_seq.masked_fill(invalid, NO_SEQ).numpy(), top_pos=top_pos.numpy(),
                 pool_act=pool_act.numpy(), pool_seq=pool_seq.numpy(), pool_pos=pool_pos.numpy())


@torch.inference_mode()
def windows(read: Callable[[int, int], torch.Tensor], encode_all: Callable[[torch.Tensor], torch.Tensor],
            seq: np.ndarray, start: np.ndarray, feature: np.ndarray, width: int,
            seqs_per_block: int, n_seq: int,
            on_block: Callable[[int], None] | None = None) -> np.ndarray:
    """Activations (R, width) of latent `feature[r]` over tokens `start[r]:start[r]+width` of
    sequence `seq[r]`. `read(lo, hi)` returns sequences lo..hi as (hi-lo, C, d); `encode_all`
    maps (N, d) to all the SAE's latents (N, d_sae). Only blocks holding a requested sequence
    are read, and only the requested sequences in them are encoded."""
    out = np.zeros((len(seq), width), dtype=np.float32)
    order = np.argsort(seq, kind="stable")
    bounds = np.searchsorted(seq[order], np.arange(0, n_seq + seqs_per_block, seqs_per_block))
    offs = torch.arange(width)
    for b in range(len(bounds) - 1):
        rows = order[bounds[b]:bounds[b + 1]]
        if not len(rows):
            continue
        lo = b * seqs_per_block
        x = read(lo, min(lo + seqs_per_block, n_seq))
        needed, local = np.unique(seq[rows] - lo, return_inverse=True)
        S, C, d = len(needed), x.shape[1], x.shape[2]
        a = encode_all(x[torch.from_numpy(needed)].reshape(S * C, d)).float().cpu()
        a = a.reshape(S, C, -1)
        r_local = torch.from_numpy(local)
        cols = torch.from_numpy(start[rows])[:, None] + offs
        out[rows] = a[r_local[:, None], cols, torch.from_numpy(feature[rows])[:, None]].numpy()
        if on_block:
            on_block(len(rows))
    return out
