"""The train stage's flags (`TrainStageConfig`) and how they resolve into an SAE config, a
training config and the artifact's address: every default made explicit, every bad
combination refused in one line before anything is written. `saectl.fitting` plans and trains
with what this returns; the sweep resolves each grid point the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from saectl.config import address_params, fields, opt
from saectl.errors import ConfigError
from saectl.layout import layer_range, normalize_hook
from saectl.stage import DeviceOptions


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
    autocast: str | None = into("train.autocast", None,
                                "bfloat16: train with the encoder/decoder products in bf16 "
                                "(fp32 accumulation, weights, Adam state and loss; README, "
                                "Training in bfloat16). Slower on CPUs without avx512_bf16/amx")
    lm_eval: bool = opt(True, "Splice the SAE into the model for CE-loss/KL scores "
                              "(--no-lm-eval for imported activations)")
    lm_eval_seqs: int = opt(16, "Held-out sequences for the downstream evaluation")
    log_every: int = opt(25, "Steps per training-log window")
    checkpoint_minutes: float = opt(5.0, "Minutes between checkpoints", address=False)
    checkpoint_steps: int = opt(0, "Also checkpoint every N steps (0: off)", address=False)
    log: str | None = opt(None, "Also send the training curves to wandb or tensorboard (offline "
                                "by default; README, Training curves)", address=False)
    log_strict: bool = opt(False, "Stop if the --log tracker cannot start (default: say so in "
                                  "one line and train on)", address=False)
    log_group: str | None = opt(None, "The --log tracker's group (a sweep names its points')",
                                address=False)
    nproc: int = opt(1, "Data-parallel ranks on this machine: runs this command under "
                        "torchrun --nproc-per-node N (README, Training on several GPUs)",
                     address=False)
    shards: int = opt(1, "Split the latents over this many ranks (tensor parallel, topk and "
                         "batchtopk; the rest of the ranks split the batch): for SAEs too wide "
                         "for one device (README, Training on several GPUs)", address=False)
    model: str | None = opt(None, "Where to load the model for --lm-eval if it moved "
                                  "(checked against the harvest's content hash)", address=False)

    def __post_init__(self):
        if not self.shuffle:
            raise ConfigError("give the shuffle to train on: saectl train SHUFFLE_REF --arch topk")
        from saectl.sae import arch_names  # deferred: imports torch

        if self.arch not in arch_names():
            raise ConfigError(f"unknown --arch {self.arch!r}; choose one of {', '.join(arch_names())}")
        for name in ("batch_size", "k", "lm_eval_seqs", "log_every", "nproc", "shards"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError("--tokens must be at least 1")
        if self.width is not None and self.width < 1:
            raise ConfigError("--width must be at least 1")
        if self.width is None and not self.expansion > 0:
            raise ConfigError("--expansion must be positive")
        self.prefix_list()
        from saectl import precision

        precision.check(self.autocast)
        if self.log is not None and self.log not in ("wandb", "tensorboard"):
            raise ConfigError(f"--log {self.log!r} is not one of wandb, tensorboard")

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
    if train["autocast"] is None:  # absent unless given (fp32): addresses as they were
        del train["autocast"]
    params.update(hook=hook, sae=sae_cfg.to_dict(), train=train)
    if target is not None:  # absent for an SAE: its address is as it was
        params["target"] = target
    return params
