"""The activation basis an imported SAE was trained in, folded into its weights.

SAEs trained on TransformerLens activations (SAELens's) saw the model after TransformerLens's
weight processing, which saectl's Hugging Face hooks do not apply:

- `center_writing_weights` (LayerNorm models only; TransformerLens skips it for RMSNorm) makes
  every write to the residual stream mean-free across d_model, so at resid_pre/mid/post,
  mlp_out and attn_out the SAE saw x - mean(x): the projection P = I - 11ᵀ/d;
- `ln2.hook_normalized` is the norm's output before its weight and bias, (h - b) / w, where
  HF's norm module gives h.

Both are affine maps x_sae = x @ M + c, so they fold into the encoder exactly: W_enc' = M W_enc
and b_enc' = b_enc + (c - b_dec) @ W_enc + b_dec' @ W_enc'. Where M is invertible (the norm's
diagonal) the decoder is mapped back too and reconstructions come out in the model's own
basis. P is not invertible: reconstructions stay mean-free, which changes nothing the model
computes (every LayerNorm removes the mean first) but counts the mean as error in FVU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saectl.errors import ConfigError

CHOICES = ("auto", "hf", "transformer-lens")
_CENTRED_SITES = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")


def tl_settings(choice: str, recorded: dict | None, saelens: bool) -> dict | None:
    """The TransformerLens processing the SAE's activations had, or None for HF's own basis.

    SAELens always reads activations through TransformerLens, loaded with
    `from_pretrained_no_processing(**model_from_pretrained_kwargs)`, whose default in SAELens is
    {"center_writing_weights": False}; so `auto` centres only where an SAE records True (the
    gpt2-small-res-jb releases do). `transformer-lens` is TransformerLens's own default
    `from_pretrained` (centred)."""
    if choice not in CHOICES:
        raise ConfigError(f"--activations {choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "hf" or (choice == "auto" and not saelens):
        return None
    if choice == "transformer-lens":
        return {"center_writing_weights": True, "fold_ln": True}
    recorded = recorded or {}
    return {"center_writing_weights": bool(recorded.get("center_writing_weights", False)),
            "fold_ln": bool(recorded.get("fold_ln", False))}


def transform_needed(settings: dict | None, site: str) -> str | None:
    """'center', 'unfold_norm' or None: what saectl must fold for `site`. TransformerLens's
    `ln2.hook_normalized` is the norm's output before its weight and bias, folded or not;
    the MLP's input (`mlp.hook_in`) is too once `fold_ln` has moved them into the MLP."""
    if not settings:
        return None
    if site in _CENTRED_SITES and settings["center_writing_weights"]:
        return "center"
    if site == "ln2" or (site == "mlp_in" and settings.get("fold_ln")):
        return "unfold_norm"
    return None


def uses_layernorm(config) -> bool:
    """TransformerLens centres writing weights only for LayerNorm models."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not hasattr(text, "rms_norm_eps")


def norm_affine(norm: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """(w, b) of the norm module's output w * normalised + b (Gemma's RMSNorm keeps w - 1)."""
    w = norm.weight.detach().double()
    if type(norm).__name__.startswith("Gemma"):
        w = w + 1
    b = getattr(norm, "bias", None)
    b = b.detach().double() if b is not None else torch.zeros_like(w)
    if bool((w == 0).any()):
        raise ConfigError("the norm has zero weights, so its folding cannot be undone; import "
                          "with --activations hf")
    return w, b


def _shift(t: dict[str, Tensor], shift: Tensor) -> None:
    if "b_enc" in t:
        t["b_enc"] = t["b_enc"] + shift
    else:  # gated: both paths read x @ W_enc
        t["b_gate"] = t["b_gate"] + shift
        t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()


@torch.no_grad()
def fold_center(t: dict[str, Tensor]) -> dict[str, Tensor]:
    """The SAE saw x - mean(x): encode HF activations the same way."""
    t = {k: v.double() for k, v in t.items()}
    W_enc2 = t["W_enc"] - t["W_enc"].mean(0, keepdim=True)  # P @ W_enc
    _shift(t, -t["b_dec"] @ t["W_enc"] + t["b_dec"] @ W_enc2)
    t["W_enc"] = W_enc2
    return {k: v.float() for k, v in t.items()}


@torch.no_grad()
def fold_unnorm(t: dict[str, Tensor], w: Tensor, b: Tensor) -> dict[str, Tensor]:
    """The SAE saw (h - b) / w where HF gives h: encoder and decoder both mapped."""
    t = {k: v.double() for k, v in t.items()}
    a, c = 1 / w, -b / w
    W_enc2, W_dec2, b_dec2 = a[:, None] * t["W_enc"], t["W_dec"] / a, (t["b_dec"] - c) / a
    _shift(t, (c - t["b_dec"]) @ t["W_enc"] + b_dec2 @ W_enc2)
    t.update(W_enc=W_enc2, W_dec=W_dec2, b_dec=b_dec2)
    return {k: v.float() for k, v in t.items()}
