"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
with JumpReLU Sparse Autoencoders"; SAELens `saes/jumprelu_sae.py`).

acts = pre · H(pre - θ) with a learned per-latent threshold θ = exp(log_threshold); the loss
is ||x - x_hat||² + λ·L0. The step function has no useful gradient, so θ learns through a
straight-through estimator: the pseudo-derivative of H(z - θ) with respect to θ is
-(1/ε)·K((z - θ)/ε) with K the rectangle kernel of bandwidth ε (`jumprelu_bandwidth`), and of
the JumpReLU output -(θ/ε)·K(...). Saved with `threshold` (not its log), as SAELens saves it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from saectl.sae.base import SAE, ForwardOutput, SAEConfig, register


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = _rectangle((pre - threshold) / eps)
        grad_threshold = (-(threshold / eps) * kernel * grad).sum(0)
        return (pre > threshold) * grad, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return None, grad_threshold, None


class Thresholds:
    """What every JumpReLU dictionary shares, an SAE's (below) or a cross-layer transcoder's
    (clt.py): a learned threshold per latent, the loss with the L0 penalty, and the files'
    `threshold` (not its log). Listed before the base class, which does the rest."""

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__(cfg, generator=generator)  # type: ignore[call-arg]
        self.log_threshold = nn.Parameter(
            torch.full((cfg.d_sae,), math.log(cfg.jumprelu_threshold_init), dtype=self.dtype))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def forward(self, x: Tensor, *, target: Tensor | None = None,
                dead_mask: Tensor | None = None, auxk_coefficient: float = 0.0,
                sparsity_scale: float = 1.0) -> ForwardOutput:
        x = x.to(self.dtype)
        y = self.target_of(x, target)
        pre = self.pre_acts(x)
        threshold = self.threshold
        bandwidth = self.cfg.jumprelu_bandwidth
        acts = _JumpReLU.apply(pre, threshold, bandwidth)
        x_hat = self.decode(acts)
        # counted in the weights' dtype: a bf16 pre (--autocast, saectl.precision) would
        # round a count above 256
        l0 = _Step.apply(pre, threshold, bandwidth).to(self.dtype).sum(-1).mean()
        return self._finish(y, x_hat, acts,
                            {"l0_loss": self.cfg.l0_coefficient * sparsity_scale * l0})

    def saved_tensors(self) -> dict[str, Tensor]:
        tensors = super().saved_tensors()  # type: ignore[misc]
        tensors["threshold"] = tensors.pop("log_threshold").exp()
        return tensors

    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        if "threshold" in tensors:
            tensors["log_threshold"] = tensors.pop("threshold").log()
        self._load_strict(tensors)


@register("jumprelu")
class JumpReLUSAE(Thresholds, SAE):
    saelens_architecture = "jumprelu"
    loads_saelens = True

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)
