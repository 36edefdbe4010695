"""Published SAEs read from the files other tools write, and rewritten in saectl's formula.

Each reader returns a `Source`: the weights as the tool keeps them (W_enc (d_in, d_sae),
W_dec (d_sae, d_in)) and how that tool encodes with them. `to_saectl` then folds the
differences into the weights, exactly, so saectl's `encode` (pre = (x - b_dec) @ W_enc + b_enc)
gives the tool's own latents:

- the tool does not subtract b_dec from its input (Gemma Scope; SAELens with
  `apply_b_dec_to_input: false`): b_enc += b_dec @ W_enc (and the gated biases likewise);
- the tool scales pre-activations by decoder norms (SAELens TopK `rescale_acts_by_decoder_norm`):
  column i of W_enc, b_enc[i] and the threshold are multiplied by |W_dec[i]|, and W_dec[i] is
  divided by it, so latents and reconstructions are unchanged;
- a norm scaling factor s (SAELens `expected_average_only_in`): `fold_input_scale(s)`, as
  SAELens's own `fold_activation_norm_scaling_factor` does.

Folds run in float64; the SAE is kept in float32. What cannot be folded (a per-token input
normalisation, a group-max activation) is refused in one line. SAELens transcoders
(Transcoder, SkipTranscoder, JumpReLU[Skip]Transcoder) encode `x @ W_enc + b_enc` as saectl's
transcoders do, so their weights are taken as they are (W_skip in SAELens's (d_out, d_in)).
Formats: SAELens (`cfg.json` + `sae_weights.safetensors`), sparsify (`cfg.json` +
`sae.safetensors`), dictionary_learning (`ae.pt` + `config.json`, read with
`torch.load(weights_only=True)`: tensors only, never code) and Gemma Scope (`params.npz`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saectl.errors import ConfigError

LAYOUTS = ("SAELens (cfg.json + sae_weights.safetensors)", "sparsify (cfg.json + sae.safetensors)",
           "dictionary_learning (ae.pt + config.json)", "Gemma Scope (params.npz)")


@dataclass
class Source:
    """A published SAE as its tool keeps it."""

    format: str
    arch: str
    """saectl architecture that runs it: relu, topk, jumprelu or gated."""
    tensors: dict[str, Tensor]
    """W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_dec, b_enc (or b_gate, r_mag, b_mag), and
    threshold (d_sae,) for jumprelu."""
    k: int | None = None
    subtracts_b_dec: bool = True
    rescale_by_decoder_norm: bool = False
    input_scale: float | None = None
    model: str | None = None
    hook: str | None = None
    """The hook as the tool names it (mapped by saectl.hook_names)."""
    model_kwargs: dict | None = None
    """SAELens's `model_from_pretrained_kwargs`: how TransformerLens processed the model."""
    target_hook: str | None = None
    """A transcoder's output hook as the tool names it (SAELens `metadata.hook_name_out`)."""
    transcoder: bool = False
    """Reads one hook and reconstructs another; its input is never centred on b_dec."""
    skip: bool = False
    """A skip transcoder: tensors hold W_skip (d_out, d_in), as SAELens saves it."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What was read and carried over, for the manifest."""
    declared: dict[str, int] = field(default_factory=dict)
    """d_in and d_sae as the config says them, checked against the weights."""


def _cfg(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}; the SAE folder is damaged") from None


def _safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own and OSError
        raise ConfigError(f"cannot read {path}: {e}; the weights file is damaged") from None


def _need(tensors: dict[str, Tensor], names: tuple[str, ...], where: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ConfigError(f"{where} has no tensor {', '.join(missing)} (it holds "
                          f"{', '.join(sorted(tensors))}); is it the layout it claims?")


# -- SAELens --------------------------------------------------------------------------------

_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
            "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu",
            "transcoder": "relu", "skip_transcoder": "relu",
            "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu"}
_KEEP_NORM = ("none", "expected_average_only_in")


def read_saelens(folder: Path, scaling_factor: float | None = None) -> Source:
    cfg = _cfg(folder / "cfg.json")
    arch = cfg.get("architecture", "standard")
    if arch not in _SAELENS:
        raise ConfigError(f"{folder}: SAELens architecture {arch!r} cannot be imported; saectl "
                          f"reads {', '.join(_SAELENS)}")
    transcoder = arch.endswith("transcoder")
    norm = cfg.get("normalize_activations") or "none"
    if transcoder and norm != "none":
        raise ConfigError(f"{folder}: a transcoder with normalize_activations={norm!r} scales its "
                          "input and output apart, which saectl does not read; import one saved "
                          "with none (SAELens folds the scale in when training ends)")
    if norm == "expected_average_only_in" and not scaling_factor:
        raise ConfigError(f"{folder}: normalize_activations=expected_average_only_in, and no norm "
                          "scaling factor is known (SAELens keeps it in its release registry); "
                          "pass --norm-scaling-factor, or import it as saelens:RELEASE/ID")
    if norm not in _KEEP_NORM:
        raise ConfigError(f"{folder}: normalize_activations={norm!r} rescales each token by its "
                          "own statistics, which no fixed weights can hold; saectl imports "
                          "none and expected_average_only_in")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ConfigError(f"{folder}: reshape_activations={cfg['reshape_activations']!r} "
                          "(attention heads) is not supported; import a resid/mlp/attn_out SAE")
    t = _safetensors(folder / "sae_weights.safetensors")
    if "topk_threshold" in t:  # a training BatchTopK saved with save_model, not for inference
        t["threshold"] = torch.full_like(t["b_enc"], float(t.pop("topk_threshold")))
    meta = cfg.get("metadata") or {}
    get = lambda key: meta.get(key, cfg.get(key))
    k = cfg.get("k")
    saelens_arch = _SAELENS[arch]
    if saelens_arch == "topk" and k is None:
        raise ConfigError(f"{folder}/cfg.json is a topk SAE without k; the file is incomplete")
    settings = {"architecture": arch, "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True),
                "normalize_activations": norm, "norm_scaling_factor": scaling_factor,
                "rescale_acts_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm"))}
    if transcoder:
        _transcoder_checks(folder, cfg, t, get("hook_name_out"))
    return Source("saelens", saelens_arch, t, int(k) if k is not None else None,
                  target_hook=get("hook_name_out"), transcoder=transcoder,
                  skip="skip" in arch,
                  subtracts_b_dec=bool(cfg.get("apply_b_dec_to_input", not transcoder)),
                  rescale_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm")),
                  input_scale=scaling_factor if norm == "expected_average_only_in" else None,
                  model=get("model_name"), hook=get("hook_name"),
                  model_kwargs=get("model_from_pretrained_kwargs"), settings=settings,
                  declared={"d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae")})


def _transcoder_checks(folder: Path, cfg: dict, t: dict[str, Tensor], out: str | None) -> None:
    if not out:
        raise ConfigError(f"{folder}: the transcoder does not name the hook it writes "
                          "(metadata.hook_name_out); add it to cfg.json, e.g. blocks.3.hook_mlp_out")
    d_in, d_out = cfg.get("d_in"), cfg.get("d_out", cfg.get("d_in"))
    if d_out != d_in:
        raise ConfigError(f"{folder}: the transcoder maps d_in={d_in} to d_out={d_out}; saectl's "
                          "transcoders read and write the same width (an MLP's input and output)")
    if "skip" in cfg["architecture"]:
        _need(t, ("W_skip",), folder / "sae_weights.safetensors")


# -- sparsify -------------------------------------------------------------------------------

def read_sparsify(folder: Path) -> Source:
    cfg = _cfg(folder / "cfg.json")
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise ConfigError(f"{folder} is a sparsify transcoder (transcode/skip_connection); "
                          "saectl imports sparsify SAEs until it has transcoders")
    if cfg.get("activation", "topk") != "topk":
        raise ConfigError(f"{folder}: sparsify activation {cfg['activation']!r} is not "
                          "supported; saectl imports topk")
    t = _safetensors(folder / "sae.safetensors")
    _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), folder / "sae.safetensors")
    tensors = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}
    settings = {k: cfg.get(k) for k in ("k", "num_latents", "expansion_factor",
                                        "normalize_decoder", "multi_topk") if k in cfg}
    return Source("sparsify", "topk", tensors, int(cfg["k"]), hook=folder.name,
                  settings=settings, declared={"d_in": cfg.get("d_in"),
                                               "d_sae": cfg.get("num_latents") or None})


# -- dictionary_learning --------------------------------------------------------------------

def _dl_linear(t: dict[str, Tensor], enc: str, dec: str) -> tuple[Tensor, Tensor]:
    """W_enc (d_in, d_sae) and W_dec (d_sae, d_in) from nn.Linear weights."""
    return t[f"{enc}.weight"].T, t[f"{dec}.weight"].T


def read_dictionary_learning(folder: Path) -> Source:
    cfg = _cfg(folder / "config.json")
    trainer = cfg.get("trainer", cfg)
    cls = trainer.get("dict_class", "AutoEncoder")
    try:
        t = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle with code in it fails here, as it should
        raise ConfigError(f"cannot read {folder / 'ae.pt'} as plain tensors ({type(e).__name__}); "
                          "saectl never unpickles code: re-save the state dict") from None
    if not isinstance(t, dict):
        raise ConfigError(f"{folder / 'ae.pt'} is not a state dict of tensors")
    k = trainer.get("k", t.get("k"))
    k = int(k) if k is not None else None
    if "ae" in t and isinstance(t["ae"], dict):
        raise ConfigError(f"{folder / 'ae.pt'} is a mid-run backup (step, ae, optimizer); import "
                          "the final ae.pt that training writes at the end")
    rescale = False
    if cls == "AutoEncoder":
        _need(t, ("encoder.weight", "encoder.bias", "decoder.weight", "bias"), folder / "ae.pt")
        W_enc, W_dec = _dl_linear(t, "encoder", "decoder")
        tensors, arch = {"W_enc": W_enc, "b_enc": t["encoder.bias"], "W_dec": W_dec,
                         "b_dec": t["bias"]}, "relu"
        rescale = True  # AutoEncoder.from_pretrained's default normalize_decoder=True
    elif cls == "AutoEncoderNew":  # no input centring: b_dec folds into b_enc below
        _need(t, ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"),
              folder / "ae.pt")
        W_enc, W_dec = _dl_linear(t, "encoder", "decoder")
        tensors, arch = {"W_enc": W_enc, "b_enc": t["encoder.bias"], "W_dec": W_dec,
                         "b_dec": t["decoder.bias"]}, "relu"
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        _need(t, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), folder / "ae.pt")
        W_enc, W_dec = _dl_linear(t, "encoder", "decoder")
        tensors = {"W_enc": W_enc, "b_enc": t["encoder.bias"], "W_dec": W_dec, "b_dec": t["b_dec"]}
        arch = "topk"
        if cls == "BatchTopKSAE":  # inference uses the learned threshold, not the batch top-k
            _need(t, ("threshold",), folder / "ae.pt")
            tensors["threshold"] = _per_latent(t["threshold"], W_enc.shape[1])
            arch = "jumprelu"
    elif cls in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        _need(t, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), folder / "ae.pt")
        tensors = {n: t[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        tensors["threshold"] = _per_latent(t["threshold"], t["W_enc"].shape[1])
        arch = "jumprelu"
    elif cls == "GatedAutoEncoder":
        _need(t, ("encoder.weight", "decoder.weight", "decoder_bias", "gate_bias", "mag_bias",
                  "r_mag"), folder / "ae.pt")
        W_enc, W_dec = _dl_linear(t, "encoder", "decoder")
        tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": t["decoder_bias"],
                   "b_gate": t["gate_bias"], "r_mag": t["r_mag"], "b_mag": t["mag_bias"]}
        arch = "gated"
    else:
        raise ConfigError(f"{folder}: dictionary_learning class {cls!r} is not supported; saectl "
                          "reads AutoEncoder, AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, "
                          "GatedAutoEncoder and MatryoshkaBatchTopKSAE")
    subtracts = cls not in ("JumpReluAutoEncoder", "AutoEncoderNew")
    hook = trainer.get("submodule_name")
    return Source("dictionary_learning", arch, tensors, k, subtracts_b_dec=subtracts,
                  rescale_by_decoder_norm=rescale,
                  model=trainer.get("lm_name"), hook=hook,
                  settings={"dict_class": cls, "layer": trainer.get("layer"), "k": k},
                  declared={"d_in": trainer.get("activation_dim"),
                            "d_sae": trainer.get("dict_size")})


def _per_latent(threshold: Tensor, d_sae: int) -> Tensor:
    return threshold.float().expand(d_sae).clone() if threshold.numel() == 1 else threshold


# -- Gemma Scope ----------------------------------------------------------------------------

def read_gemma_scope(path: Path) -> Source:
    try:
        with np.load(path) as z:
            t = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    except Exception as e:  # noqa: BLE001 - zip and format errors alike
        raise ConfigError(f"cannot read {path} as a .npz file ({type(e).__name__})") from None
    _need(t, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), path)
    # Gemma Scope's JumpReLU encodes x @ W_enc + b_enc: its input is not centred on b_dec.
    return Source("gemma_scope", "jumprelu", t, subtracts_b_dec=False, hook=str(path),
                  settings={"file": path.name})


# -- detection and conversion ---------------------------------------------------------------

def detect(path: Path) -> str:
    """Which layout `path` holds, or a one-line error listing what was looked for."""
    if path.is_file() and path.suffix == ".npz":
        return "gemma_scope"
    if path.is_dir():
        if (path / "sae_weights.safetensors").is_file() and (path / "cfg.json").is_file():
            return "saelens"
        if (path / "sae.safetensors").is_file() and (path / "cfg.json").is_file():
            return "sparsify"
        if (path / "ae.pt").is_file() and (path / "config.json").is_file():
            return "dictionary_learning"
        if (path / "params.npz").is_file():
            return "gemma_scope"
        subs = sorted(p.parent.name for p in path.glob("*/sae.safetensors"))
        if subs:
            raise ConfigError(f"{path} holds sparsify SAEs for several hookpoints "
                              f"({', '.join(subs[:6])}); pass one: {path / subs[0]}")
    raise ConfigError(f"{path} is not a published SAE: looked for {'; '.join(LAYOUTS)}")


def read(path: Path, scaling_factor: float | None = None) -> Source:
    fmt = detect(path)
    if fmt == "gemma_scope":
        return read_gemma_scope(path if path.is_file() else path / "params.npz")
    if fmt == "saelens":
        return read_saelens(path, scaling_factor)
    return read_sparsify(path) if fmt == "sparsify" else read_dictionary_learning(path)


def _check_shapes(src: Source) -> tuple[int, int]:
    t = src.tensors
    if t["W_enc"].dim() != 2 or t["W_dec"].dim() != 2:
        raise ConfigError(f"{src.format} weights W_enc {tuple(t['W_enc'].shape)} and W_dec "
                          f"{tuple(t['W_dec'].shape)} must both be matrices")
    d_in, d_sae = t["W_enc"].shape
    want = {"W_dec": (d_sae, d_in), "b_dec": (d_in,), "b_enc": (d_sae,), "threshold": (d_sae,),
            "b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,), "W_skip": (d_in, d_in)}
    for name, shape in want.items():
        if name in t and tuple(t[name].shape) != shape:
            raise ConfigError(f"{src.format} weight {name} has shape {tuple(t[name].shape)} but "
                              f"W_enc {tuple(t['W_enc'].shape)} says {shape}; the weights "
                              "contradict each other or the config")
    return int(d_in), int(d_sae)


def check_config(src: Source) -> None:
    """Refuse weights whose shapes contradict each other or the sizes the config declares."""
    d_in, d_sae = _check_shapes(src)
    for name, have in (("d_in", d_in), ("d_sae", d_sae)):
        if src.declared.get(name) is not None and int(src.declared[name]) != have:
            raise ConfigError(f"the config says {name}={src.declared[name]} but the weights have "
                              f"{have}; the folder mixes two SAEs")
    if src.k is not None and src.arch == "topk" and not 0 < src.k < d_sae:
        raise ConfigError(f"k={src.k} must be between 1 and the width {d_sae} - 1")


@torch.no_grad()
def to_saectl(src: Source) -> tuple[dict[str, Tensor], int, int]:
    """(tensors in saectl's saved names and formula, d_in, d_sae), float32."""
    d_in, d_sae = _check_shapes(src)
    t = {k: v.detach().to(torch.float64) for k, v in src.tensors.items()}
    if not src.subtracts_b_dec and not src.transcoder:  # a transcoder's b_dec is the output's  # (x - b_dec) @ W_enc + b_enc' = x @ W_enc + b_enc
        shift = t["b_dec"] @ t["W_enc"]
        if "b_enc" in t:
            t["b_enc"] = t["b_enc"] + shift
        else:  # gated: both paths share x @ W_enc
            t["b_gate"] = t["b_gate"] + shift
            t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
    if src.rescale_by_decoder_norm:
        n = t["W_dec"].norm(dim=1)
        t["W_enc"], t["b_enc"] = t["W_enc"] * n, t["b_enc"] * n
        t["W_dec"] = t["W_dec"] / n[:, None]
    if src.input_scale:  # as SAELens's fold_activation_norm_scaling_factor
        s = float(src.input_scale)
        t["W_enc"], t["W_dec"], t["b_dec"] = t["W_enc"] * s, t["W_dec"] / s, t["b_dec"] / s
    if "threshold" in t:  # relu(pre) * (pre > θ) is relu(pre) for any θ < 0: θ = 0 is exact
        t["threshold"] = t["threshold"].clamp(min=0)
    if src.arch == "gated" and "b_enc" in t:
        t.pop("b_enc")
    return {k: v.to(torch.float32).contiguous() for k, v in t.items()}, d_in, d_sae
