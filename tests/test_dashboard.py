"""The feature dashboard (`saectl/dashboard.py`): escaping, the embedded JSON, scale, and the
page itself in headless Chromium (docs/architecture.md: "headless Chromium for the dashboard").

Console errors are read through the Chrome DevTools Protocol: Chromium starts with
`--remote-debugging-port=0`, a small stdlib websocket client (below) enables the Runtime, Log
and Page domains, navigates to the file:// URL, and every `Runtime.exceptionThrown`,
`Runtime.consoleAPICalled` of type error/assert and `Log.entryAdded` of level error counts as an
error. A page that throws is checked too, so the check cannot pass by seeing nothing.
"""

from __future__ import annotations

import base64
import html
import json
import os
import random
import re
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from saectl.dashboard import (
    CHROMIUM_FLAGS,
    embed_json,
    find_chromium,
    read_dashboard,
    read_head,
    screenshot,
    write_dashboard,
)
from saectl.errors import NotFoundError

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium); dashboard browser tests skipped")

TEXT = ("Paris is the capital of France , and Berlin is the capital of Germany . In 1969 the "
        "first humans walked on the Moon during the Apollo 11 mission . The cat sat on the mat "
        "and looked at the dog . Water boils at one hundred degrees Celsius at sea level .\n"
        "A sparse autoencoder learns a dictionary of features from activations . Rome is the "
        "capital of Italy , and the Moon landing of 1969 was watched by millions .")
WORDS = TEXT.split(" ")
# (trigger word, explanation, promoted tokens, suppressed tokens)
TOPICS = [("capital", "capital cities of countries", ["city", "Paris", "Rome"], ["dog", "of"]),
          ("Moon", "the Moon and spaceflight", ["landing", "Apollo", "lunar"], ["cat", "sea"]),
          ("cat", "cats and other pets", ["cats", "kitten", "dog"], ["Paris", "1969"]),
          ("Water", "water and boiling", ["boils", "steam", "\n"], ["Moon", "humans"]),
          ("the", "the definite article", ["first", "capital", "Moon"], ["the", "a"]),
          ("1969", "years in the twentieth century", ["the", ",", "Apollo"], ["cat", "of"]),
          ("sparse", "machine learning terms", ["autoencoder", "coding", "features"],
           ["Berlin", "Paris"])]


def build_dashboard_data(n_features: int = 12, n_top: int = 4, ctx: int = 16, images=False,
                         seed: int = 0) -> dict:
    """Dashboard data in the interpret stage's data model, with plausible tokens."""
    rng = random.Random(seed)

    def example(trigger: str, scale: float) -> dict:
        at = rng.choice([j for j, w in enumerate(WORDS) if w == trigger])
        start = min(max(0, at - rng.randrange(3, ctx - 3)), len(WORDS) - ctx)
        toks = [("" if j == 0 else " ") + w for j, w in enumerate(WORDS[start:start + ctx])]
        acts = [0.0] * ctx
        acts[at - start] = scale
        for j in range(at - start + 1, min(ctx, at - start + 3)):
            acts[j] = scale * rng.uniform(0.05, 0.4)
        return {"tokens": toks, "acts": acts}

    features = []
    for i in range(n_features):
        trigger, expl, pos, neg = TOPICS[i % len(TOPICS)]
        max_act = round(rng.uniform(2.0, 12.0), 3)
        centre = rng.uniform(8, 16)
        counts = [int(1000 * 2.718 ** (-((b - centre) / 4) ** 2)) for b in range(24)]
        features.append({
            "index": i, "density": 10 ** rng.uniform(-5, -0.5),
            "max_act": max_act, "mean_act": max_act * rng.uniform(0.2, 0.5),
            "score": None if i % 5 == 4 else rng.uniform(0.3, 0.95),
            "control_score": None if i % 5 == 4 else rng.uniform(0.0, 0.3),
            "explanation": None if i % 9 == 8 else f"{expl} (#{i})",
            "top": [example(trigger, max_act * (1 - 0.1 * k)) for k in range(n_top)],
            "quantiles": [{"label": f"interval {q} (q{q}0–q{q + 1}0)",
                           "examples": [example(trigger, max_act * 0.2 * q)]}
                          for q in (3, 1)],
            "hist": {"edges": [-3 + b * 0.17 for b in range(25)], "counts": counts},
            "logits_pos": [[" " + w, rng.uniform(0.5, 2)] for w in pos],
            "logits_neg": [[" " + w, -rng.uniform(0.5, 2)] for w in neg],
            "image": ([[((r - 3.5) * (c - 3.5)) / 12 for c in range(8)] for r in range(8)]
                      if images else None),
        })
    return {"title": "saectl features: resid_post.3 of SmolLM2-135M",
            "meta": {"sae": "train/3f9c2a1b", "hook": "resid_post.3",
                     "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "n_tokens": 2_000_000,
                     "d_sae": n_features},
            "features": features}


def read_embedded(path: Path) -> dict:
    """The data model back from a page and the detail files beside it."""
    return read_dashboard(path)


# ---------------------------------------------------------------- unit


def test_escaping_keeps_the_page_intact(tmp_path):
    data = build_dashboard_data(2)
    evil = "</script><b>x"
    data["features"][0]["top"][0]["tokens"][0] = evil
    data["features"][0]["explanation"] = "<!-- <script>alert(1)</script> & \u2028"
    data["title"] = "<i>title</i>"
    page = write_dashboard(tmp_path, data)
    assert page == tmp_path / "index.html"
    text = page.read_text(encoding="utf-8")
    # Exactly the template's own script elements: one data block, one app.
    assert text.count("</script>") == 2 and text.count("<b>x") == 0
    assert "<i>title</i>" not in text and "&lt;i&gt;title&lt;/i&gt;" in text
    back = read_embedded(page)
    assert back["features"][0]["top"][0]["tokens"][0] == evil
    assert back["features"][0]["explanation"].startswith("<!-- <script>")
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text


def test_embedded_json_round_trips_and_cleans_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    data = build_dashboard_data(3)
    data["features"][1]["max_act"] = np.float32(3.14159265)
    data["features"][1]["density"] = float("nan")
    data["features"][1]["hist"]["counts"] = np.arange(24, dtype=np.int64)
    data["features"][2]["score"] = float("inf")
    back = read_embedded(write_dashboard(tmp_path / "report" / "index.html", data))
    assert back["title"] == data["title"] and back["meta"] == data["meta"]
    assert len(back["features"]) == 3
    f0, f1 = back["features"][0], back["features"][1]
    assert f0["top"][0]["tokens"] == data["features"][0]["top"][0]["tokens"]
    assert f0["max_act"] == pytest.approx(data["features"][0]["max_act"], rel=1e-3)
    assert f1["max_act"] == 3.142 and f1["density"] is None
    assert f1["hist"]["counts"] == list(range(24))
    assert back["features"][2]["score"] is None
    assert embed_json({"a": "<>&"}) == '{"a":"\\u003c\\u003e\\u0026"}'


def test_ten_thousand_features_write_quickly(tmp_path):
    data = build_dashboard_data(10_000, n_top=3, ctx=12)
    t0 = time.perf_counter()
    page = write_dashboard(tmp_path / "index.html", data)
    took = time.perf_counter() - t0
    size = page.stat().st_size
    # About 4 s on a busy 2-core machine (1.3 M floats and 0.9 M tokens to walk); generous.
    assert took < 30, f"writing 10,000 features took {took:.1f}s"
    # About 1.5 KB a feature with 5 examples of 12 tokens; no per-feature markup.
    assert size < 25 * 2**20, f"{size / 2**20:.1f} MiB"
    assert len(read_embedded(page)["features"]) == 10_000
    assert not list(tmp_path.glob(".*.tmp")), "atomic_write left a temporary file"


def test_screenshot_without_chromium_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    page = write_dashboard(tmp_path, build_dashboard_data(1))
    with pytest.raises(NotFoundError, match=r"chromium is not installed \(apt-get install"):
        screenshot(page, tmp_path / "x.png")


# ---------------------------------------------------------------- in headless Chromium


class DevTools:
    """A minimal Chrome DevTools Protocol client over a stdlib websocket (RFC 6455)."""

    def __init__(self, ws_url: str, timeout: float = 30.0):
        u = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            assert chunk, "devtools closed the websocket handshake"
            buf += chunk
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n", 1)[0], head
        self.next_id, self.events = 0, []

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("devtools websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, obj: dict) -> None:
        payload, mask = json.dumps(obj).encode(), os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _recv(self) -> dict:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            op = b0 & 0x0F
            if op == 8:
                raise ConnectionError("devtools websocket closed")
            if op in (9, 10):  # ping/pong: Chromium does not ping its clients
                continue
            parts.append(data)
            if b0 & 0x80:
                return json.loads(b"".join(parts))

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self._send({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = self._recv()
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while time.monotonic() < deadline:
            msg = self._recv()
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def load(self, url: str) -> None:
        """Navigate and wait for the load event; events from earlier pages are dropped."""
        self.events = []
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        self.js("new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)))")

    def errors(self) -> list[str]:
        out = []
        for ev in self.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out


@pytest.fixture(scope="module")
def devtools():
    with tempfile.TemporaryDirectory(prefix="saectl-cdp-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 "--remote-debugging-port=0", "--window-size=1200,900",
                                 "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + 60
            while not (port_file.is_file() and port_file.read_text().strip()):
                assert proc.poll() is None, "chromium exited before devtools started"
                assert time.monotonic() < deadline, "chromium devtools did not start in 60 s"
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            targets = json.loads(opener.open(f"http://127.0.0.1:{port}/json/list",
                                             timeout=30).read())
            page = next(t for t in targets if t.get("type") == "page")
            cdp = DevTools(page["webSocketDebuggerUrl"])
            for domain in ("Runtime", "Log", "Page"):
                cdp.call(f"{domain}.enable")
            yield cdp
            cdp.sock.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@needs_chromium
def test_console_error_check_sees_errors(tmp_path, devtools):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><script>console.error('boom-log');"
                   "undefinedFunction();</script>")
    devtools.load(bad.as_uri())
    errs = devtools.errors()
    assert any("boom-log" in e for e in errs) and any("undefinedFunction" in e for e in errs)


@needs_chromium
def test_page_loads_without_console_errors_and_works(tmp_path, devtools):
    data = build_dashboard_data(40, images=True)
    data["features"][0]["top"][0]["tokens"][1] = "</script><b>x"
    page = write_dashboard(tmp_path, data)
    devtools.load(page.as_uri())
    assert devtools.errors() == []
    js = devtools.js
    assert js("document.title") == data["title"]
    assert js("document.querySelector('#panel .feature').id") == "feature-0"
    n_tok, n_shaded = js("""[document.querySelectorAll('#panel .tok').length,
        [...document.querySelectorAll('#panel .ex .tok')]
          .filter(t => /^rgba?\\(255, 140, 0/.test(t.style.background)).length]""")
    assert n_tok > 50 and n_shaded >= 6
    # The evil token is text, and hovering a token tells its activation.
    assert js("document.querySelectorAll('#panel .ex b').length") == 0
    assert "</script><b>x" in js("document.querySelector('#panel .ex').textContent")
    assert js("document.querySelector('#panel .ex .tok').title").startswith("activation ")
    assert js("document.querySelectorAll('#panel svg rect').length") == 24
    assert js("document.querySelectorAll('#panel .img > div').length") == 64
    assert js("document.querySelectorAll('#panel .pos').length") >= 3
    # Sort by score (descending, nulls last), filter by text, by index, by density.
    assert js("document.querySelectorAll('#rows tr').length") == 40
    js("document.querySelector('th[data-k=score]').click()")
    scores = [f["score"] for f in data["features"] if f["score"] is not None]
    first = js("+document.querySelector('#rows tr td:nth-child(1)').textContent")
    assert data["features"][first]["score"] == pytest.approx(max(scores), rel=1e-3)
    js("document.querySelector('th[data-k=score]').click()")
    first = js("+document.querySelector('#rows tr td:nth-child(1)').textContent")
    assert data["features"][first]["score"] == pytest.approx(min(scores), rel=1e-3)
    setq = "(v => { const q = document.getElementById('q'); q.value = v; " \
           "q.dispatchEvent(new Event('input')); })"
    js(f"{setq}('the moon')")
    expected = [f["index"] for f in data["features"]
                if "the moon" in (f["explanation"] or "").lower()]
    assert sorted(js("[...document.querySelectorAll('#rows tr')].map(r => +r.dataset.i)")) \
        == expected
    js(f"{setq}('#17')")
    assert js("[...document.querySelectorAll('#rows tr td:first-child')]"
              ".map(t => t.textContent)") == ["17"]
    js(f"{setq}('')")
    js("(() => { const d = document.getElementById('dmin'); d.value = '0.01'; "
       "d.dispatchEvent(new Event('input')); })()")
    dense = sum(1 for f in data["features"] if f["density"] >= 0.01)
    assert js("document.querySelectorAll('#rows tr').length") == dense
    # Clicking a row shows that feature's panel.
    js("document.querySelector('#rows tr').click()")
    js("new Promise(r => setTimeout(r, 50))")
    shown = js("document.querySelector('#panel .feature').id")
    assert shown == "feature-" + js("document.querySelector('#rows tr td').textContent")
    assert js("document.querySelector('#rows tr').classList.contains('sel')")
    assert devtools.errors() == []


@needs_chromium
def test_sparse_and_empty_data_render_without_errors(tmp_path, devtools):
    """Every field but `index` may be missing or null; a page may hold no features at all."""
    bare = {"features": [{"index": 7}, {"index": 3, "density": None,
                                        "hist": None, "image": [[None, 1.0]], "quantiles": None,
                                        "top": [{"tokens": ["a", 5], "acts": [None, 1]}]}]}
    devtools.load(write_dashboard(tmp_path / "bare.html", bare).as_uri() + "#f=3")
    assert devtools.errors() == []
    assert devtools.js("document.querySelector('#panel .feature').id") == "feature-3"
    devtools.load(write_dashboard(tmp_path / "empty.html", {"features": []}).as_uri())
    assert devtools.errors() == []
    assert devtools.js("document.getElementById('panel').textContent") == "no features"


@needs_chromium
def test_ten_thousand_features_render_lazily(tmp_path, devtools):
    page = write_dashboard(tmp_path, build_dashboard_data(10_000, n_top=2, ctx=10))
    t0 = time.perf_counter()
    devtools.load(page.as_uri())
    took = time.perf_counter() - t0
    assert devtools.errors() == []
    assert devtools.js("document.querySelectorAll('#rows tr').length") == 100
    assert devtools.js("document.querySelectorAll('.feature').length") == 1
    devtools.js("document.getElementById('more').click()")
    assert devtools.js("document.querySelectorAll('#rows tr').length") == 200
    assert "10,000 features" in devtools.js("document.getElementById('count').textContent")
    assert took < 20, f"the 10,000-feature page took {took:.1f}s to load"


@needs_chromium
def test_dump_dom_has_panels_with_shaded_tokens(tmp_path):
    page = write_dashboard(tmp_path, build_dashboard_data(5))
    with tempfile.TemporaryDirectory(prefix="saectl-chromium-",
                                     ignore_cleanup_errors=True) as profile:
        out = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                              "--dump-dom", page.as_uri()], check=False, capture_output=True,
                             text=True, timeout=90, stdin=subprocess.DEVNULL)
    dom = out.stdout
    assert 'class="feature" id="feature-0"' in dom, out.stderr[-2000:]
    # Chromium writes an opaque colour as rgb(), the others as rgba().
    shaded = re.findall(
        r'<span class="tok"[^>]* style="background: rgba?\(255, 140, 0(, [\d.]+)?\)', dom)
    assert len(shaded) >= 6 and "" in shaded  # the max activation is fully shaded
    assert dom.count('<tr class="row') == 5


@needs_chromium
def test_screenshot_shows_a_dashboard(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    page = write_dashboard(tmp_path, build_dashboard_data(30, images=True))
    png = screenshot(page, tmp_path / "shot.png", width=1000, height=700)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    img = Image.open(png).convert("RGB")
    assert img.size == (1000, 700)
    colours = img.getcolors(maxcolors=1 << 20)
    assert len(colours) > 100
    # Token shading: orange (255, 140, 0) blended on white, darkest at the max activation.
    orange = sum(n for n, (r, g, b) in colours if r > 230 and 130 <= g <= 200 and b < 110)
    assert orange > 200, orange


# ---------------------------------------------------------------- issue 15 item 9


EVIL_TITLE = "a __DATA__ b __TITLE__ </title><i>c"


def test_title_holding_the_markers_stays_a_title(tmp_path):
    data = build_dashboard_data(2)
    data["title"] = EVIL_TITLE
    text = write_dashboard(tmp_path, data).read_text(encoding="utf-8")
    titles = re.findall(r"<title>(.*?)</title>", text, re.DOTALL)
    assert [html.unescape(t) for t in titles] == [EVIL_TITLE]
    assert text.count('"list":') == 1  # the data went in once, into its script
    assert read_embedded(tmp_path / "index.html")["title"] == EVIL_TITLE


def test_template_is_package_data():
    from importlib import resources

    from saectl.dashboard import DATA_MARKER, TEMPLATE

    text = resources.files("saectl").joinpath(TEMPLATE).read_text(encoding="utf-8")
    assert text.count(DATA_MARKER) == 1 and text.startswith("<!DOCTYPE html>")


@needs_chromium
def test_title_with_markers_and_malformed_hash_in_chromium(tmp_path, devtools):
    data = build_dashboard_data(3)
    data["title"] = EVIL_TITLE
    page = write_dashboard(tmp_path, data)
    for bad in ("%E0%A4%A", "%", "%zz&x=1", "7"):
        devtools.load("about:blank")  # a new document each time, not a jump inside one
        devtools.load(page.as_uri() + "#f=" + bad)
        assert devtools.errors() == [], bad
        assert devtools.js("document.title") == EVIL_TITLE
        assert devtools.js("document.querySelector('header h1').textContent") == EVIL_TITLE
        assert devtools.js("document.querySelector('#panel .feature').id") == "feature-0"
    # A good hash after a bad one still selects its feature.
    devtools.js("location.hash = 'f=2'")
    devtools.js("new Promise(r => setTimeout(r, 50))")
    assert devtools.js("document.querySelector('#panel .feature').id") == "feature-2"
    assert devtools.errors() == []


# ---------------------------------------------------------------- issue 20: at scale


def test_detail_and_token_files_beside_the_page(tmp_path):
    data = build_dashboard_data(70)
    page = write_dashboard(tmp_path, data)
    head = read_head(page)
    assert head["list"]["index"] == list(range(70)) and "top" not in json.dumps(head["list"])
    shards = sorted((tmp_path / "features").glob("*.js"))
    assert [p.name for p in shards] == ["00000.js", "00001.js", "00002.js"]
    back = read_dashboard(page)["features"]
    assert [f["index"] for f in back] == list(range(70))
    assert back[3]["top"][0]["tokens"] == data["features"][3]["top"][0]["tokens"]
    # rewriting with fewer features leaves no stale file behind
    write_dashboard(tmp_path, build_dashboard_data(5))
    assert len(list((tmp_path / "features").glob("*.js"))) == 1


@needs_chromium
def test_token_search_and_a_missing_detail_file_in_chromium(tmp_path, devtools):
    page = write_dashboard(tmp_path, build_dashboard_data(40))
    devtools.load(page.as_uri())
    js = devtools.js
    js("(() => { const q = document.getElementById('tok'); q.value = 'Moon'; "
       "q.dispatchEvent(new Event('input')); })()")
    js("new Promise(r => setTimeout(r, 200))")
    hits = js("[...document.querySelectorAll('#token-results a.hit')].map(a => +a.dataset.f)")
    assert hits and all(i % 7 == 1 for i in hits[:5])  # the Moon topic's features fire on it
    js("document.querySelector('#token-results a.hit').click()")
    js("new Promise(r => setTimeout(r, 200))")
    assert js("document.querySelector('#panel .feature').id") == f"feature-{hits[0]}"
    (tmp_path / "features" / "00001.js").unlink()
    js("location.hash = 'f=39'")
    js("new Promise(r => setTimeout(r, 200))")
    assert "is missing beside the page" in js("document.getElementById('panel').textContent")
    # the one error is Chromium's own line for the missing file; the page threw nothing
    assert [e for e in devtools.errors() if "ERR_FILE_NOT_FOUND" not in e] == []
