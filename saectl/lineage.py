"""Where an SAE came from, and what it means in the model's vocabulary.

`sae_lineage` walks a train artifact's inputs back to its shuffle and harvest (or import); an
imported SAE (import-sae) has neither, only the model and hook it names, and each stage takes
the activations it needs from `--harvest`;
`harvest_model` finds the model a harvest ran, checked by content hash; `logit_lens` reads a
decoder direction through the model's unembedding. Interpret, steer and train's downstream
evaluation share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saectl import store
from saectl.errors import ArtifactError, ConfigError
from saectl.layout import layer_range


SAE_STAGES = ("train", "import-sae")
"""Stages whose artifacts hold an SAE (`sae/`) that interpret, steer, eval and export take."""


@dataclass(frozen=True)
class Lineage:
    sae: store.Artifact
    shuffle: store.Artifact | None
    """None for an imported SAE."""
    harvest: store.Artifact | None
    """The harvest (or import) the shuffle was made from; None for an imported SAE."""
    hook: str
    d_in: int
    d_sae: int
    model: dict | None = None
    """An imported SAE's model: {"name"} as it names it, plus the identity --model bound."""
    target: str | None = None
    """A transcoder's output hook (it reads `hook`, writes `target`); None for an SAE."""

    @property
    def imported(self) -> bool:
        return self.harvest is not None and self.harvest.stage == "import"

    @property
    def published(self) -> bool:
        return self.harvest is None

    def harvest_or(self, given: store.Artifact | None, flag: str = "--harvest") -> store.Artifact:
        """`given`, else the SAE's own harvest; an imported SAE has none to fall back on."""
        if given is not None:
            return given
        if self.harvest is None:
            raise ConfigError(f"{self.sae.ref} was imported, so it has no activations of its own; "
                              f"pass {flag}, a harvest of {self.model_name} at {self.hook}")
        return self.harvest

    @property
    def model_name(self) -> str:
        return (self.model or {}).get("name") or "its model"


def sae_lineage(root: Path, ref: str) -> Lineage:
    """The complete SAE artifact `ref` and the artifacts it was made from."""
    sae = store.open_complete(root, ref)
    if sae.stage not in SAE_STAGES:
        raise ConfigError(f"{sae.ref} is a {sae.stage} artifact; give an SAE (a train ref, e.g. "
                          "the one `saectl sweep` prints, or an import-sae ref)")
    m = sae.manifest()
    s = m["summary"]
    if sae.stage == "import-sae":
        return Lineage(sae, None, None, s["hook"], int(s["d_in"]), int(s["d_sae"]),
                       m["params"]["model"], s.get("target"))
    shuffle = store.open_complete(root, m["inputs"]["shuffle"])
    harvest = store.open_complete(root, shuffle.manifest()["inputs"]["harvest"])
    return Lineage(sae, shuffle, harvest, s["hook"], int(s["d_in"]), int(s["d_sae"]),
                   target=s.get("target"))


def _same_model(sae_model: dict, harvest_manifest: dict) -> bool:
    """An imported SAE bound to a model (--model) must match the harvest's model exactly; one
    that only names its model matches a harvest of a model with that name (org optional,
    case-insensitive)."""
    want = harvest_manifest["params"]["model"]
    if "sha256" in sae_model:  # bound to a local copy: by content
        return want.get("sha256") == sae_model["sha256"]
    if "revision" in sae_model:  # bound to a hub model: by id, and by commit once pinned
        return want.get("model") == sae_model["model"] and \
            sae_model["revision"] in ("main", want.get("revision"))
    from saectl.models import ALIASES  # deferred: torch

    def short(name) -> str:  # gpt2-small is TransformerLens's gpt2; org and case aside
        return str(ALIASES.get(str(name), name)).lower().rstrip("/").split("/")[-1]

    origin = harvest_manifest.get("origin", {}).get("model", {})
    names = {short(n) for n in (origin.get("name"), origin.get("source"), want.get("model")) if n}
    return short(sae_model.get("name") or "") in names


def check_activations(lin: Lineage, harvest: store.Artifact) -> None:
    """Refuse a harvest that is not from the SAE's model and hook (or has another width)."""
    if harvest.stage not in ("harvest", "import"):
        raise ConfigError(f"{harvest.ref} is a {harvest.stage} artifact; give a harvest "
                          "(or import) ref")
    hm = harvest.manifest()
    if lin.published and harvest.stage == "harvest" and lin.model and lin.model.get("name"):
        if not _same_model(lin.model, hm):
            raise ConfigError(f"{harvest.ref} was harvested from {_model_name(hm)}, but the SAE "
                              f"reads {lin.model_name}; pass a harvest of that model, or bind "
                              "the SAE to the harvest's model with `saectl import-sae --model`")
    elif lin.published and harvest.stage == "import":
        pass  # imported activations name no model: the width check below is all there is
    elif harvest.stage == "harvest" and lin.harvest is not None and lin.harvest.stage == "harvest":
        want = lin.harvest.manifest()["params"]["model"]
        if hm["params"]["model"] != want:
            raise ConfigError(f"{harvest.ref} was harvested from another model than the SAE's "
                              f"({_model_name(hm)} vs {_model_name(lin.harvest.manifest())}); "
                              "pass a harvest of the same model, or leave out --harvest")
    hooks = hm["summary"].get("hooks", {})
    # a cross-layer transcoder's hook is a layer range: every layer of it must be there
    ins, outs = layer_range(lin.hook) or [lin.hook], layer_range(lin.target or "") or [lin.target]
    if lin.target is not None and any(h not in hooks for h in outs):
        raise ConfigError(f"{harvest.ref} has no activations at {lin.target}, the transcoder's "
                          f"target (it has {', '.join(sorted(hooks)) or 'none'}); harvest "
                          f"{lin.hook} and {lin.target} together")
    if any(h not in hooks for h in ins):
        raise ConfigError(f"{harvest.ref} has no activations at {lin.hook} (it has "
                          f"{', '.join(sorted(hooks)) or 'none'}); the SAE was trained on "
                          f"{lin.hook}: harvest that hook, or leave out --harvest")
    width = sum(int(hooks[h]["d"]) for h in ins)
    if width != lin.d_in:
        raise ConfigError(f"{harvest.ref} has width {width} at {lin.hook} but the "
                          f"SAE takes {lin.d_in}; pass a harvest of the SAE's model")


def _model_name(manifest: dict) -> str:
    return manifest.get("origin", {}).get("model", {}).get("name") or "unknown"


def harvest_model(harvest: store.Artifact, model: str | None = None):
    """The ModelSpec of the model `harvest` ran, found again from its origin (or `model`, where
    it moved) and checked against the content hash recorded in its address."""
    from saectl import models  # torch: deferred, so planning and cache hits never load it

    if harvest.stage != "harvest":
        raise ArtifactError(f"{harvest.ref} holds imported activations; there is no model "
                            "behind them")
    h = harvest.manifest()
    want = h["params"]["model"]
    origin = h.get("origin", {}).get("model", {})
    name = model or (origin.get("source") if origin.get("local") else origin.get("name"))
    if not name:
        raise ConfigError(f"{harvest.ref} does not say where its model came from; pass --model")
    spec = models.resolve_model(name)
    if not spec.local and len(want.get("revision") or "") == 40:  # the commit it was pinned to
        spec = models.pin_revision(spec, want["revision"])
    if origin.get("gguf_file") and spec.gguf_file is None and spec.local:
        spec = models.ModelSpec(spec.name, spec.source, origin["gguf_file"], True)
    if want.get("sha256") and models.model_identity(spec).get("sha256") != want["sha256"]:
        raise ConfigError(f"the model at {spec.source} is not the one {harvest.ref} was "
                          "harvested with (its content differs); pass the right --model")
    return spec


def logit_lens(W_dec, model, k: int = 10):
    """Top-`k` promoted and suppressed token ids per decoder row: W_dec (n, d) · diag(final
    norm scale) · W_U, the direct effect of each feature on the logits (the norm's division
    by the residual's size is the same for every token, so it does not change the ranking).
    Returns (pos_ids, pos_vals, neg_ids, neg_vals), each (n, k)."""
    import torch  # deferred, as in harvest_model

    from saectl.models import unembed  # torch: deferred, as above

    W_U, scale = unembed(model)
    W_U = W_U.float()
    d = W_dec.to(W_U.device, torch.float32)
    if scale is not None:
        d = d * scale.float()
    k = min(k, W_U.shape[1])
    outs = []
    for rows in torch.split(d, 1024):  # bounds the (rows, vocab) block for 50k+ vocabularies
        logits = rows @ W_U
        outs.append((logits.topk(k, dim=1), (-logits).topk(k, dim=1)))
    pos_v = torch.cat([p.values for p, _ in outs]) if outs else torch.zeros(0, k)
    pos_i = torch.cat([p.indices for p, _ in outs]) if outs else torch.zeros(0, k, dtype=torch.long)
    neg_v = torch.cat([-n.values for _, n in outs]) if outs else torch.zeros(0, k)
    neg_i = torch.cat([n.indices for _, n in outs]) if outs else torch.zeros(0, k, dtype=torch.long)
    return pos_i, pos_v, neg_i, neg_v
