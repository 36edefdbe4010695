"""What a steer request refers to, found without loading a model (stages/steer.py plans with
these): its prompts, the SAE's model (checked against the harvest), and the units of strength
(each feature's typical maximum activation, from an interpret artifact of the SAE)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saectl import arrays, layout, store
from saectl.errors import ArtifactError, ConfigError, NotFoundError
from saectl.lineage import Lineage, harvest_model


def read_prompts(given: list[str] | None, file: str | None) -> list[str]:
    """`--prompt` values, then the non-blank lines of `--prompts FILE`; at least one, none
    empty."""
    prompts = list(given or [])
    if file:
        path = Path(file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise NotFoundError(f"cannot read --prompts {path}: {getattr(e, 'strerror', 0) or e}; "
                                "give a text file with one prompt per line") from None
        from_file = [ln for ln in lines if ln.strip()]
        if not from_file:
            raise ConfigError(f"--prompts {path} holds no prompt; write one prompt per line")
        prompts += from_file
    if not prompts:
        raise ConfigError("give a prompt to continue: --prompt 'I went to the' (repeatable) or "
                          "--prompts FILE")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ConfigError(f"prompt {i + 1} is empty; give text for the model to continue")
    return prompts


def model_spec(lin: Lineage, model: str | None):
    """The SAE's model (a models.ModelSpec): the harvest's, checked (lineage.harvest_model), or
    --model for an SAE of imported activations."""
    from saectl import models  # deferred: torch and transformers

    if lin.published:  # an imported SAE: --model, else the model it was bound to or names
        named = model or _bound_source(lin.model or {})
        if not named:
            raise ConfigError(f"{lin.sae.ref} does not name its model; pass --model (it must "
                              f"have the hook {lin.hook} with width {lin.d_in})")
        spec = models.resolve_model(named)
        have, bound = models.model_identity(spec), lin.model or {}
        if "sha256" in bound and have.get("sha256") != bound["sha256"]:
            raise ConfigError(f"--model {named} is not the copy the SAE was bound to at import "
                              "(its content differs); pass that folder, or re-import with "
                              f"--model {named}")
        return spec
    if lin.imported:
        if not model:
            raise ConfigError(f"{lin.sae.ref} was trained on imported activations, so saectl "
                              f"does not know their model; pass --model (it must have the hook "
                              f"{lin.hook} with width {lin.d_in})")
        return models.resolve_model(model)
    spec = harvest_model(lin.harvest, model)
    want = lin.harvest.manifest()["params"]["model"]
    have = models.model_identity(spec)
    if "sha256" not in want and "sha256" not in have and have != want:  # two hub ids
        raise ConfigError(f"--model {model} is not the model the SAE was trained on "
                          f"({want.get('model')}); pass --model {want.get('model')} or leave it "
                          "out")
    return spec


def _bound_source(model: dict) -> str | None:
    """The model an imported SAE names: the hub id it was bound to, else its own name."""
    return model.get("model") if "revision" in model else model.get("name")


def interpret_units(root: Path, lin: Lineage, features: list[int]):
    """(typical max activation per feature, the interpret artifact, "") from the newest
    complete interpret artifact of this SAE that covers every feature, or (None, None, why
    not)."""
    found = []
    for art in store.list_artifacts(root, "interpret"):
        if not art.is_complete():
            continue
        try:
            m = art.manifest()
        except ArtifactError:
            continue
        if m.get("inputs", {}).get("sae") == lin.sae.ref:
            found.append((m.get("completed", ""), art.ref, art))
    if not found:
        return None, None, "no interpret artifact of this SAE"
    max_act_key = layout.stat("max_act")
    for *_, art in sorted(found, key=lambda t: t[:2], reverse=True):
        g = art.group()
        if layout.FEATURES not in g or max_act_key not in g:
            continue
        index = {int(f): i for i, f in enumerate(g[layout.FEATURES][:])}
        if not all(f in index for f in features):
            continue
        max_act = arrays.read(g[max_act_key], artifact=art.ref)
        unit = np.array([max_act[index[f]] for f in features], dtype=np.float64)
        if not (np.isfinite(unit).all() and (unit > 0).all()):
            bad = [f for f, u in zip(features, unit) if not (np.isfinite(u) and u > 0)]
            return None, None, f"feature {bad[0]} never fired in {art.ref[:18]}"
        return unit, art, ""
    return None, None, ("no interpret artifact of this SAE covers feature(s) "
                        f"{', '.join(map(str, features))}")
