"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"; SAELens
`saes/batchtopk_sae.py`, dictionary_learning `trainers/batch_top_k.py`).

Training keeps the k·n largest ReLU'd pre-activations over the whole batch of n tokens, so L0
is k on average but varies per token. Meanwhile a running average of the smallest kept
activation is estimated (rate `batchtopk_threshold_lr`, SAELens's `topk_threshold`); at
inference (eval mode) the SAE is a JumpReLU with that threshold and needs no batch. It is
saved as SAELens saves it: a `jumprelu` with a per-latent `threshold`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saectl import distributed
from saectl.sae.base import SAE, ForwardOutput, SAEConfig, register


@register("batchtopk")
class BatchTopKSAE(SAE):
    saelens_architecture = "jumprelu"
    uses_auxk = True
    takes_k = True
    threshold: Tensor

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__(cfg, generator=generator)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=self.dtype))

    def batch_topk(self, pre: Tensor) -> Tensor:
        """Keep the k·n largest ReLU'd entries of pre (n, d_sae), zero the rest. Under
        data-parallel training the batch is the global one: the k·B largest over every rank's
        rows (saectl.distributed), kept where they fall."""
        flat = pre.relu().flatten()
        if distributed.active():
            n_global = pre.shape[0] * distributed.world()[1]
            keep = distributed.keep_largest(flat.detach(), self.cfg.k * n_global)
            return flat.mul(keep & (flat > 0)).view_as(pre)
        vals, idx = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)

    def jumprelu(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return self.batch_topk(pre) if self.training else self.jumprelu(pre)

    @torch.no_grad()
    def update_threshold(self, acts: Tensor) -> None:
        """Running average of the smallest positive activation (set outright the first time)."""
        positive = acts[acts > 0]
        smallest = positive.min().double() if positive.numel() else acts.new_tensor(
            float("inf"), dtype=torch.float64)
        smallest = distributed.all_reduce(smallest, "min")  # over the global batch
        if not torch.isfinite(smallest):
            return
        old = self.threshold[0].double()
        lr = self.cfg.batchtopk_threshold_lr
        self.threshold.fill_(smallest if old == 0 else (1 - lr) * old + lr * smallest)

    def _encode_train(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.pre_acts(x)
        if not self.training:
            return pre, self.jumprelu(pre)
        acts = self.batch_topk(pre)
        self.update_threshold(acts)
        return pre, acts

    def forward(self, x: Tensor, *, target: Tensor | None = None,
                dead_mask: Tensor | None = None, auxk_coefficient: float = 0.0,
                sparsity_scale: float = 1.0) -> ForwardOutput:
        x = x.to(self.dtype)
        y = self.target_of(x, target)
        pre, acts = self._encode_train(x)
        x_hat = self.decode(acts)
        terms = self._auxk_loss(y, x_hat, pre, dead_mask, auxk_coefficient)
        return self._finish(y, x_hat, acts, terms)
