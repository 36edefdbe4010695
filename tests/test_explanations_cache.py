"""Explanations cached apart from the scan (saectl/explanations_cache.py): another explainer
takes the scan of an interpret artifact that differs only in its explanations; the same
question to the same explainer is never asked twice, whatever artifact asks it; two
processes writing one cache file lose nothing."""

from __future__ import annotations

import json

from saectl import store
from saectl.explain import EXPLAIN_SYSTEM
from saectl.explanations_cache import FOLDER, StoreCache
from tests.helpers import run_cli
from tests.test_explain import serve
from tests.test_interpret import _interpret, _truthful, planted  # noqa: F401  (a fixture)


class Ident:
    def __init__(self, model: str):
        self.identity = {"client": "openai", "endpoint": "http://x/v1", "model": model}


def test_store_cache_merges_writers_and_reads_legacy(tmp_path):
    legacy = tmp_path / "responses.json"
    legacy.write_text(json.dumps({"k" * 64: "old answer"}))
    a = StoreCache(tmp_path, Ident("m").identity, legacy=legacy)
    b = StoreCache(tmp_path, Ident("m").identity)
    a.put({"ab" + "0" * 62: "from a"})
    b.put({"ab" + "1" * 62: "from b"})
    a.save()
    b.save()  # merged with a's answer in the same file, not over it
    fresh = StoreCache(tmp_path, Ident("m").identity)
    assert fresh.get("ab" + "0" * 62) == "from a" and fresh.get("ab" + "1" * 62) == "from b"
    assert a.get("k" * 64) == "old answer" and fresh.get("k" * 64) is None
    assert StoreCache(tmp_path, Ident("other").identity).get("ab" + "0" * 62) is None
    assert (tmp_path / FOLDER).is_dir() and len(fresh) == 2


def test_another_explainer_reuses_the_scan_and_answers_are_shared(planted, capsys):  # noqa: F811
    with serve(_truthful) as (url, requests):
        first = run_cli(capsys, *_interpret(planted, "--features", "4-6", "--explainer", url,
                                            "--explainer-model", "kw-a", "--detection", "8"))
        assert first.code == 0, first.err
        n_first = len(requests)
        # Another explainer: a new artifact, but no scan; every prompt asked of it anew.
        other = run_cli(capsys, *_interpret(planted, "--features", "4-6", "--explainer", url,
                                            "--explainer-model", "kw-b", "--detection", "8"))
        assert other.code == 0, other.err
        assert "scanning" not in other.err and "reused" in other.err
        assert other.out != first.out and len(requests) > n_first
        n_both = len(requests)
        # Another --explain-max with the first explainer: the scan reused, no explanation
        # asked again (only a control that changed with the sample: another feature's).
        again = run_cli(capsys, *_interpret(planted, "--features", "4-6", "--explainer", url,
                                            "--explainer-model", "kw-a", "--detection", "8",
                                            "--explain-max", "2"))
        assert again.code == 0 and "scanning" not in again.err
        assert all(r["messages"][0]["content"] != EXPLAIN_SYSTEM for r in requests[n_both:])
    a = store.open_complete(planted["root"], first.out.strip())
    c = store.open_complete(planted["root"], again.out.strip())
    ea = json.loads((a.path / "explanations.json").read_text())
    ec = json.loads((c.path / "explanations.json").read_text())
    assert len(ec) == 2 and all(ec[k]["explanation"] == ea[k]["explanation"] and
                                ec[k]["balanced_accuracy"] == ea[k]["balanced_accuracy"]
                                for k in ec)
