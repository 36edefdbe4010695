"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; sparsify
`sparse_coder.py`, SAELens `saes/topk_sae.py`).

acts = ReLU(TopK_k(pre)): exactly k latents per token (fewer where a top-k pre-activation is
negative). Unit-norm decoder rows; the AuxK loss lets the top d_in/2 dead latents reconstruct
the residual. Training runs the sparse kernels of `kernels.py` (`SAECTL_EAGER=1`: the dense
reference), which never build a dense (n, d_sae) activation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saectl.sae import kernels
from saectl.sae.base import SAE, ForwardOutput, register


def top_k(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest pre-activations per row (n, d_sae), unordered:
    `pre.topk(k)`'s, found by the kernels' block pre-selection (`kernels.block_topk_indices`,
    ~3x cheaper than torch.topk over d_sae on a CPU), the values gathered from `pre` itself,
    so bit for bit those of the dense encode."""
    idx = kernels.block_topk_indices(pre, k)
    return pre.gather(1, idx), idx


def topk_latents(vals: Tensor, idx: Tensor, width: int) -> Tensor:
    """The coalesced sparse COO (n, width) of top-k pre-activations `vals` at columns `idx`
    (n, k), ReLU'd: only those above 0 (a negative top-k pre-activation is not a fired
    latent), and no column below 0 (interpret's scan marks latents it does not keep so)."""
    idx, order = idx.sort(dim=1)  # rows, then columns: the order of a coalesced COO
    vals = vals.gather(1, order).relu_()
    keep = (vals > 0) & (idx >= 0)
    rows = kernels.token_ids(idx).view_as(idx)
    return torch.sparse_coo_tensor(torch.stack([rows[keep], idx[keep]]), vals[keep],
                                   (idx.shape[0], width), check_invariants=False,
                                   is_coalesced=True)


@register("topk")
class TopKSAE(SAE):
    saelens_architecture = "topk"
    loads_saelens = True
    uses_auxk = True
    takes_k = True

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def encode_sparse(self, x: Tensor) -> Tensor:
        """`encode`'s values, bit for bit, without the dense (n, d_sae) block and the pass
        that finds its non-zeros again (interpret's scan does the same: saectl.scan)."""
        if x.dim() != 2:
            return super().encode_sparse(x)
        vals, idx = top_k(self.pre_acts(x), self.cfg.k)
        return topk_latents(vals, idx, self.d_sae)

    def forward(self, x: Tensor, *, target: Tensor | None = None,
                dead_mask: Tensor | None = None, auxk_coefficient: float = 0.0,
                sparsity_scale: float = 1.0) -> ForwardOutput:
        x = x.to(self.dtype)
        y = self.target_of(x, target)
        use_aux = dead_mask is not None and auxk_coefficient > 0 and bool(dead_mask.any())
        dead_idx = dead_mask.nonzero().flatten() if use_aux else None  # type: ignore[union-attr]
        k_aux = self.d_in // 2 if use_aux else 0
        autoencode = kernels.topk_autoencode if kernels.FAST else kernels.topk_autoencode_eager
        # The kernels encode x - b_dec; a transcoder's encoder reads x itself (autograd
        # cancels the two b_dec terms of its input).
        x_in = x + self.b_dec if self.transcoder else x
        x_hat, vals, idx, aux_hat = autoencode(x_in, self.W_enc, self.b_enc, self.W_dec,
                                               self.b_dec, self.cfg.k, dead_idx, k_aux)
        terms = {}
        if use_aux:
            assert dead_idx is not None
            scale = min(dead_idx.numel() / (self.d_in // 2), 1.0)
            auxk = (aux_hat - (y - x_hat).detach()).pow(2).sum(-1).mean()
            terms["auxk_loss"] = auxk_coefficient * scale * auxk
        n, k = idx.shape
        rows = torch.arange(n, device=x.device).repeat_interleave(k)
        acts = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), vals.reshape(-1),
                                       (n, self.d_sae), check_invariants=False,
                                       is_coalesced=True)  # rows, then columns, sorted
        return self._finish(y, x_hat, acts, terms)
