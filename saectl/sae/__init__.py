"""Sparse autoencoder architectures on a shared base; importing this package registers them.

    from saectl.sae import SAEConfig, ARCHS, load_sae
    sae = ARCHS["topk"](SAEConfig(arch="topk", d_in=576, d_sae=4608, k=32))
"""

from saectl.sae import batchtopk, gated, jumprelu, matryoshka, relu, topk  # noqa: F401  (registers)
from saectl.sae.base import (
    ARCHS,
    SAE,
    ForwardOutput,
    SAEConfig,
    arch_names,
    load_sae,
    register,
)

__all__ = ["ARCHS", "SAE", "ForwardOutput", "SAEConfig", "arch_names", "load_sae", "register"]
