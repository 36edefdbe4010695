"""Hub models and datasets pinned to a commit (issue 15 item 6), and failing fast without the
hub (item 10). There is no hub here: a hub cache laid out as huggingface_hub lays it out
(`models--org--name/refs/main`, `snapshots/<sha>/`) stands in for it offline, and the online
branch answers from a patched `HfApi`."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from saectl import data, hub, models
from saectl.errors import ConfigError, NotFoundError
from tests.helpers import assert_one_line_error, run_subprocess, tried

SHA1, SHA2 = "1" * 40, "2" * 40
REPO = "saectl-test/tiny"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, the process offline (restored after), resolution forgotten."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # restored after, whatever go_offline sets
    hub.resolve_revision.cache_clear()
    yield cache
    hub.resolve_revision.cache_clear()


def publish(cache: Path, model_dir: Path, sha: str, ref: str = "main", bump: float = 0.0) -> Path:
    """Put `model_dir` into the cache as commit `sha` of REPO and point `ref` at it."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = shutil.copytree(model_dir, repo / "snapshots" / sha)
    if bump:  # a new commit with other weights
        w = load_file(snap / "model.safetensors")
        key = next(iter(w))
        w[key] = w[key] + bump
        save_file(w, snap / "model.safetensors", metadata={"format": "pt"})
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    return snap


def test_hub_model_is_addressed_by_its_commit(hub_cache, tiny_model_dirs):
    spec = models.resolve_model(REPO)
    assert models.model_identity(spec) == {"model": REPO, "revision": "main"}  # not yet pinned
    with pytest.raises(NotFoundError) as e:  # not in the cache, and offline: one line, at once
        models.pin_revision(spec)
    assert_one_line_error_text(str(e.value), "cannot load model", "local hub cache")
    publish(hub_cache, tiny_model_dirs["gpt2"], SHA1)
    pinned = models.pin_revision(spec)
    assert models.model_identity(pinned) == {"model": REPO, "revision": SHA1}
    model = models.load_model(pinned)  # from the pinned snapshot, offline
    assert model.config.model_type == "gpt2"
    # The repo moves on: main names another commit, and the address follows it.
    publish(hub_cache, tiny_model_dirs["gpt2"], SHA2, bump=1.0)
    (hub_cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text(SHA2)
    hub.resolve_revision.cache_clear()  # a new process
    assert models.model_identity(models.pin_revision(spec))["revision"] == SHA2
    # --revision pins the old one (a commit needs no lookup at all).
    assert models.pin_revision(spec, SHA1).revision == SHA1
    with pytest.raises(ConfigError) as e:
        models.pin_revision(models.resolve_model(str(tiny_model_dirs["gpt2"])), "v1")
    assert_one_line_error_text(str(e.value), "--revision", "local")
    tried("harvest", "hub model moved on")


def test_online_resolution_and_unreachable_hub(hub_cache, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    class Info:
        sha = SHA2

    def answer(self, repo, revision=None, timeout=None):
        asked.append((repo, revision, timeout))
        return Info()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", answer)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", answer)
    assert hub.resolve_revision(REPO, "v2", "model") == SHA2
    assert hub.resolve_revision(REPO, "v2", "model") == SHA2  # asked once per process
    ds = data.pin_dataset(data.resolve_dataset("org/ds:cfg"), "v3")
    assert data.dataset_identity(ds) == {"hf": "org/ds:cfg", "split": "train",
                                         "text_column": "text", "revision": SHA2}
    assert asked == [(REPO, "v2", hub.TIMEOUT_S), ("org/ds", "v3", hub.TIMEOUT_S)]

    def unreachable(self, repo, revision=None, timeout=None):
        asked.append(repo)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(NotFoundError) as e:
        hub.resolve_revision("org/elsewhere", None, "model")
    assert_one_line_error_text(str(e.value), "not reachable", "local folder")
    assert asked[-1] == "org/elsewhere" and hub.offline()  # one attempt, then offline
    with pytest.raises(ConfigError):
        data.pin_dataset(data.resolve_dataset(str(Path(__file__))), "v1")


def test_no_hub_fails_fast_in_one_line(tmp_path):
    """`saectl harvest --model pythia-70m` without a reachable hub: one attempt, one line (it
    retried for ~60 s before). A refused port stands in for no network, everywhere."""
    t0 = time.monotonic()
    res = run_subprocess("harvest", "--model", "pythia-70m", "--hooks", "resid_post.1",
                         "--tokens", "64", "--store", tmp_path / "s",
                         env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
                              "HF_HUB_CACHE": str(tmp_path / "cache")})
    took = time.monotonic() - t0
    assert_one_line_error(res, "cannot load model 'pythia-70m'", "not reachable")
    assert "Retrying" not in res.err and took < 30, (took, res.err)
    assert not (tmp_path / "s" / "harvest").exists()
    tried("harvest", "no network")


def assert_one_line_error_text(msg: str, *needles: str) -> None:
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
