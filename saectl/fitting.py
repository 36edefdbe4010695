"""Fitting SAEs on a shuffle artifact: the core the train and sweep stages share.

One SAE (`saectl train`) or many (`saectl sweep`'s local executor) go through `train_points`:
every point is an ordinary train artifact with its own address, lock, checkpoint and
evaluation. Points that read the same data (same hook, batch size and seed) share one
prefetching reader, so each batch is read and decoded once and handed to every SAE in turn,
as dictionary_learning's `trainSAE` and SAELens's multi-SAE runner do. Each SAE's result is
bit-identical to training it alone: it sees the same batches in the same order.

Checkpoints go into each artifact every few minutes; a run killed and started again resumes
each SAE from its own last checkpoint. When training ends each SAE is stored in SAELens's
layout (input scale folded in), with its training log and evaluation figures: reconstruction
on the eval split and, spliced into the model on held-out sequences, the CE-loss score, KL
score and ΔLM loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from saectl import arrays, checkpoints, faults, layout, outliers, store
from saectl.config import address_params, fields, opt
from saectl.console import info, progress
from saectl.errors import ConfigError
from saectl.layout import layer_range, normalize_hook
from saectl.lineage import harvest_model
from saectl.stage import DeviceOptions

NAME = "train"  # the stage whose artifacts these are (stages/train.py)


def into(target: str, default, help: str):
    """A train flag whose value, once resolved, lives at `target`: `sae.<SAEConfig field>`,
    `train.<TrainConfig field>`, `hook`, or `input` (the shuffle, addressed by its digest).
    The address holds those resolved values, so the flag itself stays out of it: two spellings
    of one SAE (`--width 256`, or `--expansion 8` on d_in 32) are one artifact."""
    field = opt(default, help)
    return dataclasses.field(default=default, metadata={**field.metadata, "into": target})


@dataclass(frozen=True)
class TrainStageConfig(DeviceOptions):
    shuffle: str | None = into("input", None, "The shuffle artifact to train on")
    hook: str | None = into("hook", None, "Hook to train on (default: the artifact's only hook); "
                                          "a transcoder's input, e.g. mlp_in.3")
    target: str | None = into("target", None, "Train a transcoder: the hook it reconstructs "
                                              "from --hook's activations, e.g. mlp_out.3")
    skip: bool = into("sae.skip", False, "A skip transcoder: add a linear path x @ W_skip "
                                         "(needs --target)")
    arch: str = into("sae.arch", "topk", "SAE architecture, by its registered name (e.g. topk, "
                                         "relu, jumprelu; saectl/sae/ holds them all)")
    expansion: float = into("sae.d_sae", 8.0,
                            "Width as a multiple of d_in (ignored when --width is given)")
    width: int | None = into("sae.d_sae", None, "Number of latents d_sae")
    k: int = into("sae.k", 32, "Active latents per token (architectures that take k, e.g. topk)")
    l1: float = into("sae.l1_coefficient", 5.0, "L1 coefficient (relu, gated)")
    l0: float = into("sae.l0_coefficient", 1.0, "L0 coefficient (jumprelu)")
    bandwidth: float = into("sae.jumprelu_bandwidth", 0.1,
                            "Rectangle-kernel bandwidth of jumprelu's threshold gradient")
    prefixes: str | None = into("sae.matryoshka_prefixes", None,
                                "Matryoshka prefix sizes, e.g. 256,1024,4608")
    tokens: int | None = into("train.total_steps", None,
                              "Training tokens (default: one epoch of the train split)")
    batch_size: int = opt(4096, "Tokens per step")
    lr: float | None = into("train.lr", None, "Adam learning rate (default 2e-4/sqrt(width/16384))")
    warmup_steps: int | None = into("train.lr_warmup_steps", None,
                                    "LR warm-up steps (default min(1000, 5% of steps))")
    decay_fraction: float = into("train.lr_decay_fraction", 0.2,
                                 "Final fraction of steps with linear LR decay to 0")
    decoder_lr_mult: float | None = into(
        "train.decoder_lr_multiplier", None,
        "W_dec's LR as a multiple of --lr (default 10 for the k architectures, 1 for the others; "
        "README, Ground truth)")
    sparsity_warmup_steps: int | None = into("train.sparsity_warmup_steps", None,
                                             "Sparsity-coefficient warm-up steps "
                                             "(default min(1000, 5% of steps))")
    auxk: float = into("train.auxk_coefficient", 1 / 32,
                       "AuxK coefficient for dead latents (architectures with AuxK, e.g. topk)")
    dead_tokens: int = into("train.dead_window_tokens", 10_000_000,
                            "A latent is dead after this many tokens without firing")
    b_dec_init: str = into("train.b_dec_init", "geometric_median",
                           "geometric_median, mean or zeros")
    seed: int = into("train.seed", 0, "Seed of the initialisation and of the epoch orders")
    lm_eval: bool = opt(True, "Splice the SAE into the model for CE-loss/KL scores "
                              "(--no-lm-eval for imported activations)")
    lm_eval_seqs: int = opt(16, "Held-out sequences for the downstream evaluation")
    log_every: int = opt(25, "Steps per training-log window")
    checkpoint_minutes: float = opt(5.0, "Minutes between checkpoints", address=False)
    checkpoint_steps: int = opt(0, "Also checkpoint every N steps (0: off)", address=False)
    model: str | None = opt(None, "Where to load the model for --lm-eval if it moved "
                                  "(checked against the harvest's content hash)", address=False)

    def __post_init__(self):
        if not self.shuffle:
            raise ConfigError("give the shuffle to train on: saectl train SHUFFLE_REF --arch topk")
        from saectl.sae import arch_names  # deferred: imports torch

        if self.arch not in arch_names():
            raise ConfigError(f"unknown --arch {self.arch!r}; choose one of {', '.join(arch_names())}")
        for name in ("batch_size", "k", "lm_eval_seqs", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError("--tokens must be at least 1")
        if self.width is not None and self.width < 1:
            raise ConfigError("--width must be at least 1")
        if self.width is None and not self.expansion > 0:
            raise ConfigError("--expansion must be positive")
        self.prefix_list()

    def prefix_list(self) -> tuple[int, ...]:
        if not self.prefixes:
            return ()
        try:
            return tuple(int(p) for p in str(self.prefixes).split(","))
        except ValueError:
            raise ConfigError(f"--prefixes {self.prefixes!r} must be comma-separated integers, "
                              "e.g. 256,1024,4608") from None


DECODER_LR_MULT = 10.0
"""Default W_dec LR multiple for the k architectures (TopK, BatchTopK, Matryoshka): on SAELens's
ground-truth data it lifts TopK's F1 from 0.38 to 0.52 at better FVU, and on the demo's SmolLM2
layer TopK 4x k16's FVU from 0.443 to 0.331 (README, "Ground truth"). The unit-norm decoder
rows otherwise turn too slowly. Not measured for the L1/L0-penalised ones, which keep 1."""

FLAGS_INTO = {f.name: f.metadata["into"] for f in fields(TrainStageConfig) if "into" in f.metadata}
"""The one table from train flags to the resolved configs (see `into`)."""


def _flags_into(cfg: TrainStageConfig, config: str) -> dict:
    """{field of `config` ("sae" or "train"): flag value} for every flag the table sends there."""
    return {target.partition(".")[2]: getattr(cfg, flag) for flag, target in FLAGS_INTO.items()
            if target.partition(".")[0] == config}


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
    log: dict = dataclasses.field(default_factory=dict)
    window: dict = dataclasses.field(default_factory=dict)
    start: int = 0
    last_save: float = 0.0


def resolve(cfg: TrainStageConfig, manifest: dict, d_in_by_hook: dict[str, int]):
    """(hook, target, SAEConfig, TrainConfig, total steps, tokens) with every default made
    explicit."""
    from saectl.sae import ARCHS, SAEConfig  # deferred: imports torch
    from saectl.trainer import TrainConfig

    hooks = sorted(d_in_by_hook)
    hook = normalize_hook(cfg.hook) if cfg.hook else (hooks[0] if len(hooks) == 1 else None)
    if hook is None:
        raise ConfigError(f"the shuffle holds several hooks; choose one with --hook "
                          f"({', '.join(hooks)})")
    d_in, n_layers = _width(hook, d_in_by_hook, "")
    target = normalize_hook(cfg.target) if cfg.target else None
    cross_layer = ARCHS[cfg.arch].cross_layer
    if (n_layers > 1 or layer_range(target or "")) and not cross_layer:
        raise ConfigError(f"a layer range trains a cross-layer transcoder: give --arch clt or "
                          f"jumprelu-clt (not {cfg.arch}), or one layer, e.g. mlp_in.3")
    if cross_layer and (target is None or layer_range(hook) is None):
        raise ConfigError(f"--arch {cfg.arch} trains a cross-layer transcoder over a layer "
                          "range: give --hook mlp_in.A..B --target mlp_out.A..B")
    if target is not None:
        d_out, n_out = _width(target, d_in_by_hook, "target ")
        if target == hook:
            raise ConfigError(f"--target {target} is --hook itself; a transcoder maps one hook "
                              "to another (leave out --target to train an SAE)")
        if cross_layer and [h.rpartition(".")[2] for h in layer_range(target) or []] != \
                [h.rpartition(".")[2] for h in layer_range(hook) or []]:
            raise ConfigError(f"the CLT layer ranges {hook} and {target} differ; give the "
                              "same layers to both, e.g. mlp_in.0..3 and mlp_out.0..3")
        if d_out != d_in:
            raise ConfigError(f"{hook} has width {d_in} and {target} {d_out}; "
                              "saectl's transcoders map between hooks of one width")
    if cfg.skip and target is None:
        raise ConfigError("--skip adds a transcoder's linear path; give --target too")
    width = cfg.width or int(round(cfg.expansion * d_in))
    if ARCHS[cfg.arch].takes_k and cfg.k >= width // n_layers:
        raise ConfigError(f"--k {cfg.k} must be smaller than the width {width}; lower --k or "
                          "raise --expansion/--width")
    # Every flag goes where the table sends it; those that need resolving are then replaced.
    sae_cfg = SAEConfig(**{**_flags_into(cfg, "sae"), "d_in": d_in, "d_sae": width,
                           "matryoshka_prefixes": cfg.prefix_list(),
                           "transcoder": target is not None, "n_layers": n_layers})
    n_train = manifest["summary"]["n_train"]
    tokens = cfg.tokens or n_train
    steps = math.ceil(tokens / cfg.batch_size)
    warm = min(1000, max(1, steps // 20))
    train_cfg = TrainConfig(**{
        **_flags_into(cfg, "train"), "total_steps": steps,
        "lr_warmup_steps": cfg.warmup_steps if cfg.warmup_steps is not None else warm,
        "sparsity_warmup_steps": (cfg.sparsity_warmup_steps
                                  if cfg.sparsity_warmup_steps is not None else warm),
        "decoder_lr_multiplier": (cfg.decoder_lr_mult if cfg.decoder_lr_mult is not None
                                  else DECODER_LR_MULT if ARCHS[cfg.arch].takes_k else 1.0)})
    return hook, target, sae_cfg, train_cfg, steps, tokens


def _width(hook: str, d_in_by_hook: dict[str, int], what: str) -> tuple[int, int]:
    """(width, layers) of a hook, or of a layer range's hooks side by side."""
    hooks = layer_range(hook) or [hook]
    missing = [h for h in hooks if h not in d_in_by_hook]
    if missing and len(hooks) > 1:
        raise ConfigError(f"the CLT layer range {hook} is not covered by the shuffle: it has no "
                          f"{', '.join(missing)}; harvest every layer of it (--hooks {hook})")
    if missing:
        raise ConfigError(f"the shuffle has no {what}hook {hook!r}; it has "
                          f"{', '.join(sorted(d_in_by_hook))}"
                          + (": harvest both hooks in one pass" if what else ""))
    widths = {d_in_by_hook[h] for h in hooks}
    if len(widths) > 1:
        raise ConfigError(f"the hooks of {hook} have different widths {sorted(widths)}")
    return widths.pop() * len(hooks), len(hooks)


def address_for(cfg: TrainStageConfig, sae_cfg, train_cfg, hook: str,
                target: str | None = None) -> dict:
    """The train address's params: the flags the table does not resolve, and the resolved
    hook (and a transcoder's target), SAE config and training config in place of the flags
    it does."""
    params = {k: v for k, v in address_params(cfg).items() if k not in FLAGS_INTO}
    train = dataclasses.asdict(train_cfg)
    if train["decoder_lr_multiplier"] == 1.0:  # absent at its default: addresses as they were
        del train["decoder_lr_multiplier"]
    params.update(hook=hook, sae=sae_cfg.to_dict(), train=train)
    if target is not None:  # absent for an SAE: its address is as it was
        params["target"] = target
    return params


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
            _finish(src, manifest, harvest, p, lm.get(p.art.ref))


def device_for(cfg):
    from saectl.models import resolve_device  # deferred: imports torch

    return resolve_device(cfg.device)


def _train_group(src, group: list[Point]) -> None:
    """One pass over the shared batches; each point trains on the steps it needs."""
    import torch  # deferred, with the modules below that import it: torch is heavy

    from saectl.reader import BatchReader, split_rows
    from saectl.trainer import Trainer

    first = group[0]
    data = split_rows(src.group(), first.hook, "train", src.ref)
    target = split_rows(src.group(), first.target, "train", src.ref) if first.target else None
    reader = BatchReader(data, first.cfg.batch_size, first.cfg.seed, src.ref, target)
    rows = slice(0, min(reader.n, 16384))
    sample = torch.from_numpy(arrays.read(data, rows, artifact=src.ref))
    target_sample = (torch.from_numpy(arrays.read(target, rows, artifact=src.ref))
                     if target is not None else None)
    for p in group:
        torch.manual_seed(p.cfg.seed)
        p.trainer = Trainer(p.sae_cfg, p.train_cfg, sample, target_sample=target_sample,
                            device=device_for(p.cfg))
        ckpt = layout.checkpoint(p.art.path)
        if ckpt.exists():
            state = checkpoints.load(ckpt, device_for(p.cfg), ("trainer", "log", "window"))
            p.trainer.load_state_dict(state["trainer"])
            p.log, p.window, p.start = state["log"], state["window"], state["trainer"]["step"]
            info(f"train: {p.art.ref[:18]} resuming at step {p.start:,} of {p.steps:,}")
        p.last_save = time.monotonic()
    del sample, target_sample
    start, stop = min(p.start for p in group), max(p.steps for p in group)
    if stop * reader.B > reader.n:
        info(f"train: {stop * reader.B:,} tokens over a split of {reader.n:,}: "
             f"{stop * reader.B / reader.n:.2f} epochs")
    desc = "train" if len(group) == 1 else f"train ({len(group)} SAEs)"
    with progress(desc, stop, "steps", done=start) as bar:
        for step, x in reader.iterate(start, stop):
            for p in group:
                if p.start <= step < p.steps:
                    _step(p, step, x)
            bar.advance(1)


def _step(p: Point, step: int, batch) -> None:
    # a transcoder's batch is (x, y); a NaN loss raises here, the last checkpoint as it was
    figs = p.trainer.step(*batch) if isinstance(batch, tuple) else p.trainer.step(batch)
    for k, v in figs.items():
        p.window.setdefault(k, []).append(v)
    if (step + 1) % p.cfg.log_every == 0 or step + 1 == p.steps:
        for k, v in p.window.items():
            p.log.setdefault(k, []).append(float(v[-1]) if k == "step" else float(np.mean(v)))
        p.window = {}
    due = time.monotonic() - p.last_save > p.cfg.checkpoint_minutes * 60 or (
        p.cfg.checkpoint_steps and (step + 1) % p.cfg.checkpoint_steps == 0)
    if due and step + 1 < p.steps:
        _save_checkpoint(p)
        p.last_save = time.monotonic()


def _save_checkpoint(p: Point) -> None:
    state = {"trainer": p.trainer.state_dict(), "log": p.log, "window": p.window}
    checkpoints.save(layout.checkpoint(p.art.path), state)
    faults.point("train.checkpointed")


def _finish(src, manifest, harvest, p: Point, lm_spec) -> None:
    sae = p.trainer.export()
    out = p.art.group("r+")
    for k, v in p.log.items():
        out.create_array(layout.train_log(k), data=np.asarray(v, dtype=np.float64), overwrite=True)
    summary = _evaluate(p.art, src, harvest, p.hook, sae, lm_spec, p.cfg, p.target)
    summary.update(hook=p.hook, **({"target": p.target} if p.target else {}),
                   transcoder=p.target is not None, arch=p.sae_cfg.arch, d_in=p.sae_cfg.d_in, d_sae=p.sae_cfg.d_sae,
                   k=p.sae_cfg.k, steps=p.steps, tokens=p.steps * p.cfg.batch_size,
                   epochs=p.steps * p.cfg.batch_size / manifest["summary"]["n_train"],
                   final_log={k: v[-1] for k, v in p.log.items()} if p.log else {})
    store.mark_complete(p.art, summary)
    checkpoints.remove(layout.checkpoint(p.art.path))  # the weights are saved; free the disk
    p.trainer = None
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


def _evaluate(art, src, harvest, hook, sae, lm_spec, cfg, target=None) -> dict:
    """The figures on the eval split (a transcoder's: of its prediction of the target), and
    the CE-loss/KL scores with the SAE spliced in (a transcoder's output replacing the
    target hook's activation)."""
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
    if lm_spec is not None:
        device = device_for(cfg)
        model = load_lm(lm_spec, device)
        seqs = group[layout.EVAL_SEQUENCES][:][: cfg.lm_eval_seqs]
        tokens = harvest.group()[layout.TOKENS].get_orthogonal_selection((seqs, slice(None)))
        ids = torch.from_numpy(np.asarray(tokens)).long().to(device)
        skip = 0 if src.manifest()["params"].get("keep_bos") else 1
        # The outliers the shuffle left out of training keep their clean activation, as BOS does.
        first = (layer_range(hook) or [hook])[0]  # one set of outliers for all of a shuffle's hooks
        keep = torch.from_numpy(outliers.left_out(src, first, seqs, ids.shape[1]))
        figures.update(metrics.spliced(model, sae.to(device), hook, target, ids, skip, keep))
    return figures
