"""The client for OpenAI-compatible `/chat/completions` endpoints (vLLM, llama.cpp,
`transformers serve`, a hosted API) that `--explainer URL` names, and what it does with the
user's key.

Written on the standard library's urllib rather than the official `openai` package, which was
weighed (issue 15): it honours Retry-After and, through httpx, drops Authorization on a
redirect to another origin, but it still follows that redirect (re-sending the prompt and
accepting the other host's answer), sends a key over plain http:// to any host, and would
need its exceptions translated back into the one-line errors below. The rules here:

- The key (`OPENAI_API_KEY`) never goes over plain `http://` to a host that is not loopback
  unless the user says so (`SAECTL_SEND_KEY_OVER_HTTP=1`); a URL with credentials in it is
  refused (put them in the environment instead).
- Redirects are followed only to the same origin and only as 307/308 (a POST stays a POST);
  any other is an error naming where it pointed, so the key never reaches a host the user
  did not name.
- 429 and 5xx are retried with exponential backoff, waiting at least what `Retry-After` asks
  (seconds or an HTTP date; more than two minutes is an error at once, not a wait).
- What is shown or stored (`base_url`, `identity`, every error) is the URL without user-info,
  query string or fragment; the query string still goes with each request (`?api-version=`).
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from saectl.errors import ConfigError, SaectlError

KEY_OVER_HTTP_ENV = "SAECTL_SEND_KEY_OVER_HTTP"
MAX_RETRY_AFTER = 120.0
"""Seconds of Retry-After saectl will wait; a longer ask is reported instead."""


class ExplainerError(SaectlError):
    """The explainer endpoint refused, failed or timed out, after retries."""


def redact(url: str) -> str:
    """`url` as it may be shown and stored: no user-info, query string or fragment, no
    trailing slash (`https://u:p@host/v1/?key=k` → `https://host/v1`)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple:
    p = urllib.parse.urlsplit(url)
    return p.scheme.lower(), (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(
        p.scheme.lower())


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a 307/308 to the same origin with the same method, body and headers; refuse any
    other redirect (urllib would turn a POST into a GET and carry the key to any host)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if code in (307, 308) and _origin(newurl) == _origin(req.full_url):
            return urllib.request.Request(newurl, data=req.data, headers=dict(req.header_items()),
                                          method=req.get_method())
        raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)


def retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks for (a number, or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIClient:
    """Any OpenAI-compatible `/chat/completions` endpoint. A batch is sent as concurrent
    requests; connection errors, timeouts, 429 and 5xx are retried with exponential backoff
    (at least as long as the server's Retry-After)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 60, retries: int = 3, backoff: float = 1.0, workers: int = 4):
        parts = urllib.parse.urlsplit(base_url)
        self.base_url, self.model = redact(base_url), model
        if "@" in parts.netloc:
            raise ConfigError(f"--explainer {self.base_url}: credentials in the URL are refused "
                              "(URLs end up in logs); put the key in OPENAI_API_KEY")
        self._url = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, parts.path.rstrip("/") + "/chat/completions",
             parts.query, ""))
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        local = is_loopback(parts.hostname)
        if (self.api_key and parts.scheme.lower() == "http" and not local
                and os.environ.get(KEY_OVER_HTTP_ENV) != "1"):
            raise ConfigError(
                f"refusing to send OPENAI_API_KEY over plain http:// to {parts.hostname} (anyone "
                "on the way could read it); use https://, unset OPENAI_API_KEY if the endpoint "
                f"needs no key, or set {KEY_OVER_HTTP_ENV}=1 to send it on a network you trust")
        self.timeout, self.retries, self.backoff = timeout, max(1, retries), backoff
        self.workers = workers
        self.identity = {"client": "openai", "endpoint": self.base_url, "model": model}
        # A local server is reached directly even where an HTTP proxy is configured.
        self._opener = urllib.request.build_opener(
            _SameOriginRedirects(), *([urllib.request.ProxyHandler({})] if local else []))

    def complete(self, batch: list[list[dict]], max_tokens: int) -> list[str]:
        if len(batch) <= 1:
            return [self._one(m, max_tokens) for m in batch]
        with ThreadPoolExecutor(min(self.workers, len(batch))) as pool:
            futures = [pool.submit(self._one, m, max_tokens) for m in batch]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:  # one endpoint failure: the others would fail the same way
                    f.cancel()
                raise

    def _fail(self, cause: str, tries: int) -> ExplainerError:
        after = f" after {tries} tries" if tries > 1 else ""
        return ExplainerError(f"explainer {self.base_url} {cause}{after}")

    def _one(self, messages: list[dict], max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        cause, wait = "", 0.0
        for attempt in range(self.retries):
            if attempt:
                time.sleep(max(wait, self.backoff * 2 ** (attempt - 1)))
            wait = 0.0
            req = urllib.request.Request(self._url, body, headers)
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:
                    where = redact(urllib.parse.urljoin(self._url, e.headers.get("Location", "")))
                    raise self._fail(
                        f"answered HTTP {e.code}, a redirect to {where}; saectl follows only "
                        "307/308 redirects to the same origin (so the key never reaches a host "
                        "you did not name): pass the URL it should reach as --explainer", 1) from None
                detail = e.read(300).decode("utf-8", "replace").strip().splitlines()
                cause = f"answered HTTP {e.code} {e.reason}" + (f": {detail[0][:200]}"
                                                                if detail else "")
                if e.code != 429 and e.code < 500:  # our request is wrong: asking again won't help
                    hint = " (set OPENAI_API_KEY)" if e.code in (401, 403) else ""
                    raise self._fail(cause + hint, 1) from None
                wait = retry_after(e.headers.get("Retry-After")) or 0.0
                if wait > MAX_RETRY_AFTER and attempt + 1 < self.retries:
                    raise self._fail(f"{cause} and asked to retry after {wait:.0f} s; run again "
                                     "later", attempt + 1) from None
                continue
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
                cause = _network_cause(e, self.timeout)
                continue
            try:
                content = json.loads(raw)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise self._fail("answered with something that is not a chat completion: "
                                 f"{raw[:120].decode('utf-8', 'replace')!r}", 1) from None
            return content or ""
        raise self._fail(cause, self.retries)


def _network_cause(err: BaseException, timeout: float) -> str:
    reason = getattr(err, "reason", err)  # URLError wraps the socket error
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return f"did not answer within the {timeout:g} s timeout"
    if isinstance(reason, ConnectionRefusedError):
        return "refused the connection"
    if isinstance(reason, (ConnectionResetError, ConnectionAbortedError)) or (
            type(err).__name__ == "RemoteDisconnected"):
        return "dropped the connection"
    return f"could not be reached ({str(reason).strip() or type(reason).__name__})"
