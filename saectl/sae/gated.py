"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders"; SAELens `saes/gated_sae.py`).

Two paths share W_enc: the gate decides which latents are active, the magnitude path (W_enc
rescaled per latent by exp(r_mag)) how much:

    π_gate = (x - b_dec) @ W_enc + b_gate
    acts   = 1[π_gate > 0] · ReLU((x - b_dec) @ (W_enc · exp(r_mag)) + b_mag)

The gate gets gradient from an L1 penalty on ReLU(π_gate) and from an auxiliary reconstruction
of x from ReLU(π_gate) through a frozen copy of the decoder (the paper's L_aux). Decoder rows
are kept at unit norm as in the paper (SAELens instead leaves them free and weights the L1 by
their norms; the weighting is kept here and is 1). No b_enc: b_gate and b_mag replace it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saectl.sae.base import SAE, ForwardOutput, SAEConfig, register


@register("gated")
class GatedSAE(SAE):
    saelens_architecture = "gated"
    loads_saelens = True
    has_b_enc = False

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__(cfg, generator=generator)
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype))

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shared = self.encoder_input(x) @ self.W_enc
        pi_gate = shared + self.b_gate
        pi_mag = shared * self.r_mag.exp() + self.b_mag
        return pi_gate, pi_mag

    def pre_acts(self, x: Tensor) -> Tensor:
        """The magnitude path's pre-activations."""
        return self._paths(x)[1]

    def encode(self, x: Tensor) -> Tensor:
        pi_gate, pi_mag = self._paths(x)
        return (pi_gate > 0) * pi_mag.relu()

    def forward(self, x: Tensor, *, target: Tensor | None = None,
                dead_mask: Tensor | None = None, auxk_coefficient: float = 0.0,
                sparsity_scale: float = 1.0) -> ForwardOutput:
        x = x.to(self.dtype)
        y = self.target_of(x, target)
        pi_gate, pi_mag = self._paths(x)
        acts = (pi_gate > 0) * pi_mag.relu()
        x_hat = self.decode(acts)
        gate = pi_gate.relu()
        l1 = (gate * self.W_dec.norm(dim=1)).sum(-1).mean()
        via_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        aux_recon = (via_gate - y).pow(2).sum(-1).mean()
        return self._finish(y, x_hat, acts, {
            "l1_loss": self.cfg.l1_coefficient * sparsity_scale * l1,
            "aux_recon_loss": aux_recon,
        })
