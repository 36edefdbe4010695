"""The shared base of saectl's sparse autoencoders: the `SAE` module (its config and the
architecture registry: saectl.sae.config; its files, in SAELens's layout: saectl.sae.files).

Every architecture computes, with SAELens's names and shapes (SAELens `saes/sae.py`):

    pre   = (x - b_dec) @ W_enc + b_enc        W_enc (d_in, d_sae), b_enc (d_sae,)
    acts  = activation(pre)                     architecture-specific, acts >= 0
    x_hat = acts @ W_dec + b_dec                W_dec (d_sae, d_in), b_dec (d_in,)

b_dec is subtracted from the input before encoding (SAELens `apply_b_dec_to_input=True`,
sparsify `SparseCoder.encode`). `save` writes `cfg.json` + `sae_weights.safetensors` with
SAELens's key names; the cfg holds the architecture name, and `load_sae` picks the class from
the registry (SAELens `registry.py`), so no list of architectures is ever written by hand.

Input scale convention (the one SAELens's `fold_activation_norm_scaling_factor` uses):
training sees `s * x_raw`, with `s` chosen so the mean norm is √d_in. `fold_input_scale(s)`
multiplies W_enc by s and divides W_dec and b_dec by s. Afterwards
`encode(x_raw)` equals the training-time `encode(s * x_raw)` (same latents, same thresholds),
and `decode` returns reconstructions in raw units: `x_hat_raw = x_hat_train / s`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saectl.errors import ConfigError, SaectlError

# The config and the registry (saectl.sae.config), imported by every architecture from here.
from saectl.sae.config import ARCHS, DTYPES, SAEConfig, arch_names, register

__all__ = ["ARCHS", "CFG_FILENAME", "DTYPES", "SAE", "SPARSITY_FILENAME", "WEIGHTS_FILENAME",
           "ForwardOutput", "SAEConfig", "arch_names", "load_sae", "register"]

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"


class ForwardOutput(NamedTuple):
    """What `SAE.forward` returns (sparsify `sparse_coder.py:ForwardOutput`)."""

    x_hat: Tensor
    """Reconstruction, (n, d_in)."""
    acts: Tensor
    """Latent activations, (n, d_sae): dense, or a sparse COO tensor on the fast TopK path."""
    losses: dict[str, Tensor]
    """Scalar loss terms: `loss` is what training minimises, `mse` the squared error summed over
    d_in and averaged over tokens, plus the architecture's weighted terms (`l1_loss`, `l0_loss`,
    `auxk_loss`, `aux_recon_loss`, `mse_prefix_<m>`). `loss` is `mse` + the terms, except for
    matryoshka, where the mean of the prefix MSEs replaces `mse`."""
    l0: Tensor
    """Mean number of active latents per token (scalar, no gradient)."""
    fired: Tensor
    """(d_sae,) bool: which latents were active on at least one token."""


def decode_entries(n: int, rows: Tensor, cols: Tensor, vals: Tensor, W_dec: Tensor) -> Tensor:
    """(n, d_out): row t is Σ vals[i] · W_dec[cols[i]] over the entries i with rows[i] = t
    (rows sorted). One `embedding_bag`, at a cost per entry, where the dense product (or
    torch.sparse.mm) costs far more at an SAE's sparsity."""
    offsets = torch.searchsorted(rows, torch.arange(n, device=rows.device))
    return F.embedding_bag(cols, W_dec, offsets, per_sample_weights=vals.to(W_dec.dtype),
                           mode="sum")


def sparse_decode(acts: Tensor, W_dec: Tensor) -> Tensor:
    """acts @ W_dec for sparse COO acts (n, d_sae)."""
    acts = acts.coalesce()  # rows, then columns, sorted: a no-op when built so
    if acts.dim() != 2:
        raise ValueError(f"sparse latents must be (n, d_sae), not {tuple(acts.shape)}")
    (rows, cols), vals = acts.indices(), acts.values()
    return decode_entries(acts.shape[0], rows, cols, vals, W_dec)


class SAE(nn.Module, metaclass=abc.ABCMeta):
    """Base of every architecture. Subclasses set the class attributes, define `encode` (dense
    acts, for inference) and `forward` (training losses), and register themselves.

    W_enc is a (d_in, d_sae) parameter stored transposed in memory (its latent columns are
    contiguous rows of a (d_sae, d_in) buffer), as W_decᵀ is at initialisation; the sparse TopK
    kernels gather latent columns and return its gradient in that layout without a copy.
    """

    arch: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = ""
    """`architecture` written to cfg.json: the SAELens class that runs this SAE at inference."""
    unit_norm_decoder: ClassVar[bool] = True
    """Training keeps decoder rows at unit norm (renormalised after each step, gradient
    parallel to the rows removed); False where penalties are weighted by decoder norms."""
    init_decoder_norm: ClassVar[float] = 1.0
    has_b_enc: ClassVar[bool] = True
    uses_auxk: ClassVar[bool] = False
    """Training adds the AuxK loss on dead latents."""
    cross_layer: ClassVar[bool] = False
    """A cross-layer transcoder (clt.py): it reads and writes the hooks of n_layers layers."""
    takes_k: ClassVar[bool] = False
    """`SAEConfig.k` sets how many latents are active (and must be below d_sae); elsewhere k is
    carried in the config, unused."""
    loads_saelens: ClassVar[bool] = False
    """A SAELens cfg.json whose `architecture` is this class's `saelens_architecture` loads as
    this class (batchtopk, matryoshka and jumprelu all save as SAELens's jumprelu; jumprelu reads
    it)."""

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        if cfg.arch != self.arch:
            raise ConfigError(f"config is for {cfg.arch!r}, not {self.arch!r}; "
                              f"use load_sae or ARCHS[cfg.arch]")
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float32)
        W_dec *= self.init_decoder_norm / W_dec.norm(dim=1, keepdim=True)
        W_dec = W_dec.to(dtype)
        self.W_enc = nn.Parameter(W_dec.clone().t())
        if self.has_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in, dtype=dtype))

    # -- configuration -------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise ConfigError for settings this architecture cannot train with."""
        if cls.takes_k and cfg.k >= cfg.d_sae:
            raise ConfigError(f"k={cfg.k} must be smaller than the width {cfg.d_sae}; "
                              f"lower --k or raise --expansion")
        if cfg.n_layers != 1 and not cls.cross_layer:
            raise ConfigError(f"{cls.arch} reads one hook; a layer range (n_layers="
                              f"{cfg.n_layers}) trains a cross-layer transcoder: --arch clt or "
                              "jumprelu-clt")

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # -- the model ----------------------------------------------------------------------

    @property
    def transcoder(self) -> bool:
        return self.cfg.transcoder

    def encoder_input(self, x: Tensor) -> Tensor:
        """x - b_dec for an SAE; x itself for a transcoder (its b_dec is the output's)."""
        return x.to(self.dtype) if self.transcoder else x.to(self.dtype) - self.b_dec

    def target_of(self, x: Tensor, y: Tensor | None) -> Tensor:
        """What the latents must reconstruct: x for an SAE, y for a transcoder, and y less the
        skip path x @ W_skip for a skip transcoder (so W_skip learns through every loss term,
        and the latents explain what the linear path does not)."""
        if y is None:
            return x
        y = y.to(self.dtype)
        return y - x.to(self.dtype) @ self.W_skip if self.cfg.skip else y

    def pre_acts(self, x: Tensor) -> Tensor:
        """(x - b_dec) @ W_enc + b_enc (a transcoder: x @ W_enc + b_enc), dense (..., d_sae)."""
        x_c = self.encoder_input(x)
        if x_c.dim() == 2:
            return torch.addmm(self.b_enc, x_c, self.W_enc)
        return x_c @ self.W_enc + self.b_enc

    @abc.abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Latent activations of x (..., d_in), dense (..., d_sae), as used at inference."""

    def encode_sparse(self, x: Tensor) -> Tensor:
        """`encode` of x (n, d_in) as a coalesced sparse COO (n, d_sae) tensor of its non-zero
        latents, for consumers that touch only those (the eval figures, the description
        length, interpret's scan). An architecture with a sparse kernel (TopK) overrides it
        and never builds the dense (n, d_sae) block."""
        return self.encode(x).to_sparse()

    def decode(self, acts: Tensor) -> Tensor:
        """acts @ W_dec + b_dec; acts may be dense or sparse COO (n, d_sae)."""
        if acts.is_sparse:
            return sparse_decode(acts, self.W_dec) + self.b_dec
        return acts @ self.W_dec + self.b_dec

    @abc.abstractmethod
    def forward(self, x: Tensor, *, target: Tensor | None = None,
                dead_mask: Tensor | None = None, auxk_coefficient: float = 0.0,
                sparsity_scale: float = 1.0) -> ForwardOutput:
        """Reconstruct x (n, d_in), or a transcoder's target y, and compute the training
        losses (against `self.target_of(x, target)`; x_hat leaves out a skip path).

        dead_mask: (d_sae,) bool, latents that have not fired for a while (AuxK targets them).
        auxk_coefficient: weight of the AuxK loss (architectures that use it).
        sparsity_scale: multiplier in [0, 1] on the sparsity coefficient (its warm-up).
        """

    def _finish(self, x: Tensor, x_hat: Tensor, acts: Tensor, terms: dict[str, Tensor],
                loss: Tensor | None = None) -> ForwardOutput:
        """Add the MSE and the total (by default MSE + the weighted terms) to the loss terms."""
        mse = (x_hat - x).pow(2).sum(-1).mean()
        if loss is None:
            loss = sum(terms.values(), mse)
        losses = {"mse": mse, **terms, "loss": loss}
        with torch.no_grad():
            if acts.is_sparse:
                idx, vals = acts._indices(), acts._values()
                active = vals > 0
                l0 = active.sum().to(torch.float32) / max(x.shape[0], 1)
                fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
                fired[idx[1][active]] = True
            else:
                active = acts > 0
                l0 = active.sum(-1).to(torch.float32).mean()
                fired = active.any(0)
        return ForwardOutput(x_hat, acts, losses, l0, fired)

    def _auxk_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None,
                   coefficient: float) -> dict[str, Tensor]:
        """AuxK (Gao et al. 2024, App. B.1; sparsify `sparse_coder.py`): the top k_aux = d_in/2
        dead latents reconstruct the residual, scaled down when fewer latents are dead. The
        residual is reconstructed without b_dec, as in the paper."""
        if dead_mask is None or coefficient == 0.0:
            return {}
        num_dead = int(dead_mask.sum())
        if num_dead == 0:
            return {}
        k_aux = min(self.d_in // 2, num_dead)
        scale = min(num_dead / (self.d_in // 2), 1.0)
        masked = pre.masked_fill(~dead_mask, float("-inf"))
        vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
        # in W_dec's dtype: under bf16 autocast (saectl.precision) pre is bf16, AuxK runs fp32
        e_hat = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals.relu().to(self.dtype),
                                mode="sum")
        residual = (x - x_hat).detach()
        auxk = (e_hat - residual).pow(2).sum(-1).mean()
        return {"auxk_loss": coefficient * scale * auxk}

    # -- scale folding ------------------------------------------------------------------

    @torch.no_grad()
    def fold_input_scale(self, s: float, s_out: float | None = None) -> None:
        """Make an SAE trained on `s * x_raw` work on x_raw (module docstring): same latents,
        reconstructions in raw units. Decoder rows then have norm 1/s. A transcoder trained to
        map s * x_raw to s_out * y_raw: W_dec, b_dec divided by s_out, W_skip by s_out / s."""
        s_out = s if s_out is None else s_out
        self.W_enc.mul_(s)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)
        if self.cfg.skip:
            self.W_skip.mul_(s / s_out)

    # -- save / load --------------------------------------------------------------------

    def saved_tensors(self) -> dict[str, Tensor]:
        """Tensors as written to sae_weights.safetensors (SAELens key names and shapes: a skip
        transcoder's W_skip as SAELens's (d_out, d_in), read as x @ W_skip.T)."""
        tensors = {k: v.detach() for k, v in self.state_dict().items()}
        if "W_skip" in tensors:
            tensors["W_skip"] = tensors["W_skip"].T
        return tensors

    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `saved_tensors`."""
        self._load_strict(tensors)

    def _load_strict(self, tensors: dict[str, Tensor]) -> None:
        """Load tensors in the saved layout (`saved_tensors`), names and shapes checked."""
        if "W_skip" in tensors:
            tensors = {**tensors, "W_skip": tensors["W_skip"].T}
        own = self.state_dict()
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            raise SaectlError(f"{self.arch} SAE weights do not match: missing "
                              f"{missing or 'none'}, unexpected {extra or 'none'}")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise SaectlError(f"{self.arch} SAE weight {name} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(own[name].shape)}")
        self.load_state_dict(tensors)

    def cfg_json(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """cfg.json: SAELens's keys at the top level, saectl's full config under `saectl`
        (saectl.sae.files.cfg_json)."""
        from saectl.sae import files

        return files.cfg_json(self, metadata)

    def save(self, path: str | Path, *, sparsity: Tensor | None = None,
             metadata: dict[str, Any] | None = None) -> Path:
        """Write cfg.json and sae_weights.safetensors (and sparsity.safetensors when given, the
        log10 firing rate per latent) into the folder `path` (saectl.sae.files.save)."""
        from saectl.sae import files

        return files.save(self, path, sparsity=sparsity, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SAE:
        from saectl.sae import files

        sae = files.load_sae(path, device)
        if cls is not SAE and not isinstance(sae, cls):
            raise ConfigError(f"{path} holds a {sae.arch} SAE, not {cls.arch}")
        return sae


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder (saectl.sae.files.load_sae)."""
    from saectl.sae import files

    return files.load_sae(path, device)
