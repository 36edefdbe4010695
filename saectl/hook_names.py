"""Other tools' names for a hook point, mapped to saectl's (`saectl.hooks`): TransformerLens
names (what SAELens records) and Hugging Face module paths (what sparsify records). Pure
strings: no model needed.

    blocks.12.hook_resid_post     resid_post.12        layers.12 / model.layers.12   resid_post.12
    blocks.12.hook_resid_pre      resid_pre.12         layers.12.mlp                 mlp_out.12
    blocks.12.hook_resid_mid      resid_mid.12         layers.12.self_attn           attn_out.12
    blocks.12.hook_mlp_out        mlp_out.12           transformer.h.12.attn         attn_out.12
    blocks.12.hook_attn_out       attn_out.12          gpt_neox.layers.12.attention  attn_out.12
    blocks.12.ln2.hook_normalized ln2.12               blocks.12.mlp.hook_in         mlp_in.12
"""

from __future__ import annotations

import re

from saectl.errors import ConfigError
from saectl.layout import normalize_hook

_TL = {"hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post",
       "hook_resid_mid": "resid_mid", "hook_mlp_out": "mlp_out", "hook_attn_out": "attn_out",
       "hook_mlp_in": "resid_mid",  # TransformerLens's is the norm's input (use_hook_mlp_in)
       "mlp.hook_in": "mlp_in",  # what the MLP reads (circuit-tracer, TransformerLens's bridge)
       "ln2.hook_normalized": "ln2"}
_TL_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
# A block's output is the residual stream after it; its attention and MLP modules' outputs are
# what they write to the stream (saectl.hooks reads the same modules).
_HF_BLOCK = re.compile(r"^(?:(?:model|gpt_neox|transformer|base_model\.model\.model)\.)?"
                       r"(?:layers|h)\.(\d+)(?:\.(.+))?$")
_HF_SUB = {"mlp": "mlp_out", "self_attn": "attn_out", "attention": "attn_out",
           "attn": "attn_out", "post_attention_layernorm": "ln2", "ln_2": "ln2",
           "pre_feedforward_layernorm": "ln2"}
_SITE = re.compile(r"^(resid_pre|resid_post|resid_mid|mlp_in|mlp_out|attn_out|ln2)\.\d+$")


def to_saectl(name: str) -> str:
    """saectl's hook name for `name` given in saectl's, TransformerLens's or HF module-path
    form; a one-line error naming what can be mapped otherwise."""
    name = name.strip()
    if _SITE.match(normalize_hook(name)):
        return normalize_hook(name)
    if m := _TL_NAME.match(name):
        site = _TL.get(m.group(2))
        if site:
            return f"{site}.{int(m.group(1))}"
    if m := _HF_BLOCK.match(name):
        if m.group(2) is None:
            return f"resid_post.{int(m.group(1))}"
        site = _HF_SUB.get(m.group(2))
        if site:
            return f"{site}.{int(m.group(1))}"
    raise ConfigError(f"hook {name!r} cannot be mapped to a saectl hook point; saectl reads "
                      "blocks.L.hook_resid_pre/resid_mid/resid_post/mlp_out/attn_out and "
                      "blocks.L.ln2.hook_normalized (TransformerLens), layers.L[.mlp|.self_attn] "
                      "(HF module paths), or its own resid_post.L etc.: pass --hook")

