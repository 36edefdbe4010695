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
token windows (`saectl.examples` chooses them), which the dashboard shades and the explainer
reads. `Source` gives both passes an SAE over a harvest's activations, block by block; `save`
and `load` keep the statistics in an interpret artifact, `save_lens` the logit lens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from saectl import arrays, layout
from saectl.examples import NO_SEQ, hash_keys
from saectl.threads import one_thread

HIST_EDGES = np.round(np.arange(-6.0, 4.0 + 1e-9, 0.05), 2)
"""log10(activation) bin edges: 1e-6 to 1e4 in 200 bins; values outside go to the end bins."""
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
    threads = torch.get_num_threads()
    try:
        for seq0, x in blocks:
            S, C, d = x.shape
            torch.set_num_threads(threads)
            a = encode(x.reshape(S * C, d))
            # The bookkeeping below is ~40 small kernels a block (the nonzeros, and per sequence
            # and feature); on several threads each waits at a barrier for the others, which on a
            # loaded machine cost ~15 ms a kernel (issue 22): one thread, then the encode's again.
            torch.set_num_threads(1)
            # Everything below works on the nonzero entries only: an SAE's activations are sparse,
            # and passes over the dense block cost more than the encode itself. A sparse encode
            # (`latents`) hands them over in the order a dense one's nonzero() finds them.
            if a.is_sparse:
                ij = a.indices()
                flat, vals = (ij[0] * n_f + ij[1]).cpu(), a.values().float().cpu()
            else:
                a = a.reshape(-1)
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
    finally:
        torch.set_num_threads(threads)
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


class Source:
    """An SAE over a harvest's activations at one hook, read in blocks of whole sequences."""

    def __init__(self, acts, artifact: str, sae, device, features: np.ndarray, n_seq: int,
                 context_size: int, memory_bytes: int):
        self.acts, self.artifact, self.sae, self.device = acts, artifact, sae, device
        self.features, self.n_seq, self.C = features, n_seq, context_size
        d_sae = sae.cfg.d_sae
        per_token = 4 * (d_sae + 4 * len(features))  # encode output + per-feature working set
        self.seqs_per_block = max(1, memory_bytes // (per_token * context_size))
        self._all = len(features) == d_sae
        self._sparse = latents(sae, features)

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Sequences lo..hi as (hi - lo, C, d) float32."""
        x = arrays.read(self.acts, slice(lo * self.C, hi * self.C), artifact=self.artifact)
        return torch.from_numpy(np.ascontiguousarray(x)).view(hi - lo, self.C, -1)

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for lo in range(0, self.n_seq, self.seqs_per_block):
            yield lo, self.read(lo, min(lo + self.seqs_per_block, self.n_seq))

    def encode_all(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.sae.encode(x.to(self.device))

    def encode_selected(self, x: torch.Tensor) -> torch.Tensor:
        if self._sparse is not None:
            with torch.inference_mode():
                return self._sparse(x.to(self.device))
        a = self.encode_all(x)
        if self._all:
            return a
        return a.index_select(1, torch.from_numpy(self.features).to(a.device))


def latents(sae, features: np.ndarray | None = None):
    """For a TopK SAE (whose encode is TopKSAE's own), an encode of the chosen `features` that
    returns them as a sparse COO tensor: the same values as the dense encode's, without
    writing the dense (N, d_sae) block the scan would then search for its nonzeros (at 32x
    width, more time than the statistics themselves). None for other SAEs."""
    from saectl.sae.topk import TopKSAE, top_k, topk_latents

    if type(sae).encode is not TopKSAE.encode:
        return None
    d_sae, k = sae.cfg.d_sae, sae.cfg.k
    n_f = d_sae if features is None else len(features)
    col = None
    if features is not None and not np.array_equal(features, np.arange(d_sae)):
        col = torch.full((d_sae,), -1, dtype=torch.int64)
        col[torch.from_numpy(np.asarray(features))] = torch.arange(n_f)

    def encode(x: torch.Tensor) -> torch.Tensor:
        vals, idx = top_k(sae.pre_acts(x), k)
        with one_thread():  # (N, k) small kernels: see scan
            if col is not None:
                idx = col.to(idx.device)[idx]  # -1: a latent the scan does not keep
            return topk_latents(vals, idx, n_f)

    return encode


# How the statistics are kept in an interpret artifact (names from saectl/layout.py).
N_TOKENS = "n_tokens"  # a group attribute
ARRAYS = {  # a `Stats` field: its array
    "features": layout.FEATURES,
    **{name: layout.stat(name) for name in ("fired", "act_sum", "max_act", "hist")},
    **{f"{kept}_{name}": layout.member(group, name)
       for kept, group in (("top", layout.TOP), ("pool", layout.POOL))
       for name in ("act", "seq", "pos")}}
LENS_NAMES = ("pos_ids", "pos_vals", "neg_ids", "neg_vals")


def save(group, st: Stats) -> None:
    """The statistics as `features`, `stats/...`, `top/...`, `pool/...` and `n_tokens`."""
    group.attrs[N_TOKENS] = st.n_tokens
    for name, path in ARRAYS.items():
        group.create_array(path, data=np.ascontiguousarray(getattr(st, name)), overwrite=True)
    group.create_array(layout.stat("density"), data=st.density.astype(np.float64),
                       overwrite=True)
    group[layout.stat("hist")].attrs["log10_edges"] = HIST_EDGES.tolist()


def load(group) -> Stats:
    return Stats(n_tokens=int(group.attrs[N_TOKENS]),
                 **{name: group[path][:] for name, path in ARRAYS.items()})


def save_lens(group, lens: tuple) -> None:
    """The logit lens (`saectl.lineage.logit_lens`'s four (n, k) tensors) as `lens/...`."""
    for name, t in zip(LENS_NAMES, lens):
        group.create_array(layout.member(layout.LENS, name), data=t.cpu().numpy(),
                           overwrite=True)


def load_lens(group) -> dict[str, np.ndarray] | None:
    if layout.member(layout.LENS, LENS_NAMES[0]) not in group:
        return None
    return {name: group[layout.member(layout.LENS, name)][:] for name in LENS_NAMES}
