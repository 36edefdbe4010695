"""An SAE's folder in SAELens's layout: `cfg.json` + `sae_weights.safetensors` (+
`sparsity.safetensors`), written by `save` and read by `load_sae`.

cfg.json holds SAELens's keys at the top level (what `sae_lens.SAE.load_from_disk` reads) and
saectl's full config under `saectl` (what `load_sae` reads). The `architecture` names the
SAELens class that runs the SAE at inference:

    SAE          standard | topk | jumprelu | gated   (batchtopk and matryoshka: jumprelu)
    transcoder   transcoder | jumprelu_transcoder     (batchtopk and matryoshka: jumprelu_...)
    skip         skip_transcoder | jumprelu_skip_transcoder

A transcoder's cfg says `apply_b_dec_to_input: false` (its b_dec is the output's) and `d_out`,
its metadata the output hook (`hook_name_out`, `hook_layer_out`); W_skip is saved (d_out, d_in)
as SAELens keeps it. SAELens has no TopK or gated transcoder: those are written under a name
SAELens refuses to load (`saectl_topk_transcoder`), never one it would run differently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saectl.errors import ConfigError, NotFoundError, SaectlError
from saectl.sae.base import (
    ARCHS,
    CFG_FILENAME,
    SAE,
    SPARSITY_FILENAME,
    WEIGHTS_FILENAME,
    SAEConfig,
)
from saectl.store import atomic_write

TRANSCODERS = {("standard", False): "transcoder", ("standard", True): "skip_transcoder",
               ("jumprelu", False): "jumprelu_transcoder",
               ("jumprelu", True): "jumprelu_skip_transcoder"}
"""(the SAE's SAELens architecture, skip) → SAELens's transcoder class at inference."""

_SITE = re.compile(r"^(resid_pre|resid_mid|resid_post|mlp_in|mlp_out|attn_out)\.(\d+)$")


def saelens_architecture(sae: SAE) -> str | None:
    """The SAELens architecture that runs `sae` exactly, or None where SAELens has none."""
    if not sae.cfg.transcoder:
        return sae.saelens_architecture
    return TRANSCODERS.get((sae.saelens_architecture, sae.cfg.skip))


def tl_hook(name: Any) -> tuple[str, int] | None:
    """(TransformerLens's name, layer) for saectl's hook name, or None if it has none.
    saectl's mlp_in is what the MLP reads, after its norm: `blocks.L.mlp.hook_in` of
    TransformerLens's bridge (and circuit-tracer's); `blocks.L.hook_mlp_in` is the norm's input."""
    site = _SITE.match(str(name or ""))
    if not site:
        return None
    hook = "mlp.hook_in" if site[1] == "mlp_in" else f"hook_{site[1]}"
    return f"blocks.{site[2]}.{hook}", int(site[2])


def cfg_json(sae: SAE, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """cfg.json: SAELens's keys at the top level, saectl's full config under `saectl`.

    SAELens keeps `metadata` only if it names a SAELens version >= 6 (else it rebuilds it
    from top-level keys: `handle_config_defaulting`); "6.0.0" is the release that brought
    the layout written here, and a later one would claim what saectl does not write. The
    hook is named as TransformerLens does (what SAELens attaches to; ln2 is not, saectl's
    is after the norm's weight) and read from the model's own activations, which is
    TransformerLens's `from_pretrained_no_processing` (center_writing_weights false)."""
    meta = {"sae_lens_version": "6.0.0", **(metadata or {})}
    tl = tl_hook(meta.get("hook_name"))
    if tl:
        meta.update(hook_name=tl[0], saectl_hook=meta["hook_name"],
                    model_from_pretrained_kwargs={"center_writing_weights": False})
    transcoder = sae.cfg.transcoder
    if transcoder and (out := tl_hook(meta.get("target_hook"))):
        meta.update(hook_name_out=out[0], hook_layer_out=out[1])
    arch = saelens_architecture(sae)
    if arch is None:  # no SAELens class computes it: a name SAELens refuses
        arch = f"saectl_{sae.arch}_{'skip_' if sae.cfg.skip else ''}transcoder"
    d: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": sae.cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": not transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        "saectl": sae.cfg.to_dict(),
    }
    if transcoder:
        d["d_out"] = sae.d_in
    if arch == "topk":
        d["k"] = sae.cfg.k
        d["rescale_acts_by_decoder_norm"] = False
    return d


def save(sae: SAE, path: str | Path, *, sparsity: Tensor | None = None,
         metadata: dict[str, Any] | None = None) -> Path:
    """Write cfg.json and sae_weights.safetensors (and sparsity.safetensors when given, the
    log10 firing rate per latent) into the folder `path`; each file is written to a
    temporary name and renamed into place."""
    from safetensors.torch import save as st_save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.saved_tensors().items()}
    atomic_write(path / WEIGHTS_FILENAME, st_save(tensors))
    if sparsity is not None:
        atomic_write(path / SPARSITY_FILENAME,
                     st_save({"sparsity": sparsity.detach().cpu().contiguous()}))
    text = json.dumps(cfg_json(sae, metadata), indent=2, sort_keys=True) + "\n"
    atomic_write(path / CFG_FILENAME, text.encode())
    return path


def _from_saelens() -> dict[str, type[SAE]]:
    """SAELens architecture name → the class that reads it (`SAE.loads_saelens`)."""
    return {cls.saelens_architecture: cls for cls in ARCHS.values() if cls.loads_saelens}


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by `save` (or a SAELens standard/topk/jumprelu/gated SAE),
    picking the class from the registry by the architecture in cfg.json. Returns it in eval
    mode."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise NotFoundError(f"no SAE at {path}: {p.name} is missing; pass a folder "
                                f"written by saectl or SAELens")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise SaectlError(f"cannot read {cfg_path}: {e}; the SAE folder is damaged") from None
    if "saectl" in raw:
        cfg = SAEConfig.from_dict(raw["saectl"])
    else:
        readers = _from_saelens()
        cls = readers.get(raw.get("architecture", "standard"))
        if cls is None:
            raise ConfigError(f"{cfg_path}: SAELens architecture {raw.get('architecture')!r} "
                              f"cannot be loaded; saectl reads {', '.join(readers)} (import "
                              "other SAELens SAEs and transcoders with saectl import-sae)")
        extra = {"k": int(raw["k"])} if cls.takes_k else {}
        cfg = SAEConfig(arch=cls.arch, d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]),
                        dtype=str(raw.get("dtype", "float32")).replace("torch.", ""), **extra)
    sae = ARCHS[cfg.arch](cfg)
    tensors = load_file(str(weights_path))
    if cfg.skip and "d_out" not in raw:  # written before W_skip was saved as SAELens's (d_out, d_in)
        tensors["W_skip"] = tensors["W_skip"].T
    sae.load_saved_tensors(tensors)
    return sae.to(device).eval()
