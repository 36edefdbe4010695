"""The Hugging Face hub, asked once: a model's or dataset's revision resolved to the commit it
names (so an address says which files it was made from, and a repo that moves on is a new
address), a quick one-line failure when the hub cannot be reached, and the libraries' own
progress bars and warnings kept out of saectl's stderr.

Offline (`HF_HUB_OFFLINE=1`, or the hub not answering) a revision is read from the local hub
cache (`<cache>/<kind>s--<org>--<name>/refs/<revision>`), as huggingface_hub itself does; what
is not cached there is the one-line error, after one attempt, never the libraries' retries.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from saectl.errors import HubUnreachableError, NotFoundError, SaectlError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
TIMEOUT_S = 10.0
"""One attempt at the hub's API; a resolver that cannot answer in this long is not reachable."""


def _cache_dir() -> Path:
    from huggingface_hub import constants  # deferred: pulls in httpx and friends

    return Path(constants.HF_HUB_CACHE)


def cached_revision(repo: str, revision: str | None, kind: str) -> str | None:
    """The commit `revision` (default main) points at in the local hub cache, or None."""
    folder = _cache_dir() / f"{kind}s--{repo.replace('/', '--')}"
    if revision and COMMIT.match(revision):
        return revision if (folder / "snapshots" / revision).is_dir() else None
    ref = folder / "refs" / (revision or "main")
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha if COMMIT.match(sha) else None


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """The hub did not answer: every later lookup in this process (transformers', datasets')
    goes to the local cache at once instead of retrying for a minute."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by datasets, and by any subprocess we start


@functools.cache
def resolve_revision(repo: str, revision: str | None, kind: str) -> str:
    """The commit sha `revision` (default: the repo's default branch) names on the hub.

    A 40-hex revision is a commit already and is taken as it is. Otherwise one request to the
    hub's API (no retries); if the hub cannot be reached, the local cache (and the process goes
    offline, so loading does not retry either); else a one-line NotFoundError naming the fix."""
    what = f"{kind} {repo!r}" + (f" at revision {revision!r}" if revision else "")
    if revision and COMMIT.match(revision):
        return revision
    if not offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
        )

        api = HfApi()
        info = api.model_info if kind == "model" else api.dataset_info
        try:
            return info(repo, revision=revision, timeout=TIMEOUT_S).sha
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise NotFoundError(f"the Hugging Face hub has no {what} ({type(e).__name__}); "
                                "check the name and --revision, or pass a local folder") from None
        except HfHubHTTPError as e:
            raise SaectlError(f"the Hugging Face hub refused {what}: {_first_line(e)}") from None
        except Exception:  # noqa: BLE001 - no network, DNS, timeout, proxy: all "unreachable"
            go_offline()
    sha = cached_revision(repo, revision, kind)
    if sha is None:
        raise HubUnreachableError(f"the Hugging Face hub is not reachable (or HF_HUB_OFFLINE is set) "
                            f"and {what} is not in the local hub cache; connect once to "
                            "download it, or pass a local folder")
    return sha


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def quiet_libraries() -> None:
    """transformers' and huggingface_hub's progress bars ("Loading weights", "Converting and
    de-quantizing GGUF tensors", downloads) and warnings off: saectl says what it is loading and
    shows its own progress. Errors still come through, as saectl's one-line errors."""
    import transformers  # deferred: heavy, and only needed where a model is loaded
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    disable_progress_bars()
