"""Cross-layer transcoders (Ameisen et al. 2025, "Circuit Tracing"; circuit-tracer
`transcoder/cross_layer_transcoder.py`).

A CLT over layers a..b (L of them) has, for each layer l, m = d_sae / L latents that read that
layer's MLP input and write to the MLP outputs of layer l and every later one:

    acts_l   = σ(x_l @ W_enc[l] + b_enc[l])                       x_l: layer l's input (d,)
    y_hat_l' = Σ_{l ≤ l'} acts_l @ W_dec[l → l'] + b_dec[l']        (d,)

The loss is the squared error summed over the L target layers. Inside saectl a CLT is an SAE on
the concatenation of its layers' hooks: `d_in` = L·d, `d_sae` = L·m, inputs (n, L·d), latents
(n, L·m) ordered layer by layer, so the training loop, AuxK, the evaluation and the store treat
it as any transcoder. Only the shapes differ:

- W_enc is (L, d, m), one encoder per layer (a batched matmul, no wasted block-diagonal);
- W_dec is (L·m, L·d) with the blocks l → l' < l held at zero: a gradient hook zeroes their
  gradient, so Adam never moves them, and a latent's unit norm is over all the layers it
  writes to (as Anthropic's decoder-norm-weighted CLT penalty reads it);
- b_dec is (L·d,), each layer's output bias in turn.

Two sparsities: `clt`, TopK with k latents per token *in each layer* (a per-layer choice
keeps the replacement model causal: layer l's latents must be known before layer l+1 runs), and
`jumprelu-clt`, JumpReLU thresholds with the L0 penalty (jumprelu.py), as circuit-tracer runs.
Inputs and targets are normalised per layer (saectl.trainer), folded into the saved weights.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from saectl.errors import ConfigError
from saectl.sae import kernels
from saectl.sae.base import DTYPES, SAE, ForwardOutput, SAEConfig, register
from saectl.sae.jumprelu import Thresholds


class CrossLayerTranscoder(SAE):
    cross_layer = True
    saelens_architecture = ""  # SAELens has no CLT class; export writes circuit-tracer's layout

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        if cfg.arch != self.arch:
            raise ConfigError(f"config is for {cfg.arch!r}, not {self.arch!r}")
        self.cfg = cfg
        L, d, m = self.n_layers, self.d_layer, self.m
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float32)
        W_dec *= self.decoder_mask()
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        # each layer's encoder starts as the transpose of its latents' decoder to that layer
        W_enc = torch.stack([W_dec[l * m:(l + 1) * m, l * d:(l + 1) * d].t() for l in range(L)])
        dtype = DTYPES[cfg.dtype]
        self.W_enc = nn.Parameter(W_enc.contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.register_buffer("_mask", self.decoder_mask().to(dtype), persistent=False)
        self.W_dec.register_hook(lambda g: g * self._mask)  # layer → earlier layer stays zero

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        L = cfg.n_layers
        if not cfg.transcoder:
            raise ConfigError("a cross-layer transcoder maps MLP inputs to MLP outputs: give "
                              "--target, e.g. --hook mlp_in.0..3 --target mlp_out.0..3")
        if cfg.skip:
            raise ConfigError(f"--skip is not available for --arch {cls.arch}; leave it out, or "
                              "train one skip transcoder per layer")
        if cfg.d_in % L or cfg.d_sae % L:
            raise ConfigError(f"a CLT over {L} layers needs d_in ({cfg.d_in}) and the width "
                              f"({cfg.d_sae}) divisible by {L}")
        if cls.takes_k and cfg.k >= cfg.d_sae // L:
            raise ConfigError(f"k={cfg.k} latents per layer must be smaller than the "
                              f"{cfg.d_sae // L} latents of each layer; lower --k or widen")

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def d_layer(self) -> int:
        """Width of one layer's input and output."""
        return self.cfg.d_in // self.cfg.n_layers

    @property
    def m(self) -> int:
        """Latents per layer."""
        return self.cfg.d_sae // self.cfg.n_layers

    def decoder_mask(self) -> Tensor:
        """(d_sae, d_in): 1 where latent i (of layer i // m) may write output column j (of
        layer j // d), i.e. at its own layer and later ones."""
        src = torch.arange(self.cfg.d_sae) // self.m
        dst = torch.arange(self.cfg.d_in) // self.d_layer
        return (dst[None, :] >= src[:, None]).float()

    # -- the model ----------------------------------------------------------------------

    def layer_pre_acts(self, x: Tensor) -> Tensor:
        """(L, n, m) pre-activations of x (n, L·d), each layer's encoder on its own input."""
        # contiguous (L, n, d): baddbmm on a transposed view runs many times slower on CPU
        x = x.to(self.dtype).reshape(-1, self.n_layers, self.d_layer).transpose(0, 1).contiguous()
        return torch.baddbmm(self.b_enc.view(self.n_layers, 1, self.m), x, self.W_enc)

    def pre_acts(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        pre = self.layer_pre_acts(x).transpose(0, 1)
        return pre.reshape(*lead, self.cfg.d_sae)

    @abc.abstractmethod
    def activate(self, pre: Tensor, layer: int | None = None) -> Tensor:
        """σ of pre-activations (..., m) of one layer, or (L, n, m) of every layer."""

    def encode(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        acts = self.activate(self.layer_pre_acts(x)).transpose(0, 1)
        return acts.reshape(*lead, self.cfg.d_sae)

    def encode_layer(self, x_l: Tensor, layer: int) -> Tensor:
        """Latents (n, m) of layer `layer` (0-based within the CLT) from its input (n, d)."""
        pre = x_l.to(self.dtype) @ self.W_enc[layer] + self.b_enc[self._latents(layer)]
        return self.activate(pre, layer)

    def decode_layer(self, acts: dict[int, Tensor], layer: int) -> Tensor:
        """Output (n, d) at layer `layer` from the latents {l: (n, m)} of layers l ≤ layer
        (the replacement model: saectl.metrics)."""
        cols = slice(layer * self.d_layer, (layer + 1) * self.d_layer)
        out = self.b_dec[cols]
        for l in range(layer + 1):
            out = out + acts[l].to(self.dtype) @ self.W_dec[self._latents(l), cols]
        return out

    def _latents(self, layer: int) -> slice:
        return slice(layer * self.m, (layer + 1) * self.m)

    @torch.no_grad()
    def fold_input_scale(self, s, s_out=None) -> None:
        """As SAE.fold_input_scale, with per-layer scales: s and s_out are numbers or (d_in,)
        tensors (each layer's constant repeated over its columns; saectl.trainer)."""
        s_out = s if s_out is None else s_out
        s_in = torch.as_tensor(s, dtype=self.dtype).expand(self.cfg.d_in)
        self.W_enc.mul_(s_in.view(self.n_layers, self.d_layer, 1))
        self.W_dec.div_(torch.as_tensor(s_out, dtype=self.dtype))
        self.b_dec.div_(torch.as_tensor(s_out, dtype=self.dtype))


class _Selected(torch.autograd.Function):
    """The pre-activations of the selected latents only, with a sparse backward (as the TopK
    kernels' in kernels.py): `vals` (n, s) were computed without gradient at the global latent
    indices `idx` (n, s); the gradient reaches W_enc (L, d, m) and b_enc only at those latents,
    never through a dense (L, n, m) matmul. `x_stack` (L·n, d): layer l's inputs in rows l·n..."""

    @staticmethod
    def forward(ctx, vals, W_enc, b_enc, x_stack, idx):  # type: ignore[override]
        ctx.save_for_backward(x_stack, idx)
        ctx.shape = W_enc.shape
        return vals.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x_stack, idx = ctx.saved_tensors
        L, d, m = ctx.shape
        n = idx.shape[0]
        latents = idx.reshape(-1)
        rows = (latents // m) * n + kernels.token_ids(idx)       # the latent's layer's input
        weights = g.reshape(-1)
        (grad_t,) = kernels.per_latent_sums(latents, L * m, (rows, weights, x_stack))  # (L·m, d)
        grad_b = torch.zeros(L * m, dtype=g.dtype, device=g.device).index_add_(0, latents, weights)
        return None, grad_t.view(L, m, d).transpose(1, 2), grad_b, None, None


@register("clt")
class TopKCLT(CrossLayerTranscoder):
    """TopK CLT: the k largest pre-activations of each layer's latents, ReLU'd; AuxK."""

    uses_auxk = True
    takes_k = True

    def activate(self, pre: Tensor, layer: int | None = None) -> Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def forward(self, x: Tensor, *, target: Tensor | None = None,
                dead_mask: Tensor | None = None, auxk_coefficient: float = 0.0,
                sparsity_scale: float = 1.0) -> ForwardOutput:
        """The top k of each layer chosen on pre-activations computed without gradient; the
        gradient then flows only through the chosen latents (`_Selected`), as in the TopK
        kernels, and the decoder reads only them (embedding_bag)."""
        x = x.to(self.dtype)
        y = self.target_of(x, target)
        n, L, m = x.shape[0], self.n_layers, self.m
        x_stack = x.reshape(n, L, self.d_layer).transpose(0, 1).reshape(L * n, self.d_layer)
        k = self.cfg.k
        with torch.no_grad():
            pre = self.layer_pre_acts(x)                                      # (L, n, m)
            local = kernels.block_topk_indices(pre.view(L * n, m), k).view(L, n, k)
            # in the weights' dtype: under bf16 autocast (saectl.precision) pre is bf16
            picked = pre.gather(2, local).transpose(0, 1).reshape(n, L * k).to(self.dtype)
            offset = torch.arange(L, device=x.device).repeat_interleave(k) * m
            idx = local.transpose(0, 1).reshape(n, L * k) + offset            # (n, L·k), global
        vals = _Selected.apply(picked, self.W_enc, self.b_enc, x_stack, idx).relu()
        y_hat = kernels.SparseDecode.apply(idx, vals, self.W_dec) + self.b_dec
        terms = {}
        if dead_mask is not None and auxk_coefficient > 0 and bool(dead_mask.any()):
            flat = pre.transpose(0, 1).reshape(n, L * m)
            terms["auxk_loss"] = self._auxk(flat, dead_mask, x_stack, y - y_hat.detach(),
                                            auxk_coefficient)
        acts = torch.sparse_coo_tensor(torch.stack([kernels.token_ids(idx), idx.reshape(-1)]),
                                       vals.detach().reshape(-1), (n, self.d_sae),
                                       check_invariants=False)
        return self._finish(y, y_hat, acts, terms)

    def _auxk(self, pre: Tensor, dead: Tensor, x_stack: Tensor, residual: Tensor,
              coefficient: float) -> Tensor:
        """AuxK (base.py's `_auxk_loss`): the top k_aux dead latents reconstruct the residual,
        with the gradient through the chosen latents only."""
        num_dead = int(dead.sum())
        k_aux = min(self.d_in // 2, num_dead)
        with torch.no_grad():
            idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices
        vals = _Selected.apply(pre.gather(1, idx).to(self.dtype), self.W_enc, self.b_enc,
                               x_stack, idx).relu()
        e_hat = kernels.SparseDecode.apply(idx, vals, self.W_dec)
        scale = min(num_dead / (self.d_in // 2), 1.0)
        return coefficient * scale * (e_hat - residual).pow(2).sum(-1).mean()


@register("jumprelu-clt")
class JumpReLUCLT(Thresholds, CrossLayerTranscoder):
    """JumpReLU CLT: per-latent thresholds learned through the straight-through estimator,
    with the L0 penalty (jumprelu.py's `Thresholds`); circuit-tracer's CLTs run this."""

    def activate(self, pre: Tensor, layer: int | None = None) -> Tensor:
        t = self.threshold
        t = t[self._latents(layer)] if layer is not None else t.view(self.n_layers, 1, self.m)
        return pre * (pre > t)
