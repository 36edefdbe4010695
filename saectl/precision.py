"""Training in bfloat16: which products run in bf16, and whether the hardware does bf16 natively.

`saectl train --autocast bfloat16` runs each SAE's forward under `torch.autocast` on its
device type, as sparsify trains on GPUs and as harvest's `--autocast` runs the model. The
policy, and why each part stays where it is:

- The encoder and decoder products take bf16 inputs; oneDNN (CPU) and cuBLAS (CUDA) accumulate
  them in fp32 and round the result to bf16. They are the O(n·d_in·d_sae) work, so the
  speed-up is theirs.
- The master weights, their gradients and Adam's moments stay fp32 (the parameters are fp32;
  autocast casts a copy per product, and the cast's backward returns fp32 gradients): an Adam
  update is ~1e-4 of a weight, below bf16's resolution of 2^-8, so bf16 weights would not move.
- The loss stays fp32: the reconstruction is a bf16 product plus the fp32 b_dec, which
  promotes, so the squared error and its sums over d_in and tokens are fp32 (a bf16 sum of
  thousands of terms loses the small ones).
- TopK selection: the sparse kernel (saectl.sae.kernels) finds k + 8 candidates per token
  from the bf16 encoder product (its "bf16 candidate selection") and recomputes their values
  exactly in fp32, so the chosen activations are fp32; AuxK's dead latents the same way. Its
  decoding and backward are sparse O(n·k·d_in) and stay fp32: no dense product to speed up.
  BatchTopK and Matryoshka select over the bf16 products (a dense (n, d_sae) selection, as
  sparsify's GPU path); their AuxK reconstruction runs in fp32 (base.py).
- JumpReLU's thresholds compare in fp32 (the bf16 pre-activation against the fp32 threshold
  promotes) and its L0 count is summed in fp32.

`emulated(device)` is True where bf16 products have no hardware support (a CPU without
avx512_bf16 / amx_bf16 or Arm's bf16, a GPU before Ampere): there they are slower than fp32,
which `say_if_emulated` tells the user once per process, and training goes on.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys

AUTOCAST = (None, "bfloat16")
"""`--autocast` choices; None: fp32 throughout (float16 would need loss scaling: not offered)."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN / the Arm kernels run bf16 matmuls natively: avx512_bf16 or amx_bf16 in
    /proc/cpuinfo's flags (x86), bf16 in its Features (Arm: Graviton3, Neoverse V1/N2), or
    FEAT_BF16 on macOS (Apple M2 and later)."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        words = set()
    if words & {"avx512_bf16", "amx_bf16", "bf16"}:
        return True
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], check=False,
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
        return out.strip() == "1"
    return False


def check(autocast: str | None) -> None:
    """One-line ConfigError for an unsupported --autocast value."""
    from saectl.errors import ConfigError

    if autocast not in AUTOCAST:
        why = (" (float16 needs loss scaling to train; bfloat16 has float32's range)"
               if autocast == "float16" else "")
        shown = autocast if autocast else repr(autocast)  # an empty value shows as ''
        raise ConfigError(f"--autocast {shown} is not supported{why}; use --autocast "
                          f"bfloat16, or leave it out for float32")


def emulated(device) -> bool:
    """Whether bf16 products on `device` run without hardware support (slower than fp32)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return not torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return not cpu_has_native_bf16()
    return False


_told: set[str] = set()


def say_if_emulated(device) -> None:
    """One line, once per process and device type, where bf16 products are emulated."""
    import torch

    from saectl.console import info

    kind = torch.device(device).type
    if kind in _told or not emulated(device):
        return
    _told.add(kind)
    what = ("this CPU has no native bfloat16 (avx512_bf16, amx_bf16 or Arm's bf16)"
            if kind == "cpu" else "this GPU has no native bfloat16 (before Ampere)")
    info(f"train: --autocast bfloat16: {what}, so bf16 products are emulated and training "
         "will be slower than float32; training anyway")


def autocast(device, name: str | None):
    """torch.autocast on `device`'s type in `name`'s dtype, or a no-op for None."""
    import torch

    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, name))


def active_bf16(device) -> bool:
    """Whether the code running now is under bf16 autocast for `device`'s type (the sparse
    kernels, which run with autocast off, ask this to choose their own bf16 product)."""
    import torch

    kind = torch.device(device).type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16
