"""Sparse autoencoder architectures on a shared base; importing this package registers them.

    from saectl.sae import SAEConfig, ARCHS, load_sae
    sae = ARCHS["topk"](SAEConfig(arch="topk", d_in=576, d_sae=4608, k=32))

Every module of this package is imported here, so an architecture is one file under
`saectl/sae/` with a `@register("name")` class (docs/architecture.md, "Adding an
architecture"); its class attributes (`takes_k`, `uses_auxk`, ...) are all the rest of saectl
knows about it.
"""

import importlib
import pkgutil

from saectl.sae.base import (
    ARCHS,
    SAE,
    ForwardOutput,
    SAEConfig,
    arch_names,
    load_sae,
    register,
)

for _module in pkgutil.iter_modules(__path__):  # registers every architecture
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ARCHS", "SAE", "ForwardOutput", "SAEConfig", "arch_names", "load_sae", "register"]
