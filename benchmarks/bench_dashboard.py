"""The dashboard at the scale of a real SAE: a synthetic 65,536-latent interpret report, every
latent with the examples interpret shows by default (20 top contexts and 4 quantiles of 3, 32
tokens each), a histogram and a logit lens, opened from disk (file://) in headless Chromium
through Playwright.

Measured: seconds to write the report; the page's bytes and the list's first paint (from the
start of navigation to the frame after the rows exist); the time to open a feature (its detail
file loaded and its panel built) and the bytes that took; a token search. Goals: first paint
<= 3 s and opening a feature <= 1 s on this 2-core machine.

Run alone: `python -m benchmarks.bench_dashboard [N_LATENTS]` prints the figures as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np

from benchmarks.common import Row

N_LATENTS = 65_536
TOP, QUANTILES, PER_Q, WIDTH, VOCAB = 20, 4, 3, 32, 8000


def synthetic_rows(n: int, seed: int = 0):
    """Rows of the dashboard's data model, sparse activations as an SAE latent's: a few
    tokens of each window fire, the peak about 3/4 along."""
    rng = np.random.default_rng(seed)
    vocab = [f" tok{i}" for i in range(VOCAB)]
    n_ex = TOP + QUANTILES * PER_Q
    edges = np.linspace(-3, 2, 25).tolist()
    for f in range(n):
        acts = np.zeros((n_ex, WIDTH), np.float32)
        peak = (3 * WIDTH) // 4
        scale = rng.exponential(4.0) + 1
        acts[:, peak] = scale * np.linspace(1, 0.1, n_ex)
        acts[:, peak + 1] = acts[:, peak] * rng.uniform(0, 0.5, n_ex)
        ids = rng.integers(0, VOCAB, (n_ex, WIDTH))
        ids[:, peak] = rng.integers(0, 64) + 64 * (f % 100)  # each latent its own few tokens
        ex = [{"tokens": [vocab[t] for t in ids[i]], "acts": acts[i].tolist()}
              for i in range(n_ex)]
        yield {"index": f, "density": float(rng.uniform(1e-5, 1e-2)), "max_act": float(scale),
               "mean_act": float(scale / 3), "score": float(rng.uniform(0.4, 0.95)),
               "control_score": 0.5, "explanation": f"synthetic latent {f} (tok{f % 97})",
               "top": ex[:TOP],
               "quantiles": [{"label": f"quantile {q + 1} of {QUANTILES}",
                              "examples": ex[TOP + PER_Q * q:TOP + PER_Q * (q + 1)]}
                             for q in range(QUANTILES)],
               "hist": {"edges": edges, "counts": rng.integers(0, 1000, 24).tolist(),
                        "label": "log10 activation"},
               "logits_pos": [[vocab[int(t)], float(v)] for t, v in
                              zip(rng.integers(0, VOCAB, 10), np.linspace(2, 1, 10))],
               "logits_neg": [[vocab[int(t)], -float(v)] for t, v in
                              zip(rng.integers(0, VOCAB, 10), np.linspace(2, 1, 10))]}


def measure(n: int = N_LATENTS, folder: Path | None = None, served: bool = False) -> dict:
    """The figures of the page opened from disk, or with `served` from `saectl serve` (the same
    report, inside a complete interpret artifact of a store, over HTTP on 127.0.0.1)."""
    from saectl.dashboard import write_dashboard

    own = folder is None
    folder = Path(folder or tempfile.mkdtemp(prefix="saectl-dash-bench-"))
    report, server = folder, None
    try:
        if served:
            from saectl import layout, store

            art = store.artifact_for(store.store_root(folder / "store"), "interpret",
                                     {"bench": n})
            report = layout.report(art.path, layout.DASHBOARD)
        with contextlib.ExitStack() as stack:
            if served:
                stack.enter_context(store.writing(art, {"bench": n}))
            t0 = time.perf_counter()
            page_path = write_dashboard(report, {"title": f"synthetic {n:,} latents",
                                                 "meta": {"d_sae": n},
                                                 "features": synthetic_rows(n)})
            out = {"latents": n, "write_s": time.perf_counter() - t0,
                   "report_bytes": sum(p.stat().st_size for p in page_path.parent.rglob("*")
                                       if p.is_file()),
                   "page_bytes": page_path.stat().st_size}
            if served:
                store.mark_complete(art, {"bench": n})
        url = page_path.as_uri()
        if served:
            server = _Server(folder / "store")
            url = f"{server.url}/a/{art.ref}/report/{page_path.name}"
        return {**out, **_browse(url, n)}
    finally:
        if server is not None:
            server.stop()
        if own:
            shutil.rmtree(folder, ignore_errors=True)


class _Server:
    """`saectl serve`'s app under uvicorn on a thread, on a free port of 127.0.0.1."""

    def __init__(self, root: Path):
        import threading

        import uvicorn

        from saectl.serve import bind, make_app

        sock = bind("127.0.0.1", 0, False)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(make_app(root), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("saectl serve did not start in 30 s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _browse(url: str, n: int) -> dict:
    """First paint, opening a far feature and a token search, in headless Chromium."""
    from playwright.sync_api import sync_playwright

    out: dict = {}
    loaded: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"),
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: loaded.append(r.url))
        page.goto(url, wait_until="commit")
        page.wait_for_selector("#rows tr")
        out["first_paint_ms"] = page.evaluate(
            "new Promise(r => requestAnimationFrame(() => r(performance.now())))")
        page.wait_for_selector("#panel .feature")  # feature 0, opened on load
        before = len(loaded)
        far = n - 7
        out["open_feature_ms"] = page.evaluate(f"""new Promise(r => {{
            const t0 = performance.now();
            location.hash = 'f={far}';
            const tick = () => document.getElementById('feature-{far}')
                ? requestAnimationFrame(() => r(performance.now() - t0))
                : setTimeout(tick, 1);
            tick(); }})""")
        out["open_feature_bytes"] = _bytes(loaded[before:])
        before = len(loaded)
        out["token_search_ms"] = page.evaluate("""new Promise(r => {
            const t0 = performance.now(), q = document.getElementById('tok');
            q.value = 'tok5'; q.dispatchEvent(new Event('input'));
            const tick = () => document.getElementById('token-results')
                ? r(performance.now() - t0) : setTimeout(tick, 1);
            tick(); })""")
        out["token_search_bytes"] = _bytes(loaded[before:])
        out["token_hits"] = page.evaluate("document.querySelectorAll('a.hit').length")
        out["console_errors"] = errors
        browser.close()
    return out


def _bytes(urls: list[str]) -> int:
    total = 0
    for u in urls:
        if u.startswith("file://"):
            p = Path(urllib.parse.unquote(urllib.parse.urlsplit(u).path))
            total += p.stat().st_size if p.is_file() else 0
    return total


def run() -> list[Row]:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return []  # the bench environment without Playwright: nothing to drive Chromium
    if not shutil.which("chromium"):
        return []
    n = int(os.environ.get("BENCH_DASHBOARD_LATENTS", N_LATENTS))
    m = measure(n)
    note = (f"{n:,} latents: page {m['page_bytes'] / 2**20:.1f} MiB, report "
            f"{m['report_bytes'] / 2**20:.0f} MiB written in {m['write_s']:.0f} s")
    s = measure(n, served=True)  # issue 22.5: the same report through `saectl serve`
    return [Row(f"dashboard first paint of the list, ms ({n:,} latents, file://)",
                m["first_paint_ms"], 0, "ms", "<= 3000", note=note),
            Row(f"dashboard open a feature, ms ({n:,} latents, file://)", m["open_feature_ms"],
                0, "ms", "<= 1000",
                note=f"loaded {m['open_feature_bytes'] / 1024:.0f} KiB (one detail file)"),
            Row(f"saectl serve: first paint of the list vs the static file, ms ({n:,} latents)",
                s["first_paint_ms"], m["first_paint_ms"], "ms", "",
                note="the same report from a complete interpret artifact over HTTP (uvicorn, "
                     "127.0.0.1) against file://"),
            Row(f"saectl serve: open a feature vs the static file, ms ({n:,} latents)",
                s["open_feature_ms"], m["open_feature_ms"], "ms", "",
                note=f"console errors served: {len(s['console_errors'])}")]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    size = int(sys.argv[1]) if len(sys.argv) > 1 else N_LATENTS
    print(json.dumps({"file": measure(size), "served": measure(size, served=True)}, indent=1))
