"""Hook points and hooked forward passes: where `--hooks` names read or replace an activation
inside a Hugging Face causal LM, and the capture, splice and generate passes over them.

Hook names follow TransformerLens (`hook_resid_pre`, `hook_resid_post`, `hook_mlp_out`,
`hook_attn_out`): `resid_post.L` is the output of block L, so for the last block it is the
residual stream *before* the final norm (HF's `hidden_states[-1]` is after it), and
`resid_pre.L` is the input of block L. `mlp_in.L` (`hook_mlp_in`) is the input of the MLP,
what a transcoder reads and `mlp_out.L` what it writes. `resid_mid.L` (TransformerLens `hook_resid_mid`) is
the residual stream between attention and MLP, read as the input of the MLP's norm, and `ln2.L`
(`ln2.hook_normalized` without folding) is that norm's output, what the MLP reads. Both exist
only in sequential blocks (not GPT-NeoX's parallel residual), and `resid_mid` can be read but
not replaced: the block adds the value it holds, not the norm's input, back to the stream. As
TransformerLens's `stop_at_layer`, a capture pass stops once the deepest hook point has been
read.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Collection, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from difflib import get_close_matches

import torch
from torch import nn

from .errors import ConfigError
from .layout import normalize_hook
from .models import Family, find_blocks

SITES = ("resid_pre", "resid_post", "mlp_in", "mlp_out", "attn_out", "resid_mid", "ln2")
_SITE = re.compile(r"^(resid_pre|resid_post|mlp_in|mlp_out|attn_out|resid_mid|ln2)(?:\.(.*))?$")
# The norm in front of the MLP, by attribute name: Gemma-2/3 first (their
# post_attention_layernorm norms the attention output, not the MLP input).
_MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")
READ_ONLY_SITES = ("resid_mid",)


@dataclass(frozen=True)
class HookPoint:
    """One place in the model where an activation is read or replaced."""

    name: str
    """Canonical name: `resid_post.3`, or a raw module path."""
    module: str
    """Dotted module path inside the HF model, e.g. `gpt_neox.layers.3.mlp`."""
    capture: str
    """`output` of the module, or `input` (its hidden_states argument; only for resid_pre)."""
    layer: int | None
    """Index of the block the activation belongs to; None outside the blocks (then a capture
    pass runs the whole model)."""


def _site_module(lay: Family, block: nn.Module, site: str, layer: int) -> tuple[str, str]:
    path = f"{lay.blocks}.{layer}"
    if site in ("resid_mid", "ln2"):
        norm = next((n for n in _MLP_NORMS if isinstance(getattr(block, n, None), nn.Module)), None)
        if norm is None or getattr(block, "use_parallel_residual", False):
            raise ConfigError(f"{site}.{layer}: this model's blocks have no norm between "
                              "attention and MLP on the residual stream (parallel attention, or "
                              "norms after the sublayers only); use resid_pre or resid_post")
        return f"{path}.{norm}", "input" if site == "resid_mid" else "output"
    if site in ("resid_pre", "resid_post"):
        return path, "input" if site == "resid_pre" else "output"
    if site == "mlp_in":  # what the MLP reads, in every family (NeoX's parallel one too)
        return f"{path}.{lay.mlp}", "input"
    # Gemma-2/3 and OLMo-2 norm the attention and MLP outputs before adding them to the
    # residual stream; what the block writes to the stream is the output of those norms.
    if hasattr(block, "post_feedforward_layernorm") and hasattr(block, "post_attention_layernorm"):
        return path + (".post_attention_layernorm" if site == "attn_out"
                       else ".post_feedforward_layernorm"), "output"
    return f"{path}.{lay.attn if site == 'attn_out' else lay.mlp}", "output"


def parse_hooks(model: nn.Module, names: list[str] | str) -> list[HookPoint]:
    """Resolve hook names (a list or a comma-separated string) against `model`."""
    if isinstance(names, str):
        names = names.split(",")
    names = [normalize_hook(n) for n in names if n.strip()]  # resid_post.03 is resid_post.3
    found = find_blocks(model)
    modules = dict(model.named_modules())
    example = f"{found[0].blocks}.0.{found[0].mlp}" if found else next(n for n in modules if n)
    if not names:
        raise ConfigError(f"no hook points given; pass e.g. resid_post.0 (sites: "
                          f"{', '.join(SITES)}, or a module path such as {example})")
    hooks: list[HookPoint] = []
    for name in names:
        m = _SITE.match(name)
        if m and found:
            lay, blocks = found
            n = len(blocks)
            if m.group(2) is None or not m.group(2).isdigit():
                raise ConfigError(f"hook {name!r} needs a layer number, e.g. {m.group(1)}.0 "
                                  f"(model has {n} layers (0-{n - 1}))")
            layer = int(m.group(2))
            if layer >= n:
                raise ConfigError(f"hook {name!r}: layer {layer} out of range; model has {n} "
                                  f"layers (0-{n - 1})")
            module, capture = _site_module(lay, blocks[layer], m.group(1), layer)
            hook = HookPoint(f"{m.group(1)}.{layer}", module, capture, layer)
        elif m:
            raise ConfigError(f"hook {name!r}: {type(model).__name__} is not of a known family "
                              f"(GPT-NeoX, Llama, GPT-2); pass a module path such as {example}")
        elif name in modules:
            hook = HookPoint(name, name, "output", _block_of(found, name))
        else:
            near = get_close_matches(name, list(modules), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ConfigError(f"hook site {name!r} not known; sites: {', '.join(SITES)}, or a "
                              f"module path such as {example}{hint}")
        for other in hooks:
            if (other.module, other.capture) == (hook.module, hook.capture):
                what = ("given twice" if other.name == hook.name
                        else f"and {other.name!r} capture the same activation")
                raise ConfigError(f"hook {hook.name!r} {what}; give each hook point once")
        hooks.append(hook)
    return hooks


def _block_of(found: tuple[Family, nn.ModuleList] | None, path: str) -> int | None:
    if found is None:
        return None
    m = re.match(re.escape(found[0].blocks) + r"\.(\d+)(\.|$)", path)
    return int(m.group(1)) if m else None


def hook_dim(model: nn.Module, hook: HookPoint) -> int:
    """Width of the activation at `hook`: the hidden size for the standard sites; for a raw
    module path, read from a one-token forward pass (shapes are not knowable in general)."""
    if _SITE.match(hook.name):
        return int(model.config.get_text_config().hidden_size)
    ids = torch.zeros((1, 1), dtype=torch.long)
    return int(run_with_hooks(model, [hook], ids)[hook.name].shape[-1])


class _StopForward(Exception):
    """Raised by the hook on the last module a capture pass needs; caught in run_with_hooks."""


def _as_tensor(out, where: str) -> torch.Tensor:
    # HF attention modules return (attn_output, attn_weights); blocks return a tensor in
    # transformers 5 (a tuple in 4.x).
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"module {where} does not output a tensor ({type(out).__name__}); "
                          "hook a submodule instead")
    return out


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    # Blocks get hidden_states positionally (GPT-2, Llama) or as a keyword (attention modules).
    return args[0] if args else kwargs["hidden_states"]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_with_hooks(model: nn.Module, hooks: list[HookPoint],
                   input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass that returns {hook name: activation (batch, seq, d)}, stopping after the
    deepest hook point. Runs under torch.inference_mode, so the results are inference tensors:
    `.clone()` them outside inference mode before using them in autograd."""
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def grab_output(name):
        def hook(module, args, out):
            captured[name] = _as_tensor(out, name)
        return hook

    def grab_input(name):
        def hook(module, args, kwargs):
            captured[name] = _hidden_in(args, kwargs)
        return hook

    def stop(*_):
        raise _StopForward

    try:
        for h in hooks:
            module = model.get_submodule(h.module)
            handles.append(
                module.register_forward_pre_hook(grab_input(h.name), with_kwargs=True)
                if h.capture == "input" else module.register_forward_hook(grab_output(h.name)))
        found = find_blocks(model)
        if found and hooks and all(h.layer is not None for h in hooks):
            # resid_pre.L is complete before block L runs; anything else in block L after it.
            # A block's own input (resid_pre) only before it runs; anything else in the block
            # (its output, or a module's input inside it: mlp_in, resid_mid) after it.
            def before(h):
                return h.capture == "input" and h.module == f"{found[0].blocks}.{h.layer}"

            last = max(hooks, key=lambda h: (h.layer, not before(h)))
            block = found[1][last.layer]
            # Registered after the capture hooks, so those on the same module fire first.
            handles.append(block.register_forward_pre_hook(stop) if before(last)
                           else block.register_forward_hook(stop))
        with torch.inference_mode():
            try:
                model(input_ids.to(_device(model)), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    for h in hooks:
        if h.name not in captured:  # e.g. a ModuleList, which holds modules but is never called
            raise ConfigError(f"hook {h.name!r}: module {h.module} does not run in the forward "
                              "pass; hook one of its submodules")
    return {h.name: captured[h.name] for h in hooks}


@contextmanager
def replacing(model: nn.Module, hook: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor]):
    """While the block runs, every forward pass of `model` has the activation at `hook`
    replaced by fn(activation), which must keep its shape."""

    if hook.name.split(".")[0] in READ_ONLY_SITES:
        raise ConfigError(f"{hook.name} can be read but not replaced: the block adds its own "
                          "copy back to the residual stream; splice at resid_pre or resid_post")

    def replace(act: torch.Tensor) -> torch.Tensor:
        new = fn(act)
        if new.shape != act.shape:
            raise ValueError(f"replacement at {hook.name} changed shape {tuple(act.shape)} "
                             f"to {tuple(new.shape)}; fn must keep the shape")
        return new

    def on_output(module, args, out):
        if isinstance(out, tuple):  # keep attention weights / cache entries as they were
            return (replace(_as_tensor(out, hook.name)), *out[1:])
        return replace(_as_tensor(out, hook.name))

    def on_input(module, args, kwargs):
        if args:
            return (replace(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

    module = model.get_submodule(hook.module)
    handle = (module.register_forward_pre_hook(on_input, with_kwargs=True)
              if hook.capture == "input" else module.register_forward_hook(on_output))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def reading(model: nn.Module, hook: HookPoint, into: dict):
    """While the block runs, `into[hook.name]` holds the activation at `hook` of the latest
    forward pass (a transcoder's input, read in the pass that replaces its output)."""
    module = model.get_submodule(hook.module)
    if hook.capture == "input":
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: into.__setitem__(hook.name, _hidden_in(args, kwargs)),
            with_kwargs=True)
    else:
        handle = module.register_forward_hook(
            lambda m, args, out: into.__setitem__(hook.name, _as_tensor(out, hook.name)))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def editing(model: nn.Module, replacements: Sequence[tuple[HookPoint, Callable]] = (),
            reads: Sequence[HookPoint] = (), into: dict | None = None):
    """`replacing` at every (hook, fn) and `reading` every hook in `reads` into `into`, at once
    (a cross-layer transcoder writes to several MLP outputs and reads several MLP inputs)."""
    with ExitStack() as stack:
        for hook, fn in replacements:
            stack.enter_context(replacing(model, hook, fn))
        for hook in reads:
            stack.enter_context(reading(model, hook, into))
        yield


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (batch, seq, vocab) of one full forward pass, without the KV cache."""
    return model(input_ids.to(_device(model)), use_cache=False).logits


def run_with_replacement(model: nn.Module, hook: HookPoint,
                         fn: Callable[[torch.Tensor], torch.Tensor],
                         input_ids: torch.Tensor) -> torch.Tensor:
    """Full forward pass returning logits (batch, seq, vocab), with the activation at `hook`
    replaced by fn(activation). Honours the caller's grad mode, so fn may hold trainable
    parameters (steering vectors) or run an SAE under no_grad (spliced CE loss)."""
    with replacing(model, hook, fn):
        return forward_logits(model, input_ids)


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
             edits: Sequence[tuple[HookPoint, Callable[[torch.Tensor, torch.Tensor],
                                                         torch.Tensor]]] = (),
             temperature: float = 0.0, generator: torch.Generator | None = None,
             stop_ids: Collection[int] = ()) -> torch.Tensor:
    """Continue one sequence `input_ids` (1, P) by up to `max_new_tokens` tokens with the KV
    cache; returns the new ids (n,), a stop id included when one ended it.

    Greedy when `temperature` is 0, else sampled from softmax(logits / temperature) with
    `generator` (a CPU generator: the same seed gives the same draws whatever the model does,
    so two runs differ only where their distributions do). For each (hook, edit) in `edits`,
    the activation at hook is edit(act, positions) in every forward pass, `positions` holding the
    absolute positions (t,) of act's sequence dimension (the prompt first, then one new
    token per step). Inf/NaN logits raise FloatingPointError naming the step."""
    ids = input_ids.to(_device(model))
    past, start, new = None, 0, []
    # transformers 5.x renamed the KV cache argument and output `past_key_values` → `cache`
    # (the old name warns, and goes in 5.40); older versions know only the old name.
    new_name = "cache" in inspect.signature(model.forward).parameters
    def at_positions(edit):
        return lambda a: edit(a, torch.arange(start, start + a.shape[1], device=a.device))

    with editing(model, [(hook, at_positions(edit)) for hook, edit in edits]):
        for step in range(max_new_tokens):
            if new_name:
                out = model(ids, cache=past, use_cache=True)
                past = out.cache
            else:
                out = model(ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
            start += ids.shape[1]
            logits = out.logits[0, -1].float()
            if not torch.isfinite(logits).all():
                raise FloatingPointError(f"the logits became inf/NaN at generation step {step}")
            if temperature > 0:
                probs = (logits / temperature).softmax(-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(logits.argmax())
            new.append(token)
            if token in stop_ids:
                break
            ids = torch.tensor([[token]], device=ids.device)
    return torch.tensor(new, dtype=torch.long)
