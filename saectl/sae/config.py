"""What defines an SAE (`SAEConfig`: its architecture, shape and loss hyperparameters) and the
registry of architectures the config is checked against (`register`, `ARCHS`): each class in
saectl/sae/ registers itself by name, the CLI's choices and `load_sae` read the names from here,
and a config asks its architecture's `check_config` whether it can train (saectl.sae.base).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from saectl.errors import ConfigError

if TYPE_CHECKING:
    from saectl.sae.base import SAE

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
