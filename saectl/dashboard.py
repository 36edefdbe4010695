"""Feature dashboards: one self-contained `report/index.html`, opened straight from disk.

No server, no CDN, no external URL (machines are offline): the data sits in the page as JSON
inside `<script type="application/json">`, read by a small vanilla-JS app, in the manner of
Neuronpedia's and SAEDashboard's feature pages. A Content-Security-Policy forbids any fetch.

Data model (what the interpret stage writes; every field except `index` may be null/absent):

    {"title": str,
     "meta": {"sae": ref, "hook": str, "model": str, "n_tokens": int, ...},  # any key: value
     "features": [{
        "index": int,                      # latent number in the SAE
        "density": float,                  # firing rate, fraction of tokens with act > 0
        "max_act": float, "mean_act": float,   # mean over the tokens where it fired
        "score": float|null, "control_score": float|null,   # explanation score, and control
        "explanation": str|null,
        "top": [{"tokens": [str], "acts": [float]}],          # top-activating contexts
        "quantiles": [{"label": str, "examples": [{"tokens": [...], "acts": [...]}]}],
        "hist": {"edges": [float], "counts": [int], "label": str},  # len(edges) = len(counts)+1;
                                           # edges in log10(activation) unless `label` says
        "logits_pos": [[str, float]], "logits_neg": [[str, float]],  # logit lens of W_dec
        "image": [[float]] | null}]}       # e.g. a decoder direction reshaped to 8x8

Token shading is relative to the feature's `max_act`; spaces show as "·", newlines as "↵",
and hovering a token shows its activation. The list renders 100 rows at a time, and only the
selected feature's panel is built, so 10,000+ features load in a moment. Floats are stored
with 4 significant digits and non-finite values become null (JSON has no NaN).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from html import escape
from pathlib import Path

from saectl.errors import NotFoundError, SaectlError
from saectl.store import atomic_write

INDEX = "index.html"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless Chromium without a sandbox, GPU, first-run UI or any network chatter.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars", "--mute-audio")
SIG_DIGITS = 4
_FLOAT_FORMAT = f".{SIG_DIGITS}g"


def _clean(x):
    """JSON-ready copy: numpy values to Python, floats to `SIG_DIGITS` significant digits
    (a quarter smaller a file), NaN and inf to None. Dispatches on exact types first: this
    walk is most of the time it takes to write a page (about 1.5 us a value)."""
    t = type(x)
    if t is str or t is int or t is bool or x is None:
        return x
    if t is float or isinstance(x, float):
        return float(format(x, _FLOAT_FORMAT)) if x - x == 0 else None  # inf - inf is nan
    if t is dict or isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if t is list or isinstance(x, (list, tuple)):
        out = []
        append = out.append
        for v in x:  # inlined for the long lists of tokens and activations
            tv = type(v)
            if tv is float:
                append(float(format(v, _FLOAT_FORMAT)) if v - v == 0 else None)
            elif tv is str or tv is int or v is None:
                append(v)
            else:
                append(_clean(v))
        return out
    if isinstance(x, (str, int)):  # subclasses (numpy's bool_ and ints go through tolist)
        return x
    if hasattr(x, "tolist"):  # numpy arrays and scalars, torch tensors
        return _clean(x.tolist())
    raise TypeError(f"dashboard data holds a {type(x).__name__}, which JSON cannot carry")


def embed_json(data) -> str:
    """JSON safe inside `<script>`: `<`, `>`, `&` are written as \\u escapes, so a token like
    `</script>` or `<!--` cannot end or alter the script element; JSON.parse reads them back."""
    text = json.dumps(_clean(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render(data: dict) -> str:
    """The page as a string."""
    if not isinstance(data.get("features"), list):
        raise TypeError("dashboard data needs a 'features' list")
    title = escape(str(data.get("title") or "saectl features"))
    return (_TEMPLATE.replace("__TITLE__", title).replace("__DATA__", embed_json(data)))


def write_dashboard(path: Path, data: dict) -> Path:
    """Write the dashboard atomically to `path` (an existing folder gets `index.html` inside);
    returns the file written."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX
    atomic_write(path, render(data).encode("utf-8"))
    return path


def find_chromium() -> str | None:
    """The path of a Chromium-family browser on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 900,
               timeout: float = 90.0, feature: int | None = None) -> Path:
    """Render the page `html` in headless Chromium and save a `width`x`height` PNG of it
    (after the page's scripts ran: Chromium shoots once the load event has fired), showing
    `feature`'s panel if given."""
    exe = find_chromium()
    if exe is None:
        raise NotFoundError("chromium is not installed (apt-get install chromium); "
                            "it is needed to take a screenshot of the dashboard")
    html, png = Path(html).absolute(), Path(png).absolute()
    if not html.is_file():
        raise NotFoundError(f"no page at {html}; write it first with write_dashboard")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="saectl-chromium-",
                                     ignore_cleanup_errors=True) as profile:
        tmp = png.with_name(f".{png.name}.tmp.png")
        tmp.unlink(missing_ok=True)
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={tmp}",
               f"--window-size={width},{height}",
               html.as_uri() + ("" if feature is None else f"#f={feature}")]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            tmp.unlink(missing_ok=True)
            raise SaectlError(f"chromium took over {timeout:.0f}s to screenshot {html}; "
                              "try again on a less busy machine") from None
        if not tmp.is_file() or tmp.stat().st_size == 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise SaectlError(f"chromium wrote no screenshot of {html} "
                              f"(exit {proc.returncode}: {tail})")
        os.replace(tmp, png)
    return png


def open_in_browser(path: Path) -> bool:
    """Open the page where a graphical browser can exist; False (and nothing opened) on a
    headless machine, where a text browser would take over the terminal."""
    if not (sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY")
            or os.environ.get("WAYLAND_DISPLAY")):
        return False
    import webbrowser

    return webbrowser.open(Path(path).absolute().as_uri())


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>__TITLE__</title>
<style>
*{box-sizing:border-box}
body{margin:0;height:100vh;display:flex;flex-direction:column;color:#1d2330;background:#f4f5f7;
 font:13px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif}
header{padding:8px 16px;background:#1d2330;color:#fff}
header h1{font-size:16px;margin:0 0 4px}
.meta span{display:inline-block;margin:0 12px 0 0;color:#c9d1e0}.meta b{color:#fff;font-weight:600}
main{display:grid;grid-template-columns:minmax(340px,36%) 1fr;flex:1;min-height:0}
#side{display:flex;flex-direction:column;border-right:1px solid #d5d9e0;background:#fff;min-height:0}
.controls{padding:8px;display:flex;gap:6px;flex-wrap:wrap;align-items:center;border-bottom:1px solid #e3e6eb}
.controls input{font:inherit;padding:3px 6px;border:1px solid #c3c8d1;border-radius:4px}
#q{flex:1 1 120px;min-width:0}.controls input[type=number]{width:64px}
#count{padding:4px 8px;color:#5b6475;font-size:12px}
#listwrap{overflow:auto;flex:1;min-height:0}
table{border-collapse:collapse;width:100%}
th{position:sticky;top:0;background:#eef0f4;text-align:left;padding:4px 6px;cursor:pointer;
 user-select:none;white-space:nowrap;font-weight:600}
th.on::after{content:attr(data-dir);color:#c05a00}
td{padding:3px 6px;border-top:1px solid #eef0f4;white-space:nowrap}
td.x{color:#3a4252;width:100%;max-width:0;overflow:hidden;text-overflow:ellipsis}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.row{cursor:pointer}tr.row:hover{background:#f6f0e6}tr.sel{background:#ffe6c7}
#more{margin:8px;font:inherit}
#panel{overflow:auto;padding:12px 18px;min-height:0}
h2{margin:0 0 4px;font-size:18px}h3{font-size:13px;margin:14px 0 4px;color:#485064;text-transform:uppercase;letter-spacing:.04em}
.expl{font-size:15px;margin:2px 0 6px}.muted{color:#8a92a3}
.stats{display:flex;gap:18px;flex-wrap:wrap;margin-bottom:8px}.stats div b{display:block;font-size:15px;color:#1d2330}
.cards{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}
.card{background:#fff;border:1px solid #e0e3e8;border-radius:6px;padding:8px 10px}
.lens{display:flex;gap:18px;align-items:flex-start}.ll{display:grid;grid-template-columns:auto auto;gap:1px 10px;font-variant-numeric:tabular-nums}
.pos{color:#1f7a3a}.neg{color:#b3261e}
.ex{background:#fff;border:1px solid #e6e8ec;border-radius:4px;padding:3px 6px;margin:3px 0;
 font:12px/1.9 ui-monospace,Menlo,Consolas,monospace}
.ex .mx{display:inline-block;min-width:48px;color:#8a92a3}
.tok{display:inline-block;white-space:pre;border-radius:2px;padding:0 1px}
.tok .ws{color:#a0a7b4}
.img{display:grid;gap:1px;background:#ddd;border:1px solid #ddd}.img div{width:14px;height:14px}
svg text{font-size:10px;fill:#5b6475}
</style></head><body>
<header><h1>__TITLE__</h1><div class="meta" id="meta"></div></header>
<main><section id="side">
<div class="controls"><input id="q" type="search" placeholder="filter: text or #index">
<label>density ≥ <input id="dmin" type="number" step="any" min="0" placeholder="0"></label>
<label>≤ <input id="dmax" type="number" step="any" min="0" placeholder="1"></label></div>
<div id="count"></div>
<div id="listwrap"><table><thead><tr>
<th data-k="index">#</th><th data-k="density">density</th><th data-k="max_act">max act</th>
<th data-k="score">score</th><th>explanation</th></tr></thead><tbody id="rows"></tbody></table>
<button id="more">show more</button></div></section>
<section id="panel"></section></main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const F = D.features || [];
const byIndex = new Map(F.map((f, i) => [String(f.index), i]));
const PAGE = 100;
let view = [], shown = PAGE, sortKey = "index", sortDir = 1, current = null;
const $ = id => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function num(x, d) {
  if (x === null || x === undefined) return "—";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e4 || a < 1e-3) return x.toExponential(d === undefined ? 2 : d);
  return x.toPrecision(d === undefined ? 3 : d + 1).replace(/\.?0+$/, "");
}
function dens(x) {
  if (x === null || x === undefined) return "—";
  return x === 0 ? "0" : x < 1e-3 ? x.toExponential(1) : (100 * x).toPrecision(3) + "%";
}
function showText(s) { return String(s).replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→"); }
function tokenNode(tok, act, mx) {
  const span = el("span", "tok");
  for (const part of String(tok).split(/([ \n\t])/)) {
    if (!part) continue;
    if (part === " " || part === "\n" || part === "\t") span.appendChild(el("span", "ws", showText(part)));
    else span.appendChild(document.createTextNode(part));
  }
  const a = mx > 0 && act > 0 ? Math.min(1, act / mx) : 0;
  if (a > 0) span.style.background = "rgba(255,140,0," + a.toFixed(3) + ")";
  span.title = "activation " + (act === null || act === undefined ? "—" : act);
  return span;
}
function example(ex, mx) {
  const div = el("div", "ex");
  const acts = ex.acts || [];
  div.appendChild(el("span", "mx", num(Math.max(0, ...acts.map(a => a || 0)))));
  (ex.tokens || []).forEach((t, i) => div.appendChild(tokenNode(t, acts[i], mx)));
  return div;
}
function histogram(h) {
  const NS = "http://www.w3.org/2000/svg", W = 420, H = 130, B = 18, L = 34;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("width", W); svg.setAttribute("height", H);
  const c = h.counts || [], e = h.edges || [], top = Math.max(1, ...c);
  const bw = (W - L) / Math.max(1, c.length);
  const t = (x, y, s, anchor) => {
    const n = document.createElementNS(NS, "text");
    n.setAttribute("x", x); n.setAttribute("y", y); n.setAttribute("text-anchor", anchor || "middle");
    n.textContent = s; svg.appendChild(n);
  };
  c.forEach((v, i) => {
    const r = document.createElementNS(NS, "rect"), hh = (H - B - 6) * v / top;
    r.setAttribute("x", L + i * bw); r.setAttribute("width", Math.max(1, bw - 1));
    r.setAttribute("y", H - B - hh); r.setAttribute("height", hh); r.setAttribute("fill", "#e8892b");
    const tt = document.createElementNS(NS, "title");
    tt.textContent = `[${num(e[i])}, ${num(e[i + 1])}): ${v}`; r.appendChild(tt); svg.appendChild(r);
  });
  if (e.length) {
    t(L, H - 5, num(e[0]), "start"); t(W, H - 5, num(e[e.length - 1]), "end");
    t(L + (W - L) / 2, H - 5, h.label || "log₁₀ activation");
  }
  t(L - 4, 10, top.toLocaleString(), "end"); t(L - 4, H - B, "0", "end");
  return svg;
}
function logits(f) {
  const wrap = el("div", "lens");
  for (const [title, rows, cls] of [["promoted", f.logits_pos, "pos"], ["suppressed", f.logits_neg, "neg"]]) {
    if (!rows || !rows.length) continue;
    const g = el("div", "ll");
    g.appendChild(el("span", "muted", title)); g.appendChild(el("span"));
    for (const [tok, v] of rows) {
      g.appendChild(el("span", "tok " + cls, showText(tok))); g.appendChild(el("span", cls, num(v)));
    }
    wrap.appendChild(g);
  }
  return wrap;
}
function image(m) {
  const g = el("div", "img"), mx = Math.max(1e-12, ...m.flat().map(v => Math.abs(v || 0)));
  g.style.gridTemplateColumns = `repeat(${m[0] ? m[0].length : 1}, 14px)`;
  for (const row of m) for (const v of row) {
    const c = el("div"), a = Math.min(1, Math.abs(v || 0) / mx);
    c.style.background = (v || 0) >= 0 ? `rgba(214,64,36,${a.toFixed(3)})` : `rgba(40,96,214,${a.toFixed(3)})`;
    c.title = String(v); g.appendChild(c);
  }
  return g;
}
function panel(i) {
  const f = F[i], p = $("panel");
  current = i; p.replaceChildren();
  const card = el("div", "feature"); card.id = "feature-" + f.index;
  card.appendChild(el("h2", null, "Feature " + f.index));
  card.appendChild(el("div", "expl" + (f.explanation ? "" : " muted"), f.explanation || "no explanation"));
  const st = el("div", "stats");
  const stat = (k, v) => { const d = el("div", "muted", k); d.appendChild(el("b", null, v)); st.appendChild(d); };
  stat("score", num(f.score)); stat("control score", num(f.control_score));
  stat("density", dens(f.density)); stat("max act", num(f.max_act)); stat("mean act", num(f.mean_act));
  card.appendChild(st);
  const cards = el("div", "cards");
  const box = (title, child) => {
    const c = el("div", "card"); c.appendChild(el("div", "muted", title)); c.appendChild(child);
    cards.appendChild(c);
  };
  if (f.hist && f.hist.counts && f.hist.counts.length) box("activation histogram", histogram(f.hist));
  if ((f.logits_pos || []).length || (f.logits_neg || []).length) box("logit lens", logits(f));
  if (f.image && f.image.length) box("decoder image", image(f.image));
  card.appendChild(cards);
  const mx = f.max_act || Math.max(0, ...(f.top || []).flatMap(e => e.acts || []));
  if (f.top && f.top.length) {
    card.appendChild(el("h3", null, "top activations"));
    for (const ex of f.top) card.appendChild(example(ex, mx));
  }
  for (const q of f.quantiles || []) {
    card.appendChild(el("h3", null, q.label || "quantile"));
    for (const ex of q.examples || []) card.appendChild(example(ex, mx));
  }
  p.appendChild(card); p.scrollTop = 0;
  document.querySelectorAll("tr.sel").forEach(r => r.classList.remove("sel"));
  const row = document.querySelector(`tr[data-i="${i}"]`); if (row) row.classList.add("sel");
}
function cmp(a, b) {
  const x = F[a][sortKey], y = F[b][sortKey];
  const nx = x === null || x === undefined, ny = y === null || y === undefined;
  if (nx || ny) return nx === ny ? F[a].index - F[b].index : nx ? 1 : -1;
  return x < y ? -sortDir : x > y ? sortDir : F[a].index - F[b].index;
}
function refresh() {
  const q = $("q").value.trim().toLowerCase().replace(/^#/, "");
  const lo = parseFloat($("dmin").value), hi = parseFloat($("dmax").value);
  view = [];
  F.forEach((f, i) => {
    if (!isNaN(lo) && !(f.density >= lo)) return;
    if (!isNaN(hi) && !(f.density <= hi)) return;
    if (q && String(f.index) !== q && !(f.explanation || "").toLowerCase().includes(q)) return;
    view.push(i);
  });
  view.sort(cmp); shown = PAGE; rows();
}
function rows() {
  const body = $("rows"); body.replaceChildren();
  for (const i of view.slice(0, shown)) {
    const f = F[i], tr = el("tr", "row" + (i === current ? " sel" : ""));
    tr.dataset.i = i;
    tr.appendChild(el("td", "n", f.index)); tr.appendChild(el("td", "n", dens(f.density)));
    tr.appendChild(el("td", "n", num(f.max_act))); tr.appendChild(el("td", "n", num(f.score)));
    const x = el("td", "x", f.explanation || ""); x.title = f.explanation || ""; tr.appendChild(x);
    body.appendChild(tr);
  }
  const n = x => x.toLocaleString();
  $("count").textContent = `${n(Math.min(shown, view.length))} shown of ${n(view.length)} ` +
    `matching (${n(F.length)} features)`;
  $("more").style.display = view.length > shown ? "" : "none";
  document.querySelectorAll("th[data-k]").forEach(th => {
    th.classList.toggle("on", th.dataset.k === sortKey); th.dataset.dir = sortDir > 0 ? " ▲" : " ▼";
  });
}
function fromHash() {
  const m = /f=([^&]+)/.exec(location.hash);
  const i = m ? byIndex.get(decodeURIComponent(m[1])) : undefined;
  if (i !== undefined) panel(i); else if (current === null && F.length) panel(0);
}
const meta = $("meta");
for (const [k, v] of Object.entries(D.meta || {})) {
  const s = el("span", null, k + ": ");
  s.appendChild(el("b", null, typeof v === "number" ? v.toLocaleString()
                              : typeof v === "object" ? JSON.stringify(v) : v));
  meta.appendChild(s);
}
$("rows").addEventListener("click", ev => {
  const tr = ev.target.closest("tr.row");
  if (tr) location.hash = "f=" + encodeURIComponent(F[+tr.dataset.i].index);
});
document.querySelectorAll("th[data-k]").forEach(th => th.addEventListener("click", () => {
  const k = th.dataset.k;
  if (k === sortKey) sortDir = -sortDir; else { sortKey = k; sortDir = k === "index" ? 1 : -1; }
  view.sort(cmp); rows();
}));
for (const id of ["q", "dmin", "dmax"]) $(id).addEventListener("input", refresh);
$("more").addEventListener("click", () => { shown += PAGE; rows(); });
window.addEventListener("hashchange", fromHash);
refresh(); fromHash();
if (!F.length) $("panel").appendChild(el("p", "muted", "no features"));
</script></body></html>
"""
