"""Feature dashboards that scale to real SAEs (65k+ latents), opened straight from disk.

No server, no CDN, no external URL (machines are offline). Neuronpedia's and SAEDashboard's
feature pages, laid out as files so a page opens at once whatever the width:

    report/index.html          the page, with the feature *list* inside it as columns (index,
                               density, max activation, scores, explanation): ~40 bytes a feature
    report/features/NNNNN.js   the full rows of SHARD features each (examples, histogram, logit
                               lens), loaded by a <script> tag when a feature is opened
    report/tokens/NN.js        the token index, TOKEN_SHARDS files by a hash of the token: which
                               latents fire most on a token, and which promote it (logit lens)

The detail files are JSONP (`saectlShard(n, [...])`, `saectlTokens(n, {...})`), not JSON read by
fetch(): Chromium blocks fetch() and XHR on file:// pages, but not a <script src> beside the
page. `saectl serve` serves the same folder over HTTP. A Content-Security-Policy allows scripts
from the page's own folder only, and no fetch at all.

Data model (what the interpret stage writes; every field except `index` may be null/absent):

    {"title": str,
     "meta": {"sae": ref, "hook": str, "model": str, "n_tokens": int, ...},  # any key: value
     "features": [{                        # a list, or any iterable (streamed, shard by shard)
        "index": int,                      # latent number in the SAE
        "density": float,                  # firing rate, fraction of tokens with act > 0
        "max_act": float, "mean_act": float,   # mean over the tokens where it fired
        "score": float|null, "control_score": float|null,   # detection score, and control
        "fuzz_score": float|null, "fuzz_control_score": float|null,  # fuzzing's (if it ran)
        "explanation": str|null,
        "top": [{"tokens": [str], "acts": [float]}],          # top-activating contexts
        "quantiles": [{"label": str, "examples": [{"tokens": [...], "acts": [...]}]}],
        "hist": {"edges": [float], "counts": [int], "label": str},  # len(edges) = len(counts)+1;
                                           # edges in log10(activation) unless `label` says
        "logits_pos": [[str, float]], "logits_neg": [[str, float]],  # logit lens of W_dec
        "image": [[float]] | null}]}       # e.g. a decoder direction reshaped to 8x8

Token shading is relative to the feature's `max_act`; spaces show as "·", newlines as "↵",
and hovering a token shows its activation. The list renders 100 rows at a time, and only the
selected feature's panel is built. Floats are stored with 4 significant digits and non-finite
values become null (JSON has no NaN). `read_dashboard` reads the files back into the data model.

`feature_rows` assembles the features from what the interpret stage keeps (its statistics,
example windows, explanations and logit lens), one at a time; `decoder_images` draws decoder
directions as images (`report/decoder.png`) when the activations are images. The page's HTML
and script are package data, `templates/dashboard.html`.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator
from functools import cache
from html import escape
from importlib import resources
from pathlib import Path

import numpy as np

from saectl import layout
from saectl.browser import CHROMIUM_FLAGS, find_chromium, open_in_browser, screenshot  # noqa: F401
from saectl.examples import Kind, Windows
from saectl.store import atomic_write

INDEX = layout.DASHBOARD
TEMPLATE = "templates/dashboard.html"
TITLE_MARKER, DATA_MARKER = "__TITLE__", "__DATA__"
FEATURE_DIR, TOKEN_DIR = "features", "tokens"
SHARD = 32
"""Features per detail file: one file opens a feature and its neighbours in the list."""
TOKEN_SHARDS = 64
TOKEN_TOP = 16
"""Latents kept per token, for each of 'fires on' and 'promotes'."""
LIST_KEYS = ("index", "density", "max_act", "score", "fuzz_score", "explanation")
"""The columns of the list inside the page; the rest of a row is in its detail file."""
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


_POW10 = 10.0 ** np.arange(-30, 31)


def _round_array(a: np.ndarray) -> list:
    """Floats to `SIG_DIGITS` significant digits at numpy's speed (the per-value walk of
    `_clean` costs ~1.5 us a float, and a feature's examples hold thousands), non-finite to
    None. Rounds by an exact power of ten on the side that keeps the result the nearest
    double, so each prints as `format(v, ".4g")` does (below 1e-26 it gives 0)."""
    finite = np.isfinite(a)
    mag = np.zeros(len(a))
    nz = finite & (a != 0)
    mag[nz] = np.floor(np.log10(np.abs(a[nz])))
    e = np.clip(SIG_DIGITS - 1 - mag, -30, 30).astype(np.int64)
    p = _POW10[np.abs(e) + 30]
    with np.errstate(invalid="ignore", over="ignore"):
        vals = np.where(e >= 0, np.round(a * p) / p, np.round(a / p) * p).tolist()
    if not finite.all():
        vals = [v if ok else None for v, ok in zip(vals, finite.tolist())]
    return vals


def _clean_row(row: dict) -> dict:
    """`_clean(row)`, with the activations of all its examples rounded as one array."""
    examples = list(row.get("top") or []) + [
        ex for q in row.get("quantiles") or [] if isinstance(q, dict)
        for ex in q.get("examples") or []]
    try:
        if not all(isinstance(ex, dict) for ex in examples):
            raise TypeError
        lengths = [len(ex.get("acts") or ()) for ex in examples]
        flat = np.concatenate([np.asarray(ex.get("acts") or (), dtype=np.float64)
                               for ex in examples]) if examples else np.zeros(0)
    except (TypeError, ValueError):  # None or text among the activations: the slow walk
        return _clean(row)
    acts, at = _round_array(flat), 0
    done = {}
    for ex, n in zip(examples, lengths):
        done[id(ex)] = {**{str(k): _clean(v) for k, v in ex.items() if k != "acts"},
                        "acts": acts[at:at + n]}
        at += n
    out = {str(k): _clean(v) for k, v in row.items() if k not in ("top", "quantiles")}
    if "top" in row:
        out["top"] = [done[id(ex)] for ex in row["top"] or []]
    if "quantiles" in row:
        out["quantiles"] = None if row["quantiles"] is None else [
            {**{str(k): _clean(v) for k, v in q.items() if k != "examples"},
             "examples": [done[id(ex)] for ex in q.get("examples") or []]}
            if isinstance(q, dict) else _clean(q) for q in row["quantiles"]]
    return out


def embed_json(data, cleaned: bool = False) -> str:
    """JSON safe inside `<script>`: `<`, `>`, `&` are written as \\u escapes, so a token like
    `</script>` or `<!--` cannot end or alter the script element; JSON.parse reads them back.
    `cleaned`: `data` is already `_clean`'s output."""
    text = json.dumps(data if cleaned else _clean(data), ensure_ascii=False,
                      separators=(",", ":"), allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


@cache
def template() -> str:
    """The page around the data: `templates/dashboard.html`, package data of saectl."""
    return resources.files("saectl").joinpath(TEMPLATE).read_text(encoding="utf-8")


def render(head: dict) -> str:
    """The page as a string, `head` (title, meta, the list's columns) inside it. The data goes
    in at the template's one `__DATA__`, the title into the part before it only, so neither is
    searched for the other's marker (a title holding `__DATA__` stays a title)."""
    before, marker, after = template().partition(DATA_MARKER)
    if not marker or DATA_MARKER in after or TITLE_MARKER in after:
        raise RuntimeError(f"{TEMPLATE} needs one {DATA_MARKER}, after every {TITLE_MARKER}")
    title = escape(str(head.get("title") or "saectl features"))
    return before.replace(TITLE_MARKER, title) + embed_json(head) + after


def token_key(token: str) -> str:
    """What a token search matches: the token without surrounding space, lower case (so
    "world" finds " world" and "World"); a token of only space stays itself."""
    return token.strip().lower() or token


def token_shard(key: str) -> int:
    """The token file of `key`: a 31-multiplier hash of its code points, as the page computes
    it (Math.imul) so Python and JavaScript agree."""
    h = 0
    for ch in key:
        h = (h * 31 + ord(ch)) & 0xFFFFFFFF
    return h % TOKEN_SHARDS


class _TokenIndex:
    """Per token key, the TOKEN_TOP latents with the largest activation on it (over the
    examples shown) and those that promote it most in the logit lens; bounded heaps."""

    def __init__(self):
        self.fire: dict[str, dict[int, float]] = {}
        self.promote: dict[str, list[tuple[float, int]]] = {}

    def add(self, row: dict) -> None:
        f = row["index"]
        for ex in row.get("top") or []:
            acts = [a if isinstance(a, (int, float)) else 0.0 for a in ex.get("acts") or []]
            peak = max(acts, default=0.0)
            for tok, act in zip(ex.get("tokens") or [], acts):
                # the tokens that carry the example: at least half its peak (an SAE latent
                # fires on a few tokens of a window; the rest is context)
                if act > 0 and act >= 0.5 * peak and isinstance(tok, str):
                    seen = self.fire.setdefault(token_key(tok), {})
                    if act > seen.get(f, 0.0):
                        seen[f] = float(act)
        for tok, v in row.get("logits_pos") or []:
            if isinstance(tok, str) and isinstance(v, (int, float)) and math.isfinite(v):
                heap = self.promote.setdefault(token_key(tok), [])
                (heapq.heappush if len(heap) < TOKEN_TOP else heapq.heappushpop)(heap, (v, f))

    def prune(self) -> None:
        """Keep the TOKEN_TOP strongest latents of each token (bounds memory as rows stream)."""
        for k, seen in self.fire.items():
            if len(seen) > 4 * TOKEN_TOP:
                self.fire[k] = dict(heapq.nlargest(TOKEN_TOP, seen.items(), key=lambda t: t[1]))

    def files(self) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for k in set(self.fire) | set(self.promote):
            fire = heapq.nlargest(TOKEN_TOP, self.fire.get(k, {}).items(), key=lambda t: t[1])
            promote = sorted(self.promote.get(k, []), reverse=True)
            out.setdefault(token_shard(k), {})[k] = {
                "fire": [[f, a] for f, a in fire], "promote": [[f, v] for v, f in promote]}
        return out


def _jsonp(path: Path, call: str, n: int, payload) -> int:
    text = f"{call}({n},{embed_json(payload, cleaned=True)});\n".encode()
    path.write_bytes(text)
    return len(text)


def write_dashboard(path: Path, data: dict) -> Path:
    """Write the dashboard to `path` (an existing folder gets `index.html` inside), the detail
    and token files beside it (any left from an earlier write are replaced), the page itself
    last and atomically; returns the page. `data["features"]` may be a generator: rows are
    written SHARD at a time and only the list's columns stay in memory."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX
    rows = data.get("features")
    if not isinstance(rows, Iterable) or isinstance(rows, (str, dict)):
        raise TypeError("dashboard data needs a 'features' list")
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    for sub in (FEATURE_DIR, TOKEN_DIR):
        shutil.rmtree(folder / sub, ignore_errors=True)
        (folder / sub).mkdir()
    cols: dict[str, list] = {k: [] for k in LIST_KEYS}
    tokens, shard, n = _TokenIndex(), [], 0
    fuzz = False
    for row in rows:
        row = _clean_row(row) if isinstance(row, dict) else _clean(row)
        for k in LIST_KEYS:
            cols[k].append(row.get(k))
        fuzz = fuzz or "fuzz_score" in row
        tokens.add(row)
        shard.append(row)
        n += 1
        if len(shard) == SHARD:
            _jsonp(folder / FEATURE_DIR / f"{n // SHARD - 1:05d}.js", "saectlShard",
                   n // SHARD - 1, shard)
            shard = []
            if n % (64 * SHARD) == 0:
                tokens.prune()
    if shard:
        _jsonp(folder / FEATURE_DIR / f"{n // SHARD:05d}.js", "saectlShard", n // SHARD, shard)
    for k, entries in tokens.files().items():
        _jsonp(folder / TOKEN_DIR / f"{k:02d}.js", "saectlTokens", k, entries)
    if not fuzz:
        del cols["fuzz_score"]
    head = {"title": data.get("title"), "meta": data.get("meta") or {}, "list": cols,
            "shard": SHARD, "token_shards": TOKEN_SHARDS, "features_dir": FEATURE_DIR,
            "tokens_dir": TOKEN_DIR}
    atomic_write(path, render(head).encode("utf-8"))
    return path


_JSONP = re.compile(r"^\w+\((\d+),(.*)\);\s*$", re.DOTALL)


def read_jsonp(path: Path):
    """(n, payload) of one detail or token file."""
    m = _JSONP.match(Path(path).read_text(encoding="utf-8"))
    if m is None:
        raise ValueError(f"{path} is not a dashboard data file")
    return int(m.group(1)), json.loads(m.group(2))


def read_head(page: Path) -> dict:
    """The data inside the page: title, meta, the list's columns and where the files are."""
    text = Path(page).read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.DOTALL)
    if m is None:
        raise ValueError(f"{page} holds no dashboard data")
    return json.loads(m.group(1))


def read_dashboard(page: Path) -> dict:
    """The data model back from a page and its files (tests, notebooks): every row whole."""
    head, folder = read_head(page), Path(page).parent
    rows: list[dict] = []
    for f in sorted((folder / head.get("features_dir", FEATURE_DIR)).glob("*.js")):
        rows += read_jsonp(f)[1]
    return {"title": head.get("title"), "meta": head.get("meta"), "features": rows}


def _example(ex) -> dict:
    return {"tokens": ex.tokens, "acts": ex.acts}


def feature_rows(stats, hist_edges: np.ndarray, windows: Windows, strings: dict | None, *,
                 quantiles: int, explained: dict[int, dict], lens: dict | None,
                 images: np.ndarray | None) -> Iterator[dict]:
    """One row of the data model per scanned feature, made as it is asked for (a 65k-latent
    SAE's rows never sit in memory together). `stats` is the scan's `Stats`; `explained` maps a
    slot to its explanation entry; `images` is (n_features, H, W)."""
    fired, n = stats.fired, max(stats.n_tokens, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(fired > 0, stats.act_sum / np.maximum(fired, 1), np.nan)
    for j, f in enumerate(stats.features.tolist()):
        row = {"index": f, "density": fired[j] / n, "max_act": float(stats.max_act[j]),
               "mean_act": float(mean[j])}
        e = explained.get(j, {})
        row.update(explanation=e.get("explanation") or None, score=e.get("balanced_accuracy"),
                   control_score=e.get("control_balanced_accuracy"))
        if "fuzz_balanced_accuracy" in e:  # only where fuzzing ran: the page shows its column
            row.update(fuzz_score=e["fuzz_balanced_accuracy"],
                       fuzz_control_score=e.get("fuzz_control_balanced_accuracy"))
        h = stats.hist[j]
        nz = np.flatnonzero(h)
        if len(nz):
            a, b = nz[0], nz[-1] + 1
            row["hist"] = {"edges": hist_edges[a:b + 1].tolist(), "counts": h[a:b].tolist(),
                           "label": "log10 activation"}
        if j in windows.by_slot:
            row["top"] = [_example(ex) for _, ex in windows.examples(j, Kind.TOP, strings)]
            qs = windows.examples(j, Kind.QUANTILE, strings)
            row["quantiles"] = [
                {"label": f"quantile {q + 1} of {quantiles}",
                 "examples": [_example(ex) for qq, ex in qs if qq == q]}
                for q in range(quantiles) if any(qq == q for qq, _ in qs)]
        if lens is not None:
            for key, ids, vals in (("logits_pos", "pos_ids", "pos_vals"),
                                   ("logits_neg", "neg_ids", "neg_vals")):
                row[key] = [[strings[int(i)], float(v)] for i, v in zip(lens[ids][j],
                                                                        lens[vals][j])]
        if images is not None:
            row["image"] = images[j].tolist()
        yield row


def decoder_images(path: Path, images: np.ndarray, features: np.ndarray, fired: np.ndarray,
                   n_tokens: int, title: str, n_max: int = 64) -> Path:
    """The `n_max` most often firing live features' decoder directions, `images`
    (n_features, H, W), in a square grid: blue negative, red positive, each on its own
    symmetric scale."""
    from saectl.plots import plt, save_figure  # matplotlib, only for image activations

    order = [j for j in np.argsort(-fired, kind="stable") if fired[j] > 0][:n_max]
    cols = max(1, math.ceil(math.sqrt(len(order))))
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.3 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, j in zip(axes.ravel(), order):
        lim = float(np.abs(images[j]).max()) or 1.0
        ax.imshow(images[j], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"#{features[j]} {fired[j] / max(n_tokens, 1):.1%}", fontsize=6)
    fig.suptitle(f"{title}; the {len(order)} most often firing", fontsize=8)
    return save_figure(fig, path)
