"""The eval stage's CE-loss and KL scores (saectl.evaluation): the SAE spliced into its model
on held-out sequences by `saectl.metrics.spliced`, and, for a sweep's points, one splice of
all of them.

The held-out sequences: a shuffle's eval sequences (the tokens train evaluated on), or a
harvest's first sequences. Positions the shuffle left out as outliers (or, on a harvest, those
above the eval's norm threshold) pass through the splice unchanged, as in train's evaluation.

Sharing (issue 22): the clean and zero-ablated losses are the same for every SAE of a site,
so a sweep evaluating P points runs 2 + P forward passes a batch, not 3P. `share` splices the
points in together before the sweep evaluates them one by one, and each point's build takes
its own figures from here by its eval address (`scores`). The figures are bit for bit those of
evaluating the point alone (metrics.spliced_many).
"""

from __future__ import annotations

import numpy as np

from saectl import arrays, layout, outliers
from saectl.layout import layer_range

_SHARED: dict[str, dict] = {}
"""Eval address → its scores, computed by `share` for a sweep's points, taken by `scores`."""


def tokens(t, n: int) -> np.ndarray:
    """The first `n` held-out sequences (n, C) of the evaluation target `t`."""
    toks = t.harvest.group()[layout.TOKENS]
    if t.data.stage == "shuffle":
        seqs = t.data.group()[layout.EVAL_SEQUENCES][:][:n]
        return toks.get_orthogonal_selection((seqs, slice(None)))
    return toks[:n]


def passthrough(t, n_seqs: int, C: int) -> np.ndarray | None:
    """[n_seqs, C] bool: the positions of the CE-loss sequences left out as outliers, which the
    splice passes through unchanged (as train's own evaluation does)."""
    from saectl.reader import hook_acts  # deferred: imports torch

    if t.data.stage == "shuffle":
        seqs = t.data.group()[layout.EVAL_SEQUENCES][:][:n_seqs]
        return outliers.left_out(t.data, (layer_range(t.lin.hook) or [t.lin.hook])[0], seqs, C)
    if t.threshold is None:
        return None
    acts = hook_acts(t.data.group(), t.lin.hook, t.data.ref)
    x = arrays.read(acts, slice(0, n_seqs * C), artifact=t.data.ref)
    return (np.linalg.norm(x.astype(np.float64), axis=1) > t.threshold).reshape(n_seqs, C)


def _inputs(t, n_seqs: int, device):
    """(ids, skip_first, keep) of the splice: the sequences, the BOS positions left out of the
    losses (none where the SAE was trained on BOS), the outliers passed through."""
    import torch  # deferred: torch is heavy

    ids = torch.from_numpy(np.asarray(tokens(t, n_seqs))).long().to(device)
    keep = passthrough(t, len(ids), ids.shape[1])
    return ids, 0 if t.keep_bos else 1, None if keep is None else torch.from_numpy(keep)


def scores(address: str, t, sae, model, n_seqs: int, device, centred: bool) -> dict:
    """The CE-loss/KL figures of `sae` for the eval at `address`: those `share` computed for it,
    else spliced in now. {} where the site cannot be spliced."""
    from saectl import metrics

    if address in _SHARED:
        return _SHARED.pop(address)
    ids, skip_first, keep = _inputs(t, n_seqs, device)
    return metrics.spliced(model, sae, t.lin.hook, t.lin.target, ids, skip_first, keep, centred)


def share(points: list[tuple]) -> None:
    """Splice in together the points [(address, target, n_seqs, device), ...] (targets with
    their model and, on a harvest, their norm threshold found) that share a model, site,
    held-out sequences and outliers, into `_SHARED`."""
    from saectl import metrics
    from saectl.fitting import load_lm  # train's model cache, shared in a sweep
    from saectl.sae import load_sae

    groups: dict[tuple, list] = {}
    for address, t, n_seqs, device in points:
        centred = t.lin.sae.manifest()["summary"].get("basis") == "center"
        # a cross-layer transcoder reads a layer range: `hook` tells it from an SAE
        key = (t.model, str(device), t.data.ref, t.harvest.ref, t.lin.hook, t.lin.target,
               n_seqs, t.keep_bos, centred, t.threshold)
        groups.setdefault(key, []).append((address, t, n_seqs, device, centred))
    for members in groups.values():
        if len(members) < 2:
            continue  # alone: its build splices it in itself
        _, t, n_seqs, device, centred = members[0]
        ids, skip_first, keep = _inputs(t, n_seqs, device)
        saes = {address: load_sae(layout.sae_dir(m.lin.sae.path)).to(device)
                for address, m, *_ in members}
        # the device as build passes it: load_lm's cache is keyed by it
        _SHARED.update(metrics.spliced_many(load_lm(t.model, device), saes, t.lin.hook,
                                            t.lin.target, ids, skip_first, keep, centred))


def forget() -> None:
    """Drop what `share` computed and no build took (a point another process evaluated)."""
    _SHARED.clear()
