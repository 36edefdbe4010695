"""Evaluation figures of an SAE, with the definitions SAELens and SAEBench use.

Reconstruction (on activations, streamed, exact accumulators):
- `mse`: mean squared error per element; `mse_per_token`: summed over d_in
- `fvu`: Σ‖x − x̂‖² / Σ‖x − x̄‖², variance relative to the mean of the evaluated tokens;
  `explained_variance` = 1 − fvu
- `cossim`: mean over tokens of cos(x, x̂); `l2_ratio`: mean of ‖x̂‖ / ‖x‖
- `l0`: mean active latents per token; `dead_fraction`: latents that never fired;
  `dense_fraction`: latents firing on more than 10% of tokens; the per-latent log10 firing
  density and its histogram.
Downstream (the SAE spliced into the model at its hook, on held-out sequences):
- `ce_loss_score` = (CE_zero − CE_sae) / (CE_zero − CE_clean): 1 is perfect, 0 is as bad as
  zero-ablating the hook; `kl_score` = (KL_zero − KL_sae) / KL_zero with KL(clean ‖ ·) per
  token; `delta_lm_loss` = CE_sae − CE_clean.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

DENSE_THRESHOLD = 0.1
HIST_EDGES = np.linspace(-8, 0, 33)  # log10 firing density, 0.25 decade bins


@torch.no_grad()
def reconstruction(sae, batches: Iterable[torch.Tensor]) -> tuple[dict, np.ndarray]:
    """(figures, per-latent log10 firing density) of `sae` on raw activation batches."""
    n = 0
    sq_err = sum_sq = cos = ratio = l0 = 0.0
    sum_x = None
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    for x in batches:
        if x.shape[-1] != sae.d_in:
            from saectl.errors import ConfigError

            raise ConfigError(f"the SAE reads d_in={sae.d_in} but the activations have "
                              f"d={x.shape[-1]}; pair the SAE with activations from its own hook")
        x = x.to(sae.device, torch.float32)
        acts = sae.encode(x)
        x_hat = sae.decode(acts)
        x64, err = x.double(), (x - x_hat).double()
        sq_err += float(err.square().sum())
        sum_sq += float(x64.square().sum())
        sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
        cos += float(F.cosine_similarity(x_hat, x, dim=-1).double().sum())
        ratio += float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).double().sum())
        active = acts > 0
        l0 += float(active.sum())
        fired += active.sum(0).double().cpu()
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
    figures = {
        "n_tokens": n, "mse": sq_err / (n * d), "mse_per_token": sq_err / n,
        "fvu": fvu, "explained_variance": 1 - fvu, "cossim": cos / n, "l2_ratio": ratio / n,
        "l0": l0 / n, "dead_fraction": float((density == 0).mean()),
        "dense_fraction": float((density > DENSE_THRESHOLD).mean()),
        "log_density_histogram": {"edges": HIST_EDGES.tolist(), "counts": hist.tolist()},
    }
    return figures, log_density


@torch.no_grad()
def downstream(model, hook, reconstruct: Callable[[torch.Tensor], torch.Tensor],
               token_batches: Iterable[torch.Tensor], skip_first: int = 1) -> dict:
    """CE-loss score, KL score and ΔLM loss of splicing `reconstruct` in at `hook`.

    Positions before `skip_first` (the BOS, which training leaves out) keep their clean
    activation in both the SAE and the zero-ablation runs, as SAEBench does for special tokens."""
    from saectl.hooks import run_with_replacement

    def splice(fn):
        def replace(act):
            out = act.clone()
            out[:, skip_first:] = fn(act[:, skip_first:].reshape(-1, act.shape[-1])).reshape(
                act[:, skip_first:].shape).to(act.dtype)
            return out
        return replace

    zero = splice(torch.zeros_like)
    sae = splice(reconstruct)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl = {"sae": 0.0, "zero": 0.0}
    n = 0
    for ids in token_batches:
        labels = ids[:, 1:]
        clean_logits = model(input_ids=ids).logits[:, :-1].float()
        clean_logp = clean_logits.log_softmax(-1)
        for name, fn in (("sae", sae), ("zero", zero)):
            logp = run_with_replacement(model, hook, fn, ids)[:, :-1].float().log_softmax(-1)
            ce[name] += float(F.nll_loss(logp.flatten(0, 1), labels.flatten(), reduction="sum"))
            kl[name] += float((clean_logp.exp() * (clean_logp - logp)).sum())
        ce["clean"] += float(F.nll_loss(clean_logp.flatten(0, 1), labels.flatten(), reduction="sum"))
        n += labels.numel()
    ce = {k: v / n for k, v in ce.items()}
    kl = {k: v / n for k, v in kl.items()}
    denom = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
        "ce_loss_score": (ce["zero"] - ce["sae"]) / denom if denom != 0 else float("nan"),
        "kl_sae": kl["sae"], "kl_zero": kl["zero"],
        "kl_score": (kl["zero"] - kl["sae"]) / kl["zero"] if kl["zero"] > 0 else float("nan"),
        "delta_lm_loss": ce["sae"] - ce["clean"], "lm_eval_tokens": n,
    }
