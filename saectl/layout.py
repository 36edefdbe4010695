"""Where everything lives inside an artifact: the one owner of those paths
(docs/architecture.md, "Artifact layouts"). Stages ask here; none joins a path inside an
artifact by hand. Each stage's layout, in the artifact's Zarr group:

    harvest, import   acts/<hook>            [tokens, d] activations, in token order
                      tokens                 [n_seq, context] token ids (harvest only)
    shuffle           train/<hook>           [n_train, d] shuffled rows of the train split
                      eval/<hook>            [n_eval, d] eval split, in sequence order
                      eval/sequences         which sequences are in the eval split
                      rows/train, rows/eval  source row of each shuffled row
                      stats/<hook>/...       normalisation statistics
                      outliers/<hook>        [n, 2] (sequence, position) left out as outliers
    train             sae/                   the SAE in SAELens's layout (cfg.json, weights)
                      eval/<hook>, eval/log_density, log/<figure> (the training log),
                      checkpoint.pt (while training)
    sweep             report/table.csv, report/*.png, work/ (executor files)
    eval              eval/log_density       per-latent log10 firing density on the data
                      report/probe_k.png     k-sparse probing accuracy against k
    interpret         features, stats/...    each row's latent; per-feature statistics
                      top/, pool/, lens/     top contexts, the sampled pool, the logit lens
                      windows/...            the example windows (saectl.examples)
                      explanations.json, responses.json, report/index.html, report/decoder.png
    steer             prompt_tokens          [n_prompts, P] prompt ids (-1 pads)
                      baseline/tokens        [n_prompts, n] generated ids (-1 pads)
                      steered/tokens         [n_runs, n_prompts, n] steered ids
                      report/strength_sweep.png  effect against fluency (--strengths)

Files outside Zarr: `progress/<writer>.json` (resume), `scratch/` (shuffle's buckets and norms),
`work/` (executors), `report/` (what a person opens), `sae/` (what other tools load).
"""

from __future__ import annotations

import re
from pathlib import Path

from saectl.errors import ConfigError

# Zarr arrays and groups (keys inside the artifact's group).
ACTS = "acts"
TOKENS = "tokens"
TRAIN = "train"
EVAL = "eval"
EVAL_SEQUENCES = "eval/sequences"
ROWS_TRAIN = "rows/train"
ROWS_EVAL = "rows/eval"
STATS = "stats"
OUTLIERS = "outliers"
LOG_DENSITY = "eval/log_density"
TRAIN_LOG = "log"

# Plain files and folders.
PROGRESS = "progress"
REPORT = "report"
SAE_DIR = "sae"
SCRATCH = "scratch"
WORK = "work"
CHECKPOINT = "checkpoint.pt"
DASHBOARD = "index.html"


def acts(hook: str) -> str:
    return f"{ACTS}/{hook}"


def train_rows(hook: str) -> str:
    return f"{TRAIN}/{hook}"


def eval_rows(hook: str) -> str:
    return f"{EVAL}/{hook}"


def outliers(hook: str) -> str:
    """`outliers/<hook>`: [n, 2] (sequence, position) of the tokens the shuffle left out."""
    return f"{OUTLIERS}/{hook}"


def train_log(figure: str) -> str:
    """`log/<figure>`: one value per logging window of a training run (loss, l0, lr, ...)."""
    return f"{TRAIN_LOG}/{figure}"


def stat(name: str, hook: str | None = None) -> str:
    """`stats/<name>` (interpret's per-feature arrays) or `stats/<hook>/<name>` (shuffle's)."""
    return f"{STATS}/{hook}/{name}" if hook else f"{STATS}/{name}"


def report(art_path: Path, name: str = "") -> Path:
    return art_path / REPORT / name if name else art_path / REPORT


def sae_dir(art_path: Path) -> Path:
    return art_path / SAE_DIR


def work(art_path: Path, *parts: str) -> Path:
    return art_path.joinpath(WORK, *parts)


def scratch(art_path: Path, *parts: str) -> Path:
    return art_path.joinpath(SCRATCH, *parts)


def norms_scratch(art_path: Path, hook: str) -> Path:
    """Shuffle's per-row norms of one hook (float32, row order), while it measures outliers."""
    return scratch(art_path, hook, "norms.f32")


def checkpoint(art_path: Path) -> Path:
    return art_path / CHECKPOINT


def progress_file(art_path: Path, writer: str) -> Path:
    return art_path / PROGRESS / f"{writer}.json"


# Hook names: `site.L` for the named sites, or a raw module path. One spelling per hook, so
# `resid_post.03` and `resid_post.3` give the same address for the same arrays.
_SITE_RE = re.compile(r"^([a-z_]+)\.0*([0-9]+)$")


_RANGE_RE = re.compile(r"^([a-z_]+)\.0*([0-9]+)\.\.0*([0-9]+)$")


def normalize_hook(name: str) -> str:
    """`resid_post.03` → `resid_post.3`, `mlp_in.0..03` → `mlp_in.0..3` (a layer range);
    whitespace trimmed; module paths unchanged."""
    name = name.strip()
    if not name:
        raise ConfigError("an empty hook name; write e.g. resid_post.3")
    if r := _RANGE_RE.match(name):
        return f"{r.group(1)}.{int(r.group(2))}..{int(r.group(3))}"
    m = _SITE_RE.match(name)
    return f"{m.group(1)}.{int(m.group(2))}" if m else name


def layer_range(name: str) -> list[str] | None:
    """`mlp_in.0..3` → [mlp_in.0, mlp_in.1, mlp_in.2, mlp_in.3] (inclusive: the hooks of a
    cross-layer transcoder); None for a single hook."""
    r = _RANGE_RE.match(name.strip())
    if r is None:
        return None
    site, a, b = r.group(1), int(r.group(2)), int(r.group(3))
    if b < a:
        raise ConfigError(f"the layer range {name!r} runs backwards; write {site}.{b}..{a}")
    return [f"{site}.{layer}" for layer in range(a, b + 1)]


def normalize_hooks(names: str | list[str]) -> list[str]:
    """A comma-separated string or a list → normalised names, order kept, duplicates dropped."""
    if isinstance(names, str):
        names = names.split(",")
    out: list[str] = []
    for n in names:
        for h in (layer_range(n) or [n]) if n.strip() else []:  # a range: each of its hooks
            if normalize_hook(h) not in out:
                out.append(normalize_hook(h))
    return out


# Interpret's arrays, by group (`top/seq`, `windows/kind`, ...), and its files.
FEATURES = "features"
TOP = "top"
POOL = "pool"
LENS = "lens"
WINDOWS = "windows"
EXPLANATIONS = "explanations.json"
RESPONSES = "responses.json"
DECODER_PNG = "decoder.png"


def member(group: str, name: str) -> str:
    """`top/seq`, `windows/acts`: an array of one of interpret's groups."""
    return f"{group}/{name}"


# Eval's figure (its figures are in the manifest's summary; its array is LOG_DENSITY).
PROBE_K_PNG = "probe_k.png"


# Steer's arrays and its figure.
PROMPT_TOKENS = "prompt_tokens"
BASELINE_TOKENS = "baseline/tokens"
STEERED_TOKENS = "steered/tokens"
STRENGTH_SWEEP_PNG = "strength_sweep.png"
