"""Evaluating a trained SAE on any activations of its model and hook: the work of `saectl eval`
(stages/eval.py), and of `saectl sweep --eval` on every point.

What it evaluates on (`--harvest REF`, the config's `harvest`):
- nothing given: the SAE's own shuffle's eval split, exactly the tokens train evaluated on and
  the sweep computes description lengths on (same reader, same batches, so the same figures);
- a shuffle: its eval split (its train split is what some SAE was fitted to);
- a harvest: all its tokens but BOS (kept where the SAE's own shuffle kept it), token order;
- an import: all its rows (no model, so no CE-loss/KL scores and no probing).
A harvest, shuffle or import of another model, hook or width is one line (`check_activations`).

What it writes: the figures of `saectl.metrics` (reconstruction, and the CE-loss and KL scores
spliced into the model on held-out sequences), the description length at `--tolerance` from
`saectl.mdl`, and k-sparse probing (`saectl.probing`, on `saectl.probe_data`'s texts).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np

from saectl import arrays, eval_lm, layout, lineage, probe_data, store
from saectl import stage as contract
from saectl.config import address_params, opt
from saectl.console import info
from saectl.errors import ConfigError
from saectl.layout import layer_range
from saectl.stage import DeviceOptions, Plan, Stage

NAME = "eval"
BATCH = 8192  # tokens per batch: the sweep's, so description lengths match it bit for bit
PROBE_BATCH = 16  # texts per model pass while probing


@dataclass(frozen=True)
class EvalConfig(DeviceOptions):
    sae: str | None = opt(None, "The train artifact whose SAE to evaluate")
    harvest: str | None = opt(None, "Harvest, shuffle or import to evaluate on (default: the "
                                    "eval split of the SAE's own shuffle)")
    tolerance: float = opt(0.1, "FVU tolerance ε of the description length (as in sweep)")
    lm_eval: bool = opt(True, "Splice the SAE into the model for CE-loss/KL scores")
    lm_eval_seqs: int = opt(16, "Held-out sequences for the CE-loss/KL scores")
    probe: bool = opt(True, "k-sparse probing on labelled texts (--no-probe to skip)")
    probe_data: str | None = opt(None, "Labelled texts: .jsonl/.json/.parquet or a hub id "
                                       "(default: the packaged Wikipedia summaries' topics)")
    probe_text_column: str | None = opt(None, "Column of the texts (default: extract for "
                                              "the packaged summaries, else text)")
    label_column: str | None = opt(None, "Column of the labels (default: topic for the "
                                         "packaged summaries, else label)")
    probe_exclude: str | None = opt(None, "Comma-separated labels to leave out (default: "
                                          "Uncategorized for the packaged summaries)")
    probe_texts: int = opt(100, "Texts per class at most (80% train, 20% test)")
    probe_context: int = opt(128, "Tokens per probe text, BOS included (SAEBench: 128)")
    probe_seed: int = opt(0, "Seed of the texts drawn, the negatives and the random latents")
    max_activation_norm_multiple: float = opt(
        5.0, "On a harvest: leave out tokens whose norm exceeds this multiple of the median, "
             "as the shuffle does (a shuffle has left them out already); 0 keeps every token")
    model: str | None = opt(None, "Where to load the model if it moved (checked against the "
                                  "harvest's content hash)", address=False)

    def __post_init__(self):
        if not self.sae:
            raise ConfigError("give the SAE to evaluate: saectl eval TRAIN_REF")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"--tolerance must be in (0, 1), got {self.tolerance}")
        for name in ("lm_eval_seqs", "probe_texts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.probe_context < 2:
            raise ConfigError("--probe-context must be at least 2 (BOS and one token)")
        if not (self.max_activation_norm_multiple == 0 or self.max_activation_norm_multiple > 1):
            raise ConfigError("--max-activation-norm-multiple must be 0 (keep all) or above 1, "
                              f"got {self.max_activation_norm_multiple}")

    def excluded(self) -> tuple[str, ...] | None:
        if self.probe_exclude is None:
            return None
        return tuple(s.strip() for s in self.probe_exclude.split(",") if s.strip())


@dataclass
class Target:
    """What planning opened, for build."""

    lin: lineage.Lineage
    data: store.Artifact
    """The shuffle, harvest or import evaluated on."""
    harvest: store.Artifact
    """The harvest (or import) behind `data`."""
    keep_bos: bool
    model: object = None
    """The model's spec, found in prepare (None for imported activations)."""
    probe: object = None
    """probe_data.ProbeTexts, read in prepare."""
    threshold: float | None = None
    """On a harvest: the norm above which a token is left out (set in build)."""


def plan(cfg: EvalConfig) -> Plan:
    root = store.store_root(cfg.store)
    lin = lineage.sae_lineage(root, cfg.sae)
    given = store.open_complete(root, cfg.harvest) if cfg.harvest else None
    data = given or lin.shuffle or lin.harvest_or(None)  # an imported SAE needs --harvest
    keep_bos = bool(lin.shuffle.manifest()["params"].get("keep_bos")) if lin.shuffle else False
    if data.stage == "shuffle":
        harvest = store.open_complete(root, data.manifest()["inputs"]["harvest"])
        lineage.check_activations(lin, harvest)
        if layout.eval_rows((layer_range(lin.hook) or [lin.hook])[0]) not in data.group() or \
                data.manifest()["summary"]["n_eval"] == 0:
            raise ConfigError(f"{data.ref} has no eval split at {lin.hook}; re-run shuffle "
                              "with --eval-fraction > 0, or pass a harvest")
        keep_bos = bool(data.manifest()["params"].get("keep_bos"))
    else:
        lineage.check_activations(lin, data)
        harvest = data
    params = settings(cfg)
    if data.stage == "shuffle":  # the shuffle chose its outliers: not this stage's setting
        del params["max_activation_norm_multiple"]
    inputs = {"sae": lin.sae, "data": data}
    return Plan(store.artifact_for(root, NAME, params, inputs), params, inputs,
                context=Target(lin, data, harvest, keep_bos))


def settings(cfg: EvalConfig) -> dict:
    """The address params: every setting but the inputs, and what the probe texts are (their
    files by content); the probe's settings only where it runs."""
    params = address_params(cfg)
    del params["sae"], params["harvest"]
    if not cfg.probe:
        return {k: v for k, v in params.items() if not k.startswith("probe")}
    text_col, label_col = probe_data.columns(cfg.probe_data, cfg.probe_text_column,
                                             cfg.label_column)
    return {**params, "probe_identity": probe_data.identity(cfg.probe_data, text_col, label_col)}


def prepare(cfg: EvalConfig, plan: Plan) -> None:
    """Before the lock: find the model (by content hash) and read the probe texts, so a missing
    model or a bad probe dataset is one line and leaves no artifact."""
    t: Target = plan.context
    if t.harvest.stage == "harvest" and (cfg.lm_eval or cfg.probe):
        t.model = lineage.harvest_model(t.harvest, cfg.model)
    if cfg.probe and t.model is not None:
        t.probe = probe_data.load(cfg.probe_data, cfg.probe_text_column, cfg.label_column,
                                  cfg.excluded(), cfg.probe_texts, cfg.probe_seed)


def batches(t: Target):
    """A callable giving a fresh iterator over the evaluated activations (module docstring)."""
    from saectl.reader import BatchReader, split_rows  # deferred: imports torch

    hook, target = t.lin.hook, t.lin.target  # a transcoder's batches are (x, y) pairs
    g = t.data.group()
    if t.data.stage == "shuffle":
        ev = split_rows(g, hook, "eval", t.data.ref)
        ev_y = split_rows(g, target, "eval", t.data.ref) if target else None
        return BatchReader(ev, min(BATCH, int(ev.shape[0])), 0, t.data.ref, ev_y).once
    arr = _acts(t, hook)
    context = (t.data.manifest()["params"]["context_size"]
               if t.data.stage == "harvest" and not t.keep_bos else None)
    return partial(_rows, arr, t.data.ref, context, t.threshold,
                   _acts(t, target) if target else None)


def _acts(t: Target, hook: str):
    """A harvest's activations at `hook`, or at every layer of a range side by side."""
    from saectl.reader import hook_acts  # deferred: imports torch

    return hook_acts(t.data.group(), hook, t.data.ref)


def _centred(rows):
    for x in rows():
        yield x - x.mean(-1, keepdim=True)


def _rows(arr, ref: str, context: int | None, threshold: float | None = None, target=None):
    """Batches of `arr`'s rows in order, leaving out each context's first (BOS) row and the
    rows whose norm exceeds `threshold`; with a `target` array, (x, y) pairs of both."""
    import torch  # deferred: torch is heavy

    n = int(arr.shape[0])
    for a in range(0, n, BATCH):
        rows = slice(a, min(a + BATCH, n))
        x = arrays.read(arr, rows, artifact=ref)
        keep = np.ones(len(x), bool)
        if context:
            keep &= np.arange(a, a + len(x)) % context != 0
        if threshold is not None:
            keep &= np.linalg.norm(x.astype(np.float64), axis=1) <= threshold
        x = torch.from_numpy(np.ascontiguousarray(x[keep]))
        if target is None:
            yield x
        else:
            yield x, torch.from_numpy(np.ascontiguousarray(arrays.read(target, rows,
                                                                       artifact=ref)[keep]))


def _outlier_threshold(cfg: EvalConfig, t: Target) -> tuple[float | None, int]:
    """On a harvest or import: (multiple × the median token norm, tokens above it), BOS aside;
    the shuffle's rule, so a harvest and its shuffle are measured on the same tokens."""
    if t.data.stage == "shuffle" or cfg.max_activation_norm_multiple == 0:
        return None, 0
    inputs = (b[0] if isinstance(b, tuple) else b for b in batches(t)())  # a transcoder: x
    norms = np.concatenate([np.linalg.norm(x.double().numpy(), axis=1) for x in inputs])
    threshold = float(cfg.max_activation_norm_multiple * np.median(norms)) if len(norms) else 0
    return threshold, int((norms > threshold).sum())


def build(cfg: EvalConfig, plan: Plan, writer: store.Writing) -> None:
    from saectl import hooks, mdl, metrics  # deferred: they import torch, which is heavy
    from saectl.fitting import device_for, load_lm  # train's model cache, shared in a sweep
    from saectl.sae import load_sae

    t: Target = plan.context
    device = device_for(cfg)
    sae = load_sae(layout.sae_dir(t.lin.sae.path)).to(device)
    # An imported SAE trained on TransformerLens's centred activations reconstructs x - mean(x)
    # (saectl.basis): measure it on those, and splice its output back with the token's mean.
    centred = t.lin.sae.manifest()["summary"].get("basis") == "center"
    t.threshold, n_outliers = _outlier_threshold(cfg, t)
    rows = batches(t)
    if centred:
        rows = partial(_centred, rows)
    figures, log_density = metrics.reconstruction(sae, rows)
    dl = mdl.description_length(sae, rows, cfg.tolerance)
    summary = {"sae": t.lin.sae.ref, "data": t.data.ref, "data_stage": t.data.stage,
               "hook": t.lin.hook, **({"target": t.lin.target} if t.lin.target else {}),
               "d_in": t.lin.d_in, "d_sae": t.lin.d_sae,
               "arch": t.lin.sae.manifest()["summary"].get("arch"),
               **figures, "tolerance": cfg.tolerance, "dl": dl.bits_per_token,
               "dl_bins": dl.bins, "quantised_fvu": dl.quantised_fvu,
               "naive_bound": dl.naive_bound, "probing": None,
               "outliers_left_out": n_outliers, "outlier_threshold": t.threshold}
    model = hook = None
    if t.model is not None:
        model = load_lm(t.model, device)
        hook = None if layer_range(t.lin.hook) else hooks.parse_hooks(model, [t.lin.hook])[0]
    else:
        info(f"eval: {t.harvest.ref} holds imported activations, so there is no model: no "
             "CE-loss/KL scores and no probing")
    if model is not None and cfg.lm_eval:
        scores = eval_lm.scores(plan.art.ref, t, sae, model, cfg.lm_eval_seqs, device, centred)
        summary.update(scores)
        if not scores:
            info(f"eval: {t.lin.target or t.lin.hook} can be read but not spliced, so no "
                 "CE-loss/KL scores")
    if model is not None and t.probe is not None and hook is None:
        info("eval: probing reads one hook; a cross-layer transcoder is not probed")
    elif model is not None and t.probe is not None:
        summary["probing"] = _probe(cfg, t, sae, model, hook)
    out = plan.art.group("r+")
    out.create_array(layout.LOG_DENSITY, data=log_density.astype(np.float32), overwrite=True)
    if summary["probing"]:
        probe_plot(layout.report(plan.art.path, layout.PROBE_K_PNG), {"this SAE": summary["probing"]})
    store.mark_complete(plan.art, summary)
    info(f"eval: wrote {plan.art.ref}")


_PROBE_ACTS: dict = {}  # one entry: a sweep evaluates many SAEs on the same model pass


def _probe(cfg: EvalConfig, t: Target, sae, model, hook) -> dict:
    import torch  # deferred: torch is heavy

    from saectl import probing
    from saectl.models import load_tokenizer

    p = t.probe
    key = (t.model, hook.name, cfg.probe_data, cfg.probe_text_column, cfg.label_column,
           cfg.probe_exclude, cfg.probe_texts, cfg.probe_context, cfg.probe_seed, str(sae.device))
    if key not in _PROBE_ACTS:
        _PROBE_ACTS.clear()
        ids = probe_data.tokenize(load_tokenizer(t.model), p.texts, cfg.probe_context)
        info(f"eval: running the model over {len(ids):,} probe texts "
             f"({sum(map(len, ids)):,} tokens)")
        _PROBE_ACTS[key] = probe_data.capture(model, hook, ids, PROBE_BATCH)
    acts, index = _PROBE_ACTS[key]
    with torch.no_grad():
        lat = torch.cat([sae.encode(a.to(sae.device)).float().cpu()
                         for a in torch.split(acts, BATCH)])
    n = len(p.texts)
    split = probing.Split(probing.mean_pool(lat, index, n), probing.mean_pool(acts, index, n),
                          p.labels, p.train)
    res = probing.sparse_probing(split, seed=cfg.probe_seed)
    text_col, label_col = probe_data.columns(cfg.probe_data, cfg.probe_text_column,
                                             cfg.label_column)
    return {"dataset": cfg.probe_data or "wiki-offline", "text_column": text_col,
            "label_column": label_col, "class_counts": p.counts,
            "texts": probe_data.class_counts(p.labels), "n_train": int(p.train.sum()),
            "n_test": int((~p.train).sum()), "context": cfg.probe_context, **res}


def probe_plot(path, results: dict[str, dict]) -> None:
    """Accuracy against k: each SAE's top-k latents, random k latents, the full activations."""
    from saectl.plots import plt, save_figure  # matplotlib, only when a figure is drawn

    fig, ax = plt.subplots(figsize=(6, 4.2))
    def curve(by_k: dict):  # a manifest's keys are sorted as strings: "1", "10", "2", ...
        ks = sorted(int(k) for k in by_k)
        return ks, [by_k[str(k)] for k in ks]

    for name, r in results.items():
        ax.plot(*curve(r["sae_top_k"]), "o-", label=f"{name}: top-k latents")
        if len(results) == 1:
            ax.plot(*curve(r["random_k"]), "s:", color="grey", label="random k latents")
            ax.plot(*curve(r["model_top_k"]), "^--", color="tab:orange",
                    label="top-k model dimensions")
    first = next(iter(results.values()))
    ax.axhline(first["model_full"], color="black", lw=1, ls="--",
               label=f"all model activations ({first['model_full']:.3f})")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ks = sorted({int(k) for r in results.values() for k in r["sae_top_k"]})
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="k (latents the probe reads)", ylabel="test accuracy",
           title=f"k-sparse probing ({len(first['tasks'])} one-vs-rest tasks)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def evaluate(cfg: EvalConfig) -> store.Artifact:
    """The lifecycle `saectl eval` has (cache hit, lock, build), for the sweep's points."""
    return contract.run(Stage(NAME, EvalConfig, "", plan, build, prepare=prepare), cfg)


@contextmanager
def shared_lm_eval(cfgs: list[EvalConfig]):
    """While a sweep evaluates its points one by one (`evaluate`): the CE-loss/KL scores of the
    points not yet evaluated, spliced in together (saectl.eval_lm), for their builds to take."""
    from saectl.fitting import device_for

    points, thresholds = [], {}
    for cfg in cfgs:
        p = plan(cfg)
        t: Target = p.context
        if cfg.lm_eval and not p.art.is_complete() and t.harvest.stage == "harvest":
            t.model = lineage.harvest_model(t.harvest, cfg.model)
            # on a harvest, the outliers passed through: one norm pass for all the points
            key = (t.data.ref, t.lin.hook, t.lin.target, t.keep_bos,
                   cfg.max_activation_norm_multiple)
            if key not in thresholds:
                thresholds[key] = _outlier_threshold(cfg, t)[0]
            t.threshold = thresholds[key]
            points.append((p.art.ref, t, cfg.lm_eval_seqs, device_for(cfg)))
    try:
        eval_lm.share(points)
        yield
    finally:
        eval_lm.forget()
