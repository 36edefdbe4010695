"""Interpret: what each feature of a trained SAE means, and how sure we are.

Three phases, each resumable inside one interpret artifact:
1. *scan* (`saectl.scan`): the SAE over a harvest, streamed in blocks of whole sequences in
   bounded memory, keeping per feature its density, mean and max activation, a histogram of
   log activations, its top contexts and a uniform sample of the contexts it fires on; plus
   the logit lens of its decoder direction (`saectl.lineage.logit_lens`);
2. *windows* (`saectl.examples`): the example windows chosen from those, read in a second pass
   for the per-token activations the dashboard shades and the explainer reads;
3. *explain* (`saectl.autointerp`): for a seeded sample of live features, an explainer model
   writes a one-sentence explanation from the top and quantile examples, and the `--scorers`
   rate it on held-out contexts, each beside a control (another feature's explanation on the
   same contexts): detection (activating against non-activating contexts) and fuzzing
   (correctly against wrongly marked tokens of activating contexts). Answers are cached in
   the store apart from any artifact (`saectl.explanations_cache`, keyed by explainer, prompt
   and examples), so a re-run asks only what is missing, and another explainer or scorer
   (another address) takes the scan and windows of an interpret artifact that differs only
   in those (`EXPLAIN_ONLY`) instead of scanning again.

Then `report/index.html` (`saectl.dashboard`), written even when the explainer fails; the
artifact is complete only once every chosen feature is explained. Layout: saectl/layout.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from saectl import autointerp, dashboard, examples, faults, layout, store
from saectl.config import address_params, opt, parse_bytes, parse_image_shape
from saectl.console import info, progress
from saectl.errors import ConfigError
from saectl.explain import ExplainerError, make_client
from saectl.explanations_cache import StoreCache, copy_members, scan_donor
from saectl.lineage import (
    Lineage,
    check_activations,
    harvest_model,
    logit_lens,
    sae_lineage,
)
from saectl.stage import DeviceOptions, Plan, Stage

NAME = "interpret"
FIGURES = ("n_features", "dead_fraction", "n_explained", "mean_score", "mean_control_score",
           "mean_fuzz_score", "mean_fuzz_control_score")
DEFAULT_SCORERS = ("detection",)
LENS_K = 10
SCANNED, WINDOWED = 1, 2  # progress units
EXPLAIN_ONLY = ("explain", "explainer", "explain_max", "scorers", "prompt_window")
"""Address params that change only the explanations: artifacts differing in these alone share
one scan (`explanations_cache.scan_donor`)."""
SCAN_MEMBERS = (layout.FEATURES, layout.STATS, layout.TOP, layout.POOL, layout.LENS,
                layout.WINDOWS)


@dataclass(frozen=True)
class InterpretConfig(DeviceOptions):
    sae: str | None = opt(None, "The trained SAE (a train ref, e.g. the one sweep chose)")
    harvest: str | None = opt(None, "Harvest (or import) to scan; default: the SAE's own")
    features: str | None = opt(None, "Features to study, e.g. 0-99,512 (default: all)")
    sample: int | None = opt(None, "Study a seeded random sample of N features instead")
    seed: int = opt(0, "Seed of the feature sample, example draws and detection shuffles")
    tokens: int | None = opt(None, "Scan at most this many tokens (whole contexts) of the harvest")
    top: int = opt(20, "Top-activating contexts kept per feature (one per sequence)")
    quantiles: int = opt(4, "Activation quantiles that examples are drawn from")
    per_quantile: int = opt(3, "Examples shown per quantile")
    window: int = opt(32, "Tokens per context shown (the activating token ~3/4 along)")
    prompt_window: int = opt(16, "Tokens per context in the explainer's and scorer's prompts "
                                 "(the same cut; shorter prompts for small CPU models)")
    explain: bool = opt(True, "Explain and score features with a language model")
    explainer: str | None = opt(None, "HF model id or folder, or an OpenAI-compatible URL "
                                      "(http://host:port/v1); default: the packaged SmolLM2")
    explainer_model: str | None = opt(None, "Model name at the --explainer URL (key from "
                                            "$OPENAI_API_KEY)")
    explain_max: int = opt(50, "Explain at most N live features (a seeded sample)")
    detection: int = opt(10, "Held-out activating, and as many non-activating, contexts per score")
    scorers: str = opt("detection", "Scorers of each explanation, comma-separated: detection, "
                                    "fuzzing (each asks one prompt per 5 held-out contexts, and "
                                    "as many for its control)")
    dashboard_max: int = opt(2000, "Features whose examples the dashboard shows (a seeded "
                                   "sample beyond that; 0: every live feature); every feature "
                                   "is listed with its statistics and logit lens")
    image_shape: str | None = opt(None, "HxW: draw decoder directions as images (default: the "
                                        "import's --image-shape)")
    memory: str = opt("256MiB", "Working memory for SAE activations per block", address=False)
    open: bool = opt(False, "Open the dashboard in a browser where one exists", address=False)

    def __post_init__(self):
        if not self.sae:
            raise ConfigError("give the SAE to interpret: saectl interpret TRAIN_REF")
        for name in ("top", "quantiles", "per_quantile", "window", "prompt_window", "detection"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.dashboard_max < 0:
            raise ConfigError("--dashboard-max must be at least 0 (0: every live feature)")
        if self.explain_max < 0:
            raise ConfigError("--explain-max must be at least 0")
        if self.sample is not None and self.sample < 1:
            raise ConfigError("--sample must be at least 1")
        if self.sample is not None and self.features:
            raise ConfigError("give --features or --sample, not both")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError("--tokens must be at least 1")
        self.image_hw()
        self.scorer_list()

    def scorer_list(self) -> tuple[str, ...]:
        """The --scorers, checked, in their running order (so their order on the command line
        does not change the address)."""
        names = {n.strip() for n in self.scorers.split(",") if n.strip()}
        unknown = sorted(names - set(autointerp.SCORERS))
        if unknown or not names:
            what = f"unknown {', '.join(unknown)}" if unknown else "no scorer"
            raise ConfigError(f"--scorers {self.scorers!r}: {what}; choose from "
                              f"{', '.join(autointerp.SCORERS)}, e.g. --scorers detection,fuzzing")
        return tuple(n for n in autointerp.SCORERS if n in names)

    def image_hw(self) -> tuple[int, int] | None:
        return parse_image_shape(self.image_shape)


def parse_features(spec: str, d_sae: int) -> np.ndarray:
    """'0-99,512' → sorted unique indices, each checked against the SAE's width."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ConfigError(f"--features {spec!r}: cannot read {part!r}; write e.g. "
                              "0-99,512") from None
        if a > b or a < 0:
            raise ConfigError(f"--features {spec!r}: {part!r} is not a range of indices")
        if b >= d_sae:
            raise ConfigError(f"feature {b} is out of range: the SAE has {d_sae} features "
                              f"(0-{d_sae - 1})")
        out.update(range(a, b + 1))
    if not out:
        raise ConfigError(f"--features {spec!r} names no feature; write e.g. 0-99,512")
    return np.array(sorted(out), dtype=np.int64)


def select_features(cfg: InterpretConfig, d_sae: int) -> np.ndarray:
    if cfg.features:
        return parse_features(cfg.features, d_sae)
    if cfg.sample is not None:
        rng = np.random.default_rng(cfg.seed)
        return np.sort(rng.choice(d_sae, min(cfg.sample, d_sae), replace=False)).astype(np.int64)
    return np.arange(d_sae, dtype=np.int64)


@dataclass
class Context:
    """What `plan` resolved, for `build`."""

    lineage: Lineage
    harvest: store.Artifact
    features: np.ndarray
    """The SAE latent of each slot (row of the statistics)."""
    client: object | None
    """The explainer, or None with --no-explain / --explain-max 0."""
    n_seq: int
    context_size: int
    image_hw: tuple[int, int] | None


def plan(cfg: InterpretConfig) -> Plan:
    """Everything `cfg` resolves to, and the artifact it names; writes nothing."""
    root = store.store_root(cfg.store)
    lin = sae_lineage(root, cfg.sae)
    harvest = lin.harvest_or(store.open_complete(root, cfg.harvest) if cfg.harvest else None)
    check_activations(lin, harvest)
    feats = select_features(cfg, lin.d_sae)
    client = None
    if cfg.explain and cfg.explain_max > 0:
        client = make_client(cfg.explainer, cfg.explainer_model)
    hsum = harvest.manifest()["summary"]
    C = int(hsum["context_size"])
    n_seq = int(hsum["n_seq"]) if cfg.tokens is None else min(int(hsum["n_seq"]),
                                                               math.ceil(cfg.tokens / C))
    hw = cfg.image_hw() or (tuple(hsum["image_shape"]) if hsum.get("image_shape") else None)
    if hw and hw[0] * hw[1] != lin.d_in:
        raise ConfigError(f"--image-shape {hw[0]}x{hw[1]} has {hw[0] * hw[1]} pixels but the "
                          f"SAE's inputs have {lin.d_in} values")
    params = address_params(cfg)
    params.update(n_seq=n_seq, image_shape=list(hw) if hw else None,
                  explainer=client.identity if client else None,
                  scorers=list(cfg.scorer_list()))
    del params["explainer_model"], params["tokens"]
    if params["scorers"] == list(DEFAULT_SCORERS):  # absent, so addresses made before
        del params["scorers"]                        # --scorers stay valid
    if client is not None and "fuzzing" in cfg.scorer_list() and harvest.stage != "harvest":
        raise ConfigError("--scorers fuzzing marks tokens, and imported activations have none; "
                          "use --scorers detection")
    inputs = {"sae": lin.sae, "harvest": harvest}
    art = store.artifact_for(root, NAME, params, inputs)
    return Plan(art, params, inputs, context=Context(lin, harvest, feats, client, n_seq, C, hw))


def build(cfg: InterpretConfig, plan: Plan, writer) -> None:
    # These import torch: deferred, so `saectl --help` and a cache hit never load it.
    from saectl.models import resolve_device
    from saectl.reader import hook_acts
    from saectl.sae import load_sae
    from saectl.scan import HIST_EDGES, Source, load, load_lens

    ctx, art = plan.context, plan.art
    device = resolve_device(cfg.device)
    sae = load_sae(store.sae_dir(ctx.lineage.sae), device)
    hg = ctx.harvest.group()
    token_ids = hg.get(layout.TOKENS)
    skip_bos = bool(ctx.harvest.manifest()["summary"].get("bos")) and ctx.context_size > 1
    width = min(cfg.window, ctx.context_size - skip_bos) if token_ids is not None else 1
    place = examples.Placement(ctx.context_size, width, skip_bos)
    src = Source(hook_acts(hg, ctx.lineage.hook, ctx.harvest.ref), ctx.harvest.ref, sae, device,
                 ctx.features,
                 ctx.n_seq, ctx.context_size, parse_bytes(cfg.memory))
    done = store.read_progress(art)
    if not {SCANNED, WINDOWED} <= done:
        donor = scan_donor(plan, EXPLAIN_ONLY)
        if donor is not None:
            copy_members(donor, art, SCAN_MEMBERS)
            done |= {SCANNED, WINDOWED}
            store.record_progress(art, "main", done)
            info(f"interpret: scan and examples reused from digest {donor.digest[:12]}… (an "
                 "interpret artifact that differs only in its explanations)")
    if SCANNED not in done:
        _scan(cfg, ctx, art, src, skip_bos)
        done.add(SCANNED)
        store.record_progress(art, "main", done)
        faults.point("interpret.scanned")
    if WINDOWED not in done:
        _windows(cfg, ctx, art, src, place, token_ids)
        done.add(WINDOWED)
        store.record_progress(art, "main", done)
    g = art.group()
    stats, lens = load(g), load_lens(g)
    windows = examples.Windows(g, ctx.context_size)
    strings = _token_strings(ctx.harvest, windows, lens)
    chosen, explained, error = [], {}, None
    if ctx.client is not None:
        chosen = autointerp.choose(stats.fired, windows, cfg.explain_max, cfg.seed)
        explained, error = autointerp.explain_features(
            ctx.client, windows, chosen, strings, prompt_window=cfg.prompt_window,
            seed=cfg.seed, cache=StoreCache(art.store, ctx.client.identity,
                                            legacy=art.path / layout.RESPONSES),
            scorers=cfg.scorer_list())
        store.atomic_write(art.path / layout.EXPLANATIONS, json.dumps(
            {str(int(ctx.features[j])): e for j, e in explained.items()}, indent=1,
            allow_nan=False, default=float).encode())
    summary = _summary(ctx, stats, explained, cfg.scorer_list())
    _write_report(cfg, ctx, art, sae, stats, HIST_EDGES, windows, strings, lens, explained,
                  summary)
    if error is not None:
        n_left = len(chosen) - len(explained)
        raise ExplainerError(f"{error}; {n_left} of {len(chosen)} features left unexplained "
                             f"(statistics and dashboard are in {art.path}); re-run the same "
                             "command to retry, answers already received are kept")
    store.mark_complete(art, summary)
    info(f"interpret: wrote {art.ref}")


def _write_report(cfg: InterpretConfig, ctx: Context, art: store.Artifact, sae, stats,
                  hist_edges, windows, strings, lens, explained: dict, summary: dict) -> None:
    """The dashboard, and the decoder directions drawn as images where the inputs are images."""
    images = None
    if ctx.image_hw:
        W_dec = sae.W_dec.detach().float().cpu().numpy()
        images = W_dec[ctx.features].reshape(len(ctx.features), *ctx.image_hw)
    rows = dashboard.feature_rows(stats, hist_edges, windows, strings, quantiles=cfg.quantiles,
                                  explained=explained, lens=lens, images=images)
    dashboard.write_dashboard(layout.report(art.path, layout.DASHBOARD),
                              _page(ctx, sae.cfg.arch, stats.n_tokens, summary, rows))
    if images is not None:
        k = f", k={sae.cfg.k}" if type(sae).takes_k else ""
        dashboard.decoder_images(layout.report(art.path, layout.DECODER_PNG), images,
                                 ctx.features, stats.fired, stats.n_tokens,
                                 f"{ctx.lineage.sae.ref[:18]}: {sae.cfg.arch}, "
                                 f"{ctx.lineage.d_sae} latents{k}")


def _scan(cfg: InterpretConfig, ctx: Context, art: store.Artifact, src, skip_bos: bool) -> None:
    import torch  # deferred, as in build

    from saectl.scan import save, save_lens, scan

    n_tok = ctx.n_seq * ctx.context_size
    info(f"interpret: scanning {n_tok:,} tokens of {ctx.harvest.ref} through "
         f"{len(ctx.features):,} features")
    pool = 2 * (cfg.quantiles * cfg.per_quantile + cfg.detection) + cfg.top
    with progress("interpret scan", n_tok, "tokens") as bar:
        st = scan(src.blocks(), src.encode_selected, ctx.features, top=cfg.top, pool=pool,
                  seed=cfg.seed, skip_first=skip_bos, on_block=bar.advance)
    g = art.group("r+")
    save(g, st)
    if ctx.harvest.stage == "harvest":  # imported activations have no model to read through
        from saectl.models import load_model  # torch and transformers, deferred

        model = load_model(harvest_model(ctx.harvest), "cpu")  # the unembedding, anywhere
        rows = src.sae.W_dec.detach()[torch.from_numpy(ctx.features).to(src.sae.device)]
        if getattr(src.sae, "cross_layer", False):  # a CLT latent's writes to every later layer
            rows = rows.view(len(rows), src.sae.n_layers, -1).sum(1)  # add up in the residual
        save_lens(g, logit_lens(rows.cpu(), model, LENS_K))


def _windows(cfg: InterpretConfig, ctx: Context, art: store.Artifact, src,
             place: examples.Placement, token_ids) -> None:
    from saectl.scan import load, windows  # torch, deferred as in build

    req = examples.choose(load(art.group()), place, ctx.n_seq, quantiles=cfg.quantiles,
                          per_quantile=cfg.per_quantile, detection=cfg.detection, seed=cfg.seed,
                          dashboard_max=cfg.dashboard_max or len(ctx.features))
    with progress("interpret examples", len(req), "windows") as bar:
        acts = windows(src.read, src.encode_all, req.seq, req.start, ctx.features[req.slot],
                       place.width, src.seqs_per_block, ctx.n_seq, on_block=bar.advance)
    kept = examples.keep(req, acts, cfg.detection)
    examples.save(art.group("r+"), req.select(kept), acts[kept], place.width, token_ids)


def _token_strings(harvest: store.Artifact, windows: examples.Windows,
                   lens: dict | None) -> dict[int, str] | None:
    """Every token the page and the prompts show, decoded once by the harvest's tokenizer."""
    if windows.tokens is None:
        return None
    from saectl.models import load_tokenizer  # torch and transformers, deferred

    ids = [windows.tokens.ravel()]
    if lens is not None:
        ids += [lens["pos_ids"].ravel(), lens["neg_ids"].ravel()]
    tok = load_tokenizer(harvest_model(harvest))
    return {int(i): tok.decode([int(i)]) for i in np.unique(np.concatenate(ids))}


def _mean(explained: dict[int, dict], key: str) -> float | None:
    vals = [e[key] for e in explained.values() if e.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _summary(ctx: Context, stats, explained: dict[int, dict], scorers: tuple[str, ...]) -> dict:
    fired, n_tokens = stats.fired, stats.n_tokens
    # Fuzzing's figures appear only when it ran, so a detection-only summary reads as before.
    fuzz = {"mean_fuzz_score": _mean(explained, "fuzz_balanced_accuracy"),
            "mean_fuzz_control_score": _mean(explained, "fuzz_control_balanced_accuracy")
            } if "fuzzing" in scorers else {}
    return {"sae": ctx.lineage.sae.ref, "hook": ctx.lineage.hook, "harvest": ctx.harvest.ref,
            "n_features": len(fired), "n_tokens": n_tokens,
            "dead_fraction": float((fired == 0).mean()) if len(fired) else 0.0,
            "mean_density": float((fired / max(n_tokens, 1)).mean()) if len(fired) else 0.0,
            "n_explained": sum(1 for e in explained.values() if e.get("explanation")),
            "mean_score": _mean(explained, "balanced_accuracy"),
            "mean_control_score": _mean(explained, "control_balanced_accuracy"), **fuzz,
            "dashboard": f"{layout.REPORT}/{layout.DASHBOARD}"}


def _page(ctx: Context, arch: str, n_tokens: int, s: dict, rows: list[dict]) -> dict:
    """The dashboard's data: a title, the run's figures, and the features' rows."""
    lin = ctx.lineage
    meta = {"sae": lin.sae.ref, "hook": lin.hook, "harvest": ctx.harvest.ref,
            "model": ctx.harvest.manifest().get("origin", {}).get("model", {}).get("name"),
            "architecture": arch, "d_sae": lin.d_sae, "tokens scanned": n_tokens,
            "explained": s["n_explained"], "mean score": s["mean_score"],
            "mean control score": s["mean_control_score"]}
    if "mean_fuzz_score" in s:
        meta.update({"mean fuzz score": s["mean_fuzz_score"],
                     "mean fuzz control score": s["mean_fuzz_control_score"]})
    return {"title": f"saectl · {lin.sae.ref[:18]} · {lin.hook}", "meta": meta,
            "features": rows}


def report(cfg: InterpretConfig, art: store.Artifact) -> None:
    """Where the dashboard is, after a run and on a cache hit; --open opens it."""
    page = layout.report(art.path, layout.DASHBOARD)
    info(f"interpret: dashboard {page}")
    if cfg.open and not dashboard.open_in_browser(page):
        info(f"interpret: no graphical browser here; open {page} on your machine")


STAGE = Stage(NAME, InterpretConfig, "Explain an SAE's features: statistics, examples, logit "
              "lens, explanations with detection (and fuzzing) scores, and a dashboard (report/index.html).",
              plan, build, positional=("sae",), figures=FIGURES, report=report)
