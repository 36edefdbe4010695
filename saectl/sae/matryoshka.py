"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"; SAELens `saes/matryoshka_batchtopk_sae.py`).

A BatchTopK SAE whose loss is the mean, over nested prefixes m_1 < ... < m_P = d_sae, of the
MSE of reconstructing x from the first m_i latents alone, so early latents learn general
features and later ones refine them. As in Bussmann et al.'s code, the BatchTopK selection is
made once over all latents and each prefix reconstructs from its part of those activations
(SAELens re-runs BatchTopK per prefix). Saved and run at inference like BatchTopK.
"""

from __future__ import annotations

import itertools

from torch import Tensor

from saectl.errors import ConfigError
from saectl.sae.base import ForwardOutput, SAEConfig, register
from saectl.sae.batchtopk import BatchTopKSAE


def default_prefixes(d_sae: int, k: int) -> tuple[int, ...]:
    return tuple(m for m in (d_sae // 16, d_sae // 4) if m >= k) + (d_sae,)


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)  # k below the width
        if not cfg.matryoshka_prefixes:
            object.__setattr__(cfg, "matryoshka_prefixes", default_prefixes(cfg.d_sae, cfg.k))
        p = cfg.matryoshka_prefixes
        text = ",".join(map(str, p))
        if any(not isinstance(m, int) or m < 1 for m in p):
            raise ConfigError(f"matryoshka prefixes {text} must be positive integers")
        if any(b <= a for a, b in itertools.pairwise(p)):
            raise ConfigError(f"matryoshka prefixes {text} must be strictly increasing; "
                              f"e.g. --matryoshka-prefixes {cfg.d_sae // 4},{cfg.d_sae}")
        if p[-1] != cfg.d_sae:
            raise ConfigError(f"matryoshka prefixes {text} must end at the width {cfg.d_sae}; "
                              f"append {cfg.d_sae} or change --expansion")

    def forward(self, x: Tensor, *, target: Tensor | None = None,
                dead_mask: Tensor | None = None, auxk_coefficient: float = 0.0,
                sparsity_scale: float = 1.0) -> ForwardOutput:
        x = x.to(self.dtype)
        y = self.target_of(x, target)
        pre, acts = self._encode_train(x)
        prefixes = self.cfg.matryoshka_prefixes
        partial = self.b_dec.expand_as(y)
        prefix_mse = []
        start = 0
        for m in prefixes:  # x_hat of prefix m = b_dec + acts[:, :m] @ W_dec[:m]
            partial = partial + acts[:, start:m] @ self.W_dec[start:m]
            prefix_mse.append((partial - y).pow(2).sum(-1).mean())
            start = m
        x_hat = partial
        terms = {f"mse_prefix_{m}": e for m, e in zip(prefixes[:-1], prefix_mse[:-1])}
        aux = self._auxk_loss(y, x_hat, pre, dead_mask, auxk_coefficient)
        loss = sum(prefix_mse[1:], prefix_mse[0]) / len(prefixes) + sum(aux.values(), 0.0)
        return self._finish(y, x_hat, acts, {**terms, **aux}, loss=loss)
