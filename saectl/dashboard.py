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
selected feature's panel is built, so 10,000+ features load in a moment. Floats are stored
with 4 significant digits and non-finite values become null (JSON has no NaN).

`feature_rows` assembles the features from what the interpret stage keeps (its statistics,
example windows, explanations and logit lens); `decoder_images` draws decoder directions as
images (`report/decoder.png`) when the activations are images. The page's HTML and script are
package data, `templates/dashboard.html`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import webbrowser
from functools import cache
from html import escape
from importlib import resources
from pathlib import Path

import numpy as np

from saectl import layout
from saectl.errors import NotFoundError, SaectlError
from saectl.examples import Kind, Windows
from saectl.store import atomic_write

INDEX = layout.DASHBOARD
TEMPLATE = "templates/dashboard.html"
TITLE_MARKER, DATA_MARKER = "__TITLE__", "__DATA__"
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


@cache
def template() -> str:
    """The page around the data: `templates/dashboard.html`, package data of saectl."""
    return resources.files("saectl").joinpath(TEMPLATE).read_text(encoding="utf-8")


def render(data: dict) -> str:
    """The page as a string. The data goes in at the template's one `__DATA__`, the title
    into the part before it only, so neither is searched for the other's marker (a title
    holding `__DATA__` stays a title)."""
    if not isinstance(data.get("features"), list):
        raise TypeError("dashboard data needs a 'features' list")
    head, marker, tail = template().partition(DATA_MARKER)
    if not marker or DATA_MARKER in tail or TITLE_MARKER in tail:
        raise RuntimeError(f"{TEMPLATE} needs one {DATA_MARKER}, after every {TITLE_MARKER}")
    title = escape(str(data.get("title") or "saectl features"))
    return head.replace(TITLE_MARKER, title) + embed_json(data) + tail


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
    return webbrowser.open(Path(path).absolute().as_uri())


def _example(ex) -> dict:
    return {"tokens": ex.tokens, "acts": ex.acts}


def feature_rows(stats, hist_edges: np.ndarray, windows: Windows, strings: dict | None, *,
                 quantiles: int, explained: dict[int, dict], lens: dict | None,
                 images: np.ndarray | None) -> list[dict]:
    """One row of the data model per scanned feature. `stats` is the scan's `Stats`;
    `explained` maps a slot to its explanation entry; `images` is (n_features, H, W)."""
    fired, n = stats.fired, max(stats.n_tokens, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(fired > 0, stats.act_sum / np.maximum(fired, 1), np.nan)
    rows = []
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
        rows.append(row)
    return rows


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
