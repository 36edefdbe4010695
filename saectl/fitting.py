"""Fitting SAEs on a shuffle artifact: the core the train and sweep stages share.

One SAE (`saectl train`) or many (`saectl sweep`'s local executor) go through `train_points`:
every point is an ordinary train artifact with its own address, lock, checkpoint and
evaluation. Points that read the same data (same hook, batch size and seed) share one
prefetching reader, so each batch is read and decoded once and handed to every SAE, as
dictionary_learning's `trainSAE` and SAELens's multi-SAE runner do; on CPU the SAEs' steps on
a batch run side by side, one per torch thread (`_workers`). Each SAE sees the same batches
in the same order as training it alone; its bits are those of training it alone on one
thread (torch's dense products may sum in another order on more threads, as on AVX-512 CPUs).

Checkpoints go into each artifact every few minutes; a run killed and started again resumes
each SAE from its own last checkpoint. When training ends each SAE is stored in SAELens's
layout (input scale folded in), with its training log and evaluation figures: reconstruction
on the eval split and, spliced into the model on held-out sequences, the CE-loss score, KL
score and ΔLM loss.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from saectl import arrays, checkpoints, distributed, faults, layout, outliers, store
from saectl.console import info, progress
from saectl.errors import ConfigError
from saectl.layout import layer_range
from saectl.lineage import harvest_model
from saectl.train_config import (  # noqa: F401 -- re-exported: the stages import them from here
    DECODER_LR_MULT,
    FLAGS_INTO,
    TrainStageConfig,
    address_for,
    resolve,
)

NAME = "train"  # the stage whose artifacts these are (stages/train.py)


@dataclass
class Point:
    """One SAE to train: its resolved configs, its artifact, and (while training) its state."""

    cfg: TrainStageConfig
    hook: str
    target: str | None
    """A transcoder's output hook; None for an SAE."""
    sae_cfg: object
    train_cfg: object
    steps: int
    params: dict
    art: store.Artifact
    trainer: object = None
    tracker: object = None
    """The --log tracker (saectl.tracking), on rank 0 only."""
    log: dict = dataclasses.field(default_factory=dict)
    window: dict = dataclasses.field(default_factory=dict)
    start: int = 0
    last_save: float = 0.0


def open_shuffle(root, ref: str):
    """(shuffle artifact, its manifest, the harvest or import it was made from)."""
    src = store.open_complete(root, ref)
    if src.stage != "shuffle":
        raise ConfigError(f"{src.ref} is a {src.stage} artifact; train takes a shuffle "
                          "(saectl shuffle HARVEST_REF)")
    manifest = src.manifest()
    return src, manifest, store.open_complete(root, manifest["inputs"]["harvest"])


def plan(root, src, manifest, cfg: TrainStageConfig) -> Point:
    """The point `cfg` names on `src`: its resolved configs and its artifact (not created)."""
    dims = {h: v["d"] for h, v in manifest["summary"]["hooks"].items()}
    hook, target, sae_cfg, train_cfg, steps, _ = resolve(cfg, manifest, dims)
    params = address_for(cfg, sae_cfg, train_cfg, hook, target)
    return Point(cfg, hook, target, sae_cfg, train_cfg, steps, params,
                 store.artifact_for(root, NAME, params, {"shuffle": src}))


def train_points(src, manifest, harvest, points: list[Point]) -> list[store.Artifact]:
    """Train and evaluate every point that is not complete, sharing reads where they can: the
    sweep's lifecycle, one write lock per point (`saectl train` has `saectl.stage.run`'s)."""
    todo = [p for p in points if not p.art.is_complete()]
    for p in points:
        if p.art.is_complete():
            info(f"train: cache hit {p.art.ref}")
    lm = find_models(harvest, todo)
    with ExitStack() as stack:
        for p in todo:
            stack.enter_context(store.writing(p.art, p.params, {"shuffle": src},
                                              wait=not p.cfg.no_wait))
        todo = [p for p in todo if not p.art.is_complete()]  # done by another while we waited
        fit(src, manifest, harvest, todo, lm)
    return [p.art for p in points]


def find_models(harvest, points: list[Point]) -> dict:
    """{ref: model spec} for the points whose --lm-eval splices into a model, found (and
    checked by content hash) before any training, so a missing model fails fast."""
    lm = {}
    for p in points:
        if p.cfg.lm_eval and harvest.stage == "import":
            info("train: the activations were imported, so there is no model to splice the "
                 "SAE into; skipping the downstream evaluation")
        elif p.cfg.lm_eval:
            lm[p.art.ref] = _lm_setup(p.cfg, harvest)
    return lm


def fit(src, manifest, harvest, points: list[Point], lm: dict) -> None:
    """Train, evaluate and complete `points`, whose write locks the caller holds; points that
    read the same batches share one reader."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault((p.hook, p.target, p.cfg.batch_size, p.cfg.seed, p.cfg.device),
                          []).append(p)
    for group in groups.values():
        _train_group(src, group)
        for p in group:
            p.trainer.unshard()  # sharded latents: every rank gathers the whole SAE
        if distributed.rank() == 0:  # the other ranks of a data-parallel run only train
            _finish(src, manifest, harvest, group, lm)


def device_for(cfg):
    """The device of `cfg.device`; under torchrun on CUDA, this rank's own GPU (LOCAL_RANK)."""
    import os

    from saectl.models import resolve_device  # deferred: imports torch

    device = resolve_device(cfg.device)
    if distributed.active() and str(device) == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def _train_group(src, group: list[Point]) -> None:
    """One pass over the shared batches; each point trains on the steps it needs."""
    import torch  # deferred, with the modules below that import it: torch is heavy

    from saectl import threads
    from saectl.reader import BatchReader, split_rows
    from saectl.trainer import Trainer

    first = group[0]
    data = split_rows(src.group(), first.hook, "train", src.ref)
    target = split_rows(src.group(), first.target, "train", src.ref) if first.target else None
    distributed.mesh(first.cfg.shards, device_for(first.cfg))  # data × latents (sharding)
    reader = BatchReader(data, first.cfg.batch_size, first.cfg.seed, src.ref, target,
                         part=distributed.data_part())
    rows = slice(0, min(reader.n, 16384))
    sample = torch.from_numpy(arrays.read(data, rows, artifact=src.ref))
    target_sample = (torch.from_numpy(arrays.read(target, rows, artifact=src.ref))
                     if target is not None else None)
    b_dec_cache: dict = {}  # the group's SAEs share the sample, so their initial b_dec
    for p in group:
        torch.manual_seed(p.cfg.seed)
        p.trainer = Trainer(p.sae_cfg, p.train_cfg, sample, target_sample=target_sample,
                            device=device_for(p.cfg), b_dec_cache=b_dec_cache)
        ckpt = layout.checkpoint(p.art.path)
        if ckpt.exists():
            state = checkpoints.load(ckpt, device_for(p.cfg), ("trainer", "log", "window"))
            p.trainer.load_state_dict(state["trainer"])
            p.log, p.window, p.start = state["log"], state["window"], state["trainer"]["step"]
            info(f"train: {p.art.ref[:18]} resuming at step {p.start:,} of {p.steps:,}")
        if len(set(distributed.gather(p.start))) > 1:
            raise ConfigError(f"the ranks found different checkpoints of {p.art.ref[:18]} "
                              f"(steps {distributed.gather(p.start)}); put the store where "
                              "every rank sees the same files")
        distributed.broadcast_module(p.trainer.sae)  # identical weights on every rank
        p.trainer.shard(p.cfg.shards)  # then each keeps its slice of the latents, if sharded
        if p.cfg.log and distributed.rank() == 0:
            from saectl import tracking

            p.tracker = tracking.open_tracker(p.cfg.log, p.art.store, p.art.ref, p.params,
                                              group=p.cfg.log_group, start_step=p.start,
                                              strict=p.cfg.log_strict)
            if p.tracker is not None:  # resumed: the checkpoint's windows again (module doc)
                p.tracker.replay(p.log)
        p.last_save = time.monotonic()
    del sample, target_sample
    if distributed.active():
        n = distributed.data_part()[1]
        info(f"train: data-parallel over {n} ranks, {reader.B // n:,} of each {reader.B:,}-token "
             "batch per rank" + (f"; the latents split over {first.cfg.shards} ranks"
                                 if first.cfg.shards > 1 else ""))
    start, stop = min(p.start for p in group), max(p.steps for p in group)
    if stop * reader.B > reader.n:
        info(f"train: {stop * reader.B:,} tokens over a split of {reader.n:,}: "
             f"{stop * reader.B / reader.n:.2f} epochs")
    desc = "train" if len(group) == 1 else f"train ({len(group)} SAEs)"
    workers = _workers(group)
    with ExitStack() as stack:
        bar = stack.enter_context(progress(desc, stop, "steps", done=start))
        pool = stack.enter_context(ThreadPoolExecutor(workers)) if workers > 1 else None
        if pool is not None:
            stack.enter_context(threads.one_thread())
        for step, x in reader.iterate(start, stop):
            live = [p for p in group if p.start <= step < p.steps]
            for p, figs in zip(live, _steps(pool, live, x)):
                _record(p, step, figs)
            bar.advance(1)


def _workers(group: list[Point]) -> int:
    """Threads to step a group's SAEs on: on CPU, one per torch thread (each SAE's step then on
    one thread), since a step's many small kernels use two threads poorly (the sparse kernel,
    top-k, Adam): a bare loop over the sweep benchmark's 8 trainers took 0.75x the time of
    stepping them in turn on two threads (the whole sweep gains less: README, "The goals
    missed"); the cost is the working memory of as many steps at once. One where the steps
    are collectives (data-parallel) or on a GPU, which runs one kernel stream anyway. Side by
    side, an SAE's steps give the bits of stepping it alone on one thread (tests/test_sweep.py);
    on two threads they match to the last bits, exactly on some CPUs."""
    import torch

    cpu = torch.device(device_for(group[0].cfg)).type == "cpu"
    if len(group) < 2 or distributed.active() or not cpu:
        return 1
    return min(torch.get_num_threads(), len(group))


def _steps(pool, live: list[Point], batch) -> list[dict]:
    """Each live SAE's step on `batch` (a transcoder's is (x, y)), in `live`'s order; on
    `pool`, the widest first so the last to finish is a narrow one."""
    def step(p):  # a NaN loss raises here, the last checkpoint as it was
        return p.trainer.step(*batch) if isinstance(batch, tuple) else p.trainer.step(batch)

    if pool is None:
        return [step(p) for p in live]
    futures = [None] * len(live)
    for i in sorted(range(len(live)), key=lambda i: -live[i].sae_cfg.d_sae):
        futures[i] = pool.submit(step, live[i])
    return [f.result() for f in futures]


def _record(p: Point, step: int, figs: dict) -> None:
    """A step's figures into the point's log (and tracker), and its checkpoint when due: on
    the main thread, between steps."""
    for k, v in figs.items():
        p.window.setdefault(k, []).append(v)
    if (step + 1) % p.cfg.log_every == 0 or step + 1 == p.steps:
        for k, v in p.window.items():
            p.log.setdefault(k, []).append(float(v[-1]) if k == "step" else float(np.mean(v)))
        p.window = {}
        if p.tracker is not None:  # and the speed, which only the tracker gets (not stored:
            now = time.monotonic()  # a resumed artifact's log must equal an uninterrupted one's)
            tokens = p.cfg.batch_size * (step + 1 - p.tracker.last_step)
            speed = tokens / max(now - p.tracker.last_time, 1e-9)
            p.tracker.log(step + 1, {**{k: v[-1] for k, v in p.log.items()},
                                     "tokens_per_s": speed})
            p.tracker.last_step, p.tracker.last_time = step + 1, now
    due = time.monotonic() - p.last_save > p.cfg.checkpoint_minutes * 60 or (
        p.cfg.checkpoint_steps and (step + 1) % p.cfg.checkpoint_steps == 0)
    sharded = p.trainer.shards > 1
    if sharded:  # every rank gathers its shard into the checkpoint, so all must agree when
        due = distributed.broadcast_flag(bool(due))
    if due and step + 1 < p.steps and (sharded or distributed.rank() == 0):  # one rank writes
        _save_checkpoint(p)
        p.last_save = time.monotonic()


def _save_checkpoint(p: Point) -> None:
    state = {"trainer": p.trainer.state_dict(), "log": p.log, "window": p.window}
    if distributed.rank() == 0:
        checkpoints.save(layout.checkpoint(p.art.path), state)
        faults.point("train.checkpointed")


def _finish(src, manifest, harvest, group: list[Point], lm: dict) -> None:
    """Evaluate, save and complete a group's points. Points spliced into the same model on the
    same sequences share each batch's clean and zero-ablated passes (`metrics.spliced_many`):
    their figures are those of evaluating each alone, for 2 + P passes a batch, not 3P."""
    saes, summaries = {}, {}
    for p in group:
        saes[p.art.ref] = p.trainer.export()
        p.trainer = None  # the optimizer's state is no longer needed
        out = p.art.group("r+")
        for k, v in p.log.items():
            out.create_array(layout.train_log(k), data=np.asarray(v, dtype=np.float64),
                             overwrite=True)
        summaries[p.art.ref] = _evaluate(p.art, src, harvest, p.hook, saes[p.art.ref], p.cfg,
                                         p.target)
    shared: dict[tuple, list[Point]] = {}
    for p in group:
        if lm.get(p.art.ref) is not None:
            key = (lm[p.art.ref], p.cfg.lm_eval_seqs, getattr(saes[p.art.ref], "cross_layer",
                                                              False))
            shared.setdefault(key, []).append(p)
    for (spec, _, _), points in shared.items():
        figures = _lm_figures(src, harvest, points[0].hook, points[0].target,
                              {p.art.ref: saes[p.art.ref] for p in points}, spec, points[0].cfg)
        for ref, f in figures.items():
            summaries[ref].update(f)
    for p in group:
        summary = summaries[p.art.ref]
        summary.update(hook=p.hook, **({"target": p.target} if p.target else {}),
                       transcoder=p.target is not None, arch=p.sae_cfg.arch,
                       d_in=p.sae_cfg.d_in, d_sae=p.sae_cfg.d_sae, k=p.sae_cfg.k, steps=p.steps,
                       tokens=p.steps * p.cfg.batch_size,
                       epochs=p.steps * p.cfg.batch_size / manifest["summary"]["n_train"],
                       final_log={k: v[-1] for k, v in p.log.items()} if p.log else {})
        if p.tracker is not None:
            p.tracker.summary(summary)
            p.tracker.close()
            p.tracker = None
        store.mark_complete(p.art, summary)
        checkpoints.remove(layout.checkpoint(p.art.path))  # the weights are saved; free the disk
        figs = ", ".join(f"{k} {summary[k]:.4g}" for k in ("fvu", "l0", "dead_fraction",
                                                            "ce_loss_score") if k in summary)
        info(f"train: wrote {p.art.ref} ({figs})")


def _lm_setup(cfg, harvest):
    """The harvest's model (or --model), checked by content hash before any training."""
    return harvest_model(harvest, cfg.model)


@functools.lru_cache(maxsize=1)
def load_lm(spec, device):
    """The model for downstream evaluation, loaded once for all the points of a sweep."""
    from saectl import models  # deferred: imports torch and transformers

    return models.load_model(spec, device=device)


def _evaluate(art, src, harvest, hook, sae, cfg, target=None) -> dict:
    """The figures on the eval split (a transcoder's: of its prediction of the target); the
    SAE saved beside them with its latents' firing densities."""
    import torch  # deferred, with the modules below that import it: torch is heavy

    from saectl import metrics
    from saectl.reader import BatchReader, split_rows

    group = src.group()
    ev = split_rows(group, hook, "eval", src.ref)
    n_eval = int(ev.shape[0])
    if n_eval == 0:
        raise ConfigError(f"{src.ref} has no eval split; re-run shuffle with --eval-fraction > 0")
    ev_target = split_rows(group, target, "eval", src.ref) if target else None
    reader = BatchReader(ev, min(cfg.batch_size, n_eval), 0, src.ref, ev_target)
    figures, log_density = metrics.reconstruction(sae, reader.once)
    out = art.group("r+")
    out.create_array(layout.LOG_DENSITY, data=log_density.astype(np.float32), overwrite=True)
    sae_dir = layout.sae_dir(art.path)
    sparsity = torch.from_numpy(np.where(np.isfinite(log_density), log_density, -10.0)).float()
    sae.save(sae_dir, sparsity=sparsity,
             metadata={"hook_name": hook, **({"target_hook": target} if target else {}),
                       "saectl_ref": art.ref,
                       "model_name": harvest.manifest().get("origin", {}).get("model", {})
                       .get("name"), "context_size": harvest.manifest()["params"]["context_size"]})
    return figures


def _lm_figures(src, harvest, hook, target, saes: dict, lm_spec, cfg) -> dict:
    """{key: CE-loss/KL scores} of `saes` {key: sae} of one site, each spliced into the model
    (a transcoder's output replacing the target hook's activation) on the first
    `cfg.lm_eval_seqs` held-out sequences, the clean and zero-ablated passes shared."""
    import torch  # deferred, with the modules below that import it: torch is heavy

    from saectl import metrics

    device = device_for(cfg)
    model = load_lm(lm_spec, device)
    seqs = src.group()[layout.EVAL_SEQUENCES][:][: cfg.lm_eval_seqs]
    tokens = harvest.group()[layout.TOKENS].get_orthogonal_selection((seqs, slice(None)))
    ids = torch.from_numpy(np.asarray(tokens)).long().to(device)
    skip = 0 if src.manifest()["params"].get("keep_bos") else 1
    # The outliers the shuffle left out of training keep their clean activation, as BOS does.
    first = (layer_range(hook) or [hook])[0]  # one set of outliers for all of a shuffle's hooks
    keep = torch.from_numpy(outliers.left_out(src, first, seqs, ids.shape[1]))
    return metrics.spliced_many(model, {k: sae.to(device) for k, sae in saes.items()}, hook,
                                target, ids, skip, keep)
