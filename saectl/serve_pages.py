"""The HTML of `saectl serve`'s pages, built with `html.escape` (no template engine to
install): the shared frame, the store's artifacts, one artifact with its lineage and report,
and the activation-testing and steering pages, whose small scripts post a request and poll
its job (`saectl.serve_work`)."""

from __future__ import annotations

import csv
import io
from html import escape
from urllib.parse import quote

STYLE = """*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,sans-serif;color:#1d2330;
background:#f4f5f7}header{background:#1d2330;color:#fff;padding:8px 16px}header a{color:#fff;
margin-right:16px;text-decoration:none}main{padding:14px 18px;max-width:1400px}
table{border-collapse:collapse;background:#fff}td,th{padding:3px 8px;border-top:1px solid
#e3e6eb;text-align:left;white-space:nowrap;font-variant-numeric:tabular-nums}
th{background:#eef0f4;cursor:pointer}.muted{color:#8a92a3}.err{background:#fde8e6;
border:1px solid #e4a19a;padding:8px 12px;border-radius:4px}.card{background:#fff;border:1px
solid #e0e3e8;border-radius:6px;padding:10px 12px;margin:10px 0}textarea,input,select{font:inherit;
padding:4px 6px}textarea{width:100%;height:90px}.tok{white-space:pre;border-radius:2px;
padding:0 1px;cursor:pointer}.cols{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px}
img{max-width:100%;background:#fff}#status{color:#5b6475;margin:6px 0}"""


def frame(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(title)}"
            f"</title><link rel=icon href='data:,'><style>{STYLE}</style></head><body>"
            f"<header><a href='/'><b>saectl serve</b></a><a href='/'>artifacts</a>"
            f"<span class=muted>{escape(title)}</span></header><main>{body}</main>"
            f"</body></html>")


def error(title: str, message: str) -> str:
    return frame(title, f"<h2>{escape(title)}</h2><p class=err id=error>{escape(message)}</p>"
                        "<p><a href='/'>back to the artifacts</a></p>")


def link(ref: str, text: str | None = None) -> str:
    return f"<a href='/a/{quote(ref)}'>{escape(text or ref[:24])}</a>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return escape(str(v)[:120])
    return escape("" if v is None else str(v))


def artifact_list(root: str, rows: list[dict]) -> str:
    """rows: ref, stage, state, created, figures (a short summary)."""
    body = [f"<h2>Artifacts in {escape(root)}</h2>",
            ("<table id=artifacts><tr><th>ref</th><th>stage</th><th>state</th><th>created</th>"
            "<th>summary</th></tr>")]
    for r in rows:
        body.append(f"<tr><td>{link(r['ref'])}</td><td>{escape(r['stage'])}</td>"
                    f"<td>{escape(r['state'])}</td><td>{escape(r['created'])}</td>"
                    f"<td class=muted>{escape(r['figures'])}</td></tr>")
    body.append("</table>")
    if not rows:
        body.append("<p class=muted>The store is empty: run a stage first (saectl harvest ...)."
                    "</p>")
    return frame("artifacts", "".join(body))


def artifact(ref: str, manifest: dict, state: str, used_by: list[str], actions: list[tuple],
             report: list[str], table: str | None) -> str:
    """One artifact: its actions (dashboard, test, steer), inputs and consumers (lineage),
    summary, params, and its report's figures and table."""
    b = [(f"<h2>{escape(ref)}</h2><p>state: <b id=state>{escape(state)}</b> · created "
         f"{escape(str(manifest.get('created', '')))}</p>")]
    if actions:
        b.append("<p id=actions>" + " · ".join(f"<a href='{escape(u)}'>{escape(t)}</a>"
                                               for t, u in actions) + "</p>")
    ins = manifest.get("inputs") or {}
    b.append("<div class=card id=lineage><b>lineage</b><br>inputs: " + (", ".join(
        f"{escape(k)} {link(v)}" for k, v in ins.items()) or "none") + "<br>used by: " +
        (", ".join(link(u) for u in used_by) or "none") + "</div>")
    for title, key in (("summary", "summary"), ("params", "params")):
        d = manifest.get(key) or {}
        b.append(f"<div class=card><b>{title}</b><table>" + "".join(
            f"<tr><td>{escape(str(k))}</td><td>{_cell(v)}</td></tr>" for k, v in d.items())
            + "</table></div>")
    if table:
        b.append(f"<div class=card><b>table</b>{table}</div>")
    for name in report:
        if name.endswith(".png"):
            b.append(f"<div class=card><b>{escape(name)}</b><br><img alt='{escape(name)}' "
                     f"src='/a/{quote(ref)}/report/{quote(name)}'></div>")
    return frame(ref[:30], "".join(b))


def csv_table(text: str, max_rows: int = 2000) -> str:
    """A CSV file (a sweep's table.csv) as an HTML table whose headers sort it."""
    rows = list(csv.reader(io.StringIO(text)))[:max_rows + 1]
    if not rows:
        return "<p class=muted>empty table</p>"
    head = "".join(f"<th>{escape(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return (f"<table id=table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            "<script>document.querySelectorAll('#table th').forEach((th, i) => th.onclick = () => {"
            "const tb = document.querySelector('#table tbody'), rows = [...tb.rows];"
            "const d = th.dataset.d = th.dataset.d === '1' ? '-1' : '1';"
            "const v = r => { const t = r.cells[i].textContent, x = parseFloat(t);"
            " return isNaN(x) ? t : x; };"
            "rows.sort((a, b) => (v(a) > v(b) ? 1 : v(a) < v(b) ? -1 : 0) * d);"
            "rows.forEach(r => tb.appendChild(r)); });</script>")


_POLL = """
async function run(url, body, show) {
  const status = document.getElementById('status'), out = document.getElementById('out');
  out.replaceChildren(); status.textContent = 'sending...';
  let r = await fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json'},
                            body: JSON.stringify(body)});
  let job = await r.json();
  while (job.state === 'queued' || job.state === 'running') {
    status.textContent = job.progress + ' (' + job.seconds + ' s)';
    await new Promise(res => setTimeout(res, 300));
    job = await (await fetch('/api/jobs/' + job.id)).json();
  }
  if (job.state === 'error' || job.error) {
    status.textContent = '';
    const p = document.createElement('p'); p.className = 'err'; p.id = 'error';
    p.textContent = job.error; out.appendChild(p); return;
  }
  status.textContent = 'done in ' + job.seconds + ' s'; show(job.result, out);
}
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
function fmt(x) { return x === null || x === undefined ? '—' : Math.abs(x) >= 1e4 || (x && Math.abs(x) < 1e-3) ? x.toExponential(2) : (+x.toPrecision(3)).toString(); }
"""


def activation_test(ref: str, dashboard: str | None, explanations: dict) -> str:
    dash = f"'{dashboard}'" if dashboard else "null"
    script = _POLL + f"""
const EXPL = {_js(explanations)}, DASH = {dash};
function latent(f, v) {{
  const a = el(DASH ? 'a' : 'span', 'lat', '#' + f + ' ' + fmt(v));
  if (DASH) a.href = DASH + '#f=' + f;
  a.title = EXPL[f] || ''; return a;
}}
function show(res, out) {{
  const text = el('div', 'card text'); text.id = 'tokens';
  const mx = Math.max(1e-9, ...res.tokens.flatMap(t => t.top.map(p => p[1])));
  const detail = el('div', 'card'); detail.id = 'detail';
  res.tokens.forEach((t, i) => {{
    const s = el('span', 'tok', t.token), top = t.top[0];
    if (top) s.style.background = 'rgba(255,140,0,' + (top[1] / mx).toFixed(3) + ')';
    s.onclick = () => {{ detail.replaceChildren(el('b', null, JSON.stringify(t.token) + ': '));
      t.top.forEach(p => {{ detail.appendChild(latent(p[0], p[1])); detail.appendChild(el('span', null, '  ')); }});
      if (!t.top.length) detail.appendChild(el('span', 'muted', 'no latent fires')); }};
    text.appendChild(s);
  }});
  out.appendChild(text); out.appendChild(detail);
  const tbl = el('table'); tbl.id = 'per-token';
  tbl.appendChild(el('tr')).append(el('th', null, 'token'), el('th', null, 'top latents (activation)'));
  res.tokens.forEach(t => {{ const tr = el('tr'), td = el('td');
    t.top.forEach(p => {{ td.appendChild(latent(p[0], p[1])); td.appendChild(el('span', null, ' ')); }});
    tr.append(el('td', 'text', JSON.stringify(t.token)), td); tbl.appendChild(tr); }});
  const o = el('div', 'card'); o.appendChild(el('b', null, 'strongest over the text: '));
  res.overall.forEach(p => {{ o.appendChild(latent(p[0], p[1])); o.appendChild(el('span', 'muted', ' (' + (EXPL[p[0]] || 'token ' + p[2]) + ')  ')); }});
  out.appendChild(o); out.appendChild(tbl);
}}
document.getElementById('go').onclick = () => run('/api/activations', {{sae: {_js(ref)},
  text: document.getElementById('text').value, k: 5}}, show);
"""
    body = (f"<h2>Activation test · {link(ref)}</h2><p class=muted>Paste a text: each token "
            "shaded by its strongest latent; click a token for its top latents.</p>"
            "<textarea id=text>The Eiffel Tower is in Paris, the capital of France.</textarea>"
            "<p><button id=go>run</button></p><div id=status></div><div id=out></div>"
            f"<script>{script}</script>")
    return frame("activation test", body)


def steering(ref: str, feature: str, has_units: bool) -> str:
    script = _POLL + f"""
function show(res, out) {{
  const cols = el('div', 'cols');
  for (const [title, key] of [['baseline', 'baseline'], ['steered', 'steered']]) {{
    const c = el('div', 'card'); c.appendChild(el('b', null, title));
    const t = el('div', 'text', res.prompt); t.id = key;
    const s = el('span', null, res[key]); s.style.background = key === 'steered' ? '#ffe6c7' : '#e6eefc';
    t.appendChild(s); c.appendChild(t); cols.appendChild(c);
  }}
  out.appendChild(cols);
  const tbl = el('table'); tbl.id = 'figures';
  tbl.appendChild(el('tr')).append(...['feature', 'strength', 'raw', 'act base', 'act steered', 'Δlogp', 'promotes'].map(h => el('th', null, h)));
  const b = res.baseline_figures, s = res.steered_figures;
  for (const f of res.features) {{
    const tr = el('tr');
    tr.append(el('td', null, '#' + f.feature), el('td', null, fmt(f.strength)), el('td', null, fmt(f.raw)),
      el('td', null, fmt(b.act[f.feature])), el('td', null, fmt(s.act[f.feature])),
      el('td', null, fmt(s.dlogp[f.feature])), el('td', 'text', f.logit_lens.slice(0, 5).join(' | ')));
    tbl.appendChild(tr);
  }}
  const figs = el('p', null, 'KL ' + fmt(s.kl) + ' nats/token · perplexity ' + fmt(b.ppl) + ' → ' + fmt(s.ppl) + ' · ' + s.tokens + ' tokens');
  figs.id = 'effect'; out.append(tbl, figs);
}}
document.getElementById('go').onclick = () => run('/api/steer', {{sae: {_js(ref)},
  prompt: document.getElementById('prompt').value, features: document.getElementById('features').value,
  mode: document.getElementById('mode').value, max_new_tokens: +document.getElementById('n').value,
  units: document.getElementById('units').value}}, show);
"""
    units = ("<option value=max_act>× max activation</option>" if has_units else "")
    body = (f"<h2>Steering · {link(ref)}</h2><p class=muted>Continues the prompt without and "
            "with the features pushed at the SAE's hook (saectl steer's code): act is the "
            "feature's mean activation on the text read back, Δlogp the change in log-prob of "
            "its logit-lens tokens, KL the next-token divergence, perplexity the fluency.</p>"
            "<p><input id=prompt size=60 value='The history of the city'> features "
            f"<input id=features size=16 value='{escape(feature)}' placeholder='12:8, 40:-4'> "
            "<select id=mode><option>add</option><option>clamp</option><option>ablate</option>"
            f"</select> <select id=units><option value=raw>raw units</option>{units}</select> "
            "new tokens <input id=n type=number value=24 min=1 max=128 style='width:60px'> "
            "<button id=go>steer</button></p><div id=status></div><div id=out></div>"
            f"<script>{script}</script>")
    return frame("steering", body)


def _js(x) -> str:
    """A value as a JavaScript literal inside a <script>."""
    import json

    return (json.dumps(x, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))
