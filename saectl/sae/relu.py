"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates – April
2024", the training recipe; SAELens `saes/standard_sae.py`).

acts = ReLU(pre); loss = ||x - x_hat||² + λ Σ_i acts_i ||W_dec,i||. Decoder norms are free
(the penalty makes shrinking them pointless), initialised at 0.1 as in that update.
"""

from __future__ import annotations

from torch import Tensor

from saectl.sae.base import SAE, ForwardOutput, register


@register("relu")
class ReLUSAE(SAE):
    saelens_architecture = "standard"
    loads_saelens = True
    unit_norm_decoder = False
    init_decoder_norm = 0.1

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def forward(self, x: Tensor, *, target: Tensor | None = None,
                dead_mask: Tensor | None = None, auxk_coefficient: float = 0.0,
                sparsity_scale: float = 1.0) -> ForwardOutput:
        x = x.to(self.dtype)
        y = self.target_of(x, target)
        acts = self.encode(x)
        x_hat = self.decode(acts)
        l1 = (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        return self._finish(y, x_hat, acts,
                            {"l1_loss": self.cfg.l1_coefficient * sparsity_scale * l1})
