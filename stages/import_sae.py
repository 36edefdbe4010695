"""import-sae: a published SAE (SAELens, sparsify, dictionary_learning, Gemma Scope; a folder, a
file, hf://ORG/REPO/PATH or saelens:RELEASE/ID) becomes an SAE artifact that interpret, steer,
eval and export take exactly like a trained one.

The weights are read by `saectl.published`, rewritten in saectl's formula (exact folds, no
approximation), and the activation basis they were trained in (TransformerLens's processing)
is folded in by `saectl.basis`. The address is the content of the files read, the hub commit,
and every setting that changes the weights (model binding, hook, basis, scaling factor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from saectl import basis, hook_names, layout, published, sae_hub, store
from saectl.config import address_params, opt
from saectl.console import info
from saectl.errors import ConfigError, SaectlError
from saectl.hashing import file_sha256
from saectl.stage import Plan, RunnerOptions, Stage

NAME = "import-sae"


@dataclass(frozen=True)
class ImportSAEConfig(RunnerOptions):
    source: str | None = opt(None, "A published SAE: a SAELens, sparsify or dictionary_learning "
                                   "folder, a Gemma Scope params.npz, hf://ORG/REPO/PATH[@REV] "
                                   "or saelens:RELEASE/SAE_ID")
    model: str | None = opt(None, "The model the SAE reads (default: the one it names); a local "
                                  "folder binds the SAE to that copy, checked by content")
    hook: str | None = opt(None, "Hook point (saectl, TransformerLens or HF module name; "
                                 "default: the one the SAE names)")
    revision: str | None = opt(None, "Hub revision of an hf:// or saelens: source (a branch, "
                                     "tag or commit; pinned to its commit)")
    activations: str = opt("auto", "Basis the SAE was trained in: auto (what it records), hf, "
                                   "or transformer-lens (its default weight processing)")
    norm_scaling_factor: float | None = opt(None, "Input scale of an SAE trained with "
                                                  "normalize_activations=expected_average_only_in "
                                                  "(SAELens releases carry their own)")

    def __post_init__(self):
        if not self.source:
            raise ConfigError("give the SAE to import: saectl import-sae SOURCE [--model M] "
                              "[--hook H]")
        if self.norm_scaling_factor is not None and not self.norm_scaling_factor > 0:
            raise ConfigError(f"--norm-scaling-factor must be > 0, got {self.norm_scaling_factor}")
        basis.tl_settings(self.activations, None, False)  # the choice, checked once


@dataclass
class Context:
    src: published.Source
    tensors: dict
    d_in: int
    d_sae: int
    hook: str
    target: str | None
    """A transcoder's output hook (saectl's name), or None for an SAE."""
    model: dict
    spec: object
    """The bound model's ModelSpec (--model), or None."""
    fold: str | None = None


def _content(path: Path) -> str:
    """sha256 over the files the SAE is read from (names and contents)."""
    if path.is_file():
        return file_sha256(path)
    import hashlib

    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".pt", ".npz"):
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def _hook(cfg: ImportSAEConfig, src: published.Source, origin: dict, registry: dict) -> str:
    named = cfg.hook or registry.get("hook") or src.hook
    if src.format == "gemma_scope" and not cfg.hook:  # its repos say the site, its folders the layer
        where = f"{origin.get('hub', '')}/{origin.get('path', '')}/{src.hook}"
        m = re.search(r"layer_(\d+)", where)
        site = next((s for key, s in (("-res", "resid_post"), ("-mlp", "mlp_out"))
                     if key in where), None)
        named = f"{site}.{m.group(1)}" if m and site else None
    if src.format == "dictionary_learning" and not cfg.hook and named:
        layer = src.settings.get("layer")
        site = next((s for key, s in (("resid", "resid_post"), ("mlp", "mlp_out"),
                                      ("attn", "attn_out")) if key in named), None)
        named = f"{site}.{layer}" if site and layer is not None else named
    if not named:
        raise ConfigError(f"the {src.format} SAE does not say which hook it reads; pass --hook "
                          "(e.g. resid_post.12 or blocks.12.hook_resid_post)")
    return hook_names.to_saectl(named)


def _model(cfg: ImportSAEConfig, src: published.Source, registry: dict) -> tuple[dict, object]:
    """(the model as the address records it, its ModelSpec or None)."""
    from saectl import models  # deferred: transformers, only when a model is named

    name = cfg.model or registry.get("model") or src.model
    if not name:
        return {"name": None}, None
    spec = models.resolve_model(name) if cfg.model else None
    if spec is not None:
        return {"name": name, **models.model_identity(spec)}, spec
    return {"name": name}, None


def _fold(cfg, src, hook: str, model_spec, model_name, tensors: dict,
          target: str | None = None) -> tuple[dict, str | None]:
    """Fold the TransformerLens basis the SAE was trained in, if any (saectl.basis)."""
    settings = basis.tl_settings(cfg.activations, src.model_kwargs, src.format == "saelens")
    what = basis.transform_needed(settings, hook.split(".")[0])
    if target and (what or basis.transform_needed(settings, target.split(".")[0])):
        raise ConfigError(f"the transcoder was trained on TransformerLens-processed activations "
                          f"({settings}), which saectl folds only into SAEs; import one read "
                          "from the model's own activations, or pass --activations hf if it was")
    if what is None:
        return tensors, None
    from saectl import hooks, models  # deferred: torch and transformers

    spec = model_spec or (models.resolve_model(model_name) if model_name else None)
    try:
        if spec is None:
            raise ConfigError("no model named")
        if what == "center":
            if not basis.uses_layernorm(models.load_config(spec)):
                return tensors, None  # TransformerLens does not centre RMSNorm models
            return basis.fold_center(tensors), what
        model = models.load_model(spec, "cpu")
    except SaectlError as e:  # no model named, not found, hub unreachable
        raise ConfigError(f"the SAE was trained on TransformerLens-processed activations "
                          f"({what}) and saectl needs the model to fold that in ({e}); pass "
                          "--model (a local copy) or --activations hf") from None
    layer = hook.split(".")[1]  # the MLP's norm, whether the SAE reads its output or the MLP
    norm = model.get_submodule(hooks.parse_hooks(model, [f"ln2.{layer}"])[0].module)
    return basis.fold_unnorm(tensors, *basis.norm_affine(norm)), what


def plan(cfg: ImportSAEConfig) -> Plan:
    found = sae_hub.locate(cfg.source, cfg.revision)
    scale = cfg.norm_scaling_factor or found.registry.get("norm_scaling_factor")
    src = published.read(found.path, scale)
    if found.registry.get("model_from_pretrained_kwargs") is not None:  # SAELens's overrides
        src.model_kwargs = found.registry["model_from_pretrained_kwargs"]
    published.check_config(src)
    hook = _hook(cfg, src, found.origin, found.registry)
    target = hook_names.to_saectl(src.target_hook) if src.transcoder else None
    model, spec = _model(cfg, src, found.registry)
    params = address_params(cfg)
    params.update(source={**{k: v for k, v in found.origin.items() if k != "path"
                             or "hub" in found.origin},
                          "format": src.format, "sha256": _content(found.path)},
                  hook=hook, model=model, norm_scaling_factor=scale,
                  **({"target": target} if target else {}))
    params.pop("revision", None)  # the commit it resolved to is in source
    art = store.artifact_for(store.store_root(cfg.store), NAME, params)
    tensors, d_in, d_sae = published.to_saectl(src)
    return Plan(art, params, origin={"source": found.origin, "settings": src.settings},
                context=Context(src, tensors, d_in, d_sae, hook, target, model, spec))


def prepare(cfg: ImportSAEConfig, p: Plan) -> None:
    """Fold the basis (may load the model) and build the SAE before the artifact exists."""
    ctx: Context = p.context
    ctx.tensors, ctx.fold = _fold(cfg, ctx.src, ctx.hook, ctx.spec, ctx.model.get("name"),
                                  ctx.tensors, ctx.target)


def _sae(ctx: Context):
    from saectl.sae import ARCHS, SAEConfig  # deferred: torch

    k = {"k": ctx.src.k} if ARCHS[ctx.src.arch].takes_k else {}
    sae = ARCHS[ctx.src.arch](SAEConfig(arch=ctx.src.arch, d_in=ctx.d_in, d_sae=ctx.d_sae,
                                        transcoder=ctx.src.transcoder, skip=ctx.src.skip, **k))
    try:
        sae.load_saved_tensors(ctx.tensors)
    except SaectlError as e:
        raise ConfigError(f"the {ctx.src.format} weights do not make a {ctx.src.arch} SAE: "
                          f"{e}") from None
    return sae.eval()


def build(cfg: ImportSAEConfig, p: Plan, writer: store.Writing) -> None:
    ctx: Context = p.context
    sae = _sae(ctx)
    target = {"target_hook": ctx.target} if ctx.target else {}
    sae.save(layout.sae_dir(p.art.path), metadata={"hook_name": ctx.hook, **target,
                                                   "model_name": ctx.model.get("name"),
                                                   "imported_from": p.origin["source"]})
    store.mark_complete(p.art, {
        "hook": ctx.hook, **({"target": ctx.target} if ctx.target else {}),
        "transcoder": ctx.target is not None, "skip": ctx.src.skip,
        "d_in": ctx.d_in, "d_sae": ctx.d_sae, "arch": ctx.src.arch,
        "k": ctx.src.k, "format": ctx.src.format, "model": ctx.model.get("name"),
        "basis": ctx.fold or "as harvested", "source": p.origin["source"],
        "carried_over": ctx.src.settings})
    info(f"import-sae: wrote {p.art.ref} ({ctx.src.format} {ctx.src.arch}, {ctx.d_sae} latents "
         f"on {ctx.hook}{', folded ' + ctx.fold if ctx.fold else ''})")


STAGE = Stage(NAME, ImportSAEConfig, "Make an SAE artifact from a published SAE (SAELens, "
              "sparsify, dictionary_learning, Gemma Scope; local or on the hub).", plan, build,
              positional=("source",), figures=("d_sae",), prepare=prepare)
