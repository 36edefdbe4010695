"""Where a published SAE lives: a local path, a hub location `hf://org/repo/path[@revision]`,
or a SAELens release `saelens:RELEASE/SAE_ID` resolved through SAELens's own registry (the
optional extra `pip install 'saectl[saelens]'`). Hub files are downloaded with huggingface_hub
at the commit the revision names (saectl.hub), and that commit goes into the address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from saectl import hub
from saectl.errors import ConfigError, NotFoundError

_HF = re.compile(r"^hf://([^/@]+/[^/@]+)(?:/([^@]*))?(?:@(.+))?$")


@dataclass
class Located:
    path: Path
    """The local file or folder holding the SAE."""
    origin: dict
    """Where it came from, for the manifest (and the address: repo, path, commit)."""
    registry: dict = field(default_factory=dict)
    """What SAELens's registry adds: model, norm scaling factor, config overrides."""


def _download(repo: str, sub: str, revision: str | None) -> Located:
    from huggingface_hub import snapshot_download  # deferred: pulls in httpx and friends

    sha = hub.resolve_revision(repo, revision, "model")
    sub = sub.strip("/")
    patterns = [sub, f"{sub}/*"] if sub else None
    try:
        snap = Path(snapshot_download(repo, revision=sha, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network, missing files: one line
        raise NotFoundError(f"cannot download {repo}/{sub} at {sha[:12]} "
                            f"({type(e).__name__}); check the path, or pass a local folder") from None
    path = snap / sub if sub else snap
    if not path.exists():
        raise NotFoundError(f"{repo} at {sha[:12]} has no {sub!r}; check the path inside the repo")
    return Located(path, {"hub": repo, "path": sub, "revision": sha})


def _saelens(name: str, revision: str | None) -> Located:
    release, _, sae_id = name.partition("/")
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise ConfigError("saelens: names are resolved by SAELens's registry; install it "
                          "(pip install 'saectl[saelens]') or give hf://REPO/PATH") from None
    info = get_pretrained_saes_directory().get(release)
    if info is None:
        raise NotFoundError(f"SAELens has no release {release!r}; see its pretrained_saes.yaml")
    if sae_id not in info.saes_map:
        some = ", ".join(list(info.saes_map)[:4])
        raise NotFoundError(f"SAELens release {release!r} has no SAE {sae_id!r} (it has e.g. "
                            f"{some})")
    found = _download(info.repo_id, info.saes_map[sae_id], revision)
    found.origin.update(saelens_release=release, saelens_id=sae_id)
    overrides = info.config_overrides or {}  # what the release's files leave out
    found.registry = {"model": info.model,
                      "norm_scaling_factor": (info.norm_scaling_factor or {}).get(sae_id),
                      "hook": overrides.get("hook_name"),
                      "model_from_pretrained_kwargs": overrides.get("model_from_pretrained_kwargs")}
    return found


def locate(source: str, revision: str | None = None) -> Located:
    if source.startswith("hf://"):
        m = _HF.match(source)
        if not m:
            raise ConfigError(f"{source!r} is not a hub location; write hf://ORG/REPO/PATH"
                              "[@REVISION]")
        return _download(m.group(1), m.group(2) or "", m.group(3) or revision)
    if source.startswith("saelens:"):
        return _saelens(source.removeprefix("saelens:"), revision)
    path = Path(source).expanduser().absolute()
    if not path.exists():
        raise NotFoundError(f"{path} does not exist; give a folder or file of a published SAE, "
                            "hf://ORG/REPO/PATH or saelens:RELEASE/SAE_ID")
    return Located(path, {"path": str(path)})
