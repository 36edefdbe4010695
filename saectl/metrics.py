"""Evaluation figures of an SAE, with the definitions SAELens and SAEBench use.

Reconstruction (on activations, streamed, exact accumulators):
- `mse`: mean squared error per element; `mse_per_token`: summed over d_in
- `fvu`: Σ‖x − x̂‖² / Σ‖x − x̄‖², variance relative to the mean of the evaluated tokens;
  `explained_variance` = 1 − fvu
- `cossim`: mean over tokens of cos(x, x̂); `l2_ratio`: mean of ‖x̂‖ / ‖x‖
- `relative_reconstruction_bias` = E‖x̂‖² / E⟨x, x̂⟩ (Rajamanoharan et al. 2024, eq. 10, as
  SAEBench computes it): 1 is unbiased, below 1 is shrinkage
Figures that show when a few tokens dominate (massive activations; issue 16). FVU divides
summed errors by summed variance, so a handful of huge-norm tokens can carry it:
- `explained_variance_per_token`: mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄‖², SAEBench's
  per-token formula (its `explained_variance_legacy`), with x̄ the mean of the evaluated tokens
  (SAEBench takes the mean of each batch; a one-shot iterable of batches here does the same)
- `worst_error_share`: the share of Σ‖x − x̂‖² carried by the worst 0.1% of tokens (at least
  one); `top_variance_share`: the share of Σ‖x − x̄‖² carried by the top 0.1%
- `l0`: mean active latents per token; `dead_fraction`: latents that never fired;
  `dense_fraction`: latents firing on more than 10% of tokens; the per-latent log10 firing
  density and its histogram.
Downstream (the SAE spliced into the model at its hook, on held-out sequences):
- `ce_loss_score` = (CE_zero − CE_sae) / (CE_zero − CE_clean): 1 is perfect, 0 is as bad as
  zero-ablating the hook; `kl_score` = (KL_zero − KL_sae) / KL_zero with KL(clean ‖ ·) per
  token; `delta_lm_loss` = CE_sae − CE_clean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

DENSE_THRESHOLD = 0.1
TOP_FRACTION = 0.001  # the "worst 0.1% of tokens" of worst_error_share and top_variance_share
HIST_EDGES = np.linspace(-8, 0, 33)  # log10 firing density, 0.25 decade bins


def top_share(values: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Share of Σ values carried by the largest ⌈fraction · n⌉ of them (at least one)."""
    values = np.asarray(values, dtype=np.float64)
    total = float(values.sum())
    if values.size == 0 or total <= 0:
        return float("nan")
    m = max(1, math.ceil(fraction * values.size))
    return float(np.partition(values, values.size - m)[values.size - m:].sum()) / total


def per_token_explained_variance(sq_err: np.ndarray, sq_dev: np.ndarray) -> float:
    """Mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄‖² (tokens exactly at the mean are skipped:
    their ratio has no value)."""
    sq_err, sq_dev = np.asarray(sq_err, np.float64), np.asarray(sq_dev, np.float64)
    ok = sq_dev > 0
    return float(np.mean(1 - sq_err[ok] / sq_dev[ok])) if ok.any() else float("nan")


def pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of a batch: an SAE's batch is a tensor, its own target; a transcoder's
    is the pair (x, y) of the same tokens at its input and output hooks."""
    return batch if isinstance(batch, tuple) else (batch, batch)


def latents(sae, x: torch.Tensor) -> torch.Tensor:
    """The latents of x (n, d_in) for figures that need only the non-zero ones: a saectl SAE's
    `encode_sparse` (sparse COO; at 32x width the dense decode alone costs what the encode
    does), or the dense `encode` of any other object with encode and decode."""
    encode = getattr(sae, "encode_sparse", None)
    return encode(x) if encode is not None else sae.encode(x)


def output(sae, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the SAE predicts for its target: decode(acts), plus a skip transcoder's x @ W_skip."""
    out = sae.decode(acts)
    return out + x.to(out.dtype) @ sae.W_skip if getattr(sae, "W_skip", None) is not None else out


def _check_width(sae, x: torch.Tensor) -> None:
    if x.shape[-1] != sae.d_in:
        from saectl.errors import ConfigError

        raise ConfigError(f"the SAE reads d_in={sae.d_in} but the activations have "
                          f"d={x.shape[-1]}; pair the SAE with activations from its own hook")


def _mean(batches: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """The mean of the targets."""
    total, n = None, 0
    for batch in batches:
        y = pair(batch)[1]
        s = y.double().sum(0)
        total = s if total is None else total + s
        n += y.shape[0]
    return total / n if n else None


@torch.no_grad()
def reconstruction(sae, batches: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
                   ) -> tuple[dict, np.ndarray]:
    """(figures, per-latent log10 firing density) of `sae` on raw activation batches (for a
    transcoder, (x, y) pairs: every figure is then of its prediction of y).

    `batches` is an iterable, or a callable returning a fresh iterator over the same tokens:
    then a first pass (reading only) finds the tokens' mean for the per-token explained
    variance, which otherwise uses each batch's own mean, as SAEBench does."""
    mean = _mean(batches()) if callable(batches) else None
    n = 0
    sq_err = sum_sq = cos = ratio = l0 = hat_sq = dot = 0.0
    sum_x = None
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    tok_err, tok_dev = [], []  # per token: ‖x − x̂‖², ‖x − x̄‖² (n floats each)
    for batch in (batches() if callable(batches) else batches):
        inp, x = pair(batch)  # x: the target, as the formulas below name it
        _check_width(sae, inp)
        inp, x = inp.to(sae.device, torch.float32), x.to(sae.device, torch.float32)
        inp, x = inp.reshape(-1, inp.shape[-1]), x.reshape(-1, x.shape[-1])
        acts = latents(sae, inp)
        x_hat = output(sae, acts, inp)
        x64, err = x.double(), (x - x_hat).double()
        err_tok = err.square().sum(-1)
        sq_err += float(err_tok.sum())
        sum_sq += float(x64.square().sum())
        sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
        centre = x64.mean(0) if mean is None else mean.to(x64.device)
        tok_err.append(err_tok.cpu().numpy())
        tok_dev.append((x64 - centre).square().sum(-1).cpu().numpy())
        hat64 = x_hat.double()
        hat_sq += float(hat64.square().sum())
        dot += float((x64 * hat64).sum())
        cos += float(F.cosine_similarity(x_hat, x, dim=-1).double().sum())
        ratio += float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).double().sum())
        cols = (acts.indices()[1][acts.values() > 0] if acts.is_sparse
                else (acts > 0).nonzero()[:, 1])
        l0 += float(cols.numel())
        fired += torch.bincount(cols, minlength=sae.d_sae).double().cpu()
        n += x.shape[0]
    if n == 0:
        raise ValueError("no evaluation tokens")
    d = sum_x.shape[0]
    total_var = sum_sq - float(sum_x.square().sum()) / n
    density = (fired / n).numpy()
    with np.errstate(divide="ignore"):
        log_density = np.where(density > 0, np.log10(np.maximum(density, 1e-300)), -np.inf)
    hist, _ = np.histogram(log_density[np.isfinite(log_density)], bins=HIST_EDGES)
    fvu = sq_err / total_var if total_var > 0 else float("nan")
    tok_err, tok_dev = np.concatenate(tok_err), np.concatenate(tok_dev)
    figures = {
        "n_tokens": n, "mse": sq_err / (n * d), "mse_per_token": sq_err / n,
        "fvu": fvu, "explained_variance": 1 - fvu,
        "explained_variance_per_token": per_token_explained_variance(tok_err, tok_dev),
        "worst_error_share": top_share(tok_err), "top_variance_share": top_share(tok_dev),
        "cossim": cos / n, "l2_ratio": ratio / n,
        "relative_reconstruction_bias": hat_sq / dot if dot != 0 else float("nan"),
        "l0": l0 / n, "dead_fraction": float((density == 0).mean()),
        "dense_fraction": float((density > DENSE_THRESHOLD).mean()),
        "log_density_histogram": {"edges": HIST_EDGES.tolist(), "counts": hist.tolist()},
    }
    return figures, log_density


@torch.no_grad()
def downstream(model, hook, reconstruct: Callable[[torch.Tensor], torch.Tensor] | None,
               token_batches: Iterable[torch.Tensor], skip_first: int = 1,
               passthrough: Iterable[torch.Tensor] | None = None, source=None,
               run: Callable | None = None) -> dict:
    """CE-loss score, KL score and ΔLM loss of splicing `reconstruct` in at `hook`.

    With a `source` hook (a transcoder's input) the activation at `hook` is replaced by
    `reconstruct` of the activation at `source` in the same pass: the MLP's output by the
    transcoder's prediction from the MLP's input (the replacement model).

    Positions before `skip_first` (the BOS, which training leaves out) keep their clean
    activation in both the SAE and the zero-ablation runs, as SAEBench does for special tokens;
    so do the positions `passthrough` marks (one [batch, context] bool tensor per batch: the
    outliers the shuffle left out, saectl/outliers.py).

    `run(ids, keep, ablate)` replaces the one-hook splice with the caller's: the logits with
    the spliced model (ablate False) or the zero-ablated one (a cross-layer transcoder's
    replacement model, `replacement_run`)."""
    return downstream_many(model, hook, {"": reconstruct}, token_batches, skip_first,
                           passthrough, source, None if run is None else {"": run})[""]


@torch.no_grad()
def downstream_many(model, hook, reconstructs: dict, token_batches: Iterable[torch.Tensor],
                    skip_first: int = 1, passthrough: Iterable[torch.Tensor] | None = None,
                    source=None, runs: dict | None = None) -> dict:
    """`downstream`'s figures for each of several splices at the same site, {key: figures}
    for `reconstructs` {key: fn} (or `runs` {key: run}), on the same batches. The clean and
    the zero-ablated passes are the same for every splice, so they run once a batch: P SAEs
    cost P + 2 forward passes a batch, not 3P (a sweep's points, issue 22). Each key's figures
    are those `downstream` gives it alone, bit for bit: the same passes, summed in the same
    order."""
    from contextlib import nullcontext

    from saectl.hooks import reading, run_with_replacement

    seen: dict = {}

    def splice(fn, keep):
        """fn(input rows) replaces the activation after `skip_first`; fn None: zero-ablation."""
        def replace(act):
            out = act.clone()
            inp = seen[source.name] if source is not None else act
            out[:, skip_first:] = 0 if fn is None else fn(
                inp[:, skip_first:].reshape(-1, inp.shape[-1])).reshape(
                act[:, skip_first:].shape).to(act.dtype)
            if keep is not None:
                out[keep] = act[keep]
            return out
        return replace

    def logp_of(ids, keep, key, ablate: bool):
        """Log-probs with `key`'s splice (ablate: the zero-ablated model)."""
        if runs is not None:
            return runs[key](ids, keep, ablate)[:, :-1].float().log_softmax(-1)
        fn = splice(None if ablate else reconstructs[key], keep)
        with reading(model, source, seen) if source is not None else nullcontext():
            return run_with_replacement(model, hook, fn, ids)[:, :-1].float().log_softmax(-1)

    keys = list(runs if runs is not None else reconstructs)
    masks = iter(passthrough) if passthrough is not None else None
    ce = {k: 0.0 for k in ("clean", "zero", *keys)}
    kl = {k: 0.0 for k in ("zero", *keys)}
    n = 0
    for ids in token_batches:
        keep = next(masks).to(ids.device) if masks is not None else None
        labels = ids[:, 1:].flatten()
        clean_logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
        clean_p = clean_logp.exp()
        for name, key, ablate in [*((k, k, False) for k in keys), ("zero", keys[0], True)]:
            logp = logp_of(ids, keep, key, ablate)
            ce[name] += float(F.nll_loss(logp.flatten(0, 1), labels, reduction="sum"))
            kl[name] += float((clean_p * (clean_logp - logp)).sum())
        ce["clean"] += float(F.nll_loss(clean_logp.flatten(0, 1), labels, reduction="sum"))
        n += labels.numel()
    ce = {k: v / n for k, v in ce.items()}
    kl = {k: v / n for k, v in kl.items()}
    denom = ce["zero"] - ce["clean"]
    return {k: {
        "ce_clean": ce["clean"], "ce_sae": ce[k], "ce_zero": ce["zero"],
        "ce_loss_score": (ce["zero"] - ce[k]) / denom if denom != 0 else float("nan"),
        "kl_sae": kl[k], "kl_zero": kl["zero"],
        "kl_score": (kl["zero"] - kl[k]) / kl["zero"] if kl["zero"] > 0 else float("nan"),
        "delta_lm_loss": ce[k] - ce["clean"], "lm_eval_tokens": n,
    } for k in keys}


def spliced(model, sae, hook: str, target: str | None, ids: torch.Tensor, skip_first: int,
            keep: torch.Tensor | None = None, centred: bool = False) -> dict:
    """`downstream`'s scores of `sae` on the sequences `ids` (n, C), four at a time: spliced in
    at `hook`, or for a transcoder its prediction from `hook` replacing `target`; `keep`
    (n, C) marks positions passed through (outliers). `centred`: the SAE reads x − mean(x)
    (saectl.basis) and its output gets the mean back. {} where the site cannot be spliced."""
    return spliced_many(model, {"": sae}, hook, target, ids, skip_first, keep, centred)[""]


def spliced_many(model, saes: dict, hook: str, target: str | None, ids: torch.Tensor,
                 skip_first: int, keep: torch.Tensor | None = None,
                 centred: bool = False) -> dict:
    """`spliced` for several SAEs of one site, {key: figures} for `saes` {key: sae}, sharing
    each batch's clean and zero-ablated passes (`downstream_many`)."""
    from saectl import hooks
    from saectl.layout import layer_range

    parts = range(0, len(ids), 4)
    batches = [ids[i:i + 4] for i in parts]
    masks = None if keep is None else [keep[i:i + 4] for i in parts]
    cross = {getattr(sae, "cross_layer", False) for sae in saes.values()}
    assert len(cross) == 1, "cross-layer transcoders and SAEs are spliced in apart"
    if cross == {True}:
        reads = hooks.parse_hooks(model, layer_range(hook))
        writes = hooks.parse_hooks(model, layer_range(target))
        runs = {k: replacement_run(model, clt, reads, writes, skip_first)
                for k, clt in saes.items()}
        figures = downstream_many(model, None, {}, batches, skip_first, masks, runs=runs)
    else:
        read = hooks.parse_hooks(model, [hook])[0]
        write = hooks.parse_hooks(model, [target])[0] if target else read
        if write.name.split(".")[0] in hooks.READ_ONLY_SITES:
            return {k: {} for k in saes}

        def splice(sae):
            def fn(a):
                a = a.float()
                mean = a.mean(-1, keepdim=True) if centred else 0
                return output(sae, sae.encode(a - mean), a) + mean
            return fn

        figures = downstream_many(model, write, {k: splice(sae) for k, sae in saes.items()},
                                  batches, skip_first, masks, source=read if target else None)
    for f in figures.values():
        f["outliers_passed_through"] = int(keep.sum()) if keep is not None else 0
    return figures


def replacement_run(model, clt, reads: list, writes: list, skip_first: int) -> Callable:
    """The replacement model of a cross-layer transcoder (Ameisen et al. 2025): in one forward
    pass each covered MLP's output is replaced by the CLT's output at that layer, from the
    latents of that layer and every earlier one, each read from the replacement model's own
    MLP input (so errors compound as they would in the model). ablate: every covered MLP
    output zeroed instead. `run(ids, keep, ablate)` → logits, for `downstream`."""
    from contextlib import ExitStack

    from saectl.hooks import reading, replacing

    def run(ids: torch.Tensor, keep: torch.Tensor | None, ablate: bool) -> torch.Tensor:
        seen: dict = {}
        acts: dict[int, torch.Tensor] = {}

        def at(layer: int):
            def replace(act):
                out = act.clone()
                rest = act[:, skip_first:]
                if ablate:
                    out[:, skip_first:] = 0
                else:
                    for j in range(layer + 1):  # each layer's latents once per pass
                        if j not in acts:
                            x = seen[reads[j].name][:, skip_first:]
                            acts[j] = clt.encode_layer(x.reshape(-1, x.shape[-1]).float(), j)
                    out[:, skip_first:] = clt.decode_layer(acts, layer).reshape(
                        rest.shape).to(act.dtype)
                if keep is not None:
                    out[keep] = act[keep]
                return out
            return replace

        with ExitStack() as stack:
            for r in reads:
                stack.enter_context(reading(model, r, seen))
            for layer, w in enumerate(writes):
                stack.enter_context(replacing(model, w, at(layer)))
            return model(input_ids=ids, use_cache=False).logits

    return run
