"""A new SAE's starting point, from a sample of its (scaled) activations: the input scale
(mean norm √d_in; per layer for a cross-layer transcoder), b_dec at the geometric median
(Weiszfeld) or the mean, and the architecture's random weights (saectl.trainer uses these)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saectl.errors import ConfigError, SaectlError
from saectl.sae import ARCHS, SAE, SAEConfig

B_DEC_INITS = ("geometric_median", "mean", "zeros")


def estimate_input_scale(sample: Tensor) -> float:
    """The constant s with mean ‖s·x‖ = √d_in over the sample."""
    mean_norm = sample.float().norm(dim=-1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise SaectlError(f"the activation sample has mean norm {mean_norm}; the activations "
                          f"are all zero or not finite, re-run harvest")
    return math.sqrt(sample.shape[-1]) / mean_norm


def layer_scales(sample: Tensor, n_layers: int) -> Tensor:
    """A cross-layer transcoder's per-layer scales: each layer's columns of the concatenated
    sample (n, L·d) scaled to mean norm √d on their own, so no layer's loss dominates; the
    (L·d,) vector repeats each layer's constant over its columns."""
    n, width = sample.shape
    layers = sample.reshape(n, n_layers, width // n_layers).transpose(0, 1)
    s = torch.tensor([estimate_input_scale(layer) for layer in layers], device=sample.device)
    return s.repeat_interleave(width // n_layers)


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 30, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to `points` (n, d)."""
    points = points.double()
    y = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * points).sum(0) / w.sum()
        moved = (y_new - y).norm()
        y = y_new
        if moved <= tol * y.norm().clamp_min(1e-12):
            break
    return y


def init_sae(cfg: SAEConfig, sample: Tensor, *, b_dec_init: str = "geometric_median",
             generator: torch.Generator | None = None, b_dec: Tensor | None = None) -> SAE:
    """A new SAE: random decoder rows, W_enc = W_decᵀ, b_dec from the (already scaled)
    sample by `b_dec_init`, or `b_dec` itself where the caller computed it from the same
    sample before (a sweep's SAEs share their sample)."""
    if b_dec_init not in B_DEC_INITS:
        raise ConfigError(f"b_dec_init={b_dec_init!r} is unknown; use one of "
                          f"{', '.join(B_DEC_INITS)}")
    if sample.ndim != 2 or sample.shape[1] != cfg.d_in:
        raise ConfigError(f"the sample has shape {tuple(sample.shape)}, expected (n, {cfg.d_in})")
    sae = ARCHS[cfg.arch](cfg, generator=generator)
    with torch.no_grad():
        if b_dec is not None:
            sae.b_dec.copy_(b_dec)
        elif b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(sample[:65536]))
        elif b_dec_init == "mean":
            sae.b_dec.copy_(sample.double().mean(0))
    return sae
