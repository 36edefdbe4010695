"""The shared base of saectl's sparse autoencoders: the config, the architecture registry and
the `SAE` module (its files, in SAELens's layout: saectl.sae.files).

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
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saectl.errors import ConfigError, SaectlError

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}

ARCHS: dict[str, type[SAE]] = {}
"""Registered architectures by name; CLI choices come from here (`arch_names()`)."""


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: make an SAE class loadable by `name`; a name can be taken only once."""

    def deco(cls: type[SAE]) -> type[SAE]:
        if name in ARCHS:
            raise ValueError(f"SAE architecture {name!r} is already registered by "
                             f"{ARCHS[name].__qualname__}; pick another name")
        cls.arch = name
        ARCHS[name] = cls
        return cls

    return deco


def arch_names() -> list[str]:
    return sorted(ARCHS)


@dataclass(frozen=True)
class SAEConfig:
    """What defines an SAE: its architecture, its shape, and the hyperparameters of its loss."""

    arch: str
    """Architecture, one of `arch_names()` (the classes registered in saectl/sae/)."""
    d_in: int
    """Width of the activations the SAE reads."""
    d_sae: int
    """Number of latents (dictionary width), usually expansion × d_in."""
    k: int = 32
    """Active latents per token (topk), or per token on average over a batch (batchtopk,
    matryoshka). Unused by relu, jumprelu and gated."""
    l1_coefficient: float = 5.0
    """Weight of the decoder-norm-weighted L1 penalty (relu, gated). Anthropic's April 2024
    update uses 5 with inputs at mean norm √d_in and the MSE summed over d_in."""
    l0_coefficient: float = 1.0
    """Weight of the L0 penalty of jumprelu, in squared-error units per active latent (SAELens's
    default at the same input scale)."""
    jumprelu_bandwidth: float = 0.1
    """Width ε of the rectangle kernel of jumprelu's straight-through estimator. The papers'
    0.001 is for inputs at unit mean squared norm; ours are at mean norm √d_in, where
    pre-activations are about √d_in times larger (Anthropic's January 2025 update uses 2)."""
    jumprelu_threshold_init: float = 0.5
    """Initial jumprelu threshold (the parameter is its log)."""
    batchtopk_threshold_lr: float = 0.01
    """Rate of the running average of the smallest positive training activation, which becomes
    the inference threshold of batchtopk and matryoshka (SAELens `topk_threshold_lr`)."""
    matryoshka_prefixes: tuple[int, ...] = ()
    """Nested dictionary sizes of matryoshka, strictly increasing and ending at d_sae; empty
    means (d_sae/16, d_sae/4, d_sae), keeping those at least k."""
    dtype: str = "float32"
    """Parameter dtype: float32 (training), float64, bfloat16 or float16."""
    transcoder: bool = False
    """A transcoder: it reads one hook (an MLP's input) and reconstructs another (its output),
    so its input is not centred on b_dec, which lives in the output's space."""
    skip: bool = False
    """A skip transcoder's linear path x @ W_skip beside the latents (initialised at zero)."""
    n_layers: int = 1
    """Layers a cross-layer transcoder spans (saectl/sae/clt.py): d_in and d_sae are then the
    totals over its layers, the concatenation of every layer's input and latents."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown SAE architecture {self.arch!r}; choose one of "
                              f"{', '.join(arch_names())}")
        for name in ("d_in", "d_sae", "k", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name in ("l1_coefficient", "l0_coefficient", "batchtopk_threshold_lr"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 0")
        for name in ("jumprelu_bandwidth", "jumprelu_threshold_init"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported; use one of "
                              f"{', '.join(DTYPES)}")
        if self.skip and not self.transcoder:
            raise ConfigError("--skip adds a transcoder's linear path; give --target too")
        object.__setattr__(self, "matryoshka_prefixes", tuple(self.matryoshka_prefixes))
        ARCHS[self.arch].check_config(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["matryoshka_prefixes"] = list(self.matryoshka_prefixes)
        for name in ("transcoder", "skip"):  # absent when off: SAE addresses stay as they were
            if not d[name]:
                del d[name]
        if d["n_layers"] == 1:
            del d["n_layers"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown SAE config field(s) {', '.join(unknown)}; "
                              f"fields are {', '.join(sorted(known))}")
        return cls(**d)


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

    def decode(self, acts: Tensor) -> Tensor:
        """acts @ W_dec + b_dec; acts may be dense or sparse COO."""
        if acts.is_sparse:
            return torch.sparse.mm(acts, self.W_dec) + self.b_dec
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
