"""Description length of an SAE's explanations, after Ayonrinde, Pearce and Sharkey,
"Interpretability as Compression: Reconsidering SAE Explanations of Neural Activations with
MDL-SAEs" (2024).

The bits per token needed to send which latents fired and, for each one that fired, its value:

    DL = Σ_i [ H_b(p_i) + p_i · H(q_i) ]

p_i is latent i's firing rate on the evaluated tokens, H_b the binary entropy (0 at p = 0 or 1),
and q_i the distribution of latent i's value *given that it fired*, quantised into B equal-width
bins spanning that latent's own range [min_i, max_i] of non-zero values. Zeros are never in the
histogram (they are already paid for by H_b), and bins are not forced to start at 0 — the two
habits of SAEBench's MDL eval we do not copy. B is the coarsest of `BINS` whose quantised
reconstruction keeps the fraction of variance unexplained within the tolerance ε:

    quantised FVU = Σ‖x − decode(q)‖² / Σ‖x − x̄‖² ≤ ε

with q the acts, each fired value replaced by the centre of its bin and zeros left exact zeros
(a quantised value is never 0: bins start at min_i > 0). The naive bound
L0 · (log2 F + log2 B) (send each active latent's index and bin without entropy coding) is
reported beside it. Given prefix groups (a Matryoshka SAE's), the hierarchical code of the same
quantised latents is reported beside the flat one (`hierarchical`).

Decisions:
- The comparison is `≤ ε`; the coarsest B is the smallest B meeting it, so a stricter ε never
  picks a coarser B even where the quantised FVU is not monotone in B.
- Bin index at B is the index at 256 shifted right, so B bins are exactly the unions of pairs
  of 2B bins (nested edges, independent of float rounding at each B).
- A latent that never fired costs 0 bits; a latent whose fired values are all equal has one
  value, reproduced exactly at every B, and H(q) = 0.
- `choose` ranks feasible SAEs by (DL, naive bound, key), with DL and bound rounded to 1e-9 bits
  so summation-order noise does not decide, and keys in sorted order, not completion order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saectl.errors import ConfigError
from saectl.metrics import latents, pair
from saectl.sae.base import SAE, decode_entries

BINS = (2, 4, 8, 16, 32, 64, 128, 256)
_FINEST = BINS[-1]
_SHIFT = {b: int(math.log2(_FINEST // b)) for b in BINS}
_OFFSET = dict(zip(BINS, np.cumsum((0,) + BINS[:-1]).tolist()))  # per-latent slot of each B
KEEP_BYTES = 512 << 20
"""Pass 1 keeps each batch's target and fired latents for pass 2 up to this many bytes, so the
tokens are encoded once; past it pass 2 encodes them again. An eval split of 100k tokens at
d_in 576 and k 32 is ~280 MB (the targets 230 MB); 1M tokens would be encoded twice."""


@dataclass(frozen=True)
class DescriptionLength:
    """Description length of one SAE on one set of tokens (module docstring)."""

    bits_per_token: float | None
    """DL at the chosen B; None if no B meets the tolerance."""
    bins: int | None
    """The chosen B: the coarsest of BINS whose quantised FVU is ≤ the tolerance."""
    quantised_fvu: float | None
    """FVU of decode(quantised acts) at the chosen B."""
    naive_bound: float | None
    """L0 · (log2 d_sae + log2 B) at the chosen B."""
    l0: float
    """Mean active latents per token, of the unquantised SAE (quantising keeps it)."""
    fvu: float
    """FVU of the unquantised SAE on the same tokens."""
    feasible: bool
    """Some B met the tolerance."""
    by_bins: dict[int, dict[str, float]] = field(default_factory=dict)
    """For every B in BINS: {"fvu", "bits_per_token", "naive_bound"}, the trade-off to plot."""
    tolerance: float = math.nan
    """ε these figures were chosen at."""
    n_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (string keys in by_bins, NaN as None); `from_dict` reads it back."""
        d = {f.name: _finite_or_none(getattr(self, f.name)) for f in fields(self)
             if f.name != "by_bins"}
        d["by_bins"] = {str(b): {k: _finite_or_none(v) for k, v in e.items()}
                        for b, e in self.by_bins.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DescriptionLength:
        d = dict(d)
        d["by_bins"] = {int(b): {k: (math.nan if v is None else v) for k, v in e.items()}
                        for b, e in d["by_bins"].items()}
        for k in ("fvu", "tolerance"):
            d[k] = math.nan if d.get(k) is None else d[k]
        return cls(**d)


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def entropy_bits(counts) -> float:
    """Shannon entropy, in bits, of the distribution a histogram of counts describes (empty
    bins skipped; an empty histogram has entropy 0)."""
    return float(_row_entropy_bits(torch.as_tensor(np.asarray(counts, dtype=np.float64))[None])[0])


def _row_entropy_bits(counts: Tensor) -> Tensor:
    """Entropy in bits of each row of a (rows, bins) count tensor, float64; 0 for empty rows."""
    counts = counts.to(torch.float64)
    total = counts.sum(-1, keepdim=True)
    p = counts / total.clamp_min(1)
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(-1)


def binary_entropy(p):
    """H_b(p) = −p log2 p − (1−p) log2(1−p), 0 at p ∈ {0, 1}; a float, array or tensor."""
    if isinstance(p, Tensor):
        p = p.to(torch.float64)
        inside = (p > 0) & (p < 1)
        q = torch.where(inside, p, torch.full_like(p, 0.5))  # keeps log2 finite off the interior
        h = -(q * q.log2() + (1 - q) * (1 - q).log2())
        return torch.where(inside, h, torch.zeros_like(h))
    arr = np.asarray(p, dtype=np.float64)
    h = binary_entropy(torch.from_numpy(np.atleast_1d(arr).copy())).numpy().reshape(arr.shape)
    return float(h) if h.ndim == 0 else h


def select_bins(by_bins: dict[int, dict[str, float]], tolerance: float) -> int | None:
    """The coarsest B whose quantised FVU is ≤ tolerance, or None."""
    ok = [b for b, e in by_bins.items() if e["fvu"] <= tolerance]  # NaN never passes
    return min(ok) if ok else None


@torch.no_grad()
def description_length(sae, batches: Callable[[], Iterable[Tensor]],
                       tolerance: float, groups: tuple[int, ...] | None = None
                       ) -> DescriptionLength:
    """Description length of `sae` on raw activation batches (n, d_in).

    With `groups` (increasing prefix ends m_1 < ... < m_P = d_sae, a Matryoshka SAE's
    prefixes), each `by_bins` entry also holds the hierarchical code's figures (`hierarchical`).

    The first pass finds each latent's firing count and range of non-zero values (and the FVU
    ingredients), the second quantises at every B at once. The second pass reuses the first's
    fired latents and targets while they fit `KEEP_BYTES`, so the SAE encodes the tokens once;
    past that it encodes them again, and `batches()` must then return a fresh iterator over the
    same tokens. Memory: up to KEEP_BYTES, one batch and d_sae × 510 counts.
    """
    try:
        ok = float(tolerance) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"tolerance={tolerance!r} must be a number >= 0 (an FVU, e.g. 0.1)")
    dev, F = sae.device, sae.d_sae
    f64 = {"dtype": torch.float64, "device": dev}

    # Pass 1: ranges, and sums of (x − c) with c the first batch's mean, so the variance about
    # the mean is not the small difference of two large sums when activations sit off-centre.
    lo = torch.full((F,), math.inf, device=dev)
    hi = torch.full((F,), -math.inf, device=dev)
    n, l0, sq_err, c = 0, torch.zeros((), **f64), torch.zeros((), **f64), None
    spans = _group_spans(groups, F)
    any_fired = torch.zeros(len(spans), **f64)  # tokens with some latent of group g active
    group_l0 = torch.zeros(len(spans), **f64)  # active latents of group g, summed over tokens
    sum_x = sum_sq = torch.zeros((), **f64)
    kept: list | None = []  # pass 1's (target, fired latents) per batch, for pass 2
    kept_bytes = 0
    for x, rest, r, cl, v in _fired(sae, batches()):
        # the non-zero latents only (rows, then columns, sorted), never the dense block
        fired = v > 0
        f_rows, f_cols, f_vals = r[fired], cl[fired], v[fired]
        lo.scatter_reduce_(0, f_cols, f_vals, "amin")
        hi.scatter_reduce_(0, f_cols, f_vals, "amax")
        l0 += f_vals.numel()
        for g, (a, b) in enumerate(spans):
            in_g = (f_cols >= a) & (f_cols < b)
            any_fired[g] += torch.unique_consecutive(f_rows[in_g]).numel()
            group_l0[g] += in_g.sum()
        sq_err += (rest.double() - _decode_at(sae, x.shape[0], r, cl, v)
                   .double()).square().sum()
        if kept is not None:
            kept_bytes += sum(t.numel() * t.element_size() for t in (rest, r, cl, v))
            if kept_bytes <= KEEP_BYTES:  # a copy: the caller may refill its batch in place
                kept.append((rest.clone(), r, cl, v))
            else:
                kept = None  # too many: pass 2 encodes again
        if c is None:
            c = x.double().mean(0)
        xc = x.double() - c
        sum_x, sum_sq = sum_x + xc.sum(0), sum_sq + xc.square().sum()
        n += x.shape[0]
    if n == 0:
        raise ValueError("no evaluation tokens: batches() yielded nothing")
    total_var = float(sum_sq - sum_x.square().sum() / n)
    span = (hi - lo).nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp_min(0)  # never fired: 0
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    safe_span = torch.where(span > 0, span, torch.ones_like(span))

    # Pass 2: every fired value's bin at 256 and, by shifting, at each coarser B; per-latent
    # histograms for all B in one flat count vector, and the squared error of decode(q).
    counts = torch.zeros(F * sum(BINS), dtype=torch.int64, device=dev)
    q_err = {b: torch.zeros((), **f64) for b in BINS}
    n2 = 0
    for rest, rows, cols, vals in (kept if kept is not None else
                                   (f[1:] for f in _fired(sae, batches()))):
        # only the fired entries are touched: zeros stay exact zeros, and TopK-sparse acts
        # cost per fired value, not per (token, latent)
        up = vals > 0
        rows, cols, vals = rows[up], cols[up], vals[up]
        lo_c, span_c = lo[cols], span[cols]
        u = (vals - lo_c) / safe_span[cols]  # single-valued: u = 0, value min_i
        fine = (u * _FINEST).floor().clamp_(0, _FINEST - 1).to(torch.int64)
        x64 = rest.double()
        slots = []
        for b in BINS:
            idx = fine >> _SHIFT[b]
            q = lo_c + (idx + 0.5) * (span_c / b)
            q_err[b] += (x64 - _decode_at(sae, rest.shape[0], rows, cols, q).double()
                         ).square().sum()
            slots.append(F * _OFFSET[b] + cols * b + idx)
        if slots[0].numel():
            counts += torch.bincount(torch.cat(slots), minlength=counts.numel())
        n2 += rest.shape[0]
    if n2 != n:
        raise ValueError(f"batches() yielded {n} tokens, then {n2}: it must return the same "
                         f"tokens on each call")

    l0_per_token = float(l0) / n
    by_bins: dict[int, dict[str, float]] = {}
    for b in BINS:
        hist = counts[F * _OFFSET[b]: F * (_OFFSET[b] + b)].view(F, b)
        fires = hist.sum(-1).to(torch.float64)  # = pass-1 firing counts when encode is stable
        p = fires / n
        dl = float((binary_entropy(p) + p * _row_entropy_bits(hist)).sum())
        by_bins[b] = {"fvu": _fvu(q_err[b], total_var), "bits_per_token": dl,
                      "naive_bound": naive_bound(l0_per_token, F, b)}
        if spans:
            by_bins[b].update(hierarchical(p, _row_entropy_bits(hist), spans,
                                           (any_fired / n).cpu(), (group_l0 / n).cpu(), b))
    chosen = select_bins(by_bins, tolerance)
    at = by_bins.get(chosen, {}) if chosen is not None else {}
    return DescriptionLength(
        bits_per_token=at.get("bits_per_token"), bins=chosen, quantised_fvu=at.get("fvu"),
        naive_bound=at.get("naive_bound"), l0=l0_per_token, fvu=_fvu(sq_err, total_var),
        feasible=chosen is not None, by_bins=by_bins, tolerance=float(tolerance), n_tokens=n)


def hierarchical(p: Tensor, h_q: Tensor, spans: list[tuple[int, int]], a: Tensor,
                 group_l0: Tensor, bins: int) -> dict[str, float]:
    """The hierarchical code of a token's active latents, with latents in prefix groups
    G_g = [m_(g-1), m_g) (a Matryoshka SAE's), beside the flat code (README, "MDL on MNIST"):

    - entropy-coded, beside DL: per group, whether any of its latents fired (H_b(a_g), a_g the
      share of tokens where one did), then, only when one did, which of them fired, each latent
      at its rate given that (H_b(p_i / a_g)), and each fired value as in DL:
          Σ_g [H_b(a_g) + a_g Σ_(i∈G_g) H_b(p_i / a_g)] + Σ_i p_i H(q_i)
      A group that fires on every token costs what the flat code does; one silent on most
      tokens is paid for once instead of once per latent.
    - naive, beside the naive bound: each active latent's group in log2 P bits, its index
      within the group in log2 |G_g| bits and its bin in log2 B bits:
          Σ_g L0_g (log2 P + log2 |G_g|) + L0 log2 B
    p: (d_sae,) firing rates; h_q: (d_sae,) H(q_i) at B; a, group_l0: (P,) per group."""
    p, h_q = p.cpu(), h_q.cpu()
    bits = float((p * h_q).sum())
    naive = float(group_l0.sum()) * math.log2(bins)
    for g, (lo, hi) in enumerate(spans):
        ag = float(a[g])
        inside = p[lo:hi] / ag if ag > 0 else torch.zeros(hi - lo, dtype=p.dtype)
        bits += float(binary_entropy(torch.tensor(ag))) + ag * float(binary_entropy(inside).sum())
        naive += float(group_l0[g]) * (math.log2(len(spans)) + math.log2(hi - lo))
    return {"hierarchical_bits_per_token": bits, "hierarchical_naive_bound": naive}


def _group_spans(groups: tuple[int, ...] | None, d_sae: int) -> list[tuple[int, int]]:
    """Prefix ends → [(start, end)] of each group; [] without groups."""
    if not groups:
        return []
    ends = [int(m) for m in groups]
    if any(b <= a for a, b in zip([0, *ends], ends)) or ends[-1] != d_sae:
        raise ConfigError(f"groups {','.join(map(str, ends))} must increase and end at the "
                          f"width {d_sae}, e.g. {d_sae // 4},{d_sae}")
    return list(zip([0, *ends[:-1]], ends))


def naive_bound(l0: float, d_sae: int, bins: int) -> float:
    """L0 · (log2 F + log2 B): bits per token to send each active latent's index and bin."""
    return l0 * (math.log2(d_sae) + math.log2(bins))


def _fvu(sq_err: Tensor, total_var: float) -> float:
    return float(sq_err) / total_var if total_var > 0 else math.nan


def _decode_at(sae, n: int, rows: Tensor, cols: Tensor, vals: Tensor) -> Tensor:
    """`sae.decode` of n tokens' latents holding `vals` at (rows, cols) (row-major, as
    `nonzero` gives them) and zero elsewhere. One embedding_bag, at a cost per fired value,
    where the dense product costs per (token, latent): at 32x width, k 32, 22 ms against 1.4
    s a batch (the quantisation decodes every batch at all 8 B). The dense product where more
    than an eighth of the latents fire (embedding_bag breaks even at about a quarter), or for
    an SAE with a decode of its own (none today)."""
    if type(sae).decode is not SAE.decode or vals.numel() * 8 > n * sae.d_sae:
        q = torch.zeros((n, sae.d_sae), dtype=sae.dtype, device=vals.device)
        q[rows, cols] = vals.to(sae.dtype)
        return sae.decode(q)
    return decode_entries(n, rows, cols, vals, sae.W_dec) + sae.b_dec


def _fired(sae, batches: Iterable[Tensor]):
    """(target, what the latents must reconstruct of the target, and the rows, columns and
    values of the non-zero latents, rows then columns sorted) per batch, float32 on the
    SAE's device: an SAE's target is its input; a transcoder's is y of the pair (x, y), less
    its skip path x @ W_skip, which the latents' quantisation does not touch."""
    for batch in batches:
        x, y = pair(batch)
        if x.shape[-1] != sae.d_in:
                raise ConfigError(f"the SAE reads d_in={sae.d_in} but the activations have "
                              f"d={x.shape[-1]}; pair the SAE with activations from its own hook")
        x = x.reshape(-1, sae.d_in).to(sae.device, torch.float32)
        if x.shape[0] == 0:
            continue
        y = y.reshape(x.shape[0], -1).to(sae.device, torch.float32)
        acts = latents(sae, x)
        acts = (acts if acts.is_sparse else acts.to_sparse()).coalesce()
        (rows, cols), vals = acts.indices(), acts.values().float()
        skip = getattr(sae, "W_skip", None)
        yield y, (y - x @ skip if skip is not None else y), rows, cols, vals


def choose(results: dict[str, DescriptionLength], tolerance: float) -> tuple[str | None, str]:
    """(key of the least-DL SAE whose quantised FVU meets tolerance, a one-line message).

    Feasibility is re-read from each result's `by_bins` at this tolerance, so results computed
    at another ε are judged alike. Ties: lower naive bound, then sorted key. With no feasible
    SAE: (None, a message naming the closest, the lowest quantised FVU at any B, and the
    tolerance that would admit it)."""
    ranked = []
    for key in sorted(results):
        r = results[key]
        b = select_bins(r.by_bins, tolerance)
        if b is not None:
            e = r.by_bins[b]
            ranked.append((round(e["bits_per_token"], 9), round(e["naive_bound"], 9), key, b))
    if ranked:
        dl, _, key, b = min(ranked)
        return key, (f"chose {key}: {dl:.4g} bits/token at B={b}, the least DL of "
                     f"{len(ranked)} of {len(results)} SAEs with quantised FVU <= {tolerance:g}")
    if not results:
        return None, "no SAEs to choose from"
    best = []
    for key in sorted(results):
        fvus = [(e["fvu"], b) for b, e in results[key].by_bins.items() if not math.isnan(e["fvu"])]
        if fvus:
            best.append((*min(fvus), key))
    if not best:
        return None, (f"no SAE meets tolerance {tolerance:g}, and none has a finite quantised "
                      f"FVU (constant activations?)")
    fvu, b, key = min(best)
    return None, (f"no SAE meets tolerance {tolerance:g}: the closest is {key}, quantised FVU "
                  f"{fvu:.4g} at B={b} (unquantised {results[key].fvu:.4g}); a tolerance of "
                  f"{fvu:.4g} or more would admit it")
