"""Ground truth: do saectl's TopK, BatchTopK and Matryoshka recover known features at least as
well as SAELens's own trainers, at the same width, k and number of samples?

The data come from SAELens's own generator (`sae_lens.synthetic.SyntheticModel`): its
SynthSAEBench-16k recipe (Zipfian firing, 128 hierarchy trees of branching 4 and depth 3 with
mutually exclusive children, low-rank correlations, orthogonalised directions, magnitudes
5→4 ± folded normal, bias 0.5) scaled by 4 to 4,096 features in 192 dimensions (32 trees). The
world is built once and saved; training activations and an evaluation set (hidden and feature
activations) are drawn once and cached as .npy files, so every SAE sees the same samples.

Scoring is SAELens's `eval_sae_on_synthetic_data` itself, fed the cached evaluation samples:
F1 of each latent as a detector of its best-matching true feature, MCC (Hungarian-matched
decoder cosines), explained variance (FVU = 1 - it), L0 and dead latents.

SAELens trains as its SyntheticSAERunner does (its SAETrainer with the runner's defaults:
constant LR, no warm-up, no input normalisation, AuxK coefficient 1 on latents dead for 1,000
steps, gradients clipped to norm 1, decoder rows at norm 0.1 with activations rescaled by the
decoder norm). saectl trains through `saectl.trainer.Trainer` with the defaults `saectl train`
resolves (warm-up min(1000, 5% of steps)), on batches of the same size.

    python benchmarks/bench_groundtruth.py --samples 300000 --archs batchtopk --lrs 3e-4,8e-4
    python benchmarks/bench_groundtruth.py --tools saelens --set saelens.decoder_init_norm=1 ...
    python benchmarks/bench_groundtruth.py --tools saectl --set auxk_coefficient=1 ...
    python benchmarks/bench_groundtruth.py --tools saectl --set clip_grad_norm=1 ...  (bench-only)

Cache: $SAECTL_GT_CACHE or <tmp>/saectl-groundtruth (about 1 GB per million samples).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTH, K, BATCH = 1024, 12, 1024
PREFIXES = (64, 256, 1024)  # saectl's default for matryoshka at this width and k
SAMPLES = 3_000_000
EVAL_SAMPLES = 50_000
LRS = (3e-3, 8e-3, 2e-2)  # every tool and architecture peaked at 5e-3..8e-3 on 300k samples
ARCHS = ("topk", "batchtopk", "matryoshka")


def world_config():
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    return SyntheticModelConfig(
        num_features=4096, hidden_dim=192,
        firing_probability=ZipfianFiringProbabilityConfig(max_prob=0.4, min_prob=5e-4,
                                                          exponent=0.5),
        hierarchy=HierarchyConfig(total_root_nodes=32, branching_factor=4, max_depth=3,
                                  mutually_exclusive_portion=1.0,
                                  mutually_exclusive_min_depth=0,
                                  compensate_probabilities=True, scale_children_by_parent=True),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        correlation=LowRankCorrelationConfig(correlation_scale=0.1, rank=25),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        bias=0.5, seed=42)


def cache_dir() -> Path:
    root = Path(os.environ.get("SAECTL_GT_CACHE",
                               Path(tempfile.gettempdir()) / "saectl-groundtruth"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def load_world():
    """The synthetic model, built once (minutes: orthogonalisation) and then read from disk."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from sae_lens.synthetic import SyntheticModel

    path = cache_dir() / "world"
    if not (path / "synthetic_model_config.json").is_file():
        _log("building the synthetic world (once) ...")
        SyntheticModel(world_config(), device="cpu").save(path)
    return SyntheticModel.load_from_disk(path, device="cpu")


def _draw(model, n: int, seed: int):
    torch.manual_seed(seed)
    return model.sample_with_features(n)


def train_data(model, n: int) -> np.ndarray:
    """n cached training activations (n, 192), drawn in blocks of fixed seeds: a larger cache
    starts with the same rows, so it serves any smaller n."""
    block = 16384
    blocks = -(-n // block)
    have = sorted(cache_dir().glob("train-*.npy"), key=lambda p: int(p.stem.split("-")[1]))
    for p in have:
        if int(p.stem.split("-")[1]) >= blocks:
            return np.load(p, mmap_mode="r")[:n]
    path = cache_dir() / f"train-{blocks}.npy"
    tmp = path.with_suffix(".part.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                   shape=(blocks * block, model.cfg.hidden_dim))
    t0 = time.perf_counter()
    for b in range(blocks):
        mm[b * block:(b + 1) * block] = _draw(model, block, 1000 + b)[0].numpy()
        if b % 20 == 0:
            _log(f"training data: block {b + 1}/{blocks} ({time.perf_counter() - t0:.0f}s)")
    mm.flush()
    del mm
    tmp.rename(path)
    return np.load(path, mmap_mode="r")[:n]


def eval_data(model, n: int) -> Replay:
    """n cached evaluation samples (their feature activations), drawn apart from training."""
    path = cache_dir() / f"eval-{n}.npz"
    if not path.is_file():
        feats = _draw(model, n, 7)[1]
        idx = feats.nonzero()  # row-major: rows ascending
        np.savez(path, rows=idx[:, 0].numpy(), cols=idx[:, 1].numpy(),
                 vals=feats[idx[:, 0], idx[:, 1]].numpy(), shape=np.array(feats.shape))
    z = np.load(path)
    return Replay(*(torch.from_numpy(z[k]) for k in ("rows", "cols", "vals")),
                  tuple(int(v) for v in z["shape"]))


class Replay:
    """Stands in for SAELens's ActivationGenerator in its eval: hands out the cached samples
    (kept sparse; each batch made dense as the generator makes it)."""

    def __init__(self, rows, cols, vals, shape):
        self.rows, self.cols, self.vals, self.shape = rows, cols, vals, shape
        self.at = 0

    @property
    def n(self) -> int:
        return self.shape[0]

    def rewind(self) -> Replay:
        self.at = 0
        return self

    def sample(self, n: int) -> torch.Tensor:
        lo, hi = torch.searchsorted(self.rows, torch.tensor([self.at, self.at + n]))
        out = torch.zeros(n, self.shape[1])
        out[self.rows[lo:hi] - self.at, self.cols[lo:hi]] = self.vals[lo:hi]
        self.at += n
        return out


def batches(x: np.ndarray):
    for lo in range(0, x.shape[0] - BATCH + 1, BATCH):
        yield torch.from_numpy(np.array(x[lo:lo + BATCH]))


# -- the two trainers --------------------------------------------------------------------------


def train_saelens(arch: str, lr: float, x: np.ndarray, matryoshka_aux: bool = False,
                  **sae_fields):
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        LoggingConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.synthetic import SyntheticSAERunnerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_in = x.shape[1]
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=WIDTH, k=K, **sae_fields))
    elif arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=WIDTH, k=K,
                                                              **sae_fields))
    else:  # its default AuxK (coefficient 1) is on; matryoshka_aux makes it per level
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=WIDTH, k=K, matryoshka_widths=list(PREFIXES),
            use_matryoshka_aux_loss=matryoshka_aux, **sae_fields))
    runner = SyntheticSAERunnerConfig(synthetic_model=str(cache_dir() / "world"), sae=sae.cfg,
                                      training_samples=x.shape[0] // BATCH * BATCH,
                                      batch_size=BATCH, lr=lr, output_path=None,
                                      logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=runner.to_sae_trainer_config(), sae=sae, data_provider=batches(x))
    return trainer.fit()


def train_saectl(arch: str, lr: float, x: np.ndarray, **overrides):
    from saectl.sae import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    steps = x.shape[0] // BATCH
    warm = min(1000, max(1, steps // 20))  # as saectl train resolves it (fitting.resolve)
    from saectl.fitting import DECODER_LR_MULT  # likewise: every architecture here takes k
    clip = overrides.pop("clip_grad_norm", None)  # bench-only: SAELens's clip, not a saectl flag
    if "lr_mult.W_dec" in overrides:  # the probe that found it, now saectl's own field
        overrides["decoder_lr_multiplier"] = float(overrides.pop("lr_mult.W_dec"))
    sae_cfg = SAEConfig(arch=arch, d_in=x.shape[1], d_sae=WIDTH, k=K,
                        matryoshka_prefixes=PREFIXES if arch == "matryoshka" else ())
    train_cfg = TrainConfig(**{"total_steps": steps, "lr": lr, "lr_warmup_steps": warm,
                               "sparsity_warmup_steps": warm,
                               "decoder_lr_multiplier": DECODER_LR_MULT, **overrides})
    trainer = Trainer(sae_cfg, train_cfg, torch.from_numpy(np.array(x[:65536])))
    if clip is not None:
        _clip_before_step(trainer, float(clip))
    for batch in batches(x):
        trainer.step(batch)
    if clip is not None:
        _log(f"gradient norm clipped to {clip:g} on {trainer.clipped}/{steps} steps")
    return trainer.export()


def _clip_before_step(trainer, max_norm: float) -> None:
    """Clip the gradient norm before each Adam step, as SAELens's SAETrainer does (norm 1, on
    its loss of the same form: squared error summed over d_in, mean over the batch)."""
    params = [alias for _, alias in trainer._aliases]
    step, trainer.clipped = trainer.optimizer.step, 0

    def clipped_step(*args, **kwargs):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        trainer.clipped += int(norm > max_norm)
        return step(*args, **kwargs)

    trainer.optimizer.step = clipped_step


def _eval(sae, model, feats: Replay) -> dict:
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    with torch.no_grad():
        r = eval_sae_on_synthetic_data(sae, model.feature_dict, feats.rewind(),
                                       num_samples=feats.n, batch_size=BATCH)
    return {"f1": r.classification.f1_score, "mcc": r.mcc, "fvu": 1 - r.explained_variance,
            "l0": r.sae_l0, "dead": r.dead_latents, "precision": r.classification.precision,
            "recall": r.classification.recall}


class _BatchMode:
    """A saectl BatchTopK/Matryoshka SAE encoding as in training (top k·n over the batch), as
    SAELens's runner scores its training SAE; SAELens's eval calls eval(), which this ignores."""

    def __init__(self, sae):
        self.sae, self.W_dec = sae, sae.W_dec

    def eval(self):
        return self

    def encode(self, x):
        return self.sae.batch_topk(self.sae.pre_acts(x))

    def decode(self, acts):
        return self.sae.decode(acts)


def score(tool: str, sae, model, feats: Replay) -> dict:
    """SAELens's own ground-truth evaluation on the cached evaluation samples, of the SAE as it
    runs at inference (BatchTopK and Matryoshka: a JumpReLU at the learnt threshold) and, for
    those two, as it encodes in training (`*_batch`: BatchTopK over each batch of 1,024)."""
    import tempfile

    from sae_lens import SAE

    batch_mode = None
    if tool == "saelens":
        if type(sae).__name__ != "TopKTrainingSAE":
            batch_mode = sae
        with tempfile.TemporaryDirectory() as d:
            sae.save_inference_model(d)
            sae = SAE.load_from_disk(d)
    elif sae.arch != "topk":
        batch_mode = _BatchMode(sae)
    r = _eval(sae, model, feats)
    if batch_mode is not None:
        r.update({f"{k}_batch": v for k, v in _eval(batch_mode, model, feats).items()
                  if k in ("f1", "fvu", "l0")})
    return r


def one(tool: str, arch: str, lr: float, x, model, feats, overrides: dict,
        seed: int = 0) -> dict:
    torch.manual_seed(seed)
    if tool == "saectl" and seed:
        overrides = {"seed": seed, **overrides}
    t0 = time.perf_counter()
    if tool == "saelens":
        sae = train_saelens(arch, lr, x, **overrides)
    else:
        sae = train_saectl(arch, lr, x, **overrides)
    r = {"tool": tool, "arch": arch, "lr": lr, "samples": x.shape[0], "seed": seed,
         "set": ",".join(f"{k}={v}" for k, v in overrides.items()),
         "train_s": round(time.perf_counter() - t0, 1), **score(tool, sae, model, feats)}
    _log(f"{tool:8} {arch:10} lr {lr:<6g} {r['set']:28} F1 {r['f1']:.3f} MCC {r['mcc']:.3f} "
         f"FVU {r['fvu']:.3f} L0 {r['l0']:.1f} dead {r['dead']}"
         + (f" | batch-mode F1 {r['f1_batch']:.3f} FVU {r['fvu_batch']:.3f}" if "f1_batch" in r
            else "") + f" ({r['train_s']}s)")
    return r


def _log(msg: str) -> None:
    print(f"groundtruth: {msg}", file=sys.stderr, flush=True)


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def _own(tool: str, overrides: dict) -> dict:
    """The overrides meant for `tool`: SAELens takes matryoshka_aux and saelens.FIELD (a field
    of its training SAE's config, e.g. saelens.decoder_init_norm=1); saectl the rest."""
    if tool == "saelens":
        return {k.removeprefix("saelens."): v for k, v in overrides.items()
                if k == "matryoshka_aux" or k.startswith("saelens.")}
    return {k: v for k, v in overrides.items()
            if k != "matryoshka_aux" and not k.startswith("saelens.")}


def measure(samples: int, archs, lrs, tools, overrides: dict, out: Path | None = None,
            seed: int = 0):
    torch.set_num_threads(int(os.environ.get("SAECTL_GT_THREADS", torch.get_num_threads())))
    model = load_world()
    x = train_data(model, samples)
    feats = eval_data(model, EVAL_SAMPLES)
    results = []
    for arch in archs:
        for lr in lrs:
            for tool in tools:
                results.append(one(tool, arch, lr, x, model, feats, _own(tool, overrides),
                                   seed))
                if out:
                    with out.open("a") as f:
                        f.write(json.dumps(results[-1]) + "\n")
    return results


def best(results: list[dict], tool: str, arch: str) -> dict:
    return max((r for r in results if r["tool"] == tool and r["arch"] == arch),
               key=lambda r: r["f1"])


def run():
    """Rows for `benchmarks/run.py`: each architecture, saectl's best LR against SAELens's.
    SAECTL_GT_SAMPLES scales it down (the goal is stated at 3M samples)."""
    from benchmarks.common import Row

    samples = int(os.environ.get("SAECTL_GT_SAMPLES", SAMPLES))
    results = measure(samples, ARCHS, LRS, ("saectl", "saelens"), {})
    rows = []
    for arch in ARCHS:
        a, b = best(results, "saectl", arch), best(results, "saelens", arch)
        note = (f"{samples:,} samples, width {WIDTH}, k {K}; saectl lr {a['lr']:g} MCC "
                f"{a['mcc']:.3f} FVU {a['fvu']:.3f}; SAELens lr {b['lr']:g} MCC {b['mcc']:.3f} "
                f"FVU {b['fvu']:.3f}")
        rows.append(Row(f"ground truth F1 {arch} vs saelens (best LR each)", a["f1"], b["f1"],
                        "F1", ">= 1x", note=note))
        rows.append(Row(f"ground truth MCC {arch} vs saelens (best LR each)", a["mcc"],
                        b["mcc"], "MCC", ">= 0.98x", note=note))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--lrs", default=",".join(map(str, LRS)))
    p.add_argument("--tools", default="saectl,saelens")
    p.add_argument("--set", action="append", default=[],
                   help="saectl TrainConfig field=value (ablations); saelens.FIELD=value for "
                        "SAELens's SAE config; matryoshka_aux=true for SAELens's per-level "
                        "Matryoshka AuxK")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of both tools")
    p.add_argument("--out", type=Path, help="append one JSON line per run here")
    a = p.parse_args()
    overrides = dict(kv.split("=", 1) for kv in a.set)
    overrides = {k: _value(v) for k, v in overrides.items()}
    results = measure(a.samples, a.archs.split(","), [float(v) for v in a.lrs.split(",")],
                      a.tools.split(","), overrides, a.out, a.seed)
    print(f"{'tool':8} {'arch':10} {'lr':>7} {'set':28} {'F1':>6} {'MCC':>6} {'FVU':>6} "
          f"{'L0':>6} {'dead':>5} {'F1 batch':>8} {'FVU batch':>9}")
    for r in results:
        print(f"{r['tool']:8} {r['arch']:10} {r['lr']:>7g} {r['set']:28} {r['f1']:6.3f} "
              f"{r['mcc']:6.3f} {r['fvu']:6.3f} {r['l0']:6.1f} {r['dead']:5} "
              f"{r.get('f1_batch', float('nan')):8.3f} {r.get('fvu_batch', float('nan')):9.3f}")


if __name__ == "__main__":
    main()
