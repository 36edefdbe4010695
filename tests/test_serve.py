"""`saectl serve` (saectl/serve.py): the real server (uvicorn on 127.0.0.1, port 0) over a
store with a planted SAE (tests/test_interpret.py's fixture) and its interpret artifact, asked
over HTTP and driven in real Chromium through Playwright (pointed at Debian's chromium: its
own browser download is not available here).

`SAECTL_SERVE_SHOTS=DIR` also writes a screenshot of each view into DIR (README's pictures:
docs/serve-*.png)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from saectl.serve import bind, make_app
from tests.helpers import assert_one_line_error, run_cli, tried
from tests.test_interpret import _cli, planted  # noqa: F401  (a fixture)

CHROMIUM = shutil.which("chromium")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None,
    reason="needs chromium (apt-get install chromium) and playwright (pip install playwright)")
SHOTS = os.environ.get("SAECTL_SERVE_SHOTS")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Running:
    """A uvicorn server on a thread, over `root`."""

    def __init__(self, root: Path):
        import uvicorn

        self.sock = bind("127.0.0.1", 0, False)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(make_app(root), log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def get(url: str, data: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, None if data is None else json.dumps(data).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with OPENER.open(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_job(base: str, job: dict, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        job = json.loads(get(f"{base}/api/jobs/{job['id']}")[1])
    return job


@pytest.fixture(scope="module")
def served(planted):  # noqa: F811
    interp = _cli("interpret", planted["sae"], "--store", planted["root"], "--device", "cpu",
                  "--no-explain", "--top", "8")
    srv = Running(planted["root"])
    yield {**planted, "interpret": interp, "url": srv.url}
    srv.stop()


def test_cli_refuses_bad_binds_and_stores(tmp_path, capsys):
    res = run_cli(capsys, "serve", "--store", tmp_path, "--host", "0.0.0.0")
    assert_one_line_error(res, "refusing to listen on 0.0.0.0", "--allow-remote")
    holder = bind("127.0.0.1", 0, False)
    try:
        res = run_cli(capsys, "serve", "--store", tmp_path, "--port",
                      str(holder.getsockname()[1]))
        assert_one_line_error(res, "cannot listen on 127.0.0.1", "--port")
    finally:
        holder.close()
    res = run_cli(capsys, "serve", "--store", tmp_path / "nowhere")
    assert_one_line_error(res, "does not exist", "--store")
    tried("serve", "bad bind or store", 3)


def test_pages_and_bad_input_over_http(served, caplog):
    base, sae, interp = served["url"], served["sae"], served["interpret"]
    code, page = get(base + "/")
    assert code == 200 and sae in page and interp in page
    code, page = get(f"{base}/a/{sae}")
    assert code == 200 and "lineage" in page and interp in page  # used by: the interpret
    assert f"/a/{sae}/test" in page and f"/a/{sae}/steer" in page
    code, page = get(f"{base}/a/{interp}/report/index.html")
    assert code == 200 and '"list":' in page
    code, js = get(f"{base}/a/{interp}/report/features/00000.js")
    assert code == 200 and js.startswith("saectlShard(0,")
    sweepless = interp.split("/")[1]
    bad = [f"/a/train/{'f' * 12}", "/a/nostage/abc", f"/a/{interp}/report/../zarr.json",
           f"/a/{interp}/report/%2e%2e/zarr.json", f"/a/{sae}/feature/99999",
           f"/a/{sae}/feature/x", f"/a/{interp}/test", f"/a/interpret/{sweepless}/nothing",
           "/no/such/page"]
    with caplog.at_level(logging.WARNING, logger="saectl.serve"):
        for path in bad:
            caplog.clear()
            code, page = get(base + path)
            assert code == 404, (path, code)
            assert "Traceback" not in page and "class=err" in page or code == 404, path
            assert len([r for r in caplog.records if r.name == "saectl.serve"]) <= 1, path
    code, page = get(f"{base}/a/{sae}/feature/99999")
    assert "99999" in page and "does not exist" in page and "64 features" in page
    code, page = get(f"{base}/a/{sae}/feature/5")
    assert code == 200 and '"list":' in page  # redirected to the dashboard
    tried("serve", "bad URL", len(bad))


def test_jobs_report_bad_requests_in_one_line(served):
    base, sae = served["url"], served["sae"]
    cases = [({"sae": sae, "prompt": "The cat", "features": "99999:4"}, "out of range"),
             ({"sae": sae, "prompt": "The cat", "features": "5:x"}, "must be F or F:S"),
             ({"sae": sae, "prompt": "  ", "features": "5:4"}, "empty"),
             ({"sae": "train/0000", "prompt": "The cat", "features": "5"}, "no artifact"),
             ({"sae": sae, "prompt": "The cat", "features": "5", "mode": "wild"}, "mode")]
    for body, needle in cases:
        code, text = get(base + "/api/steer", body)
        job = wait_job(base, json.loads(text))
        assert job["state"] == "error" and needle in job["error"], (body, job)
        assert "Traceback" not in job["error"] and "\n" not in job["error"]
    code, text = get(base + "/api/steer", data=None)
    assert code == 405 or "error" in text
    req = urllib.request.Request(base + "/api/steer", b"not json", method="POST")
    try:
        OPENER.open(req, timeout=30)
        raise AssertionError("bad JSON was accepted")
    except urllib.error.HTTPError as e:
        assert "JSON object" in e.read().decode()
    tried("serve", "bad steering request", len(cases) + 1)


def test_model_that_cannot_load_is_one_message(served, tmp_path):
    """The SAE's model folder moved away: the job ends with the loader's one line, and the
    server goes on serving."""
    moved = tmp_path / "moved"
    shutil.move(served["model_dir"], moved)
    srv = Running(served["root"])  # a fresh model cache
    try:
        _code, text = get(srv.url + "/api/activations", {"sae": served["sae"], "text": "a cat"})
        job = wait_job(srv.url, json.loads(text))
        assert job["state"] == "error" and "Traceback" not in job["error"], job
        assert get(srv.url + "/")[0] == 200
    finally:
        shutil.move(moved, served["model_dir"])
        srv.stop()
    tried("serve", "model that cannot load")


def test_activation_test_and_steering_jobs(served):
    base, sae = served["url"], served["sae"]
    _code, text = get(base + "/api/steer", {"sae": sae, "prompt": "The cat sat on",
                                            "features": "5:8", "max_new_tokens": 6})
    t0 = time.perf_counter()
    assert get(base + "/")[0] == 200  # answered while the job loads the model
    assert time.perf_counter() - t0 < 5
    job = wait_job(base, json.loads(text))
    assert job["state"] == "done", job
    r = job["result"]
    assert r["baseline"] != r["steered"] or r["steered_figures"]["kl"] > 0
    assert set(r["steered_figures"]) >= {"act", "dlogp", "kl", "ppl"}
    text = " ".join(["The cat sat on the mat"] * 3)
    job = wait_job(base, json.loads(get(base + "/api/activations", {"sae": sae,
                                                                    "text": text})[1]))
    assert job["state"] == "done", job
    rows = job["result"]["tokens"]
    assert len(rows) > 10 and all(len(t["top"]) <= 5 for t in rows)


@needs_browser
def test_served_views_in_chromium(served):
    base, sae, interp = served["url"], served["sae"], served["interpret"]
    shots = Path(SHOTS) if SHOTS else None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))

        def shot(name):
            if shots is not None:
                page.screenshot(path=str(shots / f"serve-{name}.png"))

        page.goto(base + "/")
        page.click(f"a[href='/a/{sae}']")
        page.wait_for_selector("#lineage")
        shot("artifact")
        page.goto(f"{base}/a/{interp}/report/index.html")
        page.wait_for_selector("#panel .feature")
        assert page.locator("#rows tr").count() == 64
        page.click("th[data-k=max_act]")
        page.click("th[data-k=max_act]")  # ascending, then descending
        top = page.locator("#rows tr td").first.text_content()
        page.fill("#q", "#5")
        assert page.locator("#rows tr").count() == 1
        page.click("#rows tr")
        page.wait_for_selector("#feature-5")
        assert page.locator("#panel .ex").count() >= 4
        shot("dashboard")
        page.fill("#q", "")
        tok = page.locator("#feature-5 .ex .tok").first.text_content()
        page.fill("#tok", tok.replace("·", " "))
        page.wait_for_selector("#token-results")
        assert top is not None
        page.goto(f"{base}/a/{sae}/test")
        page.fill("#text", "The cat sat on the mat and looked at the dog.")
        page.click("#go")
        page.wait_for_selector("#per-token", timeout=120_000)
        page.locator("#tokens .tok").nth(2).click()
        assert page.locator("#detail b").count() == 1
        shot("activations")
        page.goto(f"{base}/a/{sae}/steer?feature=5:8")
        page.fill("#prompt", "The cat sat on")
        page.fill("#n", "8")
        page.click("#go")
        page.wait_for_selector("#effect", timeout=120_000)
        assert page.locator("#baseline").text_content().startswith("The cat sat on")
        assert page.locator("#steered").text_content().startswith("The cat sat on")
        assert page.locator("#figures tr").count() == 2
        shot("steering")
        page.goto(f"{base}/a/{sae}/feature/99999")
        assert "does not exist" in page.locator("#error").text_content()
        browser.close()
    # the 404 of the last page is a console error Chromium logs for any failed load
    assert [e for e in errors if "404" not in e] == [], errors
